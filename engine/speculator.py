"""Which decoding sequences get draft tokens this step, and how many (speculative decoding).

Before each schedule the engine asks the `Speculator` to set `draft_token_ids` on the running
sequences that may speculate; the scheduler then runs each with its drafts (when the token
budget and free blocks allow), the sampler samples every position as a plain decode would,
and the postprocessor keeps the drafts that match (`Postprocessor._emit_verified`).

A sequence speculates only when the drafts cannot change what it generates and verifying
them needs nothing the host lacks: it is decoding (only its last token uncomputed, none
pending on the device), it has no grammar (whose mask must follow each accepted token) and
no repetition / frequency / presence penalty (which would have to count the drafts), and
at least two tokens are left before max_new_tokens and the context limit.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenfleet.engine.ngram_proposer import NgramProposer
from tokenfleet.engine.sampling_batch import needs_history
from tokenfleet.engine.sequence import Sequence

__all__ = ["Speculator"]


class Speculator:
    def __init__(self, num_draft: int, max_model_len: int,
                 proposer: NgramProposer | None = None):
        assert num_draft > 0
        self.num_draft = num_draft
        self.max_model_len = max_model_len
        self.proposer = proposer if proposer is not None else NgramProposer()

    def propose(self, running: Iterable[Sequence]) -> None:
        """Set (or clear) each running sequence's drafts for the coming step."""
        for seq in running:
            num = self._num_draft(seq)
            seq.draft_token_ids = self.proposer.propose(seq.token_ids, num) if num else []

    def _num_draft(self, seq: Sequence) -> int:
        if (seq.num_uncomputed_tokens != 1 or seq.num_pending_tokens
                or seq.grammar_matcher is not None or needs_history([seq])):
            return 0
        # Verifying k drafts emits up to k + 1 tokens, the last at position num_tokens + k.
        left = min(seq.params.max_new_tokens - seq.num_output_tokens,
                   self.max_model_len - seq.num_tokens)
        return max(0, min(self.num_draft, left - 1))
