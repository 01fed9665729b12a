"""Tests of babel_sync.listing: key arithmetic, and parallel listings of real stores (a local
directory, and S3 from ``rclone serve s3``) compared key by key with the serial listing."""

from __future__ import annotations

import collections
import random
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from babel_sync.listing import (
    ListingStats,
    ListTask,
    MemoryListingState,
    ParallelLister,
    key_between,
    list_serial,
)
from objstore import BucketNotFound, Config, ObjectInfo, Store, open_store
from tests.conftest import unique_bucket

pytestmark = pytest.mark.timeout(120)

# Orderings that trip up directory walks and naive splitting: '-' < '/' < '0' in byte order, so
# "a-b" < "a/b" < "a0"; non-ASCII keys sort by their UTF-8 bytes.
TRICKY = ["a-b", "a.b", "a/b", "a0", "ab", "z\u00ff", "\u00e9/x", "\u65e5\u672c/\u8a9e.txt",
          "\U0001f600/emoji", "\u00fc"]  # fmt: skip
NESTED = ["p005/sub/x", "p005/sub/y/z", "p006/deep/er/still/key"]


def tree_keys(prefixes: int, per_prefix: int, flat: int) -> list[str]:
    """A mixed tree: many small prefixes, one large flat one, top-level keys, tricky names."""
    keys = [f"p{p:03d}/k{k:03d}" for p in range(prefixes) for k in range(per_prefix)]
    keys += [f"flat/shard-{i:06d}.bin" for i in range(flat)]
    keys += ["top-1", "top-2", "zzz", *TRICKY, *NESTED]
    return keys


def list_parallel(
    store: Store, prefix: str = "", **kwargs: object
) -> tuple[list[str], ListingStats]:
    seen: list[str] = []
    lock = threading.Lock()

    def on_objects(objects: list[ObjectInfo]) -> None:
        assert objects == sorted(objects, key=lambda o: o.key)  # a batch is one page, in order
        with lock:
            seen.extend(o.key for o in objects)

    stats = ParallelLister(store, on_objects=on_objects, **kwargs).run(prefix)  # type: ignore[arg-type]
    return seen, stats


def assert_exact(got: list[str], expected: list[str]) -> None:
    counts = collections.Counter(got)
    duplicated = sorted(k for k, n in counts.items() if n > 1)
    missing = sorted(set(expected) - set(counts))
    extra = sorted(set(counts) - set(expected))
    assert not duplicated and not missing and not extra, (duplicated[:5], missing[:5], extra[:5])


# -- key_between ----------------------------------------------------------------------------------


def _random_key(rng: random.Random, alphabet: str, max_len: int = 8) -> str:
    return "".join(rng.choice(alphabet) for _ in range(rng.randint(0, max_len)))


_UNICODE = "".join(map(chr, [0x01, 0x1F, 0x20, 0x2F, 0x30, 0x7E, 0x7F, 0x80, 0xE9, 0x7FF, 0x800,
                             0xD7FF, 0xE000, 0xFFFD, 0xFFFF, 0x10000, 0x1F600, 0x10FFFF]))  # fmt: skip


def _pairs(rng: random.Random) -> Iterator[tuple[str, str | None]]:
    for _ in range(2000):
        yield _random_key(rng, "ab/-0"), _random_key(rng, "ab/-0")  # ASCII, many collisions
        yield _random_key(rng, _UNICODE), _random_key(rng, _UNICODE)  # edges of UTF-8 widths
        lo = _random_key(rng, _UNICODE)
        yield lo, lo + _random_key(rng, _UNICODE, 3)  # prefixes of each other
        yield lo + _random_key(rng, _UNICODE, 3), lo
        n = rng.randint(1, 6)
        yield _random_key(rng, "xyz", n).ljust(n, "x"), _random_key(rng, "xyz", n).ljust(n, "x")
        yield _random_key(rng, _UNICODE), None


def test_key_between_is_strictly_between_in_byte_order() -> None:
    rng = random.Random(20240601)
    checked = 0
    for a, b in _pairs(rng):
        lo, hi = (a, b) if b is None or a <= b else (b, a)
        mid = key_between(lo, hi)
        if hi is not None and lo == hi:
            assert mid is None
            continue
        if mid is None:
            # The only gap without a NUL-free key: hi is lo's immediate NUL-free successor.
            assert hi == lo + "\x01", (lo, hi)
            continue
        assert lo < mid and (hi is None or mid < hi), (lo, mid, hi)
        # The order servers use is UTF-8 byte order: it must agree.
        raw = mid.encode("utf-8")  # also proves no surrogates
        assert lo.encode() < raw and (hi is None or raw < hi.encode())
        assert "\x00" not in mid
        checked += 1
    assert checked > 10000


