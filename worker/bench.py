"""The load generator of `tokenfleet bench`: drive a fleet (or an engine in this process) with
a workload and time every token.

    run = await run_fleet(client, requests, concurrency=8)        # through Redis
    run = run_in_process(engine, requests, concurrency=8)         # LLMEngine, no Redis

Both take the same `PreparedRequest`s (prompt text + requested output length; requests are
sent with `ignore_eos=True` and `max_new_tokens` = that length, so token counts are exact),
honour the same arrival times and concurrency cap, and return a `BenchRun` of
`RequestResult`s timed on `time.perf_counter()`. Fleet timings are taken when the client
receives each event; in-process timings when `step()` returns the token.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import itertools
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from redis.exceptions import RedisError

from tokenfleet.engine.sampling_params import SamplingParams
from tokenfleet.producer.client import Client
from tokenfleet.producer.errors import TokenfleetError
from tokenfleet.producer.protocol import ErrorEvent, Event, FinalEvent, TokenEvent
from tokenfleet.worker.bench_workload import RequestSpec
from tokenfleet.worker.engine_protocol import EngineLike

__all__ = ["BenchRun", "PreparedRequest", "RequestResult", "run_fleet", "run_in_process"]

OnDone = Callable[["RequestResult"], None]


@dataclass(frozen=True)
class PreparedRequest:
    """A workload request with its prompt text (`num_prompt_tokens` as the bench counted)."""

    spec: RequestSpec
    prompt: str
    num_prompt_tokens: int


@dataclass
class RequestResult:
    """Timings of one request; times are `time.perf_counter()` seconds, epochs are ms.

    `event_latencies_ms`: receive time minus the worker's publish time, for every token event
    (its `published_ms`) and the final event (`submitted_ms` + `total_ms`); for workers older
    than `published_ms`, the first token's publish time is estimated as `submitted_ms` +
    `ttft_ms`. Exact only when worker and client share a clock.
    """

    index: int
    prompt_len: int  # prompt tokens (the engine's count when it reported one)
    output_len: int  # tokens asked for
    start_s: float = 0.0
    token_times_s: list[float] = field(default_factory=list)  # one per generated token
    end_s: float = 0.0
    error: str | None = None
    submitted_ms: float = 0.0  # the job's, epoch ms
    first_token_wall_ms: float | None = None  # epoch ms when the first token was received
    published_end_ms: float | None = None  # epoch ms when the final event was published
    event_latencies_ms: list[float] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return len(self.token_times_s)

    @property
    def success(self) -> bool:
        return self.error is None

    @property
    def ttft_s(self) -> float:
        return self.token_times_s[0] - self.start_s if self.token_times_s else 0.0

    @property
    def e2e_s(self) -> float:
        return self.end_s - self.start_s

    @property
    def tpot_s(self) -> float:
        n = self.num_tokens
        return (self.e2e_s - self.ttft_s) / (n - 1) if n > 1 else 0.0

    @property
    def itls_s(self) -> list[float]:
        return [b - a for a, b in itertools.pairwise(self.token_times_s)]

    def finish(self, now_s: float) -> None:
        if not self.end_s:
            self.end_s = now_s
        if self.error is None and self.num_tokens != self.output_len:
            self.error = f"expected {self.output_len} tokens, received {self.num_tokens}"


@dataclass
class BenchRun:
    results: list[RequestResult]
    start_s: float
    end_s: float

    @property
    def duration_s(self) -> float:
        return self.end_s - self.start_s


def _params(req: PreparedRequest) -> dict[str, Any]:
    return {"max_new_tokens": req.spec.output_len, "ignore_eos": True}


# -- through the fleet ----------------------------------------------------------------------
async def run_fleet(client: Client, requests: Sequence[PreparedRequest], *,
                    concurrency: int | None = None, queue: str | None = None,
                    timeout_s: float | None = None, on_done: OnDone | None = None) -> BenchRun:
    """Send each request at its arrival time (at most `concurrency` in flight) and stream it."""
    run_id = uuid.uuid4().hex[:8]
    limit = asyncio.Semaphore(concurrency) if concurrency else contextlib.nullcontext()

    async def one(req: PreparedRequest) -> RequestResult:
        async with limit:
            result = await _fleet_request(client, req, f"bench-{run_id}-{req.spec.index}",
                                          queue, timeout_s)
        if on_done is not None:
            on_done(result)
        return result

    start_s = time.perf_counter()
    tasks = []
    for req in requests:
        delay_s = start_s + req.spec.arrival_s - time.perf_counter()
        if delay_s > 0:
            await asyncio.sleep(delay_s)
        tasks.append(asyncio.create_task(one(req)))
    results = await asyncio.gather(*tasks)
    return BenchRun(list(results), start_s, time.perf_counter())


async def _fleet_request(client: Client, req: PreparedRequest, request_id: str,
                         queue: str | None, timeout_s: float | None) -> RequestResult:
    result = RequestResult(req.spec.index, req.num_prompt_tokens, req.spec.output_len)
    result.start_s = time.perf_counter()
    try:
        job = client.build_job(req.prompt, request_id=request_id, **_params(req))
        result.submitted_ms = job.submitted_ms
        async with client.events(job.id, timeout_s=timeout_s) as events:
            await client.enqueue(job, queue=queue)
            async for event in events:
                _record(result, event)
    except (TokenfleetError, RedisError, OSError) as e:
        result.error = f"{type(e).__name__}: {e}"
        with contextlib.suppress(TokenfleetError, RedisError, OSError):
            await client.cancel(request_id)  # a timed-out request must not load the fleet on
    result.finish(time.perf_counter())
    return result


def _record(result: RequestResult, event: Event) -> None:
    now_s = time.perf_counter()
    if isinstance(event, TokenEvent):
        if not result.token_times_s:
            result.first_token_wall_ms = time.time() * 1000
        if event.published_ms is not None:  # workers since published_ms: every token counts
            result.event_latencies_ms.append(time.time() * 1000 - event.published_ms)
        result.token_times_s.append(now_s)
    elif isinstance(event, FinalEvent):
        received_ms = time.time() * 1000
        if event.token is not None:
            result.token_times_s.append(now_s)
        result.end_s = now_s
        result.prompt_len = event.usage.prompt_tokens or result.prompt_len
        result.published_end_ms = result.submitted_ms + event.total_ms
        if (result.first_token_wall_ms is not None and event.ttft_ms is not None
                and not result.event_latencies_ms):  # an older worker: estimate the first
            first_ms = result.submitted_ms + event.ttft_ms
            result.event_latencies_ms.append(result.first_token_wall_ms - first_ms)
        result.event_latencies_ms.append(received_ms - result.published_end_ms)
    elif isinstance(event, ErrorEvent):
        result.error = f"{event.error_type}: {event.error}"


# -- in this process --------------------------------------------------------------------------
def run_in_process(engine: EngineLike, requests: Sequence[PreparedRequest], *,
                   concurrency: int | None = None, on_done: OnDone | None = None) -> BenchRun:
    """The same workload straight against an engine (tokens timed when `step()` returns)."""
    pending = collections.deque(requests)
    running: dict[str, RequestResult] = {}
    results: list[RequestResult] = []
    run_id = uuid.uuid4().hex[:8]
    start_s = time.perf_counter()
    while pending or running:
        now_s = time.perf_counter()
        while pending and start_s + pending[0].spec.arrival_s <= now_s \
                and (not concurrency or len(running) < concurrency):
            req = pending.popleft()
            request_id = f"bench-{run_id}-{req.spec.index}"
            result = _add(engine, req, request_id)
            if result.error is None:
                running[request_id] = result
            else:
                results.append(result)
                if on_done is not None:
                    on_done(result)
        if not running:
            if pending:
                time.sleep(max(0.0, start_s + pending[0].spec.arrival_s - time.perf_counter()))
            continue
        outputs = engine.step()
        now_s = time.perf_counter()
        for out in outputs:
            result = running[out.request_id]
            result.token_times_s.extend([now_s] * len(out.tokens))
            if out.finished:
                result.prompt_len = out.num_prompt_tokens or result.prompt_len
                result.finish(now_s)
                results.append(running.pop(out.request_id))
                if on_done is not None:
                    on_done(result)
    return BenchRun(sorted(results, key=lambda r: r.index), start_s, time.perf_counter())


def _add(engine: EngineLike, req: PreparedRequest, request_id: str) -> RequestResult:
    result = RequestResult(req.spec.index, req.num_prompt_tokens, req.spec.output_len)
    result.start_s = time.perf_counter()
    try:  # tokenize here, as the worker's intake would
        prompt_ids = engine.tokenizer.encode(req.prompt)
        engine.add_request(request_id, prompt_ids, SamplingParams(**_params(req)))
    except ValueError as e:
        result.error = f"validation: {e}"
        result.finish(time.perf_counter())
    return result
