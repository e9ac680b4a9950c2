"""Fuzz: thousands of random and mutated payloads written straight into the queue stream of a
worker process. Every entry ends acknowledged with an error event, a dead letter or a result;
the worker survives all of them, and its KV blocks are all free at the end.

2,000 payloads against the simulated engine, 200 against the real engine on a tiny random
Llama. Hypothesis generates them (derandomized: the same payloads every run); they are
checked together, because a worker serving them one example at a time would take minutes.
A failure names the offending entry's fields.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from typing import Any

import msgspec
import pytest
import redis as sync_redis
from chaos_support import QUEUE
from fuzz_payloads import Payload, payloads
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokenfleet.producer.protocol import FinalEvent, decode_event, decode_job, decode_worker_info
from tokenfleet.producer.validation import validate_request_id

pytestmark = pytest.mark.chaos


def _readable_id(fields: dict[bytes, bytes]) -> str | None:
    """The request id the worker can read from an entry (to send it an error), if any."""
    raw = fields.get(b"job", b"")
    try:  # as the worker reads it: the job decoder skips unknown keys without checking them
        return validate_request_id(decode_job(raw).id)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
        pass
    try:
        value = msgspec.json.decode(raw)
        return validate_request_id(value.get("id")) if isinstance(value, dict) else None
    except (msgspec.DecodeError, ValueError):
        return None


def _wait_processed(r: sync_redis.Redis, keys, proc, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the worker died (exit {proc.returncode})"
        if r.xlen(keys.jobs(QUEUE)) == 0 and \
                r.xpending(keys.jobs(QUEUE), keys.group(QUEUE))["pending"] == 0:
            return
        time.sleep(0.05)
    raise TimeoutError(f"entries still queued or pending after {timeout_s} s")


def _generate(num_payloads: int) -> list[Payload]:
    out: list[Payload] = []

    # Small examples: hypothesis rejects (overruns) long lists of these nested structures.
    @settings(max_examples=num_payloads // 10, deadline=None, database=None,
              derandomize=True, suppress_health_check=list(HealthCheck))
    @given(st.lists(payloads(), min_size=10, max_size=10))
    def collect(batch: list[Payload]) -> None:
        out.extend(batch)

    collect()
    assert len(out) >= 0.9 * num_payloads
    return out


def _check_all(r: sync_redis.Redis, keys, proc, batch: list[Payload],
               timeout_s: float) -> int:
    """Every entry answered; returns how many finished jobs had a grammar."""
    written = []
    with r.pipeline(transaction=False) as pipe:
        fields_list = [payload.render(f"fz{n}") for n, payload in enumerate(batch)]
        for fields in fields_list:
            pipe.xadd(keys.jobs(QUEUE), fields)
        written = list(zip(pipe.execute(), fields_list, strict=True))
    _wait_processed(r, keys, proc, timeout_s)
    dead = {f[b"dead_entry_id"] for _, f in r.xrange(keys.dead(QUEUE))}
    outcomes: Counter[str] = Counter()
    for entry_id, fields in written:
        request_id = _readable_id(fields)
        result = r.get(keys.result(request_id)) if request_id is not None else None
        assert entry_id in dead or result is not None, (fields, "no dead letter, no result")
        event = decode_event(result) if result is not None else None
        outcomes[type(event).__name__ if event is not None else "dead letter only"] += 1
        if isinstance(event, FinalEvent) and _fits_grammar(fields, event) is not None:
            outcomes["grammar"] += 1
    # The mix exercises every path: served jobs, error events, unreadable entries.
    grammars = outcomes.pop("grammar", 0)
    assert min(outcomes.values()) >= len(written) // 50 and len(outcomes) == 3, outcomes
    return grammars


def _fits_grammar(fields: dict[bytes, bytes], final: FinalEvent) -> bool | None:
    """None without a grammar; else asserts that a complete answer fits it."""
    parameters = decode_job(fields[b"job"]).parameters
    grammar = parameters.grammar
    if grammar is None:
        return None
    complete = final.details.finish_reason == "eos_token" and not parameters.return_full_text
    if complete and grammar.type == "regex":
        assert re.fullmatch(grammar.value, final.generated_text), (grammar, final)
    elif complete:
        json.loads(final.generated_text)
    return True


def _kv_all_free(r: sync_redis.Redis, keys, worker_id: str, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        info = decode_worker_info(r.get(keys.worker(worker_id)))
        if info.num_running == 0 and info.num_free_kv_blocks == info.num_total_kv_blocks > 0:
            return
        time.sleep(0.1)
    raise AssertionError(f"KV blocks still in use: {info}")


def _fuzz(fleet, redis_url, keys, worker_id: str, num_payloads: int, timeout_s: float,
          **worker: Any) -> None:
    batch = _generate(num_payloads)
    proc = fleet.spawn(worker_id, lease_ms=1500, **worker)
    r = sync_redis.Redis.from_url(redis_url)
    try:
        deadline = time.monotonic() + 120
        while not r.exists(keys.worker(worker_id)):
            assert proc.poll() is None and time.monotonic() < deadline, "worker did not start"
            time.sleep(0.1)
        num_grammar = _check_all(r, keys, proc, batch, timeout_s)
        assert worker.get("engine") != "llm" or num_grammar > 0, "no grammar job was served"
        _kv_all_free(r, keys, worker_id)
        assert proc.poll() is None
        fleet.stop_all()
        assert proc.returncode == 0
    finally:
        r.close()


def test_fuzzed_payloads_simulated_engine(fleet, redis_url, keys):
    _fuzz(fleet, redis_url, keys, "fuzz-sim", 2000, 120, sim_step_ms=1.0, max_num_seqs=32,
          sim_max_model_len=256, num_kv_blocks=512)


@pytest.mark.slow
def test_fuzzed_payloads_real_engine(fleet, redis_url, keys, tiny_llama_dir):
    _fuzz(fleet, redis_url, keys, "fuzz-llm", 200, 180, engine="llm", model=str(tiny_llama_dir),
          dtype="float32", device="cpu", num_threads=1, max_num_seqs=8, num_kv_blocks=256)
