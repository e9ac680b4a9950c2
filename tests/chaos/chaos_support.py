"""Helpers shared by the chaos tests: a mixed workload, its no-fault reference output, clients
that record every stream, a raw listener that sees duplicates the client library hides, and
ways to find (and kill) the worker that holds a job."""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from redis.asyncio import Redis
from redis.exceptions import RedisError

from tokenfleet.engine.sampling_params import SamplingParams
from tokenfleet.engine.simulated_engine import SimulatedEngine
from tokenfleet.producer.keys import LANES, Keys
from tokenfleet.producer.protocol import FinalEvent, TokenEvent, decode_event

QUEUE = "default"


@dataclass(frozen=True)
class Spec:
    """One request of a workload: its id, prompt and TGI parameters."""

    request_id: str
    prompt: str
    parameters: dict[str, Any]


def mixed_workload(num_requests: int, *, seed: int = 0, min_tokens: int = 10,
                   max_tokens: int = 120, prefix: str = "req") -> list[Spec]:
    """Greedy, seeded-sampled and unseeded-sampled requests of mixed lengths, in all three
    priority lanes (`priority` rides along in `parameters`: `build_job` takes it)."""
    rng = random.Random(seed)
    specs = []
    for i in range(num_requests):
        params: dict[str, Any] = {"max_new_tokens": rng.randint(min_tokens, max_tokens)}
        if i % 3 == 1:
            params.update(do_sample=True, temperature=0.8, seed=1000 + i)
        elif i % 3 == 2:
            params.update(do_sample=True, top_k=50)  # the worker picks (and persists) a seed
        if i % 5 in (1, 2):
            params["priority"] = 1 if i % 5 == 1 else -1
        specs.append(Spec(f"{prefix}-{i}", f"chaos prompt {i} " + "word " * (i % 7), params))
    return specs


def sampling_params(spec: Spec) -> SamplingParams:
    """The engine's parameters of a spec (its TGI parameters, without the queue priority)."""
    return SamplingParams(**{k: v for k, v in spec.parameters.items() if k != "priority"})


def sim_reference(spec: Spec, seed: int | None, **engine_kwargs: Any) -> list[int]:
    """Token ids an undisturbed SimulatedEngine produces for `spec` (with the seed used)."""
    engine = SimulatedEngine(step_time_s=0, **engine_kwargs)
    params = sampling_params(spec)
    if not params.greedy:
        params.seed = seed
    engine.add_request("r", engine.tokenizer.encode(spec.prompt), params)
    ids: list[int] = []
    while engine.has_unfinished():
        for out in engine.step():
            ids += [t.id for t in out.tokens]
    return ids


async def run_clients(client: Any, specs: list[Spec], timeout_s: float) -> dict[str, list]:
    """Submit every spec through `generate_stream`; each request's events, as received."""

    async def one(spec: Spec) -> tuple[str, list]:
        events = [e async for e in client.generate_stream(
            spec.prompt, request_id=spec.request_id, timeout_s=timeout_s, **spec.parameters)]
        return spec.request_id, events

    results = await asyncio.wait_for(asyncio.gather(*(one(s) for s in specs)), timeout_s)
    return dict(results)


def check_stream(events: list, expected_ids: list[int] | None = None) -> FinalEvent:
    """Indices 0..n-1 exactly once, then a final whose text is the tokens' text."""
    *tokens, final = events
    assert isinstance(final, FinalEvent), final
    assert all(isinstance(e, TokenEvent) for e in tokens)
    streamed = [*tokens, final] if final.token is not None else tokens
    assert [e.index for e in streamed] == list(range(len(streamed)))
    assert final.details.generated_tokens == len(streamed)
    assert "".join(e.token.text for e in streamed) == final.generated_text
    if expected_ids is not None:
        assert [e.token.id for e in streamed] == expected_ids
    return final


