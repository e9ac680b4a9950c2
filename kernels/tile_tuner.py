"""Tile sizes for a kernel chosen by timing the candidates on the device, once per shape.

The best tiles of a memory-bound kernel depend on the card and the shape: a decode GEMV with
4,096 output rows needs small row blocks to put enough loads in flight on 132 SMs, one with
28,672 rows does not. Rather than a table per card (vLLM ships JSON files per GPU for its
MoE kernels), the first call of each shape outside a CUDA-graph capture times every candidate
with `triton.testing.do_bench` (which flushes the L2 between runs, so weights come from
memory as they do in a step) and keeps the fastest. The engine's graph warm-up makes those
first calls, so captured graphs bake in tuned launches.

Off the GPU (the CPU, the Triton interpreter) and during a capture nothing is timed: the
default tiles are used, and a capture's choice is not remembered.
"""

from __future__ import annotations

import functools
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

import torch

from tokenfleet.kernels.launch_checks import is_interpreted

__all__ = ["TileTuner"]

Config = TypeVar("Config", bound=Hashable)


def _do_bench_ms(fn: Callable[[], Any]) -> float:
    import triton.testing

    # Short: a few candidates a shape, a handful of shapes a model, once per process.
    return float(triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median"))


class TileTuner(Generic[Config]):
    """Remembers the fastest of `candidates` per key; `default` where nothing can be timed."""

    def __init__(self, candidates: Sequence[Config], default: Config,
                 time_ms: Callable[[Callable[[], Any]], float] = _do_bench_ms):
        assert candidates, "a tuner needs candidates"
        self.candidates = tuple(candidates)
        self.default = default
        self._time_ms = time_ms
        self._chosen: dict[Hashable, Config] = {}
        self._timings: dict[Hashable, dict[Config, float]] = {}
        self._lock = threading.Lock()  # tensor-parallel ranks in threads, engine + tests

    def choose(self, key: Hashable, device: torch.device,
               run: Callable[[Config], Any]) -> Config:
        """The tiles for `key`: remembered, else timed now with `run(config)` (on CUDA)."""
        chosen = self._chosen.get(key)
        if chosen is not None:
            return chosen
        if device.type != "cuda" or is_interpreted() or torch.cuda.is_current_stream_capturing():
            return self.default
        with self._lock:
            if key not in self._chosen:
                self._chosen[key] = self._tune(key, run)
            return self._chosen[key]

    def _tune(self, key: Hashable, run: Callable[[Config], Any]) -> Config:
        timings: dict[Config, float] = {}
        for config in self.candidates:
            try:  # a candidate the card cannot run (shared memory, registers) is skipped
                timings[config] = self._time_ms(functools.partial(run, config))
            except Exception:  # Triton raises several types for a config it cannot run
                continue
        self._timings[key] = timings
        return min(timings, key=timings.__getitem__) if timings else self.default

    def report(self) -> dict[str, dict[str, Any]]:
        """What was chosen per key, with every candidate's median ms (benchmarks print it)."""
        return {str(key): {"chosen": config,
                           "ms": {str(c): t for c, t in self._timings.get(key, {}).items()}}
                for key, config in self._chosen.items()}
