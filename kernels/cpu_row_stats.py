"""The sampler's argmax and logsumexp over a step's logits: `cpu_row_stats.c`.

torch computes them as separate passes (logsumexp as five, with temporaries): ~2-3 ms of a
decode step at 32 rows of a 49,152-token vocab on 2 cores. The C kernel does both in two
passes over each row, one thread per row (so a row's result never depends on the rest of the
batch), ~0.3-0.5 ms. Built like the decode-attention kernel (`cpu_build`); None without a C
compiler, and the sampler keeps torch's ops.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from tokenfleet.kernels import cpu_build

__all__ = ["CpuRowStats", "load"]

_SOURCE = Path(__file__).with_name("cpu_row_stats.c")
# No -ffast-math: -inf and NaN logits must keep their meaning (see the C file).
_COMPILE_FLAGS = ["-O3", "-march=native", "-fno-math-errno", "-fopenmp"]
_LOADED: dict[str, CpuRowStats] = {}


class CpuRowStats:
    """`stats(scores)` -> (argmax [n] int64, logsumexp [n] float32) of scores [n, vocab]."""

    def __init__(self, library: Path):
        self.library = library
        fn = ctypes.CDLL(str(library)).tf_row_stats
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [ptr, i64, i64, i64, ctypes.c_int, ptr, ptr, ctypes.c_int]
        fn.restype = ctypes.c_int
        self._fn = fn
        _LOADED[str(library)] = self

    def __call__(self, scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if scores.dim() != 2 or scores.device.type != "cpu" \
                or scores.dtype not in (torch.float32, torch.bfloat16):
            raise ValueError(f"row stats take a [rows, vocab] float32/bf16 CPU tensor, got "
                             f"{tuple(scores.shape)} {scores.dtype} on {scores.device}")
        if scores.shape[1] == 0:
            raise ValueError("row stats need at least one column")
        if scores.stride(1) != 1:
            scores = scores.contiguous()
        num_rows = scores.shape[0]
        argmax = torch.empty(num_rows, dtype=torch.int64)
        lse = torch.empty(num_rows, dtype=torch.float32)
        if num_rows:
            status = self._fn(scores.data_ptr(), num_rows, scores.shape[1], scores.stride(0),
                              int(scores.dtype == torch.bfloat16), argmax.data_ptr(),
                              lse.data_ptr(), torch.get_num_threads())
            if status:
                raise MemoryError("cpu_row_stats: out of memory")
        return argmax, lse


def load(build_dir: Path) -> CpuRowStats | None:
    """The kernel, built into `build_dir` if needed; None when it cannot be built here."""
    return cpu_build.load(_SOURCE, build_dir, _COMPILE_FLAGS, CpuRowStats, _LOADED)
