"""One HTTP request's job in the fleet: enqueue it, read its events with a wait bound, and
cancel it when the caller walks away.

The gateway must wait for "the next event or N seconds, whichever comes first" (to send SSE
keep-alives and to decide when to start a stream), but cancelling an async generator's
`__anext__` closes the generator. So a background task drains the event stream into a queue
and `next_event` waits on the queue instead.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any

from redis.exceptions import RedisError

from tokenfleet.producer.client import Client
from tokenfleet.producer.errors import TokenfleetError
from tokenfleet.producer.event_stream import EventStream
from tokenfleet.producer.protocol import ErrorEvent, Event, FinalEvent, Job, TokenEvent

__all__ = ["FleetRequest"]

Spawn = Callable[[Coroutine[Any, Any, None]], None]


class FleetRequest:
    """`async with FleetRequest(...) as request:` enqueues `job`; `next_event` reads its events.

    `cancel_on_abandon`: when the block exits before the final/error event (the HTTP client
    disconnected, the wait timed out, the gateway is shutting down), ask the fleet to stop the
    job: nobody else can read a result whose id only this request knew. The cancel runs
    through `spawn` so that it completes even while the calling task is being cancelled.
    """

    def __init__(self, client: Client, job: Job, *, queue: str, timeout_s: float | None,
                 cancel_on_abandon: bool, spawn: Spawn) -> None:
        self.job = job
        self._client = client
        self._queue_name = queue
        self._timeout_s = timeout_s
        self.cancel_on_abandon = cancel_on_abandon
        self._spawn = spawn
        self._events: EventStream | None = None
        self._items: asyncio.Queue[Event | Exception] = asyncio.Queue()
        self._pump: asyncio.Task[None] | None = None
        self.finished = False
        self.tokens: list[TokenEvent] = []  # every token event seen, in index order

    async def __aenter__(self) -> FleetRequest:
        # Subscribe before enqueueing: pub/sub keeps no history (DESIGN §3.1).
        events = self._client.events(self.job.id, timeout_s=self._timeout_s)
        await events.__aenter__()
        try:
            # A duplicate whose result expired raises ExpiredRequestError (410).
            await self._client.enqueue(self.job, queue=self._queue_name)
        except BaseException as e:
            # Cancelled while the enqueue was on its way: the job may be queued all the same.
            if self.cancel_on_abandon and not isinstance(e, TokenfleetError):
                self._spawn(self._client.cancel(self.job.id))
            await events.__aexit__(None, None, None)
            raise
        self._events = events
        self._pump = asyncio.create_task(self._drain(events), name=f"events-{self.job.id}")
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        if not self.finished and self.cancel_on_abandon:  # first: the awaits below may be cut
            self._spawn(self._client.cancel(self.job.id))
        if self._pump is not None:
            self._pump.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pump
        if self._events is not None:
            await self._events.__aexit__(None, None, None)

    async def next_event(self, wait_s: float | None = None) -> Event | None:
        """The next event, or None when `wait_s` passes first.

        Raises what the event stream raised: ResultTimeoutError (the request's `timeout_s`),
        IncompleteGenerationError (the replay stream lost tokens).
        """
        try:
            async with asyncio.timeout(wait_s):
                item = await self._items.get()
        except TimeoutError:
            return None
        if isinstance(item, Exception):
            self.finished = isinstance(item, TokenfleetError) and item.error_type != "timeout"
            raise item
        if isinstance(item, TokenEvent):
            self.tokens.append(item)
        else:
            self.finished = True
        return item

    async def final(self) -> FinalEvent | ErrorEvent:
        """Wait for the last event (collecting the token events on the way)."""
        while True:
            event = await self.next_event()
            if isinstance(event, FinalEvent | ErrorEvent):
                return event

    async def _drain(self, events: EventStream) -> None:
        try:
            async for event in events:
                self._items.put_nowait(event)
        except (TokenfleetError, RedisError, OSError) as e:
            self._items.put_nowait(e)
