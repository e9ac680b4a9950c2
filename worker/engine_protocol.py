"""What the worker needs from an engine: `LLMEngine` and `SimulatedEngine` both fit."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol

from tokenfleet.engine.outputs import Capacity, StepOutput
from tokenfleet.engine.sampling_params import SamplingParams

__all__ = ["EngineConfigLike", "EngineLike", "GrammarPreparer", "TokenizerLike"]


class TokenizerLike(Protocol):
    eos_token_ids: frozenset[int]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]: ...

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str: ...

    def apply_chat_template(self, messages: list[dict[str, str]],
                            add_generation_prompt: bool = True) -> str: ...


class GrammarPreparer(Protocol):
    """`LLMEngine.grammars`: compiles a request's grammar ahead of `add_request` (thread-safe),
    raising ValueError when it does not compile."""

    def prepare(self, grammar: Any) -> None: ...


class EngineConfigLike(Protocol):
    @property
    def max_model_len(self) -> int: ...

    @property
    def model_name(self) -> str: ...


class EngineLike(Protocol):
    """The engine interface; not thread-safe: only the engine thread calls it."""

    @property
    def tokenizer(self) -> Any: ...

    @property
    def config(self) -> Any: ...

    def add_request(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
                    *, resume_token_ids: Sequence[int] = ()) -> None: ...

    def abort(self, request_id: str) -> bool: ...

    def step(self) -> list[StepOutput]: ...

    def has_unfinished(self) -> bool: ...

    def capacity(self) -> Capacity: ...

    def stats(self) -> dict[str, Any]: ...
