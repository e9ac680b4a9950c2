"""Two worker processes, many concurrent streams: every token once, in order, from either
worker, readable by TGI's own client types, and equal to what the engine produces offline."""

from __future__ import annotations

import asyncio
import json

import msgspec
import pytest
from text_generation.types import StreamResponse

from tokenfleet.engine.sampling_params import SamplingParams
from tokenfleet.engine.simulated_engine import SimulatedEngine
from tokenfleet.producer.protocol import FinalEvent, TokenEvent, encode

pytestmark = pytest.mark.slow


def _offline_tokens(prompt: str, max_new_tokens: int) -> list[int]:
    """The token ids a SimulatedEngine produces for the prompt, without the fleet."""
    engine = SimulatedEngine(step_time_s=0)
    engine.add_request("r", engine.tokenizer.encode(prompt),
                       SamplingParams(max_new_tokens=max_new_tokens))
    ids: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            ids += [t.id for t in out.tokens]
    return ids


async def test_two_worker_processes_serve_16_concurrent_streams(fleet, redis):
    workers = ["w-a", "w-b"]
    for worker_id in workers:
        fleet.spawn(worker_id, max_num_seqs=4, sim_step_ms=15.0, lease_ms=1500)
    await fleet.wait_for_workers(redis, workers)

    async def one(i: int, client) -> tuple[str, int, list]:
        prompt = f"prompt number {i}"
        events = [e async for e in client.generate_stream(
            prompt, max_new_tokens=8 + i, request_id=f"req-{i}", tenant=f"team-{i % 2}",
            priority=i % 3)]
        return prompt, 8 + i, events

    async with fleet.client() as client:
        results = await asyncio.wait_for(
            asyncio.gather(*(one(i, client) for i in range(16))), 120)

    for prompt, max_new_tokens, events in results:
        *tokens, final = events
        assert all(isinstance(e, TokenEvent) for e in tokens)
        assert isinstance(final, FinalEvent)
        streamed = [*tokens, final]
        assert [e.index for e in streamed] == list(range(max_new_tokens))
        assert "".join(e.token.text for e in streamed) == final.generated_text
        assert [e.token.id for e in streamed] == _offline_tokens(prompt, max_new_tokens)
        assert final.details.finish_reason == "length"
        assert final.details.generated_tokens == max_new_tokens
        assert final.usage.prompt_tokens == 3
        assert 0 <= final.queue_ms <= final.ttft_ms <= final.total_ms
        for event in streamed:  # TGI's client types read our events unchanged
            parsed = StreamResponse(**json.loads(encode(event)))
            assert parsed.token.text == event.token.text
        parsed_final = StreamResponse(**json.loads(encode(final)))
        assert parsed_final.generated_text == final.generated_text
        assert parsed_final.details.generated_tokens == max_new_tokens

    await asyncio.sleep(0.6)  # let both processes write their last log lines
    fleet.stop_all()
    finished = [line for w in workers for line in fleet.log_lines(w)
                if line.get("event") == "request_finished"]
    for line in finished:  # tenant and priority reach the per-request log line
        i = int(line["request_id"].split("-")[1])
        assert (line["tenant"], line.get("priority")) == (f"team-{i % 2}", i % 3 or None)
    served = {w: {line["request_id"] for line in fleet.log_lines(w)
                  if line.get("event") == "request_finished"} for w in workers}
    assert served["w-a"] and served["w-b"], served  # both workers took part
    assert served["w-a"] | served["w-b"] == {f"req-{i}" for i in range(16)}
    assert not served["w-a"] & served["w-b"]
    assert all(p.returncode == 0 for p in fleet.processes)


async def test_late_subscriber_gets_every_token_from_the_replay(fleet):
    async with fleet.worker(sim_step_ms=10.0), fleet.client() as client:
        request_id = await client.submit("late subscriber", max_new_tokens=30)
        await asyncio.sleep(0.1)  # some tokens are out before we subscribe
        mid = [e async for e in client.stream(request_id)]
        final = await client.result(request_id)
        after = [e async for e in client.stream(request_id)]  # after it finished
        tail = [e async for e in client.stream(request_id, from_index=25)]
    assert [e.index for e in mid] == list(range(30))
    assert msgspec.to_builtins(after) == msgspec.to_builtins(mid)
    assert mid[-1] == final
    assert [e.index for e in tail] == list(range(25, 30))


async def test_generate_and_sync_client(fleet, redis_url, keys):
    from tokenfleet.producer.sync_client import SyncClient

    async with fleet.worker():
        async with fleet.client() as client:
            final = await client.generate(messages=[{"role": "user", "content": "hi"}],
                                          max_new_tokens=5, details=True)
        assert final.details.generated_tokens == len(final.details.tokens) == 5
        assert "".join(t.text for t in final.details.tokens) == final.generated_text

        def sync_part() -> tuple[str, list]:
            with SyncClient(redis_url, keys=keys) as sync:
                text = sync.generate("sync prompt", max_new_tokens=4).generated_text
                return text, list(sync.generate_stream("sync prompt", max_new_tokens=4))

        text, events = await asyncio.to_thread(sync_part)
    assert "".join(e.token.text for e in events) == text == events[-1].generated_text
    assert [e.index for e in events] == [0, 1, 2, 3]


async def _expire_calls(redis) -> int:
    stats = await redis.info("commandstats")
    return int(stats.get("cmdstat_expire", {}).get("calls", 0))


async def test_replay_stream_ttl_is_refreshed_not_set_every_step(fleet, redis, keys):
    """EXPIRE on the replay stream: at its first events, each time a quarter of the TTL has
    passed, and at the end (it used to be one per step: a third of all commands per token)."""
    async with fleet.worker(events_ttl_s=2, sim_step_ms=20.0), fleet.client() as client:
        before = await _expire_calls(redis)
        events = [e async for e in client.generate_stream("ttl please", max_new_tokens=100,
                                                         ignore_eos=True)]
        calls = await _expire_calls(redis) - before
    assert len(events) == 100
    assert 3 <= calls < 25  # start + refreshes every 0.5 s of a ~2 s run + end; not 100
    assert isinstance(events[-1], FinalEvent)
    assert 0 < await redis.pttl(keys.events(events[-1].id)) <= 2000  # set again at the end
