"""What the engine hands back: per-step token outputs and finished completions.

The worker turns a `StepOutput` into wire events; `LLM.generate` turns finished ones into
`Completion`s. Every generated token gets exactly one `TokenOutput`, with a contiguous
`index` from 0; a token whose text might still turn into a stop sequence is held back and
reported in a later step (or at finish, with its text cut before the stop).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

__all__ = ["Capacity", "Completion", "FinishReason", "StepOutput", "TokenOutput", "TopToken"]


class FinishReason(StrEnum):
    LENGTH = "length"
    EOS_TOKEN = "eos_token"
    STOP_SEQUENCE = "stop_sequence"
    CANCELLED = "cancelled"
    DEADLINE = "deadline_exceeded"
    # The request failed mid-generation; `StepOutput.error` says why (the worker sends an
    # `error` event of type generation instead of a final). Today: a grammar's matcher
    # that hit a parser limit, so the output could no longer follow the grammar.
    ERROR = "error"


@dataclass(frozen=True, slots=True)
class TopToken:
    id: int
    text: str
    logprob: float
    special: bool


@dataclass(frozen=True, slots=True)
class TokenOutput:
    index: int  # 0-based position among generated tokens
    id: int
    text: str  # released text; concatenating all of them gives the generated text
    logprob: float
    special: bool
    top_tokens: tuple[TopToken, ...] = ()


@dataclass(slots=True)
class StepOutput:
    request_id: str
    tokens: list[TokenOutput]
    finished: bool = False
    finish_reason: FinishReason | None = None
    # Filled when finished:
    generated_text: str = ""
    num_prompt_tokens: int = 0
    num_generated_tokens: int = 0
    seed: int | None = None
    prefill: list[TokenOutput] = field(default_factory=list)  # decoder_input_details
    error: str | None = None  # with finish_reason ERROR


@dataclass(frozen=True, slots=True)
class Capacity:
    """How much more work the engine could start now (the worker pulls this much)."""

    num_free_seqs: int
    num_free_blocks: int
    num_admissible_tokens: int  # prompt tokens that fit in the free KV blocks right now
    num_waiting: int = 0
    num_running: int = 0


@dataclass(slots=True)
class Completion:
    """The result of one prompt in `LLM.generate` (mirrors vLLM's CompletionOutput)."""

    text: str
    token_ids: list[int]
    prompt_token_ids: list[int]
    finish_reason: str
    logprobs: list[float] = field(default_factory=list)
    request_id: str = ""
    error: str | None = None  # why, when finish_reason is "error"
