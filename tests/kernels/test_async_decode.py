"""Asynchronous decode (step N+1 queued before step N's tokens are read) changes no output.

The same traffic — arrivals mid-run, an abort while a step is in flight, a request that ends
by a stop token id at an arbitrary point (found out only after the next step was queued), a
stop string, seeded sampling with top tokens, a penalty (which forces synchronous steps),
length limits — runs three ways: asynchronous, graph path synchronous, and eager. Every
request must get the same tokens, log-probs, text and finish reason, and the cache must end
empty. On CPU the graph path runs its static buffers eagerly (Triton interpreted); on a CUDA
machine it captures and replays real graphs.
"""

from __future__ import annotations

import json
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
import torch

from tokenfleet.engine import LLMEngine, SamplingParams
from tokenfleet.engine.sequence import PENDING_TOKEN

Traffic = dict[int, list[tuple[str, list[int], SamplingParams]]]
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _engine(model_dir: Path, *, graphs: bool, async_decode: bool) -> LLMEngine:
    on_cuda = DEVICE == "cuda"  # there: real CUDA graphs, captured by the engine itself
    engine = LLMEngine.from_model(str(model_dir), dtype="float32", block_size=4,
                                  num_kv_blocks=160, attention_backend="triton", max_num_seqs=8,
                                  device=DEVICE, async_decode=async_decode,
                                  cuda_graph_max_batch=8 if graphs else 0)
    if graphs and not on_cuda:
        runner = engine.runner.make_graph_runner(use_graphs=False)
        runner.capture_all()
        engine.runner.graph_runner = runner
    return engine


def _drive(engine: LLMEngine, traffic: Traffic, aborts: dict[int, str]
           ) -> tuple[dict[str, list[Any]], dict[str, Any]]:
    tokens: dict[str, list[Any]] = defaultdict(list)
    finals: dict[str, Any] = {}
    step = 0
    while step <= max(traffic) or engine.has_unfinished():
        for request_id, prompt, params in traffic.get(step, []):
            engine.add_request(request_id, prompt, params)
        if step in aborts:
            assert engine.abort(aborts[step])
        for out in engine.step():
            tokens[out.request_id].extend(out.tokens)
            if out.finished:
                finals[out.request_id] = out
        step += 1
        assert step < 500
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert not engine.has_unfinished()
    return tokens, finals


def _traffic(stop_id: int | None, stop_text: str | None) -> Traffic:
    g = torch.Generator().manual_seed(9)
    p = [torch.randint(3, 40000, (n,), generator=g).tolist() for n in (5, 11, 3, 8, 6, 9, 4)]
    greedy = SamplingParams(max_new_tokens=12, ignore_eos=True)
    return {
        0: [("greedy", p[0], greedy),
            ("stop-id", p[1], SamplingParams(max_new_tokens=14, ignore_eos=True,
                                             stop_token_ids=[stop_id] if stop_id else [])),
            ("sampled", p[2], SamplingParams(max_new_tokens=10, ignore_eos=True, seed=7,
                                             temperature=0.9, top_p=0.9, top_n_tokens=3)),
            ("aborted", p[3], SamplingParams(max_new_tokens=30, ignore_eos=True))],
        3: [("late", p[4], SamplingParams(max_new_tokens=9, ignore_eos=True)),
            ("stop-text", p[5], SamplingParams(max_new_tokens=14, ignore_eos=True,
                                               stop=[stop_text] if stop_text else []))],
        # Arrives after the others are done: a penalty makes every step synchronous.
        30: [("penalty", p[6], SamplingParams(max_new_tokens=6, ignore_eos=True,
                                             repetition_penalty=1.3))],
    }


def _stop_points(model_dir: Path) -> tuple[int, str]:
    """A token id and a text that the stop-id / stop-text requests really produce mid-way."""
    traffic = _traffic(stop_id=None, stop_text=None)
    engine = _engine(model_dir, graphs=False, async_decode=False)
    tokens, finals = _drive(engine, traffic, {})
    # Both stops land after the last arrival, while steps are queued behind each other.
    stop_id = tokens["stop-id"][8].id
    assert stop_id not in [t.id for t in tokens["stop-id"][:8]]
    text = finals["stop-text"].generated_text
    cut = len("".join(t.text for t in tokens["stop-text"][:7]))
    return stop_id, text[cut - 2 : cut + 1] if cut >= 2 else text[:3]


def test_async_decode_changes_no_output(tiny_llama_dir: Path) -> None:
    stop_id, stop_text = _stop_points(tiny_llama_dir)
    traffic = _traffic(stop_id, stop_text)
    aborts = {6: "aborted"}
    runs = {}
    for name, graphs, async_decode in (("eager", False, False), ("graphs", True, False),
                                       ("async", True, True)):
        engine = _engine(tiny_llama_dir, graphs=graphs, async_decode=async_decode)
        launches: list[bool] = []
        launch = engine.runner.launch_decode

        def spy(seqs: Any, prev: Any = None, launch: Any = launch, log: Any = launches) -> Any:
            log.append(prev is not None)
            return launch(seqs, prev)
        engine.runner.launch_decode = spy  # type: ignore[method-assign]
        runs[name] = _drive(engine, traffic, aborts)
        assert any(launches) == (name == "async")  # steps queued behind a step in flight

    ref_tokens, ref_finals = runs["eager"]
    assert ref_finals["stop-id"].finish_reason.value == "stop_sequence"
    assert ref_finals["stop-text"].finish_reason.value == "stop_sequence"
    for name in ("graphs", "async"):
        tokens, finals = runs[name]
        for request_id, final in ref_finals.items():
            if request_id == "aborted":
                continue
            got = tokens[request_id]
            want = ref_tokens[request_id]
            assert [t.id for t in got] == [t.id for t in want], (name, request_id)
            assert [t.index for t in got] == list(range(len(got)))
            assert [t.text for t in got] == [t.text for t in want]
            assert [t.logprob for t in got] == pytest.approx([t.logprob for t in want],
                                                             abs=1e-4)
            assert [[x.id for x in t.top_tokens] for t in got] == \
                [[x.id for x in t.top_tokens] for t in want]
            assert finals[request_id].finish_reason == final.finish_reason
            assert finals[request_id].generated_text == final.generated_text
            assert finals[request_id].num_generated_tokens == len(got)
        # Cancelled mid-flight: a prefix of the full answer, and the count agrees with it.
        aborted = tokens["aborted"]
        assert finals["aborted"].finish_reason.value == "cancelled"
        assert finals["aborted"].num_generated_tokens == len(aborted) > 0
        assert PENDING_TOKEN not in [t.id for t in aborted]


