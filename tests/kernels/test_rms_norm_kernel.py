"""rms_norm (Triton) vs rms_norm_ref, and the reference vs transformers' LlamaRMSNorm."""

from __future__ import annotations

import pytest
import torch
from transformers.models.llama.modeling_llama import LlamaRMSNorm

from tokenfleet.kernels.reference import rms_norm_ref
from tokenfleet.kernels.rms_norm import rms_norm
from tokenfleet.kernels.selfcheck import rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# bf16: the interpreter truncates float32 -> bf16 (one ulp = 2^-8 relative) where the GPU rounds.
TOL = {torch.float32: 1e-6, torch.bfloat16: 1e-2}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
def test_rms_norm_matches_reference(dtype: torch.dtype, with_residual: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    hidden = 48  # not a power of two: the kernel masks the tail
    wide = torch.randn(7, 64, generator=gen).to(dtype=dtype, device=DEVICE)
    x = wide[:, :hidden]  # row stride 64: a view, as after a split
    weight = (1 + 0.2 * torch.randn(hidden, generator=gen)).to(dtype=dtype, device=DEVICE)
    residual = torch.randn(7, hidden, generator=gen).to(dtype=dtype, device=DEVICE) \
        if with_residual else None
    out, new_res = rms_norm(x, weight, 1e-6, residual)
    out_ref, res_ref = rms_norm_ref(x, weight, 1e-6, residual)
    assert rel_err(out, out_ref) < TOL[dtype]
    assert rel_err(new_res, res_ref) < TOL[dtype]
    if residual is None:
        assert new_res is x
    elif dtype == torch.float32 or DEVICE == "cuda":  # the interpreter truncates bf16
        assert torch.equal(new_res, res_ref)  # the add is one rounding, same on both sides


def test_reference_matches_transformers_llama_rms_norm() -> None:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(5, 32, generator=gen).to(torch.bfloat16)
    residual = torch.randn(5, 32, generator=gen).to(torch.bfloat16)
    hf = LlamaRMSNorm(32, eps=1e-5).to(torch.bfloat16)
    with torch.no_grad():
        hf.weight.copy_(1 + 0.2 * torch.randn(32, generator=gen))
        expected = hf(x + residual)
    out, new_res = rms_norm_ref(x, hf.weight.detach(), 1e-5, residual)
    torch.testing.assert_close(new_res, x + residual, rtol=0, atol=0)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
