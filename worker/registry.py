"""The worker registry: a heartbeat key per worker, with a TTL (DESIGN §3.6).

A live worker refreshes `Keys.worker(worker_id)` every `lease_ms/3` with what it serves and
how busy it is; a dead one's key expires. `tokenfleet status` and autoscalers read these.
"""

from __future__ import annotations

from redis.asyncio import Redis

from tokenfleet.producer.keys import Keys
from tokenfleet.producer.protocol import WorkerInfo, encode

__all__ = ["Registry"]


class Registry:
    """Writes one worker's heartbeat and its queue's admission limit."""

    def __init__(self, redis: Redis, keys: Keys, worker_id: str, *, ttl_s: float) -> None:
        self._redis = redis
        self._keys = keys
        self._key = keys.worker(worker_id)
        self._ttl_ms = max(1, int(ttl_s * 1000))

    async def publish_limits(self, queue: str, max_queue_len: int) -> None:
        """Tell producers' admission script the queue's backlog limit (0 = none)."""
        await self._redis.hset(self._keys.limits(queue), "max_queue_len", max_queue_len)

    async def beat(self, info: WorkerInfo) -> None:
        await self._redis.set(self._key, encode(info), px=self._ttl_ms)

    async def remove(self) -> None:
        await self._redis.delete(self._key)
