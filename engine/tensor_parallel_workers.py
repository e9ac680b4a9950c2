"""Rank 0's handle on ranks 1..size-1 of a tensor-parallel engine: one process each
(engine/tensor_parallel_rank.py), mirroring rank 0's forwards.

Rank 0 (the engine's process) schedules, samples and detokenizes; before each forward it
sends the step's inputs (`StepInputs.pack()`, a few KB of int64s) down a pipe to every other
rank, and all ranks run the same forward, meeting in the all-reduces. Idle ranks wait on the
pipe, not in a collective, so an idle engine has no timeout to hit; when rank 0's process dies
the pipe closes and the ranks exit (a rank inside a collective gets a connection error).

CPU ranks sum through a shared-memory mapping (kernels/cpu_shm_allreduce.c) when the C
kernel builds (and /dev/shm has room): rank 0 creates it, the others attach, and the path is
unlinked as soon as all have (the mapping lives on until the last rank exits). A waiting
rank checks every 0.1 s that its peers live: rank 0 that its children do, the others that
rank 0 does. A step that fails on rank 0 halfway breaks the group for good (its ranks are
stopped): the others may be inside the forward, and resuming would pair the wrong sums.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import os
import secrets
import tempfile
import weakref
from collections.abc import Iterator
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tokenfleet.engine.config import EngineConfig
from tokenfleet.engine.errors import EngineDeadError, ModelLoadError, ValidationError
from tokenfleet.engine.step_inputs import StepInputs
from tokenfleet.engine.tensor_parallel import (
    init_process_group,
    rendezvous_store,
    use_shm_group,
)
from tokenfleet.engine.tensor_parallel_rank import (
    BROADCAST_DECODE,
    CALL,
    DECODE,
    EXIT,
    STEP,
    rank_device,
    run_rank,
)
from tokenfleet.kernels import cpu_shm_allreduce
from tokenfleet.kernels.cpu_shm_allreduce import ShmGroup

__all__ = ["TensorParallelWorkers"]

_POLL_S = 0.5


def _shm_path() -> Path:
    shm = Path("/dev/shm")
    folder = shm if shm.is_dir() else Path(tempfile.gettempdir())
    return folder / f"tokenfleet-tp-{os.getpid()}-{secrets.token_hex(4)}"


@dataclasses.dataclass
class _Ranks:
    """What must be released when rank 0's handle goes (closed, collected or at exit)."""

    conns: list[Connection] = dataclasses.field(default_factory=list)
    procs: list[Any] = dataclasses.field(default_factory=list)
    shm: ShmGroup | None = None
    owns_group: bool = False
    broken: str | None = None  # why the group can run no more steps


