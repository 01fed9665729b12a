"""The mount at dataset scale (issue 18): one flat directory of 1,000,000 objects.

The store is :mod:`tests.servers.static_s3` in a process of its own (a listing server over a
fixed key list, zero-length objects; it does not check signatures: a protocol-level stand-in,
because ``rclone serve s3`` spends ~0.8 s of CPU per page of a directory this size). What is
measured is pcache's own memory: the peak RSS of the mount and of the worker while the whole
directory is listed through the mount, against a generous bound.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.servers.pcache_cluster import PcacheCluster
from tests.servers.pcache_mount import PcacheMount
from tests.servers.static_s3 import StaticS3Server

ROOT = Path(__file__).resolve().parents[2]
ENTRIES = 1_000_000
# issue 18's benchmark bound is 200 MB each; the test's is looser (allocator and Python
# versions move it), and still fails a listing held whole (~1 KiB an entry: >= 1 GB)
GROWTH_BOUND = 400 << 20

pytestmark = [
    pytest.mark.slow,
    pytest.mark.integration,
    pytest.mark.skipif(
        not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None,
        reason="FUSE mount tests need /dev/fuse and fusermount3",
    ),
]


def _status(pid: int, field: str) -> int:
    """A ``/proc/PID/status`` memory field, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise LookupError(field)


def _reset_peak(pid: int) -> None:
    """Start the process's peak RSS (VmHWM) over from its current RSS."""
    Path(f"/proc/{pid}/clear_refs").write_text("5")


@pytest.fixture(scope="module")
def static_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    work = tmp_path_factory.mktemp("static")
    keys = work / "keys.txt"
    keys.write_text("".join(f"flat/shard-{i:07d}.bin\n" for i in range(ENTRIES)))
    server = subprocess.Popen(
        [sys.executable, "-m", "tests.servers.static_s3", "bench", str(keys)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stdout is not None
        port = int(server.stdout.readline())
        yield f"http://127.0.0.1:{port}"
    finally:
        server.kill()
        server.wait(10)


def test_a_million_entry_directory_lists_through_the_mount_in_bounded_memory(
    static_store: str, tmp_path: Path
) -> None:
    profile = {
        "endpoint": static_store,
        "access_key_id": StaticS3Server.access_key_id,
        "secret_access_key": StaticS3Server.secret_access_key,
        "region": "us-east-1",
        "addressing_style": "path",
    }
    cluster = PcacheCluster(
        tmp_path / "cluster", {"s3": profile}, {"data": "s3://s3@bench/"}, nodes=1
    )
    cluster.start()
    try:
        node = cluster.nodes[0]
        mount = PcacheMount(node.address, cluster.token, tmp_path / "mnt")
        try:
            assert node.process is not None
            pids = {"mount": mount.process.pid, "worker": node.process.pid}
            before = {name: _status(pid, "VmRSS") for name, pid in pids.items()}
            for pid in pids.values():
                _reset_peak(pid)
            started = time.monotonic()
            count, first, last = 0, "", ""
            with os.scandir(mount.path / "flat") as entries:
                for entry in entries:
                    first = first or entry.name
                    last = entry.name
                    count += 1
            assert count == ENTRIES
            assert first == "shard-0000000.bin" and last == f"shard-{ENTRIES - 1:07d}.bin"
            growth = {name: _status(pid, "VmHWM") - before[name] for name, pid in pids.items()}
            print(
                f"listed {count:,} names in {time.monotonic() - started:.1f} s; RSS growth (MiB):",
                {k: v >> 20 for k, v in growth.items()},
            )
            for name, grew in growth.items():
                assert grew <= GROWTH_BOUND, f"the {name} grew {grew >> 20} MiB"
            # a lookup of one name still answers at once (no listing of the directory)
            assert os.stat(mount.path / "flat/shard-0500000.bin").st_size == 0
        finally:
            mount.stop()
    finally:
        cluster.stop()
