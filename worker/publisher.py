"""Write events to Redis: one pipeline per engine step, shielded from cancellation.

For each request in a step: XADD every event to the request's capped, TTL'd replay stream,
then PUBLISH it on the request's channel (XADD first, so whatever a client hears on the
channel is already replayable). A finished request's final bookkeeping rides in the same
pipeline: SET the result (TTL), then XACK + XDEL the job — ack last, so a crash before it
means the job is redelivered (at-least-once). Those three (and a dead letter's XADD) run in
a MULTI/EXEC of their own: a Redis at `maxmemory` refuses the SET (OOM) but not the acks,
and the refusal then aborts the whole finish instead of acking a job whose result was not
stored. (The token events around it stay a plain pipeline: a transaction over a whole step
cost ~14 % more client time.) Clients dedupe by index, so a retried pipeline that repeats
events is harmless.

A pipeline that fails on a lost connection is retried until Redis answers again (backoff via
`Connectivity`); nothing is dropped, so the replay stream stays complete. A request aborted at
its deadline ends with a `deadline_exceeded` error event instead of its final event.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from typing import Any, Final

import structlog
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tokenfleet.engine.outputs import FinishReason, StepOutput
from tokenfleet.producer.keys import LANES, Keys
from tokenfleet.producer.protocol import ErrorEvent, FinalEvent, encode
from tokenfleet.worker.connectivity import Connectivity, is_transient
from tokenfleet.worker.inflight import InFlightRequest

__all__ = ["DEAD_LETTERS_MAXLEN", "Finished", "Publisher"]

DEAD_LETTERS_MAXLEN: Final = 100_000

_Command = tuple[str, tuple[Any, ...], dict[str, Any]]
Finished = tuple[InFlightRequest, FinalEvent | ErrorEvent]


class Publisher:
    """Publishes events and finishes jobs of one queue."""

    def __init__(self, redis: Redis, keys: Keys, queue: str, *, worker_id: str,
                 result_ttl_s: int, events_ttl_s: int, events_maxlen: int,
                 connectivity: Connectivity | None = None) -> None:
        self._redis = redis
        self._connectivity = connectivity if connectivity is not None else Connectivity()
        self._keys = keys
        self._jobs = {lane: keys.jobs(queue, lane) for lane in LANES}
        self._dead = keys.dead(queue)
        self._group = keys.group(queue)
        self._worker_id = worker_id
        self._result_ttl_s = result_ttl_s
        self._events_ttl_s = events_ttl_s
        self._events_maxlen = events_maxlen
        self._log = structlog.get_logger("tokenfleet.publisher")

    async def publish(self, outputs: list[StepOutput],
                      inflight: Mapping[str, InFlightRequest]) -> list[Finished]:
        """Publish one or more steps' outputs; returns the requests that finished."""
        now_ms = time.time() * 1000
        batch: list[_Command] = []
        finished: list[Finished] = []
        for out in outputs:
            req = inflight.get(out.request_id)
            if req is None:
                continue  # already failed or finished (e.g. aborted after an engine failure)
            # Aborted at its deadline (a natural finish in the same step stays a final).
            expired = req.expired and out.finish_reason is FinishReason.CANCELLED
            failed = out.finish_reason is FinishReason.ERROR
            last = (out.tokens[-1] if out.finished and out.tokens and not (expired or failed)
                    else None)
            body = out.tokens[:-1] if last is not None else out.tokens
            payloads = [encode(e) for e in req.token_events(body, now_ms)]
            if out.finished:
                end: FinalEvent | ErrorEvent = (
                    req.deadline_error() if expired
                    else req.generation_error(out.error or "generation failed") if failed
                    else req.final_event(out, last, now_ms))
                payloads.append(encode(end))
                finished.append((req, end))
            # The replay stream's TTL is set on its first events, refreshed once a quarter of
            # it has passed, and set again at the end: not one EXPIRE per step, which was a
            # third of all commands per token event.
            refresh = (out.finished
                       or now_ms - req.events_ttl_set_ms > self._events_ttl_s * 1000 / 4)
            if refresh and payloads:
                req.events_ttl_set_ms = now_ms
            self._emit(batch, req.request_id, payloads, set_ttl=refresh)
            if out.finished:
                self._finish(batch, req.request_id, payloads[-1], req.entry_id, req.lane)
        await self._run(batch)
        return finished

    async def fail(self, entry_id: bytes, request_id: str | None, error: str, error_type: str,
                   *, raw: Mapping[bytes, bytes] | None = None, lane: str = "normal") -> None:
        """Finish a job with an error event (when its id is known); dead-letter the raw entry
        when `raw` is given; then ack and delete the job."""
        batch: list[_Command] = []
        dead: _Command | None = None
        payload: bytes | None = None
        if request_id is not None:
            payload = encode(ErrorEvent(id=request_id, error=error, error_type=error_type))
            self._emit(batch, request_id, [payload])
        if raw is not None:
            fields = dict(raw)
            fields.update({
                b"dead_error": error.encode(),
                b"dead_error_type": error_type.encode(),
                b"dead_entry_id": entry_id,
                b"dead_lane": lane.encode(),
                b"dead_worker": self._worker_id.encode(),
                b"dead_ms": str(int(time.time() * 1000)).encode(),
            })
            dead = _cmd("xadd", self._dead, fields, maxlen=DEAD_LETTERS_MAXLEN,
                        approximate=True)
        self._finish(batch, request_id, payload, entry_id, lane, dead=dead)
        await self._run(batch)

    async def finish_again(self, entry_id: bytes, request_id: str, payload: bytes, *,
                           lane: str = "normal") -> None:
        """A job that an earlier run finished (its terminal event is `payload`) was delivered
        again: make sure the result is stored, then ack and delete the entry."""
        batch: list[_Command] = []
        self._finish(batch, request_id, payload, entry_id, lane, nx=True)
        await self._run(batch)

    def _emit(self, batch: list[_Command], request_id: str, payloads: list[bytes],
              set_ttl: bool = True) -> None:
        if not payloads:
            return
        events_key = self._keys.events(request_id)
        channel = self._keys.tokens(request_id)
        for payload in payloads:
            batch.append(_cmd("xadd", events_key, {b"e": payload}, maxlen=self._events_maxlen,
                              approximate=True))
            batch.append(_cmd("publish", channel, payload))
        if set_ttl:
            batch.append(_cmd("expire", events_key, self._events_ttl_s))

    def _finish(self, batch: list[_Command], request_id: str | None, payload: bytes | None,
                entry_id: bytes, lane: str, *, nx: bool = False,
                dead: _Command | None = None) -> None:
        """SET the result (when there is an id), XADD the dead letter (when there is one),
        XACK + XDEL the job: all or none of them (MULTI/EXEC inside the pipeline)."""
        jobs = self._jobs[lane]
        batch.append(_cmd("execute_command", "MULTI"))
        if request_id is not None and payload is not None:
            batch.append(_cmd("set", self._keys.result(request_id), payload,
                              ex=self._result_ttl_s, nx=nx))
        if dead is not None:
            batch.append(dead)
        batch.append(_cmd("xack", jobs, self._group, entry_id))
        batch.append(_cmd("xdel", jobs, entry_id))
        batch.append(_cmd("execute_command", "EXEC"))

    async def _run(self, batch: list[_Command]) -> None:
        """Execute the batch as one pipeline; retry on connection loss; never half-cancel."""
        if batch:
            await asyncio.shield(self._run_with_retries(batch))

    async def _run_with_retries(self, batch: list[_Command]) -> None:
        backoff = self._connectivity.backoff()
        while True:
            try:
                async with self._redis.pipeline(transaction=False) as pipe:
                    for name, args, kwargs in batch:
                        getattr(pipe, name)(*args, **kwargs)
                    replies = await pipe.execute(raise_on_error=False)
            except (RedisConnectionError, RedisTimeoutError, OSError) as e:
                # Commands that did run before the failure run again: replay readers dedupe
                # by index, SET and XACK are idempotent.
                await self._connectivity.failed(e, "publish", backoff)
                continue
            refused = next((r for r in replies if isinstance(r, Exception) and is_transient(r)),
                           None)
            if refused is not None:  # e.g. READONLY during a failover: retry it all
                await self._connectivity.failed(refused, "publish", backoff)
                continue
            self._connectivity.succeeded(backoff, wrote=True)
            for (name, args, _), reply in zip(batch, replies, strict=True):
                # EXEC's reply lists its commands' own (run-time) errors
                for failure in reply if isinstance(reply, list) else [reply]:
                    if isinstance(failure, Exception):
                        self._log.error("publish_command_failed", command=name,
                                        key=str(args[0]), error=str(failure))
            return


def _cmd(name: str, *args: Any, **kwargs: Any) -> _Command:
    return name, args, kwargs
