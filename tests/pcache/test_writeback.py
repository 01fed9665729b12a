"""Write-back in isolation (a local directory as the backing store): commit order, superseded
writes, capacity pinning, abandoned sessions, resume from the journal, permanent and transient
upload failures, renames and unlinks of pending writes, and a prompt close."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest

from objstore import open_store
from objstore.errors import AccessDenied, TransientError
from pcache.blockstore import BlockStore, CacheDir, NoSpace
from pcache.writeback import UploadFailed, WriteBack, WriteError

MiB = 1 << 20


def make(tmp_path: Path, capacity: int = 64 * MiB) -> tuple[BlockStore, WriteBack, Path]:
    backing = tmp_path / "backing"
    backing.mkdir(exist_ok=True)
    blocks = BlockStore([CacheDir(tmp_path / "disk", capacity)], tmp_path / "index", block_size=MiB)
    store = open_store(str(backing))
    wb = WriteBack(blocks, {"data": store}, tmp_path / "state", part_size=5 * MiB)
    return blocks, wb, backing


def test_commit_uploads_and_releases_capacity(tmp_path: Path) -> None:
    blocks, wb, backing = make(tmp_path)
    wb.start()
    session = wb.open("data", "dir/a.bin")
    data = os.urandom(12 * MiB + 3)  # multipart: 3 parts of 5 MiB
    session.write(0, data[: 6 * MiB])
    session.write(6 * MiB, data[6 * MiB :])
    assert blocks.stats()["bytes_dirty"] >= len(data)
    record = wb.commit(session)
    assert wb.pending("data", "dir/a.bin") == record or wb.pending("data", "dir/a.bin") is None
    assert wb.wait_durable("data", "dir/a.bin", timeout=30)
    assert (backing / "dir/a.bin").read_bytes() == data
    assert blocks.stats()["bytes_dirty"] == 0 and blocks.stats()["bytes_reserved"] == 0
    assert wb.uploaded_as(record.version) is not None
    wb.close()
    blocks.close()


def test_last_commit_wins(tmp_path: Path) -> None:
    blocks, wb, backing = make(tmp_path)
    wb.start()
    for i in range(5):
        session = wb.open("data", "k.txt")
        session.write(0, f"version {i}".encode())
        wb.commit(session)
    assert wb.wait_durable("data", "k.txt", timeout=30)
    assert (backing / "k.txt").read_bytes() == b"version 4"
    wb.close()
    blocks.close()


def test_staging_counts_against_capacity(tmp_path: Path) -> None:
    blocks, wb, _ = make(tmp_path, capacity=4 * MiB)
    session = wb.open("data", "big.bin")
    session.write(0, os.urandom(3 * MiB))
    with pytest.raises(NoSpace):
        session.write(3 * MiB, os.urandom(2 * MiB))
    wb.abort(session)
    assert blocks.stats()["bytes_reserved"] == 0
    with pytest.raises(WriteError):
        wb.session(session.id)
    wb.close()
    blocks.close()


def test_idle_sessions_are_reaped(tmp_path: Path) -> None:
    blocks, wb, _ = make(tmp_path)
    session = wb.open("data", "abandoned.bin")
    session.write(0, b"x" * 1000)
    session.last_used = time.monotonic() - 7200
    fresh = wb.open("data", "active.bin")
    assert wb.reap_idle(3600) == 1
    assert not session.path.exists()
    assert wb.session(fresh.id) is fresh
    wb.close()
    blocks.close()


def test_resume_from_journal(tmp_path: Path) -> None:
    blocks, wb, backing = make(tmp_path)
    # no start(): the uploader never runs, as if the worker died right after the commits
    records = []
    for key in ("x.bin", "y.bin"):
        session = wb.open("data", key)
        session.write(0, key.encode() * 1000)
        records.append(wb.commit(session))
    orphan = wb.open("data", "uncommitted.bin")
    orphan.write(0, b"lost on purpose")
    wb._env.close()  # crash: no orderly close
    blocks.close()
    blocks2, wb2, _ = make(tmp_path)
    assert wb2.start() == 2
    assert wb2.wait_durable("data", "x.bin", timeout=30)
    assert wb2.wait_durable("data", "y.bin", timeout=30)
    assert (backing / "x.bin").read_bytes() == b"x.bin" * 1000
    assert not orphan.path.exists()  # an uncommitted write is not resurrected
    assert not (backing / "uncommitted.bin").exists()
    wb2.close()
    blocks2.close()


class RefusingStore:
    """A backing store that refuses (or fails transiently on) keys containing a marker."""

    def __init__(self, inner: Any, *, refuse: str = "", transient: str = "") -> None:
        self.inner = inner
        self.refuse = refuse
        self.transient = transient
        self.puts: list[str] = []

    def _check(self, key: str) -> None:
        if self.refuse and self.refuse in key:
            raise AccessDenied(f"refused {key}")
        if self.transient and self.transient in key:
            raise TransientError(f"busy {key}")

    def put(self, key: str, data: Any, *, metadata: Any = None) -> Any:
        self._check(key)
        self.puts.append(key)
        return self.inner.put(key, data, metadata=metadata)

    def delete(self, key: str) -> None:
        self._check(key)
        self.inner.delete(key)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def make_with(tmp_path: Path, store: Any) -> tuple[BlockStore, WriteBack]:
    blocks = BlockStore([CacheDir(tmp_path / "disk", 64 * MiB)], tmp_path / "index", block_size=MiB)
    return blocks, WriteBack(blocks, {"data": store}, tmp_path / "state", part_size=5 * MiB)


def commit_bytes(wb: WriteBack, key: str, data: bytes, **kwargs: Any) -> Any:
    staged = wb.open("data", key)
    staged.write(0, data)
    return wb.commit(staged, **kwargs)


def test_a_permanent_refusal_is_kept_not_retried_and_holds_up_nothing(tmp_path: Path) -> None:
    backing = tmp_path / "backing"
    backing.mkdir()
    store = RefusingStore(open_store(str(backing)), refuse="bad")
    blocks, wb = make_with(tmp_path, store)
    wb.start()
    for i in range(8):  # twice the upload slots
        commit_bytes(wb, f"bad-{i}", b"x")
    commit_bytes(wb, "good", b"fine")
    assert wb.wait_durable("data", "good", timeout=10)
    assert (backing / "good").read_bytes() == b"fine"
    started = time.monotonic()
    with pytest.raises(UploadFailed, match="refused"):
        wb.wait_durable("data", "bad-0", timeout=10)
    assert time.monotonic() - started < 5
    assert store.puts.count("bad-0") == 0  # refused before the inner put, and never again
    backlog = wb.backlog()
    assert backlog["failed_permanently"] == 8 and "data/bad-3" in backlog["failures"]
    assert wb.discard("data", "bad-3") is not None and wb.pending("data", "bad-3") is None
    store.refuse = ""
    assert wb.retry("data", "bad-4")
    assert wb.wait_durable("data", "bad-4", timeout=10)
    wb.close()
    blocks.close()


def test_transient_failures_are_retried_without_holding_a_slot(tmp_path: Path) -> None:
    backing = tmp_path / "backing"
    backing.mkdir()
    store = RefusingStore(open_store(str(backing)), transient="busy")
    blocks, wb = make_with(tmp_path, store)
    wb._concurrency = 1  # one slot: a retrying object must not sit in it
    wb.start()
    commit_bytes(wb, "busy-1", b"later")
    commit_bytes(wb, "other", b"now")
    assert wb.wait_durable("data", "other", timeout=10)
    assert not wb.wait_durable("data", "busy-1", timeout=0.5)
    record = wb.pending("data", "busy-1")
    assert record is not None and "busy" in record.error and not record.permanent
    store.transient = ""
    assert wb.wait_durable("data", "busy-1", timeout=30)
    wb.close()
    blocks.close()


def test_rename_of_a_pending_write_rekeys_it_and_the_old_name_gets_a_tombstone(
    tmp_path: Path,
) -> None:
    backing = tmp_path / "backing"
    backing.mkdir()
    (backing / "old.bin").write_bytes(b"an older version in the store")
    store = RefusingStore(open_store(str(backing)))
    blocks, wb = make_with(tmp_path, store)
    commit_bytes(wb, "old.bin", b"new content", metadata={"mode": "33188"})
    assert wb.rename("data", "old.bin", "new.bin")
    assert wb.pending("data", "old.bin").delete  # type: ignore[union-attr]
    moved = wb.pending("data", "new.bin")
    assert moved is not None and moved.metadata == {"mode": "33188"}
    assert not wb.rename("data", "absent", "x")  # nothing pending: the caller copies
    wb.start()
    assert wb.wait_durable("data", "new.bin", timeout=10)
    assert wb.wait_durable("data", "old.bin", timeout=10)
    assert (backing / "new.bin").read_bytes() == b"new content"
    assert not (backing / "old.bin").exists()
    assert store.puts == ["new.bin"]  # nothing was ever uploaded under the old name
    wb.close()
    blocks.close()


def test_rename_of_a_stored_object_is_journalled_and_copied_in_the_store(tmp_path: Path) -> None:
    """A rename of an object already in the store costs one journal transaction: the new name
    reads the old object's bytes at once, and survives a crash before the copy is made."""
    blocks, wb, backing = make(tmp_path)
    store = open_store(str(backing))
    data = os.urandom(3 * MiB + 5)
    info = store.put("dir/stored.bin", data, metadata={"mode": "33261"})
    moved = wb.move_stored(
        "data", "dir/stored.bin", "dir/renamed.bin", store.stat("dir/stored.bin")
    )
    assert not (backing / "dir/renamed.bin").exists()  # journalled: no copy of the bytes yet
    assert moved.moved and moved.size == len(data) and moved.metadata == {"mode": "33261"}
    assert wb.pending("data", "dir/stored.bin").delete  # type: ignore[union-attr]
    assert wb.read(moved, MiB - 2, 10) == data[MiB - 2 : MiB + 8]  # from the old object
    wb._env.close()  # a crash before the uploader ran
    blocks.close()
    blocks, wb, _ = make(tmp_path)
    assert wb.start() == 2
    assert wb.wait_durable("data", "dir/renamed.bin", timeout=30)
    assert wb.wait_durable("data", "dir/stored.bin", timeout=30)
    assert (backing / "dir/renamed.bin").read_bytes() == data
    assert store.stat("dir/renamed.bin").metadata == {"mode": "33261"}
    assert not (backing / "dir/stored.bin").exists()  # deleted only after the copy landed
    assert info.etag  # the version the rename was of
    wb.close()
    blocks.close()


