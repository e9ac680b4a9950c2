"""Cancel, graceful drain on SIGTERM, heartbeat registry, metrics endpoint."""

from __future__ import annotations

import asyncio
import signal
import socket
import urllib.request

import pytest

from tokenfleet.producer.fleet_status import fleet_status
from tokenfleet.producer.protocol import FinalEvent, decode_worker_info

QUEUE = "default"


async def test_cancel_a_running_request(fleet):
    async with fleet.worker(sim_step_ms=10.0), fleet.client() as client:
        events = []
        async for event in client.generate_stream("cancel me", max_new_tokens=500):
            events.append(event)
            if len(events) == 5:
                await client.cancel(event.id)
    final = events[-1]
    assert isinstance(final, FinalEvent)
    assert final.details.finish_reason == "cancelled"
    assert final.index is None and final.token is None
    assert 5 <= final.details.generated_tokens < 100  # stopped within a few steps
    assert [e.index for e in events[:-1]] == list(range(len(events) - 1))


async def test_cancel_a_queued_request(fleet, redis, keys):
    async with fleet.client() as client:
        request_id = await client.submit("never started", max_new_tokens=5)
        await client.cancel(request_id)
        async with fleet.worker():
            final = await asyncio.wait_for(client.result(request_id), 10)
    assert final.details.finish_reason == "cancelled"
    assert final.details.generated_tokens == 0
    assert await redis.xlen(keys.jobs(QUEUE)) == 0


async def test_sigterm_drains_in_flight_requests_then_exits(fleet, redis, keys):
    proc = fleet.spawn("drainer", max_num_seqs=2, sim_step_ms=20.0)
    await fleet.wait_for_workers(redis, ["drainer"])
    async with fleet.client() as client:
        ids = [await client.submit(f"p{i}", max_new_tokens=50) for i in range(2)]  # ~1 s
        await asyncio.sleep(0.3)
        proc.send_signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        late = await client.submit("after sigterm", max_new_tokens=2)
        finals = [await asyncio.wait_for(client.result(i), 20) for i in ids]
        assert [f.details.generated_tokens for f in finals] == [50, 50]
        assert await asyncio.to_thread(proc.wait, 20) == 0
        # The draining worker stopped pulling: the late job is still queued for others.
        assert not await redis.exists(keys.result(late))
        assert (await redis.xinfo_groups(keys.jobs(QUEUE)))[0]["lag"] == 1
        assert not await redis.exists(keys.worker("drainer"))  # deregistered
        async with fleet.worker():
            assert (await asyncio.wait_for(client.result(late), 10)).details.generated_tokens == 2


async def test_heartbeat_status_and_metrics(fleet, redis, keys):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with fleet.worker(worker_id="observed", metrics_port=port, metrics_host="127.0.0.1",
                            lease_ms=600), fleet.client() as client:
        await client.generate("count me", max_new_tokens=7)
        await asyncio.sleep(0.5)  # one heartbeat later
        info = decode_worker_info(await redis.get(keys.worker("observed")))
        assert (info.queue, info.model, info.num_finished) == (QUEUE, "sim", 1)
        assert 0 < await redis.pttl(keys.worker("observed")) <= 600
        status = await fleet_status(redis, keys)
        assert [w.worker_id for w in status.workers] == ["observed"]
        (queue,) = status.queues
        assert (queue.queue, queue.backlog, queue.pending, queue.num_consumers) == \
            (QUEUE, 0, 0, 1)
        body = await asyncio.to_thread(
            lambda: urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics").read().decode())
    samples = dict(line.rsplit(" ", 1) for line in body.splitlines()
                   if line and not line.startswith("#"))
    assert float(samples["tokenfleet_generated_tokens_total"]) == 7
    assert float(samples['tokenfleet_requests_total{outcome="length"}']) == 1
    assert float(samples["tokenfleet_time_to_first_token_seconds_count"]) == 1
    assert float(samples["tokenfleet_queue_wait_seconds_count"]) == 1


@pytest.mark.parametrize("num_clients", [3])
async def test_one_client_multiplexes_streams_of_the_same_request(fleet, num_clients):
    async with fleet.worker(sim_step_ms=10.0), fleet.client() as client:
        request_id = await client.submit("shared", max_new_tokens=20)
        runs = await asyncio.gather(*(_collect(client, request_id) for _ in range(num_clients)))
    assert all(run == runs[0] for run in runs)
    assert runs[0] == list(range(20))


async def _collect(client, request_id: str) -> list[int]:
    return [e.index async for e in client.stream(request_id)]


async def test_a_worker_process_freezes_its_start_up_heap(fleet, redis):
    """`tokenfleet worker` moves its start-up heap out of the cyclic garbage collector once it
    is ready (gc_freeze, on by default), so an oldest-generation pass no longer walks the
    model and every stream no longer waits for it; `--gc-freeze 0` leaves the heap as is.
    Both serve."""
    fleet.spawn("frozen")
    fleet.spawn("unfrozen", gc_freeze=False)
    await fleet.wait_for_workers(redis, ["frozen", "unfrozen"])
    async with fleet.client() as client:
        ids = [await client.submit(f"p{i}", max_new_tokens=3) for i in range(8)]
        finals = [await asyncio.wait_for(client.result(i), 20) for i in ids]
    assert [f.details.generated_tokens for f in finals] == [3] * 8
    started = {w: next(line for line in fleet.log_lines(w)
                       if line.get("event") == "worker_started")
               for w in ("frozen", "unfrozen")}
    assert started["frozen"]["num_frozen_objects"] > 10_000
    assert started["unfrozen"]["num_frozen_objects"] == 0
