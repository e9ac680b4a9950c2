"""The fleet with the real engine on SmolLM2: what streams through Redis is exactly what the
engine generates offline (greedy, float32)."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from text_generation.types import StreamResponse

from tokenfleet.engine.llm import LLM
from tokenfleet.engine.sampling_params import SamplingParams
from tokenfleet.producer.protocol import FinalEvent, encode

pytestmark = pytest.mark.slow

PROMPTS = ["What is the capital of France?", "Name a primary colour.", "Say hello."]


async def test_streams_match_offline_generation(fleet, smollm2_dir: Path):
    offline = LLM(str(smollm2_dir), dtype="float32").generate(
        PROMPTS, SamplingParams(max_new_tokens=12), chat=True)

    async def ask(client, prompt: str) -> list:
        return [e async for e in client.generate_stream(
            messages=[{"role": "user", "content": prompt}], max_new_tokens=12, details=True)]

    async with fleet.worker(engine="llm", model=str(smollm2_dir), dtype="float32",
                            max_num_seqs=4), fleet.client() as client:
        runs = await asyncio.wait_for(
            asyncio.gather(*(ask(client, p) for p in PROMPTS)), 300)

    for events, expected in zip(runs, offline, strict=True):
        final = events[-1]
        assert isinstance(final, FinalEvent)
        assert [e.index for e in events] == list(range(len(events)))
        assert "".join(e.token.text for e in events) == final.generated_text
        assert final.generated_text == expected.text
        assert [t.id for t in final.details.tokens] == expected.token_ids
        assert final.details.finish_reason == expected.finish_reason
        for event in events:
            StreamResponse(**json.loads(encode(event)))
    assert "Paris" in runs[0][-1].generated_text


TINY_PROMPTS = ["one two three", "four five", "six"]


def _tiny_model_and_offline(tmp_path: Path, make_tiny_llama) -> tuple[Path, list[str], list]:
    """A tiny random model, prompts, and what the offline float32 engine generates for them."""
    model_dir = make_tiny_llama(tmp_path)
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    return model_dir, TINY_PROMPTS, LLM(str(model_dir), dtype="float32").generate(
        TINY_PROMPTS, params)


async def _ask(client, prompt: str) -> list:
    return [e async for e in client.generate_stream(prompt, max_new_tokens=10,
                                                     ignore_eos=True, details=True)]


async def test_a_compiled_cpu_worker_streams_what_the_eager_engine_generates(
        fleet, tmp_path: Path, make_tiny_llama):
    """TOKENFLEET_CPU_COMPILE through the worker: settings -> engine factory -> the engine
    thread running compiled decode steps; float32, so tokens must equal eager's exactly."""
    model_dir, prompts, offline = _tiny_model_and_offline(tmp_path, make_tiny_llama)

    async with fleet.worker(engine="llm", model=str(model_dir), dtype="float32",
                            max_num_seqs=4, cpu_compile=True) as worker, \
            fleet.client() as client:
        runs = await asyncio.wait_for(asyncio.gather(*(_ask(client, p) for p in prompts)), 300)
        engine = worker._engine_thread.engine
        assert engine.runner.compiled_decode.num_steps > 0  # decode steps were compiled ones
    for events, expected in zip(runs, offline, strict=True):
        assert [t.id for t in events[-1].details.tokens] == expected.token_ids

