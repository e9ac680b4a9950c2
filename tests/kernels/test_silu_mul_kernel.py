"""silu_mul (Triton) vs `F.silu(gate) * up` on random data."""

from __future__ import annotations

import pytest
import torch

from tokenfleet.kernels.errors import KernelArgumentError
from tokenfleet.kernels.reference import silu_mul_ref
from tokenfleet.kernels.selfcheck import rel_err
from tokenfleet.kernels.silu_mul import silu_mul

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("intermediate", [5, 1024, 1500])
def test_matches_reference(dtype: torch.dtype, intermediate: int) -> None:
    gen = torch.Generator().manual_seed(intermediate)
    gate_up = (torch.randn(6, 2 * intermediate, generator=gen) * 4).to(dtype).to(DEVICE)
    out = silu_mul(gate_up)
    ref = silu_mul_ref(gate_up)
    assert out.shape == (6, intermediate) and out.dtype == dtype
    # One bf16 ulp at most (the interpreter rounds bf16 by truncation), fp32 to rounding.
    assert rel_err(out, ref) < (1e-6 if dtype == torch.float32 else 8e-3)
    assert torch.isfinite(out).all()


def test_rows_with_a_stride() -> None:
    # gate_up as a row slice of a wider buffer: rows are not adjacent.
    wide = torch.randn(4, 40, device=DEVICE)
    gate_up = wide[:, :24]
    torch.testing.assert_close(silu_mul(gate_up), silu_mul_ref(gate_up))


def test_bad_arguments() -> None:
    with pytest.raises(KernelArgumentError, match="even"):
        silu_mul(torch.randn(3, 7, device=DEVICE))
    with pytest.raises(KernelArgumentError):
        silu_mul(torch.randn(8, 3, device=DEVICE).t())  # last dimension not contiguous
