"""Launcher of the paged-attention kernels: checks arguments, picks tile sizes, launches.

`paged_attention` serves a whole mixed batch in one launch (prefill chunks attending causally
to their cached context, and decodes). For decode-only batches that give the GPU too few
programs (small batch, long contexts) it splits each sequence's keys into parts processed in
parallel and merges them in a second small kernel (flash-decoding).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch
import triton

from tokenfleet.kernels.errors import KernelArgumentError
from tokenfleet.kernels.launch_checks import (
    FLOAT_DTYPES,
    check_device,
    check_same_shape,
    check_tensor,
    is_interpreted,
)
from tokenfleet.kernels.paged_attention_kernels import (
    paged_attention_kernel,
    reduce_splits_kernel,
)

__all__ = [
    "MAX_KV_SPLITS",
    "AttentionTiles",
    "choose_num_kv_splits",
    "choose_tiles",
    "paged_attention",
]

MAX_KV_SPLITS = 16
_LOG2_E = 1.4426950408889634


def paged_attention(
    q: torch.Tensor,  # [num_tokens, num_heads, head_dim]
    k_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    v_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_dim]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks] int32
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32
    scale: float,
    sliding_window: int | None = None,
    *,
    max_query_len: int | None = None,
    max_seq_len: int | None = None,
    num_kv_splits: int | None = None,
    out: torch.Tensor | None = None,  # [num_tokens, num_heads, head_dim]
    block_m: int | None = None,
    block_n: int | None = None,
) -> torch.Tensor:  # [num_tokens, num_heads, head_dim]
    """Attention of each sequence's new query rows over its paged KV cache.

    Semantics are those of `reference.paged_attention_ref`. `max_query_len` and `max_seq_len`
    are host-side hints (from AttentionMetadata) used only to pick tile sizes and the split
    count; missing ones fall back to bounds known from shapes, so the launcher never syncs
    with the device. `num_kv_splits` forces the flash-decoding split count (1 = off; keep it
    fixed when capturing CUDA graphs). `block_m` / `block_n` override the tile sizes (tests,
    tuning). Raises KernelArgumentError on malformed arguments.
    """
    _check_args(q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
                sliding_window)
    num_tokens, num_heads, head_dim = q.shape
    num_seqs = block_tables.shape[0]
    page_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    if out is None:
        out = torch.empty_like(q)
    else:
        check_tensor("out", out, ndim=3, dtypes=[q.dtype], shape=q.shape)
    if num_tokens == 0 or num_seqs == 0:
        return out
    max_query_len = num_tokens if max_query_len is None else max_query_len
    max_seq_len = block_tables.shape[1] * page_size if max_seq_len is None else max_seq_len

    tiles = choose_tiles(num_heads // num_kv_heads, head_dim, max_query_len, block_m, block_n)
    _check_tile(tiles.block_m, tiles.block_n, q.device)
    if num_kv_splits is None:
        num_kv_splits = (
            choose_num_kv_splits(num_seqs, num_kv_heads, max_seq_len, tiles.block_n, q.device)
            if max_query_len == 1
            else 1
        )
    if not 1 <= num_kv_splits <= MAX_KV_SPLITS:
        raise KernelArgumentError(f"num_kv_splits must be in [1, {MAX_KV_SPLITS}]")

    _launch(out, q, k_cache, v_cache, block_tables, query_start_loc, seq_lens, scale,
            sliding_window, tiles, num_kv_splits)
    return out


@dataclass(frozen=True, slots=True)
class AttentionTiles:
    """Tile shape and launch parameters of one paged-attention launch."""

    group_padded: int  # query heads per KV head, rounded up to a power of two
    block_q: int  # query tokens per program
    block_m: int  # rows of the score tile = block_q * group_padded
    block_n: int  # keys per inner-loop tile
    num_warps: int
    num_stages: int


def choose_tiles(
    group: int,
    head_dim: int,
    max_query_len: int,
    block_m: int | None = None,
    block_n: int | None = None,
) -> AttentionTiles:
    """Pick tiles for a launch (defaults tuned for Hopper; overrides for tests and tuning).

    Decode steps (max_query_len 1) get the smallest tensor-core tile (16 rows: one token of
    each sequence times its GQA group, padded); prefill chunks up to 128 rows, where wgmma runs
    on 64-row warpgroup tiles. 64 keys per tile keep K and V tiles at 16 KB each in bf16 for
    head_dim 128, so three pipeline stages fit in shared memory.
    """
    group_padded = triton.next_power_of_2(group)
    if block_m is None:
        block_q_wanted = min(triton.next_power_of_2(max(max_query_len, 1)), 128 // group_padded)
        block_m = max(16, group_padded * max(block_q_wanted, 1))
    block_m = max(block_m, group_padded)
    if block_n is None:
        block_n = 64 if head_dim <= 128 else 32
    return AttentionTiles(
        group_padded=group_padded,
        block_q=block_m // group_padded,
        block_m=block_m,
        block_n=block_n,
        num_warps=8 if block_m >= 128 else 4,
        num_stages=2 if block_m >= 128 else 3,
    )


def choose_num_kv_splits(
    num_seqs: int, num_kv_heads: int, max_seq_len: int, block_n: int, device: torch.device
) -> int:
    """Flash-decoding split count: enough programs to fill the GPU about twice over.

    Each split keeps at least two key tiles (shorter ones cost more in the merge than they
    save), and batches that already fill the GPU are not split.
    """
    target_programs = 2 * _num_sms(device)
    base_programs = num_seqs * num_kv_heads
    if base_programs >= target_programs:
        return 1
    num_tiles = math.ceil(max_seq_len / block_n)
    splits = min(math.ceil(target_programs / base_programs), num_tiles // 2, MAX_KV_SPLITS)
    return max(splits, 1)


def _launch(
    out: torch.Tensor,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
    tiles: AttentionTiles,
    num_kv_splits: int,
) -> None:
    num_tokens, num_heads, head_dim = q.shape
    head_dim_padded = triton.next_power_of_2(head_dim)
    num_seqs, num_kv_heads = block_tables.shape[0], k_cache.shape[2]
    num_q_blocks = num_tokens // tiles.block_q + num_seqs
    if num_kv_splits > 1:
        part_out = torch.empty(
            (num_tokens, num_heads, num_kv_splits, head_dim_padded),
            dtype=torch.float32, device=q.device,
        )
        part_max = torch.empty(part_out.shape[:3], dtype=torch.float32, device=q.device)
        part_sum = torch.empty_like(part_max)
    else:
        part_out = part_max = part_sum = out  # unused by the kernel
    interpreted = q.device.type != "cuda"
    paged_attention_kernel[(num_q_blocks, num_kv_heads, num_kv_splits)](
        out, part_out, part_max, part_sum,
        q, k_cache, v_cache, block_tables, query_start_loc, seq_lens,
        scale * _LOG2_E, num_seqs, sliding_window or 0,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2),
        block_tables.stride(0),
        NUM_QUERIES_PER_KV=num_heads // num_kv_heads, GROUP_PADDED=tiles.group_padded,
        HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded, PAGE_SIZE=k_cache.shape[1],
        BLOCK_Q=tiles.block_q, BLOCK_M=tiles.block_m, BLOCK_N=tiles.block_n,
        NUM_SPLITS=num_kv_splits, USE_WINDOW=sliding_window is not None,
        UPCAST=interpreted,
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        num_warps=tiles.num_warps, num_stages=tiles.num_stages,
    )
    if num_kv_splits > 1:
        reduce_splits_kernel[(num_tokens, num_heads)](
            out, part_out, part_max, part_sum, out.stride(0), out.stride(1),
            NUM_HEADS=num_heads, HEAD_DIM=head_dim, HEAD_DIM_PADDED=head_dim_padded,
            NUM_SPLITS=num_kv_splits, SPLITS_PADDED=triton.next_power_of_2(num_kv_splits),
            num_warps=4 if head_dim_padded >= 128 else 2,
        )


@functools.cache
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).multi_processor_count)
    return 4 if is_interpreted() else 1


def _check_tile(block_m: int, block_n: int, device: torch.device) -> None:
    # Tensor-core products need tiles of at least 16 on the GPU; the interpreter takes any.
    min_size = 16 if device.type == "cuda" else 1
    for name, size in (("block_m", block_m), ("block_n", block_n)):
        if size < min_size or size & (size - 1):
            raise KernelArgumentError(
                f"{name} must be a power of two >= {min_size}, got {size}"
            )


def _check_args(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_start_loc: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    sliding_window: int | None,
) -> None:
    check_tensor("q", q, ndim=3, dtypes=FLOAT_DTYPES)
    head_dim = q.shape[2]
    check_tensor("k_cache", k_cache, ndim=4, dtypes=[q.dtype], shape=(None, None, None, head_dim))
    check_same_shape("v_cache", v_cache, "k_cache", k_cache)
    if v_cache.stride(-1) != 1:
        raise KernelArgumentError("v_cache: last dimension must be contiguous (stride 1)")
    num_heads, num_kv_heads = q.shape[1], k_cache.shape[2]
    if num_kv_heads == 0 or num_heads % num_kv_heads:
        raise KernelArgumentError(
            f"num_heads {num_heads} must be a multiple of num_kv_heads {num_kv_heads}"
        )
    check_tensor("block_tables", block_tables, ndim=2, dtypes=[torch.int32])
    num_seqs = block_tables.shape[0]
    check_tensor("query_start_loc", query_start_loc, ndim=1, dtypes=[torch.int32],
                 shape=(num_seqs + 1,))
    check_tensor("seq_lens", seq_lens, ndim=1, dtypes=[torch.int32], shape=(num_seqs,))
    check_device([("q", q), ("k_cache", k_cache), ("v_cache", v_cache),
                  ("block_tables", block_tables), ("query_start_loc", query_start_loc),
                  ("seq_lens", seq_lens)])
    if not (math.isfinite(scale) and scale > 0):
        raise KernelArgumentError(f"scale must be a positive finite number, got {scale}")
    if sliding_window is not None and (not isinstance(sliding_window, int) or sliding_window < 1):
        raise KernelArgumentError(
            f"sliding_window must be None or an int >= 1, got {sliding_window}"
        )
