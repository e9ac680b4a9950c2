"""store_kv (Triton) vs store_kv_ref: exact copies into shuffled slots, -1 slots skipped."""

from __future__ import annotations

import pytest
import torch

from tokenfleet.kernels.kv_store import store_kv
from tokenfleet.kernels.paged_batch import make_paged_batch
from tokenfleet.kernels.reference import store_kv_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_store_kv_matches_reference(dtype: torch.dtype) -> None:
    b = make_paged_batch(context_lens=(0, 6, 17), query_lens=(9, 5, 1), num_heads=6,
                         num_kv_heads=3, head_dim=24, block_size=4, dtype=dtype,
                         device=DEVICE)
    b.slot_mapping[1::4] = -1
    k_ref, v_ref = b.k_cache.clone(), b.v_cache.clone()
    before = b.k_cache.clone()
    store_kv_ref(b.k, b.v, k_ref, v_ref, b.slot_mapping)
    store_kv(b.k, b.v, b.k_cache, b.v_cache, b.slot_mapping)
    assert torch.equal(b.k_cache, k_ref)
    assert torch.equal(b.v_cache, v_ref)
    assert not torch.equal(b.k_cache, before)  # something was written at all


def test_store_kv_reads_strided_views_of_a_fused_projection() -> None:
    # k and v as column slices of one qkv output: token stride > num_kv_heads * head_dim.
    num_tokens, num_kv_heads, head_dim = 5, 2, 8
    qkv = torch.randn(num_tokens, 3 * num_kv_heads * head_dim, device=DEVICE)
    k = qkv[:, : num_kv_heads * head_dim].view(num_tokens, num_kv_heads, head_dim)
    v = qkv[:, num_kv_heads * head_dim : 2 * num_kv_heads * head_dim].view(
        num_tokens, num_kv_heads, head_dim
    )
    k_cache = torch.randn(4, 4, num_kv_heads, head_dim, device=DEVICE)
    v_cache = torch.randn_like(k_cache)
    slots = torch.tensor([3, 0, 15, -1, 9], dtype=torch.int64, device=DEVICE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    store_kv_ref(k, v, k_ref, v_ref, slots)
    store_kv(k, v, k_cache, v_cache, slots)
    assert torch.equal(k_cache, k_ref)
    assert torch.equal(v_cache, v_ref)
