"""Rotary position embedding (HF Llama "rotate_half" layout), incl. llama3 and linear scaling.

The cos/sin table comes from `tokenfleet.kernels.rope_cache` (one definition of the
frequencies, checked against transformers there). On CUDA the fused Triton kernel rotates q
and k in place; elsewhere plain torch ops do, in the activation dtype as transformers does.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from tokenfleet.engine.errors import UnsupportedModelError
from tokenfleet.engine.layers.cpu_fused import CpuFusedOps
from tokenfleet.kernels.errors import KernelArgumentError
from tokenfleet.kernels.rope_cache import build_cos_sin_cache

__all__ = ["RopeTable", "RotaryEmbedding"]


class RotaryEmbedding(nn.Module):
    """Applies RoPE to q and k given absolute positions, from a precomputed cos/sin cache."""

    cos_sin: torch.Tensor  # [max_positions, head_dim]: cos in the first half, sin in the second

    def __init__(self, head_dim: int, max_positions: int, base: float,
                 scaling: dict[str, Any] | None):
        super().__init__()
        try:
            # On the device the model is being built on (the loader's `torch.device` context).
            cache = build_cos_sin_cache(head_dim, max_positions, base, scaling,
                                        device=torch.get_default_device())
        except KeyError as e:
            raise UnsupportedModelError(f"rope_scaling lacks {e}") from None
        except KernelArgumentError as e:
            raise UnsupportedModelError(str(e)) from None
        self.register_buffer("cos_sin", cache, persistent=False)
        # Fused Triton kernel: None = on CUDA tensors only (True: tests under the interpreter).
        self.use_kernel: bool | None = None
        self.cpu_fused: CpuFusedOps | None = None  # set by the runner with cpu_compile

    def lookup(self, positions: torch.Tensor, dtype: torch.dtype) -> RopeTable:
        """The step's cos/sin rows, gathered once and shared by every layer."""
        if positions.is_cuda if self.use_kernel is None else self.use_kernel:
            return RopeTable(positions, self.cos_sin, None, None)
        cos, sin = self.cos_sin[positions].unsqueeze(1).chunk(2, dim=-1)  # [T, 1, head_dim/2]
        # Cast like transformers does (cos/sin in the activation dtype), then full width.
        cos = torch.cat((cos, cos), dim=-1).to(dtype)  # [T, 1, head_dim]
        sin = torch.cat((sin, sin), dim=-1).to(dtype)
        fused = None if torch.compiler.is_compiling() else self.cpu_fused
        return RopeTable(positions, self.cos_sin, cos, sin,
                         fused.rotate_qk if fused is not None else None)


class RopeTable(NamedTuple):
    positions: torch.Tensor  # [T]
    cos_sin: torch.Tensor  # [max_positions, head_dim]
    cos: torch.Tensor | None  # [T, 1, head_dim] (CPU path)
    sin: torch.Tensor | None
    # The compiled rotation (cpu_fused.py), outside a dynamo trace only.
    rotate_qk: Callable[..., tuple[torch.Tensor, torch.Tensor]] | None = None

    @property
    def in_kernel(self) -> bool:
        """Rotation by the Triton kernel (CUDA): no cos/sin rows gathered."""
        return self.cos is None

    def apply(self, q: torch.Tensor, k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # q [T, num_heads, head_dim]; k [T, num_kv_heads, head_dim]
        if self.cos is None or self.sin is None:
            from tokenfleet.kernels.rotary import rotary

            rotary(q, k, self.positions, self.cos_sin)  # fused Triton kernel, in place
            return q, k
        if self.rotate_qk is not None:
            return self.rotate_qk(q, k, self.cos, self.sin)
        if torch.compiler.is_compiling():  # the compiler fuses both passes itself
            return _rotate(q, self.cos, self.sin), _rotate(k, self.cos, self.sin)
        if q.data_ptr() + q.shape[1] * q.shape[2] * q.element_size() == k.data_ptr() \
                and q.stride() == k.stride():
            # q and k are adjacent slices of one fused qkv row: rotate both in one pass.
            T, H, D = q.shape
            qk = q.as_strided((T, H + k.shape[1], D), q.stride())
            q_rot, k_rot = _rotate(qk, self.cos, self.sin).split([H, k.shape[1]], dim=1)
            return q_rot, k_rot
        return _rotate(q, self.cos, self.sin), _rotate(k, self.cos, self.sin)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin
