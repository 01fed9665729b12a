#!/usr/bin/env python3
"""``pcache mount`` against ``rclone mount`` (and Debian's ``s3fs``) on metadata at dataset
scale: one flat directory of FLAT zero-length objects and a tree of DIRS x PER_DIR (issue 18).

The store is :mod:`tests.servers.static_s3` in a process of its own: a listing server over an
in-memory sorted key list (every key a zero-length object, HEAD included), which answers a page
in well under a millisecond, so what is measured is the file systems, not the store. It checks
no signatures (benchmark only). Every contender mounts the same bucket of the same server.

Measured per contender (``cold``: a fresh mount, and for pcache a worker whose metadata was
dropped; ``warm``: the same again at once):

- ``ls -f`` of the flat directory (every name checked), cold and warm, and the RSS growth of
  the file system's processes while listing (pcache: the mount and the worker; each sampled
  every 20 ms, growth = peak minus the value before the cold listing);
- ``find``: ``os.walk`` over the tree with an ``lstat`` of every file, cold and warm;
- ``stat`` of one named file in the flat directory, cold (the directory itself looked up
  first, not counted): the store requests it cost (list pages + object HEADs, counted by the
  server) and its time.

Targets (issue 18): ``ls -f`` and ``find`` cold and warm >= 3x rclone mount; RSS growth while
listing <= 200 MB; the cold ``stat`` <= 2 requests to the store.

    .venv/bin/python bench/mount_metadata.py [--flat 100000] [--dirs 200] [--per-dir 100]
        [--only pcache,rclone,s3fs] [--store-delay-ms 0] [--json]

``--store-delay-ms N`` puts a delay proxy in front of the server (each request waits N ms, as
across a network to a real store), where fetching the next listing page ahead of its reader
shows.

The issue's scale is ``--flat 1000000 --dirs 2000 --per-dir 100``; the default is a tenth of
it, which this 2-core machine lists in minutes per contender. s3fs HEADs every file it lists,
so it is off by default (``--only pcache,rclone,s3fs`` adds it).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.listing import BUCKET, ProxyProcess, StaticProcess  # noqa: E402
from bench.measure import RssPeak, drop_caches  # noqa: E402
from bench.mount_vs_peers import RcloneMount, S3fsMount  # noqa: E402
from objstore.config import Secret  # noqa: E402
from pcache.client import PcacheClient  # noqa: E402
from pcache.config import ClientConfig  # noqa: E402
from tests.servers.pcache_cluster import PcacheCluster  # noqa: E402
from tests.servers.pcache_mount import PcacheMount, force_unmount  # noqa: E402

MiB = 1 << 20
TARGET_VS_RCLONE = 3.0
RSS_LIMIT_MB = 200.0
STAT_REQUESTS = 2


def timed(fn: Callable[[], None]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def ls_f(directory: Path, expected: int) -> None:
    done = subprocess.run(["ls", "-f", str(directory)], capture_output=True)
    if done.returncode != 0:
        raise RuntimeError(f"ls -f {directory}: {done.stderr.decode().strip()}")
    names = [n for n in done.stdout.split(b"\n") if n and n not in (b".", b"..")]
    if len(names) != expected:
        raise RuntimeError(f"ls -f {directory}: {len(names)} names, expected {expected}")


def walk_stat(directory: Path, expected: int) -> None:
    """``os.walk`` with an ``lstat`` of every file, the flat directory left out."""
    files = 0
    for top, dirs, names in os.walk(directory):
        if top == str(directory):
            dirs[:] = [d for d in dirs if d != "flat"]
        for name in names:
            os.lstat(os.path.join(top, name))
            files += 1
    if files != expected:
        raise RuntimeError(f"find {directory}: {files} files, expected {expected}")


class DelayedStore:
    """The static server behind a delay proxy (``--store-delay-ms``): each request waits that
    long first, as across a network to a real store; counts are the server's."""

    def __init__(self, server: StaticProcess, delay_s: float) -> None:
        self.server = server
        self.proxy = ProxyProcess(server.port, delay_s)
        self.endpoint = self.proxy.endpoint
        self.access_key_id = server.access_key_id
        self.secret_access_key = server.secret_access_key

    def counts(self) -> tuple[int, int]:
        return self.server.counts()

    def stop(self) -> None:
        self.proxy.stop()


class Contender:
    """One file system over the static server: ``fresh()`` mounts it anew (cold)."""

    name = ""

    def fresh(self) -> Path:
        raise NotImplementedError

    def pids(self) -> list[int]:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError


class Pcache(Contender):
    name = "pcache"

    def __init__(self, server: StaticProcess, work: Path) -> None:
        profile = {
            "endpoint": server.endpoint,
            "access_key_id": server.access_key_id,
            "secret_access_key": server.secret_access_key,
            "region": "us-east-1",
            "addressing_style": "path",
        }
        self.work = work
        self.cluster = PcacheCluster(
            work / "cluster", {"s3": profile}, {"data": f"s3://s3@{BUCKET}/"}, nodes=1,
            capacity=1024 * MiB, block_size="4MiB",
        )  # fmt: skip
        self.cluster.start()
        node = self.cluster.nodes[0]
        self.client = PcacheClient(
            ClientConfig(worker=node.address, token=Secret(self.cluster.token))
        )
        self.mount: PcacheMount | None = None

    def fresh(self) -> Path:
        if self.mount is not None:
            self.mount.stop()
        self.client.invalidate("data/", cluster=True, blocks=False)  # the worker forgets too
        node = self.cluster.nodes[0]
        self.mount = PcacheMount(node.address, self.cluster.token, self.work / "mnt-pcache")
        return self.mount.path

    def pids(self) -> list[int]:
        node = self.cluster.nodes[0]
        assert self.mount is not None and node.process is not None
        return [self.mount.process.pid, node.process.pid]

    def stop(self) -> None:
        if self.mount is not None:
            self.mount.stop()
        self.cluster.stop()


class Foreground(Contender):
    """rclone mount or s3fs, restarted for every cold run."""

    def __init__(self, name: str, start: Callable[[], Any]) -> None:
        self.name = name
        self._start = start
        self.mount: Any = None

    def fresh(self) -> Path:
        if self.mount is not None:
            self.mount.stop()
        self.mount = self._start()
        return self.mount.path

    def pids(self) -> list[int]:
        return [self.mount.process.pid]

    def stop(self) -> None:
        if self.mount is not None:
            self.mount.stop()


def measure(
    contender: Contender, server: StaticProcess, args: argparse.Namespace
) -> dict[str, float]:
    row: dict[str, float] = {}
    tree_files = args.dirs * args.per_dir
    mnt = contender.fresh()
    drop_caches()
    with RssPeak(contender.pids(), interval=0.02) as rss:
        row["ls -f flat, cold (s)"] = timed(lambda: ls_f(mnt / "flat", args.flat))
        row["ls -f flat, warm (s)"] = timed(lambda: ls_f(mnt / "flat", args.flat))
    row["RSS growth listing (MB)"] = (rss.peak - rss.before) / 1e6
    mnt = contender.fresh()
    drop_caches()
    row["find + stat tree, cold (s)"] = timed(lambda: walk_stat(mnt, tree_files))
    row["find + stat tree, warm (s)"] = timed(lambda: walk_stat(mnt, tree_files))
    mnt = contender.fresh()
    drop_caches()
    name = mnt / "flat" / f"shard-{args.flat // 2:07d}.bin"
    os.stat(mnt / "flat")  # the directory's own lookup is not counted
    pages, heads = server.counts()
    row["stat one name, cold (ms)"] = timed(lambda: os.stat(name)) * 1e3
    after_pages, after_heads = server.counts()
    row["stat one name, cold (store requests)"] = (after_pages - pages) + (after_heads - heads)
    return row


LOWER_IS_BETTER = {"RSS growth listing (MB)", "stat one name, cold (store requests)"}


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--flat", type=int, default=100_000, help="objects in flat/ (100,000)")
    parser.add_argument("--dirs", type=int, default=200, help="directories of the tree (200)")
    parser.add_argument("--per-dir", type=int, default=100, help="objects per directory (100)")
    parser.add_argument("--only", default="pcache,rclone", help="pcache,rclone,s3fs")
    parser.add_argument(
        "--store-delay-ms",
        type=float,
        default=0.0,
        help="delay every store request this long (a delay proxy in front of the server: the "
        "latency of a real store; 0, the default, measures the file systems alone)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    selected = args.only.split(",")
    results: dict[str, dict[str, float]] = {}
    static = StaticProcess((args.dirs, args.per_dir, args.flat))
    server: Any = static
    if args.store_delay_ms > 0:
        server = DelayedStore(static, args.store_delay_ms / 1000)
    print(f"static listing server: {args.flat:,} flat + {args.dirs:,} x {args.per_dir:,} keys, "
          f"{args.store_delay_ms:g} ms added per store request", file=sys.stderr)  # fmt: skip
    try:
        with tempfile.TemporaryDirectory(prefix="mount-meta-", dir="/var/tmp") as tmp:
            work = Path(tmp)
            makers: dict[str, Callable[[], Contender]] = {
                "pcache": lambda: Pcache(server, work),
                "rclone": lambda: Foreground(
                    "rclone",
                    lambda: RcloneMount(server, BUCKET, work / "mnt-rclone", work / "rclone-cache"),
                ),
                "s3fs": lambda: Foreground(
                    "s3fs", lambda: S3fsMount(server, BUCKET, work / "mnt-s3fs", work)
                ),
            }
            for name in selected:
                if name == "s3fs" and not shutil.which("s3fs"):
                    continue
                print(f"{name} ...", file=sys.stderr)
                contender = makers[name]()
                try:
                    for measurement, value in measure(contender, server, args).items():
                        results.setdefault(measurement, {})[name] = value
                finally:
                    contender.stop()
                    for mnt in ("mnt-pcache", "mnt-rclone", "mnt-s3fs"):
                        force_unmount(work / mnt)
    finally:
        if server is not static:
            server.stop()
        static.stop()
    failed = report(results, args)
    return 1 if failed else 0


def report(results: dict[str, dict[str, float]], args: argparse.Namespace) -> bool:
    rows = []
    failed = False
    for measurement, row in results.items():
        pcache, rclone = row.get("pcache"), row.get("rclone")
        ratio = None
        if pcache and rclone and measurement not in LOWER_IS_BETTER:
            ratio = rclone / pcache  # times: how many times faster
        verdict = ""
        if ratio is not None:
            ok = ratio >= TARGET_VS_RCLONE
            verdict = f">= {TARGET_VS_RCLONE:g}x rclone: {'PASS' if ok else 'FAIL'}"
        elif measurement.startswith("RSS") and pcache is not None:
            ok = pcache <= RSS_LIMIT_MB
            verdict = f"<= {RSS_LIMIT_MB:g} MB: {'PASS' if ok else 'FAIL'}"
        elif measurement.endswith("(store requests)") and pcache is not None:
            ok = pcache <= STAT_REQUESTS
            verdict = f"<= {STAT_REQUESTS}: {'PASS' if ok else 'FAIL'}"
        else:
            ok = True
        failed |= not ok
        rows.append((measurement, row, ratio, verdict))
    if args.json:
        print(json.dumps({
            "flat": args.flat, "dirs": args.dirs, "per_dir": args.per_dir, "cpus": os.cpu_count(),
            "results": {m: {"values": r, "pcache_speedup_vs_rclone": x, "verdict": v}
                        for m, r, x, v in rows},
        }, indent=2))  # fmt: skip
        return failed
    names = ["pcache", "rclone", "s3fs"]
    print(f"\n{args.flat:,} flat objects, tree of {args.dirs:,} x {args.per_dir:,}, "
          f"{os.cpu_count()} CPUs, static listing server (tests/servers/static_s3.py)")  # fmt: skip
    print(f"{'measurement':38} | " + " | ".join(f"{n:>9}" for n in names)
          + " | pcache speed-up vs rclone | target")  # fmt: skip
    print("-" * 38 + " | " + " | ".join("-" * 9 for _ in names) + " | --------- | ------")
    for measurement, row, ratio, verdict in rows:
        cells = " | ".join(f"{row[n]:>9.3g}" if n in row else f"{'-':>9}" for n in names)
        speed = f"{ratio:.2f}x" if ratio is not None else "-"
        print(f"{measurement:38} | {cells} | {speed:>9} | {verdict}")
    return failed


if __name__ == "__main__":
    sys.exit(main())
