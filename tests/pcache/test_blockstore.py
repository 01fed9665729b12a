"""The block store: verified reads, the hard capacity under concurrency, S3-FIFO's scan resistance,
restarts, corruption, hostile keys, and real disk faults (a full tmpfs, a read-only remount)."""

from __future__ import annotations

import errno
import os
import random
import re
import subprocess
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from pcache.blockindex import key_index_prefix, object_index_prefix
from pcache.blockstore import (
    HEADER_SIZE,
    BlockId,
    BlockStore,
    CacheDir,
    NoSpace,
    footprint,
)
from pcache.eviction import S3FIFO, GhostQueue, Node

pytestmark = pytest.mark.timeout(120)

KiB = 1 << 10
MiB = 1 << 20
BLOCK_NAME = re.compile(r"[0-9a-f]{40}\.blk")


def bid(i: int | str, *, key: str | None = None, version: str = "v1", ns: str = "ns") -> BlockId:
    return BlockId(ns, key if key is not None else f"obj-{i}", version, 0)


def payload(seed: object, length: int) -> bytes:
    return random.Random(str(seed)).randbytes(length)


def block_files(root: Path) -> list[Path]:
    return sorted(p for p in (root / "blocks").rglob("*") if p.is_file())


def disk_bytes(root: Path) -> int:
    return sum(os.stat(p).st_size for p in block_files(root))


@pytest.fixture
def open_store(tmp_path: Path) -> Iterator[Callable[..., BlockStore]]:
    """Opens stores over ``tmp_path/<name>`` dirs; closes whatever is still open at the end."""
    opened: list[BlockStore] = []

    def make(
        caps: dict[str, int] | None = None,
        *,
        block_size: int = 64 * KiB,
        dirs: list[CacheDir] | None = None,
        **kwargs: object,
    ) -> BlockStore:
        if dirs is None:
            caps = caps or {"a": 4 * MiB}
            dirs = [CacheDir(tmp_path / name, cap) for name, cap in caps.items()]
        kwargs.setdefault("check_invariants", True)
        store = BlockStore(dirs, tmp_path / "index", block_size=block_size, **kwargs)  # type: ignore[arg-type]
        opened.append(store)
        return store

    yield make
    for store in opened:
        store.close()


# --- basics ------------------------------------------------------------------------------


def test_put_get_roundtrip_and_stats(open_store: Callable[..., BlockStore]) -> None:
    store = open_store()
    data = payload(1, 50_000)
    assert store.get(bid(1)) is None
    store.put(bid(1), data)
    assert store.contains(bid(1))
    assert store.get(bid(1)) == data
    store.put(bid(1), data)  # idempotent
    stats = store.stats()
    assert stats["hits"] == 1 and stats["misses"] == 1 and stats["inserts"] == 1
    assert (
        stats["blocks"] == 1 and stats["bytes_used"] == footprint(len(data)) == HEADER_SIZE + 50_000
    )
    assert stats["bytes_reserved"] == 0
    (disk,) = store.disks()
    assert disk.used == footprint(len(data)) and disk.blocks == 1 and disk.healthy
    # Same key, other version or index: other blocks.
    assert store.get(BlockId("ns", "obj-1", "v2", 0)) is None
    assert store.get(BlockId("ns", "obj-1", "v1", 1)) is None
    with pytest.raises(ValueError, match="exceeds block_size"):
        store.put(bid(2), bytes(64 * KiB + 1))
    store.put(bid(3), b"")
    assert store.get(bid(3)) == b""
    store.check_invariants()


def test_put_accepts_memoryviews_and_durable(open_store: Callable[..., BlockStore]) -> None:
    store = open_store()
    data = bytearray(payload(2, 4096))
    store.put(bid(1), memoryview(data), durable=True)
    assert store.get(bid(1)) == bytes(data)
    import array

    arr = array.array("I", range(100))
    store.put(bid(2), memoryview(arr))
    assert store.get(bid(2)) == arr.tobytes()


