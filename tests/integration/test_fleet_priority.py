"""Priority lanes: a job's `priority` puts it in the queue's high (> 0), normal (0) or low
(< 0) lane; workers pull the high lane first and the low lane last, FIFO within a lane."""

from __future__ import annotations

import asyncio

import pytest

from tokenfleet.producer.client import Client
from tokenfleet.producer.errors import OverloadedError
from tokenfleet.producer.keys import LANES

QUEUE = "default"


async def _submit(client: Client, request_id: str, priority: int, **parameters) -> float:
    """Enqueue a job; returns its submit time (epoch ms)."""
    job = client.build_job(f"prompt {request_id}", request_id=request_id, priority=priority,
                           **parameters)
    await client.enqueue(job)
    return job.submitted_ms


async def _start_times(client: Client, submitted: dict[str, float]) -> dict[str, float]:
    """When a worker took each job (epoch ms): its submit time + its final's queue_ms."""
    finals = await asyncio.wait_for(asyncio.gather(
        *(client.result(rid, timeout_s=60) for rid in submitted)), 90)
    return {f.id: submitted[f.id] + f.queue_ms for f in finals}


async def test_workers_pull_lanes_in_priority_order(fleet, redis, keys):
    # Queued before any worker runs; then one worker that starts one job at a time.
    plan = [("n0", 0), ("n1", 0), ("l0", -1), ("h0", 1), ("n2", 0), ("l1", -5), ("h1", 2)]
    async with fleet.client() as client:
        submitted = {rid: await _submit(client, rid, p, max_new_tokens=3) for rid, p in plan}
        assert await redis.xlen(keys.jobs(QUEUE, "high")) == 2
        assert await redis.xlen(keys.jobs(QUEUE, "low")) == 2
        async with fleet.worker(max_num_seqs=1, sim_step_ms=2.0):
            started = await _start_times(client, submitted)
    assert sorted(started, key=started.__getitem__) == ["h0", "h1", "n0", "n1", "n2", "l0", "l1"]
    for lane in LANES:
        assert await redis.xlen(keys.jobs(QUEUE, lane)) == 0  # acked and deleted everywhere


async def test_a_high_priority_job_overtakes_a_backlog(fleet):
    """With a worker busy on a backlog of normal jobs, a high-priority job submitted last
    starts at the next free slot, before every normal job still waiting then."""
    async with fleet.client() as client, fleet.worker(max_num_seqs=2, sim_step_ms=5.0):
        submitted = {f"n{i}": await _submit(client, f"n{i}", 0, max_new_tokens=20)
                     for i in range(12)}
        await asyncio.sleep(0.1)
        submitted["urgent"] = await _submit(client, "urgent", 1, max_new_tokens=20)
        started = await _start_times(client, submitted)
    urgent = started.pop("urgent")
    waiting = [rid for rid, t in started.items() if t > submitted["urgent"]]
    assert len(waiting) >= 6, started  # the backlog was real
    assert all(urgent < started[rid] for rid in waiting)


@pytest.mark.parametrize("priority", [1, 0, -1])
async def test_admission_counts_every_lane(fleet, priority):
    """`max_queue_len` bounds the queue's whole backlog, whatever lanes it is in."""
    async with fleet.client(max_queue_len=3) as client:
        for i, p in enumerate((1, 0, -1)):
            await client.submit(f"job {i}", priority=p)
        with pytest.raises(OverloadedError):
            await client.submit("one too many", priority=priority)


async def test_reclaimed_jobs_keep_their_priority_order(fleet, redis, keys):
    """A dead consumer's expired jobs in every lane: a 1-slot worker's reclaimer starts them
    high lane first, then normal, then low (and never more than its free slot at once)."""
    async with fleet.client() as client:
        submitted = {}
        for rid, priority in [("l0", -1), ("n0", 0), ("h0", 1), ("l1", -1), ("h1", 1)]:
            submitted[rid] = await _submit(client, rid, priority, max_new_tokens=2)
        for lane in LANES:  # a consumer that then died: everything is pending for it
            await redis.xgroup_create(keys.jobs(QUEUE, lane), keys.group(QUEUE), id="0",
                                      mkstream=True)
            await redis.xreadgroup(keys.group(QUEUE), "dead", {keys.jobs(QUEUE, lane): ">"})
        await asyncio.sleep(0.6)  # the lease below
        async with fleet.worker(max_num_seqs=1, sim_step_ms=2.0, lease_ms=500):
            started = await _start_times(client, submitted)
    assert sorted(started, key=started.__getitem__) == ["h0", "h1", "n0", "l0", "l1"]


