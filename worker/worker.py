"""The worker: wires intake → engine thread → publisher, plus reclaim, heartbeat and cancels.

    exit_code = asyncio.run(Worker(WorkerSettings.from_env()).run())

Shutdown (SIGTERM, `request_stop()`) is a drain (DESIGN §3.10): stop pulling and reclaiming
first, let the in-flight requests finish within `drain_timeout_s`, then stop. Whatever is
still running then is released (its lease is made to look expired), so another worker resumes
it at once instead of after the lease. docs/RELIABILITY.md describes every failure path.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import socket
import time
from importlib.metadata import PackageNotFoundError, version
from typing import Any, Final

import structlog
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialWithJitterBackoff
from redis.exceptions import RedisError

from tokenfleet.producer.keys import LANES, Keys
from tokenfleet.producer.protocol import WorkerInfo
from tokenfleet.worker.connectivity import Connectivity
from tokenfleet.worker.control import ControlListener
from tokenfleet.worker.embedded import EmbeddedValkey
from tokenfleet.worker.engine_factory import build_engine, served_model_names
from tokenfleet.worker.engine_protocol import EngineLike
from tokenfleet.worker.engine_thread import EngineThread
from tokenfleet.worker.event_pump import EventPump
from tokenfleet.worker.heartbeat import GoneOwners, Heartbeat
from tokenfleet.worker.inflight import InFlightRequest
from tokenfleet.worker.intake import Intake
from tokenfleet.worker.lease import Lease
from tokenfleet.worker.metrics import WorkerMetrics
from tokenfleet.worker.publisher import Publisher
from tokenfleet.worker.reclaimer import Reclaimer
from tokenfleet.worker.registry import Registry
from tokenfleet.worker.server_features import ServerFeatures
from tokenfleet.worker.settings import WorkerSettings
from tokenfleet.worker.test_hooks import TestHooks

__all__ = ["Worker"]

_CONNECT_TIMEOUT_S: Final = 5.0
_SOCKET_MARGIN_S: Final = 10.0  # beyond the longest blocking read


class Worker:
    """One worker process's runtime. `engine`/`redis` may be injected (tests, benchmarks)."""

    def __init__(self, settings: WorkerSettings, *, engine: EngineLike | None = None,
                 redis: Redis | None = None) -> None:
        self.settings = settings
        self.worker_id = settings.resolved_worker_id
        self.keys = Keys(settings.key_prefix)
        self.metrics = WorkerMetrics()
        self.connectivity = Connectivity()
        self.inflight: dict[str, InFlightRequest] = {}
        self.ready = asyncio.Event()  # set once the worker pulls jobs
        self.exit_code = 0
        self._engine = engine
        self._redis = redis
        self._stop = asyncio.Event()
        self._closing = asyncio.Event()  # set at shutdown, after the drain
        self._started_ms = int(time.time() * 1000)
        self._rate = (0, time.monotonic())  # (tokens, when) at the last heartbeat
        self._log = structlog.get_logger("tokenfleet.worker").bind(worker_id=self.worker_id)
        self._engine_thread: EngineThread | None = None
        self._freeze_heap = False  # run(freeze_heap=...)
        self._intake: Intake | None = None
        self._pump: EventPump | None = None

    @property
    def num_finished(self) -> int:
        return 0 if self._pump is None else self._pump.num_finished

    @property
    def engine_stats(self) -> dict[str, Any]:
        """The engine's stats as of its latest step."""
        return {} if self._pump is None else self._pump.engine_stats

    def request_stop(self) -> None:
        """Begin the drain (safe to call from a signal handler on the loop)."""
        self._stop.set()
        if self._intake is not None:
            self._intake.wakeup.set()

    async def run(self, *, install_signal_handlers: bool = False,
                  freeze_heap: bool = False) -> int:
        """Serve until stopped; returns the process exit code (0, or 1 after a failure).

        `freeze_heap` is for a process that is this worker alone (`tokenfleet worker`): once
        the engine is warm, everything allocated so far leaves the cyclic garbage collector
        (`gc.freeze`). A full collection otherwise walks the whole start-up heap (~309k
        objects and ~140 ms for SmolLM2 on cpu-2c, benchmarks/bench_gc_pause.py) and every
        stream waits for it. In a shared process (tests, an embedding application) the frozen
        objects would never be collected if they became cyclic garbage later, so it is off by
        default.
        """
        self._freeze_heap = freeze_heap
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
            # A stalled server must not hang us forever: reads time out. A dropped connection
            # is retried once at once; a real outage reaches our loops quickly, which log it
            # once and back off (Connectivity) instead of redis-py retrying for seconds.
            self._redis = Redis.from_url(
                url, socket_connect_timeout=_CONNECT_TIMEOUT_S,
                socket_timeout=self.settings.read_block_ms / 1000 + _SOCKET_MARGIN_S,
                retry=Retry(ExponentialWithJitterBackoff(base=0.05, cap=0.5), retries=2))
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
        features = await ServerFeatures.detect(redis)
        load_started = time.monotonic()
        engine = self._engine
        owns_engine = engine is None
        if engine is None:  # with cpu_compile this includes minutes of compiling
            self._log.info("engine_loading", model=s.model, cpu_compile=s.cpu_compile)
            engine = await asyncio.to_thread(build_engine, s)
        grammars = getattr(engine, "grammars", None)  # the simulated engine has none
        if grammars is not None:
            grammars.warm_up()  # the first grammar request then finds it built
        try:
            await self._run_engine(redis, engine, features,
                                   round(time.monotonic() - load_started, 1))
        finally:
            close = getattr(engine, "close", None)  # tensor-parallel ranks: stop them
            if owns_engine and close is not None:
                await asyncio.to_thread(close)

    async def _run_engine(self, redis: Redis, engine: EngineLike, features: ServerFeatures,
                          engine_load_s: float) -> None:
        s = self.settings
        self._engine_thread = engine_thread = EngineThread(engine, asyncio.get_running_loop())
        publisher = Publisher(redis, self.keys, s.queue, worker_id=self.worker_id,
                              result_ttl_s=s.result_ttl_s, events_ttl_s=s.events_ttl_s,
                              events_maxlen=s.events_maxlen, connectivity=self.connectivity)
        gone_owners = GoneOwners()  # found by the heartbeat, consulted by the intake
        self._intake = intake = Intake(
            redis=redis, keys=self.keys, queue=s.queue, consumer=self.worker_id,
            engine_thread=engine_thread, tokenizer=engine.tokenizer,
            model_names=served_model_names(s, engine), inflight=self.inflight,
            publisher=publisher, metrics=self.metrics, read_block_ms=s.read_block_ms,
            lane_max_wait_ms=round(s.lane_max_wait_s * 1000),
            max_deliveries=s.max_deliveries, seed_ttl_s=max(s.events_ttl_s, s.result_ttl_s),
            connectivity=self.connectivity, hooks=TestHooks(s.test_hooks),
            gone_owners=gone_owners, grammars=getattr(engine, "grammars", None))
        registry = Registry(redis, self.keys, self.worker_id, ttl_s=s.lease_ms / 1000)
        lease = Lease(redis, self.keys, s.queue, self.worker_id, lease_ms=s.lease_ms)
        self._pump = pump = EventPump(
            engine_thread=engine_thread, publisher=publisher, inflight=self.inflight,
            metrics=self.metrics, wakeup=intake.wakeup, on_fatal=self._on_fatal,
            worker_id=self.worker_id)
        control = ControlListener(redis, self.keys, pump.cancel, connectivity=self.connectivity)
        reclaimer = Reclaimer(redis, self.keys, s.queue, self.worker_id, lease_ms=s.lease_ms,
                              features=features, connectivity=self.connectivity,
                              free_slots=engine_thread.num_free_seqs, take=intake.take,
                              metrics=self.metrics)
        heartbeat = Heartbeat(redis=redis, keys=self.keys, lease=lease, registry=registry,
                              interval_s=s.heartbeat_s, connectivity=self.connectivity,
                              inflight=self.inflight, info=self._info,
                              on_stolen=pump.drop, on_cancel=pump.cancel,
                              owner_grace_s=s.owner_ttl_s, gone_owners=gone_owners)
        await intake.ensure_group()
        await registry.publish_limits(s.queue, s.max_queue_len)
        self.metrics.serve(s.metrics_port, s.metrics_host)
        # Before the first job: a full collection now stalls nobody, and what jobs allocate
        # later stays collectable.
        num_frozen = _freeze_heap() if self._freeze_heap else 0
        engine_thread.start()
        pulling = [asyncio.create_task(intake.run(self._stop), name="intake"),
                   asyncio.create_task(reclaimer.run(self._stop), name="reclaim")]
        others = [asyncio.create_task(pump.run(self._closing), name="consume"),
                  asyncio.create_task(heartbeat.run(self._closing), name="beat"),
                  asyncio.create_task(control.run(self._closing), name="control")]
        await control.subscribed.wait()
        self.ready.set()
        self._log.info("worker_started", queue=s.queue, model=s.model, engine=s.engine,
                       engine_load_s=engine_load_s, num_frozen_objects=num_frozen,
                       attention=getattr(engine, "attention_path", None),
                       server=features.name, server_version=".".join(map(str, features.version)))
        try:
            await self._until_stop([*pulling, *others])
            await self._drain(pulling)
        finally:
            await engine_thread.stop()
            self._closing.set()
            for task in others:
                task.cancel()
            await asyncio.gather(*pulling, *others, return_exceptions=True)
            with contextlib.suppress(RedisError, OSError):
                await self._hand_off(lease)
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

    async def _drain(self, pulling: list[asyncio.Task[None]]) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(asyncio.gather(*pulling)),
                                   self.settings.read_block_ms / 1000 + 5)
        self._log.info("worker_draining", num_in_flight=len(self.inflight))
        deadline = time.monotonic() + self.settings.drain_timeout_s
        while self.inflight and time.monotonic() < deadline and self.exit_code == 0:
            await asyncio.sleep(0.05)
        if self.inflight:
            self._log.warning("drain_timeout", num_left=len(self.inflight))

    def _on_fatal(self) -> None:
        """The engine failed repeatedly: stop (exit 1) and let the fleet take our jobs."""
        self.exit_code = 1
        self.request_stop()

    async def _hand_off(self, lease: Lease) -> None:
        """Release what is still in flight so another worker resumes it now."""
        num_released = 0
        for lane in LANES:
            entry_ids = [r.entry_id for r in self.inflight.values() if r.lane == lane]
            num_released += len((await lease.release(entry_ids, lane)).renewed)
        if self.inflight:
            self._log.info("jobs_released", num_released=num_released)

    def _info(self) -> WorkerInfo:
        assert self._engine_thread is not None
        tokens, when = self._rate
        now = time.monotonic()
        num_tokens = 0 if self._pump is None else self._pump.num_tokens
        self._rate = (num_tokens, now)
        cap = self._engine_thread.capacity
        stats = self.engine_stats or self._engine_thread.engine.stats()
        return WorkerInfo(
            worker_id=self.worker_id, model=self.settings.model, queue=self.settings.queue,
            version=_version(), host=socket.gethostname(), pid=os.getpid(),
            num_running=cap.num_running, num_waiting=cap.num_waiting,
            max_num_seqs=getattr(self._engine_thread.engine, "max_num_seqs",
                                 self.settings.max_num_seqs),
            kv_usage=float(stats.get("kv_usage", 0.0)),
            num_free_kv_blocks=int(stats.get("num_free_blocks", 0)),
            num_total_kv_blocks=int(stats.get("num_total_blocks", 0)),
            tokens_per_s=round((num_tokens - tokens) / max(now - when, 1e-6), 2),
            num_finished=self.num_finished, draining=self._stop.is_set(),
            started_ms=self._started_ms, updated_ms=int(time.time() * 1000))


def _freeze_heap() -> int:
    """Collect what start-up left behind, then freeze the rest; returns the frozen count."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()


def _version() -> str:
    try:
        return version("tokenfleet")
    except PackageNotFoundError:
        return "unknown"
