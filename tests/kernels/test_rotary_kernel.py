"""rotary (Triton) vs rotary_ref; the reference and the cos/sin cache vs transformers."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from transformers import LlamaConfig
from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

from tokenfleet.kernels.reference import rotary_ref
from tokenfleet.kernels.rope_cache import build_cos_sin_cache, rope_inv_freq
from tokenfleet.kernels.rotary import rotary
from tokenfleet.kernels.selfcheck import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
          "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


@pytest.mark.parametrize(
    "rope_scaling",
    [None, {"rope_type": "linear", "factor": 4.0}, {"type": "linear", "factor": 2.0}, LLAMA3,
     {**LLAMA3, "factor": 32.0, "original_max_position_embeddings": 128}],
    ids=["default", "linear", "linear-legacy-key", "llama3", "llama3-short-context"],
)
def test_inv_freq_equals_transformers(rope_scaling: dict[str, Any] | None) -> None:
    config = LlamaConfig(hidden_size=256, num_attention_heads=2, head_dim=128,
                         rope_theta=500000.0, rope_scaling=rope_scaling,
                         max_position_embeddings=4096)
    scaling = rope_scaling or {}
    rope_type = str(scaling.get("rope_type", scaling.get("type", "default")))
    hf_inv_freq, attention_factor = ROPE_INIT_FUNCTIONS[rope_type](config, torch.device("cpu"))
    assert attention_factor == 1.0
    ours = rope_inv_freq(128, 500000.0, rope_scaling)
    assert torch.equal(ours, hf_inv_freq.float())


def test_unknown_rope_type_is_rejected() -> None:
    with pytest.raises(ValueError, match="yarn"):
        build_cos_sin_cache(64, 16, 10000.0, {"rope_type": "yarn", "factor": 2.0})


def test_reference_matches_transformers_apply_rotary() -> None:
    num_tokens, head_dim = 9, 32
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(num_tokens, 4, head_dim, generator=gen)
    k = torch.randn(num_tokens, 2, head_dim, generator=gen)
    positions = torch.randperm(40, generator=gen)[:num_tokens]
    cache = build_cos_sin_cache(head_dim, 40, 10000.0, LLAMA3)
    cos_half, sin_half = cache[positions].chunk(2, dim=-1)
    cos = torch.cat([cos_half, cos_half], dim=-1)[None]  # [1, num_tokens, head_dim] as in HF
    sin = torch.cat([sin_half, sin_half], dim=-1)[None]
    # HF wants [batch, heads, seq, head_dim].
    hf_q, hf_k = apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    q_ref, k_ref = rotary_ref(q, k, positions, cache)
    torch.testing.assert_close(q_ref, hf_q[0].transpose(0, 1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(k_ref, hf_k[0].transpose(0, 1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("rotary_dim", [24, 16], ids=["full", "partial"])
def test_rotary_matches_reference_in_place(dtype: torch.dtype, rotary_dim: int) -> None:
    num_tokens, num_heads, num_kv_heads, head_dim = 6, 6, 2, 24
    gen = torch.Generator().manual_seed(1)
    # q and k as views of one fused qkv output (token stride larger than heads * head_dim).
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_dim, generator=gen)
    qkv = qkv.to(dtype=dtype, device=DEVICE)
    q = qkv[:, : num_heads * head_dim].view(num_tokens, num_heads, head_dim)
    k = qkv[:, num_heads * head_dim : (num_heads + num_kv_heads) * head_dim].view(
        num_tokens, num_kv_heads, head_dim
    )
    v_before = qkv[:, (num_heads + num_kv_heads) * head_dim :].clone()
    positions = torch.tensor([0, 5, 6, 7, 31, 2], dtype=torch.int64, device=DEVICE)
    cache = build_cos_sin_cache(rotary_dim, 32, 10000.0, None, device=DEVICE)
    q_ref, k_ref = rotary_ref(q, k, positions, cache)
    rotary(q, k, positions, cache)
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert rel_err(q, q_ref) < tol
    assert rel_err(k, k_ref) < tol
    assert torch.equal(qkv[:, (num_heads + num_kv_heads) * head_dim :], v_before)
    if rotary_dim < head_dim:
        assert torch.equal(q[..., rotary_dim:], q_ref[..., rotary_dim:])
