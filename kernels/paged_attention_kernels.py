"""Triton kernels of paged attention (launched by `paged_attention.py`).

One program handles BLOCK_Q query tokens of one sequence times all NUM_QUERIES_PER_KV query
heads that share one KV head (GQA grouping: each K/V tile is loaded once for the whole group and
fed to one BLOCK_M x BLOCK_N tensor-core product, BLOCK_M = BLOCK_Q * GROUP_PADDED rows). It
walks the keys this block may see in BLOCK_N tiles, looks each key's page up in the block
table, and keeps an online softmax (running row max and sum, base-2 exponentials, float32
accumulator). With NUM_SPLITS > 1 (flash-decoding) the key range is cut into NUM_SPLITS parts,
one per program along grid axis 2, each writing an unnormalised partial result plus its row max
and sum; `_reduce_splits_kernel` merges them.

Program id 0 -> (sequence, query block) without a host-side table: sequence i owns global
query blocks starting at `query_start_loc[i] // BLOCK_Q + i` (a monotone function of i), so a
binary search over query_start_loc finds it; surplus programs exit at once. The grid is
`num_tokens // BLOCK_Q + num_seqs`, known on the host without a device sync.
"""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["paged_attention_kernel", "reduce_splits_kernel"]


@triton.jit
def _find_seq(query_start_loc_ptr, q_block_global, num_seqs, BLOCK_Q: tl.constexpr):
    # Largest i with query_start_loc[i] // BLOCK_Q + i <= q_block_global.
    lo = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_block = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_block <= q_block_global:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _tile_range(first_q_pos, kv_end, sliding_window, split,
                USE_WINDOW: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr):
    # Key tiles a query block can see: up to its last query (kv_end), from its first query's
    # window start; then this program's share of them when the range is split.
    kv_start = 0
    if USE_WINDOW:
        kv_start = tl.maximum(first_q_pos - sliding_window + 1, 0)
    tile_lo = kv_start // BLOCK_N
    tile_hi = tl.cdiv(kv_end, BLOCK_N)
    if NUM_SPLITS > 1:
        tiles_per_split = tl.cdiv(tile_hi - tile_lo, NUM_SPLITS)
        tile_lo = tile_lo + split * tiles_per_split
        tile_hi = tl.minimum(tile_lo + tiles_per_split, tile_hi)
    return tile_lo, tile_hi