@dataclass
class RawListener:
    """Every token event published for any request of the fleet, duplicates included."""

    redis: Redis
    keys: Keys
    seen: dict[tuple[str, int], set[int]] = field(default_factory=lambda: defaultdict(set))
    num_messages: int = 0
    _task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> RawListener:
        pubsub = self.redis.pubsub()
        await pubsub.psubscribe(f"{self.keys.prefix}:{{r:*}}:tokens")
        self._task = asyncio.create_task(self._listen(pubsub))
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._task is not None
        self._task.cancel()
        await asyncio.gather(self._task, return_exceptions=True)

    async def _listen(self, pubsub: Any) -> None:
        try:
            while True:
                try:
                    message = await pubsub.get_message(ignore_subscribe_messages=True,
                                                       timeout=1.0)
                except (RedisError, OSError):  # the server restarts: redis-py resubscribes
                    await asyncio.sleep(0.2)
                    continue
                if message is None:
                    continue
                event = decode_event(message["data"])
                index = getattr(event, "index", None)
                token = getattr(event, "token", None)
                if index is not None and token is not None:
                    self.num_messages += 1
                    self.seen[(event.id, index)].add(token.id)
        finally:
            await pubsub.aclose()

    def conflicts(self) -> dict[tuple[str, int], set[int]]:
        """(request, index) pairs published with different tokens: must stay empty."""
        return {k: v for k, v in self.seen.items() if len(v) > 1}


async def pending_by_consumer(redis: Redis, keys: Keys
                              ) -> dict[str, list[tuple[str, bytes]]]:
    """Entries pending in the queue's group (every lane), per consumer, as (lane, entry id)."""
    out: dict[str, list[tuple[str, bytes]]] = defaultdict(list)
    for lane in LANES:
        rows = await redis.xpending_range(keys.jobs(QUEUE, lane), keys.group(QUEUE), "-", "+",
                                          10_000)
        for row in rows:
            out[row["consumer"].decode()].append((lane, row["message_id"]))
    return out


async def tokens_emitted(redis: Redis, keys: Keys,
                         entries_pending: list[tuple[str, bytes]]) -> list[int]:
    """How many replay entries each pending job already has."""
    counts = []
    for lane, entry_id in entries_pending:
        entries = await redis.xrange(keys.jobs(QUEUE, lane), entry_id, entry_id)
        if not entries:
            continue
        request_id = json.loads(entries[0][1][b"job"])["id"]
        counts.append(await redis.xlen(keys.events(request_id)))
    return counts


async def kill_busiest(redis: Redis, keys: Keys, procs: dict[str, Any], *, min_jobs: int = 3,
                       min_tokens: int = 3, timeout_s: float = 20) -> tuple[str, int]:
    """SIGKILL a live worker once it holds `min_jobs` jobs that each streamed `min_tokens`;
    returns its id and how many jobs it held."""

    async def busiest() -> tuple[str, int] | None:
        pending = await pending_by_consumer(redis, keys)
        live = [(w, ids) for w, ids in pending.items()
                if w in procs and procs[w].poll() is None]
        for worker_id, ids in sorted(live, key=lambda item: -len(item[1])):
            started = [n for n in await tokens_emitted(redis, keys, ids) if n >= min_tokens]
            if len(started) >= min_jobs:
                return worker_id, len(ids)
        return None

    worker_id, num_held = await wait_until(busiest, timeout_s)
    procs[worker_id].send_signal(signal.SIGKILL)
    assert await asyncio.to_thread(procs[worker_id].wait, 10) == -signal.SIGKILL
    return worker_id, num_held


async def wait_until(probe: Any, timeout_s: float, interval_s: float = 0.05) -> Any:
    """Poll the async `probe` until it returns something truthy; return that."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = await probe()
        if value:
            return value
        await asyncio.sleep(interval_s)
    raise TimeoutError(f"condition not met within {timeout_s} s")


async def assert_queue_empty(redis: Redis, keys: Keys) -> None:
    """Every job acked and deleted (every lane), none dead-lettered."""
    for lane in LANES:
        assert await redis.xlen(keys.jobs(QUEUE, lane)) == 0
        assert (await redis.xpending(keys.jobs(QUEUE, lane), keys.group(QUEUE)))["pending"] == 0
    assert await redis.xlen(keys.dead(QUEUE)) == 0


def child_pids(pid: int, marker: bytes = b"spawn_main") -> list[int]:
    """Live child processes of `pid` (by /proc's parent ids) whose command line has
    `marker` (multiprocessing's spawned children by default: tensor-parallel ranks)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
            cmdline = (stat.parent / "cmdline").read_bytes()
        except OSError:
            continue
        if int(fields[1]) == pid and fields[0] != "Z" and marker in cmdline:
            found.append(int(stat.parent.name))
    return found


def pid_alive(pid: int) -> bool:
    """Running (a zombie not yet reaped counts as gone)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
