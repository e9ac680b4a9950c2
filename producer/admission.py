"""Admission control: enqueue a job with one Lua call (`admit.lua`), or refuse it.

The script checks the queue's backlog (all priority lanes) against `max_queue_len` (the
caller's, or the limit workers publish in `Keys.limits(queue)`), XADDs the job to its lane
and records the request id so that a retried submit of the same id is not enqueued twice.
"""

from __future__ import annotations

from dataclasses import dataclass
from importlib.resources import files
from typing import Final

from redis.asyncio import Redis

from tokenfleet.producer.errors import OverloadedError
from tokenfleet.producer.keys import LANES, Keys

__all__ = ["ADMIT_LUA", "Admission", "Admitted"]

ADMIT_LUA: Final = files("tokenfleet.producer").joinpath("admit.lua").read_text("utf-8")


@dataclass(frozen=True, slots=True)
class Admitted:
    """A job that is on the queue: its entry id in its lane's stream; `duplicate` when an
    earlier submit already put it there (then `lane` is that submit's lane)."""

    entry_id: str
    duplicate: bool
    lane: str = "normal"


class Admission:
    """Runs the admission script against one Redis client (EVALSHA, loaded on first use)."""

    def __init__(self, redis: Redis, keys: Keys, *, idempotency_ttl_s: int = 86_400) -> None:
        if idempotency_ttl_s <= 0:
            raise ValueError(f"idempotency_ttl_s must be positive, got {idempotency_ttl_s}")
        self._keys = keys
        self._idempotency_ttl_s = idempotency_ttl_s
        self._script = redis.register_script(ADMIT_LUA)

    async def admit(
        self, queue: str, request_id: str, job_json: bytes, *, max_queue_len: int | None = None,
        lane: str = "normal",
    ) -> Admitted:
        """Enqueue `job_json` on `lane`; raise OverloadedError when the backlog is at the limit.

        `max_queue_len`: None uses the limit the queue's workers published; 0 means no limit.
        """
        keys = self._keys
        reply = await self._script(
            keys=[keys.jobs(queue, lane), keys.limits(queue), keys.submitted(queue, request_id),
                  *(keys.jobs(queue, name) for name in LANES)],
            args=[
                keys.group(queue),
                -1 if max_queue_len is None else max_queue_len,
                job_json,
                self._idempotency_ttl_s,
                lane,
            ],
        )
        status, value = (_text(part) for part in reply)
        if status == "overloaded":
            raise OverloadedError(
                f"Model is overloaded: queue {queue!r} has {value} jobs waiting",
                request_id=request_id,
            )
        assert status in ("queued", "duplicate"), reply
        if status == "queued":
            return Admitted(entry_id=value, duplicate=False, lane=lane)
        earlier_lane, _, entry_id = value.rpartition(":")
        return Admitted(entry_id=entry_id, duplicate=True, lane=earlier_lane or "normal")


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


