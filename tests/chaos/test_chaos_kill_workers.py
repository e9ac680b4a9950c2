"""Three worker processes, 60 concurrent requests, two workers SIGKILLed mid-generation: every
request finishes, every client sees indices 0..n-1 exactly once, and every output equals what
an undisturbed engine produces (greedy, seeded and unseeded sampling alike)."""

from __future__ import annotations

import asyncio

import pytest
from chaos_support import (
    RawListener,
    assert_queue_empty,
    check_stream,
    kill_busiest,
    mixed_workload,
    run_clients,
    sim_reference,
)

pytestmark = pytest.mark.chaos

WORKER = dict(max_num_seqs=8, sim_step_ms=25.0, lease_ms=1500, drain_timeout_s=10.0)


async def test_sigkill_two_workers_mid_generation(fleet, redis, keys):
    specs = mixed_workload(60)
    procs = {w: fleet.spawn(w, **WORKER) for w in ("w0", "w1", "w2")}
    await fleet.wait_for_workers(redis, list(procs))
    async with fleet.client() as client, RawListener(redis, keys) as raw:
        clients = asyncio.create_task(run_clients(client, specs, timeout_s=120))
        first = await kill_busiest(redis, keys, procs)
        await asyncio.sleep(0.5)
        second = await kill_busiest(redis, keys, procs)
        procs["w3"] = fleet.spawn("w3", **WORKER)  # a replacement joins the survivor
        results = await clients

    for spec in specs:
        events = results[spec.request_id]
        final = check_stream(events)
        expected = sim_reference(spec, final.details.seed)
        check_stream(events, expected)
    assert not raw.conflicts()  # duplicates (from resumed runs) carry the same token
    await assert_queue_empty(redis, keys)

    fleet.stop_all()
    killed = {first[0], second[0]}
    survivors = [w for w in procs if w not in killed]
    assert all(procs[w].returncode == 0 for w in survivors)
    resumed = [line for w in survivors for line in fleet.log_lines(w)
               if line.get("event") == "job_resumed"]
    assert resumed, "no job was resumed from its replay stream"
    assert all(line["num_resumed"] > 0 for line in resumed)
    assert sum(1 for w in survivors for line in fleet.log_lines(w)
               if line.get("event") == "job_reclaimed") >= first[1] + second[1]
