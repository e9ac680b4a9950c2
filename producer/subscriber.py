"""One pub/sub connection shared by every stream a `Client` follows.

A web backend may follow thousands of requests at once; one connection per stream would
exhaust the server's connection limit. The `Subscriber` multiplexes: `channel(name)`
subscribes (waiting for the server's confirmation, so anything published afterwards
reaches us), and a single reader task dispatches each message to the queues of that
channel. Messages lost while reconnecting are recovered by the event stream's replay reads.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any, Final

from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError

from tokenfleet.producer.backoff import Backoff

__all__ = ["Subscriber"]

_READ_TIMEOUT_S: Final = 1.0
_CONFIRM_TIMEOUT_S: Final = 5.0
_RETRY_BASE_S: Final = 0.1
_RETRY_CAP_S: Final = 2.0
# What a dropped connection raises here. RuntimeError: after a server restart the reader's
# reconnect and an (un)subscribe's reconnect can run at once on the one pub/sub connection,
# and asyncio refuses the second read ("readuntil() called while another coroutine is
# already waiting") — seen in the Redis-restart chaos test.
_CONNECTION_ERRORS: Final = (RedisError, OSError, RuntimeError)


class Subscriber:
    """Multiplexes channel subscriptions over one pub/sub connection."""

    def __init__(self, redis: Redis) -> None:
        self._pubsub = redis.pubsub(ignore_subscribe_messages=False)
        self._queues: dict[bytes, set[asyncio.Queue[bytes]]] = {}
        self._confirmed: dict[bytes, asyncio.Event] = {}
        self._reader: asyncio.Task[None] | None = None
        self._closed = False
        # redis-py's PubSub takes a pool connection on its first command without a lock: N
        # first subscribes at once would each take one, and all but the last would leak
        # (never read, never returned: subscribe confirmations lost, the pool drained).
        self._command_lock = asyncio.Lock()

    @contextlib.asynccontextmanager
    async def channel(self, name: str) -> AsyncIterator[asyncio.Queue[bytes]]:
        """Subscribe to `name`; yields a queue receiving each message's payload."""
        key = name.encode()
        queue: asyncio.Queue[bytes] = asyncio.Queue()
        listeners = self._queues.setdefault(key, set())
        listeners.add(queue)
        try:
            if len(listeners) == 1:
                self._confirmed[key] = asyncio.Event()
                await self._subscribe(key)
                self._ensure_reader()
            # A missing confirmation is not fatal: the replay stream covers what we miss.
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(_CONFIRM_TIMEOUT_S):
                    await self._confirmed[key].wait()
            yield queue
        finally:
            listeners.discard(queue)
            if not listeners:
                del self._queues[key]
                self._confirmed.pop(key, None)
                # Best effort: a subscription left behind only brings messages nobody wants.
                with contextlib.suppress(*_CONNECTION_ERRORS):
                    async with self._command_lock:
                        await self._pubsub.unsubscribe(key)

    async def _subscribe(self, key: bytes) -> None:
        try:
            async with self._command_lock:
                await self._pubsub.subscribe(key)
        except RuntimeError as exc:  # see _CONNECTION_ERRORS: a connection error to callers
            raise RedisConnectionError(f"pub/sub connection is reconnecting: {exc}") from exc

    async def close(self) -> None:
        """Stop the reader and close the connection."""
        self._closed = True  # ends the reader even if a cancel is lost inside redis-py
        if self._reader is not None:
            self._reader.cancel()
            with contextlib.suppress(asyncio.CancelledError, *_CONNECTION_ERRORS):
                await self._reader
            self._reader = None
        with contextlib.suppress(RedisError, OSError):
            await self._pubsub.aclose()

    def _ensure_reader(self) -> None:
        if self._reader is None or self._reader.done():
            self._reader = asyncio.get_running_loop().create_task(self._read_forever())

    async def _read_forever(self) -> None:
        backoff = Backoff(base_s=_RETRY_BASE_S, cap_s=_RETRY_CAP_S)
        while self._queues and not self._closed:
            try:
                message = await self._pubsub.get_message(timeout=_READ_TIMEOUT_S)
            except _CONNECTION_ERRORS:
                # The connection dropped; redis-py reconnects and resubscribes on the next read.
                await asyncio.sleep(backoff.next_delay_s())
                continue
            backoff.reset()
            if message is not None:
                self._dispatch(message)

    def _dispatch(self, message: dict[str, Any]) -> None:
        channel = message["channel"]
        if message["type"] == "message":
            for queue in self._queues.get(channel, ()):
                queue.put_nowait(message["data"])
        elif message["type"] == "subscribe" and channel in self._confirmed:
            self._confirmed[channel].set()
