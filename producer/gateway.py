"""The HTTP gateway: TGI's and OpenAI's HTTP APIs in front of the fleet.

    tokenfleet gateway --redis-url redis://… --gateway-port 8080
    curl localhost:8080/generate -H 'Content-Type: application/json' \\
         -d '{"inputs": "Hello", "parameters": {"max_new_tokens": 20}}'

The gateway is one more producer: it validates a request, enqueues it through admission
control and turns the request's events into an HTTP response, streamed as server-sent events
or whole. It holds no model and no tokenizer and keeps no state between requests, so any
number of gateways can run behind a load balancer. Routes:

    POST /generate, /generate_stream, /     TGI (text_generation.Client works unchanged)
    POST /v1/chat/completions, /v1/completions   OpenAI-compatible
    GET  /health, /info, /v1/models          liveness and what the queue's workers serve
    DELETE /requests/{id}                    cancel a request

An `X-Priority` header (an integer) puts a request in the queue's high (> 0) or low (< 0)
priority lane; workers pull high before normal before low.

Status codes follow TGI: 422 validation, 429 overloaded (backlog at `max_queue_len`), 424
generation failed, 500 incomplete generation; plus 504 when a deadline or the gateway's
timeout passes, 503 when Redis cannot be reached, 401 without the API key, 410 when an
Idempotency-Key's request has expired. A request that its HTTP client abandons (disconnect,
gateway timeout, gateway shutdown after the drain time) is cancelled in the fleet, unless the
client sent an `Idempotency-Key` header: such a request keeps running, and the same POST
with the same key re-attaches to it (its stream replays from the first token).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import uuid
from collections.abc import Coroutine
from dataclasses import dataclass
from typing import Any, Final

import structlog
from aiohttp import web
from redis.exceptions import RedisError

from tokenfleet.producer import openai_api
from tokenfleet.producer.api_renderers import (
    ChatRenderer,
    CompletionRenderer,
    Renderer,
    TgiRenderer,
)
from tokenfleet.producer.client import Client
from tokenfleet.producer.errors import ValidationError, error_class
from tokenfleet.producer.fleet_request import FleetRequest
from tokenfleet.producer.fleet_status import live_workers
from tokenfleet.producer.gateway_metrics import GatewayMetrics
from tokenfleet.producer.gateway_middleware import GatewayMiddleware, json_response, outcome
from tokenfleet.producer.protocol import ErrorEvent, FinalEvent
from tokenfleet.producer.sse_stream import SseStream
from tokenfleet.producer.tgi_api import (
    MAX_BEST_OF,
    best_of,
    decode_generate_request,
    job_arguments,
    response_headers,
)
from tokenfleet.producer.tool_calls import ToolCallPlan
from tokenfleet.producer.validation import validate_request_id

__all__ = ["MAX_COPIES", "Gateway", "GatewayConfig"]

log = structlog.get_logger("tokenfleet.gateway")

MAX_COPIES: Final = max(MAX_BEST_OF, openai_api.MAX_N)  # jobs one request may run as

MAX_BODY_BYTES: Final = 16 * 1024 * 1024  # long prompts: 128k tokens is ~0.5 MB of text


@dataclass(frozen=True)
class GatewayConfig:
    """What one gateway serves and how (see the `gateway_*` settings)."""

    queue: str = "default"
    api_key: str | None = None
    timeout_s: float | None = None
    default_max_tokens: int = 1024
    version: str = ""
    owner_ttl_s: float = 0.0  # > 0: jobs without an Idempotency-Key die with the gateway
    max_best_of: int = MAX_BEST_OF  # answers (jobs) one request may ask for: best_of, n


class Gateway:
    """The aiohttp application; `app()` builds it, `aclose()` waits for pending cancels."""

    def __init__(self, client: Client, config: GatewayConfig) -> None:
        self.client = client
        self.config = config
        self.metrics = GatewayMetrics()
        self.owner_id: str | None = None  # GatewayServer's OwnerLiveness, when it keeps one
        self._background: set[asyncio.Task[None]] = set()
        self._in_flight: set[FleetRequest] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def app(self) -> web.Application:
        middleware = GatewayMiddleware(self.config.api_key, self.metrics)
        app = web.Application(middlewares=[middleware.errors, middleware.auth],
                              client_max_size=MAX_BODY_BYTES)
        app.router.add_post("/", self._compat)
        app.router.add_post("/generate", self._generate)
        app.router.add_post("/generate_stream", self._generate_stream)
        app.router.add_post("/v1/chat/completions", self._chat)
        app.router.add_post("/v1/completions", self._completions)
        app.router.add_get("/health", self._health)
        app.router.add_get("/info", self._info)
        app.router.add_get("/v1/models", self._models)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_delete("/requests/{request_id}", self._cancel)
        return app

    async def drain(self, timeout_s: float) -> int:
        """Wait up to `timeout_s` for the requests in flight to finish, then cancel the rest
        in the fleet (their streams then end with the cancel), except those sent with an
        Idempotency-Key: their clients can re-attach through another gateway. Returns how
        many were cancelled."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout_s):
                await self._idle.wait()
        left = [f for f in self._in_flight if not f.finished and f.cancel_on_abandon]
        for fleet in left:
            self._spawn(self.client.cancel(fleet.job.id))
            fleet.cancel_on_abandon = False  # cancelled (and counted) here, not at its exit
        self.metrics.abandoned.inc(len(left))
        return len(left)

    async def aclose(self) -> None:
        """Let the cancels of abandoned requests reach Redis before the client closes."""
        if self._background:
            await asyncio.wait(self._background, timeout=5.0)

    # -- TGI ------------------------------------------------------------------------------
    async def _compat(self, request: web.Request) -> web.StreamResponse:
        body = decode_generate_request(await request.read())
        renderer = TgiRenderer(details=bool(body.parameters.get("details")), as_list=True)
        return await self._run(request, job_arguments(body), renderer, stream=body.stream,
                               copies=best_of(body, stream=body.stream,
                                              max_best_of=self.config.max_best_of))

    async def _generate(self, request: web.Request) -> web.StreamResponse:
        body = decode_generate_request(await request.read())
        renderer = TgiRenderer(details=bool(body.parameters.get("details")))
        return await self._run(request, job_arguments(body), renderer, stream=False,
                               copies=best_of(body, stream=False,
                                              max_best_of=self.config.max_best_of))

    async def _generate_stream(self, request: web.Request) -> web.StreamResponse:
        body = decode_generate_request(await request.read())
        renderer = TgiRenderer(details=bool(body.parameters.get("details")))
        best_of(body, stream=True, max_best_of=self.config.max_best_of)  # > 1: refused
        return await self._run(request, job_arguments(body), renderer, stream=True)

    # -- OpenAI ---------------------------------------------------------------------------
    async def _chat(self, request: web.Request) -> web.StreamResponse:
        body = openai_api.decode(await request.read(), openai_api.ChatRequest)
        tools = ToolCallPlan.build(body.tools, body.tool_choice)
        args = openai_api.chat_job_arguments(body, self.config.default_max_tokens, tools)
        renderer = ChatRenderer(model=body.model, request_id="",
                                include_usage=openai_api.include_usage(body),
                                logprobs=body.logprobs, tools=tools)
        return await self._run(request, args, renderer, stream=body.stream,
                               copies=openai_api.num_choices(body, self.config.max_best_of))

    async def _completions(self, request: web.Request) -> web.StreamResponse:
        body = openai_api.decode(await request.read(), openai_api.CompletionRequest)
        args = openai_api.completion_job_arguments(body, self.config.default_max_tokens)
        renderer = CompletionRenderer(model=body.model, request_id="",
                                      include_usage=openai_api.include_usage(body),
                                      logprobs=bool(body.logprobs),
                                      echo_prompt=args["inputs"] if body.echo else "")
        return await self._run(request, args, renderer, stream=body.stream,
                               copies=openai_api.num_choices(body, self.config.max_best_of))

    # -- one request through the fleet ------------------------------------------------------
    async def _run(self, request: web.Request, args: dict[str, Any], renderer: Renderer, *,
                   stream: bool, copies: int = 1) -> web.StreamResponse:
        """One job, or `copies` jobs of the same request (TGI's best_of, OpenAI's n) whose
        answers one response carries."""
        key = request.headers.get("Idempotency-Key")
        request_id = await _request_id(request, key)
        if isinstance(renderer, ChatRenderer | CompletionRenderer):
            prefix = "chatcmpl-" if isinstance(renderer, ChatRenderer) else "cmpl-"
            renderer.request_id = prefix + request_id
        jobs = [self.client.build_job(request_id=f"{request_id}-{i}" if i else request_id,
                                      deadline_s=self.config.timeout_s,
                                      priority=_priority(request),
                                      owner=self.owner_id if key is None else None,
                                      **_copy_args(args, i))
                for i in range(copies)]
        outcome()["id"] = request_id
        async with contextlib.AsyncExitStack() as stack:
            fleets = [await stack.enter_async_context(FleetRequest(
                self.client, job, queue=self.config.queue, timeout_s=self.config.timeout_s,
                spawn=self._spawn, cancel_on_abandon=key is None)) for job in jobs]
            self._in_flight.update(fleets)
            self._idle.clear()
            try:
                if stream:
                    return await SseStream(request, fleets,
                                           renderer.for_choices(copies)).respond()
                finals = await _all_finals(fleets)
                outcome()["tokens"] = sum(f.details.generated_tokens for f in finals)
                if copies == 1:
                    body, shown = renderer.body(finals[0], fleets[0].tokens), finals[0]
                else:
                    tokens = [fleet.tokens for fleet in fleets]
                    body = renderer.body_many(finals, tokens)
                    shown = renderer.headline(finals, tokens)
                return json_response(body, headers=response_headers(shown))
            finally:
                # FleetRequest's exit cancels them; counted per job, as drain counts them
                outcome()["abandoned"] = sum(not f.finished and f.cancel_on_abandon
                                             for f in fleets)
                self._in_flight.difference_update(fleets)
                if not self._in_flight:
                    self._idle.set()

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(_log_failure)

    # -- fleet information ---------------------------------------------------------------------
    async def _health(self, request: web.Request) -> web.Response:
        """200 while Redis answers: jobs can be queued even with no worker up yet (a fleet
        scaled to zero starts workers on queue lag); the body says how many serve."""
        try:
            await self.client.redis.ping()
            workers = await self._queue_workers()
        except (RedisError, OSError) as e:
            return json_response({"status": "unavailable", "error": f"Redis: {e}"}, status=503)
        serving = sum(not w.draining for w in workers)
        return json_response({"status": "ok", "queue": self.config.queue, "num_workers": serving})

    async def _info(self, request: web.Request) -> web.Response:
        workers = await self._queue_workers()
        models = sorted({w.model for w in workers})
        return json_response({"model_id": models[0] if len(models) == 1 else ",".join(models),
                      "router": "tokenfleet-gateway", "version": self.config.version,
                      "queue": self.config.queue, "num_workers": len(workers),
                      "max_best_of": self.config.max_best_of, "max_stop_sequences": 16,
                      "max_concurrent_requests": sum(w.max_num_seqs for w in workers)})

    async def _models(self, request: web.Request) -> web.Response:
        workers = await self._queue_workers()
        data = [{"id": model, "object": "model", "created": 0, "owned_by": "tokenfleet"}
                for model in sorted({w.model for w in workers})]
        return json_response({"object": "list", "data": data})

    async def _metrics(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.exposition(),
                            content_type="text/plain", charset="utf-8")

    async def _cancel(self, request: web.Request) -> web.Response:
        request_id = validate_request_id(request.match_info["request_id"])
        # A best_of / n request runs as copies <id>, <id>-1, ...: stop them all (a cancel
        # for a copy that does not exist only leaves a short-lived key).
        most = max(MAX_COPIES, self.config.max_best_of)  # also copies made under a higher limit
        copies = [request_id, *(f"{request_id}-{i}" for i in range(1, most))]
        await asyncio.gather(*(self.client.cancel(rid) for rid in copies))
        return json_response({"id": request_id, "status": "cancelling"}, status=202)

    async def _queue_workers(self) -> list[Any]:
        return [w for w in await live_workers(self.client.redis, self.client.keys)
                if w.queue == self.config.queue]


