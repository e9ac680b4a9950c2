"""The `tokenfleet` command.

    tokenfleet worker --model smollm2 --redis-url redis://…   serve a queue
    tokenfleet up                                              embedded Valkey + one worker
    tokenfleet demo                                            ask "What is the capital of France?"
    tokenfleet gateway                                         TGI + OpenAI HTTP APIs on a queue
    tokenfleet generate "prompt" [--chat] [--stream] [--local]
    tokenfleet status                                          workers, backlog, dead letters
    tokenfleet models pull smollm2                             download + convert a model
    tokenfleet settings [--markdown]                           every setting and its env var

Heavy imports (torch, the engine) happen inside the commands that need them, so the client
commands work where only the producer is installed.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import shutil
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tokenfleet.worker.bench_cli import add_bench_parser
from tokenfleet.worker.settings import WorkerSettings

__all__ = ["build_parser", "main"]

_ENGINE_OPTIONS = ("engine", "model", "cache_dir", "device", "dtype", "max_num_seqs",
                   "max_num_batched_tokens", "kv_cache_bytes", "num_kv_blocks", "block_size",
                   "num_threads", "quantize", "cpu_compile", "cpu_attention_kernel",
                   "cpu_sampler_kernel", "cpu_gemm_kernel",
                   "attention_backend",
                   "gpu_memory_utilization", "cuda_graph_max_batch", "async_decode",
                   "speculate", "tensor_parallel_size",
                   "sim_step_ms", "sim_vocab_size", "sim_max_model_len")
_CLIENT_OPTIONS = ("redis_url", "cache_dir", "queue", "key_prefix")
_GATEWAY_OPTIONS = (*_CLIENT_OPTIONS, "gateway_host", "gateway_port", "gateway_api_key",
                    "gateway_timeout_s", "gateway_default_max_tokens", "drain_timeout_s",
                    "owner_ttl_s", "gateway_max_best_of",
                    "log_format", "log_level")
_SECRET_SETTINGS = frozenset({"gateway_api_key"})
_DEMO_PROMPT = "What is the capital of France?"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tokenfleet", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("worker", help="serve a queue (settings from flags or TOKENFLEET_*)")
    WorkerSettings.add_arguments(p)

    p = sub.add_parser("up", help="start an embedded Valkey and one worker")
    WorkerSettings.add_arguments(p, [f.name for f in dataclasses.fields(WorkerSettings)
                                     if f.name != "redis_url"])

    p = sub.add_parser("demo", help=f"embedded Valkey + worker; stream {_DEMO_PROMPT!r}")
    WorkerSettings.add_arguments(p, (*_ENGINE_OPTIONS, "log_level"))
    p.add_argument("--prompt", default=_DEMO_PROMPT, help="the chat prompt to ask")
    p.add_argument("--max-new-tokens", type=int, default=40)

    p = sub.add_parser("gateway", help="serve TGI's and OpenAI's HTTP APIs in front of a queue")
    WorkerSettings.add_arguments(p, _GATEWAY_OPTIONS)

    p = sub.add_parser("generate", help="generate text through the fleet (or --local)")
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="send as a chat message (template)")
    p.add_argument("--stream", action="store_true", help="print tokens as they arrive")
    p.add_argument("--local", action="store_true", help="run the engine here, without Redis")
    p.add_argument("--timeout-s", type=float, default=None, help="give up waiting after this")
    _add_parameter_arguments(p)
    WorkerSettings.add_arguments(p, dict.fromkeys((*_CLIENT_OPTIONS, *_ENGINE_OPTIONS)))

    p = sub.add_parser("status", help="workers, queue backlog, pending, dead letters")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.add_argument("queues", nargs="*", help="queues to show besides the workers' own")
    WorkerSettings.add_arguments(p, _CLIENT_OPTIONS)

    p = sub.add_parser("models", help="manage local models")
    models = p.add_subparsers(dest="models_command", required=True, metavar="ACTION")
    pull = models.add_parser("pull", help="download and convert a model into the cache")
    pull.add_argument("name", help="model alias, e.g. smollm2")
    WorkerSettings.add_arguments(pull, ["cache_dir"])

    p = sub.add_parser("settings", help="list every setting with its env var and default")
    p.add_argument("--markdown", action="store_true", help="as the deploy/ENV.md table")
    add_bench_parser(sub)
    return parser


def _add_parameter_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--temperature", type=float, default=None)
    p.add_argument("--top-k", type=int, default=None)
    p.add_argument("--top-p", type=float, default=None)
    p.add_argument("--repetition-penalty", type=float, default=None)
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--do-sample", action="store_true", default=None)
    p.add_argument("--stop", action="append", default=None, help="stop sequence (repeatable)")
    shape = p.add_mutually_exclusive_group()
    shape.add_argument("--json-schema", default=None, metavar="SCHEMA",
                       help="constrain the answer to a JSON schema (its JSON, or @file.json)")
    shape.add_argument("--regex", default=None, help="constrain the answer to a regex")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `tokenfleet` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    try:
        settings = WorkerSettings.from_args(args)
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    handler = _COMMANDS[args.command]
    return handler(args, settings)


def _cmd_worker(args: argparse.Namespace, settings: WorkerSettings) -> int:
    from redis.exceptions import ConnectionError as RedisConnectionError

    from tokenfleet.worker.logging import configure_logging
    from tokenfleet.worker.worker import Worker

    configure_logging(settings.log_format, settings.log_level)
    try:
        return asyncio.run(Worker(settings).run(install_signal_handlers=True,
                                                freeze_heap=settings.gc_freeze))
    except (RedisConnectionError, ConnectionError) as e:
        print(f"error: cannot reach Redis at {settings.redis_url}: {e}", file=sys.stderr)
        return 2


def _cmd_up(args: argparse.Namespace, settings: WorkerSettings) -> int:
    return _cmd_worker(args, dataclasses.replace(settings, redis_url=None))


def _cmd_demo(args: argparse.Namespace, settings: WorkerSettings) -> int:
    from tokenfleet.worker.logging import configure_logging

    level = args.log_level or "warning"  # keep the answer readable
    configure_logging(settings.log_format, level)
    return asyncio.run(_demo(settings, args.prompt, args.max_new_tokens))


async def _demo(settings: WorkerSettings, prompt: str, max_new_tokens: int) -> int:
    from tokenfleet.worker.client_commands import generate_remote
    from tokenfleet.worker.embedded import EmbeddedValkey
    from tokenfleet.worker.worker import Worker

    data_dir = Path(tempfile.mkdtemp(prefix="tokenfleet-demo-"))
    server = EmbeddedValkey(data_dir)
    try:
        url = await asyncio.to_thread(server.start)
        settings = dataclasses.replace(settings, redis_url=url, drain_timeout_s=10.0)
        worker = Worker(settings)
        running = asyncio.create_task(worker.run(install_signal_handlers=True))
        ready = asyncio.create_task(worker.ready.wait())
        await asyncio.wait([running, ready], return_when=asyncio.FIRST_COMPLETED)
        if running.done():
            ready.cancel()
            return running.result() or 1
        print(f"> {prompt}")
        code = await generate_remote(settings, prompt, chat=True, stream=True, model=None,
                                     parameters={"max_new_tokens": max_new_tokens},
                                     timeout_s=600)
        worker.request_stop()
        return code or await running
    finally:
        await asyncio.to_thread(server.stop)
        shutil.rmtree(data_dir, ignore_errors=True)


def _cmd_gateway(args: argparse.Namespace, settings: WorkerSettings) -> int:
    from tokenfleet.worker.client_commands import serve_gateway
    from tokenfleet.worker.logging import configure_logging

    configure_logging(settings.log_format, settings.log_level)
    return asyncio.run(serve_gateway(settings))


def _cmd_generate(args: argparse.Namespace, settings: WorkerSettings) -> int:
    from tokenfleet.worker.client_commands import generate_local, generate_remote

    names = ("max_new_tokens", "temperature", "top_k", "top_p", "repetition_penalty", "seed",
             "do_sample", "stop")
    parameters: dict[str, Any] = {n: getattr(args, n) for n in names
                                  if getattr(args, n) is not None}
    if args.regex is not None:
        parameters["grammar"] = {"type": "regex", "value": args.regex}
    if args.json_schema is not None:
        schema = args.json_schema
        if schema.startswith("@"):
            try:
                schema = Path(schema[1:]).read_text()
            except OSError as e:
                print(f"error: cannot read the JSON schema: {e}", file=sys.stderr)
                return 2
        parameters["grammar"] = {"type": "json", "value": schema}
    if args.local:
        return generate_local(settings, args.prompt, chat=args.chat, stream=args.stream,
                              parameters=parameters)
    return asyncio.run(generate_remote(settings, args.prompt, chat=args.chat, stream=args.stream,
                                       model=args.model, parameters=parameters,
                                       timeout_s=args.timeout_s))


def _cmd_status(args: argparse.Namespace, settings: WorkerSettings) -> int:
    from tokenfleet.worker.client_commands import show_status

    return asyncio.run(show_status(settings, list(args.queues), as_json=args.json))


def _cmd_models(args: argparse.Namespace, settings: WorkerSettings) -> int:
    from tokenfleet.engine.hub import pull_model

    path = pull_model(args.name, cache_dir=settings.resolved_cache_dir)
    print(path)
    return 0


def _cmd_settings(args: argparse.Namespace, settings: WorkerSettings) -> int:
    if args.markdown:
        sys.stdout.write(WorkerSettings.markdown_table())
        return 0
    for f in dataclasses.fields(WorkerSettings):
        value = getattr(settings, f.name)
        if f.name in _SECRET_SETTINGS and value is not None:
            value = "<set>"
        print(f"{f.name:<26} = {value!r}")
    return 0


def _cmd_bench(args: argparse.Namespace, settings: WorkerSettings) -> int:
    from tokenfleet.worker.bench_cli import cmd_bench

    return cmd_bench(args, settings)


_COMMANDS = {
    "worker": _cmd_worker,
    "up": _cmd_up,
    "demo": _cmd_demo,
    "gateway": _cmd_gateway,
    "generate": _cmd_generate,
    "status": _cmd_status,
    "models": _cmd_models,
    "settings": _cmd_settings,
    "bench": _cmd_bench,
}

if __name__ == "__main__":
    sys.exit(main())
