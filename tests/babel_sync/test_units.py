"""The engine's pure parts: the merge-join plan and its compare ladder, filters, part sizing
within provider limits, and the throttles."""

from __future__ import annotations

import threading

import pytest

from babel_sync import throttle
from babel_sync.filters import KeyFilter
from babel_sync.plan import Action, compare_listed, plan, resolve_check
from babel_sync.transfer import MiB, TransferOptions, choose_part_size
from objstore import ChecksumValue, ObjectInfo, open_store

pytestmark = pytest.mark.timeout(30)
MD5_A, MD5_B = "0" * 31 + "a", "0" * 31 + "b"


def obj(key: str, size: int = 10, mtime: float = 100.0, etag: str = "x-1", **kw) -> ObjectInfo:
    return ObjectInfo(key, size, mtime, etag, **kw)


def test_plan_merge_join_in_byte_order() -> None:
    src = [obj("a"), obj("a-b"), obj("a/b"), obj("z\u00ff")]
    dst = [obj("a", size=11), obj("a/b", etag=MD5_A), obj("b"), obj("z\u00ff")]
    items = list(plan(src, dst, delete=True))
    assert [(i.action, i.key) for i in items] == [
        (Action.COPY, "a"),
        (Action.COPY, "a-b"),
        (Action.CHECK, "a/b"),
        (Action.DELETE, "b"),
        (Action.CHECK, "z\u00ff"),
    ]
    assert [i.action for i in plan(src, dst)].count(Action.DELETE) == 0  # no --delete


def test_compare_ladder_from_listings() -> None:
    assert compare_listed(obj("k", 1), obj("k", 2), "checksum") == (Action.COPY, "size differs")
    assert compare_listed(obj("k"), obj("k"), "size")[0] is Action.SKIP
    assert (
        compare_listed(obj("k", etag=MD5_A), obj("k", etag=MD5_A.upper()), "checksum")[0]
        is Action.SKIP
    )
    assert compare_listed(obj("k", etag=MD5_A), obj("k", etag=MD5_B), "checksum")[0] is Action.COPY
    # multipart ETags are never compared across providers: needs a checksum check
    assert (
        compare_listed(obj("k", etag="abc-3"), obj("k", etag="abc-3"), "checksum")[0]
        is Action.CHECK
    )


def test_resolve_check_ladder() -> None:
    nvme = lambda v: ChecksumValue("crc64nvme", v)  # noqa: E731
    xz = ChecksumValue("crc64xz", 5)
    same_native = resolve_check(obj("k", checksum=nvme(1)), obj("k", checksum=nvme(1), mtime=0))
    assert same_native == (False, "native crc64nvme matches")
    assert (
        resolve_check(obj("k", checksum=nvme(1)), obj("k", checksum=nvme(2), mtime=999))[0] is True
    )
    # different native algorithms (S3 vs OSS): our stored CRC decides
    stored = resolve_check(
        obj("k", checksum=nvme(7)), obj("k", checksum=xz, metadata={"babel-crc64nvme": "7"})
    )
    assert stored == (False, "crc64nvme matches")
    changed = resolve_check(
        obj("k", checksum=nvme(8)), obj("k", checksum=xz, metadata={"babel-crc64nvme": "7"})
    )
    assert changed[0] is True
    # nothing comparable: mtime
    assert resolve_check(obj("k", mtime=10), obj("k", mtime=20))[0] is False
    assert resolve_check(obj("k", mtime=30), obj("k", mtime=20))[0] is True


def test_filters_first_match_wins() -> None:
    f = KeyFilter.from_args(["*.bin", "logs/"], ["tmp/**"])
    assert f("a.bin") and f("deep/dir/a.bin") and f("logs/x/y.txt")
    assert not f("tmp/a.bin") and not f("a.txt")
    anchored = KeyFilter.from_args(None, ["/top.txt", "*.tmp"])
    assert (
        not anchored("top.txt")
        and anchored("sub/top.txt")
        and not anchored("x/y.tmp")
        and anchored("ok")
    )
    assert not KeyFilter() and KeyFilter()("anything")


def test_part_size_within_provider_limits(tmp_path) -> None:
    s3ish = open_store(str(tmp_path))  # local limits: 1 byte minimum, 10,000 parts
    opts = TransferOptions()
    assert choose_part_size(100 * MiB, s3ish, opts, None) == 16 * MiB
    huge = 5 * 1024**4  # 5 TiB: needs >= 524 MiB parts to stay within 10,000
    size = choose_part_size(huge, s3ish, opts, None)
    assert size * 10_000 >= huge and size <= s3ish.features.max_part_size
    fast = choose_part_size(100 * MiB, s3ish, opts, rate=50 * MiB)  # ~4 s per part at 50 MiB/s
    assert fast == 256 * MiB
    assert choose_part_size(100 * MiB, s3ish, TransferOptions(part_size=5 * MiB), None) == 5 * MiB


def test_bandwidth_limit_sleeps_for_the_excess(monkeypatch) -> None:
    clock = [1000.0]
    slept: list[float] = []
    monkeypatch.setattr(throttle.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(
        throttle.time, "sleep", lambda s: (slept.append(s), clock.__setitem__(0, clock[0] + s))
    )
    limit = throttle.Bandwidth(1_000_000)
    for _ in range(4):
        limit.consume(1_000_000)
    assert sum(slept) == pytest.approx(3.0, rel=0.01)  # the first second is the burst
    throttle.Bandwidth(None).consume(10**12)  # unlimited: never sleeps
    assert len(slept) == 3


def test_memory_budget_bounds_concurrent_bytes() -> None:
    budget = throttle.MemoryBudget(100)
    peak = [0]
    lock = threading.Lock()

    def use() -> None:
        budget.acquire(40)
        with lock:
            peak[0] = max(peak[0], budget.used)
        budget.release(40)

    threads = [threading.Thread(target=use) for _ in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert peak[0] <= 100 and budget.used == 0
    budget.acquire(500)  # larger than the whole budget: admitted alone, no deadlock
    budget.release(500)


def test_journal_records_a_multipart_start_durably(tmp_path) -> None:
    from babel_sync.journal import Journal

    with Journal(tmp_path / "j", {"job": 1}) as journal:
        assert not journal.multipart_started  # a job of small objects never looks for orphans
        journal.note_multipart()
        journal.note_multipart()
        assert journal.multipart_started
    with Journal(tmp_path / "j", {"job": 1}) as journal:
        assert journal.multipart_started  # a crash after CreateMultipartUpload still cleans up
