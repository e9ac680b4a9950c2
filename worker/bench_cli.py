"""`tokenfleet bench`: load-test a fleet, or the same workload on an engine in this process.

    tokenfleet bench --engine simulated --num-workers 2 --concurrency 16      embedded fleet
    tokenfleet bench --redis-url redis://host:6379 --model smollm2             a running fleet
    tokenfleet bench --in-process --model smollm2 --num-requests 64            no Redis

Without --redis-url an embedded Valkey and --num-workers worker processes (default 1) are
started with the given engine settings and stopped afterwards. Against a running fleet
(--redis-url), pass the fleet's --engine/--model too: prompts are built with that model's
tokenizer so that each has exactly the drawn number of tokens. Requests use ignore_eos and
max_new_tokens = the drawn output length. Arrivals: all at once (default) or Poisson at
--request-rate; --concurrency caps the requests in flight (closed loop with the default
rate). Prints vLLM `bench serve`'s table; --output-json and --plot save the details.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import math
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenfleet.worker.bench import BenchRun, PreparedRequest, run_fleet, run_in_process
from tokenfleet.worker.bench_report import Progress, format_table, plot, summarize, write_json
from tokenfleet.worker.bench_workload import (
    LENGTH_DISTRIBUTIONS,
    LengthDistribution,
    PromptMaker,
    RequestSpec,
    WorkloadError,
    build_workload,
)
from tokenfleet.worker.local_fleet import LocalFleet
from tokenfleet.worker.settings import WorkerSettings

__all__ = ["add_bench_parser", "bench_tokenizer", "cmd_bench", "main", "prepare"]

_SETTINGS_OPTIONS = ("engine", "model", "cache_dir", "device", "dtype", "max_num_seqs",
                     "max_num_batched_tokens", "kv_cache_bytes", "num_kv_blocks", "block_size",
                     "num_threads", "quantize", "cpu_compile", "cpu_attention_kernel",
                     "cpu_sampler_kernel", "cpu_gemm_kernel",
                     "attention_backend", "gpu_memory_utilization", "cuda_graph_max_batch",
                     "async_decode", "tensor_parallel_size",
                     "sim_step_ms", "sim_vocab_size", "sim_max_model_len",
                     "redis_url", "queue", "key_prefix", "log_level")


def add_bench_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register the `bench` command on the `tokenfleet` parser's subparsers."""
    p = subparsers.add_parser("bench", help="benchmark a fleet (or the engine, --in-process)",
                              description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    w = p.add_argument_group("workload")
    w.add_argument("--num-requests", type=int, default=100, help="measured requests")
    w.add_argument("--warmup-requests", type=int, default=2, help="sent first, not measured")
    w.add_argument("--input-len", type=int, default=128, help="prompt tokens (median/centre)")
    w.add_argument("--output-len", type=int, default=64, help="generated tokens per request")
    w.add_argument("--length-dist", choices=LENGTH_DISTRIBUTIONS, default="fixed",
                   help="fixed; uniform in len·(1±range-ratio); sharegpt = lognormal long "
                        "tail (median len, clipped at 8·len)")
    w.add_argument("--range-ratio", type=float, default=0.5, help="spread of --length-dist "
                   "uniform")
    w.add_argument("--request-rate", type=float, default=math.inf,
                   help="Poisson arrivals per second (default inf: all at once)")
    w.add_argument("--concurrency", type=int, default=None, help="most requests in flight")
    w.add_argument("--seed", type=int, default=0, help="seed of lengths, arrivals, prompts")
    r = p.add_argument_group("run")
    r.add_argument("--in-process", action="store_true", help="the engine in this process, "
                   "no Redis (the baseline for fleet overhead)")
    r.add_argument("--num-workers", type=int, default=None, help="worker processes to start "
                   "(default 1 with the embedded server, 0 with --redis-url)")
    r.add_argument("--timeout-s", type=float, default=600.0, help="give up on a request "
                   "after this long")
    r.add_argument("--output-json", type=Path, default=None, help="write summary + details")
    r.add_argument("--plot", type=Path, default=None, help="write a PNG (needs matplotlib)")
    r.add_argument("--no-progress", action="store_true", help="no progress line on stderr")
    WorkerSettings.add_arguments(p, _SETTINGS_OPTIONS)


def cmd_bench(args: argparse.Namespace, settings: WorkerSettings) -> int:
    """Run the benchmark; 0 when every request succeeded, 1 otherwise, 2 on bad options."""
    if args.log_level is None:  # one log line per request would compete for the CPU
        settings = dataclasses.replace(settings, log_level="warning")
    try:
        _check_options(args, settings)
        engine: Any = None
        max_model_len: int | None
        if args.in_process:
            from tokenfleet.worker.engine_factory import build_engine

            engine = build_engine(settings)
            tokenizer, max_model_len = engine.tokenizer, int(engine.config.max_model_len)
        else:
            tokenizer, max_model_len = bench_tokenizer(settings)
        requests, warmup = prepare(
            tokenizer, max_model_len, num_requests=args.num_requests, input_len=args.input_len,
            output_len=args.output_len, length_dist=args.length_dist,
            range_ratio=args.range_ratio, request_rate=args.request_rate, seed=args.seed,
            num_warmup=args.warmup_requests)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    mode = "in-process" if args.in_process else "fleet"
    print(f"bench ({mode}): {len(requests)} requests, concurrency {args.concurrency or 'inf'}, "
          f"request rate {args.request_rate}, engine {settings.engine}/{settings.model}",
          file=sys.stderr)
    progress = Progress(len(requests), label=mode, enabled=not args.no_progress)
    if engine is not None:
        if warmup:
            run_in_process(engine, warmup, concurrency=args.concurrency)
        progress.start()
        run = run_in_process(engine, requests, concurrency=args.concurrency,
                             on_done=progress.update)
    else:
        run = asyncio.run(_bench_fleet(args, settings, requests, warmup, progress))
    progress.close()
    return _report(args, settings, run, mode)


def _check_options(args: argparse.Namespace, settings: WorkerSettings) -> None:
    if args.concurrency is not None and args.concurrency < 1:
        raise WorkloadError("--concurrency must be >= 1")
    if args.num_workers is not None and args.num_workers < 0:
        raise WorkloadError("--num-workers must be >= 0")
    if args.num_workers == 0 and settings.redis_url is None and not args.in_process:
        raise WorkloadError("--num-workers 0 needs --redis-url of a running fleet")


def bench_tokenizer(settings: WorkerSettings) -> tuple[Any, int | None]:
    """The tokenizer the fleet's workers use (to build exact prompts) and their context."""
    if settings.engine == "simulated":
        from tokenfleet.engine.simulated_engine import WhitespaceTokenizer

        return WhitespaceTokenizer(settings.sim_vocab_size), settings.sim_max_model_len
    from tokenfleet.engine.hub import resolve_model
    from tokenfleet.engine.tokenizer import Tokenizer

    model_dir = resolve_model(settings.model, settings.resolved_cache_dir)
    config = json.loads((model_dir / "config.json").read_text())
    return Tokenizer.from_dir(model_dir), config.get("max_position_embeddings")


def prepare(tokenizer: Any, max_model_len: int | None, *, num_requests: int, input_len: int,
            output_len: int, length_dist: str = "fixed", range_ratio: float = 0.5,
            request_rate: float = math.inf, seed: int = 0, num_warmup: int = 0,
            ) -> tuple[list[PreparedRequest], list[PreparedRequest]]:
    """The measured requests and the warm-up requests (sent at once), with prompts of exactly
    the drawn length for `tokenizer`."""
    prompt = LengthDistribution(length_dist, input_len, range_ratio)
    output = LengthDistribution(length_dist, output_len, range_ratio)
    specs = build_workload(num_requests, prompt, output, request_rate=request_rate, seed=seed,
                           max_model_len=max_model_len)
    warm = build_workload(num_warmup, prompt, output, seed=seed + 1_000_003,
                          max_model_len=max_model_len)
    maker = PromptMaker(tokenizer)
    rng = random.Random(seed + 2)
    return _prompts(maker, specs, rng), _prompts(maker, warm, rng)


def _prompts(maker: PromptMaker, specs: Sequence[RequestSpec],
             rng: random.Random) -> list[PreparedRequest]:
    out = []
    for spec in specs:
        text, num_tokens = maker.make(spec.prompt_len, rng)
        out.append(PreparedRequest(spec, text, num_tokens))
    return out


async def _bench_fleet(args: argparse.Namespace, settings: WorkerSettings,
                       requests: list[PreparedRequest], warmup: list[PreparedRequest],
                       progress: Progress) -> BenchRun:
    from tokenfleet.producer.client import Client

    num_workers = _num_workers(args, settings)
    fleet = LocalFleet(settings, num_workers, redis_url=settings.redis_url)
    try:
        url = await asyncio.to_thread(fleet.start)
        async with Client(url, keys=fleet.keys, default_queue=settings.queue,
                          max_connections=1024) as client:
            if num_workers == 0 and not [k async for k in client.redis.scan_iter(
                    match=fleet.keys.workers_pattern())]:
                print(f"warning: no worker is registered at {url} (prefix "
                      f"{settings.key_prefix!r}); requests will wait", file=sys.stderr)
            if warmup:
                await run_fleet(client, warmup, concurrency=args.concurrency,
                                timeout_s=args.timeout_s)
            progress.start()
            return await run_fleet(client, requests, concurrency=args.concurrency,
                                   timeout_s=args.timeout_s, on_done=progress.update)
    finally:
        await asyncio.to_thread(fleet.stop)


def _num_workers(args: argparse.Namespace, settings: WorkerSettings) -> int:
    if args.num_workers is not None:
        return int(args.num_workers)
    return 0 if settings.redis_url else 1


def _report(args: argparse.Namespace, settings: WorkerSettings, run: BenchRun,
            mode: str) -> int:
    meta = {
        "mode": mode, "engine": settings.engine, "model": settings.model,
        "dtype": settings.dtype, "max_num_seqs": settings.max_num_seqs,
        "num_workers": None if args.in_process else _num_workers(args, settings),
        "redis_url": settings.redis_url, "num_requests": args.num_requests,
        "concurrency": args.concurrency, "request_rate": str(args.request_rate),
        "length_dist": args.length_dist, "input_len": args.input_len,
        "output_len": args.output_len, "range_ratio": args.range_ratio, "seed": args.seed,
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }
    summary = summarize(run, meta)
    print(format_table(summary))
    for error in summary["errors"]:
        print(f"error: {error}", file=sys.stderr)
    if args.output_json is not None:
        write_json(args.output_json, summary, run)
        print(f"results written to {args.output_json}", file=sys.stderr)
    if args.plot is not None:
        print(plot(args.plot, summary, run), file=sys.stderr)
    return 0 if summary["failed"] == 0 and summary["completed"] > 0 else 1


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m tokenfleet.worker.bench_cli [bench options]` (until `tokenfleet bench`)."""
    parser = argparse.ArgumentParser(prog="tokenfleet")
    add_bench_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *(sys.argv[1:] if argv is None else argv)])
    try:
        settings = WorkerSettings.from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return cmd_bench(args, settings)


if __name__ == "__main__":
    sys.exit(main())
