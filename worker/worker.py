"""The worker: wires intake → engine thread → publisher, plus heartbeat, leases and cancels.

    exit_code = asyncio.run(Worker(WorkerSettings.from_env()).run())

Shutdown (SIGTERM, `request_stop()`) is a drain (DESIGN §3.10): stop pulling first, let the
in-flight requests finish within `drain_timeout_s`, then stop. Whatever is still running
then stays pending in the group and is reclaimed by another worker after the lease.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Final

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from tokenfleet.producer.keys import Keys
from tokenfleet.producer.protocol import FinalEvent, WorkerInfo, encode
from tokenfleet.worker.control import ControlListener
from tokenfleet.worker.embedded import EmbeddedValkey
from tokenfleet.worker.engine_factory import build_engine, served_model_names
from tokenfleet.worker.engine_protocol import EngineLike
from tokenfleet.worker.engine_thread import EngineFailure, EngineThread, Rejected, StepResult
from tokenfleet.worker.inflight import InFlightRequest
from tokenfleet.worker.intake import Intake
from tokenfleet.worker.lease import Lease
from tokenfleet.worker.logging import request_log_fields
from tokenfleet.worker.metrics import WorkerMetrics
from tokenfleet.worker.publisher import Publisher
from tokenfleet.worker.registry import Registry
from tokenfleet.worker.settings import WorkerSettings

__all__ = ["Worker"]

_EVENT_WAIT_S: Final = 0.2


class Worker:
    """One worker process's runtime. `engine`/`redis` may be injected (tests, benchmarks)."""

    def __init__(self, settings: WorkerSettings, *, engine: EngineLike | None = None,
                 redis: Redis | None = None) -> None:
        self.settings = settings
        self.worker_id = settings.resolved_worker_id
        self.keys = Keys(settings.key_prefix)
        self.metrics = WorkerMetrics()
        self.inflight: dict[str, InFlightRequest] = {}
        self.ready = asyncio.Event()  # set once the worker pulls jobs
        self.exit_code = 0
        self.num_finished = 0
        self._engine = engine
        self._redis = redis
        self._stop = asyncio.Event()
        self._started_ms = int(time.time() * 1000)
        self._num_tokens = 0
        self._kv_usage = 0.0
        self._log = structlog.get_logger("tokenfleet.worker").bind(worker_id=self.worker_id)
        self._engine_thread: EngineThread | None = None
        self._intake: Intake | None = None

    def request_stop(self) -> None:
        """Begin the drain (safe to call from a signal handler on the loop)."""
        self._stop.set()
        if self._intake is not None:
            self._intake.wakeup.set()

    async def run(self, *, install_signal_handlers: bool = False) -> int:
        """Serve until stopped; returns the process exit code (0, or 1 after a failure)."""
        if install_signal_handlers:
            loop = asyncio.get_running_loop()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, self.request_stop)
        embedded: EmbeddedValkey | None = None
        owns_redis = self._redis is None
        if self._redis is None:
            url = self.settings.redis_url
            if url is None:
                embedded = EmbeddedValkey(self.settings.resolved_cache_dir / "valkey")
                url = await asyncio.to_thread(embedded.start)
                self._log.info("embedded_valkey_started", url=url)
            self._redis = Redis.from_url(url)
        try:
            await self._serve(self._redis)
        finally:
            if owns_redis:
                await self._redis.aclose()
            if embedded is not None:
                await asyncio.to_thread(embedded.stop)
        return self.exit_code

    async def _serve(self, redis: Redis) -> None:
        s = self.settings
        engine: EngineLike = (self._engine if self._engine is not None
                              else await asyncio.to_thread(build_engine, s))
        self._engine_thread = engine_thread = EngineThread(engine, asyncio.get_running_loop())
        publisher = Publisher(redis, self.keys, s.queue, worker_id=self.worker_id,
                              result_ttl_s=s.result_ttl_s, events_ttl_s=s.events_ttl_s,
                              events_maxlen=s.events_maxlen)
        self._intake = intake = Intake(
            redis=redis, keys=self.keys, queue=s.queue, consumer=self.worker_id,
            engine_thread=engine_thread, tokenizer=engine.tokenizer,
            model_names=served_model_names(s, engine), inflight=self.inflight,
            publisher=publisher, metrics=self.metrics, read_block_ms=s.read_block_ms,
            max_deliveries=s.max_deliveries)
        registry = Registry(redis, self.keys, self.worker_id, ttl_s=s.lease_ms / 1000)
        control = ControlListener(redis, self.keys, self._on_cancel)
        await intake.ensure_group()
        await registry.publish_limits(s.queue, s.max_queue_len)
        self.metrics.serve(s.metrics_port, s.metrics_host)
        engine_thread.start()
        pulling = asyncio.create_task(intake.run(self._stop), name="intake")
        consuming = asyncio.create_task(self._consume(publisher), name="consume")
        helpers = [
            asyncio.create_task(self._heartbeat(registry, Lease(redis, self.keys, s.queue,
                                                                self.worker_id)), name="beat"),
            asyncio.create_task(control.run(self._stop), name="control"),
        ]
        await control.subscribed.wait()
        self.ready.set()
        self._log.info("worker_started", queue=s.queue, model=s.model, engine=s.engine)
        try:
            await self._until_stop([pulling, consuming, *helpers])
            await self._drain(pulling)
        finally:
            await engine_thread.stop()
            for task in (consuming, *helpers):
                task.cancel()
            await asyncio.gather(pulling, consuming, *helpers, return_exceptions=True)
            with contextlib.suppress(RedisError, OSError):
                await registry.remove()
            self.metrics.close()
            self._log.info("worker_stopped", num_finished=self.num_finished,
                           num_left=len(self.inflight))

    async def _until_stop(self, tasks: list[asyncio.Task[None]]) -> None:
        """Wait for a stop request; a background task that dies also stops the worker."""
        stopping = asyncio.create_task(self._stop.wait())
        done, _ = await asyncio.wait([stopping, *tasks], return_when=asyncio.FIRST_COMPLETED)
        stopping.cancel()
        for task in done:
            if task is not stopping and not task.cancelled() and task.exception() is not None:
                self._log.error("worker_task_failed", task=task.get_name(),
                                error=repr(task.exception()))
                self.exit_code = 1
        self.request_stop()

    async def _drain(self, pulling: asyncio.Task[None]) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(pulling), self.settings.read_block_ms / 1000 + 5)
        self._log.info("worker_draining", num_in_flight=len(self.inflight))
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while self.inflight and time.monotonic() < deadline and self.exit_code == 0:
            await asyncio.sleep(0.05)
        if self.inflight:
            self._log.warning("drain_timeout", num_left=len(self.inflight))

    async def _consume(self, publisher: Publisher) -> None:
        """Turn engine events into Redis writes, coalescing whatever is queued into one batch."""
        assert self._engine_thread is not None and self._intake is not None
        events = self._engine_thread.events
        while True:
            try:
                batch = [await asyncio.wait_for(events.get(), _EVENT_WAIT_S)]
            except TimeoutError:
                continue
            while not events.empty():
                batch.append(events.get_nowait())
            outputs = []
            for event in batch:
                if isinstance(event, StepResult):
                    self._on_step(event)
                    outputs.extend(event.outputs)
                else:
                    await self._on_failure(event, publisher)
            if outputs:
                for req, final in await publisher.publish(outputs, self.inflight):
                    self._on_finished(req, final)
            self._intake.wakeup.set()

    def _on_step(self, result: StepResult) -> None:
        assert self._engine_thread is not None
        self._engine_thread.on_result(result)
        stats = result.stats
        self.metrics.running.set(stats.get("num_running", 0))
        self.metrics.waiting.set(stats.get("num_waiting", 0))
        self._kv_usage = float(stats.get("kv_usage", 0.0))
        self.metrics.kv_usage.set(self._kv_usage)
        if result.step_s > 0:
            self.metrics.step_s.observe(result.step_s)
            self.metrics.batch_size.observe(len(result.outputs))
        num_tokens = sum(len(out.tokens) for out in result.outputs)
        self._num_tokens += num_tokens
        self.metrics.generated_tokens.inc(num_tokens)

    async def _on_failure(self, event: Rejected | EngineFailure, publisher: Publisher) -> None:
        if isinstance(event, Rejected):
            failed = [(event.request_id, event.error, event.error_type)]
        else:
            self._log.error("engine_step_failed", error=event.error, fatal=event.fatal)
            failed = [(rid, f"generation failed: {event.error}", "generation")
                      for rid in event.request_ids]
            if event.fatal:
                self.exit_code = 1
                self.request_stop()
        for request_id, error, error_type in failed:
            req = self.inflight.pop(request_id, None)
            if req is None:
                continue
            raw = {b"job": encode(req.job)} if error_type == "validation" else None
            await publisher.fail(req.entry_id, request_id, error, error_type, raw=raw)
            self.metrics.errors.labels(error_type=error_type).inc()
            if raw is not None:
                self.metrics.dead_letters.inc()

    def _on_finished(self, req: InFlightRequest, final: FinalEvent) -> None:
        self.inflight.pop(req.request_id, None)
        self.num_finished += 1
        m = self.metrics
        m.requests.labels(outcome=final.details.finish_reason).inc()
        m.prompt_tokens.inc(final.usage.prompt_tokens)
        m.e2e_s.observe(final.total_ms / 1000)
        if final.ttft_ms is not None:
            m.ttft_s.observe(final.ttft_ms / 1000)
            n = final.details.generated_tokens
            if n > 1:
                m.tpot_s.observe((final.total_ms - final.ttft_ms) / 1000 / (n - 1))
        self._log.info("request_finished", **request_log_fields(
            req.request_id, final.details.generated_tokens, final.queue_ms, final.ttft_ms,
            final.total_ms, final.details.finish_reason))

    def _on_cancel(self, request_id: str) -> None:
        if request_id in self.inflight and self._engine_thread is not None:
            self._engine_thread.abort(request_id)

    async def _heartbeat(self, registry: Registry, lease: Lease) -> None:
        """Every lease_ms/3: renew our jobs' leases and refresh the registry key."""
        interval_s = self.settings.heartbeat_s
        last_tokens, last_time = self._num_tokens, time.monotonic()
        while True:
            now = time.monotonic()
            tokens_per_s = (self._num_tokens - last_tokens) / max(now - last_time, 1e-6)
            last_tokens, last_time = self._num_tokens, now
            try:
                await lease.renew([r.entry_id for r in self.inflight.values()])
                await registry.beat(self._info(tokens_per_s))
            except (RedisError, OSError) as e:
                self._log.warning("heartbeat_failed", error=str(e))
            await asyncio.sleep(interval_s)

    def _info(self, tokens_per_s: float) -> WorkerInfo:
        assert self._engine_thread is not None
        cap = self._engine_thread.capacity
        engine = self._engine_thread.engine
        return WorkerInfo(
            worker_id=self.worker_id, model=self.settings.model, queue=self.settings.queue,
            version=_version(), host=socket.gethostname(), pid=os.getpid(),
            num_running=cap.num_running, num_waiting=cap.num_waiting,
            max_num_seqs=getattr(engine, "max_num_seqs", self.settings.max_num_seqs),
            kv_usage=self._kv_usage,
            tokens_per_s=round(tokens_per_s, 2), num_finished=self.num_finished,
            draining=self._stop.is_set(), started_ms=self._started_ms,
            updated_ms=int(time.time() * 1000))


def _version() -> str:
    try:
        return version("tokenfleet")
    except PackageNotFoundError:
        return "unknown"