async def _all_finals(fleets: list[FleetRequest]) -> list[FinalEvent]:
    """Every copy's final, in copy order; the first error (an error event, or the wait's
    own) ends the wait at once, and leaving the request's block cancels the other copies."""
    tasks = [asyncio.create_task(fleet.final()) for fleet in fleets]
    try:
        for done in asyncio.as_completed(tasks):
            end = await done
            if isinstance(end, ErrorEvent):
                raise error_class(end.error_type)(end.error, request_id=end.id)
        return [end for end in (t.result() for t in tasks) if isinstance(end, FinalEvent)]
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _copy_args(args: dict[str, Any], i: int) -> dict[str, Any]:
    """Job arguments of copy `i` of a request: a seeded request's copies draw seeds seed + i
    (otherwise every copy would give the same answer)."""
    if i == 0 or args.get("seed") is None:
        return args
    return {**args, "seed": (args["seed"] + i) % 2**64}


def _priority(request: web.Request) -> int:
    """The `X-Priority` header: > 0 the queue's high lane, < 0 its low lane (default 0)."""
    raw = request.headers.get("X-Priority")
    if raw is None:
        return 0
    try:
        priority = int(raw)
    except ValueError:
        priority = None
    if priority is None or not -(2**31) <= priority < 2**31:
        raise ValidationError(f"Input validation error: X-Priority must be an integer, "
                              f"got {raw!r}")
    return priority


async def _request_id(request: web.Request, key: str | None) -> str:
    """A fresh id, or one derived from the Idempotency-Key and the request body: a retry (same
    key, same body; streamed or not) finds its earlier request; a different request sent
    under the same key is a different request, never the earlier one's answer."""
    if key is None:
        return uuid.uuid4().hex
    validate_request_id(key)
    digest = hashlib.sha256(f"{key}\n".encode() + await request.read())
    return "idem-" + digest.hexdigest()[:40]


def _log_failure(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("cancel_failed", error=repr(task.exception()))
