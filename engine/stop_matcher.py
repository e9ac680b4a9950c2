"""Stop sequences matched on streamed text: release what is safe, cut exactly before a stop.

Text arrives in pieces (one per token, from the detokenizer); a stop may lie inside a piece,
span several, or start anywhere. The matcher releases text as soon as it cannot be part of a
stop and holds back the rest: a held tail is a proper prefix of some stop (so at most
`max(len(stop)) - 1` characters) that later text may complete.

Rule, when stops overlap: the output is cut at the **earliest start position** of any stop
occurrence in the text. With stops ["abc", "bcd"] and text "abcd" the cut is before "abc";
with ["abcd", "bc"] and "abcd" it is before "abcd" (position 0), so "a" is not released.
A complete occurrence therefore decides only once no earlier-starting stop can still complete:
with ["abcd", "bc"] and text "abc", "bc" has matched but "abcd" might follow, so the decision
waits for the next piece (or for `flush`). Stops sharing the earliest start cut at the same
place, so which of them matched does not change the output (`matched` names the longest one
seen complete there). The released text is thus a function of the whole text only, never of
how it was split into pieces.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["StopMatcher"]


class StopMatcher:
    """Holds back text that may turn into one of `stops`; see the module docstring."""

    def __init__(self, stops: Sequence[str]) -> None:
        if any(not isinstance(stop, str) or not stop for stop in stops):
            raise ValueError("stop sequences must be non-empty strings")
        self._stops = tuple(dict.fromkeys(stops))  # deduplicated, order kept
        self._first_chars = frozenset(stop[0] for stop in self._stops)
        self._max_len = max((len(stop) for stop in self._stops), default=0)
        self._held = ""
        self.stopped = False  # a stop was hit; no more text will be released
        self.matched: str | None = None  # the stop the output was cut before

    @property
    def held(self) -> str:
        """Text received but not released yet (a possible start of a stop)."""
        return self._held

    def push(self, text: str) -> tuple[str, bool]:
        """Add a piece of text; return (text safe to release now, whether a stop was hit).

        When a stop is hit, the released text ends right before it and every later push
        returns ("", True).
        """
        if self.stopped:
            return "", True
        if not self._stops:
            return text, False
        buffer = self._held + text
        match_start = self._earliest_match(buffer)
        pending_start = self._earliest_pending(buffer, limit=match_start)
        if match_start is not None and pending_start is None:
            return self._stop_at(buffer, match_start), True
        cut = pending_start if pending_start is not None else len(buffer)
        self._held = buffer[cut:]
        return buffer[:cut], False

    def flush(self) -> str:
        """Release the held text when generation ends for another reason (EOS, length).

        No more text can come, so a stop still pending can no longer complete: the text is
        cut before the earliest complete stop in it, if any (then `stopped` becomes True).
        """
        if self.stopped:
            return ""
        buffer, self._held = self._held, ""
        match_start = self._earliest_match(buffer)
        if match_start is not None:
            return self._stop_at(buffer, match_start)
        return buffer

    def _stop_at(self, buffer: str, start: int) -> str:
        self.stopped = True
        self._held = ""
        complete = [s for s in self._stops if buffer.startswith(s, start)]
        self.matched = max(complete, key=len)
        return buffer[:start]

    def _earliest_match(self, buffer: str) -> int | None:
        """Start of the earliest complete stop occurrence in `buffer`."""
        best: int | None = None
        for stop in self._stops:
            # An occurrence starting at or after `best` cannot win: search only before it.
            end = len(buffer) if best is None else best + len(stop) - 1
            start = buffer.find(stop, 0, end)
            if start != -1 and (best is None or start < best):
                best = start
        return best

    def _earliest_pending(self, buffer: str, limit: int | None) -> int | None:
        """Earliest position before `limit` where the rest of `buffer` is a proper prefix of
        a stop (more text could complete it there)."""
        first = max(len(buffer) - self._max_len + 1, 0)
        last = len(buffer) if limit is None else min(limit, len(buffer))
        for start in range(first, last):
            if buffer[start] not in self._first_chars:
                continue
            tail = buffer[start:]
            if any(len(stop) > len(tail) and stop.startswith(tail) for stop in self._stops):
                return start
        return None
