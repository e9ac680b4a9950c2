"""The client's shared pub/sub connection survives what a server restart throws at it.

After a restart, the reader task's reconnect and an (un)subscribe's reconnect can run at once
on the one connection; asyncio then refuses the second read with a RuntimeError ("readuntil()
called while another coroutine is already waiting"). That once failed a finished stream and
killed the reader (chaos test `test_redis_restart_with_aof_loses_nothing`). The race itself
is timing-dependent, so these tests raise that error where redis-py raised it, against a real
server, and check what the Subscriber makes of it.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from redis.asyncio import Redis
from redis.exceptions import ConnectionError as RedisConnectionError

from tokenfleet.producer.subscriber import Subscriber

_RACE = RuntimeError("readuntil() called while another coroutine is already waiting for "
                     "incoming data")


def _fail_once(obj: Any, name: str) -> None:
    real = getattr(obj, name)
    calls = {"n": 0}

    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        calls["n"] += 1
        if calls["n"] == 1:
            raise _RACE
        return await real(*args, **kwargs)

    setattr(obj, name, wrapper)


async def test_the_reader_survives_the_reconnect_race(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    sub = Subscriber(client)
    try:
        _fail_once(sub._pubsub, "get_message")
        async with sub.channel("tf-test:a") as queue:
            await asyncio.sleep(0.3)  # the reader has hit the error and backed off
            await client.publish("tf-test:a", b"after")
            assert await asyncio.wait_for(queue.get(), 5) == b"after"
    finally:
        await sub.close()
        await client.aclose()


async def test_leaving_a_channel_during_the_race_is_not_an_error(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    sub = Subscriber(client)
    try:
        async with sub.channel("tf-test:b") as queue:
            await client.publish("tf-test:b", b"x")
            assert await asyncio.wait_for(queue.get(), 5) == b"x"
            _fail_once(sub._pubsub, "unsubscribe")
        async with sub.channel("tf-test:c") as queue:  # and the subscriber still works
            await client.publish("tf-test:c", b"y")
            assert await asyncio.wait_for(queue.get(), 5) == b"y"
    finally:
        await sub.close()
        await client.aclose()


async def test_subscribing_during_the_race_raises_a_connection_error(redis_url: str) -> None:
    client = Redis.from_url(redis_url)
    sub = Subscriber(client)
    try:
        _fail_once(sub._pubsub, "subscribe")
        with pytest.raises(RedisConnectionError, match="reconnecting"):
            async with sub.channel("tf-test:d"):
                pass
    finally:
        await sub.close()
        await client.aclose()


async def test_a_burst_of_first_subscribes_shares_one_connection(redis_url: str) -> None:
    """Many streams followed at once on a fresh client: one pub/sub connection, every
    subscription confirmed at once (redis-py's PubSub would take, and leak, a connection per
    concurrent first subscribe: confirmations lost, the pool drained)."""
    client = Redis.from_url(redis_url)
    admin = Redis.from_url(redis_url)
    subscriber = Subscriber(client)
    entered = asyncio.Event()
    release = asyncio.Event()
    count = {"n": 0}

    async def follow(i: int) -> None:
        async with subscriber.channel(f"burst-{i}"):
            count["n"] += 1
            if count["n"] == 40:
                entered.set()
            await release.wait()

    try:
        loop = asyncio.get_running_loop()
        start = loop.time()
        tasks = [asyncio.create_task(follow(i)) for i in range(40)]
        await asyncio.wait_for(entered.wait(), 30)
        assert loop.time() - start < 2.0  # no 5 s wait for a lost confirmation
        subscribed = [c for c in await admin.client_list() if int(c.get("sub", 0)) > 0]
        assert len(subscribed) == 1, subscribed
        release.set()
        await asyncio.gather(*tasks)
    finally:
        await subscriber.close()
        await client.aclose()
        await admin.aclose()