@triton.jit
def _attend_tile(
    q, q_pos, acc, m_i, l_i, tile, kv_end, bt_row, k_base, v_base,
    stride_k_block, stride_k_row, stride_v_block, stride_v_row,
    offs_d, d_ok, scale_log2, sliding_window,
    PAGE_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, USE_WINDOW: tl.constexpr,
    UPCAST: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # One BLOCK_N tile of keys folded into the running (acc, row max, row sum).
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)  # [BLOCK_N] key positions
    n_ok = offs_n < kv_end
    page = tl.load(bt_row + offs_n // PAGE_SIZE, mask=n_ok, other=0).to(tl.int64)
    page_row = offs_n % PAGE_SIZE
    k = tl.load(
        k_base + page[None, :] * stride_k_block + page_row[None, :] * stride_k_row
        + offs_d[:, None],
        mask=d_ok[:, None] & n_ok[None, :], other=0.0,
    )  # [HEAD_DIM_PADDED, BLOCK_N]
    v = tl.load(
        v_base + page[:, None] * stride_v_block + page_row[:, None] * stride_v_row
        + offs_d[None, :],
        mask=n_ok[:, None] & d_ok[None, :], other=0.0,
    )  # [BLOCK_N, HEAD_DIM_PADDED]
    if UPCAST:
        k = k.to(tl.float32)
        v = v.to(tl.float32)
    s = tl.dot(q, k, input_precision=DOT_PRECISION) * scale_log2  # [BLOCK_M, BLOCK_N]
    visible = (offs_n[None, :] <= q_pos[:, None]) & n_ok[None, :]
    if USE_WINDOW:
        visible = visible & ((q_pos[:, None] - offs_n[None, :]) < sliding_window)
    s = tl.where(visible, s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    # A row with nothing visible yet keeps max -inf; subtract 0 then so exp2 gives 0s
    # instead of NaN from (-inf) - (-inf).
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.math.exp2(s - m_ref[:, None])
    alpha = tl.math.exp2(m_i - m_ref)
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, m_new, l_i


# num_seqs and sliding_window vary per step: no recompile when one of them happens to be 1.
@triton.jit(do_not_specialize=["num_seqs", "sliding_window"])
def paged_attention_kernel(
    out_ptr, part_out_ptr, part_max_ptr, part_sum_ptr,
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, query_start_loc_ptr, seq_lens_ptr,
    scale_log2, num_seqs, sliding_window,
    stride_q_tok, stride_q_head, stride_o_tok, stride_o_head,
    stride_k_block, stride_k_row, stride_k_head,
    stride_v_block, stride_v_row, stride_v_head,
    stride_bt_seq,
    NUM_QUERIES_PER_KV: tl.constexpr, GROUP_PADDED: tl.constexpr,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr, PAGE_SIZE: tl.constexpr,
    BLOCK_Q: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr, USE_WINDOW: tl.constexpr, UPCAST: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    q_block_global = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    seq = _find_seq(query_start_loc_ptr, q_block_global, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    q_block = q_block_global - (q_start // BLOCK_Q + seq)
    if q_block * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len

    # Row m of the tile = query token m // GROUP_PADDED, head m % GROUP_PADDED of the group.
    offs_m = tl.arange(0, BLOCK_M)
    q_idx = q_block * BLOCK_Q + offs_m // GROUP_PADDED  # [BLOCK_M] row within the sequence
    head_in_group = offs_m % GROUP_PADDED
    head = kv_head * NUM_QUERIES_PER_KV + head_in_group  # [BLOCK_M]
    row_ok = (q_idx < q_len) & (head_in_group < NUM_QUERIES_PER_KV)
    q_pos = context_len + q_idx  # [BLOCK_M] absolute position
    offs_d = tl.arange(0, HEAD_DIM_PADDED)
    d_ok = offs_d < HEAD_DIM
    tok = q_start + q_idx
    q = tl.load(
        q_ptr + tok[:, None] * stride_q_tok + head[:, None] * stride_q_head + offs_d[None, :],
        mask=row_ok[:, None] & d_ok[None, :], other=0.0,
    )  # [BLOCK_M, HEAD_DIM_PADDED]
    if UPCAST:
        q = q.to(tl.float32)

    kv_end = context_len + tl.minimum(q_block * BLOCK_Q + BLOCK_Q, q_len)
    tile_lo, tile_hi = _tile_range(context_len + q_block * BLOCK_Q, kv_end, sliding_window,
                                   split, USE_WINDOW, BLOCK_N, NUM_SPLITS)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PADDED], tl.float32)
    bt_row = block_tables_ptr + seq * stride_bt_seq
    k_base = k_cache_ptr + kv_head * stride_k_head
    v_base = v_cache_ptr + kv_head * stride_v_head
    for tile in range(tile_lo, tile_hi):
        acc, m_i, l_i = _attend_tile(
            q, q_pos, acc, m_i, l_i, tile, kv_end, bt_row, k_base, v_base,
            stride_k_block, stride_k_row, stride_v_block, stride_v_row,
            offs_d, d_ok, scale_log2, sliding_window,
            PAGE_SIZE, BLOCK_N, USE_WINDOW, UPCAST, DOT_PRECISION,
        )

    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(
            out_ptr + tok[:, None] * stride_o_tok + head[:, None] * stride_o_head
            + offs_d[None, :],
            out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :],
        )
    else:
        # Partials: [num_tokens, num_heads, NUM_SPLITS(, HEAD_DIM_PADDED)], contiguous.
        part_row = (tok * (tl.num_programs(1) * NUM_QUERIES_PER_KV) + head) * NUM_SPLITS + split
        tl.store(part_max_ptr + part_row, m_i, mask=row_ok)
        tl.store(part_sum_ptr + part_row, l_i, mask=row_ok)
        tl.store(
            part_out_ptr + part_row[:, None] * HEAD_DIM_PADDED + offs_d[None, :],
            acc, mask=row_ok[:, None],
        )


@triton.jit
def reduce_splits_kernel(
    out_ptr, part_out_ptr, part_max_ptr, part_sum_ptr,
    stride_o_tok, stride_o_head,
    NUM_HEADS: tl.constexpr, HEAD_DIM: tl.constexpr, HEAD_DIM_PADDED: tl.constexpr,
    NUM_SPLITS: tl.constexpr, SPLITS_PADDED: tl.constexpr,
):
    # One program per (token, head): out = sum_s w_s acc_s / sum_s w_s l_s, w_s = 2^(m_s - M).
    tok = tl.program_id(0)
    head = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PADDED)
    s_ok = offs_s < NUM_SPLITS
    offs_d = tl.arange(0, HEAD_DIM_PADDED)
    row = (tok * NUM_HEADS + head) * NUM_SPLITS + offs_s  # [SPLITS_PADDED]
    m = tl.load(part_max_ptr + row, mask=s_ok, other=float("-inf"))
    l_s = tl.load(part_sum_ptr + row, mask=s_ok, other=0.0)
    acc = tl.load(
        part_out_ptr + row[:, None] * HEAD_DIM_PADDED + offs_d[None, :],
        mask=s_ok[:, None], other=0.0,
    )  # [SPLITS_PADDED, HEAD_DIM_PADDED]
    m_max = tl.max(m, axis=0)
    m_ref = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.math.exp2(m - m_ref)  # splits that saw no key have m = -inf: weight 0
    total = tl.sum(w * l_s, axis=0)
    out = tl.sum(acc * w[:, None], axis=0) / tl.where(total == 0.0, 1.0, total)
    tl.store(
        out_ptr + tok * stride_o_tok + head * stride_o_head + offs_d,
        out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_DIM,
    )
