"""Tensor parallelism on this machine: one process vs the same model split over N ranks.

    python benchmarks/bench_tensor_parallel.py [--model smollm2 | --random 1024,8,16,8,2816]
        [--tp 2] [--batches 1,16] [--new-tokens 64] [--rounds 3]

`--random hidden,layers,heads,kv_heads,intermediate` builds a random-weight bf16 Llama of that
shape (SmolLM2's tokenizer) in a temporary directory: SmolLM2's 9 heads split only 3 ways.

Both engines live in this process (rank 0 of the split one; its other ranks are child
processes), and are timed alternately, round after round, on fresh random prompts (no
prefix-cache hits). On CPU the cores are shared: the single-process engine gets all of them,
each rank 1/N. Prints output tok/s and the ratio split/single.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

from tokenfleet.engine import LLM, SamplingParams


def _prompts(n: int, vocab: int, seed: int) -> list[list[int]]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randint(100, vocab - 100, (128,), generator=g).tolist() for _ in range(n)]


def _tok_s(llm: LLM, threads: int, batch: int, new_tokens: int, seed: int) -> float:
    torch.set_num_threads(threads)  # per process: set before each engine's turn
    prompts = _prompts(batch, llm.engine.model_config.vocab_size, seed)
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate(prompts, params)
    elapsed = time.perf_counter() - t0
    assert all(len(o.token_ids) == new_tokens for o in outs)
    return batch * new_tokens / elapsed


def _random_llama(shape: str) -> str:
    import shutil
    import tempfile

    import transformers

    from tokenfleet.engine.hub import resolve_model

    hidden, layers, heads, kv_heads, inter = (int(v) for v in shape.split(","))
    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, intermediate_size=inter,
        max_position_embeddings=2048, tie_word_embeddings=True)
    out = tempfile.mkdtemp(prefix="tp-bench-")
    transformers.LlamaForCausalLM(config).to(torch.bfloat16).save_pretrained(out)
    tokenizer_dir = resolve_model("smollm2", None)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(tokenizer_dir / name, f"{out}/{name}")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--random", help="hidden,layers,heads,kv_heads,intermediate")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--tp", type=int, default=2)
    ap.add_argument("--batches", default="1,16")
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    cores = os.cpu_count() or 1
    if args.random:
        args.model = _random_llama(args.random)
    single = LLM(args.model, dtype=args.dtype, num_threads=cores)
    split = LLM(args.model, dtype=args.dtype, tensor_parallel_size=args.tp)
    per_rank = max(1, cores // args.tp)
    for llm, threads in ((single, cores), (split, per_rank)):  # warm-up
        _tok_s(llm, threads, 2, 4, seed=1)
    batches = [int(b) for b in args.batches.split(",")]
    results: dict[int, tuple[list[float], list[float]]] = {b: ([], []) for b in batches}
    for r in range(args.rounds):
        for b in batches:
            seed = 100 * r + b
            results[b][0].append(_tok_s(single, cores, b, args.new_tokens, seed))
            results[b][1].append(_tok_s(split, per_rank, b, args.new_tokens, seed + 50))
    print(f"# {platform.processor() or platform.machine()}, {cores} cores, torch "
          f"{torch.__version__}, {args.model} {args.dtype}, 128 prompt / {args.new_tokens} new "
          f"tokens, medians of {args.rounds} alternating rounds")
    if args.random:
        print(f"# random Llama: hidden,layers,heads,kv_heads,intermediate = {args.random}")
    print(f"{'batch':>6} {'1 process':>12} {f'tp={args.tp}':>12} {'ratio':>7}")
    for b in batches:
        one, many = (statistics.median(v) for v in results[b])
        print(f"{b:>6} {one:>10.1f}/s {many:>10.1f}/s {many / one:>6.2f}x")
    split.close()


if __name__ == "__main__":
    main()
