"""Write-back in isolation (a local directory as the backing store): commit order, superseded
writes, capacity pinning, abandoned sessions, and resume from the journal."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from objstore import open_store
from pcache.blockstore import BlockStore, CacheDir, NoSpace
from pcache.writeback import WriteBack, WriteError

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
