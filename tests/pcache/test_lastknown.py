"""The client's last-known answers: kept up to max_age, bounded, off at 0."""

from __future__ import annotations

from pcache.lastknown import LastKnown


class Clock:
    now = 0.0

    def __call__(self) -> float:
        return self.now


def test_answers_are_kept_up_to_their_age_and_bounded() -> None:
    clock = Clock()
    known = LastKnown(10.0, max_entries=2, max_pages=1, clock=clock)
    known.note("a", 1)
    known.note("b", 2)
    known.note("p1", "page one", page=True)
    known.note("p2", "page two", page=True)  # pages have their own, smaller bound
    assert known.get("a") == 1 and known.get("p1", page=True) is None
    assert known.get("p2", page=True) == "page two" and known.get("p2") is None
    known.get("a")  # used: "b" is now the oldest
    known.note("c", 3)
    assert known.get("b") is None and known.get("c") == 3
    clock.now = 10.5
    assert known.get("a") is None and known.answered == 4
    off = LastKnown(0.0)
    off.note("a", 1)
    assert off.get("a") is None
