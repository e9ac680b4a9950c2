"""LLMEngine behaviour on a tiny random model: batching, preemption, prefix cache, seeds,
stops, aborts, limits. After every test the block manager must be back to all-free."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from tokenfleet.engine import LLM, LLMEngine, SamplingParams
from tokenfleet.engine.errors import ValidationError


@pytest.fixture(scope="module")
def tiny_dir(tiny_llama_dir: Path) -> Path:
    return tiny_llama_dir


def _engine(model_dir: Path, **kw: Any) -> LLMEngine:
    args: dict[str, Any] = {"dtype": "float32", "block_size": 4, "num_kv_blocks": 512}
    args.update(kw)
    return LLMEngine.from_model(str(model_dir), **args)


def _run(engine: LLMEngine) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            got = tokens.setdefault(out.request_id, [])
            for t in out.tokens:
                assert t.index == len(got), "indices must be contiguous from 0"
                got.append(t.id)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return tokens


def _prompts(lengths: list[int], seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 40000, (n,), generator=g).tolist() for n in lengths]


@pytest.fixture
def alone(tiny_dir: Path) -> Iterator[LLMEngine]:
    yield _engine(tiny_dir)


def test_batch_invariance_with_preemption_and_chunked_prefill(tiny_dir: Path,
                                                              alone: LLMEngine) -> None:
    lengths = [10, 700, 35, 220, 64, 480, 15, 333, 90, 12, 650, 128,
               47, 300, 25, 410, 77, 19, 560, 150, 60, 240, 31, 99]
    prompts = _prompts(lengths)
    params = SamplingParams(max_new_tokens=24, ignore_eos=True)
    expected = {}
    for i, p in enumerate(prompts):
        alone.add_request(f"r{i}", p, params)
        expected.update(_run(alone))
    # 8 sequences at most, a KV budget far below 8 x 700 tokens, a small token budget.
    busy = _engine(tiny_dir, max_num_seqs=8, num_kv_blocks=260, max_num_batched_tokens=256)
    for i, p in enumerate(prompts):
        busy.add_request(f"r{i}", p, params)
    assert _run(busy) == expected
    assert busy.scheduler.num_preemptions > 0, "the KV budget should have forced preemption"
    assert busy.num_prefilled_tokens > sum(lengths), "preempted work is recomputed"


def test_prefix_cache_reuses_blocks_and_keeps_output(alone: LLMEngine) -> None:
    shared = _prompts([200])[0]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    alone.add_request("first", [*shared, 11, 12], params)
    first = _run(alone)["first"]
    before = alone.num_prefilled_tokens
    alone.add_request("second", [*shared, 11, 12], params)
    second = _run(alone)["second"]
    assert second == first
    assert alone.block_manager.num_prefix_hits >= 200 // 4
    assert alone.num_prefilled_tokens - before < 20  # only the tail was prefilled


def test_prefix_cache_off_gives_same_tokens(tiny_dir: Path, alone: LLMEngine) -> None:
    prompt = _prompts([100])[0]
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    nocache = _engine(tiny_dir, enable_prefix_caching=False)
    for engine in (alone, nocache):
        engine.add_request("a", prompt, params)
        engine.add_request("b", prompt, params)
    assert _run(alone) == _run(nocache)
    assert nocache.block_manager.num_prefix_hits == 0


def test_seeded_sampling_is_batch_independent(alone: LLMEngine, tiny_dir: Path) -> None:
    prompt = _prompts([30])[0]
    sampled = SamplingParams(max_new_tokens=16, do_sample=True, temperature=1.5, top_p=0.95,
                             seed=1234, ignore_eos=True)
    alone.add_request("solo", prompt, sampled)
    solo = _run(alone)["solo"]
    busy = _engine(tiny_dir, max_num_batched_tokens=64)
    for i, p in enumerate(_prompts([50, 7, 90, 33], seed=5)):
        busy.add_request(f"noise{i}", p, SamplingParams(max_new_tokens=20, do_sample=True,
                                                        ignore_eos=True))
    busy.add_request("solo", prompt, sampled)
    other = SamplingParams(max_new_tokens=16, do_sample=True, temperature=1.5, top_p=0.95,
                           seed=4321, ignore_eos=True)
    busy.add_request("other-seed", prompt, other)
    result = _run(busy)
    assert result["solo"] == solo
    assert result["other-seed"] != solo


def test_resume_continues_the_same_stream(alone: LLMEngine) -> None:
    prompt = _prompts([40])[0]
    params = SamplingParams(max_new_tokens=20, do_sample=True, seed=7, ignore_eos=True)
    alone.add_request("full", prompt, params)
    full = _run(alone)["full"]
    alone.add_request("resumed", prompt, params, resume_token_ids=full[:9])
    outs = []
    while alone.has_unfinished():
        outs += [t for o in alone.step() for t in o.tokens]
    assert [t.index for t in outs] == list(range(9, 20))
    assert [t.id for t in outs] == full[9:]


def test_abort_frees_blocks_and_reports_cancelled(alone: LLMEngine) -> None:
    alone.add_request("x", _prompts([100])[0], SamplingParams(max_new_tokens=50))
    alone.step()
    assert alone.block_manager.num_free_blocks < alone.block_manager.num_blocks
    assert alone.abort("x")
    assert alone.block_manager.num_free_blocks == alone.block_manager.num_blocks
    (out,) = alone.step()
    assert out.finished and out.finish_reason == "cancelled"
    assert not alone.has_unfinished() and not alone.abort("x")


def test_min_new_tokens_and_stop_token_ids(alone: LLMEngine) -> None:
    llm_params = SamplingParams(max_new_tokens=12, ignore_eos=True)
    prompt = _prompts([20])[0]
    alone.add_request("free", prompt, llm_params)
    free = _run(alone)["free"]
    stop_at = free[5]
    alone.add_request("stopped", prompt, SamplingParams(max_new_tokens=12, ignore_eos=True,
                                                        stop_token_ids=[stop_at]))
    outs = []
    while alone.has_unfinished():
        outs += alone.step()
    assert outs[-1].finish_reason == "stop_sequence"
    assert outs[-1].num_generated_tokens == free.index(stop_at) + 1


def test_stop_sequence_text_is_cut_exactly(smollm2_dir: Path) -> None:
    llm = LLM(str(smollm2_dir), dtype="float32")
    prompt = "What is the capital of France?"
    base = llm.generate(prompt, SamplingParams(max_new_tokens=12), chat=True)[0].text
    assert "Paris" in base
    for stop in ("Paris", "capital of", "aris.", base[:1]):
        out = llm.generate(prompt, SamplingParams(max_new_tokens=12, stop=[stop]), chat=True)[0]
        assert out.finish_reason == "stop_sequence"
        assert out.text == base[: base.index(stop)]
    near_miss = llm.generate(prompt, SamplingParams(max_new_tokens=12, stop=["Parisian"]),
                             chat=True)[0]
    assert near_miss.text == base  # held back while undecided, then released


def test_invalid_requests_raise_and_change_nothing(alone: LLMEngine) -> None:
    bad = [([], SamplingParams()), ([1, 2, 10**9], SamplingParams()),
           (list(range(3, 1000)), SamplingParams(max_new_tokens=100))]
    for prompt, params in bad:
        with pytest.raises(ValidationError):
            alone.add_request("bad", prompt, params)
    with pytest.raises(ValidationError):
        SamplingParams(max_new_tokens=0)
    with pytest.raises(ValidationError):
        SamplingParams(top_p=1.5)
    assert not alone.has_unfinished()
    alone.add_request("ok", [5, 6, 7], SamplingParams(max_new_tokens=2))
    with pytest.raises(ValidationError):
        alone.add_request("ok", [5, 6, 7], SamplingParams(max_new_tokens=2))
    assert len(_run(alone)["ok"]) == 2


def test_truncate_keeps_the_last_tokens(alone: LLMEngine) -> None:
    prompt = _prompts([300])[0]
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    alone.add_request("tail", prompt[-50:], params)
    alone.add_request("trunc", prompt, SamplingParams(max_new_tokens=6, ignore_eos=True,
                                                      truncate=50))
    result = _run(alone)
    assert result["trunc"] == result["tail"]


def test_capacity_reports_free_room(alone: LLMEngine) -> None:
    cap = alone.capacity()
    assert cap.num_free_blocks == alone.block_manager.num_blocks
    assert cap.num_admissible_tokens == cap.num_free_blocks * 4
    alone.add_request("a", _prompts([40])[0], SamplingParams(max_new_tokens=4))
    after = alone.capacity()
    assert after.num_free_seqs == cap.num_free_seqs - 1
    assert after.num_free_blocks == cap.num_free_blocks - 10
    _run(alone)


def test_model_errors_are_clear(tmp_path: Path) -> None:
    from tokenfleet.engine.errors import ModelLoadError, ModelNotFoundError

    with pytest.raises(ModelNotFoundError, match="does/not/exist"):
        LLMEngine.from_model("does/not/exist")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError):
        LLMEngine.from_model(str(tmp_path))


def test_prompt_logprobs_and_top_tokens_match_transformers(tiny_dir: Path) -> None:
    transformers = pytest.importorskip("transformers")
    engine = _engine(tiny_dir, max_num_batched_tokens=16)  # prompt spans several chunks
    prompt = _prompts([40])[0]
    params = SamplingParams(max_new_tokens=3, ignore_eos=True, decoder_input_details=True,
                            top_n_tokens=5)
    engine.add_request("p", prompt, params)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    final = outs[-1]
    hf = transformers.AutoModelForCausalLM.from_pretrained(tiny_dir, torch_dtype=torch.float32)
    with torch.inference_mode():
        logp = torch.log_softmax(hf(torch.tensor([prompt])).logits[0].float(), -1)  # [L, V]
    expected = [logp[p - 1, prompt[p]].item() for p in range(1, len(prompt))]
    assert [t.id for t in final.prefill] == prompt
    got = [t.logprob for t in final.prefill[1:]]
    assert got == pytest.approx(expected, abs=1e-4)
    first = outs[0].tokens[0]
    assert first.top_tokens[0].id == first.id  # greedy: the top token is chosen
    lps = [t.logprob for t in first.top_tokens]
    assert len(lps) == 5 and lps == sorted(lps, reverse=True)
    assert lps[0] == pytest.approx(logp[-1].max().item(), abs=1e-4)


def test_unavailable_attention_backend_is_a_clear_error(tiny_dir: Path) -> None:
    with pytest.raises(ValidationError, match="flash"):
        _engine(tiny_dir, attention_backend="flash_attn")
    with pytest.raises(ValidationError, match="attention_backend"):
        _engine(tiny_dir, attention_backend="cudnn")


@pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                    reason="no C compiler: the engine keeps the torch path")
def test_cpu_decode_kernel_serves_the_same_tokens_as_the_torch_path(tiny_dir: Path) -> None:
    """On CPU the decode rows go through the C kernel by default; mixed steps (prefill chunks
    next to decodes, preemption) give exactly the tokens of the gather + SDPA path."""
    lengths = [10, 300, 35, 220, 64, 5, 90, 12]
    prompts = _prompts(lengths, seed=3)
    params = SamplingParams(max_new_tokens=40, ignore_eos=True)
    results = {}
    for use_kernel in (True, False):
        engine = _engine(tiny_dir, max_num_seqs=4, num_kv_blocks=200,
                         max_num_batched_tokens=128, cpu_attention_kernel=use_kernel)
        assert engine.attention_path == ("torch+c_decode" if use_kernel else "torch")
        for i, p in enumerate(prompts):
            engine.add_request(f"r{i}", p, params)
        results[use_kernel] = _run(engine)
    assert results[True] == results[False]


def test_logit_bias_forces_and_bans_tokens_for_its_row_only(tiny_dir: Path) -> None:
    """OpenAI's logit_bias: +100 makes a token the greedy choice at every step, -100 bans
    the token the row would have chosen; a neighbour without a bias is unchanged."""
    prompts = _prompts([12, 9, 15], seed=5)
    plain = SamplingParams(max_new_tokens=6, ignore_eos=True)
    alone = _engine(tiny_dir)
    for i, p in enumerate(prompts):
        alone.add_request(f"r{i}", p, plain)
    free = _run(alone)
    engine = _engine(tiny_dir)
    engine.add_request("forced", prompts[0], SamplingParams(
        max_new_tokens=6, ignore_eos=True, logit_bias={4242: 100.0}))
    engine.add_request("banned", prompts[1], SamplingParams(
        max_new_tokens=6, ignore_eos=True, logit_bias=dict.fromkeys(free["r1"], -100.0)))
    engine.add_request("plain", prompts[2], plain)
    got = _run(engine)
    assert got["forced"] == [4242] * 6
    assert not set(got["banned"]) & set(free["r1"])
    assert got["plain"] == free["r2"]
    with pytest.raises(ValidationError, match="logit_bias"):
        engine.add_request("oov", prompts[0], SamplingParams(logit_bias={49152: 1.0}))
    assert not engine.has_unfinished()
