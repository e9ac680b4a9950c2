"""Grammar-constrained output (TGI's `grammar`): on a tiny *random* model, whose unconstrained
output is gibberish, every answer must still parse and fit its schema or regex; constrained
rows must not change their neighbours in the batch; a resumed request continues the same
constrained output; bad grammars are refused before anything changes."""

from __future__ import annotations

import asyncio
import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from tokenfleet.engine import LLMEngine, SamplingParams
from tokenfleet.engine.errors import ValidationError

SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
        "ok": {"type": "boolean"},
    },
    "required": ["name", "age", "tags", "ok"],
    "additionalProperties": False,
}
REGEX = r"[A-Z][a-z]{2,6}-\d{3}"


def _engine(model_dir: Path, **kw: Any) -> LLMEngine:
    args: dict[str, Any] = {"dtype": "float32", "block_size": 4, "num_kv_blocks": 512}
    args.update(kw)
    return LLMEngine.from_model(str(model_dir), **args)


def _run(engine: LLMEngine) -> dict[str, Any]:
    finals: dict[str, Any] = {}
    tokens: dict[str, list[int]] = {}
    while engine.has_unfinished():
        for out in engine.step():
            got = tokens.setdefault(out.request_id, [])
            got.extend(t.id for t in out.tokens)
            if out.finished:
                finals[out.request_id] = (out, got)
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    return finals


def _prompts(n: int, seed: int = 0) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(3, 40000, (int(k),), generator=g).tolist()
            for k in torch.randint(5, 60, (n,), generator=g)]


def _fits_schema(text: str) -> None:
    value = json.loads(text)
    assert set(value) == {"name", "age", "tags", "ok"}, value
    assert isinstance(value["name"], str) and len(value["name"]) <= 6
    assert type(value["age"]) is int and 0 <= value["age"] <= 120
    assert isinstance(value["tags"], list) and len(value["tags"]) <= 3
    assert all(t in ("red", "green", "blue") for t in value["tags"])
    assert isinstance(value["ok"], bool)


@pytest.mark.parametrize("sampled", [False, True])
def test_random_model_output_fits_schema_and_regex(tiny_llama_dir: Path, sampled: bool) -> None:
    engine = _engine(tiny_llama_dir)
    knobs: dict[str, Any] = {"do_sample": True, "temperature": 1.5, "seed": 7} if sampled else {}
    prompts = _prompts(8)
    for i, prompt in enumerate(prompts):
        grammar = ({"type": "json", "value": SCHEMA} if i % 2 == 0
                   else {"type": "regex", "value": REGEX})
        engine.add_request(f"r{i}", prompt, SamplingParams(max_new_tokens=120, grammar=grammar,
                                                           **knobs))
    finals = _run(engine)
    for i in range(len(prompts)):
        out, _ = finals[f"r{i}"]
        assert out.finish_reason == "eos_token", out.generated_text
        if i % 2 == 0:
            _fits_schema(out.generated_text)
        else:
            assert re.fullmatch(REGEX, out.generated_text), out.generated_text


def test_grammar_rows_do_not_change_their_neighbours(tiny_llama_dir: Path) -> None:
    prompts = _prompts(5, seed=1)
    plain = SamplingParams(max_new_tokens=16, ignore_eos=True)
    constrained = SamplingParams(max_new_tokens=80, grammar={"type": "json", "value": SCHEMA})
    alone = {}
    for i, prompt in enumerate(prompts):
        engine = _engine(tiny_llama_dir)
        engine.add_request("x", prompt, constrained if i == 2 else plain)
        alone[f"r{i}"] = _run(engine)["x"][1]
    together = _engine(tiny_llama_dir)
    for i, prompt in enumerate(prompts):
        together.add_request(f"r{i}", prompt, constrained if i == 2 else plain)
    mixed = {rid: ids for rid, (_, ids) in _run(together).items()}
    assert mixed == alone


def test_async_decode_and_static_runner_keep_the_grammar(tiny_llama_dir: Path) -> None:
    """The graph-replay path queues decode steps ahead; a grammar row must not be queued
    ahead (its mask needs the previous token), and must produce the eager path's tokens."""
    prompts = _prompts(4, seed=2)
    params = [SamplingParams(max_new_tokens=40, grammar={"type": "regex", "value": REGEX}),
              SamplingParams(max_new_tokens=12, ignore_eos=True)] * 2
    results = []
    for fast in (False, True):  # the static runner reads the triton backend's metadata
        engine = _engine(tiny_llama_dir, async_decode=fast, max_num_seqs=8,
                         attention_backend="triton")
        if fast:
            engine.runner.enable_static_decode()
        for i, (prompt, p) in enumerate(zip(prompts, params, strict=True)):
            engine.add_request(f"r{i}", prompt, p)
        results.append({rid: ids for rid, (_, ids) in _run(engine).items()})
    assert results[0] == results[1]


