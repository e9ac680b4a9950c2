"""Every C kernel also compiles for an x86-64 CPU without AVX-512 (its fast paths compiled out).

The engine builds them with `-march=native`: on a CPU without AVX-512 BF16 the sources must
still compile, so that the portable loops (the attention kernel's fp32 and bf16 rows) run and
the GEMM kernels report themselves unavailable instead of failing to build. Until 2026-11-27
the attention kernel did not compile there (a constant defined only in its AVX-512 part).
"""

from __future__ import annotations

import platform
import shutil
import subprocess
from pathlib import Path

import pytest

import tokenfleet.kernels

KERNELS = Path(tokenfleet.kernels.__file__).parent
COMPILER = shutil.which("cc") or shutil.which("gcc")

pytestmark = [
    pytest.mark.skipif(COMPILER is None, reason="no C compiler"),
    pytest.mark.skipif(platform.machine() not in ("x86_64", "AMD64"), reason="x86-64 only"),
]


@pytest.mark.parametrize("source", ["cpu_gemm.c", "cpu_qgemm.c", "cpu_paged_decode.c",
                                    "cpu_row_stats.c"])
def test_compiles_without_avx512(source: str, tmp_path: Path) -> None:
    assert COMPILER is not None
    done = subprocess.run([COMPILER, "-O2", "-march=x86-64-v2", "-fopenmp", "-Wall", "-fPIC",
                           "-c", str(KERNELS / source), "-o", str(tmp_path / "k.o")],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "warning" not in done.stderr, done.stderr