def test_read_into(open_store: Callable[..., BlockStore]) -> None:
    store = open_store()
    data = payload(3, 10_000)
    store.put(bid(1), data)
    whole = bytearray(12_000)
    assert store.read_into(bid(1), memoryview(whole)) == 10_000
    assert bytes(whole[:10_000]) == data
    part = bytearray(100)
    assert store.read_into(bid(1), part, 9_950) == 50
    assert bytes(part[:50]) == data[9_950:]
    assert store.read_into(bid(1), part, 500) == 100 and bytes(part) == data[500:600]
    assert store.read_into(bid(1), part, 10_000) == 0
    assert store.read_into(bid(2), part) is None
    with pytest.raises(ValueError):
        store.read_into(bid(1), memoryview(bytes(10)))
    assert store.stats()["hits"] == 4


def test_block_ids_are_injective_and_prefix_ordered() -> None:
    a = BlockId("a", "b\x00c", "v", 0)
    b = BlockId("a\x00b", "c", "v", 0)
    c = BlockId("a", "b", "\x00c\x00v", 0)
    d = BlockId("a", "b\x01\x01c", "v", 0)
    keys = {x.index_key() for x in (a, b, c, d)}
    assert len(keys) == 4
    assert all(b"\x00\x00" not in k for k in keys)
    blocks = [BlockId("ns", "dir/file", "etag", i).index_key() for i in (0, 1, 2, 10, 100, 12345)]
    assert blocks == sorted(blocks)
    for k in blocks:
        assert k.startswith(object_index_prefix("ns", "dir/file"))
        assert k.startswith(object_index_prefix("ns", "dir/file", "etag"))
        assert k.startswith(key_index_prefix("ns", "dir/"))
        assert not k.startswith(object_index_prefix("ns", "dir/fil"))
    long_a = BlockId("ns", "x" * 2000 + "a", "v", 0).index_key()
    long_b = BlockId("ns", "x" * 2000 + "b", "v", 0).index_key()
    assert long_a != long_b and len(long_a) <= 511
    assert long_a.startswith(object_index_prefix("ns", "x" * 2000 + "a"))
    assert long_a.startswith(key_index_prefix("ns", "x" * 1000))
    with pytest.raises(ValueError):
        BlockId("ns", "k", "v", -1)
    with pytest.raises(ValueError):
        BlockId("ns" * 200, "k", "v" * 200, 0).index_key()


def test_hostile_keys_never_reach_paths(
    tmp_path: Path, open_store: Callable[..., BlockStore]
) -> None:
    outside_before = sorted(p.name for p in tmp_path.parent.iterdir())
    store = open_store({"a": 8 * MiB, "b": 8 * MiB})
    hostile = [
        ("ns", "../../../../etc/passwd"),
        ("ns", "/etc/passwd"),
        ("ns", "a\x00b"),
        ("ns", ".."),
        ("ns", ""),
        ("ns", "a/../../x/./y//z"),
        ("ns", "\udcff\udc80 surrogates"),
        ("ns", "ünïcödé/名前"),
        ("ns", "x" * 3000),
        ("..", "key"),
        ("/abs", "key"),
        ("../..", "../.."),
    ]
    for i, (ns, key) in enumerate(hostile):
        for version in ("v", "../v", "/v\x00"):
            store.put(BlockId(ns, key, version, i), payload((ns, key, version), 1000 + i))
    for i, (ns, key) in enumerate(hostile):
        for version in ("v", "../v", "/v\x00"):
            assert store.get(BlockId(ns, key, version, i)) == payload((ns, key, version), 1000 + i)
    assert store.stats()["blocks"] == 3 * len(hostile)
    for name in ("a", "b"):
        for path in (tmp_path / name).rglob("*"):
            rel = path.relative_to(tmp_path / name).parts
            if path.is_file():
                assert rel == (".pcache-dir-id",) or (
                    len(rel) == 3
                    and rel[0] == "blocks"
                    and re.fullmatch("[0-9a-f]{2}", rel[1])
                    and BLOCK_NAME.fullmatch(rel[2])
                    and rel[2].startswith(rel[1])
                ), path
            else:
                assert rel[0] in ("blocks", "tmp", "staging") and len(rel) <= 2, path
    assert sorted(p.name for p in tmp_path.parent.iterdir()) == outside_before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a", "b", "index"]
    assert store.drop_object("ns", "x" * 3000) == 3
    assert store.drop_prefix("ns", "a\x00") == 3
    assert store.get(BlockId("ns", "a\x00b", "v", 2)) is None
    assert store.get(BlockId("ns", "a/../../x/./y//z", "v", 5)) is not None


