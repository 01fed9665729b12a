"""The mount as a writable POSIX filesystem, with write-back (the default durability).

A bucket on moto's S3 server (it keeps ``dir/`` markers and user metadata as S3 does), reached
through a fault proxy that can take the store down or refuse one key for good; two workers (two
"nodes") and a write-back mount on each. Checked: the workflows a new user tries, attributes
persisted in s3fs's conventions, close = local-durable / fsync = in the store, ``kill -9`` of the
worker and of the mount between close and upload, permanent refusals and outages, renames of
pending files, and the same bucket through Debian's s3fs.
"""

from __future__ import annotations

import errno
import json
import os
import random
import shutil
import signal
import stat
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from objstore import Config, Store, open_store
from tests.conftest import unique_bucket
from tests.servers.pcache_cluster import PcacheCluster
from tests.servers.pcache_mount import PcacheMount, force_unmount
from tests.servers.proxies import FaultProxy

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
    reason="FUSE mount tests need /dev/fuse and fusermount3",
)

MiB = 1 << 20
ROOT = Path(__file__).resolve().parents[2]


class Bed:
    """Two workers over one bucket behind a fault proxy, a write-back mount on each."""

    def __init__(self, moto: Any, root: Path) -> None:
        self.root = root
        self.bucket = unique_bucket("posix")
        moto.create_bucket(self.bucket)
        self.proxy = FaultProxy(moto.endpoint).start()
        profile = moto.profile(endpoint=self.proxy.endpoint, max_attempts=2, retry_deadline=5.0)
        self.store: Store = open_store(
            f"s3://s3@{self.bucket}/",
            Config.from_mapping({"profiles": {"s3": moto.profile()}}, env={}),
        )
        self.cluster = PcacheCluster(
            root / "cluster",
            {"s3": profile},
            {"data": f"s3://s3@{self.bucket}/"},
            nodes=2,
            capacity=256 * MiB,
            extra={"metadata_ttl": 1.0, "negative_ttl": 0.5},
        )
        self.cluster.start()
        self.mounts: list[PcacheMount] = []
        try:
            self.a = self.mount(0, root / "a")
            self.b = self.mount(1, root / "b")
        except BaseException:
            self.close()
            raise

    def mount(self, node: int, path: Path, *extra: str) -> Path:
        mount = PcacheMount(
            self.cluster.nodes[node].address,
            self.cluster.token,
            path,
            "--sync-timeout",
            "8",
            *extra,
        )
        self.mounts.append(mount)
        return mount.path

    def worker(self, node: int, path: str, payload: Any = None) -> Any:
        request = urllib.request.Request(
            self.cluster.nodes[node].address + path,
            data=None if payload is None else json.dumps(payload).encode(),
            headers={
                "Authorization": f"Bearer {self.cluster.token}",
                "Content-Type": "application/json",
            },
            method="GET" if payload is None else "POST",
        )
        with urllib.request.urlopen(request, timeout=30) as response:
            return json.loads(response.read())

    def records(self, node: int = 0) -> list[dict[str, Any]]:
        return list(self.worker(node, "/v1/uploads")["records"])

    def settle(self, node: int = 0, timeout: float = 60) -> None:
        """Wait until the node's write-back has nothing left but refused records."""
        deadline = time.monotonic() + timeout
        while True:
            waiting = [r for r in self.records(node) if not r["permanent"]]
            if not waiting:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"uploads never finished: {waiting}")
            time.sleep(0.1)

    def pcache(self, *args: str, node: int = 0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "pcache.cli",
                *args,
                "--worker",
                self.cluster.nodes[node].address,
            ],
            cwd=ROOT,
            env={**os.environ, "PCACHE_TOKEN": self.cluster.token, "PYTHONPATH": str(ROOT)},
            capture_output=True,
            text=True,
            timeout=60,
        )

    def close(self) -> None:
        for mount in self.mounts:
            mount.stop()
        self.cluster.stop()
        self.proxy.stop()


@pytest.fixture(scope="module")
def bed(moto_s3: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Bed]:
    bed = Bed(moto_s3, tmp_path_factory.mktemp("posix"))
    try:
        yield bed
    finally:
        logs = "\n".join(m.logs() for m in bed.mounts)
        bed.close()
        print(logs, bed.cluster.logs())


@pytest.fixture
def outage(bed: Bed) -> Iterator[FaultProxy]:
    """The proxy, to take the store down (``outage(True)``); up again after the test. New names
    cannot be created while it is down (their lookup asks the store), so tests open first."""
    try:
        yield bed.proxy
    finally:
        bed.proxy.outage(False)


