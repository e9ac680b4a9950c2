"""The engine: continuous batching over a paged KV cache, usable offline (`LLM.generate`).

Heavy imports are lazy so that `import tokenfleet.engine.sampling_params` stays cheap.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from tokenfleet.engine.outputs import Capacity, Completion, FinishReason, StepOutput, TokenOutput
from tokenfleet.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from tokenfleet.engine.llm import LLM
    from tokenfleet.engine.llm_engine import LLMEngine

__all__ = [
    "LLM",
    "Capacity",
    "Completion",
    "FinishReason",
    "LLMEngine",
    "SamplingParams",
    "StepOutput",
    "TokenOutput",
]


def __getattr__(name: str) -> Any:
    if name == "LLM":
        from tokenfleet.engine.llm import LLM

        return LLM
    if name == "LLMEngine":
        from tokenfleet.engine.llm_engine import LLMEngine

        return LLMEngine
    raise AttributeError(name)
