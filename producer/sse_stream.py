"""One HTTP response streamed as server-sent events from one job, or from the copies of an
OpenAI request with `n` > 1 (their events interleaved as they come, each rendered as its own
choice), with keep-alives while nothing can be sent.

Headers wait up to FIRST_EVENT_WAIT_S for a first event, so a request that a worker rejects
at intake still gets its status (422) as from TGI, not an error event after a 200.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any, Final

import msgspec
from aiohttp import web
from redis.exceptions import RedisError

from tokenfleet.producer.api_renderers import Renderer
from tokenfleet.producer.errors import GenerationError, TokenfleetError, error_class
from tokenfleet.producer.fleet_request import FleetRequest
from tokenfleet.producer.gateway_middleware import outcome
from tokenfleet.producer.protocol import ErrorEvent, Event, FinalEvent

__all__ = ["FIRST_EVENT_WAIT_S", "KEEPALIVE_S", "SseStream"]

# Long enough that a request a worker rejects at intake still gets its 422 status, short
# enough that a proxy waiting on a deep queue sees bytes soon; keep-alives follow.
FIRST_EVENT_WAIT_S: Final = 2.0
KEEPALIVE_S: Final = 15.0
_SSE_HEADERS: Final = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache",
                       "X-Accel-Buffering": "no"}  # nginx: do not buffer the stream
_ENCODER: Final = msgspec.json.Encoder()

_Item = tuple[int, Event | Exception]


class SseStream:
    """`await SseStream(request, fleets, renderers).respond()`: renderer i renders copy i."""

    def __init__(self, request: web.Request, fleets: list[FleetRequest],
                 renderers: list[Renderer]) -> None:
        assert len(fleets) == len(renderers) > 0
        self._request = request
        self._fleets = fleets
        self._renderers = renderers
        self._merged: asyncio.Queue[_Item] = asyncio.Queue()
        self._pumps: list[asyncio.Task[None]] = []

    async def respond(self) -> web.StreamResponse:
        if len(self._fleets) > 1:
            self._pumps = [asyncio.create_task(self._pump(i, f))
                           for i, f in enumerate(self._fleets)]
        try:
            first = await self._next(FIRST_EVENT_WAIT_S)
            if first is not None and isinstance(first[1], ErrorEvent):
                # nothing sent yet: answer with the right status
                raise error_class(first[1].error_type)(first[1].error, request_id=first[1].id)
            response = web.StreamResponse(
                headers={**_SSE_HEADERS, "x-request-id": self._fleets[0].job.id})
            await response.prepare(self._request)
            try:
                await self._write_all(response, first)
                await response.write_eof()
            except ConnectionResetError:
                outcome()["disconnected"] = True  # FleetRequest's exit cancels the jobs
            return response
        finally:
            for pump in self._pumps:
                pump.cancel()
            # their exceptions were forwarded through the queue: nothing to raise here
            await asyncio.gather(*self._pumps, return_exceptions=True)

    async def _write_all(self, response: web.StreamResponse,
                         item: tuple[int, Event] | None) -> None:
        lead = self._renderers[0]
        finals: dict[int, FinalEvent] = {}
        written_s = time.monotonic()
        try:
            while len(finals) < len(self._fleets):
                chunks: list[dict[str, Any]] = []
                if item is not None:
                    index, event = item
                    if isinstance(event, ErrorEvent):
                        error = error_class(event.error_type)(event.error, request_id=event.id)
                        await _write(response, lead, [lead.error(error)])
                        break
                    chunks = self._renderers[index].chunks(event)
                    if isinstance(event, FinalEvent):
                        finals[index] = event
                if chunks:
                    await _write(response, lead, chunks)
                    written_s = time.monotonic()
                elif time.monotonic() - written_s >= KEEPALIVE_S:
                    # Nothing to send (no event, or one held back: a tool call before it
                    # names its function): a comment keeps proxies from closing the stream.
                    await response.write(b": keep-alive\n\n")
                    written_s = time.monotonic()
                if len(finals) < len(self._fleets):
                    # wake for the next keep-alive on time even after held-back events
                    idle_s = time.monotonic() - written_s
                    item = await self._next(max(KEEPALIVE_S - idle_s, 0.01))
            else:
                if len(finals) > 1:  # the copies' usage, once, after every choice ended
                    await _write(response, lead, lead.usage_chunks(
                        [finals[i] for i in sorted(finals)]))
        except TokenfleetError as e:  # the gateway's timeout, or a replay that lost tokens
            await _write(response, lead, [lead.error(e)])
        except (RedisError, OSError) as e:  # headers are gone: end the stream with an error
            await _write(response, lead, [lead.error(GenerationError(
                f"the fleet became unreachable: {e}"))])
        if lead.stream_done:
            await response.write(lead.stream_done)

    async def _next(self, wait_s: float) -> tuple[int, Event] | None:
        """The next event of any copy (with its copy number), or None after `wait_s`."""
        if len(self._fleets) == 1:
            event = await self._fleets[0].next_event(wait_s)
            return None if event is None else (0, event)
        try:
            async with asyncio.timeout(wait_s):
                index, item = await self._merged.get()
        except TimeoutError:
            return None
        if isinstance(item, Exception):
            raise item
        return index, item

    async def _pump(self, index: int, fleet: FleetRequest) -> None:
        while True:
            try:
                event = await fleet.next_event()
            except Exception as e:  # TokenfleetError, or Redis gone: the stream must end
                self._merged.put_nowait((index, e))
                return
            assert event is not None  # no wait bound: an event or an exception
            self._merged.put_nowait((index, event))
            if isinstance(event, FinalEvent | ErrorEvent):
                return


async def _write(response: web.StreamResponse, renderer: Renderer,
                 chunks: list[dict[str, Any]]) -> None:
    if chunks:
        await response.write(b"".join(renderer.sse_prefix + _ENCODER.encode(c) + b"\n\n"
                                      for c in chunks))
