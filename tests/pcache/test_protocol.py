"""The worker protocol's request and answer types: each survives its own JSON and refuses a
malformed one with ``ValueError`` (a 400 at the worker, never a ``KeyError`` in a handler)."""

from __future__ import annotations

from typing import Any

import pytest

from objstore.base import ObjectInfo
from pcache.protocol import CopySource, Progress, Resolved

FILE = ObjectInfo("d/f", 4, 1.5, "etag-1", metadata={"mode": "0100644"})


@pytest.mark.parametrize(
    "value",
    [
        Progress(10, ((0, 4),), 2),
        CopySource("src", "etag", ((0, 8), (16, 24))),
        Resolved(FILE, None, False, False),
        Resolved(None, ObjectInfo("d/", 0, 2.0, "m", metadata={"mode": "040755"}), True, True),
    ],
)
def test_round_trip(value: Any) -> None:
    assert type(value).from_json(value.to_json()) == value


def test_a_directory_is_a_marker_or_children() -> None:
    assert not Resolved(FILE, None, False, False).directory
    assert Resolved(None, None, True, False).directory
    assert Resolved(None, None, False, True).directory


@pytest.mark.parametrize(
    ("cls", "value"),
    [
        (Progress, []),
        (Progress, {"frontier": -1}),
        (Progress, {"frontier": 4, "dirty": [[3, 1]]}),
        (CopySource, {"key": "k", "etag": "", "ranges": []}),
        (CopySource, {"key": "k", "etag": "e", "ranges": [[5, 5]]}),
        (Resolved, {"file": None}),
        (Resolved, None),
        (Resolved, {"file": {"size": 1}, "marker": None, "has_marker": 0, "children": 0}),
    ],
)
def test_malformed_is_a_value_error(cls: Any, value: Any) -> None:
    with pytest.raises(ValueError):
        cls.from_json(value)