def test_blocks_spread_by_capacity(open_store: Callable[..., BlockStore]) -> None:
    store = open_store({"small": 20 * MiB, "big": 60 * MiB}, block_size=4 * KiB)
    for i in range(800):
        store.put(bid(i), b"x" * 100)
    small, big = store.disks()
    share = small.blocks / (small.blocks + big.blocks)
    assert 0.19 < share < 0.31, share
    # Placement is a function of the block id: a second store sees the same split.
    assert small.blocks + big.blocks == 800


def test_drop_drop_object_drop_prefix(open_store: Callable[..., BlockStore]) -> None:
    store = open_store(block_size=4 * KiB)
    for version in ("v1", "v2", "v3"):
        for i in range(3):
            store.put(BlockId("ns", "data/x", version, i), b"x")
    for key in ("data/y", "data/yy", "datay", "other/z"):
        store.put(BlockId("ns", key, "v", 0), b"y")
    store.put(BlockId("ns2", "data/x", "v1", 0), b"z")
    assert store.drop(BlockId("ns", "data/x", "v1", 0))
    assert not store.drop(BlockId("ns", "data/x", "v1", 0))
    assert store.drop_object("ns", "data/x", keep_version="v3") == 5
    assert [store.contains(BlockId("ns", "data/x", "v3", i)) for i in range(3)] == [True] * 3
    assert not store.contains(BlockId("ns", "data/x", "v2", 1))
    assert store.drop_prefix("ns", "data/y") == 2
    assert store.contains(BlockId("ns", "datay", "v", 0))
    assert store.drop_prefix("ns", "data/") == 3
    assert store.contains(BlockId("ns2", "data/x", "v1", 0))
    assert store.drop_prefix("ns", "") == 2
    assert store.stats()["blocks"] == 1
    assert len(block_files(store.disks()[0].path)) == 1
    store.check_invariants()


# --- corruption ---------------------------------------------------------------------------


def _only_file(store: BlockStore) -> Path:
    (path,) = block_files(store.disks()[0].path)
    return path


def _flip(offset: int) -> Callable[[Path], None]:
    def damage(path: Path) -> None:
        with open(path, "r+b") as f:
            f.seek(offset)
            byte = f.read(1)
            f.seek(offset)
            f.write(bytes([byte[0] ^ 0x40]))

    return damage


def _truncate(path: Path) -> None:
    os.truncate(path, os.path.getsize(path) - 1)


def _extend(path: Path) -> None:
    with open(path, "ab") as f:
        f.write(b"junk")


@pytest.mark.parametrize(
    "damage",
    [
        _flip(HEADER_SIZE + 1234),
        _flip(HEADER_SIZE + 9_999),
        _flip(40),  # inside the identity
        _flip(0),  # magic
        _truncate,
        lambda p: os.truncate(p, 100),
        _extend,
        os.unlink,
    ],
    ids=[
        "flip-data",
        "flip-last",
        "flip-identity",
        "flip-magic",
        "truncate",
        "truncate-header",
        "extend",
        "delete",
    ],
)
@pytest.mark.parametrize("reader", ["get", "read_into", "read_into_offset"])
def test_corruption_is_never_served(
    open_store: Callable[..., BlockStore], damage: Callable[[Path], None], reader: str
) -> None:
    store = open_store()
    data = payload(5, 10_000)
    store.put(bid(1), data)
    path = _only_file(store)
    damage(path)
    buf = bytearray(10_000)
    if reader == "get":
        assert store.get(bid(1)) is None
    elif reader == "read_into":
        assert store.read_into(bid(1), buf) is None
    else:
        # a partial read checks the chunks it covers: this one covers the damage
        assert store.read_into(bid(1), memoryview(buf)[: 10_000 - 5], 5) is None
    assert not store.contains(bid(1))
    assert not path.exists()
    stats = store.stats()
    assert stats["corrupt"] == 1 and stats["blocks"] == 0 and stats["bytes_used"] == 0
    assert store.get(bid(1)) is None and store.stats()["corrupt"] == 1
    store.put(bid(1), data)  # cached again afresh
    assert store.get(bid(1)) == data
    store.check_invariants()


