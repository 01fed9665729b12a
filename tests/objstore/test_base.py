"""The value types every backend shares."""

from __future__ import annotations

import dataclasses

import pytest

from objstore.base import ObjectInfo


def test_listed_builds_the_same_object_info_as_the_constructor() -> None:
    fast = ObjectInfo.listed("a/b.bin", 123, 1700000000.5, "e1")
    slow = ObjectInfo("a/b.bin", 123, 1700000000.5, "e1")
    assert fast == slow and repr(fast) == repr(slow) and hash(fast.key) == hash(slow.key)
    assert fast.version == "e1" and fast.checksum is None and fast.metadata == {}
    assert ObjectInfo.listed("k", 1, 2.0).version == "2.000000-1"  # no ETag: mtime + size
    with pytest.raises(dataclasses.FrozenInstanceError):
        fast.size = 4  # type: ignore[misc]
    assert fast.metadata is not ObjectInfo.listed("x", 0, 0.0).metadata  # never shared
    assert dataclasses.replace(fast, size=7).size == 7
