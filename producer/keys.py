"""Every Redis key, channel and group name the fleet uses (DESIGN §2), in one place.

Hash tags keep what one Lua script or one request touches in one Redis Cluster slot:
`{<queue>}` for a queue's stream, dead letters, limits and idempotency keys (the admission
script touches them together), `{r:<id>}` for a request's replay stream, result, cancel
flag and token channel.

    tf:{<queue>}:jobs            stream   one entry per job, field `job` = Job JSON (the
                                          normal lane: priority 0)
    tf:{<queue>}:jobs:high       stream   the high lane (priority > 0): pulled first
    tf:{<queue>}:jobs:low        stream   the low lane (priority < 0): pulled last
    tf:{<queue>}:dead            stream   dead letters: raw entry + error
    tf:{<queue>}:limits          hash     max_queue_len (written by workers, read by admission)
    tf:{<queue>}:submitted:<id>  string   idempotency: '<lane>:<entry id>' of the job
    tf:{r:<id>}:events           stream   replay of every event of a request (capped, TTL)
    tf:{r:<id>}:result           string   the final (or error) event JSON (TTL)
    tf:{r:<id>}:cancel           string   set by Client.cancel (TTL)
    tf:{r:<id>}:seed             string   the seed a worker picked for an unseeded sampled
                                          request, so a resumed run draws the same tokens (TTL)
    tf:{r:<id>}:tokens           channel  live events of a request
    tf:control                   channel  cancel commands to all workers
    tf:workers:<worker_id>       string   worker heartbeat JSON (TTL)
    tf:owners:<owner_id>         string   a gateway's liveness (TTL, refreshed): while it
                                          exists, the jobs it submitted for its clients
                                          (Job.owner) have a reader
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Final

__all__ = ["CONSUMER_GROUP", "LANES", "Keys", "lane_for_priority"]

CONSUMER_GROUP: Final = "workers"  # one group per queue stream; every worker joins it
# A queue's priority lanes, in the order workers pull them (strict: a lane is read only
# when the lanes before it have nothing waiting). All share the queue's hash tag, so one
# XREADGROUP can block on all of them, in Redis Cluster too.
LANES: Final = ("high", "normal", "low")


def lane_for_priority(priority: int) -> str:
    """The lane a job's `priority` puts it in: > 0 high, 0 normal, < 0 low."""
    return "high" if priority > 0 else "low" if priority < 0 else "normal"
_NAME_RE: Final = re.compile(r"[A-Za-z0-9._:@/+=-]+")


@dataclass(frozen=True)
class Keys:
    """Builds names under a namespace `prefix` (several fleets can share one Redis)."""

    prefix: str = "tf"

    def __post_init__(self) -> None:
        _check_name("prefix", self.prefix)

    # -- per queue (hash tag {<queue>}) -------------------------------------------------
    def jobs(self, queue: str, lane: str = "normal") -> str:
        """One lane of the queue's job stream (the normal lane keeps the original name)."""
        if lane not in LANES:
            raise ValueError(f"lane must be one of {LANES}, got {lane!r}")
        base = f"{self._queue(queue)}:jobs"
        return base if lane == "normal" else f"{base}:{lane}"

    def dead(self, queue: str) -> str:
        """The queue's dead-letter stream."""
        return f"{self._queue(queue)}:dead"

    def limits(self, queue: str) -> str:
        """Hash of admission limits (`max_queue_len`) for the queue."""
        return f"{self._queue(queue)}:limits"

    def submitted(self, queue: str, request_id: str) -> str:
        """Idempotency key: set when a request id was enqueued on this queue."""
        return f"{self._queue(queue)}:submitted:{request_id}"

    def group(self, queue: str) -> str:
        """The consumer group name on the queue's stream (not a key)."""
        _check_name("queue", queue)
        return CONSUMER_GROUP

    # -- per request (hash tag {r:<id>}) ------------------------------------------------
    def events(self, request_id: str) -> str:
        """The request's replay stream (every event, for late subscribers)."""
        return f"{self._request(request_id)}:events"

    def result(self, request_id: str) -> str:
        """The request's final or error event."""
        return f"{self._request(request_id)}:result"

    def cancel(self, request_id: str) -> str:
        """Set when the request was cancelled."""
        return f"{self._request(request_id)}:cancel"

    def seed(self, request_id: str) -> str:
        """The sampling seed chosen for a request that came without one (SET NX: first wins)."""
        return f"{self._request(request_id)}:seed"

    def tokens(self, request_id: str) -> str:
        """The request's pub/sub channel."""
        return f"{self._request(request_id)}:tokens"

    # -- fleet-wide ---------------------------------------------------------------------
    def control(self) -> str:
        """Pub/sub channel for commands to every worker (cancel)."""
        return f"{self.prefix}:control"

    def worker(self, worker_id: str) -> str:
        """A worker's heartbeat key."""
        _check_name("worker_id", worker_id)
        return f"{self.prefix}:workers:{worker_id}"

    def owner(self, owner_id: str) -> str:
        """A job owner's (a gateway's) liveness key: workers cancel its jobs once it is gone."""
        _check_name("owner id", owner_id)
        return f"{self.prefix}:owners:{owner_id}"

    def workers_pattern(self) -> str:
        """SCAN pattern matching every worker heartbeat key."""
        return f"{self.prefix}:workers:*"

    def _queue(self, queue: str) -> str:
        _check_name("queue", queue)
        return f"{self.prefix}:{{{queue}}}"

    def _request(self, request_id: str) -> str:
        _check_name("request id", request_id)
        return f"{self.prefix}:{{r:{request_id}}}"


def _check_name(what: str, value: str) -> None:
    # A brace would move the hash tag; whitespace and glob characters break SCAN patterns.
    if not isinstance(value, str) or not _NAME_RE.fullmatch(value):
        raise ValueError(f"{what} must be non-empty and use only [A-Za-z0-9._:@/+=-]: {value!r}")
