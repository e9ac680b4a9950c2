"""A producer's liveness key, so that workers can stop the jobs nobody will read any more.

A gateway cancels the job of a client that disconnects (TGI does the same when a stream is
dropped). When the gateway itself dies (SIGKILL, OOM, a node lost), nothing cancels the jobs of
its clients, and the fleet keeps generating for no reader until `max_new_tokens`. The gateway
therefore keeps `Keys.owner(owner_id)` alive: it SETs the key with a TTL of `ttl_s` and
refreshes it every third of that. Its jobs carry `Job.owner = owner_id`. A worker that finds
the key of a running job's owner gone for `ttl_s` cancels that job (worker/heartbeat.py).

Waiting rather than acting on the first miss covers a Redis that restarted without the key:
the owner writes it back within a third of the TTL (a failed write is retried within half a
second). The key's value is the owner's TTL in milliseconds, so that a worker configured with
a shorter `owner_ttl_s` still waits out this owner's own refresh period. Requests sent with an
Idempotency-Key carry no owner, because their client can re-attach through another gateway.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from tokenfleet.producer.keys import Keys

__all__ = ["MIN_TTL_S", "OwnerLiveness"]

MIN_TTL_S = 1.0  # shorter would refresh more than three times a second


class OwnerLiveness:
    """Keeps one owner key alive while `run()` runs; `owner_id` goes into the jobs."""

    def __init__(self, redis: Redis, keys: Keys, ttl_s: float, *, prefix: str = "gateway"):
        if ttl_s < MIN_TTL_S:
            raise ValueError(f"ttl_s must be at least {MIN_TTL_S} s, got {ttl_s}")
        self.owner_id = f"{prefix}-{uuid.uuid4().hex[:12]}"
        self.ttl_s = ttl_s
        self._redis = redis
        self._key = keys.owner(self.owner_id)
        self._log = structlog.get_logger("tokenfleet.owner").bind(owner=self.owner_id)

    async def beat(self) -> None:
        """Write the key with its TTL, bounded by a third of it: a write stuck behind a busy
        connection pool counts as failed (and is retried soon) instead of outliving the key."""
        ttl_ms = round(self.ttl_s * 1000)
        async with asyncio.timeout(self.ttl_s / 3):
            await self._redis.set(self._key, str(ttl_ms).encode(), px=ttl_ms)

    async def run(self, stop: asyncio.Event) -> None:
        """Refresh every third of the TTL until `stop`; after a failed write, retry within
        half a second (the key outlives two missed beats)."""
        while not stop.is_set():
            try:
                await self.beat()
                wait_s = self.ttl_s / 3
            except (RedisError, OSError, TimeoutError) as e:
                self._log.warning("owner_beat_failed", error=str(e) or type(e).__name__)
                wait_s = min(0.5, self.ttl_s / 3)
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(wait_s):
                    await stop.wait()

    async def remove(self) -> None:
        """Delete the key at a clean shutdown: the jobs still owned then have no reader."""
        with contextlib.suppress(RedisError, OSError):
            await self._redis.delete(self._key)