def test_rename_of_a_stored_object_replaced_before_the_copy_fails_for_good(
    tmp_path: Path,
) -> None:
    blocks, wb, backing = make(tmp_path)
    store = open_store(str(backing))
    store.put("src.bin", b"the version renamed")
    wb.move_stored("data", "src.bin", "dst.bin", store.stat("src.bin"))
    time.sleep(0.01)
    store.put("src.bin", b"another writer's, put behind our back")
    wb.start()
    with pytest.raises(UploadFailed, match=r"renamed from 'src\.bin'"):
        wb.wait_durable("data", "dst.bin", timeout=10)
    assert not (backing / "dst.bin").exists()  # never the other version under the new name
    assert wb.backlog()["failed_permanently"] == 1
    assert (backing / "src.bin").read_bytes() == b"another writer's, put behind our back"
    wb.close()
    blocks.close()


def test_commits_of_an_open_file_and_a_detached_writer(tmp_path: Path) -> None:
    backing = tmp_path / "backing"
    backing.mkdir()
    blocks, wb = make_with(tmp_path, open_store(str(backing)))
    staged = wb.open("data", "grow.log")
    staged.write(0, b"one\n")
    wb.commit(staged, close=False)
    staged.write(4, b"two\n")
    record = wb.commit(staged, close=False)
    assert record.size == 8 and wb.session(staged.id) is staged
    wb.delete("data", "grow.log")  # unlinked while open: its next commit must not bring it back
    with pytest.raises(WriteError):
        wb.commit(staged)
    wb.abort(staged)
    wb.start()
    assert wb.wait_durable("data", "grow.log", timeout=10)
    assert not (backing / "grow.log").exists()
    assert blocks.stats()["bytes_reserved"] == 0  # the staging file went with its last user
    wb.close()
    blocks.close()


