"""Eager multipart uploads (pcache.eager) through the write-back, with a local directory as the
store: parts leave while the file is written, writes over uploaded parts and truncates are
never lost, a file larger than the cache is written by dropping uploaded parts, restarts reuse
the journalled parts, renames and unlinks leave no stray objects or uploads."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from objstore import open_store
from objstore.errors import NotSupported
from pcache.blockstore import BlockStore, CacheDir, NoSpace
from pcache.eager import EagerUpload
from pcache.fuse_files import punch_hole
from pcache.protocol import CopySource, Progress, UploadFailed, WriteError
from pcache.staging import StagedFile
from pcache.writeback import WriteBack

MiB = 1 << 20
PART = 5 * MiB


class CountingStore:
    """The local store, counting multipart calls (and able to hold parts back)."""

    def __init__(self, inner: Any, *, keep_first: bool = False) -> None:
        self.inner = inner
        self.keep_first = keep_first  # as rclone serve s3: a part number is never replaced
        self.parts: list[tuple[str, int]] = []
        self.completed: list[str] = []
        self.sent: set[tuple[str, int]] = set()
        self.gate = threading.Event()
        self.gate.set()

    def upload_part(self, key: str, upload_id: str, number: int, data: Any) -> Any:
        self.gate.wait(30)
        if self.keep_first and (upload_id, number) in self.sent:
            raise NotSupported(f"part {number} has already been streamed to the backend")
        self.sent.add((upload_id, number))
        self.parts.append((key, number))
        return self.inner.upload_part(key, upload_id, number, data)

    def complete_upload(self, key: str, upload_id: str, parts: Any) -> Any:
        self.completed.append(key)
        return self.inner.complete_upload(key, upload_id, parts)

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)


def make(
    tmp_path: Path, capacity: int = 256 * MiB, **kwargs: Any
) -> tuple[BlockStore, WriteBack, CountingStore, Path]:
    backing = tmp_path / "backing"
    backing.mkdir(exist_ok=True)
    store = CountingStore(open_store(str(backing)))
    blocks = BlockStore([CacheDir(tmp_path / "disk", capacity)], tmp_path / "index", block_size=MiB)
    wb = WriteBack(blocks, {"data": store}, tmp_path / "state", part_size=PART, **kwargs)
    return blocks, wb, store, backing


def wait_for(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)


def uploaded(staged: StagedFile) -> int:
    assert staged.eager is not None
    return staged.eager.uploaded_prefix()


def test_parts_leave_while_the_file_is_written(tmp_path: Path) -> None:
    blocks, wb, store, backing = make(tmp_path)
    wb.start()
    data = os.urandom(4 * PART + 123)
    staged = wb.open("data", "big.bin")
    for offset in range(0, len(data), MiB):
        staged.write(offset, data[offset : offset + MiB])
    wait_for(lambda: uploaded(staged) >= 4 * PART)  # every whole part, before any commit
    assert {n for _, n in store.parts} == {1, 2, 3, 4}
    wb.commit(staged, metadata={"mode": "0100640"})
    assert wb.wait_durable("data", "big.bin", timeout=30)
    assert (backing / "big.bin").read_bytes() == data
    assert sorted(n for _, n in store.parts) == [1, 2, 3, 4, 5]  # at commit: only the tail
    assert store.inner.stat("big.bin").metadata == {"mode": "0100640"}  # set after the upload
    assert store.inner.list_uploads() == []
    wb.close()
    blocks.close()


def test_small_files_never_start_an_upload(tmp_path: Path) -> None:
    blocks, wb, store, _backing = make(tmp_path)
    wb.start()
    staged = wb.open("data", "small.bin")
    staged.write(0, os.urandom(2 * PART - 1))
    time.sleep(0.2)
    assert staged.eager is not None and not staged.eager.started
    wb.commit(staged)
    assert wb.wait_durable("data", "small.bin", timeout=30)
    assert store.parts and store.inner.list_uploads() == []
    wb.close()
    blocks.close()


def test_writes_over_uploaded_parts_and_truncates_reach_the_object(tmp_path: Path) -> None:
    blocks, wb, _store, backing = make(tmp_path)
    wb.start()
    data = bytearray(os.urandom(5 * PART))
    staged = wb.open("data", "k.bin")
    staged.write(0, bytes(data))
    wait_for(lambda: uploaded(staged) >= 5 * PART)
    staged.write(PART + 7, b"overwritten")  # inside part 2, already uploaded
    data[PART + 7 : PART + 18] = b"overwritten"
    staged.truncate(3 * PART + 11)  # part 4 cut: it and the later ones are not reused
    del data[3 * PART + 11 :]
    staged.write(len(data), b"tail")
    data += b"tail"
    wb.commit(staged)
    assert wb.wait_durable("data", "k.bin", timeout=30)
    assert (backing / "k.bin").read_bytes() == bytes(data)
    wb.close()
    blocks.close()


def test_a_store_that_keeps_the_first_part_gets_the_upload_again(tmp_path: Path) -> None:
    """rclone serve s3 refuses a part number sent twice: a write over an uploaded part then
    costs a new upload, never a wrong object."""
    blocks, wb, store, backing = make(tmp_path)
    store.keep_first = True
    wb.start()
    data = bytearray(os.urandom(3 * PART))
    staged = wb.open("data", "header.bin")
    staged.write(0, bytes(data))
    wait_for(lambda: uploaded(staged) >= 3 * PART)
    staged.write(0, b"HEADER")  # a format that patches its header once the body is written
    data[:6] = b"HEADER"
    wb.commit(staged)
    assert wb.wait_durable("data", "header.bin", timeout=30)
    assert (backing / "header.bin").read_bytes() == bytes(data)
    wait_for(lambda: store.inner.list_uploads() == [])
    wb.close()
    blocks.close()


def test_a_direct_writer_reports_what_it_wrote_over(tmp_path: Path) -> None:
    """The mount writes the staging file itself: a write over a part the worker has uploaded
    counts only through the report, which the commit carries."""
    blocks, wb, _store, backing = make(tmp_path)
    wb.start()
    data = bytearray(os.urandom(3 * PART))
    staged = wb.open("data", "direct.bin")
    fd = os.open(staged.path, os.O_RDWR)
    staged.reserve(len(data))
    os.pwrite(fd, bytes(data), 0)
    staged.report(Progress(len(data)))
    wait_for(lambda: uploaded(staged) >= 3 * PART)
    os.pwrite(fd, b"X" * 10, 2 * PART + 5)
    data[2 * PART + 5 : 2 * PART + 15] = b"X" * 10
    wb.commit(
        staged, size=len(data), progress=Progress(len(data), ((2 * PART + 5, 2 * PART + 15),))
    )
    os.close(fd)
    assert wb.wait_durable("data", "direct.bin", timeout=30)
    assert (backing / "direct.bin").read_bytes() == bytes(data)
    wb.close()
    blocks.close()


def test_a_write_racing_a_part_upload_is_not_lost(tmp_path: Path) -> None:
    blocks, wb, store, backing = make(tmp_path)
    wb.start()
    store.gate.clear()  # parts start (they read the file) and wait
    data = bytearray(os.urandom(3 * PART))
    staged = wb.open("data", "race.bin")
    staged.write(0, bytes(data))
    time.sleep(0.3)
    staged.write(10, b"newer bytes")  # part 1 is in flight with the old bytes
    data[10:21] = b"newer bytes"
    store.gate.set()
    wb.commit(staged)
    assert wb.wait_durable("data", "race.bin", timeout=30)
    assert (backing / "race.bin").read_bytes() == bytes(data)
    wb.close()
    blocks.close()


def write_past_the_cache(wb: WriteBack, key: str, data: bytes) -> tuple[StagedFile, int]:
    """What the mount does when the cache is full (pcache.fuse_ops._make_room): wait for the
    first parts to be uploaded, punch them out of the staging file, report, go on."""
    staged = wb.open("data", key)
    fd = os.open(staged.path, os.O_RDWR)
    released = 0
    try:
        for offset in range(0, len(data), MiB):
            chunk = data[offset : offset + MiB]
            while True:
                try:
                    staged.reserve(offset + len(chunk))
                    break
                except NoSpace:
                    assert staged.eager is not None
                    upto = staged.eager.wait_uploaded(released, 20)
                    assert upto > released, "no part uploaded to make room"
                    punch_hole(fd, released, upto - released)
                    released = upto
                    staged.report(Progress(offset, (), released))
            os.pwrite(fd, chunk, offset)
            staged.report(Progress(offset + len(chunk), (), released))
    finally:
        os.close(fd)
    return staged, released


def test_a_file_larger_than_the_cache_is_written(tmp_path: Path) -> None:
    blocks, wb, store, backing = make(tmp_path, capacity=16 * MiB)
    wb.start()
    data = os.urandom(48 * MiB)  # three times the cache
    staged, released = write_past_the_cache(wb, "huge.bin", data)
    assert released >= 32 * MiB
    assert os.stat(staged.path).st_blocks * 512 <= 16 * MiB + MiB
    with pytest.raises(WriteError):  # released bytes are never written again
        staged.write(0, b"x")
    record = wb.commit(staged, size=len(data), metadata={"mtime": "1"})
    assert record.released == released and record.upload_id and record.parts
    assert wb.wait_durable("data", "huge.bin", timeout=60)
    assert (backing / "huge.bin").read_bytes() == data
    assert store.inner.stat("huge.bin").metadata == {"mtime": "1"}
    assert blocks.stats()["bytes_reserved"] == 0
    wb.close()
    blocks.close()


def test_a_restart_reuses_the_journalled_parts(tmp_path: Path) -> None:
    blocks, wb, store, backing = make(tmp_path, capacity=16 * MiB)
    data = os.urandom(40 * MiB)
    staged, released = write_past_the_cache(wb, "resumed.bin", data)
    wb.commit(staged, size=len(data))  # no start(): the worker dies before the upload
    parts_before = len(store.parts)
    wb._env.close()
    blocks.close()
    blocks2, wb2, store2, _ = make(tmp_path, capacity=16 * MiB)
    assert wb2.start() == 1
    assert wb2.wait_durable("data", "resumed.bin", timeout=60)
    assert (backing / "resumed.bin").read_bytes() == data
    reused = released // PART
    assert len(store2.parts) <= len(data) // PART + 1 - reused  # released parts not sent again
    assert parts_before >= reused
    assert store2.inner.list_uploads() == []
    wb2.close()
    blocks2.close()


def test_an_upload_the_store_lost_with_released_bytes_is_a_permanent_failure(
    tmp_path: Path,
) -> None:
    blocks, wb, store, backing = make(tmp_path, capacity=16 * MiB)
    data = os.urandom(40 * MiB)
    staged, _released = write_past_the_cache(wb, "lost.bin", data)
    record = wb.commit(staged, size=len(data))
    assert staged.eager is not None
    staged.eager.wait_uploaded(1 << 62, 20)  # no part in flight (it would race the abort)
    store.inner.abort_upload("lost.bin", record.upload_id)  # the store's lifecycle rule
    wb.start()
    with pytest.raises(UploadFailed, match="dropped from the cache"):
        wb.wait_durable("data", "lost.bin", timeout=30)
    assert not (backing / "lost.bin").exists()
    wb.close()
    blocks.close()


def test_an_upload_the_store_lost_is_started_again_while_the_bytes_are_here(
    tmp_path: Path,
) -> None:
    blocks, wb, store, backing = make(tmp_path)
    data = os.urandom(3 * PART + 5)
    staged = wb.open("data", "again.bin")
    staged.write(0, data)
    wait_for(lambda: uploaded(staged) >= 3 * PART)
    assert staged.eager is not None
    store.inner.abort_upload("again.bin", staged.eager.upload_id)
    wb.commit(staged)
    wb.start()
    assert wb.wait_durable("data", "again.bin", timeout=30)
    assert (backing / "again.bin").read_bytes() == data
    wb.close()
    blocks.close()


def test_rename_starts_the_upload_again_under_the_new_name(tmp_path: Path) -> None:
    blocks, wb, store, backing = make(tmp_path, upload_delay=5.0)  # the rename comes first
    wb.start()
    data = os.urandom(3 * PART)
    staged = wb.open("data", "ckpt.tmp")
    staged.write(0, data)
    wait_for(lambda: uploaded(staged) >= 3 * PART)
    wb.commit(staged)
    assert wb.rename("data", "ckpt.tmp", "ckpt.bin")
    assert wb.wait_durable("data", "ckpt.bin", timeout=30)
    assert wb.wait_durable("data", "ckpt.tmp", timeout=30)
    assert (backing / "ckpt.bin").read_bytes() == data
    assert not (backing / "ckpt.tmp").exists()
    assert store.completed == ["ckpt.bin"]  # nothing ever completed under the old name
    wait_for(lambda: store.inner.list_uploads() == [])  # the old name's upload aborted
    wb.close()
    blocks.close()


def test_rename_after_released_bytes_copies_in_the_store(tmp_path: Path) -> None:
    blocks, wb, store, backing = make(tmp_path, capacity=16 * MiB)
    data = os.urandom(40 * MiB)
    staged, released = write_past_the_cache(wb, "big.tmp", data)
    assert released
    wb.commit(staged, size=len(data), metadata={"mode": "0100600"})
    (backing / "big.tmp").write_bytes(b"an older object under the old name")
    assert wb.rename("data", "big.tmp", "big.bin")
    wb.commit_inline("data", "big.tmp", b"the new big.tmp")  # a new file under the old name
    wb.start()
    assert wb.wait_durable("data", "big.bin", timeout=60)
    assert wb.wait_durable("data", "big.tmp", timeout=60)
    assert (backing / "big.bin").read_bytes() == data
    assert store.inner.stat("big.bin").metadata == {"mode": "0100600"}
    assert (backing / "big.tmp").read_bytes() == b"the new big.tmp"  # not deleted by the move
    wb.close()
    blocks.close()


def test_an_unlinked_file_leaves_no_upload(tmp_path: Path) -> None:
    blocks, wb, store, backing = make(tmp_path)
    wb.start()
    staged = wb.open("data", "gone.bin")
    staged.write(0, os.urandom(3 * PART))
    wait_for(lambda: uploaded(staged) >= 3 * PART)
    wb.commit(staged)
    wb.delete("data", "gone.bin")
    assert wb.wait_durable("data", "gone.bin", timeout=30)
    wait_for(lambda: store.inner.list_uploads() == [])
    assert not (backing / "gone.bin").exists()
    wb.close()
    blocks.close()


def test_a_restart_aborts_the_uploads_of_uncommitted_files(tmp_path: Path) -> None:
    blocks, wb, store, _backing = make(tmp_path)
    staged = wb.open("data", "never-committed.bin")
    staged.write(0, os.urandom(3 * PART))
    wait_for(lambda: uploaded(staged) >= 3 * PART)
    assert len(store.inner.list_uploads()) == 1
    wb._env.close()  # crash
    blocks.close()
    blocks2, wb2, store2, _ = make(tmp_path)
    assert wb2.start() == 0
    wait_for(lambda: store2.inner.list_uploads() == [])
    wb2.close()
    blocks2.close()


def test_a_late_part_does_not_count_as_clean_after_a_write_over_it(tmp_path: Path) -> None:
    """The invariant in one process: a part in flight while its range is written over is
    dropped when it lands."""
    store = CountingStore(open_store(str(tmp_path)))
    path = tmp_path / "file"
    path.write_bytes(os.urandom(2 * PART))
    pool_tasks: list[Any] = []

    class Pool:
        def submit(self, task: Any) -> None:
            pool_tasks.append(task)

    eager = EagerUpload(store, "k", str(path), PART, Pool())  # type: ignore[arg-type]
    eager.advance(2 * PART)
    pool_tasks.pop(0)()  # create
    assert eager.upload_id and len(pool_tasks) == 2
    eager.dirty(10, 20)  # part 1 written over while its upload is queued
    queued = list(pool_tasks)
    pool_tasks.clear()
    for task in queued:
        task()
    assert eager.uploaded_prefix() == 0  # part 1 not clean, so nothing from 0
    assert [p.part_number for p in eager.state()[1]] == [2]
    assert pool_tasks == []  # part 1, sent and written over, goes again at commit only
    info = eager.finish(2 * PART, {}, lambda: True, threads=1)
    assert info.size == 2 * PART and store.inner.get("k") == path.read_bytes()


def commit_patched_copy(wb: WriteBack, store: CountingStore, key: str) -> tuple[bytes, Any]:
    """A file opened from an object and patched in part 2 only: its staging file holds the
    patch, the rest are holes the commit names as still the source's."""
    source = os.urandom(3 * PART + 1234)
    info = store.inner.put(key, source)
    staged = wb.open("data", key)
    staged.truncate(len(source))  # holes
    patch_at = PART + 100
    staged.write(PART, source[PART:patch_at] + b"PATCH" + source[patch_at + 5 : 2 * PART])
    expected = source[:patch_at] + b"PATCH" + source[patch_at + 5 :]
    ranges = ((0, PART), (2 * PART, len(source)))
    record = wb.commit(staged, source=CopySource(key, info.etag, ranges))
    return expected, record


