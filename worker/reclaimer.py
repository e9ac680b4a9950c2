"""Reclaim: take over the jobs of workers that went silent (DESIGN §3.6–3.8).

Every worker periodically claims entries of its queue's group that nobody renewed for
`lease_ms` — only as many as its engine can start now, one at a time — and hands them to the
intake, which resumes each from its replay stream. One Lua call claims the entries and reads their
delivery counts atomically; the intake dead-letters an entry delivered more than
`max_deliveries` times (a poison job that kills every worker that starts it).

XAUTOCLAIM needs Redis 6.2; older servers get the same result from XPENDING + XCLAIM. From
Redis 7.0, XAUTOCLAIM itself drops entries whose job was deleted from the pending list and
reports them in a third reply element; before that they come back without fields and the
script acks them.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Final

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from tokenfleet.producer.keys import LANES, Keys
from tokenfleet.worker.connectivity import Connectivity, is_transient
from tokenfleet.worker.metrics import WorkerMetrics
from tokenfleet.worker.script_reply import as_bytes, field_map
from tokenfleet.worker.server_features import ServerFeatures

__all__ = ["AUTOCLAIM_LUA", "PENDING_CLAIM_LUA", "Claimed", "Reclaimer"]

# KEYS[1] jobs stream; ARGV[1] group, ARGV[2] consumer, ARGV[3] min idle ms, ARGV[4] cursor,
# ARGV[5] count. Both return {next cursor, {{id, {field, value, …}, delivery count}, …},
# number of deleted entries dropped from the pending list}.
AUTOCLAIM_LUA: Final = """
local reply = redis.call('XAUTOCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], ARGV[4],
                         'COUNT', ARGV[5])
local claimed, num_deleted = {}, #(reply[3] or {})
for _, entry in ipairs(reply[2]) do
  if type(entry) == 'table' and type(entry[2]) == 'table' then
    local p = redis.call('XPENDING', KEYS[1], ARGV[1], entry[1], entry[1], 1)
    claimed[#claimed + 1] = {entry[1], entry[2], p[1] and p[1][4] or 1}
  elseif type(entry) == 'table' then  -- Redis 6.2: a deleted job, still pending
    redis.call('XACK', KEYS[1], ARGV[1], entry[1])
    num_deleted = num_deleted + 1
  end
end
return {reply[1], claimed, num_deleted}
"""

PENDING_CLAIM_LUA: Final = """
local count, min_idle = tonumber(ARGV[5]), tonumber(ARGV[3])
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', count * 10)
local claimed, num_deleted = {}, 0
for _, p in ipairs(pending) do
  if #claimed >= count then break end
  if p[3] >= min_idle then
    local got = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], ARGV[3], p[1])
    local entry = got[1]
    if type(entry) == 'table' and type(entry[2]) == 'table' then
      claimed[#claimed + 1] = {entry[1], entry[2], p[4] + 1}
    elseif entry ~= nil then  -- a deleted job, still pending
      redis.call('XACK', KEYS[1], ARGV[1], p[1])
      num_deleted = num_deleted + 1
    end
  end
end
return {'0-0', claimed, num_deleted}
"""

# take(entry_id, fields, num_delivered, lane)
Take = Callable[[bytes, Mapping[bytes, bytes], int, str], Awaitable[None]]
_MAX_CLAIMS_PER_ROUND: Final = 256


@dataclass(frozen=True, slots=True)
class Claimed:
    """A reclaimed stream entry and how often it has been delivered (this time included)."""

    entry_id: bytes
    fields: dict[bytes, bytes]
    num_delivered: int


class Reclaimer:
    """Claims expired entries of one queue for one consumer and passes them to `take`.

    One loop over the queue's priority lanes in order, so that recovered work keeps the
    order new work has (high before normal before low), and one claim at a time, so that
    the free slots it checks are not spent twice."""

    def __init__(self, redis: Redis, keys: Keys, queue: str, consumer: str, *, lease_ms: int,
                 features: ServerFeatures, connectivity: Connectivity,
                 free_slots: Callable[[], int], take: Take, metrics: WorkerMetrics) -> None:
        self._streams = {lane: keys.jobs(queue, lane) for lane in LANES}
        self._group = keys.group(queue)
        self._consumer = consumer
        self._lease_ms = lease_ms
        self._connectivity = connectivity
        self._free_slots = free_slots
        self._take = take
        self._metrics = metrics
        self._cursors = dict.fromkeys(LANES, b"0-0")
        self._script = redis.register_script(
            AUTOCLAIM_LUA if features.has_xautoclaim else PENDING_CLAIM_LUA)
        self.interval_s = lease_ms / 3 / 1000
        # After an outage the owners renew first: their loops wake as soon as Redis answers.
        self.grace_s = 1.5 * self.interval_s
        self._log = structlog.get_logger("tokenfleet.reclaim").bind(worker_id=consumer)

    async def run(self, stop: asyncio.Event) -> None:
        """Reclaim every ~lease_ms/3 (jittered) until `stop` is set."""
        backoff = self._connectivity.backoff()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.interval_s * random.uniform(0.8, 1.2)):
                    await stop.wait()
            if stop.is_set() or self._connectivity.seconds_since_back() < self.grace_s:
                continue
            try:
                await self.reclaim_round()
            except (RedisError, OSError) as e:
                if "NOGROUP" in str(e):  # the intake recreates the group
                    continue
                if not is_transient(e):
                    raise
                await self._connectivity.failed(e, "reclaim", backoff)
                continue
            self._connectivity.succeeded(backoff)

    async def reclaim_round(self) -> None:
        """Claim and start expired entries one at a time while the engine has room, lane by
        lane in priority order.

        One at a time, because a claim counts as a delivery: if starting one kills us (a
        poison job), the entries after it were not claimed and do not pay for it.
        """
        num_claims = 0
        for lane in LANES:
            while num_claims < _MAX_CLAIMS_PER_ROUND:
                if self._free_slots() <= 0:
                    return
                claimed = await self.claim(1, lane)
                num_claims += 1
                for entry in claimed:
                    await self._hand_over(entry, lane)
                if not claimed and self._cursors[lane] == b"0-0":
                    break  # scanned this lane's whole pending list

    async def claim(self, count: int, lane: str = "normal") -> list[Claimed]:
        """Claim up to `count` entries of `lane` idle for at least the lease."""
        cursor, entries, num_deleted = await self._script(
            keys=[self._streams[lane]],
            args=[self._group, self._consumer, self._lease_ms, self._cursors[lane], count])
        # Continue the scan next time; "0-0" means it wrapped around.
        self._cursors[lane] = as_bytes(cursor)
        if num_deleted:
            self._log.info("reclaim_dropped_deleted", num_deleted=int(num_deleted))
        return [Claimed(as_bytes(entry_id), field_map(flat), int(n))
                for entry_id, flat, n in entries]

    async def _hand_over(self, entry: Claimed, lane: str) -> None:
        self._metrics.reclaims.inc()
        self._log.info("job_reclaimed", entry_id=entry.entry_id.decode(), lane=lane,
                       num_delivered=entry.num_delivered)
        try:
            await self._take(entry.entry_id, entry.fields, entry.num_delivered, lane)
        except (RedisError, OSError) as e:
            # Still pending for us but not running: the lease expires, it is reclaimed again.
            self._log.warning("reclaim_take_failed", entry_id=entry.entry_id.decode(),
                              error=str(e))
