"""The compiled element-wise ops (layers/cpu_fused.py) against the layers' eager code."""

from __future__ import annotations

import pytest
import torch

from tokenfleet.engine.layers.cpu_fused import CpuFusedOps
from tokenfleet.engine.layers.norm import RMSNorm
from tokenfleet.engine.layers.rotary import RotaryEmbedding


@pytest.fixture(scope="module")
def fused() -> CpuFusedOps:
    ops = CpuFusedOps()
    ops.warm_up(hidden_size=48, intermediate_size=40, num_heads=6, num_kv_heads=2,
                head_dim=8, eps=1e-5, dtype=torch.float32)
    return ops


@pytest.mark.parametrize("num_tokens", [1, 5, 37])
def test_norm_rotary_and_silu_match_eager(fused: CpuFusedOps, num_tokens: int) -> None:
    g = torch.Generator().manual_seed(num_tokens)
    norm = RMSNorm(48, 1e-5)
    norm.weight.data = torch.randn(48, generator=g)
    x, residual = torch.randn(2, num_tokens, 48, generator=g)
    rope = RotaryEmbedding(8, 64, 10000.0, None)
    qkv = torch.randn(num_tokens, 8 * (6 + 2 + 2), generator=g)
    q, k, _ = qkv.split([48, 16, 16], dim=-1)
    q, k = q.view(num_tokens, 6, 8), k.view(num_tokens, 2, 8)
    positions = torch.randint(0, 64, (num_tokens,), generator=g)
    gate_up = torch.randn(num_tokens, 80, generator=g)
    with torch.inference_mode():
        want_norm = norm(x, residual), norm(x)
        want_rot = rope.lookup(positions, torch.float32).apply(q, k)
        want_act = torch.nn.functional.silu(gate_up[:, :40]) * gate_up[:, 40:]
        norm.cpu_fused = rope.cpu_fused = fused
        got_norm = norm(x, residual), norm(x)
        table = rope.lookup(positions, torch.float32)
        assert table.rotate_qk is not None  # the compiled rotation really ran
        got_rot = table.apply(q, k)
        got_act = fused.silu_mul(gate_up)
    for want, got in [(want_norm[0], got_norm[0]), (want_norm[1], got_norm[1]),
                      (want_rot, got_rot), ((want_act,), (got_act,))]:
        for w, o in zip(want, got, strict=True):
            torch.testing.assert_close(o, w, rtol=1e-5, atol=1e-5)