def test_partial_reads_check_only_the_chunks_they_cover(
    open_store: Callable[..., BlockStore],
) -> None:
    from pcache.blockfile import chunk_size

    store = open_store(block_size=256 * KiB)
    data = payload(7, 256 * KiB)
    assert chunk_size(len(data)) == 4 * KiB
    store.put(bid(1), data)
    path = _only_file(store)
    _flip(HEADER_SIZE + 3 * 64 * KiB + 100)(path)  # damage in one chunk of the last quarter
    buf = bytearray(4096)
    assert store.read_into(bid(1), buf, 64 * KiB - 2048) == 4096  # spans two chunks
    assert bytes(buf) == data[64 * KiB - 2048 : 64 * KiB + 2048]
    assert store.contains(bid(1)) and store.stats()["corrupt"] == 0
    assert store.read_into(bid(1), buf, 3 * 64 * KiB) is None  # covers the damage: dropped
    assert not store.contains(bid(1)) and store.stats()["corrupt"] == 1
    store.put(bid(1), data)
    assert store.read_into(bid(1), buf, 3 * 64 * KiB) == 4096
    assert bytes(buf) == data[3 * 64 * KiB : 3 * 64 * KiB + 4096]
    assert store.read_into(bid(1), buf, 256 * KiB - 10) == 10  # the tail of the block


def test_chunk_size_keeps_the_table_in_the_header() -> None:
    from pcache.blockfile import chunk_crcs, chunk_size, pack_header

    assert chunk_size(4 * MiB) == 8 * KiB and chunk_size(1) == 4 * KiB
    assert chunk_size(64 * MiB) == 128 * KiB  # 512 chunks: the table fits the header
    header = pack_header(b"k", 0, 100_000, 1, chunk_crcs(payload(1, 100_000)))
    assert len(header) == HEADER_SIZE
    with pytest.raises(ValueError, match="chunk CRCs"):
        pack_header(b"k", 0, 100_000, 1, [1])


def test_another_blocks_file_is_never_served(open_store: Callable[..., BlockStore]) -> None:
    store = open_store()
    store.put(bid(1), payload(1, 1000))
    store.put(bid(2), payload(2, 1000))  # same length, different block
    first, second = block_files(store.disks()[0].path)
    first.write_bytes(second.read_bytes())
    results = [store.get(bid(1)), store.get(bid(2))]
    assert sorted(r is None for r in results) == [False, True]
    assert payload(1, 1000) in results or payload(2, 1000) in results
    assert store.stats()["corrupt"] == 1


# --- restart ------------------------------------------------------------------------------


def test_restart_serves_everything_without_refetch(
    tmp_path: Path, open_store: Callable[..., BlockStore]
) -> None:
    caps = {"a": 2 * MiB, "b": 3 * MiB}
    store = open_store(caps)
    blocks = {bid(i): payload(i, 1000 + 37 * i) for i in range(60)}
    for b, data in blocks.items():
        store.put(b, data)
    before = store.stats()
    disks_before = store.disks()
    store.close()
    leftover = tmp_path / "a" / "tmp" / "deadbeef.tmp"
    leftover.write_bytes(b"half a block")
    (tmp_path / "b" / "tmp" / "stray-dir").mkdir()

    store = open_store(caps)
    assert not leftover.exists() and list((tmp_path / "b" / "tmp").iterdir()) == []
    after = store.stats()
    assert (after["blocks"], after["bytes_used"]) == (before["blocks"], before["bytes_used"])
    assert [(d.used, d.blocks) for d in store.disks()] == [(d.used, d.blocks) for d in disks_before]
    assert all(store.get(b) == data for b, data in blocks.items())
    assert store.stats()["hits"] == len(blocks) and store.stats()["misses"] == 0
    # Every reloaded block starts in the main queue.
    for d in store._dirs:
        assert d.policy.small_bytes == 0 and d.policy.main_bytes == d.used
    store.check_invariants()


