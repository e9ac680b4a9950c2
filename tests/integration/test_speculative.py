"""Speculative decoding (n-gram drafts, `speculate`): the same tokens as plain decoding, in
fewer steps, on real weights (SmolLM2, float32) and on a tiny random model; drafts stop at
stops, EOS and max_new_tokens exactly where plain decoding stops; rows that may not
speculate (grammar, penalties) are untouched; every KV block comes back."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest
import torch

from tokenfleet.engine import LLMEngine, SamplingParams

pytestmark = pytest.mark.slow


def _run(model_dir: Path, prompts: list[list[int]], params: list[SamplingParams],
         **engine_args: Any) -> tuple[dict[str, Any], int, dict[str, Any]]:
    """{request id: (token ids, logprobs, top token ids, finish reason, text)}, steps, stats."""
    args: dict[str, Any] = {"dtype": "float32", "block_size": 4, "num_kv_blocks": 1024}
    engine = LLMEngine.from_model(str(model_dir), **{**args, **engine_args})
    for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
        engine.add_request(f"r{i}", prompt, p)
    got: dict[str, Any] = {}
    num_steps = 0
    while engine.has_unfinished():
        num_steps += 1
        for out in engine.step():
            ids, lps, tops, _ = got.setdefault(out.request_id, ([], [], [], None))
            indices = [t.index for t in out.tokens]
            assert indices == list(range(len(ids), len(ids) + len(indices)))
            ids += [t.id for t in out.tokens]
            lps += [t.logprob for t in out.tokens]
            tops += [[top.id for top in t.top_tokens] for t in out.tokens]
            if out.finished:
                got[out.request_id] = (ids, lps, tops, (out.finish_reason, out.generated_text))
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return got, num_steps, engine.stats()


def _assert_same(plain: dict[str, Any], spec: dict[str, Any]) -> None:
    assert plain.keys() == spec.keys()
    for rid, (ids, lps, tops, final) in plain.items():
        s_ids, s_lps, s_tops, s_final = spec[rid]
        assert s_ids == ids, rid
        assert s_final == final, rid
        assert s_tops == tops, rid
        # A (k+1)-row forward adds in another order than k+1 one-row forwards: the same
        # tokens, log-probs within float32 noise.
        assert all(math.isclose(a, b, abs_tol=1e-4) for a, b in zip(s_lps, lps, strict=True))


def _repetitive_prompts(seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    phrase = torch.randint(3, 2000, (12,), generator=g).tolist()
    return [phrase * 4, phrase * 3 + [5, 6, 7], list(range(10, 40)) * 2, phrase * 5]


def test_same_tokens_in_fewer_steps_on_smollm2(smollm2_dir: Path) -> None:
    prompts = _repetitive_prompts(0)
    params = [SamplingParams(max_new_tokens=40, ignore_eos=True),
              SamplingParams(max_new_tokens=33, temperature=0.8, seed=3, ignore_eos=True),
              SamplingParams(max_new_tokens=25, top_n_tokens=3, min_new_tokens=10),
              SamplingParams(max_new_tokens=30, temperature=1.0, top_p=0.9, seed=7)]
    plain, plain_steps, _ = _run(smollm2_dir, prompts, params)
    spec, spec_steps, stats = _run(smollm2_dir, prompts, params, speculate=4)
    _assert_same(plain, spec)
    assert stats["num_accepted_draft_tokens"] > 0
    assert stats["num_draft_tokens"] >= stats["num_accepted_draft_tokens"]
    assert spec_steps < plain_steps


def test_drafts_stop_where_plain_decoding_stops(tiny_llama_dir: Path) -> None:
    """Stop sequences, stop token ids and max_new_tokens end a speculative step mid-way at
    the same token as plain decoding; min_new_tokens bans EOS at the draft's own index.
    (This random model's greedy answer to `prompt` falls into a run of one token at
    29..34, which the drafts predict.)"""
    prompt = list(range(10, 40)) * 2
    free, _, _ = _run(tiny_llama_dir, [prompt], [SamplingParams(max_new_tokens=60,
                                                                ignore_eos=True)])
    ids, _, _, (_, text) = free["r0"]
    assert len(ids) == 60 and len(set(ids[29:35])) == 1  # the run the drafts should find
    stop_text = text[-12:-9]
    params = [SamplingParams(max_new_tokens=60, stop=[stop_text], ignore_eos=True),
              SamplingParams(max_new_tokens=60, stop_token_ids=[ids[40]], ignore_eos=True),
              SamplingParams(max_new_tokens=33, ignore_eos=True),  # ends inside the run
              SamplingParams(max_new_tokens=45, min_new_tokens=31)]
    plain, _, _ = _run(tiny_llama_dir, [prompt] * 4, params)
    spec, _, stats = _run(tiny_llama_dir, [prompt] * 4, params, speculate=6)
    _assert_same(plain, spec)
    assert plain["r0"][3][0] == "stop_sequence" and plain["r1"][3][0] == "stop_sequence"
    assert len(plain["r2"][0]) == 33
    assert stats["num_accepted_draft_tokens"] > 0


def test_rows_that_may_not_speculate_are_untouched(tiny_llama_dir: Path) -> None:
    """A grammar row and a penalised row decode plainly beside speculating rows; a request
    resumed from earlier tokens continues with the same tokens."""
    prompts = _repetitive_prompts(2)
    prompts[0] = list(range(10, 40)) * 2  # one the drafts are known to predict (above)
    params = [SamplingParams(max_new_tokens=40, ignore_eos=True),
              SamplingParams(max_new_tokens=12, grammar={"type": "regex", "value": r"\d{3}-\d+"}),
              SamplingParams(max_new_tokens=30, repetition_penalty=1.3, ignore_eos=True),
              SamplingParams(max_new_tokens=30, temperature=0.7, seed=11, ignore_eos=True)]
    plain, _, _ = _run(tiny_llama_dir, prompts, params)
    spec, _, stats = _run(tiny_llama_dir, prompts, params, speculate=3, max_num_batched_tokens=8)
    _assert_same(plain, spec)
    assert stats["num_accepted_draft_tokens"] > 0

    resumed_from = plain["r3"][0][:9]
    engine = LLMEngine.from_model(str(tiny_llama_dir), dtype="float32", speculate=3)
    engine.add_request("again", prompts[3], params[3], resume_token_ids=resumed_from)
    rest: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            rest += [t.id for t in out.tokens]
    assert resumed_from + rest == plain["r3"][0]


def test_speculate_is_validated() -> None:
    from tokenfleet.engine.config import EngineConfig
    from tokenfleet.engine.errors import ValidationError

    with pytest.raises(ValidationError, match="speculate"):
        EngineConfig(model="x", speculate=17)
    with pytest.raises(ValidationError, match="speculate"):
        EngineConfig(model="x", speculate=-1)


async def test_a_speculating_worker_streams_the_same_tokens(fleet, tiny_llama_dir: Path) -> None:
    """Through the fleet (TOKENFLEET_SPECULATE): several tokens a step still reach the client
    as one event per token, in order, equal to the offline plain run; the worker counts the
    drafts it verified and accepted in its metrics."""
    from tokenfleet.engine.tokenizer import Tokenizer

    prompt = "The cat sat on the mat. " * 6  # this random model's answer repeats itself
    prompt_ids = Tokenizer.from_dir(tiny_llama_dir).encode(prompt)
    params = SamplingParams(max_new_tokens=45, ignore_eos=True)
    plain, _, _ = _run(tiny_llama_dir, [prompt_ids], [params])
    async with fleet.worker(engine="llm", model=str(tiny_llama_dir), dtype="float32",
                            device="cpu", num_threads=1, speculate=5) as worker, \
            fleet.client() as client:
        events = [e async for e in client.generate_stream(prompt, max_new_tokens=45,
                                                          ignore_eos=True)]
        registry = worker.metrics.registry
        accepted = registry.get_sample_value("tokenfleet_spec_accepted_tokens_total")
        drafted = registry.get_sample_value("tokenfleet_spec_draft_tokens_total")
    *tokens, final = events
    ids = [t.token.id for t in tokens] + [final.token.id]
    assert [t.index for t in tokens] == list(range(44))
    assert ids == plain["r0"][0]
    assert 0 < accepted <= drafted
