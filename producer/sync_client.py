"""A blocking wrapper around `Client` for scripts and sync web frameworks.

It runs an event loop in a daemon thread and forwards each call to the async client, so one
`SyncClient` can be shared by many threads.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Coroutine, Iterator
from typing import Any, TypeVar

from tokenfleet.producer.client import Client
from tokenfleet.producer.protocol import Event, FinalEvent, TokenEvent

__all__ = ["SyncClient"]

T = TypeVar("T")


class SyncClient:
    """Same methods as `Client`, blocking. Arguments are passed to `Client` unchanged."""

    def __init__(self, redis_url: str = "redis://localhost:6379/0", **client_kwargs: Any) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(
            target=self._loop.run_forever, name="tokenfleet-client", daemon=True
        )
        self._thread.start()
        self._client: Client = self._run(_make_client(redis_url, client_kwargs))

    @property
    def client(self) -> Client:
        """The underlying async client (use it only from its own loop)."""
        return self._client

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        """Close the client and stop the background loop."""
        if self._loop.is_closed():
            return
        self._run(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()

    def submit(self, inputs: str | None = None, **kwargs: Any) -> str:
        """See `Client.submit`."""
        return self._run(self._client.submit(inputs, **kwargs))

    def generate(self, inputs: str | None = None, **kwargs: Any) -> FinalEvent:
        """See `Client.generate`."""
        return self._run(self._client.generate(inputs, **kwargs))

    def generate_stream(self, inputs: str | None = None,
                        **kwargs: Any) -> Iterator[TokenEvent | FinalEvent]:
        """See `Client.generate_stream`."""
        return self._iterate(self._client.generate_stream(inputs, **kwargs))

    def stream(self, request_id: str, **kwargs: Any) -> Iterator[Event]:
        """See `Client.stream`."""
        return self._iterate(self._client.stream(request_id, **kwargs))

    def result(self, request_id: str, timeout_s: float | None = None) -> FinalEvent:
        """See `Client.result`."""
        return self._run(self._client.result(request_id, timeout_s))

    def cancel(self, request_id: str) -> None:
        """See `Client.cancel`."""
        self._run(self._client.cancel(request_id))

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def _iterate(self, agen: AsyncIterator[T]) -> Iterator[T]:
        try:
            while True:
                try:
                    yield self._run(_anext(agen))
                except StopAsyncIteration:
                    return
        finally:
            aclose = getattr(agen, "aclose", None)
            if aclose is not None and not self._loop.is_closed():
                self._run(aclose())


async def _make_client(redis_url: str, kwargs: dict[str, Any]) -> Client:
    return Client(redis_url, **kwargs)


async def _anext(agen: AsyncIterator[T]) -> T:
    return await agen.__anext__()
