"""All-reduce (sum) between processes of one machine through shared memory:
`cpu_shm_allreduce.c`.

The tensor-parallel ranks of a CPU engine sum each split layer's partial outputs with it
instead of gloo (TCP on localhost, ~1 ms a call on the development VM). Rank 0 creates the
mapping (`create`), the others attach to the same path; every rank then calls `all_reduce`
on tensors of the same shape in the same order, as the ranks of a forward do. A tensor larger
than a slot goes in slot-sized pieces. `is_alive` is called whenever a wait has lasted
`_CHECK_US`: it raises when a peer died, so no rank spins forever. Built like the other CPU
kernels (`cpu_build`); None without a C compiler, and the engine keeps gloo.
"""

from __future__ import annotations

import ctypes
import mmap
import os
from collections.abc import Callable
from pathlib import Path

import torch

from tokenfleet.kernels import cpu_build

__all__ = ["CpuShmAllReduce", "ShmGroup", "load"]

_SOURCE = Path(__file__).with_name("cpu_shm_allreduce.c")
_COMPILE_FLAGS = ["-O3", "-march=native"]
_LOADED: dict[str, CpuShmAllReduce] = {}
_CHECK_US = 100_000  # how long a wait spins before asking whether the peers still live
_DTYPES = {torch.float32: 0, torch.bfloat16: 1}
DEFAULT_SLOT_BYTES = 2 << 20  # 2 banks x ranks x this: 8 MiB for 2 ranks; bigger sums go in pieces


class CpuShmAllReduce:
    """The library's functions (see the C file)."""

    def __init__(self, library: Path):
        self.library = library
        lib = ctypes.CDLL(str(library))
        i32, i64, ptr = ctypes.c_int, ctypes.c_int64, ctypes.c_void_p
        self.bytes = lib.tf_ar_bytes
        self.bytes.argtypes, self.bytes.restype = [i32, i64], i64
        self.publish = lib.tf_ar_publish
        self.publish.argtypes, self.publish.restype = [ptr, i32, i32, i64, i64, ptr, i64], None
        self.wait = lib.tf_ar_wait
        self.wait.argtypes, self.wait.restype = [ptr, i32, i64, i64], i32
        self.reduce = lib.tf_ar_reduce
        self.reduce.argtypes, self.reduce.restype = [ptr, i32, i64, i64, ptr, i64, i32], None
        self.abort = lib.tf_ar_abort
        self.abort.argtypes, self.abort.restype = [ptr], None
        _LOADED[str(library)] = self

    def group(self, path: Path, rank: int, size: int, create: bool,
              slot_bytes: int = DEFAULT_SLOT_BYTES) -> ShmGroup:
        return ShmGroup(self, path, rank, size, create, slot_bytes)


class ShmGroup:
    """One rank's view of the shared mapping at `path`."""

    def __init__(self, lib: CpuShmAllReduce, path: Path, rank: int, size: int, create: bool,
                 slot_bytes: int):
        if not 0 <= rank < size or slot_bytes <= 0 or slot_bytes % 64:
            raise ValueError(f"bad shm group: rank {rank} of {size}, slot of {slot_bytes} B")
        self._lib, self.path, self.rank, self.size = lib, Path(path), rank, size
        self.slot_bytes = slot_bytes
        num_bytes = lib.bytes(size, slot_bytes)
        flags = os.O_RDWR | (os.O_CREAT | os.O_EXCL if create else 0)
        fd = os.open(self.path, flags, 0o600)
        try:
            if create:
                # Zero-filled (no flag published, no abort) and really allocated: a sparse
                # file on a small /dev/shm would SIGBUS at first touch instead of failing here.
                os.posix_fallocate(fd, 0, num_bytes)
            self._map = mmap.mmap(fd, num_bytes)
        except OSError:
            if create:
                self.path.unlink(missing_ok=True)
            raise
        finally:
            os.close(fd)
        self._base = ctypes.c_char.from_buffer(self._map)
        self._ptr = ctypes.addressof(self._base)
        self._seq = 0

    def all_reduce(self, t: torch.Tensor, is_alive: Callable[[], None]) -> None:
        """Sum `t` (contiguous, float32 or bf16, CPU) over the ranks, in place."""
        code = _DTYPES.get(t.dtype)
        if code is None or t.device.type != "cpu" or not t.is_contiguous():
            raise ValueError(f"shm all-reduce takes a contiguous float32/bf16 CPU tensor, got "
                             f"{t.dtype} on {t.device}")
        flat = t.view(-1)
        per_slot = self.slot_bytes // t.element_size()
        for start in range(0, flat.numel(), per_slot):
            part = flat[start:start + per_slot]
            self._seq += 1
            self._lib.publish(self._ptr, self.rank, self.size, self.slot_bytes, self._seq,
                              part.data_ptr(), part.numel() * t.element_size())
            while (status := self._lib.wait(self._ptr, self.size, self._seq, _CHECK_US)) == 1:
                is_alive()
            if status == 2:
                raise RuntimeError("tensor-parallel group aborted (a rank died or the engine "
                                   "is closing)")
            self._lib.reduce(self._ptr, self.size, self.slot_bytes, self._seq,
                             part.data_ptr(), part.numel(), code)

    def abort(self) -> None:
        """Wake every rank waiting in (or later entering) an all-reduce with an error."""
        self._lib.abort(self._ptr)

    def close(self, unlink: bool = False) -> None:
        del self._base  # the buffer export must go before the map can close
        self._map.close()
        if unlink:
            self.path.unlink(missing_ok=True)


def load(build_dir: Path) -> CpuShmAllReduce | None:
    """The kernel, built into `build_dir` if needed; None when it cannot be built here."""
    return cpu_build.load(_SOURCE, build_dir, _COMPILE_FLAGS, CpuShmAllReduce, _LOADED)
