"""StopMatcher: exact cuts, hold-back, overlapping stops, and split-independence."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokenfleet.engine.stop_matcher import StopMatcher


def _run(stops: list[str], pieces: list[str]) -> tuple[list[tuple[str, bool]], str, StopMatcher]:
    matcher = StopMatcher(stops)
    results = [matcher.push(piece) for piece in pieces]
    return results, matcher.flush(), matcher


def _released(results: list[tuple[str, bool]], rest: str) -> str:
    return "".join(text for text, _ in results) + rest


def _reference_cut(text: str, stops: list[str]) -> int | None:
    starts = [i for stop in stops if (i := text.find(stop)) != -1]
    return min(starts) if starts else None


def test_stop_inside_one_piece() -> None:
    results, rest, matcher = _run(["###"], ["Hello ### world"])
    assert results == [("Hello ", True)]
    assert rest == "" and matcher.stopped and matcher.matched == "###"


def test_stop_spanning_several_pushes_is_held_back_then_cut() -> None:
    matcher = StopMatcher(["</answer>"])
    assert matcher.push("The answer is 4<") == ("The answer is 4", False)
    assert matcher.held == "<"
    assert matcher.push("/ans") == ("", False)
    assert matcher.push("wer") == ("", False)
    assert matcher.push(">\nmore") == ("", True)
    assert matcher.push("ignored") == ("", True)
    assert matcher.flush() == ""


def test_stop_at_the_very_start() -> None:
    results, rest, _ = _run(["STOP"], ["ST", "OP and then"])
    assert results == [("", False), ("", True)]
    assert rest == ""


def test_near_miss_is_released_later() -> None:
    matcher = StopMatcher(["\n\nUser:"])
    assert matcher.push("line\n") == ("line", False)
    assert matcher.push("\nUse") == ("", False)
    assert matcher.push("d it") == ("\n\nUsed it", False)
    assert matcher.held == ""


def test_flush_releases_held_text_when_generation_ends_otherwise() -> None:
    matcher = StopMatcher(["<|end|>"])
    assert matcher.push("bye <|en") == ("bye ", False)
    assert matcher.flush() == "<|en"
    assert not matcher.stopped
    assert matcher.flush() == ""


def test_overlapping_stops_earliest_start_wins() -> None:
    # Both rules (earliest start, earliest end) agree here: cut before "abc".
    assert _run(["abc", "bcd"], ["abcd"])[0] == [("", True)]
    assert _run(["bcd", "abc"], ["xabcd"])[0] == [("x", True)]
    # A shorter stop inside a longer, earlier-starting one: the longer one's start wins,
    # so the decision waits until it is known whether "abcd" completes.
    matcher = StopMatcher(["abcd", "bc"])
    assert matcher.push("xab") == ("x", False)
    assert matcher.push("c") == ("", False)  # "bc" matched, but "abcd" may still come
    assert matcher.push("d") == ("", True)
    assert matcher.matched == "abcd"
    matcher = StopMatcher(["abcd", "bc"])
    assert matcher.push("xabc") == ("x", False)
    assert matcher.push("e") == ("a", True)  # "abcd" is impossible now: cut before "bc"
    assert matcher.matched == "bc"
    # Same start: the cut is the same whichever matched; `matched` names the longest seen.
    _, _, matcher = _run(["ab", "abc"], ["zabcz"])
    assert matcher.matched == "abc"


def test_pending_stop_decided_by_flush() -> None:
    matcher = StopMatcher(["abcd", "bc"])
    assert matcher.push("xabc") == ("x", False)
    assert matcher.flush() == "a"
    assert matcher.stopped and matcher.matched == "bc"


def test_multibyte_characters() -> None:
    results, rest, _ = _run(["。\n", "😀"], ["你好", "。", "世界😀", "!"])
    assert _released(results, rest) == "你好。世界"
    assert results[1] == ("", False)  # "。" held: it may start "。\n"
    assert results[2] == ("。世界", True)


def test_many_stops() -> None:
    stops = [f"<stop{i:02d}>" for i in range(16)]
    text = "alpha <stop0 beta <stop1x <stop15> gamma <stop03>"
    results, rest, matcher = _run(stops, list(text))
    assert _released(results, rest) == "alpha <stop0 beta <stop1x "
    assert matcher.matched == "<stop15>"
    assert max(len(text) for text, _ in results) <= 1 + len("<stop1")


def test_empty_pushes_and_no_stops() -> None:
    matcher = StopMatcher(["end"])
    assert matcher.push("") == ("", False)
    assert matcher.push("e") == ("", False)
    assert matcher.push("") == ("", False)
    assert matcher.push("nd") == ("", True)
    free = StopMatcher([])
    assert free.push("anything end") == ("anything end", False)
    assert free.flush() == ""
    with pytest.raises(ValueError):
        StopMatcher([""])


def test_held_tail_is_bounded() -> None:
    stops = ["aaaaab", "xyz"]
    matcher = StopMatcher(stops)
    for _ in range(1000):
        matcher.push("a")
        assert len(matcher.held) <= max(map(len, stops)) - 1


ALPHABET = "abc😀 "
stop_strategy = st.lists(st.text(alphabet=ALPHABET, min_size=1, max_size=4), max_size=4)


@settings(max_examples=400, deadline=None)
@given(text=st.text(alphabet=ALPHABET, max_size=30), stops=stop_strategy, data=st.data())
def test_released_text_does_not_depend_on_the_split(text: str, stops: list[str],
                                                    data: st.DataObject) -> None:
    # Substrings of the text as stops too, so that overlapping matches are common.
    spans = data.draw(st.lists(st.tuples(st.integers(0, len(text)), st.integers(1, 5)),
                               max_size=3))
    stops = stops + [text[a : a + n] for a, n in spans if text[a : a + n]]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(text)), max_size=10)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
    matcher = StopMatcher(stops)
    released: list[str] = []
    hit_at = None
    max_len = max(map(len, stops), default=1)
    for i, piece in enumerate(pieces):
        out, hit = matcher.push(piece)
        released.append(out)
        assert len(matcher.held) <= max_len - 1
        if hit and hit_at is None:
            hit_at = i
        if hit_at is not None:
            assert hit and (out == "" or i == hit_at)
    released.append(matcher.flush())
    cut = _reference_cut(text, stops)
    assert "".join(released) == (text if cut is None else text[:cut])
    assert matcher.stopped == (cut is not None)
    if cut is not None:
        assert matcher.matched is not None and text.startswith(matcher.matched, cut)
        # Never later than needed: once the whole text is seen, the stop is decided at once
        # unless an earlier-starting stop was still pending at the end.
        pending = any(len(s) > len(text) - i and s.startswith(text[i:])
                      for s in stops for i in range(cut))
        assert (hit_at is not None) == (not pending)
