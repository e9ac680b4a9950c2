"""FlashAttentionBackend: how it calls flash-attn, and (where installed) flash-attn itself.

flash-attn is CUDA-only and rarely installed, so the first tests hand the backend a stand-in
module that implements flash-attn's documented semantics for the two functions it calls
(paged KV through `block_table`, causal masks aligned bottom-right, `window_size` (left, right)
inclusive) in plain torch. They check our side of the contract (cumulative lengths, window
conversion, decode vs mixed path, cache writes) against the paged-attention reference, which
is written independently of both. The last test runs the real package when it is importable.
"""

from __future__ import annotations

import importlib.util
import itertools
import types

import pytest
import torch

from tokenfleet.engine.errors import ValidationError
from tokenfleet.engine.layers.attention_flash import FlashAttentionBackend
from tokenfleet.engine.layers.attention_metadata import AttentionMetadata
from tokenfleet.kernels.paged_batch import PagedBatch, make_paged_batch
from tokenfleet.kernels.reference import paged_attention_ref, store_kv_ref
from tokenfleet.kernels.selfcheck import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # store_kv is a Triton kernel


def _attend(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, table: torch.Tensor,
            seq_len: int, scale: float, window: tuple[int, int]) -> torch.Tensor:
    """flash-attn's semantics for one sequence: q [q_len, H, D] -> [q_len, H, D]."""
    page = k_cache.shape[1]
    blocks = table[: -(-seq_len // page)].long()
    k = k_cache[blocks].flatten(0, 1)[:seq_len].float()  # [seq_len, KVH, D]
    v = v_cache[blocks].flatten(0, 1)[:seq_len].float()
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, dim=1), v.repeat_interleave(group, dim=1)
    q_len = q.shape[0]
    q_pos = torch.arange(seq_len - q_len, seq_len, device=q.device)[:, None]  # bottom-right
    k_pos = torch.arange(seq_len, device=q.device)[None, :]
    allowed = k_pos <= q_pos + (window[1] if window[1] >= 0 else seq_len)
    allowed &= k_pos <= q_pos  # causal=True
    if window[0] >= 0:
        allowed &= k_pos >= q_pos - window[0]
    scores = torch.einsum("qhd,khd->hqk", q.float(), k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", torch.softmax(scores, -1), v).to(q.dtype)


def _fake_flash_attn(calls: list[str]) -> types.SimpleNamespace:
    def varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, *,
               softmax_scale, causal, window_size, block_table):
        calls.append("varlen")
        assert causal and cu_seqlens_k.dtype == torch.int32
        seq_lens = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).tolist()
        q_starts = cu_seqlens_q.tolist()
        assert max_seqlen_q == max(b - a for a, b in itertools.pairwise(q_starts))
        assert max_seqlen_k == max(seq_lens)
        parts = [_attend(q[q_starts[i]:q_starts[i + 1]], k, v, block_table[i], n,
                         softmax_scale, window_size) for i, n in enumerate(seq_lens)]
        return torch.cat(parts)

    def with_kvcache(q, k_cache, v_cache, *, cache_seqlens, block_table, softmax_scale,
                     causal, window_size):
        calls.append("kvcache")
        assert q.dim() == 4 and q.shape[1] == 1  # [B, 1, H, D]
        return torch.stack([_attend(q[i], k_cache, v_cache, block_table[i], int(n),
                                    softmax_scale, window_size)
                            for i, n in enumerate(cache_seqlens.tolist())])

    return types.SimpleNamespace(flash_attn_varlen_func=varlen,
                                 flash_attn_with_kvcache=with_kvcache)


def _meta(b: PagedBatch) -> AttentionMetadata:
    return AttentionMetadata(
        slot_mapping=b.slot_mapping, block_tables=b.block_tables,
        query_start_loc=b.query_start_loc, seq_lens=b.seq_lens,
        max_query_len=b.max_query_len, max_seq_len=b.max_seq_len,
        is_decode_only=b.is_decode_only)


@pytest.mark.parametrize(
    ("contexts", "queries", "window", "path"),
    [
        ((0, 10, 37, 5), (12, 6, 1, 1), None, "varlen"),  # prompt, chunk mid-block, decodes
        ((0, 10, 37, 5), (12, 6, 1, 1), 8, "varlen"),
        ((40, 3, 22), (1, 1, 1), None, "kvcache"),  # decode-only step
        ((40, 3, 22), (1, 1, 1), 5, "kvcache"),
    ],
    ids=["mixed", "mixed-window", "decode", "decode-window"],
)
def test_backend_calls_flash_attn_with_our_semantics(
    contexts: tuple[int, ...], queries: tuple[int, ...], window: int | None, path: str
) -> None:
    b = make_paged_batch(context_lens=contexts, query_lens=queries, num_heads=8, num_kv_heads=2,
                         head_dim=16, block_size=4, dtype=torch.float32, device=DEVICE, seed=11)
    k_ref, v_ref = b.k_cache.clone(), b.v_cache.clone()
    store_kv_ref(b.k, b.v, k_ref, v_ref, b.slot_mapping)
    expected = paged_attention_ref(b.q, k_ref, v_ref, b.block_tables, b.query_start_loc,
                                   b.seq_lens, 0.25, window)
    calls: list[str] = []
    backend = FlashAttentionBackend(_fake_flash_attn(calls))
    out = backend.forward(b.q, b.k, b.v, b.k_cache, b.v_cache, _meta(b), 0.25, window)
    assert calls == [path]
    assert torch.equal(b.k_cache, k_ref) and torch.equal(b.v_cache, v_ref)
    assert out.shape == b.q.shape
    assert rel_err(out, expected) < 1e-5


def test_flash_attn_needs_256_token_blocks() -> None:
    from tokenfleet.engine.config import EngineConfig

    with pytest.raises(ValidationError, match="block_size=256"):
        EngineConfig(model="x", attention_backend="flash_attn", block_size=16)
    EngineConfig(model="x", attention_backend="flash_attn", block_size=256)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is None or not torch.cuda.is_available(),
                    reason="flash-attn is not installed (CUDA only; pip install flash-attn)")
@pytest.mark.parametrize("queries", [(12, 6, 1, 1), (1, 1, 1, 1)], ids=["mixed", "decode"])
def test_real_flash_attn_matches_reference(queries: tuple[int, ...]) -> None:
    b = make_paged_batch(context_lens=(0, 300, 700, 5), query_lens=queries, num_heads=32,
                         num_kv_heads=8, head_dim=128, block_size=256, dtype=torch.bfloat16,
                         device="cuda", seed=12)
    k_ref, v_ref = b.k_cache.clone(), b.v_cache.clone()
    store_kv_ref(b.k, b.v, k_ref, v_ref, b.slot_mapping)
    expected = paged_attention_ref(b.q, k_ref, v_ref, b.block_tables, b.query_start_loc,
                                   b.seq_lens, 128 ** -0.5, None)
    out = FlashAttentionBackend().forward(b.q, b.k, b.v, b.k_cache, b.v_cache, _meta(b),
                                          128 ** -0.5, None)
    assert rel_err(out, expected) < 1.2e-2
