"""N-gram drafts (prompt lookup): the longest suffix n-gram's most recent earlier match."""

from __future__ import annotations

import pytest

from tokenfleet.engine.ngram_proposer import NgramProposer


def test_the_most_recent_match_of_the_longest_suffix_is_followed() -> None:
    proposer = NgramProposer(max_ngram=3, min_ngram=1)
    #        0  1  2  3  4  5  6  7  8  9 10 11
    tokens = [1, 2, 3, 4, 5, 9, 2, 3, 7, 8, 2, 3]
    # suffix (3) "_, 2, 3": "8 2 3" and "9 2 3" / "1 2 3" do not match as 3-grams; the
    # 2-gram "2 3" last occurred at 6..7, followed by 7 8 2 3.
    assert proposer.propose(tokens, 3) == [7, 8, 2]
    assert proposer.propose(tokens, 10) == [7, 8, 2, 3]  # up to the end, not beyond
    tokens = [5, 6, 7, 1, 5, 6, 7, 2, 6, 7]
    assert proposer.propose(tokens, 2) == [2, 6]  # "6 7" at 5..6 is the most recent
    assert NgramProposer(max_ngram=3).propose([4, 5, 6, 7, 5, 6], 2) == [7, 5]


def test_nothing_is_proposed_without_a_match() -> None:
    proposer = NgramProposer(max_ngram=3, min_ngram=2)
    assert proposer.propose([1, 2, 3, 4, 5], 4) == []
    assert proposer.propose([1, 2, 3, 1, 9], 4) == []  # "1 9" never occurred before
    assert proposer.propose([7], 4) == []
    assert proposer.propose([1, 2, 1, 2], 0) == []
    assert NgramProposer(max_ngram=2, min_ngram=1).propose([3, 3], 3) == [3]


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        NgramProposer(max_ngram=1, min_ngram=2)
    with pytest.raises(ValueError):
        NgramProposer(max_ngram=3, min_ngram=0)
