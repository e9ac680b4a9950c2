"""Leases on in-flight jobs: the pending entry's idle time is the lease (DESIGN §3.6).

Every `lease_ms/3` the worker resets the idle time of the entries it is running with
`XCLAIM … JUSTID`, so only a silent worker's entries ever look idle for `lease_ms` and get
reclaimed (`Reclaimer`). The renewal is a Lua script that first checks each entry is still
ours: a worker that was cut off for longer than its lease must not steal back a job another
worker has reclaimed; it learns which of its jobs were taken (`stolen`) and drops them.
A draining worker that runs out of time `release`s its entries instead: same ownership check,
but the idle time is set to the lease, so another worker resumes them at once.

`reset` renews and also sets the delivery count back to 1: the worker calls it for a resumed
job once it has generated new tokens. `max_deliveries` thus counts deliveries that made no
progress — a job whose workers die for unrelated reasons while it advances is never
dead-lettered, one that kills every worker before its next token is.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from redis.asyncio import Redis

from tokenfleet.producer.keys import LANES, Keys
from tokenfleet.worker.script_reply import as_bytes

__all__ = ["LEASE_LUA", "Lease", "Renewal"]

LEASE_LUA: Final = """
-- KEYS[1] jobs stream; ARGV[1] group; ARGV[2] consumer; ARGV[3] 'renew' | 'reset' |
-- 'release'; ARGV[4] idle ms to set on release; ARGV[5..] entry ids.
-- Returns {renewed ids, ids pending for another consumer}; ids no longer pending are
-- in neither list (acked: finished by us or by whoever took them over).
local renewed, stolen = {}, {}
for i = 5, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] then
    if p[1][2] == ARGV[2] then
      if ARGV[3] == 'release' then
        redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'IDLE', ARGV[4], 'JUSTID')
      elseif ARGV[3] == 'reset' then
        redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'RETRYCOUNT', 1, 'JUSTID')
      else
        redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
      end
      renewed[#renewed + 1] = ARGV[i]
    else
      stolen[#stolen + 1] = ARGV[i]
    end
  end
end
return {renewed, stolen}
"""


@dataclass(frozen=True, slots=True)
class Renewal:
    """What a renewal found: ours and renewed, or now held by another consumer."""

    renewed: list[bytes] = field(default_factory=list)
    stolen: list[bytes] = field(default_factory=list)


class Lease:
    """Renews (or releases) one consumer's pending entries on one queue."""

    def __init__(self, redis: Redis, keys: Keys, queue: str, consumer: str, *,
                 lease_ms: int) -> None:
        self._jobs = {lane: keys.jobs(queue, lane) for lane in LANES}
        self._group = keys.group(queue)
        self._consumer = consumer
        self._lease_ms = lease_ms
        self._script = redis.register_script(LEASE_LUA)

    async def renew(self, entry_ids: Sequence[bytes], lane: str = "normal") -> Renewal:
        """Reset the idle time of those of `entry_ids` (in `lane`) still pending for us."""
        return await self._call("renew", entry_ids, lane)

    async def reset(self, entry_ids: Sequence[bytes], lane: str = "normal") -> Renewal:
        """Renew, and set the delivery count of those still ours back to 1 (they progress)."""
        return await self._call("reset", entry_ids, lane)

    async def release(self, entry_ids: Sequence[bytes], lane: str = "normal") -> Renewal:
        """Make those of `entry_ids` still ours look expired, for another worker to resume."""
        return await self._call("release", entry_ids, lane)

    async def _call(self, mode: str, entry_ids: Sequence[bytes], lane: str) -> Renewal:
        if not entry_ids:
            return Renewal()
        renewed, stolen = await self._script(
            keys=[self._jobs[lane]],
            args=[self._group, self._consumer, mode, self._lease_ms, *entry_ids])
        return Renewal(_ids(renewed), _ids(stolen))


def _ids(values: Any) -> list[bytes]:
    return [as_bytes(v) for v in values or []]