def test_close_does_not_wait_for_a_hung_store(tmp_path: Path) -> None:
    import threading

    release = threading.Event()

    class Hung(RefusingStore):
        def put(self, key: str, data: Any, *, metadata: Any = None) -> Any:
            release.wait(60)
            return super().put(key, data, metadata=metadata)

    backing = tmp_path / "backing"
    backing.mkdir()
    blocks, wb = make_with(tmp_path, Hung(open_store(str(backing))))
    wb.start()
    commit_bytes(wb, "stuck", b"x")
    time.sleep(0.2)
    started = time.monotonic()
    wb.close(grace_s=1.0)
    assert time.monotonic() - started < 3  # SIGTERM must stop the worker
    release.set()
    blocks.close()
    blocks2, wb2 = make_with(tmp_path, open_store(str(backing)))
    assert wb2.start() == 1  # still journalled: it resumes
    assert wb2.wait_durable("data", "stuck", timeout=10)
    wb2.close()
    blocks2.close()


def test_small_objects_are_journalled_with_their_bytes(tmp_path: Path) -> None:
    backing = tmp_path / "backing"
    backing.mkdir()
    blocks, wb = make_with(tmp_path, open_store(str(backing)))
    record = wb.commit_inline("data", "small.txt", b"tiny", {"mode": "33188"})
    assert record is not None and record.inline and not list((tmp_path / "disk").rglob("staging/*"))
    assert wb.read(record, 1, 2) == b"in"
    assert wb.commit_inline("data", "big", os.urandom(100 << 10)) is None  # too large: stage it
    assert wb.rename("data", "small.txt", "moved.txt")
    wb._env.close()  # a crash before any upload
    blocks.close()
    blocks2, wb2 = make_with(tmp_path, open_store(str(backing)))
    assert wb2.start() == 2  # the moved object and the old name's tombstone
    assert wb2.wait_durable("data", "moved.txt", timeout=10)
    assert (backing / "moved.txt").read_bytes() == b"tiny"
    assert not (backing / "small.txt").exists()
    assert wb2.wait_durable("data", "small.txt", timeout=10)
    deadline = time.monotonic() + 10
    while True:  # nothing is left behind in the journal (the bytes go right after the record)
        with wb2._env.begin() as txn:
            if txn.stat()["entries"] == 0:
                break
        assert time.monotonic() < deadline
        time.sleep(0.01)
    wb2.close()
    blocks2.close()


