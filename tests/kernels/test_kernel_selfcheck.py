"""The kernel part of the GPU check script, at tiny shapes (what gpu_check.py runs on the H100)."""

from __future__ import annotations

import pytest
import torch

from tokenfleet.kernels.selfcheck import TINY_SHAPE, run_kernel_checks

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_every_kernel_check_passes_at_tiny_shapes(dtype: torch.dtype) -> None:
    results = run_kernel_checks(TINY_SHAPE, dtype, DEVICE, seed=5)
    assert len(results) == 11
    failed = [r for r in results if not r.ok]
    assert not failed, failed