def test_key_between_edges() -> None:
    assert key_between("a", "a") is None
    assert key_between("b", "a") is None
    assert key_between("a", "a\x01") is None  # only "a\x00..." lies between
    assert key_between("a", "a\x00") is None  # a split end "s\0" admits nothing above s
    assert key_between("", "\x01") is None
    assert key_between("a", "b") is not None and "a" < key_between("a", "b") < "b"  # type: ignore[operator]
    for lo, hi in [("\ud7ff", "\ue000"), ("\U0010ffff", None), ("a\U0010ffff", "b"), ("", None)]:
        mid = key_between(lo, hi)
        assert mid is not None and lo < mid and (hi is None or mid < hi)
        mid.encode("utf-8")
    # Printable when anything printable fits: servers echo StartAfter in XML.
    assert key_between("a", "c") == "b"
    assert key_between("", "a") >= " "  # type: ignore[operator]


# -- a local store --------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def local_tree(tmp_path_factory: pytest.TempPathFactory) -> tuple[Store, list[str]]:
    root = tmp_path_factory.mktemp("listing-tree")
    keys = tree_keys(200, 20, 3000)
    for key in keys:
        path = root / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(key.encode()[: len(key) % 7])  # a few sizes, for the byte counter
    return open_store(str(root)), keys


@pytest.mark.parametrize(
    ("workers", "page_size", "fanout_depth", "split_ways"),
    [
        (32, 100, 2, None),  # wide root level: listed flat, split by range
        (16, 1000, 2, None),  # narrow root level: one task per prefix (delimiter fan-out)
        (8, 100, 3, 3),  # delimited levels cut into ranges by key
        (24, 77, 0, None),  # no fan-out at all: one range, split and stolen
    ],
)
def test_local_parallel_equals_serial(
    local_tree: tuple[Store, list[str]],
    workers: int,
    page_size: int,
    fanout_depth: int,
    split_ways: int | None,
) -> None:
    store, keys = local_tree
    serial = [o.key for o in list_serial(store)]
    assert sorted(serial) == sorted(keys) and serial == sorted(serial)
    got, stats = list_parallel(
        store, workers=workers, page_size=page_size, fanout_depth=fanout_depth,
        split_ways=split_ways,
    )  # fmt: skip
    assert_exact(got, serial)
    assert stats.objects == len(keys)
    assert stats.bytes == sum(len(k.encode()[: len(k) % 7]) for k in keys)
    assert stats.tasks_pending == stats.tasks_running == 0
    assert stats.tasks_done >= 1 and stats.pages >= len(keys) // page_size


def test_local_prefix_listing(local_tree: tuple[Store, list[str]]) -> None:
    store, keys = local_tree
    for prefix in ["p005/", "a", "\u00e9", "flat/shard-0001", "nothing-here/"]:
        got, _ = list_parallel(store, prefix, workers=8, page_size=20)
        assert_exact(got, [k for k in keys if k.startswith(prefix)])


def test_flat_prefix_is_split_and_stolen(local_tree: tuple[Store, list[str]]) -> None:
    store, keys = local_tree
    got, stats = list_parallel(store, "flat/", workers=16, page_size=50)
    assert_exact(got, [k for k in keys if k.startswith("flat/")])
    assert stats.splits > 0 and stats.steals > 0, stats
    assert stats.tasks_done > 1


def test_fanout_only_never_cuts_ranges(local_tree: tuple[Store, list[str]]) -> None:
    """split_ranges=False (the benchmark baseline): a task per common prefix, even on the wide
    root level, and each listed start to end by one worker."""
    store, keys = local_tree
    got, stats = list_parallel(store, workers=16, page_size=50, split_ranges=False)
    assert_exact(got, keys)
    assert stats.splits == stats.steals == 0 and stats.overfetched == 0
    assert stats.tasks_done > 200 and stats.prefixes > 200  # p000/ ... p199/, flat/, ...
    # The same tree with cuts lists the wide root level flat, split by range.
    _, cut = list_parallel(store, workers=16, page_size=50)
    assert cut.splits > 0 and cut.tasks_done < stats.tasks_done


def test_stats_are_live(local_tree: tuple[Store, list[str]]) -> None:
    store, keys = local_tree
    snapshots: list[ListingStats] = []
    lister = ParallelLister(
        store, workers=8, page_size=100, on_objects=lambda objs: snapshots.append(lister.stats)
    )
    final = lister.run()
    objects = [s.objects for s in snapshots]
    assert len(snapshots) > 10 and max(objects) < len(keys) and final.objects == len(keys)
    assert any(s.tasks_running > 0 for s in snapshots) and final.elapsed_s > 0


class Abort(Exception):
    pass


