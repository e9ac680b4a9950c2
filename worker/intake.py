"""Intake: pull only the jobs the engine can start now, check them, hand them to the engine.

`XREADGROUP … COUNT <free slots> BLOCK` runs only while the engine has room (DESIGN §3.2), so
the backlog stays in Redis where any idle worker can take it. Nothing from the stream is
trusted (§3.3): a malformed entry, an unknown model, bad parameters or a prompt the tokenizer
or engine refuses become an `error` event (when the id is readable), the raw entry is copied
to the dead-letter stream, and the job is acked. Expired deadlines and cancelled jobs are
dropped here too (§3.9).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
from collections.abc import Mapping
from typing import Any, Final

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
from tokenfleet.worker.engine_protocol import TokenizerLike
from tokenfleet.worker.engine_thread import EngineThread
from tokenfleet.worker.inflight import InFlightRequest
from tokenfleet.worker.metrics import WorkerMetrics
from tokenfleet.worker.publisher import Publisher

__all__ = ["MAX_JOB_BYTES", "Intake"]

MAX_JOB_BYTES: Final = 8 << 20  # far beyond any context window; refuse before decoding
_IDLE_RECHECK_S: Final = 1.0
_ERROR_BACKOFF_S: Final = 1.0


class Intake:
    """Feeds the engine from the queue stream of one consumer group."""

    def __init__(self, *, redis: Redis, keys: Keys, queue: str, consumer: str,
                 engine_thread: EngineThread, tokenizer: TokenizerLike,
                 model_names: frozenset[str], inflight: dict[str, InFlightRequest],
                 publisher: Publisher, metrics: WorkerMetrics, read_block_ms: int,
                 max_deliveries: int) -> None:
        self._redis = redis
        self._keys = keys
        self._queue = queue
        self._jobs = keys.jobs(queue)
        self._group = keys.group(queue)
        self._consumer = consumer
        self._engine = engine_thread
        self._tokenizer = tokenizer
        self._model_names = model_names
        self._inflight = inflight
        self._publisher = publisher
        self._metrics = metrics
        self._read_block_ms = read_block_ms
        self._max_deliveries = max_deliveries
        self._log = structlog.get_logger("tokenfleet.intake")
        self.wakeup = asyncio.Event()  # set whenever engine capacity may have grown

    async def ensure_group(self) -> None:
        """Create the consumer group (from the stream's start: no job enqueued before the
        first worker started is skipped)."""
        try:
            await self._redis.xgroup_create(self._jobs, self._group, id="0", mkstream=True)
        except ResponseError as e:
            if "BUSYGROUP" not in str(e):
                raise

    async def run(self, stop: asyncio.Event) -> None:
        """Pull and admit jobs until `stop` is set (the drain stops intake first)."""
        while not stop.is_set():
            num_free = self._engine.num_free_seqs()
            if num_free <= 0:
                self.wakeup.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.wakeup.wait(), _IDLE_RECHECK_S)
                continue
            try:
                reply: Any = await self._redis.xreadgroup(
                    self._group, self._consumer, {self._jobs: ">"},
                    count=num_free, block=self._read_block_ms)
            except ResponseError as e:
                if "NOGROUP" in str(e):  # the stream was deleted under us
                    await self.ensure_group()
                    continue
                raise
            except (RedisError, OSError) as e:
                self._log.warning("intake_redis_error", error=str(e))
                await asyncio.sleep(_ERROR_BACKOFF_S)
                continue
            for _stream, entries in reply or []:
                for entry_id, fields in entries:
                    await self.take(entry_id, fields)

    async def take(self, entry_id: bytes, fields: Mapping[bytes, bytes],
                   num_delivered: int = 1) -> None:
        """Check one stream entry and start it, or finish it with an error."""
        raw = fields.get(b"job")
        if raw is not None and len(raw) > MAX_JOB_BYTES:
            await self._reject(entry_id, None, f"job is {len(raw)} bytes, more than "
                               f"{MAX_JOB_BYTES}", fields)
            return
        try:
            job = decode_job(raw if raw is not None else b"")
        except (msgspec.DecodeError, msgspec.ValidationError) as e:
            await self._reject(entry_id, _salvage_id(raw), f"malformed job: {e}", fields)
            return
        if job.id in self._inflight:  # a duplicate entry: no event, it would end the live one
            await self._fail(entry_id, None, f"request id {job.id!r} is already running",
                             "validation", fields)
            return
        if num_delivered > self._max_deliveries:
            await self._fail(entry_id, job.id, f"job was delivered {num_delivered} times "
                             f"(max_deliveries={self._max_deliveries})",
                             "incomplete_generation", fields)
            return
        try:
            params = self._check(job)
        except ValueError as e:
            await self._reject(entry_id, _salvage_id(raw), str(e), fields)
            return
        now_ms = time.time() * 1000
        if job.deadline_ms is not None and now_ms > job.deadline_ms:
            await self._fail(entry_id, job.id, f"deadline passed {now_ms - job.deadline_ms:.0f} "
                             "ms before a worker could start the job", "deadline_exceeded")
            return
        try:
            prompt_ids, prompt_text = self._tokenize(job)
        except Exception as e:  # a chat template may raise anything on odd messages
            await self._reject(entry_id, job.id, f"Input validation error: {e}", fields)
            return
        req = InFlightRequest(request_id=job.id, entry_id=entry_id, job=job, params=params,
                              num_prompt_tokens=len(prompt_ids), intake_ms=now_ms,
                              prompt_text=prompt_text if job.parameters.return_full_text else "",
                              num_delivered=num_delivered)
        self._inflight[job.id] = req  # before the cancel check: a cancel racing us finds it
        if await self._redis.exists(self._keys.cancel(job.id)):
            await self._finish_cancelled(req)
            return
        self._metrics.queue_wait_s.observe(req.queue_ms / 1000)
        self._engine.add(job.id, prompt_ids, params)

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
        params = SamplingParams(**msgspec.structs.asdict(job.parameters))
        if not params.greedy and params.seed is None:
            # Pick the seed here so details report it and a resumed request reuses it.
            params.seed = random.getrandbits(63)
        return params

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
                         num_prompt_tokens=req.num_prompt_tokens)
        await self._publisher.publish([out], self._inflight)
        self._inflight.pop(req.request_id, None)
        self._metrics.requests.labels(outcome="cancelled").inc()

    async def _reject(self, entry_id: bytes, request_id: str | None, error: str,
                      fields: Mapping[bytes, bytes]) -> None:
        await self._fail(entry_id, request_id, error, "validation", fields)

    async def _fail(self, entry_id: bytes, request_id: str | None, error: str, error_type: str,
                    dead: Mapping[bytes, bytes] | None = None) -> None:
        if not error.startswith("Input validation error") and error_type == "validation":
            error = f"Input validation error: {error}"
        self._log.info("job_rejected", request_id=request_id, entry_id=entry_id.decode(),
                       error_type=error_type, error=error)
        await self._publisher.fail(entry_id, request_id, error, error_type, raw=dead)
        self._metrics.errors.labels(error_type=error_type).inc()
        if dead is not None:
            self._metrics.dead_letters.inc()


def _salvage_id(raw: bytes | None) -> str | None:
    """The request id of a malformed job, if one can be read safely (to send it an error)."""
    if raw is None:
        return None
    try:
        value = json.loads(raw)
        return validate_request_id(value.get("id")) if isinstance(value, dict) else None
    except (ValueError, UnicodeDecodeError):
        return None
