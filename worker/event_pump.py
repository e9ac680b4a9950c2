"""The pump from the engine thread to Redis: every engine event becomes Redis writes.

Whatever the engine thread has queued is coalesced into one publisher pipeline per round
(DESIGN §3.4). The pump also owns the aborts of running requests — cancel, deadline, lost
lease — because it sees their `cancelled` outputs come back, and it keeps the per-request
bookkeeping (one log line and the metrics of each finished request).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any, Final

import structlog

from tokenfleet.producer.protocol import ErrorEvent, FinalEvent, encode
from tokenfleet.worker.engine_thread import EngineFailure, EngineThread, Rejected, StepResult
from tokenfleet.worker.inflight import InFlightRequest
from tokenfleet.worker.logging import request_log_fields
from tokenfleet.worker.metrics import WorkerMetrics
from tokenfleet.worker.publisher import Publisher

__all__ = ["EventPump"]

_EVENT_WAIT_S: Final = 0.1  # also the resolution of deadlines of running requests


class EventPump:
    """Moves engine events to the publisher for one worker; aborts requests on demand."""

    def __init__(self, *, engine_thread: EngineThread, publisher: Publisher,
                 inflight: dict[str, InFlightRequest], metrics: WorkerMetrics,
                 wakeup: asyncio.Event, on_fatal: Callable[[], None], worker_id: str) -> None:
        self._engine_thread = engine_thread
        self._publisher = publisher
        self._inflight = inflight
        self._metrics = metrics
        self._wakeup = wakeup  # the intake's: capacity may have grown
        self._on_fatal = on_fatal
        self.num_finished = 0
        self.num_tokens = 0
        self.engine_stats: dict[str, Any] = {}  # of the latest engine step
        self._engine_totals: dict[str, int] = {}  # engine counters already in the metrics
        self._log = structlog.get_logger("tokenfleet.worker").bind(worker_id=worker_id)

    async def run(self, closing: asyncio.Event) -> None:
        """Until `closing` is set: wait for engine events, publish them, finish what finished.

        (`closing`, not cancellation alone, ends the loop: see Heartbeat.run.)
        """
        events = self._engine_thread.events
        while not closing.is_set():
            self.expire_deadlines()
            try:
                # asyncio.timeout, not wait_for: 3.11's wait_for can swallow the cancel
                # that ends this loop when an event arrives at the same moment.
                async with asyncio.timeout(_EVENT_WAIT_S):
                    batch = [await events.get()]
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
                    await self._on_failure(event)
            if outputs:
                for req, end in await self._publisher.publish(outputs, self._inflight):
                    self._on_finished(req, end)
            self._wakeup.set()

    def cancel(self, request_id: str) -> None:
        """Abort a running request; it ends with finish_reason `cancelled`."""
        req = self._inflight.get(request_id)
        if req is not None and not req.aborting:
            self._abort(req)

    def drop(self, req: InFlightRequest) -> None:
        """Another worker reclaimed the job (we were cut off): stop our copy silently."""
        self._inflight.pop(req.request_id, None)
        if not req.aborting:
            self._abort(req)

    def expire_deadlines(self) -> None:
        """Abort running requests past their deadline (they end with deadline_exceeded)."""
        now_ms = time.time() * 1000
        for req in self._inflight.values():
            deadline_ms = req.job.deadline_ms
            if deadline_ms is not None and now_ms > deadline_ms and not req.aborting:
                req.expired = True
                self._abort(req)

    def _abort(self, req: InFlightRequest) -> None:
        req.aborting = True
        self._engine_thread.abort(req.request_id)

    def _on_step(self, result: StepResult) -> None:
        self._engine_thread.on_result(result)
        m = self._metrics
        stats = self.engine_stats = result.stats
        m.running.set(stats.get("num_running", 0))
        m.waiting.set(stats.get("num_waiting", 0))
        m.kv_usage.set(float(stats.get("kv_usage", 0.0)))
        if result.step_s > 0:
            m.step_s.observe(result.step_s)
            m.batch_size.observe(len(result.outputs))
        num_tokens = sum(len(out.tokens) for out in result.outputs)
        self.num_tokens += num_tokens
        m.generated_tokens.inc(num_tokens)
        for name, counter in (("num_draft_tokens", m.draft_tokens),
                              ("num_accepted_draft_tokens", m.accepted_draft_tokens)):
            total = int(stats.get(name, 0))  # the engine's count since start
            counter.inc(max(0, total - self._engine_totals.get(name, 0)))
            self._engine_totals[name] = total

    async def _on_failure(self, event: Rejected | EngineFailure) -> None:
        if isinstance(event, Rejected):
            failed = [(event.request_id, event.error, event.error_type)]
        else:
            self._log.error("engine_step_failed", error=event.error, fatal=event.fatal)
            failed = [(rid, f"generation failed: {event.error}", "generation")
                      for rid in event.request_ids]
            if event.fatal:
                self._on_fatal()
        for request_id, error, error_type in failed:
            req = self._inflight.pop(request_id, None)
            if req is None:
                continue
            raw = {b"job": encode(req.job)} if error_type == "validation" else None
            await self._publisher.fail(req.entry_id, request_id, error, error_type, raw=raw,
                                       lane=req.lane)
            self._metrics.errors.labels(error_type=error_type).inc()
            if raw is not None:
                self._metrics.dead_letters.inc()

    def _on_finished(self, req: InFlightRequest, end: FinalEvent | ErrorEvent) -> None:
        self._inflight.pop(req.request_id, None)
        self.num_finished += 1
        if isinstance(end, ErrorEvent):  # stopped at its deadline, or failed mid-generation
            self._metrics.errors.labels(error_type=end.error_type).inc()
            self._log.info("request_failed", request_id=req.request_id,
                           error_type=end.error_type, error=end.error, tokens=req.num_tokens,
                           tenant=req.job.tenant)
            return
        self._metrics.observe_final(end)
        # The job's tenant and priority ride along for accounting (priority does not yet
        # change the order jobs are served in: the stream is FIFO).
        self._log.info("request_finished", **request_log_fields(
            req.request_id, end.details.generated_tokens, end.queue_ms, end.ttft_ms,
            end.total_ms, end.details.finish_reason), resumed=req.num_resumed or None,
            tenant=req.job.tenant, priority=req.job.priority or None)
