"""Run a `Gateway` on a TCP port: start, serve until told to stop, drain, close.

    server = GatewayServer(client, GatewayConfig(queue="default"), host="0.0.0.0", port=8080)
    await server.start()          # server.port is the bound port (port=0 picks a free one)
    ...
    await server.stop()           # stop accepting; in-flight requests get `drain_timeout_s`
"""

from __future__ import annotations

import asyncio
import contextlib

import structlog
from aiohttp import web
from redis.exceptions import RedisError

from tokenfleet.producer.client import Client
from tokenfleet.producer.gateway import Gateway, GatewayConfig
from tokenfleet.producer.owner_liveness import OwnerLiveness

__all__ = ["GatewayServer"]

log = structlog.get_logger("tokenfleet.gateway")

_CLOSE_TIMEOUT_S = 5.0


class GatewayServer:
    """One listening gateway. Handlers are cancelled when their HTTP client disconnects
    (aiohttp's `handler_cancellation`), which is what lets an abandoned request be cancelled
    in the fleet instead of generating for nobody."""

    def __init__(self, client: Client, config: GatewayConfig, *, host: str = "127.0.0.1",
                 port: int = 8080, drain_timeout_s: float = 30.0) -> None:
        self.gateway = Gateway(client, config)
        self.host = host
        self.port = port
        self.drain_timeout_s = drain_timeout_s
        # The drain is ours (`stop`); aiohttp then only waits for the streams of cancelled
        # jobs to end with their final event.
        self._runner = web.AppRunner(self.gateway.app(), handler_cancellation=True,
                                     access_log=None, shutdown_timeout=_CLOSE_TIMEOUT_S)
        # Jobs of clients without an Idempotency-Key are owned by this process: if it dies,
        # workers see its key expire and cancel them (producer/owner_liveness.py).
        self._liveness = (OwnerLiveness(client.redis, client.keys, config.owner_ttl_s)
                          if config.owner_ttl_s > 0 else None)
        self._liveness_stop = asyncio.Event()
        self._liveness_task: asyncio.Task[None] | None = None
        if self._liveness is not None:
            self.gateway.owner_id = self._liveness.owner_id

    async def start(self) -> None:
        if self._liveness is not None:
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await self._liveness.beat()  # alive before the first job names it
            # Redis may be down now: /health says so, and the beats retry until it is back.
            self._liveness_task = asyncio.create_task(self._liveness.run(self._liveness_stop))
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server  # aiohttp exposes no public accessor for the bound port
        if server is not None and self.port == 0:
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[attr-defined]
        log.info("gateway_started", host=self.host, port=self.port,
                 queue=self.gateway.config.queue)

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish (up to the drain time), then cancel
        the rest in the fleet, like any abandoned request (those sent with an Idempotency-Key
        keep running: their clients can re-attach through another gateway)."""
        for site in list(self._runner.sites):
            await site.stop()
        num_cut = await self.gateway.drain(self.drain_timeout_s)
        await self._runner.cleanup()
        await self.gateway.aclose()
        if self._liveness_task is not None:  # set by start() when there is a liveness key
            assert self._liveness is not None
            self._liveness_stop.set()
            await self._liveness_task
            await self._liveness.remove()
        log.info("gateway_stopped", num_cancelled=num_cut)