def test_resumed_request_continues_the_same_constrained_output(tiny_llama_dir: Path) -> None:
    prompt = _prompts(1, seed=3)[0]
    params = SamplingParams(max_new_tokens=120, do_sample=True, seed=11,
                            grammar={"type": "json", "value": SCHEMA})
    engine = _engine(tiny_llama_dir)
    engine.add_request("a", prompt, params)
    whole, ids = _run(engine)["a"]
    _fits_schema(whole.generated_text)
    k = len(ids) // 2
    resumed = _engine(tiny_llama_dir)
    resumed.add_request("a", prompt, params, resume_token_ids=ids[:k])
    _, rest = _run(resumed)["a"]
    assert ids[:k] + rest == ids


@pytest.mark.parametrize(("grammar", "message"), [
    ({"type": "regex", "value": "[a-"}, "invalid regex"),
    ({"type": "json", "value": {"type": "objectx"}}, "objectx"),
    ({"type": "json", "value": "{not json"}, "not valid JSON"),
    ({"type": "json", "value": [1, 2]}, "JSON schema object"),
    ({"type": "json_schema", "value": {"name": "x"}}, "schema"),
    ({"type": "yaml", "value": "a: 1"}, "`type` must be one of"),
    ({"type": "regex", "value": "a" * 70_000}, "longer than"),
    ({"kind": "regex"}, "must be an object"),
])
def test_bad_grammars_are_refused_and_change_nothing(tiny_llama_dir: Path, grammar: Any,
                                                     message: str) -> None:
    engine = _engine(tiny_llama_dir)
    with pytest.raises(ValidationError, match=message):
        engine.add_request("bad", [5, 6, 7], SamplingParams(max_new_tokens=5, grammar=grammar))
    assert not engine.has_unfinished()
    engine.add_request("bad", [5, 6, 7], SamplingParams(max_new_tokens=3))  # id still free
    assert len(_run(engine)["bad"][1]) == 3


def test_resume_tokens_outside_the_grammar_are_refused(tiny_llama_dir: Path) -> None:
    engine = _engine(tiny_llama_dir)
    tokenizer = engine.tokenizer
    wrong = tokenizer.encode("hello", add_special_tokens=False)
    with pytest.raises(ValidationError, match="does not match"):
        engine.add_request("a", [5, 6], SamplingParams(
            max_new_tokens=20, grammar={"type": "regex", "value": r"\d+"}),
            resume_token_ids=wrong)
    assert not engine.has_unfinished()


def test_min_new_tokens_does_not_fight_the_grammar(tiny_llama_dir: Path) -> None:
    """EOS is banned before min_new_tokens, but a complete grammar allows only EOS: the
    grammar wins and the answer is the grammar's, not a row with no allowed token."""
    engine = _engine(tiny_llama_dir)
    engine.add_request("a", [5, 6, 7], SamplingParams(
        max_new_tokens=20, min_new_tokens=10, grammar={"type": "regex", "value": r"\d{3}"}))
    out, _ = _run(engine)["a"]
    assert re.fullmatch(r"\d{3}", out.generated_text), out.generated_text
    assert out.finish_reason == "eos_token"


def test_real_model_answers_in_the_schema(smollm2_dir: Path) -> None:
    from tokenfleet.engine import LLM

    llm = LLM(str(smollm2_dir), dtype="float32")
    schema = {"type": "object", "properties": {"capital": {"type": "string"}},
              "required": ["capital"], "additionalProperties": False}
    out, = llm.generate(["What is the capital of France? Answer in JSON."], SamplingParams(
        max_new_tokens=30, grammar={"type": "json", "value": schema}), chat=True)
    assert json.loads(out.text) == {"capital": "Paris"}
    assert out.finish_reason == "eos_token"


def test_top_tokens_are_alternatives_inside_the_grammar(tiny_llama_dir: Path) -> None:
    engine = _engine(tiny_llama_dir)
    engine.add_request("a", [5, 6, 7], SamplingParams(
        max_new_tokens=5, top_n_tokens=5, grammar={"type": "regex", "value": r"[01]{4}"}))
    tokens = []
    while engine.has_unfinished():
        for out in engine.step():
            tokens += out.tokens
    assert tokens
    for token in tokens:
        assert token.top_tokens, "a grammar row still reports its alternatives"
        assert token.top_tokens[0].id == token.id  # greedy: the best allowed token
        for top in token.top_tokens:
            assert top.logprob > float("-inf")
            assert re.fullmatch(r"[01]+", top.text), top.text


