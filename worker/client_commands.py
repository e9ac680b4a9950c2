"""The client-side CLI commands: `generate` (through the fleet, or `--local`), `status` and
`gateway`.

Nothing here imports torch unless `generate --local` runs a real engine.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from dataclasses import asdict
from typing import Any, TextIO

import msgspec
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from tokenfleet.producer.client import Client
from tokenfleet.producer.errors import TokenfleetError
from tokenfleet.producer.fleet_status import fleet_status
from tokenfleet.producer.keys import Keys
from tokenfleet.producer.protocol import FinalEvent
from tokenfleet.worker.embedded import discover_embedded_url
from tokenfleet.worker.settings import WorkerSettings

__all__ = ["generate_local", "generate_remote", "resolve_redis_url", "serve_gateway",
           "show_status"]

DEFAULT_REDIS_URL = "redis://localhost:6379/0"
_LOOPBACK = frozenset({"127.0.0.1", "localhost", "::1"})


def resolve_redis_url(settings: WorkerSettings) -> str:
    """--redis-url / TOKENFLEET_REDIS_URL, else a running `tokenfleet up`, else localhost."""
    if settings.redis_url:
        return settings.redis_url
    found = discover_embedded_url(settings.resolved_cache_dir / "valkey")
    return found or DEFAULT_REDIS_URL


async def generate_remote(settings: WorkerSettings, prompt: str, *, chat: bool, stream: bool,
                          model: str | None, parameters: dict[str, Any],
                          timeout_s: float | None, out: TextIO = sys.stdout) -> int:
    """Submit through the fleet and print the answer (token by token with `stream`)."""
    url = resolve_redis_url(settings)
    request: dict[str, Any] = ({"messages": [{"role": "user", "content": prompt}]} if chat
                               else {"inputs": prompt})
    try:
        async with Client(url, keys=Keys(settings.key_prefix),
                          default_queue=settings.queue) as client:
            if stream:
                final = None
                async for event in client.generate_stream(model=model, timeout_s=timeout_s,
                                                          **request, **parameters):
                    if event.token is not None:
                        out.write(event.token.text)
                        out.flush()
                    if isinstance(event, FinalEvent):
                        final = event
                out.write("\n")
            else:
                final = await client.generate(model=model, timeout_s=timeout_s, **request,
                                              **parameters)
                out.write(final.generated_text + "\n")
    except TokenfleetError as e:
        print(f"error ({e.error_type}): {e}", file=sys.stderr)
        return 1
    except (RedisConnectionError, OSError) as e:
        print(f"cannot reach Redis at {url}: {e}\nstart one with `tokenfleet up`, or pass "
              "--redis-url", file=sys.stderr)
        return 2
    if final is not None:
        print(_summary(final), file=sys.stderr)
    return 0


def generate_local(settings: WorkerSettings, prompt: str, *, chat: bool, stream: bool,
                   parameters: dict[str, Any], out: TextIO = sys.stdout) -> int:
    """Run the engine in this process (no Redis) and print the answer."""
    from tokenfleet.engine.errors import EngineError
    from tokenfleet.engine.sampling_params import SamplingParams
    from tokenfleet.worker.engine_factory import build_engine

    try:
        engine = build_engine(settings)
        tokenizer = engine.tokenizer
        if chat:
            text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                                 add_generation_prompt=True)
            ids = tokenizer.encode(text, add_special_tokens=False)
        else:
            ids = tokenizer.encode(prompt)
        engine.add_request("local", ids, SamplingParams(**parameters))
    except (EngineError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    generated = ""
    while engine.has_unfinished():
        for output in engine.step():
            if stream:
                for token in output.tokens:
                    out.write(token.text)
                    out.flush()
            if output.finished:
                generated = output.generated_text
    out.write(("" if stream else generated) + "\n")
    return 0


async def show_status(settings: WorkerSettings, queues: list[str], *, as_json: bool,
                      out: TextIO = sys.stdout) -> int:
    """Print live workers and each queue's backlog, pending entries and dead letters."""
    url = resolve_redis_url(settings)
    redis = Redis.from_url(url)
    try:
        status = await fleet_status(redis, Keys(settings.key_prefix), queues)
    except (RedisConnectionError, OSError) as e:
        print(f"cannot reach Redis at {url}: {e}", file=sys.stderr)
        return 2
    finally:
        await redis.aclose()
    if as_json:
        data = {"workers": [msgspec.to_builtins(w) for w in status.workers],
                "queues": [asdict(q) for q in status.queues]}
        out.write(json.dumps(data, indent=2) + "\n")
        return 0
    out.write(f"redis: {url}\n\nworkers ({len(status.workers)}):\n")
    for w in status.workers:
        state = "draining" if w.draining else "serving"
        out.write(f"  {w.worker_id:<32} {state:<8} queue={w.queue} model={w.model} "
                  f"running={w.num_running}/{w.max_num_seqs} waiting={w.num_waiting} "
                  f"kv={w.kv_usage:.0%} tok/s={w.tokens_per_s:.1f} done={w.num_finished}\n")
    out.write(f"\nqueues ({len(status.queues)}):\n")
    for q in status.queues:
        limit = q.max_queue_len or "none"
        lanes = ", ".join(f"{lane} {n}" for lane, n in q.backlog_by_lane.items())
        out.write(f"  {q.queue:<20} backlog={q.backlog} ({lanes}) pending={q.pending} "
                  f"consumers={q.num_consumers} dead={q.num_dead} limit={limit}\n")
    return 0