def sh(command: str, cwd: Path) -> str:
    done = subprocess.run(command, shell=True, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{command}: {done.stderr}"
    return done.stdout


# -- what a new user tries -----------------------------------------------------------------------


def test_shell_workflows(bed: Bed) -> None:
    work = bed.a / "shell"
    work.mkdir()
    sh("echo one > log; echo two >> log; echo three >> log", work)
    assert (work / "log").read_text() == "one\ntwo\nthree\n"
    sh("dd if=/dev/zero of=img bs=4k count=4 status=none", work)
    sh("printf XYZ | dd of=img bs=1 seek=5000 conv=notrunc status=none", work)
    image = (work / "img").read_bytes()
    assert len(image) == 16384 and image[5000:5003] == b"XYZ" and image.count(0) == 16381
    sh("truncate -s 1M img && truncate -s 5001 img", work)
    assert (work / "img").read_bytes() == bytes(5000) + b"X"
    sh("chmod 750 log && touch -d '2021-03-04 05:06:07.5' log", work)
    info = os.stat(work / "log")
    assert stat.S_IMODE(info.st_mode) == 0o750
    assert (
        info.st_mtime_ns == int(time.mktime((2021, 3, 4, 5, 6, 7, 0, 0, -1))) * 10**9 + 500_000_000
    )
    sh("ln -s log link && mkdir -p a/b/c", work)
    assert os.readlink(work / "link") == "log" and (work / "link").read_text().startswith("one")
    assert os.path.islink(work / "link") and os.path.isdir(work / "a/b/c")
    with pytest.raises(PermissionError):
        os.link(work / "log", work / "hard")  # EPERM: an object has one name

    bed.settle()
    meta = bed.store.stat("shell/log").metadata
    assert int(meta["mode"]) == stat.S_IFREG | 0o750 and meta["mtime"].endswith(".500000000")
    assert bed.store.get("shell/link") == b"log"
    assert int(bed.store.stat("shell/link").metadata["mode"]) == stat.S_IFLNK | 0o777
    assert bed.store.exists("shell/a/b/c/")  # the empty directory is a marker object
    # the other node sees all of it, attributes included
    other = bed.b / "shell"
    assert os.readlink(other / "link") == "log" and os.path.isdir(other / "a/b/c")
    assert stat.S_IMODE(os.stat(other / "log").st_mode) == 0o750
    assert os.stat(other / "log").st_mtime_ns == info.st_mtime_ns


def test_extended_attributes(bed: Bed) -> None:
    work = bed.a / "xattr"
    work.mkdir()
    (work / "f").write_bytes(b"content")
    os.setxattr(work / "f", "user.origin", b"lab-7")
    os.setxattr(work / "f", "user.bin", bytes(range(256)))
    assert os.getxattr(work / "f", "user.origin") == b"lab-7"
    assert sorted(os.listxattr(work / "f")) == ["user.bin", "user.origin"]
    os.removexattr(work / "f", "user.bin")
    assert os.listxattr(work / "f") == ["user.origin"]
    with pytest.raises(OSError) as missing:
        os.getxattr(work / "f", "user.bin")
    assert missing.value.errno == errno.ENODATA
    with pytest.raises(OSError) as removed:
        os.removexattr(work / "f", "user.bin")
    assert removed.value.errno == errno.ENODATA
    os.chmod(work / "f", 0o600)  # the attributes survive a chmod, and a rename
    os.rename(work / "f", work / "g")
    assert os.getxattr(work / "g", "user.origin") == b"lab-7"
    # set while the file is open for writing: committed with its content
    with open(work / "h", "wb") as file:
        file.write(b"x" * 1000)
        os.setxattr(work / "h", "user.stage", b"writing")
        file.write(b"y")
    assert os.getxattr(work / "h", "user.stage") == b"writing"
    (work / "d").mkdir()  # a directory's live on its marker
    os.setxattr(work / "d", "user.team", b"infra")
    os.chmod(work / "d", 0o700)
    assert os.getxattr(work / "d", "user.team") == b"infra"
    os.symlink("g", work / "l")
    for name, code in (("trusted.x", errno.EOPNOTSUPP), ('user.a"b', errno.EINVAL)):
        with pytest.raises(OSError) as refused:
            os.setxattr(work / "g", name, b"v")
        assert refused.value.errno == code, name
    with pytest.raises(OSError) as on_link:
        os.setxattr(work / "l", "user.x", b"v", follow_symlinks=False)
    assert on_link.value.errno == errno.EPERM
    # S3 keeps 2 KB of user metadata per object, POSIX attributes included
    with pytest.raises(OSError) as too_big:
        os.setxattr(work / "g", "user.big", b"z" * 2048)
    assert too_big.value.errno == errno.E2BIG
    with pytest.raises(OSError) as full:
        for i in range(8):
            os.setxattr(work / "g", f"user.part{i}", b"z" * 300)
    assert full.value.errno == errno.ENOSPC
    kept = os.listxattr(work / "g")
    assert "user.origin" in kept and 1 < len(kept) < 9

    bed.settle()
    assert "xattr" in bed.store.stat("xattr/g").metadata
    assert "xattr" in bed.store.stat("xattr/d/").metadata
    other = bed.b / "xattr"
    assert os.getxattr(other / "g", "user.origin") == b"lab-7"
    assert os.getxattr(other / "h", "user.stage") == b"writing"
    assert os.getxattr(other / "d", "user.team") == b"infra"
    assert stat.S_IMODE(os.stat(other / "d").st_mode) == 0o700


def test_negative_ttl_trades_seeing_new_objects_for_fewer_lookups(bed: Bed) -> None:
    """By default a lookup of a missing name asks again, so an object another writer puts is
    seen at once; --negative-ttl answers from the directory's listing for that long."""
    trusting = bed.mount(0, bed.root / "neg", "--negative-ttl", "30")
    (bed.a / "neg").mkdir()
    (bed.a / "neg/old").write_bytes(b"o")
    bed.settle()
    assert os.listdir(trusting / "neg") == ["old"]
    assert os.listdir(bed.a / "neg") == ["old"]
    bed.store.put("neg/new", b"put by another writer")
    assert (bed.a / "neg/new").read_bytes() == b"put by another writer"
    assert not os.path.exists(trusting / "neg/new")  # the listing said no, trusted for 30 s
    os.mkdir(trusting / "neg/made-here")  # names this mount adds are known at once
    assert os.path.isdir(trusting / "neg/made-here")


def test_sqlite_numpy_memmap_venv_rsync(bed: Bed, tmp_path: Path) -> None:
    import sqlite3

    import numpy as np

    work = bed.a / "apps"
    work.mkdir()
    db = sqlite3.connect(work / "db.sqlite")
    db.execute("create table t (i integer, s text)")
    db.executemany("insert into t values (?, ?)", [(i, "x" * (i % 50)) for i in range(5000)])
    db.commit()
    db.execute("update t set s = 'changed' where i % 7 = 0")
    db.commit()
    db.close()
    db = sqlite3.connect(work / "db.sqlite")
    assert db.execute("select count(*), sum(s = 'changed') from t").fetchone() == (5000, 715)
    assert db.execute("pragma integrity_check").fetchone() == ("ok",)
    db.close()

    # in a child: msync holds this interpreter's GIL, and the fault proxy runs in a thread here
    sh(
        f"""{sys.executable} -c '
import numpy as np
array = np.lib.format.open_memmap("arr.npy", mode="w+", dtype=np.float32, shape=(512, 512))
array[:] = np.arange(512, dtype=np.float32)
array.flush()
del array
patch = np.load("arr.npy", mmap_mode="r+")  # a shared writable mapping of an object
patch[100, :] = -1
patch.flush()
'""",
        work,
    )
    loaded = np.load(work / "arr.npy")
    assert loaded[100, 0] == -1 and loaded[101, 5] == 5 and loaded.shape == (512, 512)

    sh(f"{sys.executable} -m venv --without-pip venv && venv/bin/python -c 'print(1)'", work)
    assert os.path.islink(work / "venv/bin/python")

    source = tmp_path / "src"
    (source / "sub").mkdir(parents=True)
    (source / "sub/run.sh").write_text("#!/bin/sh\necho ran\n")
    os.chmod(source / "sub/run.sh", 0o755)
    (source / "data.txt").write_text("data")
    os.utime(source / "data.txt", ns=(1_600_000_000_123_456_789, 1_600_000_000_123_456_789))
    sh(f"rsync -a {source}/ {work}/copy/", tmp_path)
    assert sh("copy/sub/run.sh", work) == "ran\n"
    copied = os.stat(work / "copy/data.txt")
    assert copied.st_mtime_ns == 1_600_000_000_123_456_789
    assert sh(f"rsync -a --dry-run --itemize-changes {source}/ {work}/copy/", tmp_path) == ""


def test_descriptors_share_one_file(bed: Bed) -> None:
    """Write-only descriptors bypass the page cache (direct_io), the reader's does not: bytes
    it has read and cached are replaced by what a writer writes over them, at once."""
    path = bed.a / "shared.bin"
    writer = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    appender = os.open(path, os.O_WRONLY | os.O_APPEND)
    reader = os.open(path, os.O_RDONLY)
    try:
        os.write(writer, b"0123456789")
        assert os.pread(reader, 100, 0) == b"0123456789"  # the writer's bytes, at once
        os.write(appender, b"END")  # at the end, whatever the offset
        os.pwrite(writer, b"ab", 2)
        assert os.pread(reader, 100, 0) == b"01ab456789END"
        os.close(writer)
        writer = -1
        os.write(appender, b"!")  # another descriptor goes on after one was closed
    finally:
        for fd in (writer, appender, reader):
            if fd >= 0:
                os.close(fd)
    assert path.read_bytes() == b"01ab456789END!"
    bed.settle()
    assert bed.store.get("shared.bin") == b"01ab456789END!"


def test_names_the_store_cannot_hold(bed: Bed) -> None:
    with pytest.raises(OSError) as excinfo:
        (bed.a / ("n" * 256)).write_bytes(b"x")
    assert excinfo.value.errno == errno.ENAMETOOLONG
    deep = bed.a / "/".join(["d" * 200] * 6)  # each name fits, the key (1,205 bytes) does not
    with pytest.raises(OSError) as excinfo:
        deep.parent.mkdir(parents=True)
        deep.write_bytes(b"x")
    assert excinfo.value.errno == errno.ENAMETOOLONG


def test_rename_over_and_noreplace(bed: Bed) -> None:
    work = bed.a / "mv"
    work.mkdir()
    (work / "x").write_bytes(b"new")
    (work / "y").write_bytes(b"old")
    os.replace(work / "x", work / "y")
    assert (work / "y").read_bytes() == b"new" and not (work / "x").exists()
    (work / "d1").mkdir()
    (work / "d1/f").write_bytes(b"in d1")
    (work / "d2").mkdir()
    os.rename(work / "d1", work / "d2")  # over an empty directory
    assert (work / "d2/f").read_bytes() == b"in d1" and not (work / "d1").exists()
    (work / "d3").mkdir()
    (work / "d3/g").write_bytes(b"g")
    with pytest.raises(OSError) as excinfo:
        os.rename(work / "d2", work / "d3")
    assert excinfo.value.errno == errno.ENOTEMPTY
    bed.settle()
    assert bed.store.get("mv/y") == b"new" and not bed.store.exists("mv/x")
    assert bed.store.get("mv/d2/f") == b"in d1" and not bed.store.exists("mv/d1/f")


# -- durability ----------------------------------------------------------------------------------


def test_close_is_local_durable_fsync_waits_for_the_store(bed: Bed, outage: FaultProxy) -> None:
    data = os.urandom(3 * MiB + 17)
    with open(bed.a / "wb.bin", "wb") as file:
        outage.outage(True)
        started = time.monotonic()
        file.write(data)
    assert time.monotonic() - started < 5  # the store is down: close does not wait for it
    assert (bed.a / "wb.bin").read_bytes() == data
    pending = [r for r in bed.records() if r["key"] == "wb.bin"]
    assert pending and pending[0]["size"] == len(data)
    fd = os.open(bed.a / "wb.bin", os.O_RDONLY)
    try:
        with pytest.raises(OSError) as excinfo:  # fsync means "in the store": not while it is down
            os.fsync(fd)
        assert excinfo.value.errno == errno.EIO
        outage.outage(False)
        os.fsync(fd)
    finally:
        os.close(fd)
    assert bed.store.get("wb.bin") == data


def test_close_to_open_across_nodes_before_the_upload(bed: Bed, outage: FaultProxy) -> None:
    """A closes, B opens at once: B sees the new content while the store is down (the upload
    cannot have landed); B's reads come from A's staging file."""
    data = os.urandom(3 * MiB + 11)
    name = "c2o-pending.bin"
    with open(bed.a / name, "wb") as file:  # created while the store is up (its lookup asks)
        file.write(data[:100])
        outage.outage(True)
        file.write(data[100:])
    assert bed.records(0), "the upload cannot have landed"
    assert os.stat(bed.b / name).st_size == len(data)
    assert (bed.b / name).read_bytes() == data
    os.unlink(bed.a / name)  # a tombstone, announced too
    time.sleep(1.2)  # B's kernel trusts the entry it has for 1 s
    assert not os.path.exists(bed.b / name)
    outage.outage(False)
    bed.settle()
    assert not bed.store.exists(name)
    assert not os.path.exists(bed.b / name)


def test_listings_on_other_nodes_show_pending_files(bed: Bed) -> None:
    (bed.a / "c2o-list").mkdir()
    bed.settle()
    assert os.listdir(bed.b / "c2o-list") == []
    payload = os.urandom(200_000)
    for i in range(3):
        (bed.a / f"c2o-list/f{i}").write_bytes(payload)
    # no settle: the uploads wait upload_delay at least, the announcements are already there
    assert sorted(os.listdir(bed.b / "c2o-list")) == ["f0", "f1", "f2"]
    assert (bed.b / "c2o-list/f2").read_bytes() == payload
    bed.settle()
    assert sorted(os.listdir(bed.b / "c2o-list")) == ["f0", "f1", "f2"]
    assert bed.store.get("c2o-list/f1") == payload


def test_rename_of_a_pending_file_uploads_only_the_new_name(bed: Bed) -> None:
    # uploads of the temporary name fail (and are retried) until the rename comes
    bed.proxy.refuse("ckpt.tmp", status=503, body=b"<Error><Code>SlowDown</Code></Error>")
    data = os.urandom(20 * MiB)
    (bed.a / "ckpt.tmp").write_bytes(data)
    assert not os.path.exists(bed.a / "ckpt.bin")
    started = time.perf_counter()
    os.replace(bed.a / "ckpt.tmp", bed.a / "ckpt.bin")
    assert time.perf_counter() - started < 0.5  # a journal transaction, no upload
    keys = {(r["key"], r["delete"]) for r in bed.records()}
    assert ("ckpt.bin", False) in keys and ("ckpt.tmp", True) in keys
    assert ("ckpt.tmp", False) not in keys
    bed.settle()
    assert bed.store.get("ckpt.bin") == data and not bed.store.exists("ckpt.tmp")


def test_rename_of_an_uploaded_file_is_journalled_and_copied_in_the_store(bed: Bed) -> None:
    data = os.urandom(24 * MiB + 9)
    (bed.a / "done").mkdir()
    (bed.a / "done/shard.bin").write_bytes(data)
    os.chmod(bed.a / "done/shard.bin", 0o640)
    bed.settle()
    assert bed.store.get("done/shard.bin") == data
    # the copy inside the store is held back until the rename is journalled and read back
    bed.proxy.refuse("done/final.bin", status=503, body=b"<Error><Code>SlowDown</Code></Error>")
    os.rename(bed.a / "done/shard.bin", bed.a / "done/final.bin")  # though no copy can be made
    assert (bed.a / "done/final.bin").read_bytes() == data  # from the old object meanwhile
    assert stat.S_IMODE(os.stat(bed.a / "done/final.bin").st_mode) == 0o640
    assert not (bed.a / "done/shard.bin").exists()
    assert sorted(os.listdir(bed.b / "done")) == ["final.bin"]  # the other node, at once
    assert bed.store.exists("done/shard.bin")  # deleted only after the copy has landed
    bed.proxy.allow("done/final.bin")
    bed.worker(0, "/v1/uploads/retry", {"ns": "data", "key": "done/final.bin"})  # not in 30 s
    bed.settle()
    assert bed.store.get("done/final.bin") == data and not bed.store.exists("done/shard.bin")
    assert (bed.b / "done/final.bin").read_bytes() == data


def test_a_lookup_never_lists_the_directory(bed: Bed) -> None:
    """A name is looked up with a HEAD and, for a directory, a LIST of at most two keys under
    it: never a listing of the directory it is in (issue 18: 100,000 entries timed out)."""
    for i in range(30):
        bed.store.put(f"flat/f{i:03d}", b"x")
    bed.store.put("flat/sub/inner", b"y")
    bed.proxy.request_log.clear()
    assert os.stat(bed.a / "flat/f007").st_size == 1
    assert stat.S_ISDIR(os.stat(bed.a / "flat/sub").st_mode)
    with pytest.raises(FileNotFoundError):
        os.stat(bed.a / "flat/nope")
    lists = [r for r in bed.proxy.request_log if "list-type=2" in r]
    assert lists and all("max-keys=2" in r for r in lists), lists


def test_a_listed_directory_is_stat_ahead_in_batches(bed: Bed) -> None:
    """``find`` / ``ls -l`` over objects the worker knows only from a listing: the first lookup
    asks for it and the names listed after it in one request (pcache.statahead), the worker
    HEADs them side by side, and what each ``lstat`` shows is the object's own metadata,
    written by another client; a name changed here after the batch shows the change."""
    from pcache.posix import Attrs

    names = [f"f{i:03d}" for i in range(40)]
    for i, name in enumerate(names):
        attrs = Attrs(
            stat.S_IFREG | (0o600 + i % 8), 1000 + i, 2000, (1_700_000_000 + i) * 10**9, 0, 0
        )
        bed.store.put(f"ahead/{name}", b"x" * i, metadata=attrs.to_metadata())
    before = json.loads((bed.a / ".pcache-stats").read_text())["stat_ahead"]
    bed.proxy.request_log.clear()
    with os.scandir(bed.a / "ahead") as entries:
        listed = sorted(e.name for e in entries)
    assert listed == names
    os.chmod(bed.a / "ahead/f039", 0o640)  # changed here after the listing (and the batch)
    for i, name in enumerate(names[:-1]):
        st = os.lstat(bed.a / "ahead" / name)
        assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_size) == (0o600 + i % 8, 1000 + i, i)
        assert st.st_mtime_ns == (1_700_000_000 + i) * 10**9
    assert stat.S_IMODE(os.lstat(bed.a / "ahead/f039").st_mode) == 0o640
    after = json.loads((bed.a / ".pcache-stats").read_text())["stat_ahead"]
    assert after["batches"] - before["batches"] == 1, after  # one request for the 40 names
    assert after["answered"] - before["answered"] >= len(names) - 1
    heads = [
        r
        for r in bed.proxy.request_log
        if r.startswith("HEAD /") and "/ahead/" in r and not r.endswith("/f039")
    ]
    assert len(heads) == len(set(heads)) == len(names) - 1, heads  # each asked once


