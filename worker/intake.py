"""Intake: pull only the jobs the engine can start now, check them, hand them to the engine.

`XREADGROUP … COUNT <free slots> BLOCK` runs only while the engine has room (DESIGN §3.2), so
the backlog stays in Redis where any idle worker can take it. The queue's priority lanes are
read in order (high, normal, low): a lane only gets the slots the lanes before it left.
Nothing from the stream is trusted (§3.3): a malformed entry, an unknown model, bad
parameters or a prompt the tokenizer or engine refuses become an `error` event (when the id
is readable), the raw entry is copied to the dead-letter stream, and the job is acked.
Expired deadlines and cancelled jobs are dropped here too (§3.9), and so is a job delivered
more than `max_deliveries` times (§3.8).

The reclaimer hands its entries to `take` as well: every job starts through the same checks,
and one that an earlier run had begun resumes after the tokens in its replay stream (§3.7).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Container, Mapping
from dataclasses import dataclass
from typing import Final

import msgspec
import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError, ResponseError

from tokenfleet.engine.outputs import FinishReason, StepOutput
from tokenfleet.engine.sampling_params import SamplingParams
from tokenfleet.producer.errors import ValidationError as ProducerValidationError
from tokenfleet.producer.keys import Keys
from tokenfleet.producer.protocol import PROTOCOL_VERSION, Job, decode_job
from tokenfleet.producer.validation import validate_job, validate_request_id
from tokenfleet.worker.connectivity import Connectivity, is_transient
from tokenfleet.worker.engine_protocol import GrammarPreparer, TokenizerLike
from tokenfleet.worker.engine_thread import EngineThread
from tokenfleet.worker.inflight import InFlightRequest
from tokenfleet.worker.job_state import fetch_job_state
from tokenfleet.worker.lane_reader import LaneReader
from tokenfleet.worker.metrics import WorkerMetrics
from tokenfleet.worker.publisher import Publisher
from tokenfleet.worker.test_hooks import TestHooks

__all__ = ["MAX_JOB_BYTES", "Intake"]

MAX_JOB_BYTES: Final = 8 << 20  # far beyond any context window; refuse before decoding
_IDLE_RECHECK_S: Final = 1.0


class Intake:
    """Feeds the engine from the queue stream of one consumer group."""

    def __init__(self, *, redis: Redis, keys: Keys, queue: str, consumer: str,
                 engine_thread: EngineThread, tokenizer: TokenizerLike,
                 model_names: frozenset[str], inflight: dict[str, InFlightRequest],
                 publisher: Publisher, metrics: WorkerMetrics, read_block_ms: int,
                 max_deliveries: int, seed_ttl_s: int = 86_400, lane_max_wait_ms: int = 0,
                 connectivity: Connectivity | None = None,
                 hooks: TestHooks | None = None,
                 gone_owners: Container[str] = frozenset(),
                 grammars: GrammarPreparer | None = None) -> None:
        self._redis = redis
        self._keys = keys
        self._queue = queue
        self._reader = LaneReader(redis, keys, queue, consumer, read_block_ms,
                                  lane_max_wait_ms)
        self._group = keys.group(queue)
        self._consumer = consumer
        self._engine = engine_thread
        self._tokenizer = tokenizer
        self._model_names = model_names
        self._inflight = inflight
        self._publisher = publisher
        self._metrics = metrics
        self._max_deliveries = max_deliveries
        self._seed_ttl_s = seed_ttl_s
        self._connectivity = connectivity if connectivity is not None else Connectivity()
        self._hooks = hooks if hooks is not None else TestHooks(enabled=False)
        self._gone_owners = gone_owners  # gateways found dead: their jobs have no reader
        self._grammars = grammars
        self._log = structlog.get_logger("tokenfleet.intake").bind(worker_id=consumer)
        self.wakeup = asyncio.Event()  # set whenever engine capacity may have grown

    async def ensure_group(self) -> None:
        """Create the consumer group (from the stream's start: no job enqueued before the
        first worker started is skipped)."""
        for stream in self._reader.streams.values():
            try:
                await self._redis.xgroup_create(stream, self._group, id="0", mkstream=True)
            except ResponseError as e:
                if "BUSYGROUP" not in str(e):
                    raise

    async def run(self, stop: asyncio.Event) -> None:
        """Pull and admit jobs until `stop` is set (the drain stops intake first)."""
        backoff = self._connectivity.backoff()
        while not stop.is_set():
            num_free = self._engine.num_free_seqs()
            if num_free <= 0:
                self.wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(_IDLE_RECHECK_S):
                        await self.wakeup.wait()
                continue
            if self._connectivity.writes_refused:
                # Redis is full: a job read now could not be started (its state is written
                # first), and would wait in our pending list. Leave it in the stream.
                await asyncio.sleep(backoff.next_delay_s())
                continue
            try:
                entries, missing_group = await self._reader.read(num_free)
                self._connectivity.succeeded(backoff)
                with self._engine.batched():  # the whole read reaches the engine at once
                    for e in entries:
                        await self.take(e.entry_id, e.fields, lane=e.lane)
                if missing_group:  # a lane's stream was deleted (or Redis lost it)
                    await self.ensure_group()
            except (RedisError, OSError) as e:
                error: BaseException = e
                if "NOGROUP" in str(e):  # the stream was deleted (or Redis lost it)
                    refused = await self._try_ensure_group()
                    if refused is None:
                        continue
                    error = refused
                if not is_transient(error):
                    raise error from None
                # A failover, a restart (on Redis >= 7 also a blocked read whose stream was
                # deleted: UNBLOCKED). Entries read but not started stay pending for us:
                # they are reclaimed after the lease, and resumed.
                await self._connectivity.failed(error, "intake", backoff)

    async def _try_ensure_group(self) -> BaseException | None:
        """`ensure_group`, returning its Redis error instead of raising it (a demoted node
        refuses the XGROUP CREATE: that is an outage to wait out, not a reason to stop)."""
        try:
            await self.ensure_group()
        except (RedisError, OSError) as e:
            return e
        return None

    async def take(self, entry_id: bytes, fields: Mapping[bytes, bytes],
                   num_delivered: int = 1, lane: str = "normal") -> None:
        """Check one stream entry and start (or resume) it, or finish it with an error.

        Raises only transient Redis errors (an outage); the entry then stays pending and is
        reclaimed later.
        """
        try:
            await self._take(_Entry(entry_id, lane), fields, num_delivered)
        except Exception as e:  # a bug must not kill the worker: fail the job, keep serving
            if is_transient(e):
                raise
            self._log.exception("intake_failed", entry_id=entry_id.decode(), lane=lane)
            request_id = _salvage_id(fields.get(b"job"))
            if request_id is not None and (req := self._inflight.get(request_id)) is not None \
                    and (req.lane, req.entry_id) == (lane, entry_id):
                del self._inflight[request_id]
            await self._fail(_Entry(entry_id, lane), request_id, f"internal error while "
                             f"starting the job: {type(e).__name__}: {e}", "generation", fields)

    async def _take(self, entry: _Entry, fields: Mapping[bytes, bytes],
                    num_delivered: int) -> None:
        job = await self._decode(entry, fields)
        if job is None:
            return
        running = self._inflight.get(job.id)
        if running is not None:
            if (running.lane, running.entry_id) != (entry.lane, entry.entry_id):
                # A duplicate entry: no event, it would end ours.
                await self._fail(entry, None, f"request id {job.id!r} is already running",
                                 "validation", fields)
            return  # our own job, claimed back after late renewals: it runs on
        if num_delivered > self._max_deliveries:
            await self._fail(entry, _safe_id(job.id),
                             f"job {job.id!r} was delivered {num_delivered} times without "
                             f"finishing (max_deliveries={self._max_deliveries}): the workers "
                             "that started it may have crashed on it; it was moved to the "
                             "dead-letter stream", "generation", fields)
            return
        try:
            params = self._check(job)
        except ValueError as e:
            await self._reject(entry, _safe_id(job.id), str(e), fields)
            return
        now_ms = time.time() * 1000
        if job.deadline_ms is not None and now_ms > job.deadline_ms:
            await self._fail(entry, job.id, f"deadline passed {now_ms - job.deadline_ms:.0f} "
                             "ms before a worker could start the job", "deadline_exceeded")
            return
        try:
            prompt_ids, prompt_text = self._tokenize(job)
        except Exception as e:  # a chat template may raise anything on odd messages
            await self._reject(entry, job.id, f"Input validation error: {e}", fields)
            return
        if params.grammar is not None and self._grammars is not None:
            try:  # compiled here, in a thread: the engine thread then only copies it
                await asyncio.to_thread(self._grammars.prepare, params.grammar)
            except ValueError as e:
                await self._reject(entry, job.id, str(e), fields)
                return
        self._hooks.on_start(job)
        req = InFlightRequest(request_id=job.id, entry_id=entry.entry_id, lane=entry.lane,
                              job=job, params=params,
                              num_prompt_tokens=len(prompt_ids), intake_ms=now_ms,
                              prompt_text=prompt_text if job.parameters.return_full_text else "",
                              num_delivered=num_delivered)
        await self._start(req, prompt_ids)

    async def _decode(self, entry: _Entry, fields: Mapping[bytes, bytes]) -> Job | None:
        raw = fields.get(b"job")
        if raw is not None and len(raw) > MAX_JOB_BYTES:
            await self._reject(entry, None, f"job is {len(raw)} bytes, more than "
                               f"{MAX_JOB_BYTES}", fields)
            return None
        try:
            return decode_job(raw if raw is not None else b"")
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            await self._reject(entry, _salvage_id(raw), f"malformed job: {e}", fields)
            return None

    async def _start(self, req: InFlightRequest, prompt_ids: list[int]) -> None:
        """Read what Redis knows about the request, then start or resume it (or finish it)."""
        params = req.params
        new_seed = random.getrandbits(63) if not params.greedy and params.seed is None else None
        self._inflight[req.request_id] = req  # before the reads: a cancel racing us finds it
        try:
            state = await fetch_job_state(self._redis, self._keys, req.request_id,
                                          new_seed=new_seed, seed_ttl_s=self._seed_ttl_s)
        except BaseException:
            self._inflight.pop(req.request_id, None)
            raise
        finished = state.finished_payload
        if finished is not None:  # an earlier run finished it; only its ack was missing
            self._inflight.pop(req.request_id, None)
            self._log.info("job_already_finished", request_id=req.request_id)
            await self._publisher.finish_again(req.entry_id, req.request_id, finished,
                                               lane=req.lane)
            return
        if new_seed is not None:
            params.seed = state.seed  # the first run's seed: a resumed run draws the same
        req.resume(state.replay.tokens, state.replay.first_token_ms)
        if state.cancelled or req.job.owner in self._gone_owners:
            await self._finish_cancelled(req)
            return
        if req.num_delivered == 1:
            self._metrics.queue_wait_s.observe(req.queue_ms / 1000)
        if req.num_resumed:
            self._log.info("job_resumed", request_id=req.request_id,
                           num_resumed=req.num_resumed, num_delivered=req.num_delivered)
        self._engine.add(req.request_id, prompt_ids, params,
                         resume_token_ids=state.replay.token_ids)

    def _check(self, job: Job) -> SamplingParams:
        """The producer's rules, then the engine's own; returns the engine's parameters."""
        if job.v > PROTOCOL_VERSION:
            raise ProducerValidationError(
                f"Input validation error: job protocol v{job.v} is newer than this worker's "
                f"v{PROTOCOL_VERSION}")
        validate_job(job)
        if job.model not in self._model_names:
            served = sorted(n for n in self._model_names if n)
            raise ProducerValidationError(
                f"Input validation error: model {job.model!r} is not served on queue "
                f"{self._queue!r} (serves {served})")
        fields = msgspec.structs.asdict(job.parameters)
        if job.parameters.grammar is not None:  # the engine takes TGI's plain object
            fields["grammar"] = msgspec.structs.asdict(job.parameters.grammar)
        return SamplingParams(**fields)

    def _tokenize(self, job: Job) -> tuple[list[int], str]:
        if job.messages is not None:
            messages = [{"role": m.role, "content": m.content} for m in job.messages]
            text = self._tokenizer.apply_chat_template(messages, add_generation_prompt=True)
            ids = self._tokenizer.encode(text, add_special_tokens=False)
        else:
            assert job.inputs is not None
            text = job.inputs
            ids = self._tokenizer.encode(text)
        truncate = job.parameters.truncate
        if truncate is not None and len(ids) > truncate:
            ids = ids[-truncate:]  # TGI keeps the end of the prompt
        return ids, text

    async def _finish_cancelled(self, req: InFlightRequest) -> None:
        out = StepOutput(req.request_id, [], finished=True, finish_reason=FinishReason.CANCELLED,
                         generated_text=req.resumed_text, num_prompt_tokens=req.num_prompt_tokens,
                         num_generated_tokens=req.num_resumed)
        await self._publisher.publish([out], self._inflight)
        self._inflight.pop(req.request_id, None)
        self._metrics.requests.labels(outcome="cancelled").inc()

    async def _reject(self, entry: _Entry, request_id: str | None, error: str,
                      fields: Mapping[bytes, bytes]) -> None:
        await self._fail(entry, request_id, error, "validation", fields)

    async def _fail(self, entry: _Entry, request_id: str | None, error: str, error_type: str,
                    dead: Mapping[bytes, bytes] | None = None) -> None:
        if not error.startswith("Input validation error") and error_type == "validation":
            error = f"Input validation error: {error}"
        self._log.info("job_rejected", request_id=request_id, entry_id=entry.entry_id.decode(),
                       lane=entry.lane,
                       error_type=error_type, error=error)
        await self._publisher.fail(entry.entry_id, request_id, error, error_type, raw=dead,
                                   lane=entry.lane)
        self._metrics.errors.labels(error_type=error_type).inc()
        if dead is not None:
            self._metrics.dead_letters.inc()


@dataclass(frozen=True, slots=True)
class _Entry:
    """Where a job is: its entry id in one lane's stream (ids are per stream)."""

    entry_id: bytes
    lane: str


def _safe_id(request_id: str) -> str | None:
    """The id if it can name Redis keys (so the request can be sent an error), else None."""
    try:
        return validate_request_id(request_id)
    except ValueError:
        return None


def _salvage_id(raw: bytes | None) -> str | None:
    """The request id of a malformed job, if one can be read safely (to send it an error)."""
    if raw is None:
        return None
    try:  # msgspec, not json: accept exactly what decode_job accepts (e.g. raw tabs)
        value = msgspec.json.decode(raw)
        return validate_request_id(value.get("id")) if isinstance(value, dict) else None
    except (msgspec.DecodeError, ValueError):
        return None
