"""The worker's pulse, every `lease_ms/3` (DESIGN §3.6): renew the leases of the jobs it
runs (resetting the delivery count of resumed jobs that progress), drop the ones another
worker took over, catch cancels it missed, refresh its registry key.

A renewal that finds one of our entries pending for another consumer means we were cut off
longer than the lease (a Redis stall, a long GC pause) and the job was reclaimed: we abort our
copy instead of racing the new owner. Cancel flags of running jobs are polled too, so a cancel
published while our control subscription was reconnecting still stops the job. So are the
liveness keys of the jobs' owners (gateways, `Job.owner`): a job whose owner's key has been
gone for `owner_grace_s` has no reader left and is cancelled (producer/owner_liveness.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable, Mapping
from typing import Any

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from tokenfleet.producer.keys import LANES, Keys
from tokenfleet.producer.protocol import WorkerInfo
from tokenfleet.worker.connectivity import Connectivity
from tokenfleet.worker.inflight import InFlightRequest
from tokenfleet.worker.lease import Lease
from tokenfleet.worker.registry import Registry

__all__ = ["GoneOwners", "Heartbeat"]

_GONE_OWNER_MEMORY_S = 600.0  # owner ids are random per gateway process: never reused


class GoneOwners:
    """Owners (gateways) found dead, remembered for a while so that the intake cancels their
    queued jobs at once instead of starting each and waiting out the grace again."""

    def __init__(self, memory_s: float = _GONE_OWNER_MEMORY_S) -> None:
        self._until: dict[str, float] = {}
        self._memory_s = memory_s

    def add(self, owner: str) -> None:
        now = time.monotonic()
        self._until = {o: t for o, t in self._until.items() if t > now}
        self._until[owner] = now + self._memory_s

    def __contains__(self, owner: object) -> bool:
        return isinstance(owner, str) and self._until.get(owner, 0.0) > time.monotonic()


class Heartbeat:
    """Runs the periodic lease/cancel/registry round of one worker."""

    def __init__(self, *, redis: Redis, keys: Keys, lease: Lease, registry: Registry,
                 interval_s: float, connectivity: Connectivity,
                 inflight: Mapping[str, InFlightRequest], info: Callable[[], WorkerInfo],
                 on_stolen: Callable[[InFlightRequest], None],
                 on_cancel: Callable[[str], None], owner_grace_s: float = 0.0,
                 gone_owners: GoneOwners | None = None) -> None:
        self._redis = redis
        self._keys = keys
        self._lease = lease
        self._registry = registry
        self._interval_s = interval_s
        self._connectivity = connectivity
        self._inflight = inflight
        self._info = info
        self._on_stolen = on_stolen
        self._on_cancel = on_cancel
        self._owner_grace_s = owner_grace_s  # 0: owners are not watched
        # owner -> (monotonic s of the first miss in a row, misses in a row)
        self._owner_missing: dict[str, tuple[float, int]] = {}
        self._owner_ttl_s: dict[str, float] = {}  # the TTL each owner wrote, last seen
        self.gone_owners = gone_owners if gone_owners is not None else GoneOwners()
        self._log = structlog.get_logger("tokenfleet.heartbeat")

    async def run(self, closing: asyncio.Event) -> None:
        """Beat until `closing` is set; after a failure, retry as soon as Redis answers.

        The loop ends on `closing` rather than on cancellation alone: a cancel that lands
        inside a Redis call can be lost on Python 3.11, and shutdown must not hang on it.
        """
        backoff = self._connectivity.backoff()
        while not closing.is_set():
            try:
                await self.beat()
            except (RedisError, OSError) as e:
                self._owner_missing.clear()  # what we could not see is not a miss
                await self._connectivity.failed(e, "heartbeat", backoff)
                continue
            self._connectivity.succeeded(backoff, wrote=True)  # the registry entry: a SET
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self._interval_s):
                    await closing.wait()

    async def beat(self) -> None:
        """One round: leases, missed cancels, registry."""
        running = list(self._inflight.values())
        # A resumed job that generated new tokens here is not what killed its workers.
        progressed = [r for r in running if r.num_delivered > 1 and not r.delivery_reset
                      and r.num_tokens > r.num_resumed]
        stolen: set[tuple[str, bytes]] = set()
        for lane in LANES:
            in_lane = [r for r in running if r.lane == lane]
            if not in_lane:
                continue
            renewal = await self._lease.renew(
                [r.entry_id for r in in_lane if r not in progressed], lane)
            reset = await self._lease.reset([r.entry_id for r in in_lane if r in progressed],
                                            lane)
            stolen.update((lane, e) for e in (*renewal.stolen, *reset.stolen))
        for req in progressed:
            req.delivery_reset = True
        for req in running:
            if (req.lane, req.entry_id) in stolen and self._inflight.get(req.request_id) is req:
                self._log.warning("lease_lost", request_id=req.request_id,
                                  entry_id=req.entry_id.decode())
                self._on_stolen(req)
        if running:
            async with self._redis.pipeline(transaction=False) as pipe:
                for req in running:
                    pipe.exists(self._keys.cancel(req.request_id))
                flags: list[Any] = await pipe.execute()
            for req, flag in zip(running, flags, strict=True):
                if flag:
                    self._on_cancel(req.request_id)
        await self._cancel_orphans(running)
        await self._registry.beat(self._info())

    async def _cancel_orphans(self, running: list[InFlightRequest]) -> None:
        """Cancel the jobs whose owner's liveness key was missing at two beats in a row
        spanning the grace: our `owner_grace_s`, or the owner's own TTL if longer (a Redis
        restarted without the key gets it back from the owner's next beat)."""
        owners = sorted({r.job.owner for r in running if r.job.owner is not None})
        if not owners or self._owner_grace_s <= 0:
            self._owner_missing.clear()
            return
        async with self._redis.pipeline(transaction=False) as pipe:
            for owner in owners:
                pipe.get(self._keys.owner(owner))
            values: list[Any] = await pipe.execute()
        now = time.monotonic()
        missing: dict[str, tuple[float, int]] = {}
        for owner, value in zip(owners, values, strict=True):
            if value is not None:
                with contextlib.suppress(ValueError):
                    self._owner_ttl_s[owner] = int(value) / 1000
                continue
            since, misses = self._owner_missing.get(owner, (now, 0))
            missing[owner] = (since, misses + 1)
        self._owner_missing = missing
        gone = {owner for owner, (since, misses) in missing.items()
                if misses >= 2 and now - since >= max(self._owner_grace_s,
                                                      self._owner_ttl_s.get(owner, 0.0))}
        for owner in set(self._owner_ttl_s) - set(owners):
            del self._owner_ttl_s[owner]  # no job of it runs here any more
        for owner in gone:
            self.gone_owners.add(owner)
        for req in running:
            if req.job.owner in gone and self._inflight.get(req.request_id) is req:
                self._log.warning("owner_gone", request_id=req.request_id, owner=req.job.owner)
                self._on_cancel(req.request_id)