def test_a_walk_asks_the_markers_of_listed_directories_in_one_batch(bed: Bed) -> None:
    """``os.walk`` with a ``stat`` of each directory: the first directory's ``getattr`` asks
    for the markers of the directories listed after it in one request; each directory shows
    its marker's mode and owner (written by another client), and each marker is HEADed once."""
    from pcache.posix import Attrs

    names = [f"d{i:02d}" for i in range(30)]
    for i, name in enumerate(names):
        attrs = Attrs(stat.S_IFDIR | (0o700 + i % 8), 3000 + i, 4000, 1_700_000_000 * 10**9, 0, 0)
        bed.store.put(f"walk/{name}/", b"", metadata=attrs.to_metadata())
        bed.store.put(f"walk/{name}/file", b"f")
    time.sleep(1.1)  # past the kernel's attribute timeout of anything this mount saw there
    before = json.loads((bed.a / ".pcache-stats").read_text())["stat_ahead"]
    bed.proxy.request_log.clear()
    assert sorted(os.listdir(bed.a / "walk")) == names
    for i, name in enumerate(names):
        st = os.stat(bed.a / "walk" / name)
        assert stat.S_ISDIR(st.st_mode)
        assert (stat.S_IMODE(st.st_mode), st.st_uid) == (0o700 + i % 8, 3000 + i)
    after = json.loads((bed.a / ".pcache-stats").read_text())["stat_ahead"]
    assert after["batches"] - before["batches"] == 1, after
    assert after["answered"] - before["answered"] >= len(names) - 1
    heads = [r for r in bed.proxy.request_log if r.startswith("HEAD /") and "/walk/d" in r]
    assert len(heads) == len(set(heads)) == len(names), heads  # each marker asked once


