"""What a grammar costs, against the same work without one, in one process:

    python benchmarks/bench_grammar.py [--batches 1,16] [--new-tokens 64] [--dtype bfloat16]

1. Compiling, as the engine thread pays it per request: a new grammar (compiled; each timed
   call gets a schema or pattern not seen before) against a repeated one (a copy of the
   cached compile), for a small JSON schema, a 60-field one and a regex (median ms).
2. Masking: `grammar_masks` for a batch of matchers mid-way through a JSON object (µs per
   step and per row; the bitmask unpacked to [rows, 49,152] bools included).
3. End to end on SmolLM2: the same prompts decoded `--new-tokens` tokens, unconstrained
   (ignore_eos) vs constrained by a regex (`[a-z ]+`) that these prompts never end early;
   output tok/s and the ratio, alternating the two runs twice (the better of each kept).
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time

import torch

from tokenfleet.engine import LLM, SamplingParams
from tokenfleet.engine.grammar import Grammar
from tokenfleet.engine.grammar_compiler import grammar_masks

SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string"}, "age": {"type": "integer"},
    "tags": {"type": "array", "items": {"type": "string"}},
    "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                 "zip": {"type": "string"}}}},
    "required": ["name", "age"]}
LONG_REGEX = r"[a-z ]+"  # these prompts never end it early (checked: every run is full length)


# 60 objects of an enum, a number and a pattern-constrained list: a large tool schema.
BIG_SCHEMA = {"type": "object", "required": [f"field_{i}" for i in range(60)], "properties": {
    f"field_{i}": {"type": "object", "required": ["kind", "n"], "properties": {
        "kind": {"enum": [f"v{j}" for j in range(50)]}, "n": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string", "pattern": "[a-z]{3,8}"}}}}
    for i in range(60)}}


def _compile_ms(llm: LLM) -> dict[str, tuple[float, float]]:
    """(new, repeated) median ms of `grammars.matcher` per grammar."""
    grammars = llm.engine.grammars
    grammars.matcher(Grammar("regex", "warm-up"))  # the tokenizer view is built once
    kinds = {"small json schema": lambda i: Grammar("json", {**SCHEMA, "title": f"t{i}"}),
             "60-field schema": lambda i: Grammar("json", {**BIG_SCHEMA, "title": f"t{i}"}),
             "regex": lambda i: Grammar("regex", rf"[A-Z][a-z]+-\d{{3}}|q{i}")}
    out = {}
    for name, make in kinds.items():
        new, repeated = [], []
        for i in range(20):
            grammar = make(i)  # not compiled before: a new grammar
            for times in (new, repeated):
                t0 = time.perf_counter()
                grammars.matcher(grammar)
                times.append((time.perf_counter() - t0) * 1000)
        out[name] = (statistics.median(new), statistics.median(repeated))
    return out


def _mask_us(llm: LLM, rows: int) -> float:
    tokenizer = llm.engine.tokenizer
    prefix = tokenizer.encode('{"name": "Ada", "age": 41, "tags": ["x", "',
                              add_special_tokens=False)
    matchers = [llm.engine.grammars.matcher(Grammar("json", SCHEMA), prefix) for _ in range(rows)]
    vocab = llm.engine.model_config.vocab_size
    grammar_masks(matchers, vocab, torch.device("cpu"))
    t0 = time.perf_counter()
    for _ in range(50):
        grammar_masks(matchers, vocab, torch.device("cpu"))
    return (time.perf_counter() - t0) / 50 * 1e6


def _tok_s(llm: LLM, prompts: list[str], params: SamplingParams) -> float:
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    assert all(len(o.token_ids) == params.max_new_tokens for o in outs), "a run ended early"
    return sum(len(o.token_ids) for o in outs) / elapsed


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, SmolLM2-135M {args.dtype}")
    llm = LLM("smollm2", dtype=args.dtype)
    for name, (new, repeated) in _compile_ms(llm).items():
        print(f"compile {name:17s} new {new:7.3f} ms, repeated {repeated:6.3f} ms "
              f"({new / repeated:.0f}x; medians of 20)")
    for rows in (1, 8, 32):
        us = _mask_us(llm, rows)
        print(f"mask    {rows:3d} rows      {us:7.0f} µs/step  {us / rows:6.0f} µs/row")
    print("\n| batch | plain tok/s | grammar tok/s | grammar / plain |\n|---|---|---|---|")
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = [llm.engine.tokenizer.apply_chat_template(
            [{"role": "user", "content": f"Write a long story about the number {i}, as JSON."}],
            add_generation_prompt=True) for i in range(batch)]
        plain = SamplingParams(max_new_tokens=args.new_tokens, ignore_eos=True)
        constrained = SamplingParams(max_new_tokens=args.new_tokens,
                                     grammar={"type": "regex", "value": LONG_REGEX})
        _tok_s(llm, prompts, plain)  # warm-up
        best = {"plain": 0.0, "grammar": 0.0}
        for _ in range(2):
            best["plain"] = max(best["plain"], _tok_s(llm, prompts, plain))
            best["grammar"] = max(best["grammar"], _tok_s(llm, prompts, constrained))
        print(f"| {batch} | {best['plain']:.0f} | {best['grammar']:.0f} | "
              f"{best['grammar'] / best['plain']:.2f}× |")


if __name__ == "__main__":
    main()
