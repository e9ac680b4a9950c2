"""Whether Redis answers, as seen by every loop of one worker (DESIGN §3, outages).

Each loop that talks to Redis (intake, reclaim, heartbeat, control, publisher) reports its
failures and successes here. The worker logs `redis_unavailable` once when an outage begins
and `redis_back` once when it ends, however many loops notice; failing loops wait with capped
exponential backoff and jitter, and all of them wake as soon as any one gets through, so
leases are renewed promptly after a restart.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import Final

import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ReadOnlyError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from tokenfleet.producer.backoff import Backoff

__all__ = ["Connectivity", "is_transient"]

# Replies of a server that is restarting, failing over or resharding: retry, do not give up.
# UNBLOCKED: a blocked read cut short (the node was demoted, or the stream deleted: the next
# read reports the missing group, which the intake recreates).
_TRANSIENT_REPLIES: Final = ("LOADING", "READONLY", "MASTERDOWN", "TRYAGAIN", "CLUSTERDOWN",
                             "BUSY ", "UNBLOCKED")


def is_transient(error: BaseException) -> bool:
    """True for errors that mean "Redis is not answering normally right now".

    A server at `maxmemory` (noeviction, as deployments must run it) refuses every write that
    needs memory (OOM) until keys expire or are trimmed: waited out like an outage, so no job
    fails for it and none is acked without its stored result."""
    # redis-py strips the "READONLY" / "OOM" of such replies into classes of their own.
    if isinstance(error, RedisConnectionError | RedisTimeoutError | OSError | ReadOnlyError
                  | OutOfMemoryError):
        return True
    return isinstance(error, ResponseError) and str(error).startswith(_TRANSIENT_REPLIES)

# A failure this soon after an outage ended belongs to the same outage (connections of other
# loops still failing on their first use): it is not logged again.
_SETTLE_S: Final = 5.0


class Connectivity:
    """Shared outage state and retry pacing for one worker's Redis client."""

    def __init__(self, *, base_s: float = 0.05, cap_s: float = 5.0) -> None:
        self._base_s = base_s
        self._cap_s = cap_s
        self._down_since: float | None = None
        self._back_at = 0.0  # monotonic time the last outage ended
        self._back = asyncio.Event()
        self.num_outages = 0
        # Redis at maxmemory answers reads and refuses writes (OOM): not over until a write
        # gets through, and the intake takes no job it could not start meanwhile.
        self.writes_refused = False
        self._log = structlog.get_logger("tokenfleet.redis")

    @property
    def available(self) -> bool:
        return self._down_since is None

    def seconds_since_back(self) -> float:
        """Seconds since the last outage ended (large when there was none)."""
        if self._down_since is not None:
            return 0.0
        return time.monotonic() - self._back_at if self.num_outages else float("inf")

    def backoff(self) -> Backoff:
        """A fresh backoff for one loop."""
        return Backoff(base_s=self._base_s, cap_s=self._cap_s)

    async def failed(self, error: BaseException, where: str, backoff: Backoff) -> None:
        """Record a failed call and wait before the caller retries (woken early when another
        loop gets through)."""
        now = time.monotonic()
        if self._down_since is None:
            if self.num_outages and now - self._back_at < _SETTLE_S:
                self._down_since = self._back_at  # a relapse: same outage, already logged
            else:
                self.num_outages += 1
                self._down_since = now
                self._log.warning("redis_unavailable", where=where, error=str(error) or
                                  type(error).__name__)
            self._back.clear()
        if isinstance(error, OutOfMemoryError):
            # Redis answers, memory is short: other loops' reads getting through say nothing
            # about it, so wait the whole delay instead of waking with them.
            self.writes_refused = True
            await asyncio.sleep(backoff.next_delay_s())
            return
        with contextlib.suppress(TimeoutError):
            # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancellation.
            async with asyncio.timeout(backoff.next_delay_s()):
                await self._back.wait()

    def succeeded(self, backoff: Backoff | None = None, *, wrote: bool = False) -> None:
        """Record a call that got through; ends the outage if there was one (one that
        refused writes only when this call `wrote`: stored something new)."""
        if backoff is not None:
            backoff.reset()
        if wrote:
            self.writes_refused = False
        if self._down_since is None or self.writes_refused:
            return
        now = time.monotonic()
        if self._back_at < self._down_since:  # not a relapse: this outage was never ended
            self._log.info("redis_back", outage_s=round(now - self._down_since, 2))
        self._down_since = None
        self._back_at = now
        self._back.set()
