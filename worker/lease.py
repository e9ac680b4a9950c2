"""Leases on in-flight jobs: the pending entry's idle time is the lease (DESIGN §3.6).

Every `lease_ms/3` the worker resets the idle time of the entries it is running with
`XCLAIM … JUSTID`, so only a silent worker's entries ever look idle for `lease_ms`. The
renewal is a Lua script that first checks the entry is still ours: a worker that was cut off
for longer than its lease must not steal back a job another worker has reclaimed.
Reclaiming (`XAUTOCLAIM`, resuming from the replay stream) builds on this.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

from redis.asyncio import Redis

from tokenfleet.producer.keys import Keys

__all__ = ["RENEW_LUA", "Lease"]

RENEW_LUA: Final = """
-- KEYS[1] jobs stream; ARGV[1] group; ARGV[2] consumer; ARGV[3..] entry ids
local renewed = {}
for i = 3, #ARGV do
  local p = redis.call('XPENDING', KEYS[1], ARGV[1], ARGV[i], ARGV[i], 1)
  if p[1] and p[1][2] == ARGV[2] then
    redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[2], 0, ARGV[i], 'JUSTID')
    renewed[#renewed + 1] = ARGV[i]
  end
end
return renewed
"""


class Lease:
    """Renews one consumer's pending entries on one queue."""

    def __init__(self, redis: Redis, keys: Keys, queue: str, consumer: str) -> None:
        self._jobs = keys.jobs(queue)
        self._group = keys.group(queue)
        self._consumer = consumer
        self._script = redis.register_script(RENEW_LUA)

    async def renew(self, entry_ids: Sequence[bytes]) -> list[bytes]:
        """Reset the idle time of those of `entry_ids` still pending for us; returns them
        (a missing one was acked, or taken over by another worker)."""
        if not entry_ids:
            return []
        renewed = await self._script(keys=[self._jobs],
                                     args=[self._group, self._consumer, *entry_ids])
        return [r if isinstance(r, bytes) else str(r).encode() for r in renewed]
