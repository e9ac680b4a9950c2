"""Typed errors of the engine: each says what is wrong and how to fix it."""

from __future__ import annotations

__all__ = [
    "EngineDeadError",
    "EngineError",
    "ModelLoadError",
    "ModelNotFoundError",
    "UnsupportedModelError",
    "ValidationError",
]


class EngineError(Exception):
    """Base class of every error the engine raises on purpose."""


class ValidationError(EngineError, ValueError):
    """A request or parameter is invalid (TGI's `validation` error type)."""


class ModelNotFoundError(EngineError, FileNotFoundError):
    """A model name resolved to nothing: no alias, directory or .gguf file."""


class ModelLoadError(EngineError):
    """A model exists but cannot be loaded: corrupt file, missing tensor, shape mismatch."""


class UnsupportedModelError(ModelLoadError):
    """The model's architecture or a config feature is not implemented."""


class EngineDeadError(EngineError, RuntimeError):
    """The engine can run no more steps (a tensor-parallel rank died, or a step broke the
    group halfway). Its requests are not at fault: a worker hands them to the fleet."""
