"""What the Redis/Valkey server can do, read from `INFO server` once at start.

Commands newer than the oldest server we support are used only when the server has them:
XAUTOCLAIM (Redis 6.2; from 7.0 its reply has a third element, the deleted ids it dropped
from the pending list). Valkey reports the Redis version it is compatible with
(`redis_version:7.2.4`) besides its own `valkey_version`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final

from redis.asyncio import Redis

__all__ = ["MIN_SERVER_VERSION", "ServerFeatures", "UnsupportedServerError"]

MIN_SERVER_VERSION: Final = (5, 0, 0)  # streams and consumer groups


class UnsupportedServerError(RuntimeError):
    """The server is too old for the fleet (no streams)."""


@dataclass(frozen=True, slots=True)
class ServerFeatures:
    """The server's product and Redis-compatible version, and what follows from it."""

    name: str  # "redis" or "valkey"
    version: tuple[int, int, int]  # the Redis-compatible version
    product_version: str = ""  # e.g. valkey_version, as the server reports it

    @property
    def has_xautoclaim(self) -> bool:
        return self.version >= (6, 2, 0)

    @property
    def xautoclaim_reports_deleted(self) -> bool:
        """XAUTOCLAIM's reply has the deleted-ids element (and drops them from the PEL)."""
        return self.version >= (7, 0, 0)

    @classmethod
    def from_info(cls, info: dict[str, Any]) -> ServerFeatures:
        """Parse `INFO server` (as redis-py returns it)."""
        version = _parse_version(str(info.get("redis_version", "0.0.0")))
        if "valkey_version" in info:
            return cls("valkey", version, str(info["valkey_version"]))
        return cls("redis", version, str(info.get("redis_version", "")))

    @classmethod
    async def detect(cls, redis: Redis) -> ServerFeatures:
        """Ask the server; raise UnsupportedServerError below MIN_SERVER_VERSION."""
        features = cls.from_info(await redis.info("server"))
        if features.version < MIN_SERVER_VERSION:
            raise UnsupportedServerError(
                f"{features.name} {'.'.join(map(str, features.version))} has no consumer "
                f"groups; tokenfleet needs Redis >= 5.0 (6.2+ recommended) or Valkey")
        return features


def _parse_version(text: str) -> tuple[int, int, int]:
    parts = [int(p) if p.isdigit() else 0 for p in text.split(".")[:3]]
    parts += [0] * (3 - len(parts))
    return parts[0], parts[1], parts[2]
