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
from tokenfleet.worker.connectivity import Connectivity

__all__ = ["ControlListener"]

_READ_TIMEOUT_S: Final = 1.0


class ControlListener:
    """Calls `on_cancel(request_id)` for every cancel command published on the channel.

    Cancels that arrive while the job is still queued are caught at intake by the cancel key,
    and the heartbeat polls the cancel keys of running jobs, so a message missed during a
    reconnect only delays a running job's abort by up to lease_ms/3.
    """

    def __init__(self, redis: Redis, keys: Keys, on_cancel: Callable[[str], None], *,
                 connectivity: Connectivity | None = None) -> None:
        self._redis = redis
        self._connectivity = connectivity if connectivity is not None else Connectivity()
        self._channel = keys.control()
        self._on_cancel = on_cancel
        self._log = structlog.get_logger("tokenfleet.control")
        self.subscribed = asyncio.Event()

    async def run(self, stop: asyncio.Event) -> None:
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self._channel)
            self.subscribed.set()
            backoff = self._connectivity.backoff()
            while not stop.is_set():
                try:
                    # redis-py reconnects and resubscribes on the next read after a failure.
                    message = await pubsub.get_message(timeout=_READ_TIMEOUT_S)
                except (RedisError, OSError) as e:
                    await self._connectivity.failed(e, "control", backoff)
                    continue
                self._connectivity.succeeded(backoff)
                if message is None or message["type"] != "message":
                    continue
                command = decode_control(message["data"])
                if isinstance(command, CancelCommand):
                    self._on_cancel(command.id)
        finally:
            with contextlib.suppress(RedisError, OSError):
                await pubsub.aclose()
