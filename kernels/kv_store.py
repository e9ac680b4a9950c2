"""Write this step's new K/V rows into the paged cache (one program per token)."""

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

__all__ = ["check_store_kv_args", "store_kv"]


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr,
    stride_k_tok, stride_k_head, stride_v_tok, stride_v_head,
    stride_kc_block, stride_kc_row, stride_kc_head,
    stride_vc_block, stride_vc_row, stride_vc_head,
    NUM_KV_HEADS: tl.constexpr, HEADS_PADDED: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, PAGE_SIZE: tl.constexpr,
):
    tok = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + tok)
    if slot < 0:  # padding token or a position whose KV is already cached
        return
    page = slot // PAGE_SIZE
    row = slot % PAGE_SIZE
    offs_h = tl.arange(0, HEADS_PADDED)
    offs_d = tl.arange(0, HEAD_DIM_PADDED)
    ok = (offs_h[:, None] < NUM_KV_HEADS) & (offs_d[None, :] < HEAD_DIM)
    src_k = k_ptr + tok * stride_k_tok + offs_h[:, None] * stride_k_head + offs_d[None, :]
    src_v = v_ptr + tok * stride_v_tok + offs_h[:, None] * stride_v_head + offs_d[None, :]
    dst_k = (k_cache_ptr + page * stride_kc_block + row * stride_kc_row
             + offs_h[:, None] * stride_kc_head + offs_d[None, :])
    dst_v = (v_cache_ptr + page * stride_vc_block + row * stride_vc_row
             + offs_h[:, None] * stride_vc_head + offs_d[None, :])
    tl.store(dst_k, tl.load(src_k, mask=ok), mask=ok)
    tl.store(dst_v, tl.load(src_v, mask=ok), mask=ok)


def check_store_kv_args(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64
) -> None:
    """Raise KernelArgumentError unless the arguments fit `store_kv`."""
    check_tensor("k_cache", k_cache, ndim=4, dtypes=FLOAT_DTYPES)
    check_same_shape("v_cache", v_cache, "k_cache", k_cache)
    num_kv_heads, head_dim = k_cache.shape[2:]
    check_tensor("k", k, ndim=3, dtypes=[k_cache.dtype], shape=(None, num_kv_heads, head_dim))
    check_same_shape("v", v, "k", k)
    if v.stride(-1) != 1 or v_cache.stride(-1) != 1:
        raise KernelArgumentError("v and v_cache: last dimension must be contiguous (stride 1)")
    check_tensor("slot_mapping", slot_mapping, ndim=1, dtypes=[torch.int64],
                 shape=(k.shape[0],))
    check_device([("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache),
                  ("slot_mapping", slot_mapping)])


def store_kv(
    k: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    v: torch.Tensor,  # [num_tokens, num_kv_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    slot_mapping: torch.Tensor,  # [num_tokens] int64, -1 = skip
) -> None:
    """Copy token t's K/V into flat slot `slot_mapping[t]` (block * block_size + row), in place.

    Semantics of `reference.store_kv_ref`; K/V must already have the cache's dtype. Slots are
    not range-checked on the device (that would need a sync): the engine owns them.
    """
    check_store_kv_args(k, v, k_cache, v_cache, slot_mapping)
    num_tokens, num_kv_heads, head_dim = k.shape
    page_size = k_cache.shape[1]
    if num_tokens == 0:
        return
    heads_padded = triton.next_power_of_2(num_kv_heads)
    head_dim_padded = triton.next_power_of_2(head_dim)
    _store_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        NUM_KV_HEADS=num_kv_heads, HEADS_PADDED=heads_padded,
        HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded, PAGE_SIZE=page_size,
        num_warps=4 if heads_padded * head_dim_padded >= 1024 else 1,
    )
