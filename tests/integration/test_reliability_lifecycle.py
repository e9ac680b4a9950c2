"""Deadlines of running requests, cancel freeing KV blocks within a step, the drain handing
unfinished jobs over, and the claim scripts on both server-version paths — on a real server."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest

from tokenfleet.producer.errors import DeadlineExceededError
from tokenfleet.producer.protocol import ErrorEvent, FinalEvent, TokenEvent, decode_event
from tokenfleet.worker.connectivity import Connectivity
from tokenfleet.worker.metrics import WorkerMetrics
from tokenfleet.worker.reclaimer import Reclaimer
from tokenfleet.worker.server_features import ServerFeatures

QUEUE = "default"


async def test_a_running_request_is_stopped_at_its_deadline(fleet, redis, keys):
    async with fleet.worker(sim_step_ms=20.0) as worker, fleet.client() as client:
        events = []
        start = time.monotonic()
        with pytest.raises(DeadlineExceededError, match="deadline exceeded after"):
            async for event in client.generate_stream("too slow", max_new_tokens=500,
                                                      deadline_s=0.6, request_id="slow"):
                events.append(event)
        elapsed_s = time.monotonic() - start
        assert worker.engine_stats["num_free_blocks"] == worker.engine_stats["num_total_blocks"]
    assert 0.6 <= elapsed_s < 1.5
    assert 5 < len(events) < 75 and all(isinstance(e, TokenEvent) for e in events)
    stored = decode_event(await redis.get(keys.result("slow")))
    assert isinstance(stored, ErrorEvent) and stored.error_type == "deadline_exceeded"
    assert await redis.xlen(keys.jobs(QUEUE)) == 0
    assert await redis.xlen(keys.dead(QUEUE)) == 0  # not poison


async def test_cancel_frees_the_kv_blocks_within_one_step(fleet):
    async with fleet.worker(sim_step_ms=50.0) as worker, fleet.client() as client:
        seen, final = await _cancel_after_three_tokens(client, max_new_tokens=200)
        # The step that reported the cancellation already ran without the sequence.
        stats = worker.engine_stats
    assert final.details.generated_tokens <= seen + 2
    assert stats["num_free_blocks"] == stats["num_total_blocks"]
    assert stats["num_running"] == 0


@pytest.mark.slow
async def test_cancel_frees_the_kv_blocks_of_the_real_engine(fleet, tiny_llama_dir):
    async with fleet.worker(engine="llm", model=str(tiny_llama_dir), dtype="float32",
                            device="cpu", num_threads=1, num_kv_blocks=128) as worker, \
            fleet.client() as client:
        _seen, final = await _cancel_after_three_tokens(client, max_new_tokens=900)
        stats = worker.engine_stats
    assert final.details.generated_tokens < 900
    assert stats["num_free_blocks"] == stats["num_total_blocks"] == 128
    assert stats["num_running"] == 0


async def _cancel_after_three_tokens(client, max_new_tokens: int) -> tuple[int, FinalEvent]:
    seen = 0
    async for event in client.generate_stream("cancel me", max_new_tokens=max_new_tokens):
        if isinstance(event, TokenEvent):
            seen += 1
            if seen == 3:
                await client.cancel(event.id)
        final = event
    assert isinstance(final, FinalEvent) and final.details.finish_reason == "cancelled"
    assert [final.index, final.token] == [None, None]
    return seen, final


async def test_drain_timeout_hands_unfinished_jobs_to_another_worker(fleet, redis, keys):
    # Leases of 6 s: without the hand-over the job would wait that long for a reclaim.
    proc = fleet.spawn("leaving", sim_step_ms=20.0, drain_timeout_s=0.3, lease_ms=6000)
    await fleet.wait_for_workers(redis, ["leaving"])
    async with fleet.client() as client:
        request_id = await client.submit("long job", max_new_tokens=150)  # ~3 s
        following = asyncio.create_task(_collect(client, request_id))
        await _until(lambda: redis.xlen(keys.events(request_id)), lambda n: n >= 10)
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.to_thread(proc.wait, 10) == 0
        left_at = time.monotonic()
        async with fleet.worker(sim_step_ms=20.0, lease_ms=6000):
            events = await asyncio.wait_for(following, 15)
            taken_over_s = time.monotonic() - left_at
    assert [e.index for e in events] == list(range(150))
    assert taken_over_s < 6.0  # resumed before the lease would have expired
    assert any(line.get("event") == "jobs_released" and line["num_released"] == 1
               for line in fleet.log_lines("leaving"))


@pytest.mark.parametrize("version", [(7, 0, 0), (6, 0, 0)],
                         ids=["xautoclaim", "xpending-xclaim-before-6.2"])
async def test_claim_scripts_on_both_server_version_paths(redis, keys, version):
    jobs, group = keys.jobs(QUEUE), keys.group(QUEUE)
    await redis.xgroup_create(jobs, group, id="0", mkstream=True)
    ids = [await redis.xadd(jobs, {b"job": f"j{i}".encode()}) for i in range(4)]
    await redis.xreadgroup(group, "ghost", {jobs: ">"}, count=4)
    await redis.xdel(jobs, ids[0])  # its job is gone but it is still pending
    # The lease must outlast the three scans below: with a shorter one, a slow machine sees
    # the entries claimed by the first scan idle again by the third and claims them twice.
    await asyncio.sleep(1.1)
    reclaimer = Reclaimer(redis, keys, QUEUE, "me", lease_ms=1000,
                          features=ServerFeatures("redis", version),
                          connectivity=Connectivity(), free_slots=lambda: 2,
                          take=_never, metrics=WorkerMetrics())
    claimed = []
    for _ in range(3):  # the scan continues where the last one stopped
        batch = await reclaimer.claim(2)
        assert len(batch) <= 2  # never more than the engine can start
        claimed += batch
    assert [c.entry_id for c in claimed] == ids[1:]
    assert [c.fields for c in claimed] == [{b"job": f"j{i}".encode()} for i in (1, 2, 3)]
    assert [c.num_delivered for c in claimed] == [2, 2, 2]
    pending = await redis.xpending_range(jobs, group, "-", "+", 10)
    assert [(p["message_id"], p["consumer"]) for p in pending] == \
        [(i, b"me") for i in ids[1:]]  # the deleted job left the pending list
    assert await reclaimer.claim(4) == []  # nothing idle: freshly claimed entries are ours


async def test_server_features_are_detected(redis, redis_server):
    features = await ServerFeatures.detect(redis)
    assert features.name == redis_server.kind
    assert features.version >= (7, 0, 0)
    assert features.has_xautoclaim and features.xautoclaim_reports_deleted
    old = ServerFeatures.from_info({"redis_version": "6.0.16"})
    assert not old.has_xautoclaim and not old.xautoclaim_reports_deleted
    assert ServerFeatures.from_info({"redis_version": "6.2.14"}).has_xautoclaim
    valkey = ServerFeatures.from_info({"redis_version": "7.2.4", "valkey_version": "8.1.0"})
    assert (valkey.name, valkey.version, valkey.product_version) == \
        ("valkey", (7, 2, 4), "8.1.0")


async def _never(*args: object) -> None:
    raise AssertionError("claim() does not hand entries over")


async def _collect(client, request_id: str) -> list:
    return [e async for e in client.stream(request_id)]


async def _until(probe, ok, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if ok(await probe()):
            return
        await asyncio.sleep(0.02)
    raise TimeoutError("condition not met")