def test_uploads_wait_their_delay_and_an_fsync_goes_first(tmp_path: Path) -> None:
    """The upload queue by due time: hundreds of commits waiting out ``upload_delay`` hold
    nothing up; ``wait_durable`` (an fsync) of one of them uploads it at once (well within a
    timeout shorter than the delay), the others still wait; a rewritten key lands last
    version only."""
    backing = tmp_path / "backing"
    backing.mkdir()
    blocks = BlockStore([CacheDir(tmp_path / "disk", 64 * MiB)], tmp_path / "index", block_size=MiB)
    wb = WriteBack(blocks, {"data": open_store(str(backing))}, tmp_path / "state", upload_delay=60)
    wb.start()
    for i in range(300):
        wb.commit_inline("data", f"many/f{i:03d}", f"first {i}".encode())
    wb.commit_inline("data", "many/f007", b"rewritten")  # a new version: its own delay
    assert wb.wait_durable("data", "many/f150", timeout=20)  # not the 60 s delay: at once
    assert (backing / "many/f150").read_bytes() == b"first 150"
    assert not (backing / "many/f000").exists()  # the rest still wait out their delay
    for i in range(300):  # each asked for: each goes at once
        assert wb.wait_durable("data", f"many/f{i:03d}", timeout=20)
    assert (backing / "many/f007").read_bytes() == b"rewritten"
    assert (backing / "many/f299").read_bytes() == b"first 299"
    wb.close()
    blocks.close()
