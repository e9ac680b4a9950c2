"""A poison job SIGKILLs every worker that starts it (the TOKENFLEET_TEST_HOOKS marker). After
`max_deliveries` deliveries it lands in the dead-letter stream with an error event; the jobs
around it — some running next to it in the killed workers — all finish correctly."""

from __future__ import annotations

import asyncio
import itertools
import signal
import time

import pytest
from chaos_support import QUEUE, check_stream, mixed_workload, run_clients, sim_reference

from tokenfleet.producer.errors import GenerationError
from tokenfleet.producer.keys import LANES
from tokenfleet.producer.protocol import decode_job
from tokenfleet.worker.test_hooks import KILL_MARKER

pytestmark = pytest.mark.chaos

WORKER = dict(max_num_seqs=4, sim_step_ms=20.0, lease_ms=1000, max_deliveries=3,
              test_hooks=True)


async def _keep_two_workers(fleet, redis, keys, request_id: str) -> list[int]:
    """Respawn workers as the poison kills them, until it is dead-lettered; exit codes."""
    names = (f"w{i}" for i in itertools.count())
    live = {fleet.spawn(next(names), **WORKER) for _ in range(2)}
    codes = []
    deadline = time.monotonic() + 60
    while not await redis.exists(keys.result(request_id)):
        assert time.monotonic() < deadline, "the poison job was never dead-lettered"
        for proc in [p for p in live if p.poll() is not None]:
            codes.append(proc.returncode)
            live.remove(proc)
            live.add(fleet.spawn(next(names), **WORKER))
        await asyncio.sleep(0.1)
    return codes


async def test_poison_job_is_dead_lettered_and_others_finish(fleet, redis, keys):
    specs = mixed_workload(12, max_tokens=60)
    async with fleet.client() as client:
        # In the high lane: a lane other than the original stream must dead-letter too.
        poison_id = await client.submit(f"{KILL_MARKER} I take workers down",
                                        request_id="poison", max_new_tokens=5, priority=1)
        clients = asyncio.create_task(run_clients(client, specs, timeout_s=90))
        codes = await _keep_two_workers(fleet, redis, keys, poison_id)
        results = await clients
        with pytest.raises(GenerationError, match="delivered 4 times"):
            await client.result(poison_id)

    assert codes == [-signal.SIGKILL] * 3  # each of the 3 deliveries killed its worker
    (_id, dead), = await redis.xrange(keys.dead(QUEUE))
    assert decode_job(dead[b"job"]).id == poison_id
    assert dead[b"dead_error_type"] == b"generation"
    assert dead[b"dead_lane"] == b"high"
    for spec in specs:
        final = check_stream(results[spec.request_id])
        check_stream(results[spec.request_id], sim_reference(spec, final.details.seed))
    for lane in LANES:  # every job acked and deleted, in every lane
        assert await redis.xlen(keys.jobs(QUEUE, lane)) == 0
        assert (await redis.xpending(keys.jobs(QUEUE, lane), keys.group(QUEUE)))["pending"] == 0
    fleet.stop_all()
    survivors = [p for p in fleet.processes if p.returncode != -signal.SIGKILL]
    assert survivors and all(p.returncode == 0 for p in survivors)
