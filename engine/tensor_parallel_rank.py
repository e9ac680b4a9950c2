"""One tensor-parallel rank other than 0, in its own process (started by
`TensorParallelWorkers`): join the group, load this rank's slice, then run every step rank 0
sends down the pipe until it says stop or goes away.

It reports its progress to rank 0 over the pipe ("started", "attached", "loaded", "ready",
or "error" with the reason), so a rank that cannot start fails the engine's start-up at once.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import traceback
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any

import torch

from tokenfleet.engine.config import EngineConfig
from tokenfleet.engine.step_inputs import StepInputs
from tokenfleet.engine.tensor_parallel import (
    init_process_group,
    shard_model_config,
    use_shm_group,
)
from tokenfleet.kernels import cpu_shm_allreduce

__all__ = ["BROADCAST_DECODE", "CALL", "DECODE", "EXIT", "STEP", "rank_device", "rank_threads",
           "run_rank"]

# A message from rank 0 is one of these tags, then its body.
EXIT = b""  # stop (no body)
STEP = b"S"  # StepInputs.pack(): an eager forward
DECODE = b"D"  # StepInputs.pack() of a decode step replayed from the static buffers / graphs
BROADCAST_DECODE = b"B"  # the same, its token ids broadcast from rank 0's device
CALL = b"C"  # the name of a runner method to call (one of _CALLABLE)
_CALLABLE = frozenset({"enable_static_decode"})


def rank_device(device: str, rank: int) -> torch.device:
    """Rank r runs on the r-th device after `device` ("cuda" = "cuda:0"); CPU ranks share."""
    base = torch.device(device)
    if base.type != "cuda":
        return base
    return torch.device("cuda", (base.index or 0) + rank)


def rank_threads(config: EngineConfig) -> int | None:
    """CPU threads of each rank: the configured number, or the cores split between ranks."""
    if config.num_threads or config.tensor_parallel_size == 1 or config.device != "cpu":
        return config.num_threads
    return max(1, (os.cpu_count() or 1) // config.tensor_parallel_size)


def run_rank(rank: int, config: EngineConfig, store_port: int, shm_path: str | None,
             conn: Connection) -> None:
    """A rank's process: join the group, load its slice, then run every step it is sent."""
    # Imported here: the runner imports this module (through tensor_parallel_workers).
    from tokenfleet.engine.loader import load_engine_model, load_model_config
    from tokenfleet.engine.model_runner import ModelRunner

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # rank 0 decides when we stop (the pipe)
    device = rank_device(config.device, rank)
    config = dataclasses.replace(config, device=str(device))
    try:
        threads = rank_threads(config)
        if threads:
            torch.set_num_threads(threads)
        if device.type == "cuda":
            torch.cuda.set_device(device)
        conn.send(("started", None))
        init_process_group(rank, config.tensor_parallel_size, store_port, device)
        _attach_shm(config, rank, shm_path)
        conn.send(("attached", None))
        assert config.model_dir is not None
        local = shard_model_config(load_model_config(config.model_dir),
                                   config.tensor_parallel_size)
        model = load_engine_model(config, local, device, rank, config.tensor_parallel_size)
        conn.send(("loaded", None))
        runner = ModelRunner(config, local, model)
        conn.send(("ready", None))
    except Exception as exc:
        conn.send(("error", f"{type(exc).__name__}: {exc}"))
        return
    _serve(runner, conn)


def _attach_shm(config: EngineConfig, rank: int, shm_path: str | None) -> None:
    if shm_path is None:
        return
    lib = cpu_shm_allreduce.load(config.kernel_dir)
    if lib is None:
        raise RuntimeError("rank 0 sums through shared memory but this rank cannot load the "
                           "kernel")
    parent = os.getppid()

    def rank_0_alive() -> None:
        if os.getppid() != parent:
            raise RuntimeError("rank 0 exited")

    use_shm_group(lib.group(Path(shm_path), rank, config.tensor_parallel_size, create=False),
                  rank_0_alive)


def _serve(runner: Any, conn: Connection) -> None:
    while True:
        try:
            payload = conn.recv_bytes()
        except (EOFError, OSError):
            return  # rank 0 is gone
        if payload == EXIT:
            return
        try:
            _handle(runner, payload[:1], payload[1:])
        except Exception:
            traceback.print_exc()  # the process's stderr: rank 0 sees the exit and reports it
            os._exit(1)


def _handle(runner: Any, tag: bytes, body: bytes) -> None:
    if tag == STEP:
        runner.run_shard(StepInputs.unpack(body))
    elif tag in (DECODE, BROADCAST_DECODE):
        runner.run_shard_decode(StepInputs.unpack(body), broadcast_ids=tag == BROADCAST_DECODE)
    elif tag == CALL and body.decode() in _CALLABLE:
        getattr(runner, body.decode())()
    else:
        raise ValueError(f"unknown message from rank 0: {tag!r}")
