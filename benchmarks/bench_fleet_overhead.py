"""Fleet overhead: the same requests on the engine in this process vs through Redis + 1 worker.

    python benchmarks/bench_fleet_overhead.py [--model smollm2] [--dtype bfloat16]
        [--num-requests 64] [--input-len 128] [--output-len 64] [--max-num-seqs 32]
        [--concurrency N] [--repeats 3] [--engine simulated] [--json out.json]

Both sides use the same engine settings, the same prompts (exact token counts, no shared
prefixes), ignore_eos and max_new_tokens = --output-len, and a warm-up. The fleet side is
an embedded Valkey and one `tokenfleet worker` process on this machine; its client runs
here. The in-process runs go first, then the engine is freed and the worker started (on a
GPU both would not fit); the median of --repeats runs of each side is compared.

Printed: output tokens/s of both and their ratio (the issue's goal: >= 0.95), TTFT and
inter-token latencies, and the event latency from a worker's publish to this client's
receive (every token event's `published_ms`, and the final events).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

from tokenfleet.producer.client import Client
from tokenfleet.worker.bench import BenchRun, PreparedRequest, run_fleet, run_in_process
from tokenfleet.worker.bench_cli import prepare
from tokenfleet.worker.bench_report import summarize
from tokenfleet.worker.engine_factory import build_engine
from tokenfleet.worker.local_fleet import LocalFleet
from tokenfleet.worker.settings import WorkerSettings

GOAL_RATIO = 0.95


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engine", default="llm", choices=["llm", "simulated"])
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    ap.add_argument("--device", default="auto")
    ap.add_argument("--cache-dir", type=Path, default=None)
    ap.add_argument("--num-threads", type=int, default=None, help="torch threads (both sides)")
    ap.add_argument("--max-num-seqs", type=int, default=32)
    ap.add_argument("--sim-step-ms", type=float, default=20.0, help="--engine simulated only")
    ap.add_argument("--num-requests", type=int, default=64)
    ap.add_argument("--input-len", type=int, default=128)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--concurrency", type=int, default=None, help="default: all at once")
    ap.add_argument("--warmup-requests", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    return ap.parse_args()


async def _fleet_run(fleet: LocalFleet, requests: list[PreparedRequest],
                     warmup: list[PreparedRequest], concurrency: int | None) -> BenchRun:
    assert fleet.url is not None
    async with Client(fleet.url, keys=fleet.keys, max_connections=1024) as client:
        if warmup:
            await run_fleet(client, warmup, concurrency=concurrency)
        return await run_fleet(client, requests, concurrency=concurrency, timeout_s=3600)


def _row(name: str, s: dict[str, Any]) -> str:
    return (f"{name:<12} {s['output_throughput']:>9.1f} {s['request_throughput']:>7.2f} "
            f"{s['median_ttft_ms']:>11.1f} {s['median_itl_ms']:>10.2f} {s['p99_itl_ms']:>10.2f}"
            f" {s['failed']:>6}")


def _median_summary(summaries: list[dict[str, Any]]) -> dict[str, Any]:
    ranked = sorted(summaries, key=lambda s: s["output_throughput"])
    return ranked[(len(ranked) - 1) // 2]


def _free_memory() -> None:
    gc.collect()
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def main() -> None:
    args = parse_args()
    settings = WorkerSettings.from_env(
        engine=args.engine, model=args.model, dtype=args.dtype, device=args.device,
        cache_dir=args.cache_dir, num_threads=args.num_threads, max_num_seqs=args.max_num_seqs,
        sim_step_ms=args.sim_step_ms, log_level="warning", metrics_port=0)
    engine = build_engine(settings)
    # Fresh prompts for every repeat (seed + r): reused prompts would hit the prefix cache.
    sets = [prepare(engine.tokenizer, int(engine.config.max_model_len),
                    num_requests=args.num_requests, input_len=args.input_len,
                    output_len=args.output_len, seed=args.seed + r,
                    num_warmup=args.warmup_requests) for r in range(args.repeats)]
    local: list[dict[str, Any]] = []
    for requests, warmup in sets:
        if warmup:
            run_in_process(engine, warmup, concurrency=args.concurrency)
        local.append(summarize(run_in_process(engine, requests, concurrency=args.concurrency)))
    del engine  # free its memory (a GPU KV cache) before the worker takes its own
    _free_memory()
    remote: list[dict[str, Any]] = []
    with LocalFleet(settings, 1) as fleet:
        for requests, warmup in sets:
            remote.append(summarize(asyncio.run(
                _fleet_run(fleet, requests, warmup, args.concurrency))))
    base, ours = _median_summary(local), _median_summary(remote)
    ratio = ours["output_throughput"] / base["output_throughput"]
    print(f"# fleet overhead: {args.engine}/{args.model} {args.dtype}, {args.num_requests} "
          f"requests x {args.input_len} prompt / {args.output_len} new tokens, concurrency "
          f"{args.concurrency or 'all'}, max_num_seqs {args.max_num_seqs}, 1 worker, "
          f"{platform.machine()}, median of {args.repeats}")
    print(f"{'mode':<12} {'tok/s':>9} {'req/s':>7} {'TTFT p50 ms':>11} {'ITL p50 ms':>10} "
          f"{'ITL p99 ms':>10} {'failed':>6}")
    print(_row("in-process", base))
    print(_row("fleet", ours))
    verdict = "meets" if ratio >= GOAL_RATIO else "misses"
    print(f"ratio fleet/in-process output tok/s: {ratio:.3f} ({verdict} the goal >= "
          f"{GOAL_RATIO})")
    if "p50_event_latency_ms" in ours:
        print(f"event latency, worker publish -> client receive (every token event + the "
              f"final events): p50 {ours['p50_event_latency_ms']:.2f} ms, "
              f"p99 {ours['p99_event_latency_ms']:.2f} ms")
    if args.json is not None:
        runs = {"in_process": local, "fleet": remote}
        args.json.write_text(json.dumps({"ratio": ratio, "median_of": args.repeats,
                                         "runs": runs}, indent=1, default=str) + "\n")
        print(f"results written to {args.json}")
    print(f"throughput repeats: in-process {[round(s['output_throughput'], 1) for s in local]}, "
          f"fleet {[round(s['output_throughput'], 1) for s in remote]}; "
          f"spread {statistics.pstdev([s['output_throughput'] for s in local]):.1f}")


if __name__ == "__main__":
    main()
