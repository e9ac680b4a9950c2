"""SimulatedEngine keeps LLMEngine's contract: one token per running sequence per step,
contiguous indices, text that concatenates to generated_text, capacity, abort, resume."""

from __future__ import annotations

import subprocess
import sys

import pytest

from tokenfleet.engine.errors import ValidationError
from tokenfleet.engine.outputs import FinishReason
from tokenfleet.engine.sampling_params import SamplingParams
from tokenfleet.engine.simulated_engine import EOS_TOKEN_ID, SimulatedEngine


def _run(engine: SimulatedEngine) -> dict:
    tokens: dict = {}
    finals: dict = {}
    while engine.has_unfinished():
        for out in engine.step():
            tokens.setdefault(out.request_id, []).extend(out.tokens)
            if out.finished:
                finals[out.request_id] = out
    return {rid: (tokens.get(rid, []), finals[rid]) for rid in finals}


def test_tokens_are_deterministic_contiguous_and_concatenate_to_the_text():
    runs = []
    for _ in range(2):
        engine = SimulatedEngine(step_time_s=0)
        engine.add_request("a", engine.tokenizer.encode("hello world"),
                           SamplingParams(max_new_tokens=6))
        runs.append(_run(engine)["a"])
    (tokens, final), (tokens2, _) = runs
    assert [t.id for t in tokens] == [t.id for t in tokens2]
    assert [t.index for t in tokens] == list(range(6))
    assert "".join(t.text for t in tokens) == final.generated_text
    assert final.finish_reason is FinishReason.LENGTH
    assert (final.num_prompt_tokens, final.num_generated_tokens) == (2, 6)


def test_capacity_batches_at_most_max_num_seqs():
    engine = SimulatedEngine(step_time_s=0, max_num_seqs=2)
    assert engine.capacity().num_free_seqs == 2
    for i in range(3):
        engine.add_request(f"r{i}", [5, 6], SamplingParams(max_new_tokens=2))
    assert engine.capacity().num_free_seqs == 0
    first = engine.step()
    assert sorted(o.request_id for o in first) == ["r0", "r1"]
    assert engine.stats()["num_waiting"] == 1
    assert set(_run(engine)) == {"r0", "r1", "r2"}
    assert engine.capacity().num_free_seqs == 2 and engine.stats()["kv_usage"] == 0


def test_abort_finishes_with_cancelled_in_the_next_step():
    engine = SimulatedEngine(step_time_s=0)
    engine.add_request("a", [1, 2], SamplingParams(max_new_tokens=50))
    engine.step()
    assert engine.abort("a") and not engine.abort("missing")
    (out,) = engine.step()
    assert out.finished and out.finish_reason is FinishReason.CANCELLED and out.tokens == []
    assert not engine.has_unfinished()


def test_resume_continues_the_same_token_stream():
    full_engine = SimulatedEngine(step_time_s=0)
    full_engine.add_request("a", [3, 4, 5], SamplingParams(max_new_tokens=8, seed=1,
                                                           do_sample=True))
    full, _ = _run(full_engine)["a"]
    resumed_engine = SimulatedEngine(step_time_s=0)
    resumed_engine.add_request("a", [3, 4, 5], SamplingParams(max_new_tokens=8, seed=1,
                                                              do_sample=True),
                               resume_token_ids=[t.id for t in full[:3]])
    rest, final = _run(resumed_engine)["a"]
    assert [t.index for t in rest] == list(range(3, 8))
    assert [t.id for t in rest] == [t.id for t in full[3:]]
    assert final.num_generated_tokens == 8


def test_validation_errors_like_llm_engine():
    engine = SimulatedEngine(step_time_s=0, max_model_len=10)
    with pytest.raises(ValidationError, match="empty"):
        engine.add_request("a", [], SamplingParams())
    with pytest.raises(ValidationError, match="must be <= 10"):
        engine.add_request("a", [1] * 8, SamplingParams(max_new_tokens=5))
    engine.add_request("a", [1], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValidationError, match="duplicate"):
        engine.add_request("a", [1], SamplingParams(max_new_tokens=2))


def test_eos_and_stop_sequences():
    engine = SimulatedEngine(step_time_s=0, eos_at=2)
    engine.add_request("eos", [1], SamplingParams(max_new_tokens=9))
    engine.add_request("ignore", [1], SamplingParams(max_new_tokens=4, ignore_eos=True))
    done = _run(engine)
    tokens, final = done["eos"]
    assert final.finish_reason is FinishReason.EOS_TOKEN
    assert tokens[-1].id == EOS_TOKEN_ID and tokens[-1].special and tokens[-1].text == ""
    assert done["ignore"][1].finish_reason is FinishReason.LENGTH

    probe = SimulatedEngine(step_time_s=0)
    probe.add_request("p", [1], SamplingParams(max_new_tokens=3))
    second_word = _run(probe)["p"][0][1].text.strip()
    engine = SimulatedEngine(step_time_s=0)
    engine.add_request("s", [1], SamplingParams(max_new_tokens=9, stop=[second_word]))
    tokens, final = _run(engine)["s"]
    assert final.finish_reason is FinishReason.STOP_SEQUENCE
    assert second_word not in final.generated_text
    assert "".join(t.text for t in tokens) == final.generated_text


def test_importing_it_does_not_import_torch():
    # Fleet tests and the producer-side CLI run without torch.
    code = ("import sys, tokenfleet.engine.simulated_engine; "
            "assert 'torch' not in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