def test_kill_9_of_the_worker_between_close_and_upload(bed: Bed, outage: FaultProxy) -> None:
    data = os.urandom(5 * MiB + 3)
    with open(bed.a / "k9w.bin", "wb") as file:
        outage.outage(True)
        file.write(data)
    assert [r for r in bed.records() if r["key"] == "k9w.bin"]
    node = bed.cluster.nodes[0]
    bed.cluster.kill(node)  # SIGKILL: nothing orderly
    outage.outage(False)
    bed.cluster.start(node)
    bed.settle()
    assert bed.store.get("k9w.bin") == data
    assert (bed.a / "k9w.bin").read_bytes() == data


def test_kill_9_of_the_mount_between_close_and_upload(bed: Bed, outage: FaultProxy) -> None:
    extra = bed.mount(0, bed.root / "doomed")
    data = os.urandom(2 * MiB + 9)
    with open(extra / "k9m.bin", "wb") as file:
        outage.outage(True)
        file.write(data)
    doomed = bed.mounts.pop()
    doomed.process.send_signal(signal.SIGKILL)
    doomed.process.wait(timeout=10)
    force_unmount(extra)
    outage.outage(False)
    bed.settle()
    assert bed.store.get("k9m.bin") == data


def test_worker_restart_while_a_file_is_open(bed: Bed) -> None:
    fd = os.open(bed.a / "open-across.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, b"before ")
        node = bed.cluster.nodes[0]
        bed.cluster.kill(node)
        bed.cluster.start(node)
        os.write(fd, b"after")
    finally:
        os.close(fd)  # the worker lost the session: the mount writes it again from its copy
    bed.settle()
    assert bed.store.get("open-across.bin") == b"before after"


def test_opening_a_large_object_copies_only_what_it_touches(bed: Bed) -> None:
    """Opened without O_TRUNC, a 40 MiB object is not copied at open: a patch, an append and a
    read of an untouched block copy in only those blocks; at upload the part still wholly the
    old object's is made inside the store (UploadPartCopy), the others from both."""
    data = bytearray(os.urandom(40 * MiB + 5))
    bed.store.put("cow/big.bin", bytes(data))
    before = bed.worker(0, "/v1/status")["writeback"]["copied_bytes"]
    staging = [p for p in (bed.root / "cluster").rglob("staging") if p.is_dir()]
    with open(bed.a / "cow/big.bin", "r+b") as file:
        file.seek(20 * MiB + 3)
        file.write(b"patched")
        data[20 * MiB + 3 : 20 * MiB + 10] = b"patched"
        file.seek(0, os.SEEK_END)
        file.write(b"tail")
        data += b"tail"
        file.flush()
        assert sum(disk_usage(d) for d in staging) < 8 * MiB  # two blocks, not 40 MiB
        file.seek(33 * MiB)
        assert file.read(100) == bytes(data[33 * MiB : 33 * MiB + 100])  # copied in to read
        file.truncate(len(data) - 2)
        del data[-2:]
    assert (bed.a / "cow/big.bin").read_bytes() == bytes(data)  # still pending: composed
    bed.settle()
    assert bed.store.get("cow/big.bin") == bytes(data)
    copied = bed.worker(0, "/v1/status")["writeback"]["copied_bytes"] - before
    assert copied >= 16 * MiB  # part 1, [0, 16 MiB), never touched


def test_parts_leave_while_writing_and_a_patch_over_one_is_kept(bed: Bed) -> None:
    """A 64 MiB file: its first parts are in the store's unfinished upload before close; a
    write over part 1 after that (a format patching its header) still reaches the object."""
    data = bytearray(os.urandom(64 * MiB))
    fd = os.open(bed.a / "early.bin", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for offset in range(0, len(data), MiB):
            os.write(fd, data[offset : offset + MiB])
        deadline = time.monotonic() + 60
        while True:  # the parts behind the writer reach the store before any commit
            uploads = bed.store.list_uploads("early.bin")
            if uploads and len(bed.store.list_parts("early.bin", uploads[0].upload_id)) >= 2:
                break
            assert time.monotonic() < deadline, "no part was uploaded while writing"
            time.sleep(0.1)
        os.pwrite(fd, b"HEADER", 100)
        data[100:106] = b"HEADER"
    finally:
        os.close(fd)
    bed.settle()
    assert bed.store.get("early.bin") == bytes(data)
    assert bed.store.list_uploads("early.bin") == []


@pytest.mark.parametrize("seed", [1, 2])
def test_random_operations_on_a_lazily_copied_object(bed: Bed, seed: int) -> None:
    """Writes, reads and truncates at random offsets (block edges, holes, past the end) on an
    object opened without O_TRUNC, checked against a local model at every read and after."""
    rng = random.Random(seed)
    key = f"cow/random-{seed}.bin"
    model = bytearray(rng.randbytes(9 * MiB + 12345))
    bed.store.put(key, bytes(model))
    fd = os.open(bed.a / key, os.O_RDWR)
    try:
        for _ in range(150):
            op = rng.random()
            size = len(model)
            offset = rng.choice([0, MiB - 3, MiB, 4 * MiB + 1, size - 10, size, size + 99])
            offset = max(0, offset + rng.randrange(-2000, 2000)) if rng.random() < 0.5 else offset
            if op < 0.45:
                data = rng.randbytes(rng.choice([1, 100, 4096, MiB, MiB + 7, 2 * MiB]))
                os.pwrite(fd, data, offset)
                if offset > len(model):
                    model.extend(bytes(offset - len(model)))
                model[offset : offset + len(data)] = data
            elif op < 0.85:
                length = rng.choice([1, 4096, MiB, 3 * MiB])
                assert os.pread(fd, length, offset) == bytes(model[offset : offset + length])
            else:
                cut = rng.randrange(0, len(model) + MiB)
                os.ftruncate(fd, cut)
                if cut < len(model):
                    del model[cut:]
                else:
                    model.extend(bytes(cut - len(model)))
    finally:
        os.close(fd)
    assert (bed.a / key).read_bytes() == bytes(model)
    bed.settle()
    assert bed.store.get(key) == bytes(model)


def test_a_file_larger_than_the_cache(moto_s3: Any, tmp_path: Path) -> None:
    """Its first parts are uploaded while it is written and dropped from the cache: 64 MiB go
    through a 24 MiB cache. While it is open, the dropped bytes read as EIO (they are only in
    the store's unfinished upload); after close another reader waits for the upload."""
    bucket = unique_bucket("huge")
    moto_s3.create_bucket(bucket)
    cluster = PcacheCluster(
        tmp_path / "cluster",
        {"s3": moto_s3.profile()},
        {"data": f"s3://s3@{bucket}/"},
        capacity=24 * MiB,
        extra={"upload_part_size": "5MiB"},
    )
    cluster.start()
    mount = PcacheMount(cluster.nodes[0].address, cluster.token, tmp_path / "mnt")
    try:
        data = os.urandom(64 * MiB)
        fd = os.open(mount.path / "huge.bin", os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for offset in range(0, len(data), MiB):
                os.write(fd, data[offset : offset + MiB])
            with pytest.raises(OSError) as excinfo:
                os.pread(fd, 4096, 0)
            assert excinfo.value.errno == errno.EIO
            assert os.pread(fd, 4096, len(data) - 4096) == data[-4096:]  # the tail is here
        finally:
            os.close(fd)
        staging = [p for p in (tmp_path / "cluster").rglob("staging") if p.is_dir()]
        assert sum(disk_usage(d) for d in staging) <= 24 * MiB
        assert (mount.path / "huge.bin").read_bytes() == data  # waits for the upload
        store = open_store(
            f"s3://s3@{bucket}/",
            Config.from_mapping({"profiles": {"s3": moto_s3.profile()}}, env={}),
        )
        assert store.get("huge.bin") == data
        assert store.stat("huge.bin").metadata.get("mode") == str(stat.S_IFREG | 0o644)
    finally:
        mount.stop()
        cluster.stop()


def disk_usage(path: Path) -> int:
    return sum(f.stat().st_blocks * 512 for f in path.rglob("*") if f.is_file())


# -- refusals ------------------------------------------------------------------------------------


def test_a_key_the_store_refuses_is_prompt_and_holds_up_nothing(bed: Bed) -> None:
    bed.proxy.refuse("forbidden-")
    work = bed.a / "refused"
    work.mkdir()
    for i in range(6):  # more than the worker's upload slots
        (work / f"forbidden-{i}").write_bytes(b"never stored")
    (work / "fine").write_bytes(b"stored")  # write-back: close succeeds, the store decides later
    deadline = time.monotonic() + 30
    while not bed.store.exists("refused/fine"):
        assert time.monotonic() < deadline, bed.records()
        time.sleep(0.1)
    fd = os.open(work / "forbidden-0", os.O_RDONLY)
    try:
        started = time.monotonic()
        with pytest.raises(OSError) as excinfo:
            os.fsync(fd)
        assert excinfo.value.errno == errno.EIO and time.monotonic() - started < 5
    finally:
        os.close(fd)
    refused = [r for r in bed.records() if r["permanent"]]
    assert {r["key"] for r in refused} == {f"refused/forbidden-{i}" for i in range(6)}
    assert "AccessDenied" in refused[0]["error"]
    listed = bed.pcache("uploads")
    assert listed.returncode == 1 and "refused" in listed.stdout
    assert (work / "forbidden-3").read_bytes() == b"never stored"  # kept on the node
    discarded = bed.pcache("uploads", "discard", "data/refused/forbidden-3")
    assert discarded.returncode == 0, discarded.stderr
    assert "refused/forbidden-3" not in {r["key"] for r in bed.records()}

    strict = bed.mount(0, bed.root / "strict", "--durability", "remote")
    started = time.monotonic()
    with pytest.raises(OSError) as excinfo:
        (strict / "refused/forbidden-strict").write_bytes(b"x")
    assert excinfo.value.errno == errno.EIO and time.monotonic() - started < 5
    bed.pcache("uploads", "discard", "data")
    assert not [r for r in bed.records() if r["permanent"]]


# -- another FUSE client on the same bucket -------------------------------------------------------


@pytest.mark.skipif(shutil.which("s3fs") is None, reason="needs Debian's s3fs")
def test_s3fs_reads_what_pcache_wrote_and_back(bed: Bed, moto_s3: Any, tmp_path: Path) -> None:
    work = bed.a / "interop"
    work.mkdir()
    (work / "script.sh").write_text("#!/bin/sh\n")
    os.chmod(work / "script.sh", 0o751)
    os.utime(work / "script.sh", ns=(1_500_000_000_000_000_000, 1_500_000_000_000_000_000))
    os.symlink("script.sh", work / "link")
    (work / "empty").mkdir()
    os.setxattr(work / "script.sh", "user.tag", b'\x00binary,"tag"')
    os.setxattr(work / "empty", "user.dir", b"marked")
    bed.settle()
    passwd = tmp_path / "passwd"
    passwd.write_text(f"{moto_s3.access_key_id}:{moto_s3.secret_access_key}\n")
    passwd.chmod(0o600)
    mnt = tmp_path / "s3fs"
    mnt.mkdir()
    subprocess.run(
        ["s3fs", bed.bucket, str(mnt), "-o", f"url={moto_s3.endpoint}", "-o", "use_path_request_style",
         "-o", f"passwd_file={passwd}", "-o", "stat_cache_expire=1", "-o", "use_xattr"],
        check=True, timeout=30,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while not os.path.ismount(mnt):
            assert time.monotonic() < deadline
            time.sleep(0.1)
        seen = os.stat(mnt / "interop/script.sh")
        assert stat.S_IMODE(seen.st_mode) == 0o751 and int(seen.st_mtime) == 1_500_000_000
        assert os.readlink(mnt / "interop/link") == "script.sh"
        assert os.path.isdir(mnt / "interop/empty") and os.listdir(mnt / "interop/empty") == []
        assert os.getxattr(mnt / "interop/script.sh", "user.tag") == b'\x00binary,"tag"'
        assert os.getxattr(mnt / "interop/empty", "user.dir") == b"marked"
        # and the other way round
        (mnt / "interop/from-s3fs").mkdir()
        (mnt / "interop/from-s3fs/f.txt").write_text("s3fs wrote this")
        os.chmod(mnt / "interop/from-s3fs/f.txt", 0o604)
        os.symlink("f.txt", mnt / "interop/from-s3fs/l")
        os.setxattr(mnt / "interop/from-s3fs/f.txt", "user.by", b"s3fs")
    finally:
        force_unmount(mnt)
    time.sleep(1.5)  # the workers' metadata TTL
    theirs = bed.b / "interop/from-s3fs"
    assert (theirs / "f.txt").read_text() == "s3fs wrote this"
    assert stat.S_IMODE(os.stat(theirs / "f.txt").st_mode) == 0o604
    assert os.readlink(theirs / "l") == "f.txt"
    assert os.getxattr(theirs / "f.txt", "user.by") == b"s3fs"