def test_unchanged_ranges_are_copied_inside_the_store(tmp_path: Path) -> None:
    blocks, wb, store, backing = make(tmp_path)
    expected, record = commit_patched_copy(wb, store, "cow.bin")
    assert wb.read(record, 0, 10) == expected[:10]  # a reader meanwhile: from the source
    wb.start()
    assert wb.wait_durable("data", "cow.bin", timeout=30)
    assert (backing / "cow.bin").read_bytes() == expected
    assert wb.copied_bytes == len(expected) - PART  # every part but the patched one
    assert [n for _, n in store.parts] == [2]
    wb.close()
    blocks.close()


def test_a_source_replaced_before_the_upload_is_a_permanent_failure(tmp_path: Path) -> None:
    blocks, wb, store, backing = make(tmp_path)
    commit_patched_copy(wb, store, "replaced.bin")
    store.inner.put("replaced.bin", b"another writer's version")
    wb.start()
    with pytest.raises(UploadFailed, match="changed in the store before the upload"):
        wb.wait_durable("data", "replaced.bin", timeout=30)
    assert (backing / "replaced.bin").read_bytes() == b"another writer's version"
    wb.close()
    blocks.close()


def test_a_server_that_half_does_part_copies_gets_the_bytes_sent(tmp_path: Path) -> None:
    """rclone serve s3 stores the copied part but answers without an ETag, and then refuses
    that part number again: the upload starts over without copies (and never copies again)."""
    blocks, wb, store, backing = make(tmp_path)
    store.keep_first = True

    def half_copy(key: str, upload_id: str, number: int, src: str, start: int, length: int,
                  *, if_match: str) -> Any:  # fmt: skip
        store.sent.add((upload_id, number))
        raise NotSupported("the server answered UploadPartCopy without an ETag")

    store.upload_part_copy = half_copy  # type: ignore[method-assign]
    expected, _ = commit_patched_copy(wb, store, "half.bin")
    wb.start()
    assert wb.wait_durable("data", "half.bin", timeout=30)
    assert (backing / "half.bin").read_bytes() == expected
    assert wb.copied_bytes == 0
    wb.close()
    blocks.close()
