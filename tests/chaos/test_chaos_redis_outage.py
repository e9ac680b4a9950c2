"""Redis itself fails: SIGKILLed and restarted from its AOF (appendfsync always), or stalled
with SIGSTOP for longer than the lease, while jobs are queued and streaming. Nothing is lost,
no client sees an index twice or a different token, workers reconnect and log the outage once.
"""

from __future__ import annotations

import asyncio
import signal

import pytest
from chaos_support import (
    RawListener,
    assert_queue_empty,
    check_stream,
    mixed_workload,
    run_clients,
    sim_reference,
    wait_until,
)
from redis.asyncio import Redis

pytestmark = pytest.mark.chaos

WORKER = dict(max_num_seqs=4, sim_step_ms=25.0, lease_ms=1500)
WORKERS = ("w0", "w1")


async def _streaming(redis: Redis, keys, num_requests: int) -> bool:
    """True once several requests have streamed a few tokens."""
    lengths = [await redis.xlen(keys.events(f"req-{i}")) for i in range(num_requests)]
    return sum(1 for n in lengths if n >= 3) >= 3


async def _run_with_fault(fleet, keys, fault) -> dict:
    redis = Redis.from_url(fleet.url)
    specs = mixed_workload(16, max_tokens=80)  # 16 requests, 8 slots: some stay queued
    try:
        for worker_id in WORKERS:
            fleet.spawn(worker_id, **WORKER)
        await fleet.wait_for_workers(redis, list(WORKERS))
        async with fleet.client() as client, RawListener(redis, keys) as raw:
            clients = asyncio.create_task(run_clients(client, specs, timeout_s=90))
            await wait_until(lambda: _streaming(redis, keys, len(specs)), 20)
            await fault()
            results = await clients
            # Workers serve new jobs after the fault, too.
            after = await asyncio.wait_for(client.generate("after the fault", max_new_tokens=5),
                                           30)
        assert after.details.generated_tokens == 5
        for spec in specs:
            final = check_stream(results[spec.request_id])
            check_stream(results[spec.request_id], sim_reference(spec, final.details.seed))
        assert not raw.conflicts()
        await assert_queue_empty(redis, keys)
        fleet.stop_all()
        assert all(proc.returncode == 0 for proc in fleet.processes)
        return results
    finally:
        await redis.aclose()


async def test_redis_restart_with_aof_loses_nothing(own_fleet, server_process, keys):
    async def restart() -> None:
        server_process.kill()
        await asyncio.sleep(2.0)
        await asyncio.to_thread(server_process.start)

    await _run_with_fault(own_fleet, keys, restart)
    for worker_id in WORKERS:
        events = [line["event"] for line in own_fleet.log_lines(worker_id)]
        assert events.count("redis_unavailable") == 1, events
        assert events.count("redis_back") == 1, events


async def test_redis_stall_longer_than_the_lease(own_fleet, server_process, keys):
    async def stall() -> None:
        server_process.signal(signal.SIGSTOP)
        await asyncio.sleep(3.0)  # 2x the lease: every pending entry looks expired after it
        server_process.signal(signal.SIGCONT)

    await _run_with_fault(own_fleet, keys, stall)


async def test_a_failover_demotion_is_waited_out(own_fleet, server_process, keys):
    """The server is demoted to a replica for a second, as in a failover (blocked reads are
    cut short with UNBLOCKED, writes refused with READONLY), then promoted again: workers
    wait it out instead of stopping, and nothing is lost or changed."""
    async def demote() -> None:
        admin = Redis.from_url(server_process.url)
        try:
            await admin.execute_command("REPLICAOF", "127.0.0.1", "1")  # a master never seen
            await asyncio.sleep(1.0)
            await admin.execute_command("REPLICAOF", "NO", "ONE")
        finally:
            await admin.aclose()

    await _run_with_fault(own_fleet, keys, demote)


async def test_an_idle_worker_survives_a_demotion(own_fleet, server_process):
    """An idle worker's intake is blocked in XREADGROUP when the node is demoted: the read
    is cut short (UNBLOCKED) and recreating the groups is refused (READONLY). The worker
    waits that out; once the node is promoted again it serves as before."""
    admin = Redis.from_url(server_process.url)
    try:
        async with own_fleet.worker(read_block_ms=5000) as worker, \
                own_fleet.client() as client:
            await client.generate("warm up", max_new_tokens=2)
            await asyncio.sleep(0.3)  # the intake blocks again
            await admin.execute_command("REPLICAOF", "127.0.0.1", "1")
            await asyncio.sleep(1.0)
            await admin.execute_command("REPLICAOF", "NO", "ONE")
            final = await asyncio.wait_for(client.generate("after", max_new_tokens=3), 30)
            assert final.details.generated_tokens == 3
            assert worker.exit_code == 0  # not stopped by the intake dying
    finally:
        await admin.aclose()


async def test_a_full_redis_is_waited_out(own_fleet, server_process, keys):
    """Redis reaches `maxmemory` (noeviction) for a while: every write that needs memory is
    refused with OOM (XADD, SET) while acks and PUBLISH still pass. Workers wait it out as
    an outage: no job is acked without its stored result, no replay stream loses an event,
    and every stream ends as an undisturbed run's would."""
    async def fill_up() -> None:
        admin = Redis.from_url(server_process.url)
        try:
            await admin.config_set("maxmemory", 1)  # below what is used: every write refused
            await asyncio.sleep(1.5)
            await admin.config_set("maxmemory", 0)
        finally:
            await admin.aclose()

    results = await _run_with_fault(own_fleet, keys, fill_up)
    redis = Redis.from_url(own_fleet.url)
    try:
        for request_id, events in results.items():
            final = check_stream(events)
            stored = await redis.get(keys.result(request_id))
            assert stored is not None, f"{request_id}: acked without its result"
            replay = await redis.xrange(keys.events(request_id))
            assert len(replay) == final.details.generated_tokens, request_id
    finally:
        await redis.aclose()
