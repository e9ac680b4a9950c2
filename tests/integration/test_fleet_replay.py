"""The client's exactly-once, in-order delivery against a real server, with the test playing
a misbehaving worker: lost, duplicated and unknown messages, trimmed and expired replays."""

from __future__ import annotations

import asyncio

import pytest

from tokenfleet.producer.errors import IncompleteGenerationError
from tokenfleet.producer.protocol import (
    FinalDetails,
    FinalEvent,
    Token,
    TokenEvent,
    encode,
)

RID = "replayed"


def _token(index: int) -> bytes:
    return encode(TokenEvent(id=RID, index=index, token=Token(id=index, text=f"w{index} ")))


def _final(index: int) -> bytes:
    text = "".join(f"w{i} " for i in range(index + 1))
    return encode(FinalEvent(id=RID, index=index, token=Token(id=index, text=f"w{index} "),
                             generated_text=text,
                             details=FinalDetails(finish_reason="length",
                                                  generated_tokens=index + 1)))


async def _write(redis, keys, replay: list[bytes], published: list[bytes]) -> None:
    for payload in replay:
        await redis.xadd(keys.events(RID), {b"e": payload})
    for payload in published:
        await redis.publish(keys.tokens(RID), payload)


async def _follow(client, keys, redis, replay, published, **kwargs) -> list:
    async with client.events(RID, **kwargs) as events:
        following = asyncio.create_task(_drain(events))
        await asyncio.sleep(0.1)  # the client has read the (empty) replay and is listening
        await _write(redis, keys, replay, published)
        return await asyncio.wait_for(following, 10)


async def _drain(events) -> list:
    return [e async for e in events]


async def test_lost_and_duplicated_messages_are_repaired(fleet, redis, keys):
    replay = [_token(i) for i in range(5)] + [_final(5)]
    published = [_token(0), _token(0), _token(3), _token(1), _final(5), _token(4)]
    async with fleet.client() as client:
        events = await _follow(client, keys, redis, replay, published)
    assert [e.index for e in events] == [0, 1, 2, 3, 4, 5]
    assert isinstance(events[-1], FinalEvent)
    assert "".join(e.token.text for e in events) == events[-1].generated_text


@pytest.mark.parametrize("published", [
    [_token(0), _token(1)],  # only the quiet-channel poll can find the final
    [_token(0), _token(1), b'{"kind":"progress","id":"replayed","pct":50}'],  # unknown kind
])
async def test_a_lost_final_is_found_in_the_replay(fleet, redis, keys, published):
    replay = [_token(0), _token(1), _final(2)]
    async with fleet.client() as client:
        events = await _follow(client, keys, redis, replay, published)
    assert [e.index for e in events] == [0, 1, 2]


async def test_trimmed_replay_is_reported_not_skipped(fleet, redis, keys):
    async with fleet.client() as client:
        await _write(redis, keys, [_token(3), _final(4)], [])
        with pytest.raises(IncompleteGenerationError, match="index 3"):
            [e async for e in client.stream(RID)]
        tail = [e.index async for e in client.stream(RID, from_index=3)]
    assert tail == [3, 4]


async def test_expired_replay_falls_back_to_the_result(fleet, redis, keys):
    await redis.set(keys.result(RID), _final(9))
    async with fleet.client() as client:
        events = [e async for e in client.stream(RID)]
        assert (await client.result(RID)).details.generated_tokens == 10
    assert len(events) == 1 and events[0].generated_text.startswith("w0 w1")


async def test_stream_timeout(fleet):
    from tokenfleet.producer.errors import ResultTimeoutError

    async with fleet.client() as client:
        with pytest.raises(ResultTimeoutError):
            await client.result("never-submitted", timeout_s=0.3)
