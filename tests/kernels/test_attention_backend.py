"""TritonAttentionBackend vs the torch reference on steps built the way ModelRunner builds them."""

from __future__ import annotations

import pytest
import torch

from tokenfleet.engine.layers.attention_metadata import AttentionMetadata
from tokenfleet.engine.layers.attention_triton import TritonAttentionBackend
from tokenfleet.kernels.paged_batch import PagedBatch, make_paged_batch
from tokenfleet.kernels.reference import paged_attention_ref, store_kv_ref
from tokenfleet.kernels.selfcheck import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _meta(b: PagedBatch) -> AttentionMetadata:
    return AttentionMetadata(
        slot_mapping=b.slot_mapping, block_tables=b.block_tables,
        query_start_loc=b.query_start_loc, seq_lens=b.seq_lens,
        max_query_len=b.max_query_len, max_seq_len=b.max_seq_len,
        is_decode_only=b.is_decode_only,
        query_start_loc_cpu=b.query_start_loc.tolist(), seq_lens_cpu=b.seq_lens.tolist(),
    )


def _expected(b: PagedBatch, window: int | None) -> tuple[torch.Tensor, ...]:
    k_cache, v_cache = b.k_cache.clone(), b.v_cache.clone()
    store_kv_ref(b.k, b.v, k_cache, v_cache, b.slot_mapping)
    out = paged_attention_ref(b.q, k_cache, v_cache, b.block_tables, b.query_start_loc,
                              b.seq_lens, b.q.shape[2] ** -0.5, window)
    return out, k_cache, v_cache


@pytest.mark.parametrize(
    ("contexts", "queries", "window", "num_kv_splits"),
    [
        ((0, 10, 37, 5), (12, 6, 1, 1), None, None),  # prompt, chunk mid-block, decodes
        ((0, 10, 37, 5), (12, 6, 1, 1), 8, None),  # the same with a sliding window
        ((40, 3, 22), (1, 1, 1), None, 4),  # decode-only step with a fixed split count
    ],
    ids=["mixed", "mixed-window", "decode-splits"],
)
def test_forward_matches_reference(
    contexts: tuple[int, ...],
    queries: tuple[int, ...],
    window: int | None,
    num_kv_splits: int | None,
) -> None:
    b = make_paged_batch(context_lens=contexts, query_lens=queries, num_heads=8, num_kv_heads=2,
                         head_dim=16, block_size=4, dtype=torch.bfloat16, device=DEVICE,
                         seed=7)
    out_ref, k_ref, v_ref = _expected(b, window)
    backend = TritonAttentionBackend(num_kv_splits=num_kv_splits)
    out = backend.forward(b.q, b.k, b.v, b.k_cache, b.v_cache, _meta(b), b.q.shape[2] ** -0.5,
                          window)
    assert out.shape == b.q.shape and out.dtype == b.q.dtype
    assert torch.equal(b.k_cache, k_ref) and torch.equal(b.v_cache, v_ref)
    assert rel_err(out, out_ref) < 1.2e-2


def test_forward_matches_torch_backend_when_present() -> None:
    try:
        from tokenfleet.engine.layers.attention_torch import TorchAttentionBackend
    except ImportError:
        pytest.skip("engine/layers/attention_torch.py not written yet")
    b = make_paged_batch(context_lens=(0, 9, 30), query_lens=(7, 4, 1), num_heads=6,
                         num_kv_heads=2, head_dim=16, block_size=4, dtype=torch.float32,
                         device=DEVICE, seed=8)
    caches = (b.k_cache.clone(), b.v_cache.clone())
    args = (b.q, b.k, b.v)
    ours = TritonAttentionBackend().forward(*args, b.k_cache, b.v_cache, _meta(b), 0.25, None)
    theirs = TorchAttentionBackend().forward(*args, *caches, _meta(b), 0.25, None)
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
    ("contexts", "queries", "window"),
    [
        ((0, 0, 10, 5), (12, 33, 6, 1), None),  # fresh prompts (the causal fast path), chunk
        ((0, 0, 10, 5), (12, 33, 6, 1), 8),  # a window shorter than the prompts: no fast path
        ((0, 0), (20, 9), 20),  # prompts that fit in the window: fast path
    ],
    ids=["fresh-and-chunk", "window-8", "window-fits"],
)
def test_torch_backend_matches_reference(contexts: tuple[int, ...], queries: tuple[int, ...],
                                         window: int | None) -> None:
    from tokenfleet.engine.layers.attention_torch import TorchAttentionBackend

    b = make_paged_batch(context_lens=contexts, query_lens=queries, num_heads=9, num_kv_heads=3,
                         head_dim=16, block_size=4, dtype=torch.float32, device="cpu", seed=11)
    out_ref, k_ref, v_ref = _expected(b, window)
    backend = TorchAttentionBackend()
    meta = _meta(b)
    out = backend.forward(b.q, b.k, b.v, b.k_cache, b.v_cache, meta, b.q.shape[2] ** -0.5,
                          window)
    fresh = [p.fresh for p in meta.backend_plan.prefills]
    assert fresh == [q > 1 and c == 0 and (window is None or q <= window)
                     for c, q in zip(contexts, queries, strict=True) if q > 1]
    assert torch.equal(b.k_cache, k_ref) and torch.equal(b.v_cache, v_ref)
    torch.testing.assert_close(out, out_ref, rtol=1e-5, atol=1e-5)
