"""HTTP gateway overhead: the same streams through `Client` straight to Redis vs through
`tokenfleet gateway` (TGI's /generate_stream, server-sent events).

    python benchmarks/bench_gateway.py [--workers 1] [--max-num-seqs 64] [--sim-step-ms 20]
        [--concurrency 64] [--num-requests 256] [--output-len 64] [--rounds 3]

One embedded Valkey, simulated workers (fixed step time, so the engine costs nothing and
any difference is the delivery path) and one gateway process; the load generator runs here.
Rounds alternate direct / gateway so a drift of this VM hits both. Printed per mode: output
tokens/s, TTFT and inter-token-latency percentiles (measured at this client), and the ratio
gateway / direct.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import socket
import statistics
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field

import aiohttp

from tokenfleet.producer.client import Client
from tokenfleet.producer.keys import Keys
from tokenfleet.worker.local_fleet import LocalFleet
from tokenfleet.worker.settings import WorkerSettings


@dataclass
class Stream:
    start_s: float = 0.0
    token_times_s: list[float] = field(default_factory=list)


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workers", type=int, default=1)
    ap.add_argument("--max-num-seqs", type=int, default=64)
    ap.add_argument("--sim-step-ms", type=float, default=20.0)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--num-requests", type=int, default=256)
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    return ap.parse_args()


async def direct(client: Client, prompt: str, max_new_tokens: int) -> Stream:
    s = Stream(start_s=time.perf_counter())
    async for _ in client.generate_stream(prompt, max_new_tokens=max_new_tokens,
                                          ignore_eos=True):
        s.token_times_s.append(time.perf_counter())
    return s


async def via_gateway(http: aiohttp.ClientSession, url: str, prompt: str,
                      max_new_tokens: int) -> Stream:
    s = Stream(start_s=time.perf_counter())
    body = {"inputs": prompt, "parameters": {"max_new_tokens": max_new_tokens,
                                             "ignore_eos": True}}
    async with http.post(f"{url}/generate_stream", json=body) as resp:
        assert resp.status == 200, await resp.text()
        async for line in resp.content:
            if line.startswith(b"data:"):
                s.token_times_s.append(time.perf_counter())
    return s


async def run_round(send, args: argparse.Namespace) -> tuple[float, list[Stream]]:
    limit = asyncio.Semaphore(args.concurrency)

    async def one(i: int) -> Stream:
        async with limit:
            return await send(f"prompt {uuid.uuid4().hex} {i}", args.output_len)

    start = time.perf_counter()
    streams = await asyncio.gather(*(one(i) for i in range(args.num_requests)))
    return time.perf_counter() - start, list(streams)


def summarize(elapsed_s: float, streams: list[Stream]) -> dict[str, float]:
    tokens = sum(len(s.token_times_s) for s in streams)
    ttft = sorted((s.token_times_s[0] - s.start_s) * 1000 for s in streams)
    itl = sorted((b - a) * 1000 for s in streams
                 for a, b in zip(s.token_times_s, s.token_times_s[1:], strict=False))
    return {"tok_s": tokens / elapsed_s, "ttft_p50": _pct(ttft, 50), "ttft_p99": _pct(ttft, 99),
            "itl_p50": _pct(itl, 50), "itl_p99": _pct(itl, 99)}


def _pct(values: list[float], p: float) -> float:
    return values[min(len(values) - 1, int(len(values) * p / 100))]


def start_gateway(url: str, prefix: str) -> tuple[subprocess.Popen[bytes], str]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "tokenfleet.worker.cli", "gateway",
                             "--redis-url", url, "--key-prefix", prefix,
                             "--gateway-port", str(port), "--log-level", "warning"],
                            stderr=subprocess.PIPE)
    assert proc.stderr is not None
    while b"gateway listening" not in (line := proc.stderr.readline()):
        if not line:
            raise RuntimeError("the gateway exited before listening")
    return proc, f"http://127.0.0.1:{port}"


async def main_async(args: argparse.Namespace, url: str, gateway_url: str,
                     keys: Keys) -> dict[str, list[dict[str, float]]]:
    results: dict[str, list[dict[str, float]]] = {"direct": [], "gateway": []}
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with Client(url, keys=keys, max_connections=args.concurrency + 8) as client, \
            aiohttp.ClientSession(connector=connector) as http:
        modes = {
            "direct": lambda p, n: direct(client, p, n),
            "gateway": lambda p, n: via_gateway(http, gateway_url, p, n),
        }
        for send in modes.values():  # warm-up: connections, subscriptions
            await send("warm up", 4)
        for r in range(args.rounds):
            for name in (("direct", "gateway") if r % 2 == 0 else ("gateway", "direct")):
                elapsed, streams = await run_round(modes[name], args)
                results[name].append(summarize(elapsed, streams))
                print(f"round {r} {name:<8} " + "  ".join(
                    f"{k}={v:,.1f}" for k, v in results[name][-1].items()), flush=True)
    return results


def main() -> int:
    args = parse_args()
    settings = WorkerSettings(engine="simulated", model="sim", key_prefix="bench",
                              max_num_seqs=args.max_num_seqs, sim_step_ms=args.sim_step_ms,
                              log_level="warning", log_format="json")
    with LocalFleet(settings, args.workers) as fleet:
        assert fleet.url is not None
        gateway, gateway_url = start_gateway(fleet.url, settings.key_prefix)
        try:
            results = asyncio.run(main_async(args, fleet.url, gateway_url, fleet.keys))
        finally:
            gateway.terminate()
            gateway.wait(timeout=30)
    med = {mode: {k: statistics.median(r[k] for r in runs) for k in runs[0]}
           for mode, runs in results.items()}
    print(f"\n{platform.node()} {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; "
          f"{args.workers} simulated worker(s) x {args.max_num_seqs} seqs, step "
          f"{args.sim_step_ms} ms; {args.num_requests} requests x {args.output_len} tokens, "
          f"{args.concurrency} concurrent; median of {args.rounds}")
    print("| mode | tok/s | TTFT p50 ms | TTFT p99 ms | ITL p50 ms | ITL p99 ms |")
    print("|---|---:|---:|---:|---:|---:|")
    for mode, m in med.items():
        print(f"| {mode} | {m['tok_s']:,.0f} | {m['ttft_p50']:.1f} | {m['ttft_p99']:.1f} | "
              f"{m['itl_p50']:.1f} | {m['itl_p99']:.1f} |")
    ratio = med["gateway"]["tok_s"] / med["direct"]["tok_s"]
    print(f"\ngateway / direct throughput: {ratio:.3f}x; TTFT p50 "
          f"{med['gateway']['ttft_p50'] - med['direct']['ttft_p50']:+.1f} ms")
    print(json.dumps(med))
    return 0


if __name__ == "__main__":
    sys.exit(main())
