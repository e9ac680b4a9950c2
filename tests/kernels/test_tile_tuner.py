"""TileTuner: the fastest candidate per shape, timed once, never during a capture or off-GPU.

The timing function is a stand-in here (no GPU on CI): what is under test is the choice and
the memory of it; the GPU check times the real kernel (benchmarks/gpu_bench.py prints the
tuner's report beside the graph-timed sweep of kernels/norm_gemv_bench.py).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch

from tokenfleet.kernels import tile_tuner
from tokenfleet.kernels.tile_tuner import TileTuner

CUDA = torch.device("cuda")
COSTS = {(8, 4): 3.0, (16, 4): 1.0, (32, 8): 2.0}


class FakeClock:
    """Runs the candidate once (as do_bench would) and returns its cost from a table."""

    def __init__(self, costs: dict[Any, float]):
        self.costs = costs
        self.ran: list[Any] = []

    def __call__(self, fn: Callable[[], Any]) -> float:
        config = fn()
        self.ran.append(config)
        return self.costs[config]


@pytest.fixture
def on_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pretend to be on a GPU outside a capture (the checks the tuner makes first)."""
    monkeypatch.setattr(tile_tuner, "is_interpreted", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)


def test_fastest_candidate_is_chosen_and_remembered(on_gpu: None) -> None:
    clock = FakeClock(COSTS)
    tuner = TileTuner(list(COSTS), default=(8, 4), time_ms=clock)
    assert tuner.choose("qkv", CUDA, lambda c: c) == (16, 4)
    assert sorted(clock.ran) == sorted(COSTS)  # every candidate timed once
    assert tuner.choose("qkv", CUDA, lambda c: c) == (16, 4)
    assert len(clock.ran) == len(COSTS)  # remembered: not timed again
    clock.costs = {(8, 4): 0.5, (16, 4): 1.0, (32, 8): 2.0}
    assert tuner.choose("o_proj", CUDA, lambda c: c) == (8, 4)  # its own key, its own choice
    report = tuner.report()
    assert report["qkv"]["chosen"] == (16, 4)
    assert report["qkv"]["ms"] == {str(c): t for c, t in COSTS.items()}


def test_a_failing_candidate_is_skipped(on_gpu: None) -> None:
    def run(config: tuple[int, int]) -> tuple[int, int]:
        if config == (16, 4):
            raise RuntimeError("out of resources: shared memory")
        return config

    tuner = TileTuner(list(COSTS), default=(8, 4), time_ms=FakeClock(COSTS))
    assert tuner.choose("k", CUDA, run) == (32, 8)

    def broken(config: tuple[int, int]) -> None:
        raise RuntimeError("nothing runs")

    assert tuner.choose("other", CUDA, broken) == (8, 4)  # all failed: the default


def test_nothing_is_timed_off_the_gpu_or_during_a_capture(
        monkeypatch: pytest.MonkeyPatch) -> None:
    clock = FakeClock(COSTS)
    tuner = TileTuner(list(COSTS), default=(32, 8), time_ms=clock)
    assert tuner.choose("k", torch.device("cpu"), lambda c: c) == (32, 8)
    monkeypatch.setattr(tile_tuner, "is_interpreted", lambda: False)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    assert tuner.choose("k", CUDA, lambda c: c) == (32, 8)  # timing would break the capture
    assert clock.ran == [] and tuner.report() == {}  # and the default is not remembered
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: False)
    assert tuner.choose("k", CUDA, lambda c: c) == (16, 4)  # tuned at the first free call


def test_candidates_are_timed_eagerly_when_no_graph_can_be_captured(on_gpu: None) -> None:
    """The graph timer failing for every candidate (a device where capture is refused) must
    not leave the shape on the default tiles: the eager timer then times them all."""
    def no_graph(fn: Callable[[], Any]) -> float:
        raise RuntimeError("operation not permitted when stream is capturing")

    eager = FakeClock(COSTS)
    tuner = TileTuner(list(COSTS), default=(8, 4), time_ms=no_graph, fallback_time_ms=eager)
    assert tuner.choose("k", CUDA, lambda c: c) == (16, 4)
    assert sorted(eager.ran) == sorted(COSTS)
    primary = FakeClock(COSTS)
    unused = FakeClock(COSTS)
    tuner = TileTuner(list(COSTS), default=(8, 4), time_ms=primary, fallback_time_ms=unused)
    assert tuner.choose("k", CUDA, lambda c: c) == (16, 4)
    assert unused.ran == []  # the graph timer worked: no eager timing


def test_a_candidate_only_the_eager_timer_can_time_is_not_left_out(on_gpu: None) -> None:
    """One candidate cannot be captured in a graph (say cuBLAS's path on some setup): every
    candidate is then ranked by the eager timer, not the others by one timer and it by none."""
    def graph_timer(fn: Callable[[], Any]) -> float:
        config = fn()
        if config == (8, 4):
            raise RuntimeError("operation not permitted when stream is capturing")
        return COSTS[config]

    eager = FakeClock({(8, 4): 0.5, (16, 4): 1.0, (32, 8): 2.0})
    tuner = TileTuner(list(COSTS), default=(32, 8), time_ms=graph_timer, fallback_time_ms=eager)
    assert tuner.choose("k", CUDA, lambda c: c) == (8, 4)
    assert sorted(eager.ran) == sorted(COSTS)
