"""paged_attention (Triton) vs paged_attention_ref on random paged batches."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from tokenfleet.kernels.paged_attention import paged_attention
from tokenfleet.kernels.paged_batch import PagedBatch, make_paged_batch
from tokenfleet.kernels.reference import paged_attention_ref, store_kv_ref
from tokenfleet.kernels.selfcheck import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Tiles below 16 exercise more tile boundaries in the interpreter; the GPU needs >= 16.
MIN_TILE = 16 if DEVICE == "cuda" else 1
TOL = {torch.float32: 1e-5, torch.bfloat16: 1.2e-2}
# Sequence 0: a prompt from scratch longer than one query block; 1 and 2: chunks that start
# mid-block after cached context; 3: a decode whose context spans many blocks; 4: no new rows.
CONTEXTS = (0, 5, 13, 57, 9)
QUERIES = (11, 7, 3, 1, 0)


def _batch(num_heads: int, num_kv_heads: int, dtype: torch.dtype, *, head_dim: int = 16,
           block_size: int = 4, contexts: tuple[int, ...] = CONTEXTS,
           queries: tuple[int, ...] = QUERIES, seed: int = 0) -> PagedBatch:
    b = make_paged_batch(context_lens=contexts, query_lens=queries, num_heads=num_heads,
                         num_kv_heads=num_kv_heads, head_dim=head_dim, block_size=block_size,
                         dtype=dtype, device=DEVICE, seed=seed)
    store_kv_ref(b.k, b.v, b.k_cache, b.v_cache, b.slot_mapping)
    return b


def _run(b: PagedBatch, window: int | None, **kwargs: int) -> tuple[torch.Tensor, torch.Tensor]:
    for tile in ("block_m", "block_n"):
        if tile in kwargs:
            kwargs[tile] = max(kwargs[tile], MIN_TILE)
    args = (b.q, b.k_cache, b.v_cache, b.block_tables, b.query_start_loc, b.seq_lens,
            b.q.shape[2] ** -0.5, window)
    out = torch.full_like(b.q, float("nan"))  # poisoned: every row must be written
    paged_attention(*args, max_query_len=b.max_query_len, max_seq_len=b.max_seq_len, out=out,
                    **kwargs)
    return out, paged_attention_ref(*args)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (8, 2)], ids=["gqa1", "gqa3", "gqa4"])
@pytest.mark.parametrize("window", [None, 6], ids=["causal", "window6"])
def test_mixed_batch_matches_reference(
    heads: tuple[int, int], dtype: torch.dtype, window: int | None
) -> None:
    b = _batch(*heads, dtype)
    # Small tiles: several query blocks per prompt and key tiles spanning two pages.
    out, ref = _run(b, window, block_m=8, block_n=8)
    assert rel_err(out, ref) < TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("num_kv_splits", [None, 3], ids=["auto", "3splits"])
def test_decode_split_kv_matches_reference(dtype: torch.dtype, num_kv_splits: int | None) -> None:
    # Long and short contexts in one batch: some splits of the short one see no keys at all.
    b = _batch(8, 2, dtype, contexts=(70, 2, 33), queries=(1, 1, 1))
    # Auto on the interpreter (4 "SMs", 6 base programs) picks 2 splits.
    split_arg = {} if num_kv_splits is None else {"num_kv_splits": num_kv_splits}
    out, ref = _run(b, None, block_n=4, **split_arg)
    assert rel_err(out, ref) < TOL[dtype]


def test_decode_split_kv_with_window() -> None:
    # Window 10 at position 40 starts at key 31, the last key of a 4-key tile: an off-by-one
    # in the scan start would skip that whole tile.
    b = _batch(6, 2, torch.float32, contexts=(70, 40), queries=(1, 1), seed=3)
    out, ref = _run(b, 10, num_kv_splits=4, block_n=4)
    assert rel_err(out, ref) < TOL[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_window_much_smaller_than_query_block(dtype: torch.dtype) -> None:
    # One 64-row query block, window 3: late rows see nothing in the block's first key tiles
    # (their running max stays -inf there, which must not turn into NaN).
    b = _batch(4, 4, dtype, contexts=(5, 0), queries=(40, 20), seed=4)
    out, ref = _run(b, 3, block_m=64, block_n=4)
    assert rel_err(out, ref) < TOL[dtype]


def test_default_tiles_odd_head_dim_and_page_size() -> None:
    # head_dim 24 (padded to 32 in the kernel), pages of 6 rows (tiles straddle pages).
    b = _batch(6, 3, torch.float32, head_dim=24, block_size=6, seed=1)
    out, ref = _run(b, None)
    assert rel_err(out, ref) < TOL[torch.float32]


def test_reference_matches_sdpa_on_one_contiguous_prompt() -> None:
    # The oracle itself against torch's attention: one sequence, prefill from scratch.
    b = make_paged_batch(context_lens=(0,), query_lens=(13,), num_heads=8, num_kv_heads=2,
                         head_dim=16, block_size=4, dtype=torch.float32, seed=2)
    store_kv_ref(b.k, b.v, b.k_cache, b.v_cache, b.slot_mapping)
    ref = paged_attention_ref(b.q, b.k_cache, b.v_cache, b.block_tables, b.query_start_loc,
                              b.seq_lens, 0.25, None)
    k = b.k.repeat_interleave(4, dim=1).transpose(0, 1)  # [num_heads, 13, head_dim]
    v = b.v.repeat_interleave(4, dim=1).transpose(0, 1)
    sdpa = F.scaled_dot_product_attention(b.q.transpose(0, 1), k, v, is_causal=True, scale=0.25)
    torch.testing.assert_close(ref, sdpa.transpose(0, 1), rtol=1e-5, atol=1e-5)
