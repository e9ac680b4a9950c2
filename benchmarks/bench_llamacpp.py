"""Batch-1 decode: our engine vs llama.cpp (llama-cpp-python) on the same model, same run.

llama.cpp runs the default model's own GGUF (Q4_1 weights, 4.5 bits); our engine runs the
bf16 weights converted from that file, and its weight-only int8 and int4 modes, eager or
compiled. Each round gives all of them the same fresh random 128-token prompt; each generates
128 tokens greedily, EOS ignored, with the same number of threads. llama-cpp-python is built
for this benchmark only and never becomes a dependency:

    pip install --target .cache/llamacpp llama-cpp-python   # builds llama.cpp (~10 min, 2 cores)
    python benchmarks/bench_llamacpp.py [--site .cache/llamacpp]
        [--engines bf16,int4,int4+compile] [--rounds 3]

Prints overall tok/s (prefill + decode), decode-only tok/s, and ours/llama.cpp.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from bench_engine import engine_args  # benchmarks/, beside this script

from tokenfleet.engine import LLM, SamplingParams
from tokenfleet.worker.settings import default_cache_dir

Result = dict[str, float]
Runner = Callable[[list[int]], Result]


def llamacpp_runner(gguf: Path, new_tokens: int, threads: int) -> Runner:
    from llama_cpp import Llama  # type: ignore[import-not-found]

    llm = Llama(model_path=str(gguf), n_ctx=512, n_batch=512, n_threads=threads,
                n_threads_batch=threads, verbose=False)

    def run(prompt: list[int]) -> Result:
        gen = llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, reset=True)
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

    return run


def ours_runner(spec: str, new_tokens: int, threads: int) -> Runner:
    llm = LLM("smollm2", dtype="bfloat16", num_threads=threads,
              **engine_args(spec))  # compiles here (+compile), untimed
    engine = llm.engine
    params = SamplingParams(max_new_tokens=new_tokens, ignore_eos=True)

    def run(prompt: list[int]) -> Result:
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

    return run


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--site", default=".cache/llamacpp",
                    help="where llama-cpp-python was installed (pip install --target)")
    ap.add_argument("--gguf", type=Path, default=None, help="default: the pulled smollm2 GGUF")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--prompt-len", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--engines", default="bf16,int4,int4+compile",
                    help="our configurations: bf16|int8|int4, each optionally +compile")
    ap.add_argument("--rounds", type=int, default=3,
                    help="rounds of every runtime back to back; medians are reported")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()
    sys.path.append(str(Path(args.site).resolve()))  # after the venv: its numpy etc. win
    gguf = args.gguf or (default_cache_dir() / "downloads" / "smollm2" /
                         "SmolLM2-135M-Instruct.Q4_1.gguf")
    if not gguf.exists():
        raise SystemExit(f"{gguf} not found: run `tokenfleet models pull smollm2` first")
    runners = {"llama.cpp Q4_1": llamacpp_runner(gguf, args.new_tokens, args.threads)}
    for spec in args.engines.split(","):
        runners[f"ours {spec}"] = ours_runner(spec, args.new_tokens, args.threads)
    g = torch.Generator().manual_seed(1)
    # Round 0 warms every runtime up (page faults, first calls) and is not reported. Each
    # round has a fresh prompt, so neither side reuses a cached prefix.
    rounds: dict[str, list[Result]] = {name: [] for name in runners}
    for r in range(args.rounds + 1):
        prompt = torch.randint(100, 49_000, (args.prompt_len,), generator=g).tolist()
        for name, run in runners.items():
            result = run(prompt)
            if r > 0:
                rounds[name].append(result)
    medians = {name: {k: statistics.median(x[k] for x in rs) for k in rs[0]}
               for name, rs in rounds.items()}
    base = medians["llama.cpp Q4_1"]["decode_tok_s"]
    print(f"batch 1, {args.prompt_len} prompt / {args.new_tokens} new tokens, "
          f"{args.threads} threads, median of {args.rounds} rounds")
    print("| runtime | tok/s | decode tok/s | prefill s | llama.cpp / ours (decode) | "
          "decode tok/s per round |")
    print("|---|---:|---:|---:|---:|---|")
    for name, m in medians.items():
        per_round = ", ".join(f"{x['decode_tok_s']:.1f}" for x in rounds[name])
        print(f"| {name} | {m['tok_s']:.1f} | {m['decode_tok_s']:.1f} | {m['prefill_s']:.3f} "
              f"| {base / m['decode_tok_s']:.2f}x | {per_round} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "rounds": rounds,
                                               "medians": medians}, indent=2))


if __name__ == "__main__":
    main()
