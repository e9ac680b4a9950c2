"""Build a C kernel into a shared library with the system C compiler, once per machine type.

`build(source, build_dir, compile_flags)` returns `<build_dir>/<stem>-<hash>.so`, compiled if
it is not there yet. The hash covers the source (and the local headers it includes), the
flags, the compiler's version and the CPU's feature flags: `-march=native` builds for the
machine that runs the build, so a cache directory shared by machines with different CPUs
gets one library per CPU type instead of handing one of them instructions it lacks (SIGILL).
A second process reuses the file; builds end in an atomic rename, so two processes building
at once both end up with a whole library.
No compiler, or a failed build, returns None: the callers then keep their torch path.
"""

from __future__ import annotations

import hashlib
import os
import platform
import re
import shutil
import subprocess
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

__all__ = ["LINK_FLAGS", "build", "load"]

T = TypeVar("T")

# OpenMP is linked by soname (libgomp.so.1), which resolves to the copy torch already loaded:
# the kernels then run on torch's own intra-op threads instead of fighting them for the cores.
LINK_FLAGS = ["-shared", "-fopenmp", "-lm"]


def build(source: Path, build_dir: Path, compile_flags: Sequence[str]) -> Path | None:
    """The library built from `source` (see the module docstring); None if it cannot be."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        return None
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True,
                                 timeout=30, check=True).stdout
        digest = hashlib.sha256("\0".join(
            [_source_text(source), *compile_flags, *LINK_FLAGS, version, _cpu_features()]
        ).encode()).hexdigest()
        library = Path(build_dir) / f"{source.stem}-{digest[:16]}.so"
        if not library.exists():
            _compile(compiler, source, library, compile_flags)
        return library
    except (OSError, subprocess.SubprocessError):
        return None


def load(source: Path, build_dir: Path, compile_flags: Sequence[str],
         open_library: Callable[[Path], T], loaded: dict[str, T]) -> T | None:
    """`open_library(path)` of the library built from `source`, once per process (`loaded`,
    keyed by path); None when it cannot be built or loaded here."""
    library = build(source, build_dir, compile_flags)
    if library is None:
        return None
    try:
        return loaded.get(str(library)) or open_library(library)
    except OSError:  # a library that does not load (a truncated file, a foreign one)
        return None


def _source_text(source: Path) -> str:
    """The source followed by each local header it includes (`#include "x.h"`, same folder)."""
    text = source.read_text()
    headers = re.findall(r'^#include "([^"]+)"', text, flags=re.MULTILINE)
    return "\0".join([text, *((source.parent / h).read_text() for h in headers)])


def _cpu_features() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return line
    except OSError:
        pass
    return f"{platform.machine()} {platform.processor()}"


def _compile(compiler: str, source: Path, library: Path, compile_flags: Sequence[str]) -> None:
    library.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=library.parent) as tmp:
        obj, tmp_lib = Path(tmp) / "k.o", Path(tmp) / "k.so"
        subprocess.run([compiler, *compile_flags, "-fPIC", "-c", str(source), "-o", str(obj)],
                       capture_output=True, timeout=300, check=True)
        subprocess.run([compiler, str(obj), "-o", str(tmp_lib), *LINK_FLAGS],
                       capture_output=True, timeout=300, check=True)
        os.replace(tmp_lib, library)  # atomic: a concurrent build replaces it with the same
