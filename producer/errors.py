"""Typed errors a producer sees: one class per TGI `error_type`, plus timeouts.

A worker reports failures as `error` events carrying `error_type`; `error_from_event` turns one
back into the matching exception so callers can `except OverloadedError:` as they would catch a
429 from TGI.
"""

from __future__ import annotations

__all__ = [
    "DeadlineExceededError",
    "ExpiredRequestError",
    "GenerationError",
    "IncompleteGenerationError",
    "OverloadedError",
    "ResultTimeoutError",
    "TokenfleetError",
    "ValidationError",
    "error_class",
]


class TokenfleetError(Exception):
    """Base class of every error the fleet reports on purpose."""

    error_type = "generation"

    def __init__(self, message: str, *, request_id: str | None = None) -> None:
        super().__init__(message)
        self.request_id = request_id


class ValidationError(TokenfleetError, ValueError):
    """The request is invalid (bad parameters, unknown model, prompt too long)."""

    error_type = "validation"


class OverloadedError(TokenfleetError):
    """The queue's backlog is at `max_queue_len`: retry later (TGI's 429)."""

    error_type = "overloaded"


class GenerationError(TokenfleetError):
    """Generation failed inside a worker, or the job was dead-lettered after it was
    delivered more than `max_deliveries` times (its workers kept dying on it)."""

    error_type = "generation"


class IncompleteGenerationError(GenerationError):
    """The request stopped before finishing and cannot be completed: its replay stream lost
    tokens (trimmed or expired), so it can neither be streamed in full nor resumed."""

    error_type = "incomplete_generation"


class DeadlineExceededError(TokenfleetError):
    """The job's `deadline_ms` passed: before a worker could start it, or while it ran."""

    error_type = "deadline_exceeded"


class ExpiredRequestError(TokenfleetError):
    """The request id was submitted before, but its events and result have expired: it can
    neither be followed nor (being a duplicate) run again. Not a wire error type."""

    error_type = "expired"


class ResultTimeoutError(TokenfleetError, TimeoutError):
    """The caller's own wait (`timeout_s`) ran out; the request may still finish later."""

    error_type = "timeout"


_BY_TYPE: dict[str, type[TokenfleetError]] = {
    cls.error_type: cls
    for cls in (
        ValidationError,
        OverloadedError,
        GenerationError,
        IncompleteGenerationError,
        DeadlineExceededError,
    )
}


def error_class(error_type: str) -> type[TokenfleetError]:
    """The exception class for a wire `error_type` (unknown types map to GenerationError)."""
    return _BY_TYPE.get(error_type, GenerationError)
