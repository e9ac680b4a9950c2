"""Admission (one Lua call): refuse when the backlog is full, never enqueue an id twice; and
backpressure: a worker only pulls what its engine can start now."""

from __future__ import annotations

import asyncio
import time

import pytest

from tokenfleet.producer.errors import ExpiredRequestError, OverloadedError

QUEUE = "default"


async def test_overloaded_when_backlog_reaches_max_queue_len(fleet, redis, keys):
    async with fleet.client(max_queue_len=3) as client:
        for i in range(3):
            await client.submit("x", request_id=f"r{i}")
        with pytest.raises(OverloadedError, match="3 jobs waiting"):
            await client.submit("x", request_id="r3")
        assert await redis.xlen(keys.jobs(QUEUE)) == 3
        assert not await redis.exists(keys.submitted(QUEUE, "r3"))


async def test_resubmitting_an_id_does_not_enqueue_twice(fleet, redis, keys):
    async with fleet.client() as client:
        assert await client.submit("x", request_id="same") == "same"
        assert await client.submit("x", request_id="same") == "same"
    assert await redis.xlen(keys.jobs(QUEUE)) == 1


async def test_workers_publish_the_limit_and_pending_jobs_do_not_count(fleet, redis, keys):
    # One busy worker with one slot and a published limit of 2 waiting jobs.
    async with fleet.worker(max_num_seqs=1, max_queue_len=2, sim_step_ms=20.0), \
            fleet.client() as client:
        assert await redis.hget(keys.limits(QUEUE), "max_queue_len") == b"2"
        running = await client.submit("long", max_new_tokens=100)
        await _until(lambda: _pending(redis, keys), 1)  # taken: pending, not backlog
        await client.submit("a", max_new_tokens=1)
        await client.submit("b", max_new_tokens=1)
        with pytest.raises(OverloadedError):
            await client.submit("c", max_new_tokens=1)
        await client.cancel(running)


async def test_worker_without_free_capacity_takes_nothing(fleet, redis, keys):
    async with fleet.client() as client, \
            fleet.worker(max_num_seqs=1, sim_step_ms=20.0, worker_id="busy"):
        long_id = await client.submit("long", max_new_tokens=150)  # ~3 s
        await _until(lambda: _pending(redis, keys), 1)
        short_id = await client.submit("short", max_new_tokens=3)
        await asyncio.sleep(0.6)  # several read cycles of the busy worker
        groups = await redis.xinfo_groups(keys.jobs(QUEUE))
        assert groups[0]["pending"] == 1  # only the long job
        assert groups[0]["lag"] == 1  # the short one waits in Redis, not in the worker
        async with fleet.worker(worker_id="idle"):
            final = await asyncio.wait_for(client.result(short_id), 10)
            assert final.details.generated_tokens == 3
        # The idle worker served it while the busy one was still generating.
        assert not await redis.exists(keys.result(long_id))
        await client.cancel(long_id)
        cancelled = await asyncio.wait_for(client.result(long_id), 10)
        assert cancelled.details.finish_reason == "cancelled"


async def test_leases_are_renewed_while_a_job_runs(fleet, redis, keys):
    async with fleet.worker(lease_ms=600, sim_step_ms=20.0), fleet.client() as client:
        request_id = await client.submit("long", max_new_tokens=75)  # ~1.5 s > lease
        await _until(lambda: _pending(redis, keys), 1)
        max_idle_ms = 0
        while not await redis.exists(keys.result(request_id)):
            pending = await redis.xpending_range(keys.jobs(QUEUE), keys.group(QUEUE),
                                                 "-", "+", 10)
            max_idle_ms = max([max_idle_ms, *(p["time_since_delivered"] for p in pending)])
            await asyncio.sleep(0.05)
    assert 0 < max_idle_ms < 600


async def _pending(redis, keys) -> int:
    return int((await redis.xpending(keys.jobs(QUEUE), keys.group(QUEUE)))["pending"])


async def _until(probe, expected, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if await probe() == expected:
            return
        await asyncio.sleep(0.02)
    raise TimeoutError(f"probe never returned {expected}")


async def test_a_resubmitted_id_whose_result_expired_is_refused(fleet, redis, keys):
    """A retried submit of a finished request whose events and result have expired cannot
    be answered (nothing to replay) nor run again (idempotency): a clear error, not a wait
    that never ends."""
    async with fleet.worker(), fleet.client() as client:
        await client.generate("once", request_id="old-one", max_new_tokens=2)
        await client.submit("once", request_id="old-one", max_new_tokens=2)  # still there: ok
        await redis.delete(keys.events("old-one"), keys.result("old-one"))  # as after the TTLs
        with pytest.raises(ExpiredRequestError, match="expired"):
            await client.submit("once", request_id="old-one", max_new_tokens=2)
        with pytest.raises(ExpiredRequestError):
            async for _ in client.generate_stream("once", request_id="old-one",
                                                  max_new_tokens=2):
                pass
