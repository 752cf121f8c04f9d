"""Stop strings through one automaton: the same cut and hold-back as a brute-force scan, fed
in any chunking, and bounded work for what a request can send (issue 20, item 4)."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shardline.engine.detokenizer import StopMatcher
from shardline.engine.errors import InvalidRequestError
from shardline.engine.request import MAX_STOP_STRING_CHARS, MAX_STOP_STRINGS, SamplingParams


def brute_force(text: str, stops: list[str]) -> tuple[int, int] | None:
    """(start, end) of the stop string completed first (the longest of those ending there)."""
    for end in range(1, len(text) + 1):
        ending = [s for s in stops if text[:end].endswith(s)]
        if ending:
            return end - max(map(len, ending)), end
    return None


def held_back(text: str, stops: list[str]) -> int:
    """Length of the longest tail of `text` that begins some stop string (and is not one)."""
    return max((n for s in stops for n in range(1, len(s)) if text.endswith(s[:n])), default=0)


@settings(max_examples=300, deadline=None)
@given(stops=st.lists(st.text("abc", min_size=1, max_size=5), min_size=1, max_size=6),
       text=st.text("abcd", max_size=40), cuts=st.lists(st.integers(0, 40), max_size=6))
def test_the_automaton_finds_what_a_scan_finds(stops: list[str], text: str, cuts: list[int]) -> None:
    matcher = StopMatcher(tuple(stops))
    want = brute_force(text, stops)
    state, fed, found = 0, 0, None
    for cut in [*sorted(cuts), len(text)]:
        chunk = text[fed:max(fed, cut)]
        state, end = matcher.feed(state, chunk)
        if end >= 0:
            found = (fed + end - matcher.match[state], fed + end)
            break
        fed += len(chunk)
        assert matcher.depth[state] == held_back(text[:fed], stops)
    assert found == want


def test_overlapping_stops_cut_at_the_first_completed() -> None:
    matcher = StopMatcher(("abcd", "bc", "xyz"))
    state, end = matcher.feed(0, "zzabcd")
    assert (end, matcher.match[state]) == (5, 2)  # "bc" completes before "abcd"


def test_stop_lists_are_bounded_with_errors_naming_the_limit() -> None:
    SamplingParams(stop=["x" * MAX_STOP_STRING_CHARS] * MAX_STOP_STRINGS)  # at the limits: fine
    with pytest.raises(InvalidRequestError, match=f"at most {MAX_STOP_STRINGS} stop strings") as info:
        SamplingParams(stop=["s"] * (MAX_STOP_STRINGS + 1))
    assert info.value.field == "stop"
    with pytest.raises(InvalidRequestError, match=f"at most {MAX_STOP_STRING_CHARS} characters"):
        SamplingParams(stop=["y" * (MAX_STOP_STRING_CHARS + 1)])


def test_the_largest_stop_list_costs_one_pass_per_character() -> None:
    """The hostile case of the issue (many long stops that share prefixes with the text): the
    automaton visits each character a bounded number of times (counted, not timed)."""
    rng = random.Random(0)
    stops = tuple("a" * (MAX_STOP_STRING_CHARS - 1) + rng.choice("bc") + str(i) for i in range(MAX_STOP_STRINGS))
    matcher = StopMatcher(stops)
    text = "a" * 100_000
    transitions = 0
    goto, fail = matcher.goto, matcher.fail

    state = 0
    for ch in text:  # the loop of StopMatcher.feed, counting failure steps
        while state and ch not in goto[state]:
            state = fail[state]
            transitions += 1
        state = goto[state].get(ch, 0)
        transitions += 1
    assert transitions <= 2 * len(text)
    assert matcher.feed(0, text) == (state, -1)
    assert matcher.depth[state] == MAX_STOP_STRING_CHARS - 1  # that much is held back
