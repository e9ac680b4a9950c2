"""Argument checks shared by the kernel launchers (shape, stride, dtype, device).

Each check raises `KernelArgumentError` with the argument's name and what was expected, so a
caller sees `k_cache: expected 4 dims, got 3` instead of a crash or silent garbage on the GPU.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from tokenfleet.kernels.errors import KernelArgumentError

__all__ = [
    "FLOAT_DTYPES",
    "check_device",
    "check_same_shape",
    "check_tensor",
    "is_interpreted",
]

FLOAT_DTYPES = (torch.bfloat16, torch.float16, torch.float32)


def check_tensor(
    name: str,
    t: object,
    *,
    ndim: int,
    dtypes: Sequence[torch.dtype],
    shape: Sequence[int | None] | None = None,
    unit_last_stride: bool = True,
) -> torch.Tensor:
    """Check that `t` is a tensor of `ndim` dims, one of `dtypes`, and (where given) `shape`.

    `shape` entries that are None are not checked. With `unit_last_stride` the last dimension
    must be contiguous (every kernel here vectorises along it).
    """
    if not isinstance(t, torch.Tensor):
        raise KernelArgumentError(f"{name}: expected a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise KernelArgumentError(f"{name}: expected {ndim} dims, got shape {tuple(t.shape)}")
    if t.dtype not in dtypes:
        allowed = ", ".join(str(d) for d in dtypes)
        raise KernelArgumentError(f"{name}: dtype {t.dtype} not supported (allowed: {allowed})")
    if shape is not None:
        for dim, (want, got) in enumerate(zip(shape, t.shape, strict=True)):
            if want is not None and want != got:
                raise KernelArgumentError(
                    f"{name}: dim {dim} should be {want}, got shape {tuple(t.shape)}"
                )
    if unit_last_stride and t.numel() > 0 and t.stride(-1) != 1:
        raise KernelArgumentError(f"{name}: last dimension must be contiguous (stride 1)")
    return t


def check_same_shape(name: str, t: torch.Tensor, like_name: str, like: torch.Tensor) -> None:
    """Check that `t` has the shape and dtype of `like`."""
    if t.shape != like.shape or t.dtype != like.dtype:
        raise KernelArgumentError(
            f"{name} {tuple(t.shape)} {t.dtype} must match {like_name} "
            f"{tuple(like.shape)} {like.dtype}"
        )


def check_device(tensors: Iterable[tuple[str, torch.Tensor]]) -> torch.device:
    """Check that all tensors live on one device and that a kernel can run there.

    CUDA tensors always can; CPU tensors only under `TRITON_INTERPRET=1`.
    """
    items = list(tensors)
    device = items[0][1].device
    for name, t in items[1:]:
        if t.device != device:
            raise KernelArgumentError(
                f"{name} is on {t.device} but {items[0][0]} is on {device}"
            )
    if device.type != "cuda" and not is_interpreted():
        raise KernelArgumentError(
            f"Triton kernels need CUDA tensors (got {device}); set TRITON_INTERPRET=1 to run "
            "them on the CPU interpreter, or use tokenfleet.kernels.reference"
        )
    return device


def is_interpreted() -> bool:
    """True when Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    from triton import knobs  # Triton's own reading of TRITON_INTERPRET

    return bool(knobs.runtime.interpret)