@pytest.mark.parametrize(("how", "after"), [("stop", 1500), ("raise", 4000)])
def test_resume_from_saved_cursors(
    local_tree: tuple[Store, list[str]], how: str, after: int
) -> None:
    store, keys = local_tree
    state = MemoryListingState()
    first: list[str] = []
    lock = threading.Lock()

    def on_objects(objects: list[ObjectInfo]) -> None:
        with lock:
            first.extend(o.key for o in objects)
            if len(first) >= after:
                if how == "raise":
                    raise Abort
                lister.stop()

    lister = ParallelLister(store, workers=16, page_size=100, on_objects=on_objects, state=state)
    if how == "raise":
        with pytest.raises(Abort):
            lister.run()
    else:
        lister.run()
    assert state.pending(), "an interrupted listing leaves its unfinished ranges in the state"
    assert len(set(first)) < len(keys)

    second, _ = list_parallel(store, workers=16, page_size=100, state=state)
    assert set(first) | set(second) == set(keys)
    assert len(second) < len(keys), "a resumed listing must not start over"
    # Re-emitted keys: at most the pages in flight when the first run stopped.
    assert len(set(first) & set(second)) <= 16 * 100
    assert_exact(second, sorted(set(keys) - (set(first) - set(second))))
    assert not state.pending()


def test_resume_after_failing_on_a_page_with_subdirectories(
    local_tree: tuple[Store, list[str]],
) -> None:
    """The root page (top-level objects and 200+ subdirectories) fails in on_objects: the resumed
    listing must spawn each subdirectory once, not once from the state and once again."""
    store, keys = local_tree
    state = MemoryListingState()

    def fail(objects: list[ObjectInfo]) -> None:
        raise Abort

    lister = ParallelLister(store, workers=1, page_size=1000, on_objects=fail, state=state)
    with pytest.raises(Abort):
        lister.run()
    got, _ = list_parallel(store, workers=8, page_size=1000, state=state)
    assert_exact(got, keys)


def test_resume_tasks_from_a_journal(local_tree: tuple[Store, list[str]]) -> None:
    """A state holding hand-written ranges (as a journal would) resumes exactly those."""
    store, keys = local_tree
    state = MemoryListingState()
    state.save("a", ListTask("flat/", "flat/shard-000999.bin", "flat/shard-002000.bin"), "")
    state.save("b", ListTask("p1", "", None, True), "p150/")
    got, _ = list_parallel(store, workers=8, page_size=40, state=state)
    expected = [k for k in keys if "flat/shard-000999.bin" < k < "flat/shard-002000.bin"]
    expected += [
        k for k in keys if k.startswith("p1") and k > "p150/" and not k.startswith("p150/")
    ]
    assert_exact(got, expected)


def test_missing_local_root(tmp_path: Path) -> None:
    store = open_store(str(tmp_path / "missing"))
    with pytest.raises(BucketNotFound):
        list_parallel(store, workers=8)


# -- S3 (rclone serve s3) ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def s3_tree(rclone_s3) -> tuple[str, Config, list[str]]:
    bucket = unique_bucket("listing")
    rclone_s3.create_bucket(bucket)
    config = Config.from_mapping({"profiles": {"p": rclone_s3.profile()}}, env={})
    keys = tree_keys(40, 25, 900) + [f"data/{k}" for k in tree_keys(10, 5, 0)]
    store = open_store(f"s3://p@{bucket}/", config)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: store.put(k, k.encode()[: len(k) % 5]), keys))
    store.close()
    return bucket, config, keys


@pytest.mark.parametrize(
    ("workers", "page_size", "fanout_depth", "split_ways"),
    [(16, 50, 2, None), (16, 1000, 2, None), (12, 30, 0, None), (8, 45, 3, 3)],
)
def test_s3_parallel_equals_serial(
    s3_tree: tuple[str, Config, list[str]],
    workers: int,
    page_size: int,
    fanout_depth: int,
    split_ways: int | None,
) -> None:
    bucket, config, keys = s3_tree
    with open_store(f"s3://p@{bucket}/", config) as store:
        serial = [o.key for o in list_serial(store)]
        assert sorted(serial) == sorted(keys)
        got, stats = list_parallel(
            store, workers=workers, page_size=page_size, fanout_depth=fanout_depth,
            split_ways=split_ways,
        )  # fmt: skip
    assert_exact(got, serial)
    assert stats.objects == len(keys)


def test_s3_store_with_prefix(s3_tree: tuple[str, Config, list[str]]) -> None:
    bucket, config, keys = s3_tree
    inside = [k.removeprefix("data/") for k in keys if k.startswith("data/")]
    with open_store(f"s3://p@{bucket}/data/", config) as store:
        assert sorted(o.key for o in list_serial(store)) == sorted(inside)
        got, _ = list_parallel(store, workers=8, page_size=7)
        assert_exact(got, inside)
        got, stats = list_parallel(store, "p00", workers=8, page_size=3, fanout_depth=0)
        assert_exact(got, [k for k in inside if k.startswith("p00")])
    assert stats.splits + stats.steals > 0  # ranges cut under a URL prefix too


def test_s3_missing_bucket_fails_fast(rclone_s3) -> None:
    config = Config.from_mapping({"profiles": {"p": rclone_s3.profile()}}, env={})
    with open_store(f"s3://p@{unique_bucket('missing')}/", config) as store:
        start = time.monotonic()
        with pytest.raises(BucketNotFound):
            list_parallel(store, workers=32)
        assert time.monotonic() - start < 5
