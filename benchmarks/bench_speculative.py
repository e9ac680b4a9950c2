"""Speculative decoding (n-gram drafts) against plain decoding, same model, same run:

    python benchmarks/bench_speculative.py [--speculate 4] [--batches 1,4] [--new-tokens 128]

Two SmolLM2-135M-Instruct engines (bf16, CPU), one with `speculate=N`, answer the same chat
prompts greedily, alternating twice (the better run of each kept). Three workloads:

- `edit`: rewrite a given function with one change (the answer mostly copies the prompt);
- `repeat`: repeat a paragraph (the answer is the prompt);
- `story`: an open-ended story (nothing to copy: the drafts' cost with little gain).

Both engines must produce the same tokens (checked); the table prints output tok/s, the
ratio, and the share of drafts accepted.
"""

from __future__ import annotations

import argparse
import platform
import time

import torch

from tokenfleet.engine import LLM, SamplingParams

CODE = '''def moving_average(values, window):
    if window <= 0:
        raise ValueError("window must be positive")
    averages = []
    total = 0.0
    for i, value in enumerate(values):
        total += value
        if i >= window:
            total -= values[i - window]
        if i >= window - 1:
            averages.append(total / window)
    return averages'''
PARAGRAPH = ("The committee met on Tuesday to review the budget for the coming year. After a "
             "long discussion, the members agreed to increase funding for the library and the "
             "community garden, and to postpone the repairs to the old town hall until spring.")
WORKLOADS = {
    "edit": "Rewrite this Python function, renaming `values` to `samples` and changing "
            f"nothing else:\n\n```python\n{CODE}\n```",
    "repeat": f"Repeat the following paragraph exactly, word for word:\n\n{PARAGRAPH}",
    "story": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


def _run(llm: LLM, prompts: list[str], params: SamplingParams) -> tuple[float, list[list[int]]]:
    started = time.perf_counter()
    outs = llm.generate(prompts, params, chat=True)
    elapsed = time.perf_counter() - started
    return sum(len(o.token_ids) for o in outs) / elapsed, [o.token_ids for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--speculate", type=int, default=4)
    ap.add_argument("--batches", default="1,4")
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, SmolLM2-135M-Instruct {args.dtype}, greedy, "
          f"{args.new_tokens} new tokens, speculate={args.speculate}")
    plain = LLM("smollm2", dtype=args.dtype)
    spec = LLM("smollm2", dtype=args.dtype, speculate=args.speculate)
    params = SamplingParams(max_new_tokens=args.new_tokens)
    print("\n| workload | batch | plain tok/s | speculative tok/s | ratio | drafts accepted |"
          "\n|---|---|---|---|---|---|")
    for name, prompt in WORKLOADS.items():
        for batch in (int(b) for b in args.batches.split(",")):
            prompts = [prompt] * batch
            _run(plain, prompts, params)  # warm-up
            _run(spec, prompts, params)
            stats_before = spec.engine.stats()
            best = {"plain": 0.0, "spec": 0.0}
            for _ in range(2):
                tok_s, plain_ids = _run(plain, prompts, params)
                best["plain"] = max(best["plain"], tok_s)
                tok_s, spec_ids = _run(spec, prompts, params)
                best["spec"] = max(best["spec"], tok_s)
                assert spec_ids == plain_ids, f"{name}: speculation changed the tokens"
            stats = spec.engine.stats()
            drafted = stats["num_draft_tokens"] - stats_before["num_draft_tokens"]
            accepted = (stats["num_accepted_draft_tokens"]
                        - stats_before["num_accepted_draft_tokens"])
            print(f"| {name} | {batch} | {best['plain']:.0f} | {best['spec']:.0f} | "
                  f"{best['spec'] / best['plain']:.2f}× | "
                  f"{accepted / max(drafted, 1):.0%} of {drafted // 2} |", flush=True)


if __name__ == "__main__":
    main()
