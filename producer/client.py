"""The asyncio producer client: submit jobs, stream their tokens, wait for results, cancel.

    async with Client("redis://localhost:6379") as client:
        async for event in client.generate_stream("Hello", max_new_tokens=20):
            print(event.token.text, end="")

To stream a job you submit yourself, subscribe first (pub/sub keeps no history; the replay
stream would still catch you up, but one read later):

    async with client.events(request_id) as events:
        await client.submit("Hello", request_id=request_id)
        async for event in events: ...
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import AsyncGenerator, Mapping, Sequence
from typing import Any

import msgspec
from redis.asyncio import BlockingConnectionPool, Redis
from redis.exceptions import RedisError

from tokenfleet.producer.admission import Admission, Admitted
from tokenfleet.producer.errors import (
    ExpiredRequestError,
    TokenfleetError,
    ValidationError,
    error_class,
)
from tokenfleet.producer.event_stream import EventStream
from tokenfleet.producer.keys import Keys, lane_for_priority
from tokenfleet.producer.protocol import (
    CancelCommand,
    ErrorEvent,
    Event,
    FinalEvent,
    Job,
    Message,
    Parameters,
    TokenEvent,
    decode_event,
    encode,
)
from tokenfleet.producer.subscriber import Subscriber
from tokenfleet.producer.validation import validate_job

__all__ = ["Client", "raise_for_error"]

_PARAMETER_NAMES = frozenset(Parameters.__struct_fields__)


class Client:
    """Producer side of the fleet. One per process (it multiplexes its subscriptions).

    `max_queue_len`: None = the limit the queue's workers publish; 0 = no limit.
    `idempotency_ttl_s`: how long a request id is remembered to drop duplicate submits.
    `max_connections`: size of the connection pool; callers beyond it wait for a free
    connection (up to `pool_timeout_s`) instead of failing, so thousands of concurrent
    streams share a bounded number of connections.
    `socket_timeout_s`: fail a command (RedisError) when a stalled server does not answer in
    time, instead of waiting for it; event streams retry through it (an outage is waited
    out), so a submit fails fast while a stream in progress survives a Redis restart.
    """

    def __init__(
        self,
        redis_url: str = "redis://localhost:6379/0",
        *,
        keys: Keys | None = None,
        default_queue: str = "default",
        default_model: str = "",
        max_queue_len: int | None = None,
        idempotency_ttl_s: int = 86_400,
        cancel_ttl_s: int = 3_600,
        poll_interval_s: float = 1.0,
        max_connections: int = 64,
        pool_timeout_s: float = 30.0,
        socket_timeout_s: float | None = None,
        redis: Redis | None = None,
    ) -> None:
        self.keys = keys if keys is not None else Keys()
        self.default_queue = default_queue
        self.default_model = default_model
        self.max_queue_len = max_queue_len
        self.cancel_ttl_s = cancel_ttl_s
        self.poll_interval_s = poll_interval_s
        self._owns_redis = redis is None
        self.redis: Redis = redis if redis is not None else Redis.from_pool(
            BlockingConnectionPool.from_url(redis_url, max_connections=max_connections,
                                            timeout=pool_timeout_s,
                                            socket_timeout=socket_timeout_s,
                                            socket_connect_timeout=socket_timeout_s))
        self._admission = Admission(self.redis, self.keys, idempotency_ttl_s=idempotency_ttl_s)
        self._subscriber = Subscriber(self.redis)

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Close the pub/sub connection and (if this client created it) the Redis client."""
        await self._subscriber.close()
        if self._owns_redis:
            await self.redis.aclose()

    # -- submitting -----------------------------------------------------------------------
    def build_job(
        self,
        inputs: str | None = None,
        *,
        messages: Sequence[Mapping[str, str] | Message] | None = None,
        model: str | None = None,
        request_id: str | None = None,
        priority: int = 0,
        deadline_ms: int | None = None,
        deadline_s: float | None = None,
        tenant: str | None = None,
        owner: str | None = None,
        **parameters: Any,
    ) -> Job:
        """Build and validate a Job (raises ValidationError).

        `deadline_s` (seconds from now) or `deadline_ms` (epoch ms): a job not started by
        then is dropped, and one still running then is stopped, both with an `error` event
        of type `deadline_exceeded` (docs/RELIABILITY.md). `owner`: the id of an
        `OwnerLiveness` whose key must stay alive for the job to keep running.
        """
        unknown = sorted(set(parameters) - _PARAMETER_NAMES)
        if unknown:
            raise ValidationError(f"Input validation error: unknown parameters {unknown}")
        now_ms = int(time.time() * 1000)
        if deadline_s is not None:
            deadline_ms = now_ms + int(deadline_s * 1000)
        try:
            job = Job(
                id=request_id if request_id is not None else uuid.uuid4().hex,
                model=self.default_model if model is None else model,
                inputs=inputs,
                messages=None if messages is None else msgspec.convert(
                    [_plain(m) for m in messages], list[Message]),
                parameters=msgspec.convert(parameters, Parameters),
                priority=priority,
                deadline_ms=deadline_ms,
                tenant=tenant,
                submitted_ms=now_ms,
                owner=owner,
            )
        except msgspec.ValidationError as e:
            raise ValidationError(f"Input validation error: {e}", request_id=request_id) from e
        validate_job(job)
        return job

    async def submit(self, inputs: str | None = None, *, queue: str | None = None,
                     **kwargs: Any) -> str:
        """Validate and enqueue one job; returns its request id.

        Keyword arguments are those of `build_job` (messages, model, request_id, priority,
        deadline_ms, deadline_s, tenant) plus TGI parameters (max_new_tokens, temperature …).
        Raises ValidationError, or OverloadedError when the queue's backlog is full.
        Submitting an id that was already submitted is a no-op, so a submit that failed on a
        connection error can be retried with the same `request_id` safely; if that earlier
        request's result has expired meanwhile, ExpiredRequestError (it cannot run twice).
        """
        job = self.build_job(inputs, **kwargs)
        await self.enqueue(job, queue=queue)
        return job.id

    async def enqueue(self, job: Job, *, queue: str | None = None) -> Admitted:
        """Enqueue an already built (and validated) job through admission control.

        Returns the stream entry; `duplicate` when the id was submitted before (then nothing
        was enqueued: the earlier job is the request). Raises ExpiredRequestError when that
        earlier request can no longer be followed (its result expired): waiting for it would
        never end.
        """
        admitted = await self._admission.admit(
            queue or self.default_queue, job.id, encode(job), max_queue_len=self.max_queue_len,
            lane=lane_for_priority(job.priority))
        if admitted.duplicate and not await self.request_exists(job, admitted, queue):
            raise ExpiredRequestError(
                f"request {job.id} was submitted before and its result has expired "
                "(result_ttl_s); submit it under a new id", request_id=job.id)
        return admitted

    async def request_exists(self, job: Job, admitted: Admitted,
                             queue: str | None = None) -> bool:
        """Whether a request that was admitted earlier can still be followed: its job is
        still queued or running, or its replay stream or result has not expired yet."""
        request_id = job.id
        jobs = self.keys.jobs(queue or self.default_queue, admitted.lane)
        async with self.redis.pipeline(transaction=False) as pipe:
            # Finishing SETs the result before it XDELs the job: check the job first.
            pipe.xrange(jobs, admitted.entry_id, admitted.entry_id)
            pipe.exists(self.keys.events(request_id), self.keys.result(request_id))
            entries, num_found = await pipe.execute()
        return bool(entries) or num_found > 0

    # -- following --------------------------------------------------------------------------
    def events(self, request_id: str, *, from_index: int = 0,
               timeout_s: float | None = None) -> EventStream:
        """An `async with` stream of the request's events (token…, then final or error)."""
        return EventStream(
            self.redis, self._subscriber, self.keys, request_id,
            from_index=from_index, poll_interval_s=self.poll_interval_s, timeout_s=timeout_s,
        )

    async def stream(self, request_id: str, *, from_index: int = 0,
                     timeout_s: float | None = None) -> AsyncGenerator[Event, None]:
        """Yield the request's events from `from_index` on, each index once, in order.

        Works for a request that is queued, running or finished (replay stream). Ends after
        the `final` or `error` event; error events are yielded, not raised.
        """
        async with self.events(request_id, from_index=from_index, timeout_s=timeout_s) as evs:
            async for event in evs:
                yield event

    async def generate_stream(self, inputs: str | None = None, *, queue: str | None = None,
                              timeout_s: float | None = None,
                              **kwargs: Any) -> AsyncGenerator[TokenEvent | FinalEvent, None]:
        """Submit and yield token events, then the final event; raises on an error event.

        `timeout_s` bounds the wait for the stream (ResultTimeoutError); `deadline_s` /
        `deadline_ms` (in kwargs) tell workers not to start the job after that time.
        """
        job = self.build_job(inputs, **kwargs)
        async with self.events(job.id, timeout_s=timeout_s) as events:
            await self.enqueue(job, queue=queue)
            async for event in events:
                yield raise_for_error(event)

    async def generate(self, inputs: str | None = None, *, queue: str | None = None,
                       timeout_s: float | None = None, **kwargs: Any) -> FinalEvent:
        """Submit and wait for the final event (raises the typed error on failure)."""
        events = self.generate_stream(inputs, queue=queue, timeout_s=timeout_s, **kwargs)
        async with contextlib.aclosing(events):
            async for event in events:
                if isinstance(event, FinalEvent):
                    return event
        raise TokenfleetError("stream ended without a final event")  # pragma: no cover

    async def result(self, request_id: str, timeout_s: float | None = None) -> FinalEvent:
        """Wait for the request's final event (raises its typed error, or ResultTimeoutError)."""
        try:
            data = await self.redis.get(self.keys.result(request_id))
        except (RedisError, OSError):
            data = None  # Redis is restarting: the stream below waits for it
        event = decode_event(data) if data is not None else None
        if event is None:
            events = self.stream(request_id, timeout_s=timeout_s)
            async with contextlib.aclosing(events):
                async for event in events:
                    if not isinstance(event, TokenEvent):
                        break
        final = raise_for_error(event) if event is not None else None
        if not isinstance(final, FinalEvent):
            raise TokenfleetError("stream ended without a final event", request_id=request_id)
        return final

    async def cancel(self, request_id: str) -> None:
        """Ask the fleet to stop the request: a queued job is dropped at intake, a running
        one is aborted within one engine step and finishes with finish_reason `cancelled`."""
        async with self.redis.pipeline(transaction=False) as pipe:
            pipe.set(self.keys.cancel(request_id), b"1", ex=self.cancel_ttl_s)
            pipe.publish(self.keys.control(), encode(CancelCommand(id=request_id)))
            await pipe.execute()


def raise_for_error(event: Event) -> TokenEvent | FinalEvent:
    """Return token/final events; raise the typed error carried by an error event."""
    if isinstance(event, ErrorEvent):
        raise error_class(event.error_type)(event.error, request_id=event.id)
    return event


def _plain(message: Mapping[str, str] | Message) -> Mapping[str, str]:
    if isinstance(message, Message):
        return {"role": message.role, "content": message.content}
    return message
