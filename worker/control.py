"""Listens on the fleet's control channel and hands cancel commands to the worker."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from typing import Final

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from tokenfleet.producer.keys import Keys
from tokenfleet.producer.protocol import CancelCommand, decode_control

__all__ = ["ControlListener"]

_READ_TIMEOUT_S: Final = 1.0


class ControlListener:
    """Calls `on_cancel(request_id)` for every cancel command published on the channel.

    Cancels that arrive while the job is still queued are caught at intake by the cancel key,
    so a message missed during a reconnect only delays a running job's abort.
    """

    def __init__(self, redis: Redis, keys: Keys, on_cancel: Callable[[str], None]) -> None:
        self._redis = redis
        self._channel = keys.control()
        self._on_cancel = on_cancel
        self._log = structlog.get_logger("tokenfleet.control")
        self.subscribed = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self._channel)
            self.subscribed.set()
            while not stop.is_set():
                try:
                    message = await pubsub.get_message(timeout=_READ_TIMEOUT_S)
                except (RedisError, OSError) as e:
                    self._log.warning("control_redis_error", error=str(e))
                    await asyncio.sleep(_READ_TIMEOUT_S)
                    continue
                if message is None or message["type"] != "message":
                    continue
                command = decode_control(message["data"])
                if isinstance(command, CancelCommand):
                    self._on_cancel(command.id)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()
