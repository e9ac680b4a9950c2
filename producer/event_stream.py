"""Follow one request's events: replay stream first, then the live channel (DESIGN §3.7).

The replay stream (`Keys.events`) is the source of truth; pub/sub is the fast path. Each
index is yielded exactly once and in order: duplicates are dropped, and a gap (an index
beyond the next expected one, or a quiet channel) triggers a re-read of the replay stream
from the last entry read. Workers XADD before they PUBLISH, so whatever arrives on the
channel is already in the replay stream.

A Redis outage or restart does not end the stream: a failed replay read is retried at the next
poll (the pub/sub connection reconnects and resubscribes by itself), and the events published
meanwhile are read back from the replay stream once the server answers again.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from types import TracebackType
from typing import Any, Final

import msgspec
from redis.asyncio import Redis
from redis.exceptions import RedisError

from tokenfleet.producer.errors import IncompleteGenerationError, ResultTimeoutError
from tokenfleet.producer.keys import Keys
from tokenfleet.producer.protocol import ErrorEvent, Event, FinalEvent, TokenEvent, decode_event
from tokenfleet.producer.subscriber import Subscriber

__all__ = ["EventStream"]

_REPLAY_PAGE: Final = 512


class EventStream:
    """Async iterator over a request's events, ending after its `final` or `error` event.

    Use as `async with EventStream(...) as events: ... async for event in events:`; the
    channel is subscribed on entry, so a job submitted inside the block loses nothing.
    """

    def __init__(
        self,
        redis: Redis,
        subscriber: Subscriber,
        keys: Keys,
        request_id: str,
        *,
        from_index: int = 0,
        poll_interval_s: float = 1.0,
        timeout_s: float | None = None,
    ) -> None:
        self.request_id = request_id
        self._redis = redis
        self._subscriber = subscriber
        self._keys = keys
        self._next_index = from_index
        self._poll_interval_s = poll_interval_s
        self._timeout_s = timeout_s
        self._last_replay_id = b"-"
        self._done = False
        self._channel: contextlib.AbstractAsyncContextManager[asyncio.Queue[bytes]] | None = None
        self._queue: asyncio.Queue[bytes] | None = None

    async def __aenter__(self) -> EventStream:
        self._channel = self._subscriber.channel(self._keys.tokens(self.request_id))
        self._queue = await self._channel.__aenter__()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._channel is not None:
            await self._channel.__aexit__(exc_type, exc, tb)
            self._channel = None

    def __aiter__(self) -> AsyncIterator[Event]:
        return self._iterate()

    async def _iterate(self) -> AsyncIterator[Event]:
        assert self._queue is not None, "use `async with EventStream(...)` before iterating"
        loop = asyncio.get_running_loop()
        deadline = None if self._timeout_s is None else loop.time() + self._timeout_s
        for event in (await self._try_catch_up())[0]:
            yield event
        while not self._done:
            wait_s = self._poll_interval_s
            if deadline is not None:
                wait_s = min(wait_s, deadline - loop.time())
                if wait_s <= 0:
                    raise ResultTimeoutError(
                        f"no final event within {self._timeout_s} s",
                        request_id=self.request_id,
                    )
            try:
                async with asyncio.timeout(wait_s):  # wait_for can swallow a cancel (3.11)
                    data = await self._queue.get()
            except TimeoutError:
                data = None  # quiet channel: a message may have been lost; read the replay
            for event in await self._on_message(data):
                yield event

    async def _on_message(self, data: bytes | None) -> list[Event]:
        event = _decode(data) if data is not None else None
        if event is None or isinstance(event, ErrorEvent):
            # Errors carry no index: read the replay first so no earlier token is skipped.
            # If that read fails, drop the error: the replay holds it too, after the tokens.
            events, complete = await self._try_catch_up()
            if event is not None and complete and not self._done:
                events.append(event)
                self._done = True
            return events
        take, gap = self._accept(event)
        if gap:
            return (await self._try_catch_up())[0]
        return [event] if take else []

    async def _try_catch_up(self) -> tuple[list[Event], bool]:
        """`_catch_up`, surviving a Redis outage: (events read so far, whether it finished)."""
        out: list[Event] = []
        try:
            await self._catch_up(out)
        except (RedisError, OSError):
            return out, False  # the next poll retries from the last entry read
        return out, True

    def _accept(self, event: Event) -> tuple[bool, bool]:
        """(yield it?, gap before it?) for the next event; updates the expected index."""
        if isinstance(event, TokenEvent):
            if event.index > self._next_index:
                return False, True
            if event.index < self._next_index:
                return False, False
            self._next_index += 1
            return True, False
        if isinstance(event, FinalEvent) and event.index is not None \
                and event.index > self._next_index:
            return False, True
        self._done = True
        return True, False

    async def _catch_up(self, out: list[Event]) -> None:
        """Read the replay stream from the last entry read; append what comes next in order."""
        key = self._keys.events(self.request_id)
        while not self._done:
            # The id right after the last one read; "(" exclusive ranges need Redis >= 6.2.
            start = b"-" if self._last_replay_id == b"-" else _next_id(self._last_replay_id)
            entries: Any = await self._redis.xrange(key, start, b"+", count=_REPLAY_PAGE)
            if not entries:
                if self._last_replay_id == b"-":
                    out.extend(await self._read_result())
                return
            for entry_id, fields in entries:
                self._last_replay_id = entry_id
                event = _decode(fields.get(b"e", b""))
                if event is None:
                    continue
                take, gap = self._accept(event)
                if gap:
                    raise IncompleteGenerationError(
                        f"events before index {_index(event)} are no longer in the replay "
                        f"stream (trimmed or expired; raise events_maxlen / events_ttl_s)",
                        request_id=self.request_id,
                    )
                if take:
                    out.append(event)
                if self._done:
                    return

    async def _read_result(self) -> list[Event]:
        # The replay stream expires before the result does: fall back to the final event.
        data = await self._redis.get(self._keys.result(self.request_id))
        event = _decode(data) if data is not None else None
        if event is None:
            return []
        self._done = True
        return [event]


def _decode(data: bytes | str) -> Event | None:
    try:
        return decode_event(data)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None  # a malformed event must not break the stream; the replay has the rest


def _next_id(entry_id: bytes) -> bytes:
    """The smallest stream id greater than `entry_id` ("<ms>-<seq>")."""
    ms, _, seq = entry_id.partition(b"-")
    return b"%s-%d" % (ms, int(seq or b"0") + 1)


def _index(event: Event) -> int | None:
    return None if isinstance(event, ErrorEvent) else event.index