class TensorParallelWorkers:
    """Rank 0's handle on the other ranks: starts them, feeds them steps, stops them."""

    def __init__(self, config: EngineConfig):
        size = config.tensor_parallel_size
        assert size > 1
        _check_can_start(config)
        self._ranks = ranks = _Ranks()
        # Registered before anything is started, so that every exit path releases it all.
        self._finalizer = weakref.finalize(self, _release, ranks)
        try:
            self._start(config, ranks)
        except BaseException:
            self.close()
            raise

    def _start(self, config: EngineConfig, ranks: _Ranks) -> None:
        size = config.tensor_parallel_size
        store = rendezvous_store(size)
        ranks.shm = _create_shm(config)
        shm_path = str(ranks.shm.path) if ranks.shm is not None else None
        ctx = mp.get_context("spawn")  # never fork a process that may hold CUDA or threads
        for rank in range(1, size):
            parent, child = ctx.Pipe()
            proc = ctx.Process(target=run_rank,
                               args=(rank, config, store.port, shm_path, child),
                               name=f"tokenfleet-tp{rank}", daemon=True)
            ranks.conns.append(parent)
            proc.start()
            ranks.procs.append(proc)
            child.close()
        self.wait_for("started")  # a rank that cannot start fails here, not in a rendezvous
        init_process_group(0, size, store, rank_device(config.device, 0))
        ranks.owns_group = True
        self.wait_for("attached")
        if ranks.shm is not None:  # every rank has mapped it: the name is no longer needed
            ranks.shm.path.unlink(missing_ok=True)
        use_shm_group(ranks.shm, functools.partial(_check_alive, ranks))

    @property
    def pids(self) -> list[int]:
        return [int(p.pid) for p in self._ranks.procs]

    @property
    def shm(self) -> ShmGroup | None:
        return self._ranks.shm

    def wait_for(self, what: str) -> None:
        """Wait until every rank reports `what` ("started", "attached", "loaded", "ready");
        ModelLoadError with the rank's error when one failed or died instead."""
        ranks = self._ranks
        for rank, (conn, proc) in enumerate(zip(ranks.conns, ranks.procs, strict=True), 1):
            while not conn.poll(_POLL_S):
                if not proc.is_alive():
                    raise ModelLoadError(f"tensor-parallel rank {rank} exited with code "
                                         f"{proc.exitcode} while starting")
            kind, detail = conn.recv()
            if kind == "error":
                raise ModelLoadError(f"tensor-parallel rank {rank} failed: {detail}")
            assert kind == what, f"rank {rank} said {kind!r}, expected {what!r}"

    def call(self, method: str) -> None:
        """Have every other rank's runner call `method` (one the rank allows), in order with
        the steps. A message that reaches only some ranks breaks the group."""
        ranks = self._ranks
        _check_alive(ranks)
        try:
            for conn in ranks.conns:
                conn.send_bytes(CALL + method.encode())
        except BaseException as exc:
            _break(ranks, f"a call to the ranks failed ({type(exc).__name__}: {exc})")
            raise

    @contextlib.contextmanager
    def step(self, inputs: StepInputs, *, decode: bool = False, broadcast_ids: bool = False
             ) -> Iterator[None]:
        """Start the step on every other rank; the body runs rank 0's part of it. If the body
        fails, the other ranks may be left inside the forward: the group is then broken for
        good (its ranks stopped), and every later step raises instead of summing the wrong
        layers together."""
        ranks = self._ranks
        _check_alive(ranks)
        kind = (BROADCAST_DECODE if broadcast_ids else DECODE) if decode else STEP
        payload = kind + inputs.pack()
        try:
            for conn in ranks.conns:
                conn.send_bytes(payload)
            yield
        except Exception as exc:
            _break(ranks, f"a step failed on rank 0 ({type(exc).__name__}: {exc})")
            raise EngineDeadError(f"{ranks.broken}; this engine cannot run steps any more"
                                  ) from exc
        except BaseException as exc:  # Ctrl-C: the group is broken all the same
            _break(ranks, f"a step was interrupted on rank 0 ({type(exc).__name__})")
            raise

    def check_alive(self) -> None:
        _check_alive(self._ranks)

    def close(self) -> None:
        """Stop the ranks and leave the process group (a new engine may start one)."""
        self._finalizer()


def _check_can_start(config: EngineConfig) -> None:
    if dist.is_initialized():
        raise RuntimeError("a torch.distributed group already exists in this process: one "
                           "tensor-parallel engine per process")
    device = torch.device(config.device)
    if device.type == "cuda":
        first = device.index or 0
        last = first + config.tensor_parallel_size - 1
        if last >= torch.cuda.device_count():
            raise ValidationError(
                f"tensor_parallel_size={config.tensor_parallel_size} from {device} needs GPUs "
                f"{first}..{last}; this machine has {torch.cuda.device_count()}")


def _create_shm(config: EngineConfig) -> ShmGroup | None:
    """The shared-memory sum for CPU ranks; None (gloo) off CPU, without the kernel, or when
    /dev/shm is too small."""
    if config.device != "cpu":
        return None
    lib = cpu_shm_allreduce.load(config.kernel_dir)
    if lib is None:
        return None
    try:
        return lib.group(_shm_path(), 0, config.tensor_parallel_size, create=True)
    except OSError:
        return None


def _check_alive(ranks: _Ranks) -> None:
    if ranks.broken is None:
        for rank, proc in enumerate(ranks.procs, 1):
            if not proc.is_alive():
                _break(ranks, f"tensor-parallel rank {rank} exited (code {proc.exitcode})")
                break
    if ranks.broken is not None:
        raise EngineDeadError(f"{ranks.broken}; this engine cannot run steps any more")


def _break(ranks: _Ranks, reason: str) -> None:
    """Mark the group unusable and stop its ranks (some may be stuck in a collective)."""
    if ranks.broken is None:
        ranks.broken = reason
    if ranks.shm is not None:
        ranks.shm.abort()  # ranks waiting in a shared-memory sum get out with an error
    for proc in ranks.procs:
        if proc.is_alive():
            proc.kill()


def _release(ranks: _Ranks) -> None:
    if ranks.shm is not None:
        ranks.shm.abort()  # a rank stuck waiting for a dead peer gets out and reads its pipe
    for conn in ranks.conns:
        with contextlib.suppress(OSError):  # the rank is gone already
            conn.send_bytes(EXIT)
        conn.close()
    for proc in ranks.procs:
        if proc.pid is None:
            continue  # never started
        proc.join(timeout=10)
        if proc.is_alive():
            proc.kill()
            proc.join()
    if ranks.shm is not None:
        use_shm_group(None, lambda: None)
        ranks.shm.close(unlink=True)
    if ranks.owns_group and dist.is_initialized():
        dist.destroy_process_group()