async def test_a_retry_with_another_priority_finds_its_job(fleet):
    """The idempotency key remembers the job's lane: a retry of the same id sent with a
    different priority is the same (queued) request, not an expired one."""
    async with fleet.client() as client:
        first = client.build_job("same", request_id="retry-me", priority=1)
        admitted = await client.enqueue(first)
        retry = client.build_job("same", request_id="retry-me", priority=0)
        again = await client.enqueue(retry)
        assert again.duplicate and again.lane == "high"
        assert again.entry_id == admitted.entry_id
        assert await client.request_exists(retry, again)


async def test_a_deleted_lane_is_recreated_without_stranding_other_lanes(fleet, redis, keys):
    """Someone deletes the low lane's stream (its group goes with it) while jobs wait in the
    normal lane: they are served at once, not left pending for a lease, and the low lane
    works again."""
    async with fleet.client() as client, fleet.worker(max_num_seqs=4, sim_step_ms=2.0):
        await client.generate("warm", max_new_tokens=1)
        await redis.delete(keys.jobs(QUEUE, "low"))
        finals = await asyncio.wait_for(asyncio.gather(
            *(client.generate(f"n{i}", max_new_tokens=2) for i in range(3)),
            client.generate("low", max_new_tokens=2, priority=-1)), 5)  # < the 30 s lease
    assert [f.details.generated_tokens for f in finals] == [2, 2, 2, 2]
    assert all(f.queue_ms < 2000 for f in finals)


@pytest.mark.parametrize("max_wait_s", [0.0, 0.3])
async def test_aging_bounds_the_wait_of_a_low_priority_job(fleet, max_wait_s):
    """A 1-slot worker kept busy by a stream of normal jobs: with strict priority the low
    job waits for all of them; with `lane_max_wait_s` it is pulled once it has waited that
    long, ahead of the younger normal jobs, and its wait is bounded."""
    async with fleet.client() as client, fleet.worker(max_num_seqs=1, sim_step_ms=5.0,
                                                      lane_max_wait_s=max_wait_s):
        submitted = {"n0": await _submit(client, "n0", 0, max_new_tokens=20)}
        await asyncio.sleep(0.05)  # n0 runs: everything below waits
        submitted["low"] = await _submit(client, "low", -1, max_new_tokens=20)
        for i in range(1, 12):
            submitted[f"n{i}"] = await _submit(client, f"n{i}", 0, max_new_tokens=20)
        started = await _start_times(client, submitted)
    order = sorted(started, key=started.__getitem__)
    waited_ms = started["low"] - submitted["low"]
    if max_wait_s == 0:
        assert order[-1] == "low", order
    else:
        assert order.index("low") <= 6, order  # ~100 ms a job: pulled after ~3 of them
        assert waited_ms < 1000, waited_ms  # strict: ~1.2 s (the order above is the test)
        assert order.index("low") >= 2, order  # but not before it was due


async def test_aging_does_not_starve_the_high_lane_behind_an_old_backlog(fleet):
    """Under sustained overload every normal job is overdue; aged jobs take at most every
    other slot, so a high-priority job still starts at the next priority slot, well before
    the old backlog has drained."""
    async with fleet.client() as client, fleet.worker(max_num_seqs=1, sim_step_ms=5.0,
                                                      lane_max_wait_s=0.2):
        submitted = {f"n{i}": await _submit(client, f"n{i}", 0, max_new_tokens=20)
                     for i in range(12)}
        await asyncio.sleep(0.5)  # the normal backlog is overdue now
        submitted["h"] = await _submit(client, "h", 1, max_new_tokens=20)
        started = await _start_times(client, submitted)
    order = sorted(started, key=started.__getitem__)
    after_h = order[order.index("h") + 1:]
    assert len(after_h) >= 4, order  # the backlog was still there when h started
    assert started["h"] - submitted["h"] < 800, order  # ~2 jobs' time; slack for CI load
