"""Batch-1 decode: our engine vs llama.cpp (llama-cpp-python) on the same model, same run.

llama.cpp runs the default model's own GGUF (Q4_1 weights, 4.5 bits); our engine runs the
bf16 weights converted from that file, and its weight-only int8 and int4 modes. All
get the same random 128-token prompt and generate 128 tokens greedily, EOS ignored, with the
same number of threads. llama-cpp-python is built for this benchmark only and never becomes a
dependency:

    pip install --target .cache/llamacpp llama-cpp-python   # builds llama.cpp (~10 min, 2 cores)
    python benchmarks/bench_llamacpp.py [--site .cache/llamacpp] [--quantize int8,int4]

Prints overall tok/s (prefill + decode), decode-only tok/s, and ours/llama.cpp.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tokenfleet.engine import LLM, SamplingParams
from tokenfleet.worker.settings import default_cache_dir


def bench_llamacpp(gguf: Path, prompt: list[int], new_tokens: int, threads: int
                   ) -> dict[str, float]:
    from llama_cpp import Llama  # type: ignore[import-not-found]

    llm = Llama(model_path=str(gguf), n_ctx=512, n_batch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False)
    # The warm-up pays for page-faulting the weights in. It uses another prompt: llama-cpp-
    # python reuses the KV cache of a repeated prompt prefix, which would skip the prefill.
    warm_up = [t + 1 for t in prompt]
    for tokens in (warm_up, prompt):
        gen = llm.generate(tokens, top_k=1, top_p=1.0, temp=0.0, reset=True)
        started = time.perf_counter()
        next(gen)  # prefill + the first token
        first = time.perf_counter()
        for _ in range(new_tokens - 1):
            next(gen)
        done = time.perf_counter()
        gen.close()
    return {"tok_s": new_tokens / (done - started),
            "decode_tok_s": (new_tokens - 1) / (done - first),
            "prefill_s": first - started}


def bench_ours(quantize: str | None, prompt: list[int], new_tokens: int, threads: int
               ) -> dict[str, float]:
    llm = LLM("smollm2", dtype="bfloat16", quantize=quantize, num_threads=threads)
    engine = llm.engine
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)
    # Warm-up on another prompt (the measured one must not hit the prefix cache).
    llm.generate([[7] * 16], SamplingParams(max_new_tokens=4, ignore_eos=True))
    times: list[float] = []
    engine.add_request("bench", prompt, params)
    started = time.perf_counter()
    while engine.has_unfinished():
        for out in engine.step():
            if out.tokens:
                times.append(time.perf_counter())
    done = time.perf_counter()
    return {"tok_s": new_tokens / (done - started),
            "decode_tok_s": (new_tokens - 1) / (done - times[0]),
            "prefill_s": times[0] - started}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--site", default=".cache/llamacpp",
                    help="where llama-cpp-python was installed (pip install --target)")
    ap.add_argument("--gguf", type=Path, default=None, help="default: the pulled smollm2 GGUF")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--quantize", default="int8,int4",
                    help="also our weight-only modes (comma-separated; '' for none)")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    sys.path.append(str(Path(args.site).resolve()))  # after the venv: its numpy etc. win
    gguf = args.gguf or (default_cache_dir() / "downloads" / "smollm2" /
                         "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not gguf.exists():
        raise SystemExit(f"{gguf} not found: run `tokenfleet models pull smollm2` first")
    g = torch.Generator().manual_seed(1)
    prompt = torch.randint(100, 49_000, (args.prompt_len,), generator=g).tolist()
    results: dict[str, Any] = {"threads": args.threads, "prompt_len": args.prompt_len,
                               "new_tokens": args.new_tokens}
    results["llama.cpp Q4_1"] = bench_llamacpp(gguf, prompt, args.new_tokens, args.threads)
    results["ours bf16"] = bench_ours(None, prompt, args.new_tokens, args.threads)
    for mode in filter(None, args.quantize.split(",")):
        results[f"ours {mode}"] = bench_ours(mode, prompt, args.new_tokens, args.threads)
    base = results["llama.cpp Q4_1"]
    print(f"batch 1, {args.prompt_len} prompt / {args.new_tokens} new tokens, "
          f"{args.threads} threads")
    print("| runtime | tok/s | decode tok/s | prefill s | llama.cpp / ours (decode) |")
    print("|---|---:|---:|---:|---:|")
    for name in [k for k in results if k.startswith(("llama", "ours"))]:
        r = results[name]
        print(f"| {name} | {r['tok_s']:.1f} | {r['decode_tok_s']:.1f} | {r['prefill_s']:.3f} "
              f"| {base['decode_tok_s'] / r['decode_tok_s']:.2f}x |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
