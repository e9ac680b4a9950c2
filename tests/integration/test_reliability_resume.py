"""Reclaim and resume, against a real server, with the test playing a worker that died: it
takes a job (XREADGROUP as consumer "ghost"), streams part of it, and never renews its lease.
A live worker must take the job over after the lease, continue at the next index with the same
tokens an undisturbed run produces, and never re-emit what the ghost already sent."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from redis.exceptions import ResponseError

from tokenfleet.engine.outputs import TokenOutput
from tokenfleet.engine.sampling_params import SamplingParams
from tokenfleet.engine.simulated_engine import SimulatedEngine
from tokenfleet.producer.errors import GenerationError
from tokenfleet.producer.protocol import (
    ErrorEvent,
    FinalDetails,
    FinalEvent,
    Job,
    Parameters,
    Token,
    TokenEvent,
    decode_event,
    encode,
)

QUEUE = "default"
LEASE = dict(lease_ms=600)  # reclaimed ~0.6-0.8 s after the ghost went silent


def _offline(prompt: str, params: Parameters) -> list[TokenOutput]:
    engine = SimulatedEngine(step_time_s=0)
    engine.add_request("r", engine.tokenizer.encode(prompt),
                       SamplingParams(**{f: getattr(params, f) for f in params.__struct_fields__}))
    outputs: list[TokenOutput] = []
    while engine.has_unfinished():
        for out in engine.step():
            outputs += out.tokens
    return outputs


async def _ghost_takes(redis, keys, job: Job) -> bytes:
    """Enqueue `job` and read it as consumer "ghost", which then dies."""
    jobs = keys.jobs(QUEUE)
    entry_id = await redis.xadd(jobs, {b"job": encode(job)})
    with contextlib.suppress(ResponseError):  # BUSYGROUP
        await redis.xgroup_create(jobs, keys.group(QUEUE), id="0", mkstream=True)
    await redis.xreadgroup(keys.group(QUEUE), "ghost", {jobs: ">"}, count=1)
    return entry_id


async def _ghost_streams(redis, keys, request_id: str, outputs: list[TokenOutput]) -> None:
    for t in outputs:
        event = TokenEvent(id=request_id, index=t.index,
                           token=Token(id=t.id, text=t.text, logprob=t.logprob))
        await redis.xadd(keys.events(request_id), {b"e": encode(event)})


async def _replay(redis, keys, request_id: str) -> list:
    return [decode_event(f[b"e"]) for _, f in await redis.xrange(keys.events(request_id))]


async def test_a_dead_workers_job_resumes_at_the_next_index(fleet, redis, keys):
    params = Parameters(max_new_tokens=30, details=True)
    job = Job(id="orphan", inputs="resume me please", parameters=params)
    expected = _offline(job.inputs, params)
    await _ghost_takes(redis, keys, job)
    await _ghost_streams(redis, keys, job.id, expected[:12])
    async with fleet.client() as client, fleet.worker(**LEASE) as worker:
        events = await asyncio.wait_for(_collect(client, job.id), 15)
    assert [e.index for e in events] == list(range(30))
    assert [e.token.id for e in events] == [t.id for t in expected]
    final = events[-1]
    assert isinstance(final, FinalEvent)
    assert final.generated_text == "".join(t.text for t in expected)
    assert [t.id for t in final.details.tokens] == [t.id for t in expected]
    assert final.usage.completion_tokens == final.details.generated_tokens == 30
    assert final.ttft_ms is not None and final.ttft_ms <= final.total_ms
    replay = await _replay(redis, keys, job.id)
    assert [e.index for e in replay] == list(range(30))  # 0..11 were not emitted again
    assert worker.metrics.reclaims._value.get() == 1
    assert await redis.xlen(keys.jobs(QUEUE)) == 0


async def test_unseeded_sampling_resumes_with_the_persisted_seed(fleet, redis, keys):
    params = Parameters(max_new_tokens=25, do_sample=True, temperature=0.7)
    job = Job(id="sampled-orphan", inputs="roll the dice", parameters=params)
    ghost_seed = 987654321  # what the dead worker had picked and stored
    seeded = Parameters(max_new_tokens=25, do_sample=True, temperature=0.7, seed=ghost_seed)
    expected = _offline(job.inputs, seeded)
    await _ghost_takes(redis, keys, job)
    await redis.set(keys.seed(job.id), str(ghost_seed))
    await _ghost_streams(redis, keys, job.id, expected[:10])
    async with fleet.client() as client, fleet.worker(**LEASE):
        events = await asyncio.wait_for(_collect(client, job.id), 15)
        fresh = await client.generate("fresh dice", max_new_tokens=5, do_sample=True)
    assert [e.token.id for e in events] == [t.id for t in expected]
    assert events[-1].details.seed == ghost_seed
    # A first run picks a seed and persists it before its first token.
    assert fresh.details.seed == int(await redis.get(keys.seed(fresh.id)))


async def test_a_job_delivered_too_often_is_dead_lettered(fleet, redis, keys):
    job = Job(id="poison", inputs="crashes its workers", parameters=Parameters(max_new_tokens=5))
    entry_id = await _ghost_takes(redis, keys, job)
    for _ in range(2):  # two more deliveries to (dead) ghosts: 3 in all
        await redis.xclaim(keys.jobs(QUEUE), keys.group(QUEUE), "ghost", 0, [entry_id])
    async with fleet.client() as client, fleet.worker(max_deliveries=3, **LEASE) as worker:
        healthy = await client.generate("unaffected", max_new_tokens=4)
        with pytest.raises(GenerationError, match="delivered 4 times"):
            await asyncio.wait_for(client.result(job.id), 15)
    assert healthy.details.generated_tokens == 4
    (_dead_id, dead), = await redis.xrange(keys.dead(QUEUE))
    assert dead[b"job"] == encode(job)
    assert dead[b"dead_error_type"] == b"generation"
    assert dead[b"dead_entry_id"] == entry_id
    assert worker.metrics.dead_letters._value.get() == 1
    assert await redis.xlen(keys.jobs(QUEUE)) == 0
    assert (await redis.xpending(keys.jobs(QUEUE), keys.group(QUEUE)))["pending"] == 0


async def test_progress_sets_the_delivery_count_back(fleet, redis, keys):
    job = Job(id="slow-but-moving", inputs="crash-prone fleet",
              parameters=Parameters(max_new_tokens=60))
    entry_id = await _ghost_takes(redis, keys, job)
    for _ in range(2):
        await redis.xclaim(keys.jobs(QUEUE), keys.group(QUEUE), "ghost", 0, [entry_id])
    async with fleet.client() as client, \
            fleet.worker(sim_step_ms=20.0, max_deliveries=4, lease_ms=300):
        following = asyncio.create_task(_collect(client, job.id))

        async def delivered() -> int:
            rows = await redis.xpending_range(keys.jobs(QUEUE), keys.group(QUEUE), "-", "+", 1)
            return rows[0]["times_delivered"] if rows else 0

        await _until(delivered, lambda n: n == 4)  # reclaimed: one more than the ghost's 3
        # It generates here, so it is not the job that killed its workers: the count resets.
        await _until(delivered, lambda n: n == 1)
        events = await asyncio.wait_for(following, 10)
    assert [e.index for e in events] == list(range(60))


async def test_a_finished_but_unacked_job_is_not_run_again(fleet, redis, keys):
    params = Parameters(max_new_tokens=6)
    job = Job(id="done-already", inputs="finished before the crash", parameters=params)
    outputs = _offline(job.inputs, params)
    await _ghost_takes(redis, keys, job)
    await _ghost_streams(redis, keys, job.id, outputs[:-1])
    last = outputs[-1]
    final = FinalEvent(id=job.id, index=last.index, token=Token(id=last.id, text=last.text),
                       generated_text="".join(t.text for t in outputs),
                       details=FinalDetails(finish_reason="length", generated_tokens=6))
    await redis.xadd(keys.events(job.id), {b"e": encode(final)})  # the crash hit before SET
    async with fleet.client() as client, fleet.worker(**LEASE):
        result = await asyncio.wait_for(client.result(job.id), 15)
        await _until_acked(redis, keys)
    assert result.generated_text == final.generated_text
    assert await redis.get(keys.result(job.id)) == encode(final)
    assert len(await _replay(redis, keys, job.id)) == 6  # nothing was generated again


async def test_the_same_id_never_runs_twice(fleet, redis, keys):
    async with fleet.client() as client, fleet.worker(**LEASE):
        first = await client.generate("only once", request_id="once", max_new_tokens=8)
        assert await client.submit("only once", request_id="once", max_new_tokens=8) == "once"
        assert await redis.xlen(keys.jobs(QUEUE)) == 0  # the retried submit was not enqueued
        # Even an entry written past admission (a second producer) does not run it again.
        job = Job(id="once", inputs="only once", parameters=Parameters(max_new_tokens=8))
        await redis.xadd(keys.jobs(QUEUE), {b"job": encode(job)})
        await _until_acked(redis, keys)
    assert len(await _replay(redis, keys, "once")) == 8
    assert decode_event(await redis.get(keys.result("once"))) == first


async def test_a_request_whose_keys_hold_garbage_fails_alone(fleet, redis, keys):
    await redis.set(keys.events("garbled"), "not a stream")  # XRANGE on it: WRONGTYPE
    async with fleet.client() as client, fleet.worker(**LEASE):
        await client.submit("x", request_id="garbled", max_new_tokens=3)
        await _until(lambda: redis.get(keys.result("garbled")), lambda v: v is not None)
        error = decode_event(await redis.get(keys.result("garbled")))
        assert isinstance(error, ErrorEvent) and "WRONGTYPE" in error.error
        assert (await client.generate("still fine", max_new_tokens=2)).details \
            .generated_tokens == 2
    assert (await redis.xrange(keys.dead(QUEUE)))[0][1][b"dead_error_type"] == b"generation"


async def test_a_worker_that_lost_its_lease_drops_its_copy(fleet, redis, keys):
    async with fleet.client() as client, fleet.worker(sim_step_ms=20.0, **LEASE) as worker:
        request_id = await client.submit("long job", max_new_tokens=300)
        await _until(lambda: _replay_len(redis, keys, request_id), lambda n: n >= 5)
        (entry,) = await redis.xpending_range(keys.jobs(QUEUE), keys.group(QUEUE), "-", "+", 1)
        # Another worker took it over (as if this one had been cut off past its lease).
        await redis.xclaim(keys.jobs(QUEUE), keys.group(QUEUE), "thief", 0, [entry["message_id"]])
        await _until(lambda: _gone(worker, request_id), bool)
        length = await _replay_len(redis, keys, request_id)
        await asyncio.sleep(0.3)
        assert await _replay_len(redis, keys, request_id) == length  # it stopped publishing
        assert worker.engine_stats["num_running"] == 0
    assert not await redis.exists(keys.result(request_id))


async def _collect(client, request_id: str) -> list:
    return [e async for e in client.stream(request_id)]


async def _replay_len(redis, keys, request_id: str) -> int:
    return int(await redis.xlen(keys.events(request_id)))


async def _gone(worker, request_id: str) -> bool:
    return request_id not in worker.inflight


async def _until_acked(redis, keys) -> None:
    async def acked() -> bool:
        pending = await redis.xpending(keys.jobs(QUEUE), keys.group(QUEUE))
        return pending["pending"] == 0 and await redis.xlen(keys.jobs(QUEUE)) == 0
    await _until(acked, bool)


async def _until(probe, ok, timeout_s: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while loop.time() < deadline:
        if ok(await probe()):
            return
        await asyncio.sleep(0.02)
    raise TimeoutError("condition not met")
