"""The small parts the reliability machinery is built from, without a server: backoff,
outage logging, transient-error classification, replay parsing, stream-id arithmetic."""

from __future__ import annotations

import asyncio

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ResponseError
from structlog.testing import capture_logs

from tokenfleet.producer.backoff import Backoff
from tokenfleet.producer.event_stream import _next_id
from tokenfleet.producer.protocol import (
    ErrorEvent,
    FinalDetails,
    FinalEvent,
    Token,
    TokenEvent,
    encode,
)
from tokenfleet.worker.connectivity import Connectivity, is_transient
from tokenfleet.worker.job_state import read_replay


def test_backoff_grows_with_jitter_up_to_the_cap_and_resets():
    low, high = Backoff(base_s=0.1, cap_s=1.0, rng=lambda: 0.0), \
        Backoff(base_s=0.1, cap_s=1.0, rng=lambda: 1.0)
    lows = [low.next_delay_s() for _ in range(6)]
    highs = [high.next_delay_s() for _ in range(6)]
    assert highs == [0.1, 0.2, 0.4, 0.8, 1.0, 1.0]  # doubling, capped
    assert lows == [h / 2 for h in highs]  # never below half: no tight loop
    high.reset()
    assert high.next_delay_s() == 0.1


async def test_an_outage_is_logged_once_however_many_loops_fail():
    conn = Connectivity(base_s=0.001, cap_s=0.002)
    loops = [conn.backoff() for _ in range(3)]
    with capture_logs() as logs:
        for _ in range(3):
            for backoff in loops:
                await conn.failed(RedisConnectionError("refused"), "test", backoff)
        assert not conn.available
        conn.succeeded(loops[0])
        # A loop whose connection only now notices the restart: the same outage.
        await conn.failed(RedisConnectionError("reset"), "test", loops[1])
        conn.succeeded(loops[1])
    events = [entry["event"] for entry in logs]
    assert events == ["redis_unavailable", "redis_back"]
    assert conn.available and conn.num_outages == 1
    assert conn.seconds_since_back() < 1.0


async def test_waiting_loops_wake_when_redis_is_back():
    conn = Connectivity(base_s=30.0, cap_s=60.0)
    waiting = asyncio.create_task(conn.failed(OSError("down"), "test", conn.backoff()))
    await asyncio.sleep(0.01)
    conn.succeeded()
    await asyncio.wait_for(waiting, 1.0)  # not after its 15-30 s backoff


async def test_a_full_redis_ends_only_when_a_write_gets_through():
    """At maxmemory reads still pass: a loop refused with OOM waits its whole backoff
    (not woken by another loop's read), the intake is told to take no jobs, and only a
    successful write ends the outage."""
    conn = Connectivity(base_s=0.2, cap_s=0.4)
    oom = OutOfMemoryError("command not allowed when used memory > 'maxmemory'.")
    waiting = asyncio.create_task(conn.failed(oom, "publish", conn.backoff()))
    await asyncio.sleep(0.01)
    assert conn.writes_refused and not conn.available
    conn.succeeded()  # a read got through
    await asyncio.sleep(0.02)
    assert not waiting.done() and not conn.available and conn.writes_refused
    await asyncio.wait_for(waiting, 1.0)  # after its own delay (0.1-0.2 s)
    conn.succeeded(wrote=True)
    assert conn.available and not conn.writes_refused


def test_transient_errors():
    assert is_transient(RedisConnectionError("x")) and is_transient(OSError())
    assert is_transient(ResponseError("READONLY You can't write against a read only replica"))
    assert is_transient(OutOfMemoryError("command not allowed when used memory > 'maxmemory'."))
    assert is_transient(ResponseError("LOADING Redis is loading the dataset in memory"))
    assert not is_transient(ResponseError("WRONGTYPE Operation against a key"))
    assert not is_transient(ValueError("bug"))


def _entry(ms: int, event) -> tuple[bytes, dict[bytes, bytes]]:
    return f"{ms}-0".encode(), {b"e": encode(event)}


def _token(index: int) -> TokenEvent:
    return TokenEvent(id="r", index=index, token=Token(id=100 + index, text=f"w{index} "))


def test_replay_prefix_dedupes_and_stops_at_the_first_gap():
    entries = [_entry(1000 + i, _token(i)) for i in (0, 1, 1, 2, 4)]
    entries.insert(2, (b"1001-5", {b"e": b"not json"}))
    prefix = read_replay(entries)
    assert prefix.token_ids == [100, 101, 102]  # 4 is after a gap: resume at 3
    assert prefix.first_token_ms == 1000.0
    assert prefix.terminal is None
    assert read_replay([]).tokens == [] and read_replay([]).first_token_ms is None


def test_replay_with_a_final_or_error_is_finished():
    final = FinalEvent(id="r", index=1, token=Token(id=101, text="w1 "), generated_text="w0 w1 ",
                       details=FinalDetails(finish_reason="length", generated_tokens=2))
    assert read_replay([_entry(1, _token(0)), _entry(2, final)]).terminal == encode(final)
    error = ErrorEvent(id="r", error="boom")
    assert read_replay([_entry(1, error)]).terminal == encode(error)


def test_next_stream_id():
    assert _next_id(b"1700000000000-0") == b"1700000000000-1"
    assert _next_id(b"5-41") == b"5-42"


async def test_a_finish_refused_for_memory_acks_nothing(redis, keys):
    """At maxmemory the result SET is refused (OOM) while XACK/XDEL would pass: the finish
    runs as one MULTI/EXEC, so the job stays pending (a worker killed now leaves it to be
    reclaimed, not acked without its result) until memory frees up and the whole finish
    goes through."""
    from tokenfleet.worker.publisher import Publisher

    jobs, group = keys.jobs("q"), keys.group("q")
    await redis.xgroup_create(jobs, group, id="0", mkstream=True)
    entry = await redis.xadd(jobs, {b"job": b"x"})
    await redis.xreadgroup(group, "w", {jobs: ">"})
    publisher = Publisher(redis, keys, "q", worker_id="w", result_ttl_s=60, events_ttl_s=60,
                          events_maxlen=100, connectivity=Connectivity(base_s=0.05, cap_s=0.1))
    await redis.config_set("maxmemory", 1)  # below what is used: every write refused
    try:
        finishing = asyncio.create_task(publisher.fail(entry, "req-1", "boom", "generation"))
        await asyncio.sleep(0.4)  # several refused attempts
        assert not finishing.done()
        assert (await redis.xpending(jobs, group))["pending"] == 1  # not acked
        assert await redis.xlen(jobs) == 1 and await redis.get(keys.result("req-1")) is None
    finally:
        await redis.config_set("maxmemory", 0)
    await asyncio.wait_for(finishing, 5)
    assert await redis.get(keys.result("req-1")) is not None
    assert (await redis.xpending(jobs, group))["pending"] == 0 and await redis.xlen(jobs) == 0
