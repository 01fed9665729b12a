"""``pcache mount`` for real: FUSE mounts in subprocesses over real workers and the real S3 server.

Two workers share a bucket; mount A runs on node 1 and mount B on node 2, both with
``--durability remote`` (``close`` returns once the file is in S3), so what one node closes the
other reads at once. Objects are put into S3 directly and read through the mounts; files written
through a mount are checked in S3. Write-back mounts (the default) are tested in
``test_mount_posix.py``.
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
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from objstore import Store
from tests.pcache.conftest import ClusterFactory, MiB
from tests.servers.pcache_cluster import PcacheCluster
from tests.servers.pcache_mount import PcacheMount, force_unmount
from tests.servers.proxies import FaultProxy

ROOT = Path(__file__).resolve().parents[2]
FUSERMOUNT = shutil.which("fusermount3")

pytestmark = pytest.mark.skipif(
    not os.path.exists("/dev/fuse") or FUSERMOUNT is None,
    reason="FUSE mount tests need /dev/fuse and fusermount3",
)


def _env(cluster: PcacheCluster) -> dict[str, str]:
    return {
        **os.environ,
        "PCACHE_TOKEN": cluster.token,
        "PYTHONPATH": str(ROOT),
    }


def pcache(cluster: PcacheCluster, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pcache.cli", *args],
        cwd=ROOT,
        env=_env(cluster),
        capture_output=True,
        text=True,
        timeout=60,
    )


def Mount(cluster: PcacheCluster, node: int, mountpoint: Path, *extra: str) -> PcacheMount:
    return PcacheMount(cluster.nodes[node].address, cluster.token, mountpoint, *extra)


@pytest.fixture(scope="module")
def cluster2(
    rclone_s3: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[PcacheCluster, Store]]:
    factory = ClusterFactory(rclone_s3, tmp_path_factory.mktemp("mount-cluster"))
    try:
        yield factory(2)
    finally:
        factory.close()


@pytest.fixture(scope="module")
def mounts(
    cluster2: tuple[PcacheCluster, Store], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[tuple[Path, Path]]:
    cluster, _ = cluster2
    root = tmp_path_factory.mktemp("mnt")
    a = Mount(cluster, 0, root / "a", "--durability", "remote")
    try:
        b = Mount(cluster, 1, root / "b", "--durability", "remote")
    except BaseException:
        a.stop()
        raise
    try:
        yield a.path, b.path
    finally:
        a.stop()
        b.stop()
        if a.process.returncode not in (0, None) or b.process.returncode not in (0, None):
            print(a.logs(), b.logs())


@pytest.fixture
def store(cluster2: tuple[PcacheCluster, Store]) -> Store:
    return cluster2[1]


def test_read_round_trip_small_and_multi_block(mounts, store: Store) -> None:
    a, _ = mounts
    small, big = b"hello, mount\n", os.urandom(3 * MiB + 12345)
    store.put("rt/small.txt", small)
    store.put("rt/big.bin", big)
    assert (a / "rt/small.txt").read_bytes() == small
    assert (a / "rt/big.bin").read_bytes() == big
    with open(a / "rt/big.bin", "rb") as file:
        file.seek(MiB + 1000)
        assert file.read(2 * MiB) == big[MiB + 1000 : 3 * MiB + 1000]
        file.seek(len(big) - 10)
        assert file.read(100) == big[-10:]
    info = os.stat(a / "rt/big.bin")
    assert info.st_size == len(big) and info.st_blksize == MiB
    assert os.stat(a / "rt/small.txt").st_size == len(small)
    assert os.path.isdir(a / "rt") and not os.path.isdir(a / "rt/big.bin")


def test_random_reads_of_cached_blocks(mounts, store: Store) -> None:
    import random

    a, _ = mounts
    data = os.urandom(3 * MiB + 321)
    store.put("rand/x.bin", data)
    assert (a / "rand/x.bin").read_bytes() == data  # now in node 1's cache
    rng = random.Random(7)
    fd = os.open(a / "rand/x.bin", os.O_RDONLY)  # a new open: the page cache is dropped
    try:
        for _ in range(200):  # small reads served from the cache files, in the event loop
            offset = rng.randrange(0, len(data))
            size = rng.choice((1, 4096, 5000, 70_000))
            assert os.pread(fd, size, offset) == data[offset : offset + size]
    finally:
        os.close(fd)


def test_listings_match_the_store_with_implicit_dirs(mounts, store: Store) -> None:
    a, b = mounts
    keys = ["ls/a.txt", "ls/sub/b.txt", "ls/sub/deeper/c.txt", "ls/other/d.txt", "ls/z.bin"]
    for key in keys:
        store.put(key, key.encode())
    assert sorted(os.listdir(a / "ls")) == ["a.txt", "other", "sub", "z.bin"]
    walked = {
        os.path.relpath(os.path.join(d, f), a): os.path.getsize(os.path.join(d, f))
        for d, _, files in os.walk(a / "ls")
        for f in files
    }
    assert walked == {key: len(key) for key in keys}
    dirs = sorted(os.path.relpath(d, a) for d, _, _ in os.walk(a / "ls"))
    assert dirs == ["ls", "ls/other", "ls/sub", "ls/sub/deeper"]
    assert sorted(os.listdir(b / "ls/sub")) == ["b.txt", "deeper"]
    assert "ls" in os.listdir(a)


def test_write_through_the_mount_lands_in_s3(mounts, store: Store, tmp_path: Path) -> None:
    a, _ = mounts
    data = os.urandom(2 * MiB + 777)
    os.mkdir(a / "w")  # implicit: exists in this mount until it has content
    with open(a / "w/out.bin", "wb") as file:
        file.write(data[:1000])
        file.flush()
        assert os.stat(a / "w/out.bin").st_size == 1000  # a file being written shows its size
        assert "out.bin" in os.listdir(a / "w")
        file.write(data[1000:])
    assert store.get("w/out.bin") == data
    assert (a / "w/out.bin").read_bytes() == data

    local = tmp_path / "local.bin"
    local.write_bytes(os.urandom(MiB + 3))
    shutil.copyfile(local, a / "w/copy.bin")
    assert store.get("w/copy.bin") == local.read_bytes()
    assert os.stat(a / "w/copy.bin").st_size == MiB + 3

    (a / "w/empty").touch()
    assert store.get("w/empty") == b""


def test_random_writes_and_patches_in_place(mounts, store: Store) -> None:
    a, b = mounts
    os.mkdir(a / "rw")
    fd = os.open(a / "rw/x.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        assert os.pwrite(fd, b"0123456789", 0) == 10
        assert os.pwrite(fd, b"later", 100) == 5  # past the end: a hole of zeros
        assert os.pwrite(fd, b"abc", 3) == 3
    finally:
        os.close(fd)
    expected = b"012abc6789" + bytes(90) + b"later"
    assert store.get("rw/x.bin") == expected
    fd = os.open(a / "rw/x.bin", os.O_RDWR)  # an existing object, patched without O_TRUNC
    try:
        os.pwrite(fd, b"ZZ", 1)
        assert os.pread(fd, 4, 0) == b"0ZZa"
    finally:
        os.close(fd)
    assert store.get("rw/x.bin") == b"0ZZabc6789" + bytes(90) + b"later"
    assert (b / "rw/x.bin").read_bytes() == b"0ZZabc6789" + bytes(90) + b"later"


def test_concurrent_readers(mounts, store: Store) -> None:
    a, _ = mounts
    data = os.urandom(5 * MiB + 99)
    store.put("cc/shared.bin", data)
    errors: list[BaseException] = []

    def reader(i: int) -> None:
        try:
            with open(a / "cc/shared.bin", "rb") as file:
                if i % 2:
                    assert file.read() == data
                else:
                    offset = i * 300_001
                    file.seek(offset)
                    assert file.read(MiB) == data[offset : offset + MiB]
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not errors, errors


def test_close_to_open_across_two_nodes(mounts, store: Store) -> None:
    a, b = mounts
    first = os.urandom(MiB + 5)
    os.mkdir(a / "c2o")
    with open(a / "c2o/x.bin", "wb") as file:
        file.write(first)
    assert (b / "c2o/x.bin").read_bytes() == first  # B's worker never saw it: full content
    second = os.urandom(2 * MiB + 7)
    with open(a / "c2o/x.bin", "wb") as file:
        file.write(second)
    time.sleep(1.2)  # B's kernel trusts the attributes it has for 1 s (the attr timeout)
    assert (b / "c2o/x.bin").read_bytes() == second
    assert store.get("c2o/x.bin") == second


def test_mkdir_rmdir_unlink_rename(mounts, store: Store) -> None:
    a, _ = mounts
    store.put("ops/file.txt", b"one")
    store.put("ops/full/inner.txt", b"two")
    ops = a / "ops"

    os.mkdir(ops / "newdir")
    assert os.path.isdir(ops / "newdir") and "newdir" in os.listdir(ops)
    with pytest.raises(FileExistsError):
        os.mkdir(ops / "newdir")
    with pytest.raises(FileExistsError):
        os.mkdir(ops / "file.txt")
    (ops / "newdir/in.txt").write_bytes(b"inside")
    assert store.get("ops/newdir/in.txt") == b"inside"
    with pytest.raises(OSError) as excinfo:
        os.rmdir(ops / "full")
    assert excinfo.value.errno == errno.ENOTEMPTY
    with pytest.raises(NotADirectoryError):
        os.rmdir(ops / "file.txt")
    with pytest.raises(IsADirectoryError):
        os.unlink(ops / "full")

    os.rename(ops / "file.txt", ops / "renamed.txt")
    assert store.get("ops/renamed.txt") == b"one" and not store.exists("ops/file.txt")
    assert not (ops / "file.txt").exists() and (ops / "renamed.txt").read_bytes() == b"one"
    os.rename(ops / "full", ops / "full2")  # a directory: key by key
    assert store.get("ops/full2/inner.txt") == b"two" and not store.exists("ops/full/inner.txt")
    assert (ops / "full2/inner.txt").read_bytes() == b"two" and not (ops / "full").exists()
    os.rename(ops / "full2", ops / "full")

    os.unlink(ops / "renamed.txt")
    assert not store.exists("ops/renamed.txt")
    with pytest.raises(FileNotFoundError):
        os.unlink(ops / "renamed.txt")

    shutil.rmtree(ops / "newdir")  # the emptied directory stays until its rmdir
    assert not store.exists("ops/newdir/in.txt") and not (ops / "newdir").exists()
    os.mkdir(ops / "empty")
    os.rmdir(ops / "empty")
    assert sorted(os.listdir(ops)) == ["full"]


def test_missing_and_vanished_objects_give_enoent(mounts, store: Store) -> None:
    a, _ = mounts
    with pytest.raises(FileNotFoundError):
        (a / "nope/x.bin").read_bytes()
    with pytest.raises(FileNotFoundError):
        os.stat(a / "missing.bin")
    store.put("gone/x.bin", os.urandom(2 * MiB))
    with open(a / "gone/x.bin", "rb", buffering=0) as file:
        store.delete("gone/x.bin")
        with pytest.raises(OSError) as excinfo:
            file.read(4096)
        assert excinfo.value.errno == errno.ENOENT


def test_stale_mount_after_a_killed_daemon(cluster2, store: Store, tmp_path: Path) -> None:
    """A mount whose process was killed (-9) is stale: mounting again names the fix, and
    ``pcache umount`` clears it."""
    cluster, _ = cluster2
    store.put("stale/x.txt", b"still here")
    mountpoint = tmp_path / "stale"
    mountpoint.mkdir()
    args = ("data/stale", str(mountpoint), "--worker", cluster.nodes[0].address, "--read-only")
    log = str(tmp_path / "daemon.log")
    try:
        started = pcache(cluster, "mount", *args, "--log-file", log)
        assert started.returncode == 0, started.stderr + Path(log).read_text()
        os.kill(int(started.stdout.split("(pid ")[1].split(",")[0]), signal.SIGKILL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.stat(mountpoint)
            except OSError as exc:
                assert exc.errno == errno.ENOTCONN
                break
            time.sleep(0.05)
        again = pcache(cluster, "mount", *args)
        assert again.returncode == 2
        assert "stale mount" in again.stderr and "pcache umount" in again.stderr
        assert pcache(cluster, "umount", str(mountpoint)).returncode == 0
        assert not os.path.ismount(mountpoint)
        remounted = pcache(cluster, "mount", *args, "--log-file", log)
        assert remounted.returncode == 0, remounted.stderr
        assert (mountpoint / "x.txt").read_bytes() == b"still here"
        assert pcache(cluster, "umount", str(mountpoint)).returncode == 0
    finally:
        force_unmount(mountpoint)


def test_statfs_reports_the_cache_disks(mounts) -> None:
    a, _ = mounts
    stats = os.statvfs(a)
    assert stats.f_blocks * stats.f_frsize == 64 * MiB
    assert 0 < stats.f_bavail <= stats.f_blocks


def test_daemon_read_only_and_umount(cluster2, store: Store, tmp_path: Path) -> None:
    cluster, _ = cluster2
    store.put("ro/x.txt", b"read only")
    mountpoint = tmp_path / "ro"
    mountpoint.mkdir()
    worker = ["--worker", cluster.nodes[0].address]
    log = str(tmp_path / "daemon.log")
    started = pcache(
        cluster, "mount", "data/ro", str(mountpoint), *worker, "--read-only", "--immutable",
        "--log-file", log,
    )  # fmt: skip
    try:
        assert started.returncode == 0, started.stderr + Path(log).read_text()
        assert os.path.ismount(mountpoint)
        assert (mountpoint / "x.txt").read_bytes() == b"read only"
        assert os.listdir(mountpoint) == ["x.txt"]
        with pytest.raises(OSError) as excinfo:
            (mountpoint / "new.txt").write_bytes(b"no")
        assert excinfo.value.errno == errno.EROFS

        again = pcache(cluster, "mount", "data", str(mountpoint), *worker)
        assert again.returncode == 2 and "already a mount point" in again.stderr

        pid = int(started.stdout.split("(pid ")[1].split(",")[0])
        done = pcache(cluster, "umount", str(mountpoint))
        assert done.returncode == 0, done.stderr
        assert not os.path.ismount(mountpoint)
        deadline = time.monotonic() + 10
        while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:
            time.sleep(0.05)  # the daemon ends once its mount is gone
        assert not Path(f"/proc/{pid}").exists()
    finally:
        force_unmount(mountpoint)
    gone = pcache(cluster, "umount", str(mountpoint))
    assert gone.returncode == 2
    assert gone.stderr.strip().splitlines() == [f"pcache: error: {mountpoint} is not mounted"]


def test_sigterm_unmounts(cluster2, tmp_path: Path) -> None:
    cluster, _ = cluster2
    mount = Mount(cluster, 0, tmp_path / "sig")
    try:
        mount.process.send_signal(signal.SIGTERM)
        assert mount.process.wait(timeout=15) == 0
        assert not os.path.ismount(mount.path)
    finally:
        mount.stop()


@pytest.mark.parametrize("case", ["missing", "not_empty", "not_a_dir"])
def test_bad_mountpoints_are_usage_errors(cluster2, tmp_path: Path, case: str) -> None:
    cluster, _ = cluster2
    target = tmp_path / "mp"
    if case == "not_empty":
        target.mkdir()
        (target / "f").write_text("x")
    elif case == "not_a_dir":
        target.write_text("x")
    result = pcache(cluster, "mount", "data", str(target), "--worker", cluster.nodes[0].address)
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("pcache: error: ")
    assert {"missing": "does not exist", "not_empty": "not empty", "not_a_dir": "not a dir"}[
        case
    ] in lines[0]


def test_unknown_namespace_is_not_found(cluster2, tmp_path: Path) -> None:
    cluster, _ = cluster2
    result = pcache(cluster, "mount", "nope", str(tmp_path), "--worker", cluster.nodes[0].address)
    assert result.returncode == 3
    assert "unknown namespace 'nope'" in result.stderr and not os.path.ismount(tmp_path)


def test_mount_survives_a_worker_restart(mounts, cluster2, store: Store) -> None:
    a, _ = mounts
    cluster, _ = cluster2
    data = os.urandom(3 * MiB)
    store.put("restart/x.bin", data)
    with open(a / "restart/x.bin", "rb") as file:
        assert file.read(MiB) == data[:MiB]
        cluster.kill(cluster.nodes[0])  # mount A's local worker
        assert file.read() == data[MiB:]  # an open file reads from the other worker
        cluster.start(cluster.nodes[0])
    assert (a / "restart/x.bin").read_bytes() == data
    (a / "restart/y.bin").write_bytes(b"after restart")
    assert store.get("restart/y.bin") == b"after restart"


def test_inode_table_lookup_counts() -> None:
    from pcache.fuse_ops import DIR, FILE, InodeTable

    table = InodeTable()
    ino = table.inode("a/b", FILE)
    assert table.inode("a/b", FILE) == ino and table.find("a/b") == ino
    table.remember(ino)
    table.remember(ino)
    table.forget(ino, 1)
    assert table.node(ino).path == "a/b"
    table.move("a/b", "a/c")
    assert table.find("a/b") is None and table.find("a/c") == ino
    table.forget(ino, 1)
    assert table.find("a/c") is None and len(table) == 2  # the root and the control file
    held = table.inode("d", DIR)
    table.remember(held)
    table.forget(held, 1, busy=True)  # an open handle keeps it
    assert table.node(held).path == "d"


def test_errno_mapping() -> None:
    import pyfuse3

    from objstore.errors import (
        AccessDenied,
        EndpointUnreachable,
        InsufficientStorage,
        InvalidKey,
        ObjectNotFound,
    )
    from pcache.fuse_ops import errno_for, fuse_errors

    assert errno_for(ObjectNotFound("x"), "t") == errno.ENOENT
    assert errno_for(AccessDenied("x"), "t") == errno.EACCES
    assert errno_for(InvalidKey("x"), "t") == errno.EINVAL
    assert errno_for(InsufficientStorage("x"), "t") == errno.ENOSPC
    assert errno_for(OSError(errno.ENOSPC, "full"), "t") == errno.ENOSPC
    assert errno_for(EndpointUnreachable("x"), "t") == errno.EIO
    assert errno_for(RuntimeError("bug"), "t") == errno.EIO

    @fuse_errors
    async def broken() -> None:
        raise KeyError("bug")

    import trio

    with pytest.raises(pyfuse3.FUSEError) as excinfo:
        trio.run(broken)
    assert excinfo.value.errno == errno.EIO


# -- statistics, unmount, failures -----------------------------------------------------------


def test_stats_control_file_and_pcache_stats(mounts, cluster2, store: Store, tmp_path) -> None:
    a, _ = mounts
    cluster, _ = cluster2
    data = os.urandom(2 * MiB + 5)
    store.put("stats/x.bin", data)
    assert (a / "stats/x.bin").read_bytes() == data
    with pytest.raises(FileNotFoundError):
        os.stat(a / "stats/missing.bin")
    control = a / ".pcache-stats"
    snapshot = json.loads(control.read_text())
    assert snapshot["source"] == "data" and snapshot["mountpoint"] == str(a)
    assert snapshot["ops"]["read"]["calls"] >= 1 and snapshot["bytes"]["read"] >= len(data)
    lookup = snapshot["ops"]["lookup"]
    assert lookup["errors"].get("ENOENT", 0) >= 1  # errors are counted by errno
    assert lookup["p99_ms"] >= lookup["p50_ms"] > 0
    assert sum(snapshot["blocks_by_source"].values()) >= 3  # 3 blocks of 1 MiB, at least
    assert 0.0 <= snapshot["hit_ratio"]["local"] <= snapshot["hit_ratio"]["cluster"] <= 1.0
    assert snapshot["read_request_bytes"]["max"] >= 128 * 1024  # the kernel's large reads
    if os.geteuid() == 0:  # the mount raised the readahead window: 1 MiB reads, FUSE's largest
        assert snapshot["read_request_bytes"]["max"] == MiB
    assert ".pcache-stats" not in os.listdir(a)  # hidden
    with pytest.raises(PermissionError):
        os.open(control, os.O_WRONLY)
    with pytest.raises(PermissionError):
        os.unlink(control)
    later = json.loads(control.read_text())  # a fresh snapshot on every open
    assert later["ops"]["getattr"]["calls"] + later["ops"]["lookup"]["calls"] > lookup["calls"]

    table = pcache(cluster, "stats", str(a))
    assert table.returncode == 0, table.stderr
    assert "p99 ms" in table.stdout and "read" in table.stdout and "hit ratio" in table.stdout
    as_json = pcache(cluster, "stats", str(a), "--json")
    assert json.loads(as_json.stdout)["ops"]["read"]["calls"] >= 1
    not_mounted = pcache(cluster, "stats", str(tmp_path))
    assert not_mounted.returncode == 2 and "is not mounted" in not_mounted.stderr


def test_umount_of_a_busy_mount_is_a_clear_error(cluster2, store: Store, tmp_path: Path) -> None:
    cluster, _ = cluster2
    store.put("busy/x.txt", b"still open")
    mount = Mount(cluster, 0, tmp_path / "busy")
    try:
        with open(mount.path / "busy/x.txt", "rb") as file:
            result = pcache(cluster, "umount", str(mount.path))
            assert result.returncode == 1
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and "is busy" in lines[0], result.stderr
            assert os.path.ismount(mount.path)
            assert file.read() == b"still open"  # the mount goes on serving
        done = pcache(cluster, "umount", str(mount.path))
        assert done.returncode == 0, done.stderr
        assert mount.process.wait(timeout=15) == 0
    finally:
        mount.stop()


def test_concurrent_reads_of_one_descriptor_get_their_own_bytes(mounts, store: Store) -> None:
    """The kernel sends reads of one descriptor concurrently: cached ones are served without
    the reader's lock while others hold it; each must get the bytes at its own offset."""
    a, _ = mounts
    data = os.urandom(24 * MiB + 5)
    store.put("race/x.bin", data)
    fd = os.open(a / "race/x.bin", os.O_RDONLY)
    errors: list[str] = []

    def reader(seed: int) -> None:
        rng = random.Random(seed)
        for _ in range(120):
            offset = rng.randrange(0, len(data))
            size = rng.choice([4096, 65536, MiB, 3 * MiB])
            if os.pread(fd, size, offset) != data[offset : offset + size]:
                errors.append(f"wrong bytes at {offset}+{size}")
            if rng.random() < 0.2:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)  # reach the mount again

    try:
        threads = [threading.Thread(target=reader, args=(seed,)) for seed in range(6)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(120)
    finally:
        os.close(fd)
    assert errors == []


def test_a_patch_of_a_large_object_where_the_store_cannot_copy_parts(mounts, store: Store) -> None:
    """rclone serve s3 has no UploadPartCopy: the unchanged ranges are read from the store."""
    a, _ = mounts
    data = bytearray(os.urandom(40 * MiB + 1))
    store.put("cow/patched.bin", bytes(data))
    with open(a / "cow/patched.bin", "r+b") as file:
        file.seek(7)
        file.write(b"patch")
        data[7:12] = b"patch"
    assert (a / "cow/patched.bin").read_bytes() == bytes(data)
    deadline = time.monotonic() + 60
    while store.get("cow/patched.bin") != bytes(data):
        assert time.monotonic() < deadline, "the patched object never landed"
        time.sleep(0.2)


def test_a_peer_killed_mid_read(mounts, cluster2, store: Store) -> None:
    a, _ = mounts  # mount A reads through node 0; node 1 serves half the blocks
    cluster, _ = cluster2
    data = os.urandom(12 * MiB)
    store.put("peer/x.bin", data)
    with open(a / "peer/x.bin", "rb") as file:
        assert file.read(MiB) == data[:MiB]
        cluster.kill(cluster.nodes[1])
        try:
            assert file.read() == data[MiB:]
        finally:
            cluster.start(cluster.nodes[1])


def test_requests_time_out_when_the_worker_hangs(cluster2, store: Store, tmp_path: Path) -> None:
    cluster, _ = cluster2
    data = os.urandom(4 * MiB)
    store.put("hang/x.bin", data)
    mount = Mount(cluster, 0, tmp_path / "hang", "--timeout", "5")
    worker = cluster.nodes[0].process
    assert worker is not None
    try:
        with open(mount.path / "hang/x.bin", "rb") as file:
            assert file.read(MiB) == data[:MiB]
            worker.send_signal(signal.SIGSTOP)  # alive but silent: only timeouts notice
            try:
                started = time.monotonic()
                assert file.read() == data[MiB:]  # the other worker serves the rest
                with pytest.raises(FileNotFoundError):  # the other worker answers metadata
                    os.stat(mount.path / "hang/not-seen-before.bin")
                assert time.monotonic() - started < 60  # bounded: no request waits forever
            finally:
                worker.send_signal(signal.SIGCONT)
        assert os.stat(mount.path / "hang/x.bin").st_size == len(data)
    finally:
        mount.stop()


def test_a_random_write_larger_than_the_cache_is_enospc_and_nothing_lands(
    mounts, store: Store
) -> None:
    """A sequential writer goes past the cache by dropping uploaded parts (test_mount_posix);
    one that writes from the end has no part the store could take yet: ENOSPC."""
    a, _ = mounts
    os.mkdir(a / "full")
    fd = os.open(a / "full/huge.bin", os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    chunk = os.urandom(MiB)
    with pytest.raises(OSError) as excinfo:
        for index in reversed(range(200)):  # 200 MiB through a 64 MiB cache, from the end
            os.pwrite(fd, chunk, index * MiB)
    assert excinfo.value.errno == errno.ENOSPC
    with pytest.raises(OSError):
        os.close(fd)  # the failed file is not committed, and close says so
    assert not store.exists("full/huge.bin")
    (a / "full/small.bin").write_bytes(b"space again")  # the staged bytes were released
    assert store.get("full/small.bin") == b"space again"


def test_allow_other_with_an_owner(cluster2, store: Store, tmp_path: Path) -> None:
    cluster, _ = cluster2
    store.put("shared/x.txt", b"for everyone")
    nobody = 65534
    as_nobody = {"user": nobody, "group": nobody, "capture_output": True, "timeout": 30}
    private = Mount(cluster, 0, tmp_path / "private")
    try:  # without allow_other only the mounting user gets in
        denied = subprocess.run(["cat", str(private.path / "shared/x.txt")], **as_nobody)
        assert denied.returncode != 0 and b"Permission denied" in denied.stderr
    finally:
        private.stop()
    public = Path(tempfile.mkdtemp(prefix="pcache-allow-other-"))  # nobody can reach it
    os.chmod(public, 0o755)
    mount = Mount(
        cluster, 0, public / "mnt", "--allow-other", "--uid", "65534", "--gid", "65534",
        "--durability", "remote",  # close returns once the file is in the store
    )  # fmt: skip
    try:
        info = os.stat(mount.path / "shared/x.txt")
        assert (info.st_uid, info.st_gid) == (nobody, nobody)
        read = subprocess.run(["cat", str(mount.path / "shared/x.txt")], **as_nobody)
        assert read.returncode == 0 and read.stdout == b"for everyone"
        target = mount.path / "shared/by-nobody.txt"
        wrote = subprocess.run(["sh", "-c", f"echo hi > {target}"], **as_nobody)
        assert wrote.returncode == 0, wrote.stderr
        assert store.get("shared/by-nobody.txt") == b"hi\n"
    finally:
        mount.stop()
        shutil.rmtree(public, ignore_errors=True)


# -- mount.pcache, fstab and systemd -----------------------------------------------------------


def test_mount_helper_translates_mount_options() -> None:
    from pcache.mount_helper import MountHelperError, pcache_argv

    argv = pcache_argv(
        "data/x", "/mnt/x",
        ["-o", "ro,immutable,allow_other,uid=5,gid=6,config=/etc/p.toml,_netdev,nofail,"
         "x-systemd.requires=pcache-worker.service,defaults", "-v"],
    )  # fmt: skip
    assert argv == [
        "mount", "data/x", "/mnt/x", "--read-only", "--immutable", "--allow-other",
        "--uid", "5", "--gid", "6", "--config", "/etc/p.toml", "-v",
    ]  # fmt: skip
    assert pcache_argv("d", "/m", ["-orw,timeout=3"]) == ["mount", "d", "/m", "--timeout", "3"]
    assert pcache_argv("d", "/m", ["-o", "durability=remote,sync_timeout=9,negative_ttl=2"]) == [
        "mount", "d", "/m", "--durability", "remote", "--sync-timeout", "9", "--negative-ttl", "2",
    ]  # fmt: skip
    assert pcache_argv("d", "/m", ["-f", "-o", "ro"]) == []  # mount -f: pretend
    for bad, message in (
        (["-o", "rw,cache=huge"], "unknown mount option 'cache=huge'"),
        (["-o", "config="], "needs a value"),
        (["-o"], "needs a value"),
        (["--what"], "unexpected argument"),
    ):
        with pytest.raises(MountHelperError, match=message):
            pcache_argv("d", "/m", bad)


def test_mount_helper_mounts_like_mount_t_pcache(cluster2, store: Store, tmp_path: Path) -> None:
    cluster, _ = cluster2
    store.put("helper/x.txt", b"via mount.pcache")
    mountpoint = tmp_path / "helper"
    mountpoint.mkdir()
    log = tmp_path / "helper.log"
    options = f"ro,immutable,worker={cluster.nodes[0].address},log={log},_netdev,nofail"
    result = subprocess.run(
        [sys.executable, "-m", "pcache.mount_helper", "data/helper", str(mountpoint), "-o", options],
        cwd=ROOT, env=_env(cluster), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    try:
        assert result.returncode == 0, result.stderr + (log.read_text() if log.exists() else "")
        assert (mountpoint / "x.txt").read_bytes() == b"via mount.pcache"
        with pytest.raises(OSError) as excinfo:
            (mountpoint / "y.txt").write_bytes(b"no")
        assert excinfo.value.errno == errno.EROFS
    finally:
        force_unmount(mountpoint)
    bad = subprocess.run(
        [sys.executable, "-m", "pcache.mount_helper", "data", str(mountpoint), "-o", "bogus"],
        cwd=ROOT, env=_env(cluster), capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert (
        bad.returncode == 2 and bad.stderr.strip() == "mount.pcache: unknown mount option 'bogus'"
    )


@pytest.mark.integration  # starts a process
def test_install_script_puts_the_helper_and_units_in_place(tmp_path: Path) -> None:
    script = ROOT / "deploy/pcache/install.sh"
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "mount.pcache").exists():
        pytest.skip("the package is not installed with its scripts (make setup installs them)")
    run = [str(script), "--root", str(tmp_path), "--bin", str(bin_dir)]
    result = subprocess.run(run, capture_output=True, text=True, timeout=30)
    assert result.returncode == 0, result.stderr
    helper = tmp_path / "sbin/mount.pcache"
    assert helper.is_symlink() and os.readlink(helper) == str(bin_dir / "mount.pcache")
    unit = (tmp_path / "etc/systemd/system/pcache-worker.service").read_text()
    assert f"ExecStart={bin_dir}/pcache worker" in unit and "@PCACHE_BIN@" not in unit
    assert stat.S_IMODE(os.stat(tmp_path / "etc/pcache/env").st_mode) == 0o600
    config = tmp_path / "etc/pcache/pcache.toml"
    config.write_text("# edited\n")
    assert subprocess.run(run, capture_output=True, timeout=30).returncode == 0
    assert config.read_text() == "# edited\n"  # never overwritten
    wrong = subprocess.run(
        [str(script), "--root", str(tmp_path), "--bin", str(tmp_path)],
        capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert wrong.returncode == 2 and "is missing (pip install the package)" in wrong.stderr


def test_cached_files_read_through_a_store_outage(rclone_s3: Any, tmp_path: Path) -> None:
    """Issue 18's reproduction: 20 warmed files, short TTLs, the store cut off; past every
    TTL the directory still lists and every file reads back whole (stale-if-error)."""
    proxy = FaultProxy(rclone_s3.endpoint).start()
    factory = ClusterFactory(rclone_s3, tmp_path / "cluster")
    try:
        profile = rclone_s3.profile(endpoint=proxy.endpoint, max_attempts=2, retry_deadline=2.0)
        cluster, store = factory(1, profile=profile, metadata_ttl=1.0, negative_ttl=1.0)
        files = {f"ds/f{i:02d}.bin": os.urandom(100_000 + i) for i in range(20)}
        for key, data in files.items():
            store.put(key, data)
        mount = Mount(cluster, 0, tmp_path / "mnt")
        try:
            names = sorted(key.split("/")[1] for key in files)
            for key, data in files.items():
                assert (mount.path / key).read_bytes() == data
            assert sorted(os.listdir(mount.path / "ds")) == names
            proxy.outage(True)
            time.sleep(2.5)  # past every TTL, the worker's and the mount's
            assert stat.S_ISDIR(os.stat(mount.path / "ds").st_mode)  # cd ds
            assert sorted(os.listdir(mount.path / "ds")) == names
            for key, data in files.items():
                assert (mount.path / key).read_bytes() == data
            with pytest.raises(OSError) as excinfo:  # never cached: an error, not a hang
                (mount.path / "ds/never-seen.bin").read_bytes()
            assert excinfo.value.errno in (errno.EIO, errno.ENOENT)
            # write-back goes on: a new name in a listed directory is created and closed
            (mount.path / "ds/during.txt").write_bytes(b"written while the store was down")
            assert (mount.path / "ds/during.txt").read_bytes().startswith(b"written")
            assert "during.txt" in os.listdir(mount.path / "ds")
            proxy.outage(False)
            deadline = time.monotonic() + 60
            while True:  # and it catches up once the store is back
                try:
                    assert store.get("ds/during.txt") == b"written while the store was down"
                    break
                except FileNotFoundError:
                    assert time.monotonic() < deadline, mount.logs()
                    time.sleep(0.5)
        finally:
            mount.stop()
    finally:
        factory.close()
        proxy.stop()


def _warm_files_on_a_mount(
    cluster: PcacheCluster,
    store: Store,
    tmp_path: Path,
    directory: str,
    count: int,
    size: int,
    *extra: str,
) -> tuple[dict[str, bytes], PcacheMount]:
    """``count`` files of about ``size`` bytes put in the store under ``directory``, a mount of
    node 0 with the node's own config (its profiles, as deployed: the client can reach the
    store itself), and every file read once through it (cached)."""
    node = cluster.nodes[0]
    files = {f"{directory}/f{i}.bin": os.urandom(size + i) for i in range(count)}
    for key, data in files.items():
        store.put(key, data)
    mount = PcacheMount(
        node.address,
        cluster.token,
        tmp_path / "mnt",
        *extra,
        env={"PCACHE_CONFIG": str(node.config_path)},
    )
    try:
        for key, data in files.items():
            assert (mount.path / key).read_bytes() == data
    except BaseException:
        mount.stop()
        raise
    return files, mount


def test_reads_go_on_while_the_worker_is_killed_and_restarted(
    rclone_s3: Any, tmp_path: Path
) -> None:
    """Issue 18's reproduction: a reader loops over 8 cached files through the mount while the
    node's only worker is SIGKILLed and restarted: a restart costs latency, never an error
    (lookups fall back to the store itself, cached blocks are read from the cache files)."""
    factory = ClusterFactory(rclone_s3, tmp_path / "cluster")
    try:
        cluster, store = factory(1)
        node = cluster.nodes[0]
        files, mount = _warm_files_on_a_mount(cluster, store, tmp_path, "hot", 8, 300_000)
        try:
            errors: list[str] = []
            reads = 0
            stop = threading.Event()

            def reader() -> None:
                nonlocal reads
                while not stop.is_set():
                    for key, data in files.items():
                        try:
                            got = (mount.path / key).read_bytes()
                        except OSError as exc:
                            errors.append(f"{key}: {exc}")
                            continue
                        if got != data:
                            errors.append(f"{key}: wrong bytes")
                        reads += 1

            thread = threading.Thread(target=reader)
            thread.start()
            try:
                for _ in range(4):
                    time.sleep(1.5)
                    cluster.kill(node)
                    time.sleep(1.0)
                    cluster.start(node)
            finally:
                stop.set()
                thread.join(timeout=60)
            assert reads > 0 and errors == [], (reads, errors[:5])
        finally:
            mount.stop()
    finally:
        factory.close()


def _libc_readdir_names(path: Path, first: int) -> tuple[list[str], list[str], list[str]]:
    """With libc's opendir/readdir/telldir/seekdir: the first ``first`` names, the rest, and
    the rest again after seeking back to the offset telldir gave after the first ones."""
    import ctypes
    import ctypes.util

    class Dirent(ctypes.Structure):
        _fields_ = [
            ("d_ino", ctypes.c_uint64),
            ("d_off", ctypes.c_int64),
            ("d_reclen", ctypes.c_ushort),
            ("d_type", ctypes.c_ubyte),
            ("d_name", ctypes.c_char * 256),
        ]

    libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
    libc.opendir.restype = ctypes.c_void_p
    libc.readdir.restype = ctypes.POINTER(Dirent)
    libc.readdir.argtypes = [ctypes.c_void_p]
    libc.telldir.restype = ctypes.c_long
    libc.telldir.argtypes = [ctypes.c_void_p]
    libc.seekdir.argtypes = [ctypes.c_void_p, ctypes.c_long]
    libc.closedir.argtypes = [ctypes.c_void_p]
    handle = libc.opendir(os.fsencode(path))
    assert handle, os.strerror(ctypes.get_errno())

    def read(limit: int | None) -> list[str]:
        names = []
        while limit is None or len(names) < limit:
            entry = libc.readdir(handle)
            if not entry:
                return names
            name = entry.contents.d_name.decode()
            if name not in (".", ".."):
                names.append(name)
        return names

    try:
        head = read(first)
        mark = libc.telldir(handle)
        rest = read(None)
        libc.seekdir(handle, mark)
        again = read(None)
    finally:
        libc.closedir(handle)
    return head, rest, again


def test_a_directory_longer_than_a_page_reads_whole_and_resumes_at_any_offset(
    mounts, store: Store
) -> None:
    """readdir pages through the worker (1,000 names a page): every name once, in order,
    and seekdir back to any telldir offset, past page boundaries, resumes there."""
    a, _ = mounts
    names = [f"n{i:04d}" for i in range(1150)] + ["ünï.txt", "zz"]
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda n: store.put(f"paged/{n}", b"x"), names))
    store.put("paged/sub/inner", b"y")
    expected = sorted([*names, "sub"])
    assert sorted(os.listdir(a / "paged")) == expected
    head, rest, again = _libc_readdir_names(a / "paged", 1050)
    assert len(head) == 1050 and head + rest == expected == sorted(head + rest)
    assert again == rest  # resumed on the second page
    listed = subprocess.run(["ls", "-f", str(a / "paged")], capture_output=True, text=True)
    assert listed.stdout.split()[:2] == [".", ".."]  # as POSIX directories have them
    assert sorted(listed.stdout.split()[2:]) == expected
    assert (a / "paged" / "ünï.txt").read_bytes() == b"x"
    assert os.stat(a / "paged" / "n1149").st_size == 1


def test_cached_files_read_with_the_worker_down_and_the_store_cut_off(
    rclone_s3: Any, tmp_path: Path
) -> None:
    """Issue 18 item 4: with the node's worker killed and the store unreachable too, the mount
    answers from what it last learned (lookups, attributes, the directory) and reads cached
    blocks from the cache files: every warmed file reads back; a never-seen name is an error."""
    proxy = FaultProxy(rclone_s3.endpoint).start()
    factory = ClusterFactory(rclone_s3, tmp_path / "cluster")
    try:
        profile = rclone_s3.profile(endpoint=proxy.endpoint, max_attempts=2, retry_deadline=2.0)
        cluster, store = factory(1, profile=profile)
        node = cluster.nodes[0]
        files, mount = _warm_files_on_a_mount(
            cluster, store, tmp_path, "kept", 6, 200_000, "--timeout", "3"
        )
        try:
            assert sorted(os.listdir(mount.path / "kept")) == sorted(k[5:] for k in files)
            cluster.kill(node)
            proxy.outage(True)
            time.sleep(1.5)  # past the kernel's attribute timeout
            assert sorted(os.listdir(mount.path / "kept")) == sorted(k[5:] for k in files)
            for key, data in files.items():
                assert os.stat(mount.path / key).st_size == len(data)
                assert (mount.path / key).read_bytes() == data
            started = time.monotonic()
            with pytest.raises(OSError) as excinfo:
                (mount.path / "kept/never-seen.bin").read_bytes()
            assert excinfo.value.errno in (errno.EIO, errno.ENOENT)
            assert time.monotonic() - started < 30  # an error, not a hang
        finally:
            mount.stop()
    finally:
        factory.close()
        proxy.stop()


def test_a_mount_started_before_its_worker_reads_the_store_from_its_config(
    rclone_s3: Any, tmp_path: Path
) -> None:
    """Issue 18 item 5: ``pcache mount --config`` on a node whose worker is not up (yet)
    mounts, lists and reads from the backends and profiles of that file; a write fails with
    ``EIO`` at once; once the worker is up, the mount goes through it (a write lands)."""
    factory = ClusterFactory(rclone_s3, tmp_path / "cluster")
    try:
        cluster, store = factory(1, start=False)
        node = cluster.nodes[0]
        data = os.urandom(1_500_000)
        store.put("early/a.bin", data)
        store.put("early/b.txt", b"b")
        mount = PcacheMount(
            node.address, cluster.token, tmp_path / "m", "--config", str(node.config_path)
        )
        try:
            assert sorted(os.listdir(mount.path / "early")) == ["a.bin", "b.txt"]
            assert (mount.path / "early/a.bin").read_bytes() == data
            assert os.stat(mount.path / "early/b.txt").st_size == 1
            started = time.monotonic()
            with pytest.raises(OSError) as excinfo:
                (mount.path / "early/new.txt").write_bytes(b"new")
            assert excinfo.value.errno == errno.EIO
            assert time.monotonic() - started < 10  # an error, not a hang
            cluster.start()
            deadline = time.monotonic() + 30
            while True:  # the client asks for a worker again every few seconds
                try:
                    (mount.path / "early/new.txt").write_bytes(b"new")
                    break
                except OSError:
                    assert time.monotonic() < deadline, mount.logs()
                    time.sleep(0.5)
            os.sync()
            assert (mount.path / "early/new.txt").read_bytes() == b"new"
            snapshot = json.loads((mount.path / ".pcache-stats").read_text())
            assert snapshot["blocks_by_source"].get("direct", 0) >= 2  # the store, no worker
        finally:
            mount.stop()
    finally:
        factory.close()
