"""A fleet on this machine for benchmarks: an embedded Valkey (or a given server) and N
`tokenfleet worker` processes started with the same settings, stopped afterwards.

    with LocalFleet(settings, num_workers=2) as fleet:
        client = Client(fleet.url, keys=fleet.keys)
"""

from __future__ import annotations

import dataclasses
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from tokenfleet.producer.keys import Keys
from tokenfleet.worker.settings import WorkerSettings

__all__ = ["LocalFleet"]


class LocalFleet:
    """An embedded Valkey (unless `redis_url` is given) and `num_workers` worker processes
    configured by `settings`; use as a context manager. Worker logs go to `log_dir` (shown
    when a worker fails to start; removed by `stop()`)."""

    def __init__(self, settings: WorkerSettings, num_workers: int, *,
                 redis_url: str | None = None, start_timeout_s: float = 600.0) -> None:
        self.settings = settings
        self.num_workers = num_workers
        self.url = redis_url
        self.keys = Keys(settings.key_prefix)
        self.start_timeout_s = start_timeout_s
        self.processes: list[subprocess.Popen[bytes]] = []
        self.worker_ids = [f"bench-{uuid.uuid4().hex[:6]}-{i}" for i in range(num_workers)]
        self.log_dir = Path(tempfile.mkdtemp(prefix="tokenfleet-bench-"))
        self._server: Any = None

    def __enter__(self) -> LocalFleet:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self.processes]

    def start(self) -> str:
        """Start the server and workers; returns once every worker has registered."""
        if self.url is None:
            from tokenfleet.worker.embedded import EmbeddedValkey

            self._server = EmbeddedValkey(self.log_dir / "valkey")
            self.url = self._server.start()
        for worker_id in self.worker_ids:
            args = [sys.executable, "-m", "tokenfleet.worker.cli", "worker",
                    *_worker_flags(self.settings, redis_url=self.url, worker_id=worker_id,
                                   # one metrics port cannot serve several processes
                                   metrics_port=self.settings.metrics_port
                                   if self.num_workers == 1 else 0)]
            with (self.log_dir / f"{worker_id}.log").open("wb") as log:  # the child keeps it
                self.processes.append(subprocess.Popen(args, stdout=log,
                                                       stderr=subprocess.STDOUT))
        self._wait_registered()
        return self.url

    def _wait_registered(self) -> None:
        from redis import Redis

        assert self.url is not None
        deadline = time.monotonic() + self.start_timeout_s
        with Redis.from_url(self.url) as redis:
            while not all(redis.exists(self.keys.worker(w)) for w in self.worker_ids):
                for worker_id, proc in zip(self.worker_ids, self.processes, strict=True):
                    if proc.poll() is not None:
                        raise RuntimeError(f"worker {worker_id} exited with {proc.returncode}:"
                                           f"\n{self.log_tail(worker_id)}")
                if time.monotonic() > deadline:
                    raise TimeoutError(f"workers did not register in {self.start_timeout_s} s")
                time.sleep(0.1)

    def log_tail(self, worker_id: str, num_lines: int = 20) -> str:
        path = self.log_dir / f"{worker_id}.log"
        lines = path.read_text(errors="replace").splitlines() if path.exists() else []
        return "\n".join(lines[-num_lines:])

    def stop(self) -> None:
        """SIGTERM the workers (they drain), then stop the server and remove the logs."""
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes:
            try:
                proc.wait(timeout=self.settings.drain_timeout_s + 15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        self.processes.clear()
        if self._server is not None:
            self._server.stop()
            self._server = None
        shutil.rmtree(self.log_dir, ignore_errors=True)


def _worker_flags(settings: WorkerSettings, **overrides: Any) -> list[str]:
    """Every set field of `settings` as `--name value` (the workers ignore TOKENFLEET_*)."""
    values = {**dataclasses.asdict(settings), **overrides}
    flags: list[str] = []
    for name, value in values.items():
        if value is not None:
            flags += ["--" + name.replace("_", "-"), str(value)]
    return flags
