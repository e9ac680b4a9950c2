"""Jobs owned by a producer (Job.owner, a gateway) live as long as its liveness key: a worker
cancels them once the key has been gone for owner_ttl_s, not at the first miss, and cancels
that owner's later jobs at intake."""

from __future__ import annotations

import asyncio

import pytest

from tokenfleet.producer.owner_liveness import OwnerLiveness


async def test_an_owned_job_survives_a_short_gap_and_is_cancelled_after_the_grace(
        fleet, redis, keys):
    owner = "gw-test"
    await redis.set(keys.owner(owner), b"1000")  # what OwnerLiveness writes: its TTL in ms
    async with fleet.worker(sim_step_ms=20.0, owner_ttl_s=1.0, lease_ms=300) as worker, \
            fleet.client() as client:
        owned = await client.submit("owned", max_new_tokens=2000, owner=owner)
        free = await client.submit("free", max_new_tokens=2000)
        while owned not in worker.inflight or free not in worker.inflight:
            await asyncio.sleep(0.02)
        # A gap shorter than the grace (a Redis restarted without the key, refilled by the
        # owner's next beat): nothing is cancelled.
        await redis.delete(keys.owner(owner))
        await asyncio.sleep(0.6)
        await redis.set(keys.owner(owner), b"1000")
        await asyncio.sleep(0.6)
        assert owned in worker.inflight and free in worker.inflight
        # Gone for good: cancelled after about the grace; the job without an owner runs on.
        await redis.delete(keys.owner(owner))
        final = await client.result(owned, timeout_s=10)
        assert final.details.finish_reason == "cancelled"
        assert free in worker.inflight
        # A later job of the dead owner is cancelled at intake: nothing is generated for it.
        late = await client.submit("late", max_new_tokens=2000, owner=owner)
        final = await client.result(late, timeout_s=2)
        assert final.details.finish_reason == "cancelled"
        assert final.details.generated_tokens == 0
        await client.cancel(free)


async def test_owner_liveness_keeps_its_key_until_removed(redis, keys):
    liveness = OwnerLiveness(redis, keys, ttl_s=1.0)
    key = keys.owner(liveness.owner_id)
    stop = asyncio.Event()
    task = asyncio.create_task(liveness.run(stop))
    await asyncio.sleep(2.5)  # 2.5 TTLs: alive only because it is refreshed
    assert await redis.get(key) == b"1000"  # its TTL, for workers with a shorter grace
    assert 0 < await redis.pttl(key) <= 1000
    stop.set()
    await task
    await liveness.remove()
    assert not await redis.exists(key)
    with pytest.raises(ValueError, match="ttl_s"):
        OwnerLiveness(redis, keys, ttl_s=0.2)  # would refresh 15 times a second


async def test_a_long_lived_owner_is_waited_for_even_by_a_worker_with_a_short_grace(
        fleet, redis, keys):
    """The owner's key holds its own TTL: a worker whose owner_ttl_s is shorter than the
    gateway's refresh period still waits for that period, not for its own setting."""
    owner = "gw-slow"
    await redis.set(keys.owner(owner), b"4000")  # a gateway with owner_ttl_s = 4
    async with fleet.worker(sim_step_ms=20.0, owner_ttl_s=1.0, lease_ms=300) as worker, \
            fleet.client() as client:
        owned = await client.submit("owned", max_new_tokens=2000, owner=owner)
        while owned not in worker.inflight:
            await asyncio.sleep(0.02)
        await asyncio.sleep(0.3)  # a beat has seen the key and its TTL
        await redis.delete(keys.owner(owner))
        await asyncio.sleep(2.5)  # past the worker's own grace, within the owner's TTL
        assert owned in worker.inflight
        final = await client.result(owned, timeout_s=10)
        assert final.details.finish_reason == "cancelled"
