"""Fused RMSNorm with the optional residual add before it (one program per row)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenfleet.kernels.errors import KernelArgumentError
from tokenfleet.kernels.launch_checks import (
    FLOAT_DTYPES,
    check_device,
    check_same_shape,
    check_tensor,
)

__all__ = ["check_rms_norm_args", "rms_norm"]


@triton.jit
def _rms_norm_kernel(
    out_ptr, new_residual_ptr, x_ptr, residual_ptr, weight_ptr, eps,
    stride_out, stride_new_res, stride_x, stride_res,
    HIDDEN: tl.constexpr, BLOCK: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    ok = offs < HIDDEN
    h = tl.load(x_ptr + row * stride_x + offs, mask=ok, other=0.0)
    if HAS_RESIDUAL:
        # Add in the model dtype, as HF does, and keep that rounded sum as the new residual.
        h = (h.to(tl.float32) + tl.load(residual_ptr + row * stride_res + offs, mask=ok,
                                        other=0.0).to(tl.float32)).to(h.dtype)
        tl.store(new_residual_ptr + row * stride_new_res + offs, h, mask=ok)
    hf = h.to(tl.float32)
    inv_rms = 1.0 / tl.sqrt(tl.sum(hf * hf, axis=0) / HIDDEN + eps)
    normed = (hf * inv_rms).to(h.dtype).to(tl.float32)  # HF rounds before the weight multiply
    w = tl.load(weight_ptr + offs, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * stride_out + offs, (w * normed).to(out_ptr.dtype.element_ty),
             mask=ok)


def check_rms_norm_args(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None,  # [num_tokens, hidden]
    weight_name: str = "weight",
) -> None:
    """Raise KernelArgumentError unless the arguments fit `rms_norm`."""
    check_tensor("x", x, ndim=2, dtypes=FLOAT_DTYPES)
    check_tensor(weight_name, weight, ndim=1, dtypes=FLOAT_DTYPES, shape=(x.shape[1],))
    tensors = [("x", x), (weight_name, weight)]
    if residual is not None:
        check_same_shape("residual", residual, "x", x)
        if residual.stride(-1) != 1:
            raise KernelArgumentError("residual: last dimension must be contiguous (stride 1)")
        tensors.append(("residual", residual))
    check_device(tensors)
    if not eps > 0:
        raise KernelArgumentError(f"eps must be positive, got {eps}")


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    residual: torch.Tensor | None = None,  # [num_tokens, hidden]
) -> tuple[torch.Tensor, torch.Tensor]:  # (out, new_residual), both [num_tokens, hidden]
    """HF Llama RMSNorm fused with the residual add (semantics of `reference.rms_norm_ref`).

    Without `residual`, new_residual is `x` itself; with it, a new tensor x + residual.
    """
    check_rms_norm_args(x, weight, eps, residual)
    num_tokens, hidden = x.shape
    out = torch.empty_like(x)
    new_residual = x if residual is None else torch.empty_like(x)
    if num_tokens == 0:
        return out, new_residual
    block = triton.next_power_of_2(hidden)
    res = x if residual is None else residual  # placeholder pointer when there is none
    _rms_norm_kernel[(num_tokens,)](
        out, new_residual, x, res, weight, eps,
        out.stride(0), new_residual.stride(0), x.stride(0), res.stride(0),
        HIDDEN=hidden, BLOCK=block, HAS_RESIDUAL=residual is not None,
        num_warps=min(max(block // 512, 1), 16),
    )
    return out, new_residual
