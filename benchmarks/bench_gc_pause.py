"""What a full garbage collection costs a worker process, with and without `gc_freeze`:

    python benchmarks/bench_gc_pause.py [--model smollm2] [--dtype bfloat16] [--batch 32]

The engine is loaded and run as a worker runs it (a batch decoded to the end, so that
start-up and first-step allocations exist), then a full collection (`gc.collect()`, what
Python runs when the oldest generation fills up) is timed several times. `gc.freeze()`, as
`tokenfleet worker` calls it once ready (TOKENFLEET_GC_FREEZE), then moves everything alive
into the permanent generation, and the same collection is timed again. While a collection
runs, the engine thread holds no GIL: every stream of the worker waits for it.
"""

from __future__ import annotations

import argparse
import gc
import platform
import statistics
import time

import torch

from tokenfleet.engine import LLM, SamplingParams


def _collect_ms(repeats: int = 5) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        gc.collect()
        times.append((time.perf_counter() - started) * 1e3)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--batch", type=int, default=32)
    args = ap.parse_args()
    print(f"# {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {args.model} {args.dtype}")
    llm = LLM(args.model, dtype=args.dtype)
    params = SamplingParams(max_new_tokens=32, ignore_eos=True)
    llm.generate([f"Count to {i}." for i in range(args.batch)], params)
    num_tracked = len(gc.get_objects())
    before = _collect_ms()
    gc.freeze()
    after = _collect_ms()
    print(f"tracked objects: {num_tracked:,}; frozen: {gc.get_freeze_count():,}")
    print(f"full collection (median of 5): {before:.1f} ms without freeze, "
          f"{after * 1e3:.1f} µs after gc.freeze()")


if __name__ == "__main__":
    main()
