"""Draft tokens for speculative decoding by n-gram lookup (prompt lookup decoding).

TGI's `--speculate` without a Medusa head, and vLLM's `ngram` method: the last few tokens of
a sequence are searched for earlier in its own prompt and output, and the tokens that
followed their most recent earlier occurrence are proposed as the next ones. No draft model,
no extra weights: it pays off where the answer repeats its context (code edits, extraction,
summaries that quote, multi-turn chats that restate), and costs one wider forward where it
does not.

The engine verifies the drafts in one step (`LLMEngine`): the model runs on the last token
plus the drafts, each position samples with its own (seed, index) noise exactly as a plain
decode step would, and drafts are accepted while they equal what was sampled. The output is
therefore the same tokens a plain decode produces, greedy or seeded, only in fewer steps.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

__all__ = ["NgramProposer"]


class NgramProposer:
    """Proposes up to `num_draft` tokens from the most recent earlier match of the longest
    suffix n-gram, n from `max_ngram` down to `min_ngram`.

    `min_ngram` 2, not 1: a single token almost always occurred before, so 1-grams draft at
    nearly every step and are rarely right. On SmolLM2 (benchmarks/bench_speculative.py) an
    open-ended story at batch 4 accepted 1 % of them and ran at 0.76x plain decoding; with
    2-grams it drafts about a sixth as often, runs at 0.99x, and code edits accept 70 %
    instead of 43 %."""

    def __init__(self, max_ngram: int = 3, min_ngram: int = 2):
        if not 1 <= min_ngram <= max_ngram:
            raise ValueError(f"need 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram = max_ngram
        self.min_ngram = min_ngram

    def propose(self, token_ids: Sequence[int], num_draft: int) -> list[int]:
        """The drafts (possibly none) to follow `token_ids`."""
        num_tokens = len(token_ids)
        if num_draft <= 0 or num_tokens <= self.min_ngram:
            return []
        tokens = np.asarray(token_ids, dtype=np.int64)  # [L]
        for n in range(min(self.max_ngram, num_tokens - 1), self.min_ngram - 1, -1):
            start = _last_earlier_match(tokens, n)
            if start is not None:
                follow = start + n  # the tokens after the match
                return tokens[follow:follow + num_draft].tolist()
        return []


def _last_earlier_match(tokens: np.ndarray, n: int) -> int | None:
    """Start of the most recent occurrence of the last `n` tokens that ends before the last
    token (so at least one token follows it), or None."""
    num_tokens = tokens.shape[0]
    suffix = tokens[num_tokens - n:]  # [n]
    num_starts = num_tokens - n  # candidate starts 0 .. L-n-1: each leaves a follower
    hits = tokens[:num_starts] == suffix[0]  # [num_starts]
    for offset in range(1, n):
        hits &= tokens[offset:num_starts + offset] == suffix[offset]
    found = np.flatnonzero(hits)
    return int(found[-1]) if found.size else None
