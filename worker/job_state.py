"""What Redis already knows about a job the intake is about to start, in one round trip.

A job may be delivered more than once: its worker died (reclaim), a draining worker handed it
over, or the same id was enqueued twice. Before starting it the intake reads, in one
pipeline: the cancel flag, the result (finished already?), the sampling seed (chosen once per
request and persisted with SET NX, so every run of an unseeded sampled request draws the same
random stream), and the replay stream — the tokens an earlier run already emitted, which the
engine resumes after instead of emitting them again (DESIGN §3.7).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import msgspec
from redis.asyncio import Redis

from tokenfleet.producer.keys import Keys
from tokenfleet.producer.protocol import ErrorEvent, FinalEvent, Token, TokenEvent, decode_event

__all__ = ["JobState", "ReplayPrefix", "fetch_job_state", "read_replay"]


@dataclass(slots=True)
class ReplayPrefix:
    """The tokens 0..k-1 found in a request's replay stream (duplicates dropped)."""

    tokens: list[Token] = field(default_factory=list)
    first_token_ms: float | None = None  # when index 0 was written (its stream entry id)
    terminal: bytes | None = None  # a final/error event: an earlier run finished the request

    @property
    def token_ids(self) -> list[int]:
        return [t.id for t in self.tokens]


@dataclass(slots=True)
class JobState:
    cancelled: bool
    result: bytes | None  # the request's final or error event, if it finished before
    seed: int | None  # the persisted seed (only fetched when one was needed)
    replay: ReplayPrefix

    @property
    def finished_payload(self) -> bytes | None:
        """The terminal event of an earlier run, from the result key or the replay."""
        return self.result if self.result is not None else self.replay.terminal


async def fetch_job_state(redis: Redis, keys: Keys, request_id: str, *,
                          new_seed: int | None, seed_ttl_s: int) -> JobState:
    """Read the job's state; with `new_seed`, persist it unless a seed was stored before
    (then that one is returned). Raises redis errors: the caller leaves the job pending."""
    async with redis.pipeline(transaction=False) as pipe:
        pipe.exists(keys.cancel(request_id))
        pipe.get(keys.result(request_id))
        pipe.xrange(keys.events(request_id), "-", "+")
        if new_seed is not None:
            pipe.set(keys.seed(request_id), str(new_seed), nx=True, ex=seed_ttl_s)
            pipe.get(keys.seed(request_id))
        replies: list[Any] = await pipe.execute()
    seed = None
    if new_seed is not None:
        stored = replies[4]
        seed = int(stored) if stored is not None and stored.isdigit() else new_seed
    return JobState(cancelled=bool(replies[0]), result=replies[1], seed=seed,
                    replay=read_replay(replies[2]))


def read_replay(entries: list[tuple[bytes, dict[bytes, bytes]]]) -> ReplayPrefix:
    """The longest run of token indices 0, 1, … in replay `entries` (XRANGE order).

    Resuming after that run is always correct, even if later indices are present too (a
    partly failed write) or early ones were trimmed: generation is deterministic given the
    persisted seed, so regenerated tokens equal the ones clients already saw and deduped.
    """
    by_index: dict[int, tuple[Token, bytes]] = {}
    terminal: bytes | None = None
    for entry_id, fields in entries:
        payload = fields.get(b"e", b"")
        try:
            event = decode_event(payload)
        except (msgspec.DecodeError, msgspec.ValidationError):
            continue
        if isinstance(event, TokenEvent):
            by_index.setdefault(event.index, (event.token, entry_id))
        elif isinstance(event, FinalEvent | ErrorEvent) and terminal is None:
            terminal = payload
    prefix = ReplayPrefix(terminal=terminal)
    while len(prefix.tokens) in by_index:
        prefix.tokens.append(by_index[len(prefix.tokens)][0])
    if prefix.tokens:
        prefix.first_token_ms = float(by_index[0][1].split(b"-")[0])
    return prefix
