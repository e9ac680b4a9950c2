"""Rotary embedding of q and k fused with writing K/V into the paged cache (one launch).

A decode step runs rotary and the KV store once per layer, each a tiny kernel whose cost is
mostly its launch and the gap it leaves in the GPU's queue: at batch 1 on the 8B model that is
64 of the step's ~380 kernels. This kernel does both per token: q rotates in place (attention
reads it next), k is rotated on its way into the cache (nothing reads the un-cached k again on
the Triton path), v is copied. Semantics: `reference.rotary_store_kv_ref`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from tokenfleet.kernels.kv_store import check_store_kv_args
from tokenfleet.kernels.rotary import check_rotary_args, rotate_heads, token_cos_sin

__all__ = ["rotary_store_kv"]


@triton.jit
def _copy_heads(src_ptr, src_stride_head, dst_ptr, dst_stride_head, first_dim,
                NUM_HEADS: tl.constexpr, HEADS_PADDED: tl.constexpr,
                HEAD_DIM: tl.constexpr, DIMS_PADDED: tl.constexpr):
    # Dims [first_dim, HEAD_DIM) of every head, unchanged.
    offs_h = tl.arange(0, HEADS_PADDED)
    offs_d = first_dim + tl.arange(0, DIMS_PADDED)
    ok = (offs_h[:, None] < NUM_HEADS) & (offs_d[None, :] < HEAD_DIM)
    x = tl.load(src_ptr + offs_h[:, None] * src_stride_head + offs_d[None, :], mask=ok)
    tl.store(dst_ptr + offs_h[:, None] * dst_stride_head + offs_d[None, :], x, mask=ok)


@triton.jit
def _rotary_store_kv_kernel(
    q_ptr, k_ptr, v_ptr, positions_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_q_tok, stride_q_head, stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_cs_pos,
    stride_kc_block, stride_kc_row, stride_kc_head,
    stride_vc_block, stride_vc_row, stride_vc_head,
    NUM_HEADS: tl.constexpr, HEADS_PADDED: tl.constexpr,
    NUM_KV_HEADS: tl.constexpr, KV_HEADS_PADDED: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
    HALF: tl.constexpr, HALF_PADDED: tl.constexpr, TAIL_PADDED: tl.constexpr,
    PAGE_SIZE: tl.constexpr,
):
    tok = tl.program_id(0).to(tl.int64)
    cos, sin = token_cos_sin(positions_ptr, cos_sin_ptr, tok, stride_cs_pos, HALF, HALF_PADDED)
    q_row = q_ptr + tok * stride_q_tok
    rotate_heads(q_row, stride_q_head, q_row, stride_q_head, cos, sin,
                 NUM_HEADS, HEADS_PADDED, HALF, HALF_PADDED)

    slot = tl.load(slot_mapping_ptr + tok)
    if slot >= 0:  # else a padding token or a position whose KV is already cached
        page = slot // PAGE_SIZE
        row = slot % PAGE_SIZE
        k_row = k_ptr + tok * stride_k_tok
        k_dst = k_cache_ptr + page * stride_kc_block + row * stride_kc_row
        rotate_heads(k_row, stride_k_head, k_dst, stride_kc_head, cos, sin,
                     NUM_KV_HEADS, KV_HEADS_PADDED, HALF, HALF_PADDED)
        if 2 * HALF < HEAD_DIM:  # partial rotary: the other dims go in as they are
            _copy_heads(k_row, stride_k_head, k_dst, stride_kc_head, 2 * HALF,
                        NUM_KV_HEADS, KV_HEADS_PADDED, HEAD_DIM, TAIL_PADDED)
        v_dst = v_cache_ptr + page * stride_vc_block + row * stride_vc_row
        _copy_heads(v_ptr + tok * stride_v_tok, stride_v_head, v_dst, stride_vc_head, 0,
                    NUM_KV_HEADS, KV_HEADS_PADDED, HEAD_DIM, HEAD_DIM_PADDED)


def rotary_store_kv(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    positions: torch.Tensor,  # [num_tokens] int64
    cos_sin_cache: torch.Tensor,  # [max_pos, rotary_dim] float32: cos | sin halves
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip
) -> None:
    """Rotate q in place; write rotated k and v into flat slot `slot_mapping[t]` of the caches.

    Equals `rotary` followed by `store_kv`, except that k itself is left unrotated. Raises
    KernelArgumentError on malformed arguments (the checks of both kernels).
    """
    rotary_dim = check_rotary_args(q, k, positions, cos_sin_cache)
    check_store_kv_args(k, v, k_cache, v_cache, slot_mapping)
    num_tokens, num_heads, head_dim = q.shape
    if num_tokens == 0:
        return
    num_kv_heads = k.shape[1]
    half = rotary_dim // 2
    _rotary_store_kv_kernel[(num_tokens,)](
        q, k, v, positions, cos_sin_cache, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos_sin_cache.stride(0),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_HEADS=num_heads, HEADS_PADDED=triton.next_power_of_2(num_heads),
        NUM_KV_HEADS=num_kv_heads, KV_HEADS_PADDED=triton.next_power_of_2(num_kv_heads),
        HEAD_DIM=head_dim, HEAD_DIM_PADDED=triton.next_power_of_2(head_dim),
        HALF=half, HALF_PADDED=triton.next_power_of_2(half),
        TAIL_PADDED=triton.next_power_of_2(max(head_dim - rotary_dim, 1)),
        PAGE_SIZE=k_cache.shape[1],
        num_warps=4,
    )
