"""Entries of the model cache: cross-process locks, atomic builds, completion markers.

An entry (a converted model directory) is complete when its marker file exists and names the
current converter version. Entries are built in a temporary sibling directory, the marker is
written last and the directory is renamed into place: a reader never sees half a model, and a
builder that crashes leaves nothing that looks finished (its temp dir is swept by the next).
"""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

__all__ = [
    "CONVERTER_VERSION",
    "MARKER",
    "ProgressBar",
    "build_entry",
    "file_lock",
    "is_complete",
    "say",
]

MARKER = ".tokenfleet-complete.json"
# Bump when the conversion output changes, so that caches made by older versions are rebuilt.
CONVERTER_VERSION = 1


def say(message: str) -> None:
    """One progress line on stderr."""
    print(f"tokenfleet: {message}", file=sys.stderr, flush=True)


class ProgressBar:
    """A tiny stderr progress bar: redrawn in place on a terminal, a few lines otherwise."""

    def __init__(self, label: str, stream: IO[str] | None = None, width: int = 30) -> None:
        self._label, self._width = label, width
        self._stream = stream if stream is not None else sys.stderr
        self._tty = self._stream.isatty()
        self._last_quarter = -1

    def __call__(self, num_done: int, num_total: int, _name: str) -> None:
        fraction = num_done / max(num_total, 1)
        filled = int(fraction * self._width)
        bar = "#" * filled + "-" * (self._width - filled)
        line = f"tokenfleet: {self._label} [{bar}] {num_done}/{num_total}"
        if self._tty:
            end = "\n" if num_done >= num_total else ""
            print(f"\r{line}", end=end, file=self._stream, flush=True)
        elif int(fraction * 4) > self._last_quarter:
            self._last_quarter = int(fraction * 4)
            print(line, file=self._stream, flush=True)


@contextmanager
def file_lock(path: Path, waiting_message: str | None = None) -> Iterator[None]:
    """Exclusive cross-process lock (released by the OS if the process dies)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+b") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if waiting_message:
                say(waiting_message)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def is_complete(entry: Path) -> bool:
    """Whether `entry` was fully built by the current converter version."""
    try:
        marker = json.loads((entry / MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(marker, dict) and marker.get("converter_version") == CONVERTER_VERSION


def build_entry(target: Path, build: Callable[[Path], None], source: str) -> None:
    """Build `target` via `build(tmp_dir)` + marker + rename. Caller holds the entry's lock."""
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a crashed builder
        shutil.rmtree(stale, ignore_errors=True)
    tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        build(tmp)
        marker = {"converter_version": CONVERTER_VERSION, "source": source}
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        if target.exists():  # an outdated or broken entry: move it away, then replace it
            old = target.parent / f".{target.name}.tmp-old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            shutil.rmtree(old, ignore_errors=True)
        os.rename(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
