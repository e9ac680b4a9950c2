"""bf16 linears on CPU: `cpu_gemm.c` (AVX-512 BF16), built with the system C compiler.

A decode step multiplies a few activation rows (1-64) by every weight matrix once. oneDNN's
packed bf16 GEMM is tuned for larger M: on the 2-core dev VM, the default model's 121 GEMMs of
a 32-sequence step took 29.7 ms with oneDNN and 24.0 ms with this kernel (290 vs 359
GFLOP/s), a batch-1 step's 14.4 vs 10.0 ms (weights read at ~19 vs ~27 GB/s); at M = 2,048
both run at ~400 GFLOP/s (`benchmarks/bench_cpu_gemm.py`, `benchmarks/RESULTS.md`).

`pack(weight)` copies a [N, K] bf16 weight into the kernel's panel layout once (see the C
file); `__call__(x, packed, bias, n)` runs x [M, K] @ weight^T (+ bias) -> [M, N] bf16. Only
built where the compiler targets AVX-512 BF16 (`-march=native` on such a CPU); elsewhere
`load` returns None and linears keep oneDNN. Called eagerly through ctypes (which releases
the GIL); under `torch.compile` it is the custom op `tokenfleet::cpu_gemm`, opaque to dynamo.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from tokenfleet.kernels import cpu_build

__all__ = ["CpuGemm", "load"]

_SOURCE = Path(__file__).with_name("cpu_gemm.c")
_COMPILE_FLAGS = ["-O3", "-march=native", "-fopenmp"]
_OPS: dict[str, CpuGemm] = {}  # the loaded library per build file, for the custom op
PANEL_COLUMNS = 48


class CpuGemm:
    """The loaded kernel. Raises ValueError on misuse (shapes, dtypes, devices)."""

    def __init__(self, library: Path):
        self.library = library
        lib = ctypes.CDLL(str(library))
        self.fast_bf16 = bool(lib.tf_gemm_fast_bf16())
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        self._pack = lib.tf_gemm_pack
        self._pack.argtypes = [ptr, i64, i64, i64, ptr]
        self._pack.restype = ctypes.c_int
        self._gemm = lib.tf_gemm_bf16
        self._gemm.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64, ctypes.c_int]
        self._gemm.restype = ctypes.c_int
        _OPS[str(library)] = self

    def pack(self, weight: torch.Tensor) -> torch.Tensor:
        """weight [N, K] bf16 -> packed [ceil(N / 48), K / 2, 96] bf16 (zero columns past N)."""
        if weight.dim() != 2 or weight.dtype != torch.bfloat16 or weight.device.type != "cpu":
            raise ValueError(f"cpu_gemm packs a 2-D bf16 CPU weight, got {tuple(weight.shape)} "
                             f"{weight.dtype} on {weight.device}")
        n, k = weight.shape
        if k % 2 or k == 0 or n == 0:
            raise ValueError(f"cpu_gemm needs a non-empty weight with an even K, got {n} x {k}")
        if weight.stride(1) != 1:
            weight = weight.contiguous()
        num_panels = -(-n // PANEL_COLUMNS)
        packed = torch.empty(num_panels, k // 2, 2 * PANEL_COLUMNS, dtype=torch.bfloat16)
        status = self._pack(weight.data_ptr(), n, k, weight.stride(0), packed.data_ptr())
        assert status == 0, "shape checked above"
        return packed

    def __call__(self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                 n: int) -> torch.Tensor:
        # x [M, K] bf16; packed from pack() of a [n, K] weight; bias [n] bf16 -> [M, n] bf16
        _check(x, packed, bias, n)
        if x.stride(1) != 1:
            x = x.contiguous()
        m, k = x.shape
        out = torch.empty(m, n, dtype=torch.bfloat16)
        status = self._gemm(x.data_ptr(), x.stride(0), packed.data_ptr(),
                            None if bias is None else bias.data_ptr(), out.data_ptr(), n, m, n,
                            k, torch.get_num_threads())
        if status:
            raise ValueError("cpu_gemm: unsupported shape or a build without AVX-512 BF16")
        return out


def _check(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None, n: int) -> None:
    if x.dim() != 2 or x.dtype != torch.bfloat16 or x.device.type != "cpu":
        raise ValueError(f"cpu_gemm takes x as a 2-D bf16 CPU tensor, got {tuple(x.shape)} "
                         f"{x.dtype} on {x.device}")
    if packed.dtype != torch.bfloat16 or packed.dim() != 3 or not packed.is_contiguous() \
            or packed.shape[0] != -(-n // PANEL_COLUMNS) or packed.shape[2] != 2 * PANEL_COLUMNS \
            or 2 * packed.shape[1] != x.shape[1]:
        raise ValueError(f"packed weight {tuple(packed.shape)} does not fit x "
                         f"{tuple(x.shape)} and {n} outputs")
    if bias is not None and (bias.shape != (n,) or bias.dtype != torch.bfloat16
                             or bias.device.type != "cpu" or bias.stride(0) != 1):
        raise ValueError(f"bias must be [{n}] bf16 on CPU, contiguous")


def load(build_dir: Path) -> CpuGemm | None:
    """The kernel, built into `build_dir` if needed; None when it cannot be built here or the
    CPU lacks AVX-512 BF16 (linears then keep oneDNN)."""
    gemm = cpu_build.load(_SOURCE, build_dir, _COMPILE_FLAGS, CpuGemm, _OPS)
    return gemm if gemm is not None and gemm.fast_bf16 else None


# Registered with the low-level Library API rather than `torch.library.custom_op`: a call
# through the op is what a compiled decode step makes 121 times, and custom_op's wrapper took
# ~27 us a call here against ~12 us for a plain CPU kernel registration.
_LIB = torch.library.Library("tokenfleet", "FRAGMENT")
_LIB.define("cpu_gemm(str library, Tensor x, Tensor packed, Tensor? bias, int n) -> Tensor")


def _cpu_gemm_op(library: str, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
                 n: int) -> torch.Tensor:
    return _OPS[library](x, packed, bias, n)


def _cpu_gemm_fake(library: str, x: torch.Tensor, packed: torch.Tensor,
                   bias: torch.Tensor | None, n: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], n)


_LIB.impl("cpu_gemm", _cpu_gemm_op, "CPU")
torch.library.register_fake("tokenfleet::cpu_gemm", _cpu_gemm_fake, lib=_LIB)


def cpu_gemm(gemm: CpuGemm, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
             n: int) -> torch.Tensor:
    """The call a Linear makes: the kernel eagerly, the custom op under `torch.compile`."""
    if torch.compiler.is_compiling():
        return torch.ops.tokenfleet.cpu_gemm(str(gemm.library), x, packed, bias, n)
    return gemm(x, packed, bias, n)
