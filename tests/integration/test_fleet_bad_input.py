"""The worker never trusts the stream: bad entries become error events and dead letters, and
good requests submitted alongside are served as usual."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from tokenfleet.producer.errors import DeadlineExceededError, ValidationError
from tokenfleet.producer.protocol import (
    PROTOCOL_VERSION,
    ErrorEvent,
    FinalEvent,
    Job,
    Parameters,
    encode,
)
from tokenfleet.worker.intake import MAX_JOB_BYTES

QUEUE = "default"


def _job(request_id: str, **fields) -> dict:
    job = {"v": 1, "id": request_id, "inputs": "a good prompt", "parameters": {},
           "submitted_ms": int(time.time() * 1000)}
    job.update(fields)
    return job


BAD_ENTRIES = {
    # name: (stream fields, the request id that gets an error event, or None if unreadable)
    "not_json": ({b"job": b"{this is not json"}, None),
    "no_job_field": ({b"something": b"else"}, None),
    "wrong_type": ({b"job": json.dumps(_job("bad-type", parameters={"max_new_tokens": "ten"}))},
                   "bad-type"),
    "negative_max_new_tokens": (
        {b"job": json.dumps(_job("bad-neg", parameters={"max_new_tokens": -3}))}, "bad-neg"),
    "unknown_model": ({b"job": json.dumps(_job("bad-model", model="gpt-17"))}, "bad-model"),
    "huge_prompt": ({b"job": json.dumps(_job("bad-huge", inputs="word " * 5000))}, "bad-huge"),
    "no_inputs": ({b"job": json.dumps(_job("bad-empty", inputs=None))}, "bad-empty"),
    "bad_chat_role": ({b"job": json.dumps(_job("bad-role", inputs=None,
                                               messages=[{"role": "wizard", "content": "x"}]))},
                      "bad-role"),
    "bad_id": ({b"job": json.dumps(_job("has {braces}"))}, None),
    "oversized": ({b"job": b"x" * (MAX_JOB_BYTES + 1)}, None),
}


async def test_bad_entries_are_dead_lettered_and_good_ones_served(fleet, redis, keys):
    jobs_key = keys.jobs(QUEUE)
    async with fleet.worker(sim_max_model_len=1024), fleet.client() as client:
        good_ids = [f"good-{i}" for i in range(4)]
        streams = {rid: client.events(rid) for rid in [*good_ids, "bad-type", "bad-neg",
                                                        "bad-model", "bad-huge", "bad-empty",
                                                        "bad-role"]}
        for stream in streams.values():
            await stream.__aenter__()
        try:
            for i, (fields, _rid) in enumerate(BAD_ENTRIES.values()):
                await redis.xadd(jobs_key, fields)
                if i < len(good_ids):  # interleave good requests with the bad ones
                    await client.submit("a good prompt", request_id=good_ids[i],
                                        max_new_tokens=5)
            results = {}
            for rid, stream in streams.items():
                results[rid] = [e async for e in stream]
        finally:
            for stream in streams.values():
                await stream.__aexit__(None, None, None)

        for rid in good_ids:
            assert isinstance(results[rid][-1], FinalEvent)
            assert [e.index for e in results[rid]] == list(range(5))
        for name, (_fields, bad_id) in BAD_ENTRIES.items():
            if bad_id is None:
                continue
            (event,) = results[bad_id]
            assert isinstance(event, ErrorEvent), name
            assert event.error_type == "validation", name
            assert event.error.startswith("Input validation error"), (name, event.error)
            with pytest.raises(ValidationError):
                await client.result(bad_id)
        assert "model 'gpt-17' is not served" in results["bad-model"][0].error
        assert "max_new_tokens" in results["bad-neg"][0].error
        assert "must be <=" in results["bad-huge"][0].error

        # The unreadable entries send no event to wait for: wait for their dead letters.
        for _ in range(100):
            if await redis.xlen(keys.dead(QUEUE)) >= len(BAD_ENTRIES):
                break
            await asyncio.sleep(0.05)
        dead = await redis.xrange(keys.dead(QUEUE))
        assert len(dead) == len(BAD_ENTRIES)
        assert all(b"dead_error" in fields for _id, fields in dead)
        raw_jobs = [fields.get(b"job") for _id, fields in dead]
        assert b"{this is not json" in raw_jobs  # the raw entry is kept as it was
        # Everything was acked and deleted: nothing is left pending or queued.
        assert await redis.xlen(jobs_key) == 0
        assert (await redis.xpending(jobs_key, keys.group(QUEUE)))["pending"] == 0

        # ...and the worker still serves.
        final = await client.generate("still alive?", max_new_tokens=3)
        assert final.details.generated_tokens == 3


async def test_client_side_validation_rejects_before_enqueueing(fleet, redis, keys):
    async with fleet.client() as client:
        for bad in ({"max_new_tokens": 0}, {"top_p": 1.5}, {"temperature": -1.0},
                    {"max_new_tokenz": 5}, {"max_new_tokens": "5"}, {"stop": [""]}):
            with pytest.raises(ValidationError):
                await client.submit("x", **bad)
        with pytest.raises(ValidationError):
            await client.submit("x", request_id="no spaces allowed")
        with pytest.raises(ValidationError):
            await client.submit(None)
    assert await redis.xlen(keys.jobs(QUEUE)) == 0


async def test_expired_deadline_is_dropped_at_intake(fleet, redis, keys):
    job = Job(id="late-job", inputs="too late", parameters=Parameters(max_new_tokens=3),
              submitted_ms=int(time.time() * 1000) - 5000,
              deadline_ms=int(time.time() * 1000) - 1000)
    async with fleet.client() as client:
        await client.enqueue(job)
        async with fleet.worker():
            with pytest.raises(DeadlineExceededError):
                await asyncio.wait_for(client.result("late-job"), 10)
            with pytest.raises(DeadlineExceededError):
                await client.generate("x", deadline_ms=int(time.time() * 1000) - 1,
                                      max_new_tokens=2)
    assert await redis.xlen(keys.dead(QUEUE)) == 0  # not poison: no dead letter


async def test_unknown_fields_and_newer_protocol(fleet, redis, keys):
    future = _job("from-the-future", parameters={"max_new_tokens": 2, "new_knob": 1},
                  new_top_level_field={"x": 1})
    v2 = _job("breaking-v2", v=PROTOCOL_VERSION + 1)  # a version this worker does not know
    async with fleet.worker(), fleet.client() as client:
        await redis.xadd(keys.jobs(QUEUE), {b"job": encode(future)})
        await redis.xadd(keys.jobs(QUEUE), {b"job": encode(v2)})
        final = await asyncio.wait_for(client.result("from-the-future"), 10)
        assert final.details.generated_tokens == 2  # unknown fields are ignored
        with pytest.raises(ValidationError, match="newer"):
            await asyncio.wait_for(client.result("breaking-v2"), 10)