def _finish_all(engine: LLMEngine, late: tuple[int, str, list[int], SamplingParams] | None
                ) -> tuple[dict[str, list[Any]], dict[str, Any], int]:
    """Step to the end, adding `late` at its step; returns tokens, finals, failed steps."""
    got: dict[str, list[Any]] = defaultdict(list)
    finals: dict[str, Any] = {}
    num_failures = 0
    for step in range(200):
        if late is not None and step == late[0]:
            engine.add_request(*late[1:])
        try:
            outputs = engine.step()
        except RuntimeError:
            num_failures += 1
            continue
        for out in outputs:
            got[out.request_id].extend(out.tokens)
            if out.finished:
                finals[out.request_id] = out
        if not engine.has_unfinished() and (late is None or step > late[0]):
            break
    return got, finals, num_failures


def test_a_failed_step_loses_nothing(tiny_llama_dir: Path) -> None:
    """step() raising (here: queuing the next decode, then a prefill) leaves the engine
    usable: no token is lost, none is duplicated, no placeholder leaks, the cache empties."""
    g = torch.Generator().manual_seed(4)
    prompts = [torch.randint(3, 40000, (n,), generator=g).tolist() for n in (4, 9, 6)]
    params = SamplingParams(max_new_tokens=10, ignore_eos=True)
    reference = _engine(tiny_llama_dir, graphs=False, async_decode=False)
    for i, prompt in enumerate(prompts):
        reference.add_request(f"r{i}", prompt, params)
    _, want, _ = _finish_all(reference, None)

    engine = _engine(tiny_llama_dir, graphs=True, async_decode=True)
    runner = engine.runner
    launch, run = runner.launch_decode, runner.run
    calls = {"launch": 0, "run": 0}

    def flaky_launch(seqs: Any, prev: Any = None) -> Any:
        calls["launch"] += 1
        if calls["launch"] == 4 and prev is not None:
            raise RuntimeError("injected: queuing the next decode failed")
        return launch(seqs, prev)

    def flaky_run(batch: Any) -> Any:
        calls["run"] += 1
        if calls["run"] == 2:  # the late request's prefill, after a resolve
            raise RuntimeError("injected: prefill failed")
        return run(batch)
    runner.launch_decode = flaky_launch  # type: ignore[method-assign]
    runner.run = flaky_run  # type: ignore[method-assign]
    for i, prompt in enumerate(prompts[:2]):
        engine.add_request(f"r{i}", prompt, params)
    got, finals, num_failures = _finish_all(engine, (6, "r2", prompts[2], params))
    assert num_failures == 2
    assert {k: v.generated_text for k, v in finals.items()} == \
        {k: v.generated_text for k, v in want.items()}
    for request_id, tokens in got.items():
        assert [t.index for t in tokens] == list(range(10)), request_id
        assert PENDING_TOKEN not in [t.id for t in tokens]
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_grammar_rows_among_graph_replayed_and_async_steps(tiny_llama_dir: Path) -> None:
    """Grammar rows (their masks built on the host, sent packed to the device on a GPU) in a
    batch that would otherwise run asynchronously: the same tokens as the eager engine, and
    each answer fits its regex. On a CUDA machine: real graphs, device-side unpacking."""
    pytest.importorskip("llguidance")
    import re

    pattern = r"[A-Z][a-z]{2,6}-\d{3}"
    traffic: Traffic = {0: [(f"g{i}", [5 + i, 9, 13, 17], SamplingParams(
        max_new_tokens=30, grammar={"type": "regex", "value": pattern},
        **({"do_sample": True, "seed": i} if i % 2 else {}))) for i in range(3)]}
    traffic[0] += [("plain", [7, 8], SamplingParams(max_new_tokens=12, ignore_eos=True))]
    traffic[4] = [("late", [11, 12, 13], SamplingParams(
        max_new_tokens=30, grammar={"type": "json", "value": {"type": "array", "items": {
            "enum": ["a", "b"]}, "minItems": 3, "maxItems": 3}}))]
    runs = {name: _drive(_engine(tiny_llama_dir, graphs=graphs, async_decode=async_decode),
                         traffic, {})
            for name, graphs, async_decode in (("eager", False, False), ("async", True, True))}
    (eager_tokens, eager_finals), (tokens, finals) = runs["eager"], runs["async"]
    for request_id, final in eager_finals.items():
        assert [t.id for t in tokens[request_id]] == [t.id for t in eager_tokens[request_id]]
        assert finals[request_id].generated_text == final.generated_text
    for i in range(3):
        assert re.fullmatch(pattern, finals[f"g{i}"].generated_text)
    assert len(json.loads(finals["late"].generated_text)) == 3
