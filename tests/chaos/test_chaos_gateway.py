"""A gateway process SIGKILLed mid-stream: requests named by an Idempotency-Key re-attach
through another gateway and stream every token exactly once, identical to an undisturbed run;
the fleet keeps generating them meanwhile (the gateway holds no state)."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

import aiohttp
import pytest
from chaos_support import Spec, sim_reference

pytestmark = pytest.mark.chaos

REPO_ROOT = Path(__file__).resolve().parents[2]


async def _sse_events(resp: aiohttp.ClientResponse, limit: int | None = None) -> list[dict]:
    events = []
    async for line in resp.content:
        if line.startswith(b"data:"):
            events.append(json.loads(line[len(b"data:"):]))
            if limit is not None and len(events) == limit:
                break
    return events


async def test_requests_survive_a_sigkilled_gateway(fleet):
    specs = [Spec(f"order-{i}", f"gateway chaos {i}", {"max_new_tokens": 40 + i,
                                                       "details": True}) for i in range(4)]
    async with fleet.gateway() as (gateway_a, url_a), fleet.gateway() as (_, url_b), \
            fleet.worker(sim_step_ms=20.0, max_num_seqs=8), aiohttp.ClientSession() as http:

        async def first_tokens(spec: Spec) -> list[dict]:
            async with http.post(f"{url_a}/generate_stream", json={
                    "inputs": spec.prompt, "parameters": spec.parameters},
                    headers={"Idempotency-Key": spec.request_id}) as resp:
                return await _sse_events(resp, limit=5)

        before = await asyncio.gather(*(first_tokens(s) for s in specs))
        gateway_a.send_signal(signal.SIGKILL)
        await gateway_a.wait()

        async def reattach(spec: Spec) -> list[dict]:
            async with http.post(f"{url_b}/generate_stream", json={
                    "inputs": spec.prompt, "parameters": spec.parameters},
                    headers={"Idempotency-Key": spec.request_id}) as resp:
                assert resp.status == 200
                return await _sse_events(resp)

        after = await asyncio.wait_for(asyncio.gather(*(reattach(s) for s in specs)), 60)

    for spec, head, events in zip(specs, before, after, strict=True):
        n = spec.parameters["max_new_tokens"]
        assert [e["index"] for e in events] == list(range(1, n + 1))  # each token once
        assert events[:5] == head  # the replay repeats exactly what was already streamed
        assert [e["token"]["id"] for e in events] == sim_reference(spec, None)
        assert events[-1]["details"]["finish_reason"] == "length"  # never cancelled
        assert events[-1]["generated_text"] == "".join(e["token"]["text"] for e in events)


async def test_a_sigkilled_gateways_unkeyed_jobs_are_cancelled(fleet):
    """A request sent without an Idempotency-Key has one reader, through one gateway: when
    that gateway dies nobody can read the job any more. Workers see the gateway's liveness key
    expire (owner_ttl_s) and cancel the job instead of generating to max_new_tokens. Keyed
    jobs of the same gateway keep running (their clients can re-attach elsewhere)."""
    body = {"inputs": "orphan", "parameters": {"max_new_tokens": 2000}}  # ~40 s at 20 ms
    async with fleet.gateway("--owner-ttl-s", "1") as (gateway, url), \
            fleet.worker(sim_step_ms=20.0, max_num_seqs=8, owner_ttl_s=1.0,
                         lease_ms=600) as worker, \
            aiohttp.ClientSession() as http, fleet.client() as client:
        streams = [await http.post(f"{url}/generate_stream", json=body, headers=headers)
                   for headers in ({}, {"Idempotency-Key": "kept"})]
        for resp in streams:  # both running, their clients still connected
            assert resp.status == 200
            assert await resp.content.readline()
        running = list(worker.inflight.values())
        orphan = next(r for r in running if r.job.owner is not None)
        kept = next(r for r in running if r.job.owner is None)
        assert orphan.job.owner.startswith("gateway-")
        gateway.send_signal(signal.SIGKILL)
        await gateway.wait()
        killed_at = asyncio.get_running_loop().time()
        final = await client.result(orphan.request_id, timeout_s=15)
        took_s = asyncio.get_running_loop().time() - killed_at
        assert final.details.finish_reason == "cancelled"
        assert final.details.generated_tokens < 1000
        assert took_s < 8  # key TTL (1 s) + grace (1 s) + a heartbeat (0.2 s), with slack
        assert kept.request_id in worker.inflight  # the keyed one is still generating
        await client.cancel(kept.request_id)
        for resp in streams:
            resp.close()