async def serve_gateway(settings: WorkerSettings) -> int:
    """Serve the HTTP gateway on `settings.queue` until SIGTERM/SIGINT, then drain."""
    try:
        from tokenfleet.producer.gateway import GatewayConfig
        from tokenfleet.producer.gateway_server import GatewayServer
    except ImportError as e:
        print(f"error: the gateway needs aiohttp ({e}): pip install 'tokenfleet[gateway]'",
              file=sys.stderr)
        return 2
    from importlib.metadata import version

    url = resolve_redis_url(settings)
    config = GatewayConfig(queue=settings.queue, api_key=settings.gateway_api_key,
                           timeout_s=settings.gateway_timeout_s,
                           default_max_tokens=settings.gateway_default_max_tokens,
                           version=version("tokenfleet"), owner_ttl_s=settings.owner_ttl_s,
                           max_best_of=settings.gateway_max_best_of)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # A stalled Redis answers 503 at submit in 10 s rather than holding requests open.
    async with Client(url, keys=Keys(settings.key_prefix), default_queue=settings.queue,
                      max_connections=256, socket_timeout_s=10.0) as client:
        server = GatewayServer(client, config, host=settings.gateway_host,
                               port=settings.gateway_port,
                               drain_timeout_s=settings.drain_timeout_s)
        try:
            await server.start()
        except OSError as e:
            print(f"error: cannot listen on {settings.gateway_host}:{settings.gateway_port}: "
                  f"{e}", file=sys.stderr)
            return 2
        print(f"gateway listening on http://{settings.gateway_host}:{server.port} "
              f"(queue {settings.queue!r}, redis {url})", file=sys.stderr, flush=True)
        if settings.gateway_api_key is None and settings.gateway_host not in _LOOPBACK:
            print("warning: the gateway accepts requests from the network without an API key "
                  "(set TOKENFLEET_GATEWAY_API_KEY)", file=sys.stderr, flush=True)
        await stop.wait()
        await server.stop()
    return 0


def _summary(final: FinalEvent) -> str:
    ttft = "-" if final.ttft_ms is None else f"{final.ttft_ms:.0f} ms"
    return (f"[{final.details.generated_tokens} tokens, {final.details.finish_reason}, "
            f"queue {final.queue_ms:.0f} ms, ttft {ttft}, total {final.total_ms:.0f} ms]")