def test_a_matcher_that_hits_a_parser_limit_fails_its_request_only(tiny_llama_dir: Path
                                                                   ) -> None:
    """A grammar that compiles but exhausts llguidance's lexer limits mid-answer: its
    request ends with an error (not a normal finish with text outside the grammar), its
    neighbour is untouched, and the engine goes on."""
    engine = _engine(tiny_llama_dir)
    engine.add_request("heavy", [5, 6, 7], SamplingParams(
        max_new_tokens=50, grammar={"type": "regex", "value": "(x{1000}){1000}"}))
    engine.add_request("plain", [8, 9], SamplingParams(max_new_tokens=6, ignore_eos=True))
    finals = _run(engine)
    heavy, _ = finals["heavy"]
    assert heavy.finish_reason == "error"
    assert heavy.error and "grammar" in heavy.error
    assert len(finals["plain"][1]) == 6
    engine.add_request("after", [5, 6], SamplingParams(max_new_tokens=3))
    assert len(_run(engine)["after"][1]) == 3


def test_min_new_tokens_holds_while_the_grammar_can_go_on(tiny_llama_dir: Path) -> None:
    engine = _engine(tiny_llama_dir)
    for i in range(4):
        engine.add_request(f"r{i}", [5 + i, 6, 7], SamplingParams(
            max_new_tokens=12, min_new_tokens=5, grammar={"type": "regex", "value": "[0-9]+"}))
    for out, ids in _run(engine).values():
        assert len(ids) >= 5 and re.fullmatch("[0-9]+", out.generated_text)


def test_a_request_resumed_after_its_grammar_completed_ends_at_once(tiny_llama_dir: Path
                                                                     ) -> None:
    params = SamplingParams(max_new_tokens=40, grammar={"type": "regex", "value": REGEX})
    engine = _engine(tiny_llama_dir)
    engine.add_request("a", [5, 6, 7], params)
    whole, ids = _run(engine)["a"]
    engine.add_request("b", [5, 6, 7], params, resume_token_ids=ids)
    resumed, more = _run(engine)["b"]
    assert more == [] and resumed.finish_reason == "eos_token"
    assert resumed.generated_text == whole.generated_text


def test_the_gpu_unpacking_agrees_with_the_cpu_one(tiny_llama_dir: Path) -> None:
    """On a GPU the packed bitmask is unpacked with torch shifts on the device; here the
    same function runs on the CPU against the numpy path the CPU uses."""
    from tokenfleet.engine.grammar import Grammar
    from tokenfleet.engine.grammar_compiler import grammar_masks, unpack_bits

    engine = _engine(tiny_llama_dir)
    matchers = [engine.grammars.matcher(Grammar("regex", REGEX)), None,
                engine.grammars.matcher(Grammar("json", SCHEMA))]
    vocab = engine.model_config.vocab_size
    out = grammar_masks(matchers, vocab, torch.device("cpu"))
    assert out is not None
    rows, allowed = out
    assert rows.tolist() == [0, 2]
    packed_bytes = np.packbits(allowed.numpy(), axis=1, bitorder="little")  # [2, vocab / 8]
    packed = torch.from_numpy(packed_bytes.copy()).view(torch.int32)  # [2, vocab / 32]
    assert torch.equal(unpack_bits(packed, vocab), allowed)
    assert 0 < int(allowed[0].sum()) < vocab  # a real mask: some tokens, not all
    first = {engine.tokenizer.decode([int(t)]) for t in allowed[0].nonzero().flatten()[:50]}
    assert all(text and text[0].isupper() for text in first), first


