"""Paged decode attention on CPU: `cpu_paged_decode.c`, built with the system C compiler.

The torch CPU path gathers each sequence's K/V into a dense copy and calls SDPA; for decode
rows that costs ~0.7 ms per layer at 32 sequences of ~200 tokens (the copy, and SDPA's set-up
per sequence and head), ~40 % of the step. The C kernel reads K/V in place through the block
table (fp32 math, GQA-grouped) on `num_threads` threads: sequences are spread over the
threads; a decode row's context of 256 keys or more is split into parts of >= 128 keys by its
length alone (never by the batch or the thread count: a row's result is the same in any batch)
and the parts' softmax states merged (flash-decoding; AVX-512 BF16 path only). The attention
backend also gives it prefill rows, each as a row of its own with the keys up to its position.

Built at first use into `<build_dir>/cpu_paged_decode-<hash>.so` by `cpu_build`
(`-march=native`, on the machine that runs it). No compiler, or a failed build, leaves `load`
returning None and the engine on the torch path.

Called eagerly through ctypes (which releases the GIL). Under `torch.compile` it is the custom
op `tokenfleet::cpu_paged_decode`, which dynamo keeps opaque.
"""

from __future__ import annotations

import ctypes
from pathlib import Path

import torch

from tokenfleet.kernels import cpu_build

__all__ = ["CpuPagedDecode", "check_tables", "load"]

_SOURCE = Path(__file__).with_name("cpu_paged_decode.c")
# fast-math at compile time only, so that expf vectorizes (glibc's libmvec); linking without
# it keeps crtfastmath (which flushes denormals process-wide) out of the library.
_COMPILE_FLAGS = ["-O3", "-march=native", "-ffast-math", "-fopenmp"]
_STATUS = {1: "a sequence length is out of range", 2: "out of memory", 3: "unsupported shape"}
_OPS: dict[str, CpuPagedDecode] = {}  # the loaded library per build file, for the custom op


class CpuPagedDecode:
    """The loaded kernel. `__call__` checks its arguments and raises ValueError on misuse."""

    def __init__(self, library: Path):
        self.library = library
        lib = ctypes.CDLL(str(library))
        # the AVX-512 BF16 path is built in (else bf16 takes the slower portable loop)
        self.fast_bf16 = bool(lib.tf_paged_decode_fast_bf16())
        fn = lib.tf_paged_decode
        i64, ptr = ctypes.c_int64, ctypes.c_void_p
        fn.argtypes = [ptr, ptr, ptr, ptr, ptr, ptr, i64, i64, i64, i64, i64, i64, i64, i64,
                       ctypes.c_float, ctypes.c_int, ctypes.c_int, ptr]
        fn.restype = ctypes.c_int
        self._fn = fn
        _OPS[str(library)] = self

    def __call__(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                 block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                 window: int | None, num_threads: int, tables_checked: bool = False,
                 row_seqs: torch.Tensor | None = None) -> torch.Tensor:
        """`tables_checked`: the caller ran `check_tables` on this step's tables already (the
        attention backend does, once per step rather than once per layer). `row_seqs`: query
        row s reads block table row row_seqs[s] (a prompt's rows share their sequence's);
        None: row s."""
        # q [S, H, D]; caches [num_blocks, block_size, KVH, D]; block_tables [S or N,
        # max_blocks] int32; seq_lens [S] int32; row_seqs [S] int32 in [0, N) -> out [S, H, D]
        _check_shapes(q, k_cache, v_cache, block_tables, seq_lens, row_seqs)
        if not tables_checked:
            check_tables(block_tables, seq_lens, k_cache.shape[0], k_cache.shape[1], row_seqs)
        if q.stride(2) != 1 or q.stride(1) != q.shape[2]:
            q = q.contiguous()
        out = torch.empty(q.shape, dtype=q.dtype)
        _, block_size, num_kv_heads, head_dim = k_cache.shape
        status = self._fn(
            q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), out.data_ptr(),
            block_tables.data_ptr(), seq_lens.data_ptr(), q.shape[0], q.shape[1],
            num_kv_heads, head_dim, block_size, block_tables.shape[1], q.stride(0),
            window or 0, scale, int(q.dtype == torch.bfloat16), max(1, num_threads),
            None if row_seqs is None else row_seqs.data_ptr())
        if status:
            raise ValueError(f"cpu_paged_decode: {_STATUS.get(status, status)}")
        return out


