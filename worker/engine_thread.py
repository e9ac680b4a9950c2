"""The engine in its own thread: commands in through a queue, step results out to asyncio.

The engine is not thread-safe and its `step()` blocks for milliseconds to seconds, so one
thread owns it. The asyncio side sends `add`/`abort` commands through a thread-safe queue;
the thread applies them between steps and hands every step's outputs (with a fresh capacity
snapshot) back with `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Final

from tokenfleet.engine.errors import EngineDeadError
from tokenfleet.engine.outputs import Capacity, StepOutput
from tokenfleet.engine.sampling_params import SamplingParams
from tokenfleet.worker.engine_protocol import EngineLike

__all__ = ["EngineFailure", "EngineThread", "Rejected", "StepResult"]

_IDLE_WAIT_S: Final = 0.5
_MAX_CONSECUTIVE_FAILURES: Final = 3  # then the engine is broken: stop and let the worker exit


@dataclass(frozen=True, slots=True)
class _Add:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    resume_token_ids: Sequence[int] = ()


@dataclass(frozen=True, slots=True)
class _Abort:
    request_id: str


@dataclass(frozen=True, slots=True)
class _AddMany:
    """Adds sent as one command, so the engine thread never starts a step with part of them."""

    adds: list[_Add]


_STOP: Final = object()


@dataclass(slots=True)
class StepResult:
    """One engine step (or a batch of commands applied while idle)."""

    outputs: list[StepOutput]
    capacity: Capacity
    stats: dict[str, Any]
    num_adds_applied: int  # commands applied so far: lets the intake count in-transit adds
    step_s: float = 0.0


@dataclass(frozen=True, slots=True)
class Rejected:
    """`add_request` refused a request (ValidationError → validation, anything else →
    generation)."""

    request_id: str
    error: str
    error_type: str


@dataclass(frozen=True, slots=True)
class EngineFailure:
    """`step()` raised: the requests it was running are lost and must be failed."""

    error: str
    request_ids: list[str] = field(default_factory=list)
    # The engine failed repeatedly, or is dead (EngineDeadError: no requests are failed then);
    # the engine thread has stopped.
    fatal: bool = False


EngineEvent = StepResult | Rejected | EngineFailure


class EngineThread:
    """Owns the engine; `events` (an asyncio.Queue) receives StepResult/Rejected/EngineFailure."""

    def __init__(self, engine: EngineLike, loop: asyncio.AbstractEventLoop) -> None:
        self.engine = engine
        self.events: asyncio.Queue[EngineEvent] = asyncio.Queue()
        self.capacity = engine.capacity()  # latest snapshot; the engine thread refreshes it
        self.num_adds_sent = 0
        self.num_adds_applied = 0
        self._loop = loop
        self._commands: queue.SimpleQueue[object] = queue.SimpleQueue()
        self._running_ids: set[str] = set()
        self._num_failures = 0
        self._held: list[_Add] | None = None  # adds collected inside `batched()`
        self._thread = threading.Thread(target=self._run, name="tokenfleet-engine", daemon=True)

    # -- asyncio side ---------------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def add(self, request_id: str, prompt_token_ids: list[int], params: SamplingParams,
            resume_token_ids: Sequence[int] = ()) -> None:
        self.num_adds_sent += 1
        add = _Add(request_id, prompt_token_ids, params, resume_token_ids)
        if self._held is not None:
            self._held.append(add)
        else:
            self._commands.put(add)

    @contextlib.contextmanager
    def batched(self) -> Iterator[None]:
        """Hold the adds made inside and send them as one command on exit.

        The intake starts a batch of jobs one Redis round trip at a time; sent one by one, the
        first add would wake an idle engine thread, which would start a prefill step with it
        alone while the rest wait a whole step. Aborts are not held (they must not wait)."""
        if self._held is not None:  # nested: the outer block sends
            yield
            return
        self._held = []
        try:
            yield
        finally:
            held, self._held = self._held, None
            if held:
                self._commands.put(_AddMany(held))

    def abort(self, request_id: str) -> None:
        if self._held:  # keep the order: an abort must not overtake the add it cancels
            self._commands.put(_AddMany(self._held))
            self._held = []
        self._commands.put(_Abort(request_id))

    def num_free_seqs(self) -> int:
        """Sequences the engine could start now, minus adds still in transit to it."""
        cap = self.capacity
        if cap.num_waiting > 0 or cap.num_admissible_tokens <= 0:
            return 0  # it cannot start what it already has: pulling more would only age it
        return max(0, cap.num_free_seqs - (self.num_adds_sent - self.num_adds_applied))

    def on_result(self, result: StepResult) -> None:
        """Record the snapshot carried by a StepResult (called on the asyncio side)."""
        self.capacity = result.capacity
        self.num_adds_applied = result.num_adds_applied

    async def stop(self, timeout_s: float = 10.0) -> None:
        self._commands.put(_STOP)
        await asyncio.to_thread(self._thread.join, timeout_s)

    # -- engine thread --------------------------------------------------------------------
    def _run(self) -> None:
        num_applied = 0
        while True:
            commands = self._take_commands(block=not self.engine.has_unfinished())
            if _STOP in commands:
                return
            for command in commands:
                num_applied += self._apply(command)
            if self.engine.has_unfinished():
                if not self._step(num_applied):
                    return
            elif commands:
                self._post(StepResult([], self.engine.capacity(), self.engine.stats(),
                                      num_applied))

    def _take_commands(self, block: bool) -> list[object]:
        commands: list[object] = []
        if block:
            try:
                commands.append(self._commands.get(timeout=_IDLE_WAIT_S))
            except queue.Empty:
                return commands
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _apply(self, command: object) -> int:
        if isinstance(command, _Abort):
            self.engine.abort(command.request_id)
            return 0
        if isinstance(command, _AddMany):
            return sum(self._apply(add) for add in command.adds)
        assert isinstance(command, _Add), command
        try:
            self.engine.add_request(command.request_id, command.prompt_token_ids, command.params,
                                    resume_token_ids=command.resume_token_ids)
            self._running_ids.add(command.request_id)
        except ValueError as e:  # engine ValidationError is a ValueError
            self._post(Rejected(command.request_id, str(e), "validation"))
        except Exception as e:  # the worker never dies of a request
            self._post(Rejected(command.request_id, f"{type(e).__name__}: {e}", "generation"))
        return 1

    def _step(self, num_applied: int) -> bool:
        """Run one step and post its result; False when the engine is beyond repair."""
        start = time.perf_counter()
        try:
            outputs = self.engine.step()
            self._num_failures = 0
        except EngineDeadError as e:
            # Not the requests' fault: keep them in flight; the worker stops and hands them
            # to the fleet, which resumes them on another worker.
            self._post(EngineFailure(f"{type(e).__name__}: {e}", [], fatal=True))
            return False
        except Exception as e:
            self._num_failures += 1
            fatal = self._num_failures >= _MAX_CONSECUTIVE_FAILURES
            lost = sorted(self._running_ids)
            self._running_ids.clear()
            for request_id in lost:  # leave the engine empty; it may still be usable
                with contextlib.suppress(Exception):
                    self.engine.abort(request_id)
            self._post(EngineFailure(f"{type(e).__name__}: {e}", lost, fatal))
            if fatal:
                return False
            outputs = []
        for out in outputs:
            if out.finished:
                self._running_ids.discard(out.request_id)
        self._post(StepResult(outputs, self.engine.capacity(), self.engine.stats(), num_applied,
                              time.perf_counter() - start))
        return True

    def _post(self, event: EngineEvent) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: the worker is gone
            self._loop.call_soon_threadsafe(self.events.put_nowait, event)