def test_a_repeated_grammar_is_compiled_once_and_each_request_gets_its_own_copy(
        tiny_llama_dir: Path) -> None:
    """The same schema spelled three ways (object, JSON string, TGI 3's json_schema) compiles
    once; the sampled requests sharing it each keep their own parser state, so every answer
    still fits. The same properties in another order are another grammar: the answer lists
    them in its schema's order."""
    engine = _engine(tiny_llama_dir)
    spellings = [{"type": "json", "value": SCHEMA}, {"type": "json", "value": json.dumps(SCHEMA)},
                 {"type": "json_schema", "value": {"name": "person", "schema": SCHEMA}}]
    for i, prompt in enumerate(_prompts(6)):
        engine.add_request(f"r{i}", prompt, SamplingParams(
            max_new_tokens=60, temperature=1.0, seed=i, grammar=spellings[i % 3]))
    reordered = {**SCHEMA, "properties": dict(reversed(list(SCHEMA["properties"].items())))}
    engine.add_request("reordered", [5, 6, 7], SamplingParams(
        max_new_tokens=60, grammar={"type": "json", "value": reordered}))
    finals = _run(engine)
    assert engine.grammars.num_compiled == 2
    for rid, (out, _ids) in finals.items():
        _fits_schema(out.generated_text)
        order = reordered if rid == "reordered" else SCHEMA
        assert list(json.loads(out.generated_text)) == list(order["properties"])
    assert len({out.generated_text for out, _ in finals.values()}) > 1  # sampled apart


def test_compiled_grammars_are_bounded_least_recently_used_first(
        tiny_llama_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tokenfleet.engine import grammar_compiler
    from tokenfleet.engine.grammar import Grammar

    monkeypatch.setattr(grammar_compiler, "MAX_CACHED_GRAMMARS", 2)
    grammars = _engine(tiny_llama_dir).grammars
    a, b, c = (Grammar("regex", p) for p in ("a+", "b+", "c+"))
    for g in (a, b, a, c):  # c evicts b, the least recently used
        grammars.matcher(g)
    assert grammars.num_compiled == 3
    grammars.matcher(a)
    assert grammars.num_compiled == 3
    grammars.matcher(b)
    assert grammars.num_compiled == 4
    with pytest.raises(ValidationError, match="regex"):
        grammars.prepare(Grammar("regex", "[a-"))
    assert grammars.num_compiled == 4  # a failed compile is not kept
    prepared = Grammar("regex", "d+")
    grammars.prepare(prepared)  # the intake's compile, attached to the request's grammar
    for g in (a, b, c):  # pushes it out of the cache before the engine thread gets to it
        grammars.matcher(g)
    compiled = grammars.num_compiled
    assert not grammars.matcher(prepared).is_error()
    assert grammars.num_compiled == compiled  # not compiled again


def test_concurrent_requests_for_a_new_grammar_wait_for_one_compile(tiny_llama_dir: Path
                                                                   ) -> None:
    import threading

    from tokenfleet.engine.grammar import Grammar

    grammars = _engine(tiny_llama_dir).grammars
    grammar = Grammar("json", SCHEMA)
    start = threading.Barrier(4)

    def prepare() -> None:
        start.wait()
        grammars.prepare(grammar)

    threads = [threading.Thread(target=prepare) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert grammars.num_compiled == 1
    matcher = grammars.matcher(grammar)
    assert grammars.num_compiled == 1 and not matcher.is_error()


@pytest.mark.slow
async def test_the_worker_compiles_grammars_off_the_engine_thread(fleet, tiny_llama_dir: Path
                                                                 ) -> None:
    """The intake compiles a job's grammar in a thread pool; the engine thread only copies it
    (a 60-field schema costs ~15 ms to compile: a stall of every stream in the batch). A
    grammar that does not compile is refused there, and the worker goes on."""
    import threading

    from tokenfleet.producer.errors import ValidationError as ProducerValidationError

    async with fleet.worker(engine="llm", model=str(tiny_llama_dir), dtype="float32",
                            device="cpu", num_threads=1, num_kv_blocks=256) as worker, \
            fleet.client() as client:
        assert worker._engine_thread is not None
        grammars = worker._engine_thread.engine.grammars
        compiled_on: list[str] = []
        compile_ = grammars._compile

        def recording(grammar: Any) -> Any:
            compiled_on.append(threading.current_thread().name)
            return compile_(grammar)

        grammars._compile = recording
        regex = {"type": "regex", "value": REGEX}
        first = await client.generate("first", max_new_tokens=30, grammar=regex)
        more = await asyncio.gather(*(client.generate(f"more {i}", max_new_tokens=30,
                                                      grammar=regex) for i in range(3)))
        with pytest.raises(ProducerValidationError, match="regex"):
            await client.generate("bad", max_new_tokens=5,
                                  grammar={"type": "regex", "value": "[a-"})
        after = await client.generate("after", max_new_tokens=3)
    for result in (first, *more):
        assert re.fullmatch(REGEX, result.generated_text), result.generated_text
    assert after.details.generated_tokens == 3
    assert len(compiled_on) == 2  # the regex once, the bad one once
    assert "tokenfleet-engine" not in compiled_on
    assert grammars.num_compiled == 1
