"""Stat-ahead (pcache.statahead): which names a lookup asks ahead, and how long an answer holds."""

from __future__ import annotations

import time

from pcache.statahead import StatAhead


def test_a_lookup_of_a_listed_name_asks_it_and_the_next_ones_once() -> None:
    ahead: StatAhead[str] = StatAhead(valid_s=60, batch=3)
    ahead.listed("d", ["a", "b", "c", "d", "e"])
    assert ahead.batch_for("d/x") == []  # not listed: asked alone
    assert ahead.batch_for("other/a") == []
    assert ahead.batch_for("d/b") == ["d/b", "d/c", "d/d"]
    assert ahead.batch_for("d/c") == []  # asked already: not again
    assert ahead.batch_for("d/a") == ["d/a", "d/e"]  # what is left, in listing order
    assert ahead.batch_for("d/e") == []
    ahead.listed("", ["top", "zz"])  # the root: paths have no directory part
    assert ahead.batch_for("top") == ["top", "zz"]


def test_an_answer_is_used_once_within_its_window_and_a_local_change_drops_it() -> None:
    ahead: StatAhead[str] = StatAhead(valid_s=60)
    ahead.answered({"d/a": "A", "d/b": None, "d/c": "C"})
    assert ahead.take("d/a") == (True, "A")
    assert ahead.take("d/a") == (False, None)  # once: the kernel keeps it from there
    assert ahead.take("d/b") == (True, None)  # "not there" is an answer too
    ahead.forget("d/c")
    assert ahead.take("d/c") == (False, None)
    late: StatAhead[str] = StatAhead(valid_s=0.01)
    late.answered({"d/a": "A"})
    time.sleep(0.02)
    assert late.take("d/a") == (False, None)  # older than the kernel may keep an entry


def test_the_names_remembered_are_bounded() -> None:
    ahead: StatAhead[str] = StatAhead(valid_s=60, batch=10, max_names=100)
    ahead.listed("one", [f"n{i:03d}" for i in range(60)])
    ahead.listed("two", [f"n{i:03d}" for i in range(60)])
    assert ahead.batch_for("one/n000") == []  # the oldest directory went
    assert ahead.batch_for("two/n000")[:2] == ["two/n000", "two/n001"]
    ahead.listed("huge", [f"n{i:04d}" for i in range(500)])  # alone past the bound
    assert ahead.batch_for("two/n020") == []
    assert ahead.batch_for("huge/n0000") == []  # its start went
    assert ahead.batch_for("huge/n0450") == [f"huge/n{i:04d}" for i in range(450, 460)]


def test_a_directory_listed_page_by_page_past_the_bound_keeps_its_latest_names() -> None:
    """A directory of a million names arrives a page at a time: each page cuts the oldest
    names (the cut shifts no positions, so a page costs its own size, not the bound's)."""
    ahead: StatAhead[str] = StatAhead(valid_s=60, batch=5, max_names=100)
    for page in range(30):
        ahead.listed("flat", [f"n{i:05d}" for i in range(page * 40, page * 40 + 40)])
    assert ahead.batch_for("flat/n01099") == []  # cut
    assert ahead.batch_for("flat/n01100") == [f"flat/n{i:05d}" for i in range(1100, 1105)]
    assert ahead.batch_for("flat/n01102") == []  # asked already
    assert ahead.batch_for("flat/n01195") == [f"flat/n{i:05d}" for i in range(1195, 1200)]
    ahead.listed("flat", [f"n{i:05d}" for i in range(1200, 1210)])  # one more page: a cut
    assert ahead.batch_for("flat/n01105") == []  # its turn to go
    assert ahead.batch_for("flat/n01205") == [f"flat/n{i:05d}" for i in range(1205, 1210)]


def test_sub_directories_are_asked_ahead_by_their_markers() -> None:
    """A listed sub-directory is named ``sub/`` (its marker object): a walk's ``getattr`` of
    one asks for the markers (and files) listed after it; a local change to the directory
    drops its marker's answer."""
    ahead: StatAhead[str] = StatAhead(valid_s=60, batch=3)
    ahead.listed("top", ["a/", "b/", "f", "c/"])
    assert ahead.batch_for("top/a/") == ["top/a/", "top/b/", "top/f"]
    assert ahead.batch_for("top/b/") == []  # asked already
    ahead.listed("", ["x/", "y/"])  # at the root
    assert ahead.batch_for("x/") == ["x/", "y/"]
    ahead.answered({"top/c/": None, "top/a/": "marker of a"})
    ahead.forget("top/a")  # chmod of the directory here
    assert ahead.take("top/a/") == (False, None)
    assert ahead.take("top/c/") == (True, None)  # no marker: an answer too
