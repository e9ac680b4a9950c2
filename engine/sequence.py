"""One request's state inside the engine: its tokens, KV blocks, progress and text."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any

from tokenfleet.engine.outputs import FinishReason
from tokenfleet.engine.sampling_params import SamplingParams

__all__ = ["PENDING_TOKEN", "Sequence", "SequenceStatus"]

# Stands in for a sampled token that is still on the device (asynchronous decode, see
# LLMEngine): counted in every length, replaced when the step's output is read back.
PENDING_TOKEN = -1


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(eq=False)
class Sequence:
    """Tokens = prompt + generated. KV exists for the first `num_computed_tokens` of them.

    A resumed request (its earlier tokens came from another worker) or a preempted one
    simply has generated tokens whose KV is not computed yet: the next prefill covers them,
    and sampling continues at `len(output_token_ids)`, the next index.

    With asynchronous decode the last `num_pending_tokens` output ids are PENDING_TOKEN: their
    KV is being computed, their values are not read back yet.
    """

    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    output_token_ids: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    num_pending_tokens: int = 0  # trailing PENDING_TOKEN entries of output_token_ids
    num_hashed_blocks: int = 0  # leading blocks of block_table registered in the prefix cache
    num_preemptions: int = 0
    finish_reason: FinishReason | None = None
    want_prompt_logprobs: bool = False
    eos_token_ids: frozenset[int] = frozenset()
    detokenizer: Any = None  # IncrementalDetokenizer
    stop_matcher: Any = None  # StopMatcher
    grammar_matcher: Any = None  # llguidance LLMatcher: follows the output when a grammar is set
    output_text: str = ""  # released text so far (never contains a stop sequence)
    prompt_logprob_by_pos: dict[int, float] = field(default_factory=dict)
    # Speculative decoding: tokens proposed to follow the last one, verified by the step
    # that is scheduled with them (1 + len(draft_token_ids) new tokens); [] otherwise.
    draft_token_ids: list[int] = field(default_factory=list)

    @property
    def token_ids(self) -> list[int]:
        return self.prompt_token_ids + self.output_token_ids

    @property
    def last_token_id(self) -> int:
        return self.output_token_ids[-1] if self.output_token_ids else self.prompt_token_ids[-1]

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def num_uncomputed_tokens(self) -> int:
        return self.num_tokens - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def drop_pending(self) -> None:
        """Forget tokens still in flight (the request finished or was cancelled meanwhile)."""
        if self.num_pending_tokens:
            del self.output_token_ids[-self.num_pending_tokens :]
            self.num_pending_tokens = 0

    def num_blocks_needed(self, block_size: int, num_tokens: int | None = None) -> int:
        n = self.num_tokens if num_tokens is None else num_tokens
        return (n + block_size - 1) // block_size