def test_open_reads_no_block_file(tmp_path: Path, open_store: Callable[..., BlockStore]) -> None:
    store = open_store(block_size=4 * KiB)
    for i in range(300):
        store.put(bid(i), b"x" * 100)
    store.close()
    for path in block_files(tmp_path / "a"):
        path.unlink()
    # The index alone rebuilds the accounting; the missing files surface only when read.
    store = open_store(block_size=4 * KiB)
    assert store.stats()["blocks"] == 300 and store.stats()["bytes_used"] == 300 * footprint(100)
    assert store.get(bid(7)) is None
    assert store.stats()["corrupt"] == 1 and store.stats()["blocks"] == 299


def test_restart_ignores_entries_of_missing_dirs(
    tmp_path: Path, open_store: Callable[..., BlockStore]
) -> None:
    store = open_store({"a": 4 * MiB, "b": 4 * MiB}, block_size=4 * KiB)
    blocks = {bid(i): payload(i, 500) for i in range(40)}
    for b, data in blocks.items():
        store.put(b, data)
    in_b = store.disks()[1].blocks
    assert 0 < in_b < 40
    store.close()

    store = open_store({"b": 4 * MiB}, block_size=4 * KiB)
    served = [b for b in blocks if store.get(b) is not None]
    assert len(served) == in_b and store.stats()["corrupt"] == 0
    store.close()

    # The directory comes back: so do its blocks (their entries were kept).
    store = open_store({"b": 4 * MiB, "a": 4 * MiB}, block_size=4 * KiB)
    assert all(store.get(b) == data for b, data in blocks.items())


def test_orphan_files_removed_only_when_asked(
    tmp_path: Path, open_store: Callable[..., BlockStore]
) -> None:
    store = open_store()
    store.put(bid(1), b"kept")
    store.close()
    orphan = tmp_path / "a" / "blocks" / "ab" / ("ab" + "0" * 38 + ".blk")
    orphan.write_bytes(b"an unindexed block")
    store = open_store()
    assert orphan.exists()
    store.close()
    store = open_store(scan_orphans=True)
    assert not orphan.exists()
    assert store.get(bid(1)) == b"kept"


def test_unreadable_index_starts_empty(
    tmp_path: Path, open_store: Callable[..., BlockStore]
) -> None:
    store = open_store()
    for i in range(5):
        store.put(bid(i), b"data")
    store.close()
    (tmp_path / "index" / "data.mdb").write_bytes(b"\xff" * 8192)
    store = open_store()
    assert store.stats()["blocks"] == 0 and all(store.get(bid(i)) is None for i in range(5))
    assert block_files(tmp_path / "a") == []  # the unindexed files went with it
    store.put(bid(1), b"new")
    assert store.get(bid(1)) == b"new"


def test_block_size_change_clears_the_cache(
    tmp_path: Path, open_store: Callable[..., BlockStore]
) -> None:
    store = open_store(block_size=8 * KiB)
    store.put(bid(1), b"data")
    store.close()
    store = open_store(block_size=16 * KiB)
    assert store.get(bid(1)) is None and block_files(tmp_path / "a") == []


def test_capacity_lowered_between_runs_evicts_down(open_store: Callable[..., BlockStore]) -> None:
    store = open_store({"a": 1 * MiB}, block_size=16 * KiB)
    for i in range(40):
        store.put(bid(i), bytes(16 * KiB))
    store.close()
    store = open_store({"a": 200 * KiB}, block_size=16 * KiB)
    (disk,) = store.disks()
    assert disk.used <= 200 * KiB and disk.blocks == (200 * KiB) // footprint(16 * KiB)
    assert disk_bytes(disk.path) == disk.used


# --- capacity, reservations, pins ---------------------------------------------------------


