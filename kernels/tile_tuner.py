"""Tile sizes for a kernel chosen by timing the candidates on the device, once per shape.

The best tiles of a memory-bound kernel depend on the card and the shape: a decode GEMV with
4,096 output rows needs small row blocks to put enough loads in flight on 132 SMs, one with
28,672 rows does not. Rather than a table per card (vLLM ships JSON files per GPU for its
MoE kernels), the first call of each shape outside a CUDA-graph capture times every candidate
and keeps the fastest. The engine's graph warm-up makes those first calls, so captured graphs
bake in tuned launches.

Candidates are timed as a captured step runs them (`graph_time_ms`): inside a CUDA graph,
so the Python launcher's microseconds are not counted (a two-kernel candidate pays them twice
when timed eagerly), each call after a read of twice the L2 that evicts the weights, as the
rest of a step does. The read is timed alone in a second graph and subtracted. A read, not
the write do_bench flushes with: dirty lines would be written back during the timed kernel.
On the first H100 lease do_bench read 22 us for cuBLAS's o_proj, which takes ~15 us in a
step. Where a graph cannot be captured, do_bench times every candidate instead.

Off the GPU (the CPU, the Triton interpreter) and during a capture nothing is timed: the
default tiles are used, and a capture's choice is not remembered.
"""

from __future__ import annotations

import functools
import statistics
import threading
from collections.abc import Callable, Hashable, Sequence
from typing import Any, Generic, TypeVar

import torch

from tokenfleet.kernels.launch_checks import is_interpreted

__all__ = ["TileTuner", "capture_graph", "graph_time_ms"]

Config = TypeVar("Config", bound=Hashable)


def _do_bench_ms(fn: Callable[[], Any]) -> float:
    import triton.testing

    # Short: a few candidates a shape, a handful of shapes a model, once per process.
    return float(triton.testing.do_bench(fn, warmup=5, rep=25, return_mode="median"))


def capture_graph(calls: Sequence[Callable[[], Any]]) -> torch.cuda.CUDAGraph:
    """`calls`, in order, captured in one CUDA graph on the current device. The first runs
    once on a side stream before: Triton compiles and cuBLAS makes its workspaces outside
    the capture."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        calls[0]()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for call in calls:
            call()
    return graph


def graph_time_ms(fn: Callable[[], Any], num_calls: int = 5, num_replays: int = 10) -> float:
    """Median ms of one `fn` from memory, captured in a CUDA graph (see the module doc)."""
    device = torch.device("cuda", torch.cuda.current_device())
    l2_bytes = int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0))
    evict = torch.ones(max(2 * l2_bytes, 8 << 20) // 4, dtype=torch.float32, device=device)

    def evict_then_fn() -> None:
        evict.sum()
        fn()

    with_fn = capture_graph([evict_then_fn] * num_calls)
    alone = capture_graph([evict.sum] * num_calls)
    # Not clamped at 0: near-zero noise still ranks the candidates as measured.
    return (_replay_ms(with_fn, num_replays) - _replay_ms(alone, num_replays)) / num_calls


def _replay_ms(graph: torch.cuda.CUDAGraph, num_replays: int) -> float:
    graph.replay()  # the first replay uploads the graph
    times = []
    for _ in range(num_replays):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


class TileTuner(Generic[Config]):
    """Remembers the fastest of `candidates` per key; `default` where nothing can be timed."""

    def __init__(self, candidates: Sequence[Config], default: Config,
                 time_ms: Callable[[Callable[[], Any]], float] = graph_time_ms,
                 fallback_time_ms: Callable[[Callable[[], Any]], float] = _do_bench_ms):
        assert candidates, "a tuner needs candidates"
        self.candidates = tuple(candidates)
        self.default = default
        self._time_ms = time_ms
        self._fallback_time_ms = fallback_time_ms  # when no candidate could be timed
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
        timings = self._time_all(run, self._time_ms)
        if len(timings) < len(self.candidates):
            # Some could not be timed in a graph (a capture refused, or a tile the card
            # cannot run): when eager timing reaches more of them, rank them all by it, so
            # that no candidate (cuBLAS's among them) is left out and no two timers mix.
            eager = self._time_all(run, self._fallback_time_ms)
            if len(eager) > len(timings):
                timings = eager
        self._timings[key] = timings
        return min(timings, key=timings.__getitem__) if timings else self.default

    def _time_all(self, run: Callable[[Config], Any],
                  time_ms: Callable[[Callable[[], Any]], float]) -> dict[Config, float]:
        timings: dict[Config, float] = {}
        for config in self.candidates:
            try:  # a candidate the card cannot run (shared memory, registers) is skipped
                timings[config] = time_ms(functools.partial(run, config))
            except Exception:  # Triton raises several types for a config it cannot run
                continue
        return timings

    def report(self) -> dict[str, dict[str, Any]]:
        """What was chosen per key, with every candidate's median ms (benchmarks print it)."""
        return {str(key): {"chosen": config,
                           "ms": {str(c): t for c, t in self._timings.get(key, {}).items()}}
                for key, config in self._chosen.items()}
