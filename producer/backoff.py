"""Capped exponential backoff with jitter, for loops that retry a lost Redis connection.

Equal jitter: the n-th delay is drawn uniformly from [d/2, d] with d = min(cap, base * 2**n),
so a fleet of clients and workers that lost the same server neither retries in lock-step nor
ever spins (every delay is at least base/2).
"""

from __future__ import annotations

import random
from collections.abc import Callable

__all__ = ["Backoff"]


class Backoff:
    """Delays for successive failures of one loop; `reset()` after a success."""

    def __init__(self, *, base_s: float = 0.05, cap_s: float = 5.0,
                 rng: Callable[[], float] = random.random) -> None:
        if not 0 < base_s <= cap_s:
            raise ValueError(f"need 0 < base_s <= cap_s, got base_s={base_s}, cap_s={cap_s}")
        self.base_s = base_s
        self.cap_s = cap_s
        self.num_failures = 0
        self._rng = rng

    def next_delay_s(self) -> float:
        """The delay before the next attempt; each call counts one more failure."""
        ceiling_s = min(self.cap_s, self.base_s * 2.0 ** min(self.num_failures, 62))
        self.num_failures += 1
        return ceiling_s / 2 + self._rng() * ceiling_s / 2

    def reset(self) -> None:
        self.num_failures = 0