def test_reservations_count_against_capacity(open_store: Callable[..., BlockStore]) -> None:
    fp = footprint(16 * KiB)
    store = open_store({"a": 10 * fp}, block_size=16 * KiB)
    for i in range(10):
        store.put(bid(i), bytes(16 * KiB))
    with store.reserve(4 * fp) as res:  # evicts four blocks to make the room
        assert res.nbytes == 4 * fp and res.dir.path == store.disks()[0].path
        assert store.stats()["evictions"] == 4 and store.stats()["bytes_reserved"] == 4 * fp
        store.put(bid(100), bytes(16 * KiB), reservation=res)
        assert res.nbytes == 3 * fp and store.stats()["evictions"] == 4
        res.grow(2 * fp)
        assert res.nbytes == 5 * fp and store.stats()["evictions"] == 6
        with pytest.raises(NoSpace):
            res.grow(6 * fp)  # reservations are never evicted
        with pytest.raises(NoSpace):
            store.reserve(6 * fp)
    assert store.stats()["bytes_reserved"] == 0
    with pytest.raises(NoSpace) as info:
        store.reserve(10 * fp + 1)
    assert info.value.errno == errno.ENOSPC
    dirty = store.reserve(3 * fp, pinned=True)
    assert store.stats()["bytes_dirty"] == 3 * fp
    dirty.release()
    dirty.release()
    assert store.stats()["bytes_dirty"] == 0 and store.stats()["bytes_reserved"] == 0
    with pytest.raises(ValueError):
        dirty.grow(1)
    store.check_invariants()


def test_reserve_in_a_given_directory(
    tmp_path: Path, open_store: Callable[..., BlockStore]
) -> None:
    store = open_store({"a": 1 * MiB, "b": 1 * MiB})
    for _ in range(5):
        with store.reserve(1000, directory=tmp_path / "b" / ".") as res:
            assert res.dir.path == tmp_path / "b"
    with pytest.raises(FileNotFoundError):
        store.reserve(1000, directory=tmp_path / "c")
    with pytest.raises(NoSpace):
        store.reserve(2 * MiB, directory=tmp_path / "a")
    res = store.reserve(0, pinned=True)
    res.grow(100)
    assert store.stats()["bytes_dirty"] == 100
    res.release()


def test_put_with_short_reservation_grows_it(open_store: Callable[..., BlockStore]) -> None:
    store = open_store({"a": 1 * MiB, "b": 1 * MiB}, block_size=16 * KiB)
    with store.reserve(100, bid=bid(1)) as res:
        store.put(bid(1), bytes(16 * KiB), reservation=res)
        assert res.nbytes == 0
        assert store.stats()["bytes_reserved"] == 0
    assert store.get(bid(1)) == bytes(16 * KiB)


def test_pinned_blocks_are_never_evicted(open_store: Callable[..., BlockStore]) -> None:
    fp = footprint(16 * KiB)
    store = open_store({"a": 8 * fp}, block_size=16 * KiB)
    with store.pinned(bid(0)):
        store.put(bid(0), payload(0, 16 * KiB))
        for i in range(1, 50):
            store.put(bid(i), bytes(16 * KiB))
            assert store.contains(bid(0))
        assert store.get(bid(0)) == payload(0, 16 * KiB)
    # Everything pinned: nothing can be evicted, so the put fails cleanly.
    live = [b for b in (bid(i) for i in range(50)) if store.contains(b)]
    pins = [store.pinned(b) for b in live]
    for p in pins:
        p.__enter__()
    with pytest.raises(NoSpace):
        store.put(bid(999), bytes(16 * KiB))
    assert store.stats()["bytes_reserved"] == 0
    for p in pins:
        p.__exit__(None, None, None)
    store.put(bid(999), bytes(16 * KiB))
    assert store.stats()["pinned"] == 0
    store.check_invariants()


