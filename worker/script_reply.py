"""Values out of Lua script replies: redis-py returns bytes, or str / int where a client
decodes responses, so the reclaim, lease and lane-reading scripts' replies pass through here."""

from __future__ import annotations

from typing import Any

__all__ = ["as_bytes", "field_map"]


def as_bytes(value: Any) -> bytes:
    return value if isinstance(value, bytes) else str(value).encode()


def field_map(flat: list[Any]) -> dict[bytes, bytes]:
    """A stream entry's fields from the flat [name, value, …] list a script returns."""
    return {as_bytes(k): as_bytes(v) for k, v in zip(flat[::2], flat[1::2], strict=True)}
