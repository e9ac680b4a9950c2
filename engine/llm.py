"""The offline API (mirrors vLLM): `LLM(model).generate(prompts, params) -> [Completion]`."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence
from typing import Any

from tokenfleet.engine.llm_engine import LLMEngine
from tokenfleet.engine.outputs import Completion, StepOutput
from tokenfleet.engine.sampling_params import SamplingParams

__all__ = ["LLM"]

Prompt = str | Sequence[int]


class LLM:
    """An engine in this process, no Redis. Prompts are strings or token-id lists."""

    def __init__(self, model: str, dtype: str = "bfloat16", device: str = "cpu",
                 **engine_args: Any):
        self.engine = LLMEngine.from_model(model, dtype=dtype, device=device, **engine_args)
        self.tokenizer = self.engine.tokenizer
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the engine's tensor-parallel ranks (a no-op without tensor parallelism)."""
        self.engine.close()

    def __enter__(self) -> LLM:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        if not isinstance(prompt, str):
            return list(prompt)
        if chat:
            text = self.tokenizer.apply_chat_template([{"role": "user", "content": prompt}])
            # The template already holds any BOS the model wants.
            return self.tokenizer.encode(text, add_special_tokens=False)
        return self.tokenizer.encode(prompt)

    def generate(self, prompts: Prompt | Sequence[Prompt],
                 params: SamplingParams | Sequence[SamplingParams] | None = None,
                 chat: bool = False) -> list[Completion]:
        """Run every prompt to completion (continuous batching inside); keep input order."""
        prompt_list = _as_prompt_list(prompts)
        if params is None:
            params = SamplingParams()
        param_list = ([params] * len(prompt_list) if isinstance(params, SamplingParams)
                      else list(params))
        if len(param_list) != len(prompt_list):
            raise ValueError("params must be one SamplingParams or one per prompt")
        order: dict[str, int] = {}
        token_ids: list[list[int]] = []
        for i, (prompt, p) in enumerate(zip(prompt_list, param_list, strict=True)):
            rid = f"offline-{next(self._ids)}"
            ids = self.encode(prompt, chat)
            self.engine.add_request(rid, ids, p)
            order[rid] = i
            token_ids.append(ids)
        results: list[Completion | None] = [None] * len(prompt_list)
        collected: dict[str, list[StepOutput]] = {rid: [] for rid in order}
        while self.engine.has_unfinished():
            for out in self.engine.step():
                collected[out.request_id].append(out)
                if out.finished:
                    results[order[out.request_id]] = _completion(
                        out.request_id, collected.pop(out.request_id),
                        token_ids[order[out.request_id]])
        done = [r for r in results if r is not None]
        assert len(done) == len(results), "the engine stopped with unfinished requests"
        return done

    def stream(self, prompt: Prompt, params: SamplingParams | None = None,
               chat: bool = False) -> Iterator[StepOutput]:
        """Yield each step's output for one prompt as soon as it is decoded."""
        rid = f"offline-{next(self._ids)}"
        self.engine.add_request(rid, self.encode(prompt, chat), params or SamplingParams())
        while self.engine.has_unfinished():
            for out in self.engine.step():
                if out.request_id == rid:
                    yield out


def _as_prompt_list(prompts: Prompt | Sequence[Prompt]) -> list[Prompt]:
    """One prompt (a string or a list of token ids) or a list of prompts -> list of prompts."""
    if isinstance(prompts, str):
        return [prompts]
    items: list[object] = list(prompts)
    if items and all(isinstance(t, int) for t in items):
        return [[int(t) for t in items if isinstance(t, int)]]
    out: list[Prompt] = []
    for p in items:
        if not isinstance(p, str | list | tuple):
            raise TypeError(f"a prompt is a string or a list of token ids, not {type(p).__name__}")
        out.append(p)
    return out


def _completion(rid: str, outs: list[StepOutput], prompt_ids: list[int]) -> Completion:
    tokens = [t for o in outs for t in o.tokens]
    final = outs[-1]
    return Completion(
        text=final.generated_text,
        token_ids=[t.id for t in tokens],
        prompt_token_ids=prompt_ids,
        finish_reason=final.finish_reason.value if final.finish_reason else "length",
        logprobs=[t.logprob for t in tokens],
        request_id=rid,
        error=final.error,
    )