def test_concurrent_reserve_put_get_keep_the_hard_cap(
    tmp_path: Path, open_store: Callable[..., BlockStore]
) -> None:
    caps = {"a": 300 * KiB, "b": 500 * KiB}
    store = open_store(caps, block_size=16 * KiB)
    ids = [bid(i) for i in range(150)]
    lengths = {b: 1 + random.Random(b.key).randrange(16 * KiB) for b in ids}

    def data(b: BlockId) -> bytes:
        return payload(b.key, lengths[b])

    errors: list[BaseException] = []
    done = threading.Event()
    counts = {"nospace": 0, "ops": 0}
    count_lock = threading.Lock()

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(300):
                b = rng.choice(ids)
                op = rng.random()
                try:
                    if op < 0.35:
                        store.put(b, data(b))
                    elif op < 0.65:
                        got = store.get(b)
                        assert got is None or got == data(b)
                    elif op < 0.8:
                        res = store.reserve(rng.randint(1, 64 * KiB), pinned=rng.random() < 0.3)
                        with res:
                            if rng.random() < 0.5:
                                store.put(b, data(b), reservation=res)
                            buf = bytearray(lengths[b])
                            n = store.read_into(b, buf)
                            assert n is None or bytes(buf) == data(b)
                    elif op < 0.92:
                        with store.pinned(b):
                            got = store.get(b)
                            assert got is None or got == data(b)
                            if got is None:
                                store.put(b, data(b))
                    else:
                        store.drop(b)
                except NoSpace:
                    with count_lock:
                        counts["nospace"] += 1
                with count_lock:
                    counts["ops"] += 1
        except BaseException as exc:
            errors.append(exc)

    def monitor() -> None:
        try:
            while not done.is_set():
                store.check_invariants()
                for disk in store.disks():
                    assert disk.used + disk.reserved <= disk.capacity, disk
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(s,)) for s in range(8)]
    watcher = threading.Thread(target=monitor)
    watcher.start()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    done.set()
    watcher.join()
    assert not errors, errors
    assert counts["ops"] == 8 * 300
    store.check_invariants()
    stats = store.stats()
    assert stats["bytes_reserved"] == 0 and stats["bytes_dirty"] == 0 and stats["pinned"] == 0
    assert stats["evictions"] > 0 and stats["corrupt"] == 0
    for disk in store.disks():
        on_disk = disk_bytes(disk.path)
        assert on_disk == disk.used <= disk.capacity == caps[disk.path.name]
        assert list((disk.path / "tmp").iterdir()) == []
    assert sum(disk.used for disk in store.disks()) == stats["bytes_used"]


# --- eviction policy ----------------------------------------------------------------------


class TinyLRU:
    """The contrast: plain LRU over the same number of blocks."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.items: OrderedDict[BlockId, bytes] = OrderedDict()

    def get(self, b: BlockId) -> bytes | None:
        if b in self.items:
            self.items.move_to_end(b)
            return self.items[b]
        return None

    def put(self, b: BlockId, data: bytes) -> None:
        self.items[b] = data
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)


def _hot_hit_ratio(cache: BlockStore | TinyLRU) -> float:
    hot = [bid(f"hot{i}") for i in range(20)]
    cold = iter(bid(f"cold{i}") for i in range(10_000))

    def access(b: BlockId) -> bool:
        if cache.get(b) is not None:
            return True
        cache.put(b, b"d" * 512)
        return False

    for _ in range(3):  # warm the hot set
        for b in hot:
            access(b)
    hits = total = 0
    for _ in range(4):
        for _ in range(150):  # a one-time scan 1.5x the cache size
            access(next(cold))
        for b in hot:
            hits += access(b)
            total += 1
    return hits / total


def test_scan_resistance_vs_lru(open_store: Callable[..., BlockStore]) -> None:
    blocks = 100
    store = open_store({"a": blocks * footprint(512)}, block_size=4 * KiB)
    s3fifo = _hot_hit_ratio(store)
    lru = _hot_hit_ratio(TinyLRU(blocks))
    assert lru < 0.1, lru
    assert s3fifo > 0.9, s3fifo
    assert store.disks()[0].used <= blocks * footprint(512)


def test_s3fifo_ghost_readmits_to_main() -> None:
    ghost = GhostQueue(100)
    policy = S3FIFO(10, ghost)
    nodes = [Node(bytes([i]), 1) for i in range(10)]
    for n in nodes:
        policy.insert(n)
    victims = policy.evict(3, lambda k: False)
    assert [v.key for v in victims] == [bytes([0]), bytes([1]), bytes([2])]
    assert bytes([0]) in ghost
    again = Node(bytes([0]), 1)
    policy.insert(again)
    assert again.main and bytes([0]) not in ghost
    # Pinned entries rotate instead of going; when all are pinned nothing goes.
    assert policy.evict(100, lambda k: True) == []
    assert len(policy) == 8 and policy.nbytes == 8


def test_s3fifo_frequency_protects_main() -> None:
    policy = S3FIFO(100, GhostQueue(100))
    main = [Node(b"m%d" % i, 1) for i in range(5)]
    for n in main:
        policy.insert(n, to_main=True)
    policy.hit(main[0])
    policy.hit(main[0])
    victims = policy.evict(4, lambda k: False)
    assert main[0] not in victims and len(victims) == 4


# --- disk faults --------------------------------------------------------------------------


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A real 8 MiB tmpfs (needs root and mount permission)."""
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mnt)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip() or done.returncode}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_enospc_lowers_capacity_and_uses_the_other_dir(
    tmp_path: Path, tmpfs: Path, open_store: Callable[..., BlockStore]
) -> None:
    store = open_store(
        dirs=[CacheDir(tmpfs, 64 * MiB), CacheDir(tmp_path / "b", 64 * MiB)], block_size=MiB
    )
    blocks = {bid(i): payload(i, MiB) for i in range(40)}
    for b, data in blocks.items():
        store.put(b, data)
    full, other = store.disks()
    assert full.healthy and other.healthy
    assert full.effective_capacity < 8 * MiB < full.capacity
    assert store.stats()["disk_full"] >= 1 and store.stats()["disk_errors"] == 0
    assert full.blocks + other.blocks == 40 and full.blocks >= 1
    assert all(store.get(b) == data for b, data in blocks.items())
    assert disk_bytes(tmpfs) == full.used and disk_bytes(tmp_path / "b") == other.used
    assert list((tmpfs / "tmp").iterdir()) == []
    # It keeps working: more blocks go to the other dir (or evict within the lowered cap).
    for i in range(40, 50):
        store.put(bid(i), payload(i, MiB))
        assert store.get(bid(i)) == payload(i, MiB)
    store.check_invariants()
    store.close()