def _check_shapes(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  block_tables: torch.Tensor, seq_lens: torch.Tensor,
                  row_seqs: torch.Tensor | None) -> None:
    if q.dtype not in (torch.bfloat16, torch.float32) or k_cache.dtype != q.dtype \
            or v_cache.dtype != q.dtype:
        raise ValueError("cpu_paged_decode needs q and both caches in one of bf16/float32")
    if any(t.device.type != "cpu" for t in (q, k_cache, v_cache, block_tables, seq_lens)):
        raise ValueError("cpu_paged_decode runs on CPU tensors")
    if k_cache.dim() != 4 or k_cache.shape != v_cache.shape or not k_cache.is_contiguous() \
            or not v_cache.is_contiguous():
        raise ValueError("caches must be contiguous [num_blocks, block_size, kv_heads, dim]")
    if q.dim() != 3 or q.shape[2] != k_cache.shape[3] or q.shape[1] % k_cache.shape[2]:
        raise ValueError(f"q {tuple(q.shape)} does not match the cache {tuple(k_cache.shape)}")
    if block_tables.dtype != torch.int32 or seq_lens.dtype != torch.int32 \
            or not block_tables.is_contiguous() or not seq_lens.is_contiguous():
        raise ValueError("block_tables and seq_lens must be contiguous int32")
    if seq_lens.shape != (q.shape[0],):
        raise ValueError("one length per query row")
    if row_seqs is None and block_tables.shape[0] != q.shape[0]:
        raise ValueError("one block table row per query row, or row_seqs")
    if row_seqs is not None and (row_seqs.dtype != torch.int32 or not row_seqs.is_contiguous()
                                 or row_seqs.shape != (q.shape[0],)
                                 or row_seqs.device.type != "cpu"):
        raise ValueError("row_seqs must be a contiguous int32 CPU tensor, one per query row")


def check_tables(block_tables: torch.Tensor, seq_lens: torch.Tensor, num_blocks: int,
                 block_size: int, row_seqs: torch.Tensor | None = None) -> None:
    """The values the C code trusts: an out-of-range block id would read outside the cache.
    (Two reductions; the checks measured 9 us a call: once per step, not once per layer.)"""
    if seq_lens.numel() == 0:
        return
    if row_seqs is not None:
        low, high = row_seqs.aminmax()
        if int(low) < 0 or int(high) >= block_tables.shape[0]:
            raise ValueError(f"row_seqs must be in [0, {block_tables.shape[0]})")
    if int(seq_lens.max()) > block_tables.shape[1] * block_size:
        raise ValueError("a sequence is longer than its block table")
    low, high = block_tables.aminmax()
    if int(low) < 0 or int(high) >= num_blocks:
        raise ValueError(f"block ids must be in [0, {num_blocks})")


def load(build_dir: Path) -> CpuPagedDecode | None:
    """The kernel, built into `build_dir` if needed; None when it cannot be built here."""
    return cpu_build.load(_SOURCE, build_dir, _COMPILE_FLAGS, CpuPagedDecode, _OPS)


# The low-level Library API, not `torch.library.custom_op`: a compiled decode step calls the op
# once per layer, and custom_op's wrapper cost ~15 us more per call (measured with cpu_gemm).
_LIB = torch.library.Library("tokenfleet", "FRAGMENT")
_LIB.define("cpu_paged_decode(str library, Tensor q, Tensor k_cache, Tensor v_cache, "
            "Tensor block_tables, Tensor seq_lens, float scale, int window, int num_threads) "
            "-> Tensor")


def _cpu_paged_decode_op(library: str, q: torch.Tensor, k_cache: torch.Tensor,
                         v_cache: torch.Tensor, block_tables: torch.Tensor,
                         seq_lens: torch.Tensor, scale: float, window: int,
                         num_threads: int) -> torch.Tensor:
    # Only the attention backend calls the op, and its plan checked the step's tables.
    return _OPS[library](q, k_cache, v_cache, block_tables, seq_lens, scale, window or None,
                         num_threads, tables_checked=True)


def _cpu_paged_decode_fake(library: str, q: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, block_tables: torch.Tensor,
                           seq_lens: torch.Tensor, scale: float, window: int,
                           num_threads: int) -> torch.Tensor:
    return torch.empty(q.shape, dtype=q.dtype, device=q.device)


_LIB.impl("cpu_paged_decode", _cpu_paged_decode_op, "CPU")
torch.library.register_fake("tokenfleet::cpu_paged_decode", _cpu_paged_decode_fake, lib=_LIB)
