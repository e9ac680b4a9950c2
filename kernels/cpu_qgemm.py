"""Weight-only int4 / int8 linears on CPU: `cpu_qgemm.c` (AVX-512 BF16), bf16 activations.

torch's CPU kernels for these formats only pay at batch 1: on the dev VM a 32-row step of the
default model's linears (int4 layers + int8 LM head) took 64-71 ms on them against 24 ms in
bf16 on our bf16 kernel (`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`;
`benchmarks/RESULTS.md`), so quantized models lost most of the batching gain. These kernels
widen the weights to bf16 in registers and run the bf16 GEMM's vdpbf16ps tile
(`benchmarks/bench_cpu_gemm.py --quant` has the measurement).

- int4 (`pack_q4` / `q4`): llama.cpp's Q4_1 grid, w = d·q + m with q in 0..15 and one fp16 d
  and m per 32 input channels; d and m are kept in fp16 (the GGUF's own precision).
- int8 (`pack_q8` / `q8`): symmetric, one fp32 scale per output channel.

Only built where the compiler targets AVX-512 BF16; elsewhere `load` returns None and the
quantized linears keep torch's kernels. Eagerly called through ctypes; under `torch.compile`
the custom ops `tokenfleet::cpu_q4_gemm` / `cpu_q8_gemm`, opaque to dynamo.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from tokenfleet.kernels import cpu_build

__all__ = ["GROUP_SIZE", "CpuQGemm", "load"]

_SOURCE = Path(__file__).with_name("cpu_qgemm.c")
_COMPILE_FLAGS = ["-O3", "-march=native", "-fopenmp"]
_OPS: dict[str, CpuQGemm] = {}
PANEL_COLUMNS = 48
GROUP_SIZE = 32
_Q4_GROUP_BYTES = 960  # 768 nibble bytes + 48 fp16 d + 48 fp16 m


class CpuQGemm:
    """The loaded kernels. Raise ValueError on misuse (shapes, dtypes, devices)."""

    def __init__(self, library: Path):
        self.library = library
        lib = ctypes.CDLL(str(library))
        self.fast_bf16 = bool(lib.tf_qgemm_fast_bf16())
        i64, ptr, cint = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
        self._q4 = lib.tf_qgemm_q4
        self._q4.argtypes = [ptr, i64, ptr, ptr, ptr, i64, i64, i64, i64, cint]
        self._q4.restype = cint
        self._q8 = lib.tf_qgemm_q8
        self._q8.argtypes = [ptr, i64, ptr, ptr, ptr, ptr, i64, i64, i64, i64, cint]
        self._q8.restype = cint
        _OPS[str(library)] = self

    # ---- packing -------------------------------------------------------------------------
    @staticmethod
    def pack_q4(q: torch.Tensor, d: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """q [N, K] integers in 0..15, d and m [N, K / 32] (w = d·q + m) -> packed
        [ceil(N / 48), K / 32, 960] uint8 (layout in cpu_qgemm.c; zero columns past N)."""
        if q.dim() != 2 or q.shape[1] % GROUP_SIZE or q.numel() == 0:
            raise ValueError(f"pack_q4 needs q [N, K] with K a multiple of {GROUP_SIZE}, "
                             f"got {tuple(q.shape)}")
        n, k = q.shape
        groups = k // GROUP_SIZE
        if d.shape != (n, groups) or m.shape != (n, groups):
            raise ValueError(f"d and m must be [{n}, {groups}], got {tuple(d.shape)}, "
                             f"{tuple(m.shape)}")
        if int(q.min()) < 0 or int(q.max()) > 15:
            raise ValueError("pack_q4: q must hold integers in 0..15")
        num_panels = -(-n // PANEL_COLUMNS)
        pad = num_panels * PANEL_COLUMNS - n
        qp = torch.nn.functional.pad(q.to(torch.uint8), (0, 0, 0, pad))
        # (panel, vector, column, group, double k-pair, high nibble, k parity) ->
        # (panel, group, double k-pair, vector, column, k parity, high nibble)
        t = qp.view(num_panels, 3, 16, groups, 8, 2, 2).permute(0, 3, 4, 1, 2, 6, 5)
        nibbles = (t[..., 0] | (t[..., 1] << 4)).reshape(num_panels, groups, 768)

        def scales(s: torch.Tensor) -> torch.Tensor:  # [N, G] -> [P, G, 96] bytes of fp16
            sp = torch.nn.functional.pad(s.to(torch.float16), (0, 0, 0, pad))
            return sp.view(num_panels, PANEL_COLUMNS, groups).transpose(1, 2).contiguous() \
                .view(torch.uint8)

        return torch.cat([nibbles, scales(d), scales(m)], dim=2).contiguous()

    @staticmethod
    def pack_q8(q: torch.Tensor) -> torch.Tensor:
        """q [N, K] int8 -> packed [ceil(N / 48), K / 2, 96] int8 (cpu_gemm.c's bf16 layout)."""
        if q.dim() != 2 or q.dtype != torch.int8 or q.shape[1] % 2 or q.numel() == 0:
            raise ValueError(f"pack_q8 needs q [N, K] int8 with an even K, got "
                             f"{tuple(q.shape)} {q.dtype}")
        n, k = q.shape
        num_panels = -(-n // PANEL_COLUMNS)
        qp = torch.nn.functional.pad(q, (0, 0, 0, num_panels * PANEL_COLUMNS - n))
        return qp.view(num_panels, PANEL_COLUMNS, k // 2, 2).transpose(1, 2) \
            .reshape(num_panels, k // 2, 2 * PANEL_COLUMNS).contiguous()

    # ---- matmuls ---------------------------------------------------------------------------
    def q4(self, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
           n: int) -> torch.Tensor:
        # x [M, K] bf16; packed from pack_q4 of an [n, K] weight; bias [n] bf16 -> [M, n] bf16
        x = _checked_x(x, bias, n)
        m, k = x.shape
        if packed.dtype != torch.uint8 or not packed.is_contiguous() \
                or tuple(packed.shape) != (-(-n // PANEL_COLUMNS), k // GROUP_SIZE,
                                           _Q4_GROUP_BYTES) or k % GROUP_SIZE:
            raise ValueError(f"int4 packed weight {tuple(packed.shape)} {packed.dtype} does not "
                             f"fit x {tuple(x.shape)} and {n} outputs")
        out = torch.empty(m, n, dtype=torch.bfloat16)
        status = self._q4(x.data_ptr(), x.stride(0), packed.data_ptr(), _ptr(bias),
                          out.data_ptr(), n, m, n, k, torch.get_num_threads())
        if status == 2:
            raise MemoryError("cpu_qgemm: out of memory for the group sums")
        if status:
            raise ValueError("cpu_qgemm: unsupported shape or a build without AVX-512 BF16")
        return out

    def q8(self, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
           bias: torch.Tensor | None, n: int) -> torch.Tensor:
        # x [M, K] bf16; packed from pack_q8; scales [ceil(n / 48) * 48] fp32 -> [M, n] bf16
        x = _checked_x(x, bias, n)
        m, k = x.shape
        num_panels = -(-n // PANEL_COLUMNS)
        if packed.dtype != torch.int8 or not packed.is_contiguous() \
                or tuple(packed.shape) != (num_panels, k // 2, 2 * PANEL_COLUMNS) or k % 2:
            raise ValueError(f"int8 packed weight {tuple(packed.shape)} {packed.dtype} does not "
                             f"fit x {tuple(x.shape)} and {n} outputs")
        if scales.dtype != torch.float32 or not scales.is_contiguous() \
                or scales.shape != (num_panels * PANEL_COLUMNS,):
            raise ValueError(f"scales must be [{num_panels * PANEL_COLUMNS}] float32, contiguous")
        out = torch.empty(m, n, dtype=torch.bfloat16)
        status = self._q8(x.data_ptr(), x.stride(0), packed.data_ptr(), scales.data_ptr(),
                          _ptr(bias), out.data_ptr(), n, m, n, k, torch.get_num_threads())
        if status:
            raise ValueError("cpu_qgemm: unsupported shape or a build without AVX-512 BF16")
        return out


def _checked_x(x: torch.Tensor, bias: torch.Tensor | None, n: int) -> torch.Tensor:
    if x.dim() != 2 or x.dtype != torch.bfloat16 or x.device.type != "cpu":
        raise ValueError(f"cpu_qgemm takes x as a 2-D bf16 CPU tensor, got {tuple(x.shape)} "
                         f"{x.dtype} on {x.device}")
    if bias is not None and (bias.shape != (n,) or bias.dtype != torch.bfloat16
                             or bias.device.type != "cpu" or bias.stride(0) != 1):
        raise ValueError(f"bias must be [{n}] bf16 on CPU, contiguous")
    return x if x.stride(1) == 1 else x.contiguous()


def _ptr(t: torch.Tensor | None) -> int | None:
    return None if t is None else t.data_ptr()


def load(build_dir: Path) -> CpuQGemm | None:
    """The kernels, built into `build_dir` if needed; None when they cannot be built here or
    the CPU lacks AVX-512 BF16 (quantized linears then keep torch's kernels)."""
    qgemm = cpu_build.load(_SOURCE, build_dir, _COMPILE_FLAGS, CpuQGemm, _OPS)
    return qgemm if qgemm is not None and qgemm.fast_bf16 else None


# Low-level Library registrations, like cpu_gemm's (custom_op's wrapper costs ~15 us a call).
_LIB = torch.library.Library("tokenfleet", "FRAGMENT")
_LIB.define("cpu_q4_gemm(str library, Tensor x, Tensor packed, Tensor? bias, int n) -> Tensor")
_LIB.define("cpu_q8_gemm(str library, Tensor x, Tensor packed, Tensor scales, Tensor? bias, "
            "int n) -> Tensor")


def _q4_op(library: str, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
           n: int) -> torch.Tensor:
    return _OPS[library].q4(x, packed, bias, n)


def _q8_op(library: str, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
           bias: torch.Tensor | None, n: int) -> torch.Tensor:
    return _OPS[library].q8(x, packed, scales, bias, n)


def _q4_fake(library: str, x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None,
             n: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], n)


def _q8_fake(library: str, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
             bias: torch.Tensor | None, n: int) -> torch.Tensor:
    return x.new_empty(x.shape[0], n)


_LIB.impl("cpu_q4_gemm", _q4_op, "CPU")
_LIB.impl("cpu_q8_gemm", _q8_op, "CPU")
torch.library.register_fake("tokenfleet::cpu_q4_gemm", _q4_fake, lib=_LIB)
torch.library.register_fake("tokenfleet::cpu_q8_gemm", _q8_fake, lib=_LIB)


def cpu_q4_gemm(qgemm: CpuQGemm, x: torch.Tensor, packed: torch.Tensor,
                bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """What an int4 linear calls: the kernel eagerly, the custom op under `torch.compile`."""
    if torch.compiler.is_compiling():
        return torch.ops.tokenfleet.cpu_q4_gemm(str(qgemm.library), x, packed, bias, n)
    return qgemm.q4(x, packed, bias, n)


def cpu_q8_gemm(qgemm: CpuQGemm, x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor,
                bias: torch.Tensor | None, n: int) -> torch.Tensor:
    """What an int8 linear calls: the kernel eagerly, the custom op under `torch.compile`."""
    if torch.compiler.is_compiling():
        return torch.ops.tokenfleet.cpu_q8_gemm(str(qgemm.library), x, packed, scales, bias, n)
    return qgemm.q8(x, packed, scales, bias, n)
