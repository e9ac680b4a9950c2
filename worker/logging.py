"""structlog setup: JSON lines when not on a TTY, pretty on a TTY; one line per request."""

from __future__ import annotations

import logging
import sys
from typing import Any

import structlog

__all__ = ["configure_logging", "request_log_fields"]

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING,
           "error": logging.ERROR}


def configure_logging(log_format: str = "auto", level: str = "info") -> None:
    """Configure structlog for this process (call once, in the process's entry point)."""
    pretty = log_format == "console" or (log_format == "auto" and sys.stderr.isatty())
    renderer: Any = (structlog.dev.ConsoleRenderer() if pretty
                     else structlog.processors.JSONRenderer())
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(file=sys.stderr),
        cache_logger_on_first_use=False,
    )


def request_log_fields(request_id: str, num_tokens: int, queue_ms: float, ttft_ms: float | None,
                       total_ms: float, finish_reason: str) -> dict[str, Any]:
    """The fields of the one line logged per finished request."""
    gen_ms = total_ms - (ttft_ms or total_ms)
    tokens_per_s = (num_tokens - 1) / (gen_ms / 1000) if num_tokens > 1 and gen_ms > 0 else None
    return {
        "request_id": request_id,
        "tokens": num_tokens,
        "finish_reason": finish_reason,
        "queue_ms": round(queue_ms, 1),
        "ttft_ms": None if ttft_ms is None else round(ttft_ms, 1),
        "total_ms": round(total_ms, 1),
        "tok_s": None if tokens_per_s is None else round(tokens_per_s, 1),
    }
