"""Kernel tests run on the GPU when there is one, else in Triton's CPU interpreter.

TRITON_INTERPRET must be set before any `@triton.jit` function is defined (Triton decides
compile vs interpret at decoration time), i.e. before tokenfleet.kernels modules are imported.
Interpreter caveat: it converts float32 -> bfloat16 by truncation, not round-to-nearest as
the GPU does, so bf16 results carry up to one extra ulp; tolerances allow for it.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"

collect_ignore_glob = [] if importlib.util.find_spec("triton") else ["test_*.py"]


def _has_avx512_bf16() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return any(line.startswith("flags") and "avx512_bf16" in line.split() for line in f)
    except OSError:
        return False


@pytest.fixture(scope="session")
def load_bf16_kernel(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Any]:
    """`load_bf16_kernel(load, fallback)`: a C kernel that needs AVX-512 BF16, built into a
    temporary folder by its module's `load`; skips (naming the `fallback` the engine takes)
    where the CPU lacks AVX-512 BF16, and fails where the CPU has it but the build failed."""

    def load_kernel(load: Callable[[Path], Any], fallback: str) -> Any:
        kernel = load(tmp_path_factory.mktemp("kernels"))
        if kernel is None:
            assert not _has_avx512_bf16(), "the CPU has AVX-512 BF16 but the kernel did not build"
            pytest.skip(f"this CPU has no AVX-512 BF16: {fallback}")
        return kernel

    return load_kernel
