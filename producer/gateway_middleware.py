"""The gateway's middlewares: the API key, and turning errors into TGI/OpenAI error bodies
with TGI's status codes, with one log line per request."""

from __future__ import annotations

import asyncio
import contextvars
import hmac
import time
from collections.abc import Awaitable, Callable
from typing import Any, Final

import msgspec
import structlog
from aiohttp import web
from redis.exceptions import RedisError

from tokenfleet.producer.api_renderers import ChatRenderer, Renderer
from tokenfleet.producer.errors import TokenfleetError
from tokenfleet.producer.gateway_metrics import GatewayMetrics

__all__ = ["STATUS_BY_ERROR_TYPE", "GatewayMiddleware", "json_response", "outcome"]

log = structlog.get_logger("tokenfleet.gateway")

STATUS_BY_ERROR_TYPE: Final = {"validation": 422, "overloaded": 429, "generation": 424,
                               "incomplete_generation": 500, "deadline_exceeded": 504,
                               "timeout": 504, "expired": 410, "unauthorized": 401}
_OPEN_PATHS: Final = frozenset({"/health", "/metrics"})  # probes and scrapes need no key
_ENCODER: Final = msgspec.json.Encoder()
_TGI_ERRORS: Final = Renderer()
_OPENAI_ERRORS: Final = ChatRenderer(model="", request_id="")
# What a handler learnt about its request (id, tokens, disconnect), for the log line and the
# error headers; a context variable because each request runs in its own task.
_outcome: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("outcome")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def outcome() -> dict[str, Any]:
    """The current request's record (set up by `GatewayMiddleware.errors`)."""
    return _outcome.get()


def json_response(data: Any, *, status: int = 200, headers: dict[str, str] | None = None
                  ) -> web.Response:
    return web.Response(body=_ENCODER.encode(data), status=status, headers=headers,
                        content_type="application/json")


class GatewayMiddleware:
    """`errors` (outermost) and `auth`, as aiohttp middlewares."""

    def __init__(self, api_key: str | None, metrics: GatewayMetrics) -> None:
        self._api_key = api_key
        self._metrics = metrics

    @web.middleware
    async def auth(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        key = self._api_key
        if key is not None and request.path not in _OPEN_PATHS:
            given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
            if not hmac.compare_digest(given, f"Bearer {key}".encode()):
                raise _Unauthorized("missing or wrong API key")
        return await handler(request)

    @web.middleware
    async def errors(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        start = time.perf_counter()
        status, error_type = 500, ""
        record: dict[str, Any] = {}
        _outcome.set(record)
        self._metrics.in_flight.inc()
        try:
            response = await handler(request)
            status = response.status
            return response
        except TokenfleetError as e:
            error_type = e.error_type
            status = STATUS_BY_ERROR_TYPE.get(e.error_type, 500)
            return self._error(request, e, status, record.get("id"))
        except web.HTTPException as e:  # aiohttp's own: 404, 405, 413 …
            status = e.status
            raise
        except asyncio.CancelledError:
            status = 499  # the client went away (nginx's code for it)
            raise
        except (RedisError, OSError) as e:
            if isinstance(e, ConnectionResetError):
                status = 499
                raise  # the HTTP client went away: nothing to answer
            error_type, status = "unavailable", 503
            error = _Unavailable(f"the queue is unreachable: {e}")
            return self._error(request, error, status, record.get("id"))
        finally:
            self._metrics.in_flight.dec()
            if record.get("abandoned"):
                self._metrics.abandoned.inc(record["abandoned"])  # jobs (n > 1: several)
            if request.path not in _OPEN_PATHS:
                resource = request.match_info.route.resource
                route = resource.canonical if resource is not None else "unmatched"
                self._metrics.observe(route, status, time.perf_counter() - start)
                log.info("request", path=request.path, status=status, error_type=error_type,
                         ms=round((time.perf_counter() - start) * 1000, 1), **record)

    @staticmethod
    def _error(request: web.Request, error: TokenfleetError, status: int,
               request_id: str | None) -> web.Response:
        renderer = _OPENAI_ERRORS if request.path.startswith("/v1/") else _TGI_ERRORS
        return json_response(renderer.error(error), status=status,
                     headers={"x-request-id": request_id} if request_id else None)


class _Unauthorized(TokenfleetError):
    error_type = "unauthorized"


class _Unavailable(TokenfleetError):
    error_type = "unavailable"