def test_read_only_remount_takes_the_dir_out_of_service(
    tmp_path: Path, tmpfs: Path, open_store: Callable[..., BlockStore]
) -> None:
    store = open_store(
        dirs=[CacheDir(tmpfs, 6 * MiB), CacheDir(tmp_path / "b", 6 * MiB)], block_size=64 * KiB
    )
    old = {bid(i): payload(i, 64 * KiB) for i in range(20)}
    for b, data in old.items():
        store.put(b, data)
    on_tmpfs, on_other = store.disks()[0].blocks, store.disks()[1].blocks
    assert on_tmpfs > 0 and on_other > 0
    done = subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], capture_output=True, text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot remount read-only: {done.stderr.strip()}")
    new = {bid(i): payload(i, 64 * KiB) for i in range(20, 60)}
    for b, data in new.items():
        store.put(b, data)  # the ones hashed to the read-only dir retry on the other
    broken, fine = store.disks()
    assert not broken.healthy and broken.reason and "Read-only" in broken.reason
    assert fine.healthy and fine.blocks == on_other + len(new)
    assert store.stats()["disk_errors"] >= 1
    served = [b for b, data in old.items() if store.get(b) == data]
    assert len(served) == on_other  # its blocks are ignored, the others still served
    assert all(store.get(b) == data for b, data in new.items())
    assert store.stats()["corrupt"] == 0
    store.check_invariants()
    store.close()


def test_unusable_dir_at_open(tmp_path: Path, open_store: Callable[..., BlockStore]) -> None:
    (tmp_path / "notadir").write_bytes(b"")
    store = open_store(dirs=[CacheDir(tmp_path / "notadir", MiB), CacheDir(tmp_path / "b", MiB)])
    bad, good = store.disks()
    assert not bad.healthy and bad.reason and good.healthy
    store.put(bid(1), b"x")
    assert store.get(bid(1)) == b"x" and store.disks()[1].blocks == 1
    store.close()
    store = open_store(dirs=[CacheDir(tmp_path / "notadir", MiB)])
    with pytest.raises(NoSpace):
        store.put(bid(1), b"x")


def test_closed_store_refuses_calls(open_store: Callable[..., BlockStore]) -> None:
    store = open_store()
    store.put(bid(1), b"x")
    store.close()
    store.close()
    with pytest.raises(ValueError, match="closed"):
        store.get(bid(1))
    with pytest.raises(ValueError, match="closed"):
        store.put(bid(2), b"x")
