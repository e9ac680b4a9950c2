"""row_stats (the sampler's argmax + logsumexp in one pass) vs torch on the same rows."""

from __future__ import annotations

import pytest
import torch

from tokenfleet.kernels.errors import KernelArgumentError
from tokenfleet.kernels.reference import row_stats_ref
from tokenfleet.kernels.row_stats import row_stats

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _rows(num_rows: int, vocab: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(num_rows, vocab, generator=gen) * 4).to(dtype=dtype, device=DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("vocab", [1000, 4096, 9001], ids=["one-chunk", "exact", "ragged"])
def test_matches_torch(dtype: torch.dtype, vocab: int) -> None:
    scores = _rows(5, vocab, dtype, seed=vocab)
    scores[1, : vocab // 2] = float("-inf")  # banned tokens (grammar, min_new_tokens EOS)
    scores[2, vocab - 1] = 1e4  # the max in the last, partial chunk
    scores[3, 0] = 1e4  # ... and at the first entry
    argmax, lse = row_stats(scores)
    want_arg, want_lse = row_stats_ref(scores)
    assert argmax.dtype == torch.int64 and lse.dtype == torch.float32
    assert torch.equal(argmax, want_arg)
    torch.testing.assert_close(lse, want_lse, rtol=2e-6, atol=2e-5)


def test_ties_take_the_first_index_across_chunks() -> None:
    """torch.argmax returns the first maximal index; so must a chunked argmax."""
    scores = torch.zeros(3, 9001, device=DEVICE)
    scores[0, [7000, 300, 5000]] = 2.0  # three chunks hold the max: the earliest wins
    scores[1, [4095, 4096]] = 2.0  # the two sides of a chunk boundary
    scores[2] = -1.0  # all equal: index 0
    argmax, lse = row_stats(scores)
    assert argmax.tolist() == [300, 4095, 0]
    torch.testing.assert_close(lse, row_stats_ref(scores)[1], rtol=2e-6, atol=2e-5)


def test_all_banned_row_and_empty_batch() -> None:
    scores = _rows(2, 5000, torch.float32, seed=1)
    scores[0] = float("-inf")
    argmax, lse = row_stats(scores)
    assert argmax[0].item() == 0 and lse[0].item() == float("-inf")
    assert not torch.isnan(lse).any()
    empty_arg, empty_lse = row_stats(scores[:0])
    assert empty_arg.shape == (0,) and empty_lse.shape == (0,)


def test_a_row_is_the_same_alone_or_in_a_batch() -> None:
    """Batch invariance, which the sampler promises for every row's logprob."""
    scores = _rows(6, 9001, torch.bfloat16, seed=2)
    argmax, lse = row_stats(scores)
    for i in range(scores.shape[0]):
        one_arg, one_lse = row_stats(scores[i : i + 1])
        assert one_arg.item() == argmax[i].item()
        assert one_lse.item() == lse[i].item()  # bit for bit


def test_bad_arguments_are_rejected() -> None:
    with pytest.raises(KernelArgumentError, match="scores"):
        row_stats(torch.zeros(3, device=DEVICE))
    with pytest.raises(KernelArgumentError, match="dtype"):
        row_stats(torch.zeros(2, 3, dtype=torch.int32, device=DEVICE))


def test_nan_shows_as_torch_shows_it() -> None:
    """A NaN logit (a numerics bug upstream) is not sampled around: the first NaN's index and a
    NaN logsumexp, as torch.argmax / logsumexp give; other rows are unaffected."""
    scores = _rows(3, 9001, torch.float32, seed=5)
    scores[0, [100, 7000]] = float("nan")
    scores[0, 200] = 50.0
    scores[1] = float("nan")
    argmax, lse = row_stats(scores)
    want_arg, want_lse = row_stats_ref(scores)
    assert argmax.tolist() == want_arg.tolist() == [100, 0, want_arg[2].item()]
    assert torch.isnan(lse[:2]).all() and torch.isnan(want_lse[:2]).all()
    torch.testing.assert_close(lse[2], want_lse[2], rtol=2e-6, atol=2e-5)
