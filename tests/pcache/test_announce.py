"""Announced write-back versions (close-to-open across nodes): the table's invariants, no
server (the mount tests check the whole path between two workers)."""

from __future__ import annotations

from objstore.base import ObjectInfo
from pcache.announce import MAX_ENTRIES, Announced


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def info(key: str, version: str, size: int = 3) -> ObjectInfo:
    return ObjectInfo(key, size, 1.0, etag=version)


def test_an_announcement_is_seen_until_its_upload_lands() -> None:
    table = Announced()
    assert table.note("ns", "a/x", "n1", "wb-s.1", info("a/x", "wb-s.1"))
    entry = table.get("ns", "a/x")
    assert entry is not None and entry.owner == "n1" and entry.info is not None
    assert entry.info.version == "wb-s.1"
    assert table.get("other", "a/x") is None
    assert not table.landed("ns", "a/x", "n2", "wb-s.1")  # another owner's version: not this
    assert table.landed("ns", "a/x", "n1", "wb-s.1")
    assert table.get("ns", "a/x") is None


def test_a_newer_announcement_survives_the_older_landing() -> None:
    table = Announced()
    table.note("ns", "k", "n1", "wb-s.1", info("k", "wb-s.1"))
    table.note("ns", "k", "n1", "wb-s.2", info("k", "wb-s.2"))
    assert not table.landed("ns", "k", "n1", "wb-s.1")
    entry = table.get("ns", "k")
    assert entry is not None and entry.version == "wb-s.2"


def test_an_announcement_overtaken_by_its_landing_is_ignored() -> None:
    table = Announced()
    table.landed("ns", "k", "n1", "wb-s.7")  # the invalidation arrived first
    assert not table.note("ns", "k", "n1", "wb-s.7", info("k", "wb-s.7"))
    assert table.get("ns", "k") is None
    assert table.note("ns", "k", "n2", "wb-s.7", info("k", "wb-s.7"))  # (owner, version)


def test_tombstones_expiry_prefixes_and_bounds() -> None:
    clock = Clock()
    table = Announced(ttl=10.0, clock=clock)
    table.note("ns", "d/gone", "n1", "wb-.3", None)
    table.note("ns", "d/kept", "n1", "wb-s.4", info("d/kept", "wb-s.4"))
    table.note("ns", "e/other", "n1", "wb-s.5", info("e/other", "wb-s.5"))
    gone = table.get("ns", "d/gone")
    assert gone is not None and gone.info is None  # deleted on its owner
    assert sorted(table.under("ns", "d/")) == ["d/gone", "d/kept"]
    assert table.forget_prefix("ns", "d/") == 2 and sorted(table.under("ns", "")) == ["e/other"]
    clock.now = 10.5  # the owner never uploaded (it died): the announcement lapses
    assert table.get("ns", "e/other") is None and table.under("ns", "") == {}
    for i in range(MAX_ENTRIES + 5):
        table.note("ns", f"k{i}", "n1", f"wb-s.{i}", info(f"k{i}", f"wb-s.{i}"))
    assert len(table) == MAX_ENTRIES and table.get("ns", "k0") is None
