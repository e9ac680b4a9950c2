"""In-place rotary position embedding of q and k (NeoX / HF-Llama `rotate_half` layout)."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenfleet.kernels.errors import KernelArgumentError
from tokenfleet.kernels.launch_checks import FLOAT_DTYPES, check_device, check_tensor

__all__ = ["check_rotary_args", "rotary", "rotate_heads", "token_cos_sin"]


@triton.jit
def rotate_heads(src_ptr, src_stride_head, dst_ptr, dst_stride_head, cos, sin,
                 NUM_HEADS: tl.constexpr, HEADS_PADDED: tl.constexpr,
                 HALF: tl.constexpr, HALF_PADDED: tl.constexpr):
    # Pairs (i, i + HALF) of every head rotate by the token's angle i (float32 math). dst may
    # be src (in place): each thread loads both halves of its pairs before storing them.
    offs_h = tl.arange(0, HEADS_PADDED)
    offs_d = tl.arange(0, HALF_PADDED)
    ok = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HALF)
    src = src_ptr + offs_h[:, None] * src_stride_head + offs_d[None, :]
    dst = dst_ptr + offs_h[:, None] * dst_stride_head + offs_d[None, :]
    x1 = tl.load(src, mask=ok, other=0.0)
    x2 = tl.load(src + HALF, mask=ok, other=0.0)
    x1f = x1.to(tl.float32)
    x2f = x2.to(tl.float32)
    out_ty = dst_ptr.dtype.element_ty
    tl.store(dst, (x1f * cos[None, :] - x2f * sin[None, :]).to(out_ty), mask=ok)
    tl.store(dst + HALF, (x2f * cos[None, :] + x1f * sin[None, :]).to(out_ty), mask=ok)


@triton.jit
def token_cos_sin(positions_ptr, cos_sin_ptr, tok, stride_cs_pos,
                  HALF: tl.constexpr, HALF_PADDED: tl.constexpr):
    # Token tok's angles: cos and sin [HALF_PADDED] in float32 (0 past HALF).
    pos = tl.load(positions_ptr + tok)
    offs_d = tl.arange(0, HALF_PADDED)
    cs = cos_sin_ptr + pos * stride_cs_pos + offs_d
    cos = tl.load(cs, mask=offs_d < HALF, other=0.0).to(tl.float32)
    sin = tl.load(cs + HALF, mask=offs_d < HALF, other=0.0).to(tl.float32)
    return cos, sin


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, positions_ptr, cos_sin_ptr,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_cs_pos,
    NUM_HEADS: tl.constexpr, HEADS_PADDED: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr, KV_HEADS_PADDED: tl.constexpr,
    HALF: tl.constexpr, HALF_PADDED: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    cos, sin = token_cos_sin(positions_ptr, cos_sin_ptr, tok, stride_cs_pos, HALF, HALF_PADDED)
    q_row = q_ptr + tok * stride_q_tok
    k_row = k_ptr + tok * stride_k_tok
    rotate_heads(q_row, stride_q_head, q_row, stride_q_head, cos, sin,
                 NUM_HEADS, HEADS_PADDED, HALF, HALF_PADDED)
    rotate_heads(k_row, stride_k_head, k_row, stride_k_head, cos, sin,
                 NUM_KV_HEADS, KV_HEADS_PADDED, HALF, HALF_PADDED)


def check_rotary_args(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [num_tokens] int64
    cos_sin_cache: torch.Tensor,  # [max_pos, rotary_dim] float32
) -> int:
    """Raise KernelArgumentError unless the arguments fit `rotary`; returns rotary_dim."""
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    num_tokens, _, head_dim = q.shape
    check_tensor("k", k, ndim=3, dtypes=[q.dtype], shape=(num_tokens, None, head_dim))
    check_tensor("positions", positions, ndim=1, dtypes=[torch.int64], shape=(num_tokens,))
    check_tensor("cos_sin_cache", cos_sin_cache, ndim=2, dtypes=[torch.float32])
    rotary_dim = cos_sin_cache.shape[1]
    if rotary_dim % 2 or not 0 < rotary_dim <= head_dim:
        raise KernelArgumentError(
            f"cos_sin_cache: rotary_dim {rotary_dim} must be even and in (0, head_dim={head_dim}]"
        )
    check_device([("q", q), ("k", k), ("positions", positions), ("cos_sin_cache", cos_sin_cache)])
    return int(rotary_dim)


def rotary(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [num_tokens] int64
    cos_sin_cache: torch.Tensor,  # [max_pos, rotary_dim] float32: cos | sin halves
) -> None:
    """Rotate q and k in place (semantics of `reference.rotary_ref`).

    rotary_dim = cos_sin_cache.shape[1] may be smaller than head_dim (partial rotary: the rest
    is left alone). Positions are not range-checked on the device (that would need a sync).
    """
    rotary_dim = check_rotary_args(q, k, positions, cos_sin_cache)
    num_tokens, num_heads = q.shape[:2]
    if num_tokens == 0:
        return
    num_kv_heads = k.shape[1]
    half = rotary_dim // 2
    _rotary_kernel[(num_tokens,)](
        q, k, positions, cos_sin_cache,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin_cache.stride(0),
        NUM_HEADS=num_heads, HEADS_PADDED=triton.next_power_of_2(num_heads),
        NUM_KV_HEADS=num_kv_heads, KV_HEADS_PADDED=triton.next_power_of_2(num_kv_heads),
        HALF=half, HALF_PADDED=triton.next_power_of_2(half),
        num_warps=4,
    )
