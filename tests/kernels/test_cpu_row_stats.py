"""The C row-stats kernel (the sampler's argmax + logsumexp) against torch's ops."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from tokenfleet.kernels import cpu_row_stats
from tokenfleet.kernels.cpu_row_stats import CpuRowStats

pytestmark = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                                reason="no C compiler: the kernel cannot be built")


@pytest.fixture(scope="module")
def kernel(tmp_path_factory: pytest.TempPathFactory) -> CpuRowStats:
    k = cpu_row_stats.load(tmp_path_factory.mktemp("kernels"))
    assert k is not None, "a C compiler is present but the kernel did not build"
    return k


def _logits(rows: int, vocab: int, seed: int, scale: float = 4.0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(rows, vocab, generator=g) * scale + 10.0  # [rows, vocab]


@pytest.mark.parametrize("vocab", [1, 7, 64, 65, 1000, 49152])  # tails around the 64 lanes
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_matches_torch(kernel: CpuRowStats, vocab: int, threads: int) -> None:
    x = _logits(5, vocab, seed=vocab)
    x[1, : vocab // 2] = float("-inf")  # banned / filtered tokens
    x[2, -1] = x[2].max() + 50.0  # the maximum in the scalar tail
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        argmax, lse = kernel(x)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(argmax, x.argmax(dim=-1))
    torch.testing.assert_close(lse, x.logsumexp(dim=-1), rtol=2e-7, atol=2e-6)


def test_ties_take_the_first_index_and_extremes(kernel: CpuRowStats) -> None:
    x = torch.zeros(4, 300)
    x[0, [17, 40, 299]] = 5.0  # ties: the first, as torch.argmax
    x[1] = float("-inf")  # every token filtered
    x[2, 3] = float("nan")  # a broken model: NaN wins, as in torch
    x[3] = torch.linspace(-1000.0, 80.0, 300)  # exp underflows for most entries
    argmax, lse = kernel(x)
    assert argmax.tolist() == [17, 0, 3, 299]
    assert lse[1] == float("-inf") and lse[2].isnan()
    torch.testing.assert_close(lse[[0, 3]], x[[0, 3]].logsumexp(-1), rtol=2e-7, atol=0.0)


def test_a_row_is_independent_of_its_batch_and_bf16_equals_its_float_copy(
        kernel: CpuRowStats) -> None:
    x = _logits(9, 5000, seed=3).bfloat16()
    full_ids, full_lse = kernel(x)
    for row in (0, 4, 8):
        ids, lse = kernel(x[row : row + 1])
        assert ids.item() == full_ids[row].item() and lse.item() == full_lse[row].item()
    ids32, lse32 = kernel(x.float())
    assert torch.equal(ids32, full_ids) and torch.equal(lse32, full_lse)


def test_strided_rows(kernel: CpuRowStats) -> None:
    x = _logits(6, 2000, seed=5)
    rows, cols = x[::2], x[:, 100:1100]  # row stride > width; columns not from 0
    for view in (rows, cols, x[:, ::2]):  # the last one is copied (columns not contiguous)
        argmax, lse = kernel(view)
        assert torch.equal(argmax, view.argmax(-1))
        torch.testing.assert_close(lse, view.logsumexp(-1), rtol=2e-7, atol=2e-6)
    argmax, lse = kernel(x[:0])
    assert argmax.shape == (0,) and lse.shape == (0,)


def test_bad_arguments(kernel: CpuRowStats) -> None:
    for bad in (torch.zeros(3), torch.zeros(2, 3, 4), torch.zeros(2, 3, dtype=torch.float16),
                torch.zeros(2, 0)):
        with pytest.raises(ValueError):
            kernel(bad)


def test_build_is_cached(tmp_path: Path) -> None:
    first = cpu_row_stats.load(tmp_path)
    assert first is not None
    assert [p.name for p in tmp_path.iterdir()] == [first.library.name]
    assert cpu_row_stats.load(tmp_path) is first
