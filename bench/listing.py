#!/usr/bin/env python3
"""Benchmark babel_sync's parallel lister against a serial ListObjectsV2 walk and rclone.

The bucket: ``--prefixes`` prefixes of ``--per-prefix`` keys each plus one flat prefix of
``--flat`` keys (defaults: the issue's 200 x 1,000 + 100,000), served by ``rclone serve s3``
behind a DelayProxy adding ``--delay-ms`` of round trip per request (default 20 ms). The files
are created directly in the server's root directory before it starts (zero-byte files), which
is far faster than 300,000 PUTs. Three listers run in the same invocation, all through the
proxy, each must return every key:

- serial: ``list_serial`` (one ListObjectsV2 page after another, 1,000 keys each);
- parallel: ``ParallelLister`` with ``--workers`` threads;
- rclone: ``rclone lsf -R --fast-list --files-only`` (Go; one recursive listing).

A warm-up pass (the parallel lister straight at the server, not timed) first fills rclone
serve's directory cache, so no contender pays for cold disk reads. The proxy runs in a child
process, so its per-byte work does not compete with the Python listers for the GIL. Targets
(from the issue): parallel at least 15x faster than serial and at least 5x faster than rclone.
CPU seconds of the benchmark process and of the rclone server are reported per contender:
when they approach wall time x cores, the run is CPU-bound and latency hiding cannot help.

Usage: python bench/listing.py [--prefixes 200] [--per-prefix 1000] [--flat 100000]
       [--delay-ms 20] [--workers 64] [--page-size 1000] [--root DIR] [--json]
Exit status 1 if a contender misses keys or a target is missed.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import multiprocessing.connection
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

# Run from anywhere: the repository root holds the packages and the test servers.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from babel_sync.listing import ParallelLister, list_serial
from objstore import Config, ObjectInfo, open_store
from tests.servers.proxies import DelayProxy
from tests.servers.rclone_s3 import RcloneS3Server, rclone_binary

TARGET_VS_SERIAL = 15.0
TARGET_VS_RCLONE = 5.0
BUCKET = "bench"


def make_tree(root: Path, prefixes: int, per_prefix: int, flat: int) -> int:
    """Create the bucket's files (zero bytes) under ``root/BUCKET``; reuse a finished tree."""
    bucket = root / BUCKET
    marker = root / f".tree-{prefixes}-{per_prefix}-{flat}"
    if marker.exists():
        return prefixes * per_prefix + flat
    shutil.rmtree(bucket, ignore_errors=True)
    for p in range(prefixes):
        directory = bucket / f"p{p:04d}"
        directory.mkdir(parents=True)
        for k in range(per_prefix):
            os.close(os.open(directory / f"obj-{k:06d}.bin", os.O_CREAT | os.O_WRONLY, 0o644))
    directory = bucket / "flat"
    directory.mkdir(parents=True, exist_ok=True)
    for i in range(flat):
        os.close(os.open(directory / f"shard-{i:07d}.bin", os.O_CREAT | os.O_WRONLY, 0o644))
    marker.touch()
    return prefixes * per_prefix + flat


def _proxy_main(port: int, delay_s: float, conn: multiprocessing.connection.Connection) -> None:
    with DelayProxy("127.0.0.1", port, delay_s) as proxy:
        conn.send(proxy.port)
        conn.recv()  # block until the parent says stop


class ProxyProcess:
    """A DelayProxy in a child process (its asyncio loop would otherwise share our GIL)."""

    def __init__(self, upstream_port: int, delay_s: float) -> None:
        ctx = multiprocessing.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_proxy_main, args=(upstream_port, delay_s, child))
        self._proc.start()
        if not self._conn.poll(60):
            raise RuntimeError("delay proxy did not start")
        self.endpoint = f"http://127.0.0.1:{self._conn.recv()}"

    def stop(self) -> None:
        self._conn.send("stop")
        self._proc.join(30)


def process_cpu(pid: int | None) -> float:
    """User + system CPU seconds of a process (Linux /proc; 0 where unavailable)."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except OSError:
        return 0.0


def measure(name: str, fn: Any, server_pid: int | None) -> dict[str, Any]:
    server0, cpu0, start = process_cpu(server_pid), time.process_time(), time.perf_counter()
    keys, extra = fn()
    seconds = time.perf_counter() - start
    return {
        "name": name,
        "seconds": seconds,
        "keys": keys,
        "keys_per_s": keys / seconds,
        "client_cpu_s": time.process_time() - cpu0,
        "server_cpu_s": process_cpu(server_pid) - server0,
        **extra,
    }


def run_serial(store: Any, page_size: int) -> tuple[int, dict[str, Any]]:
    return sum(1 for _ in list_serial(store, page_size=page_size)), {}


def run_parallel(store: Any, workers: int, page_size: int) -> tuple[int, dict[str, Any]]:
    count = 0
    lock = threading.Lock()

    def on_objects(objects: list[ObjectInfo]) -> None:
        nonlocal count
        with lock:
            count += len(objects)

    stats = ParallelLister(store, workers=workers, page_size=page_size, on_objects=on_objects).run()
    return count, {
        "requests": stats.pages,
        "splits": stats.splits,
        "steals": stats.steals,
        "overfetched": stats.overfetched,
    }


def run_rclone(endpoint: str, server: RcloneS3Server, workdir: Path) -> tuple[int, dict[str, Any]]:
    conf = workdir / "rclone.conf"
    conf.write_text(
        "[src]\ntype = s3\nprovider = Other\n"
        f"endpoint = {endpoint}\naccess_key_id = {server.access_key_id}\n"
        f"secret_access_key = {server.secret_access_key}\n"
    )
    out = subprocess.run(
        [rclone_binary(), "--config", str(conf), "lsf", "-R", "--fast-list", "--files-only",
         f"src:{BUCKET}"],
        check=True, capture_output=True, text=True,
    )  # fmt: skip
    return sum(1 for line in out.stdout.splitlines() if line), {}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prefixes", type=int, default=200, help="prefixes (default 200)")
    parser.add_argument("--per-prefix", type=int, default=1000, help="keys per prefix (1000)")
    parser.add_argument("--flat", type=int, default=100_000, help="keys in the flat prefix")
    parser.add_argument("--delay-ms", type=float, default=20.0, help="round trip added (20)")
    parser.add_argument("--workers", type=int, default=64, help="parallel lister threads (64)")
    parser.add_argument("--page-size", type=int, default=1000, help="keys per request (1000)")
    parser.add_argument("--root", type=Path, help="server root to build/reuse (default: temp)")
    parser.add_argument("--no-warmup", action="store_true", help="skip the untimed warm-up")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    say = (lambda *a: None) if args.json else (lambda *a: print(*a, flush=True))

    root = args.root or Path(tempfile.mkdtemp(prefix="bench-listing-"))
    root.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    expected = make_tree(root, args.prefixes, args.per_prefix, args.flat)
    say(f"tree of {expected:,} keys ready in {time.perf_counter() - start:.1f}s under {root}")
    results: list[dict[str, Any]] = []
    with RcloneS3Server(root, log_file=root / "rclone-serve.log") as server:
        proc = getattr(server, "_proc", None)
        server_pid = proc.pid if proc is not None else None
        direct = Config.from_mapping({"profiles": {"b": server.profile()}}, env={})
        if not args.no_warmup:
            say("warm-up (untimed, straight at the server)...")
            with open_store(f"s3://b@{BUCKET}/", direct) as store:
                run_parallel(store, args.workers, args.page_size)
        proxy = ProxyProcess(server.port, args.delay_ms / 1000)
        try:
            profile = server.profile(endpoint=proxy.endpoint, max_pool_connections=args.workers + 8)
            config = Config.from_mapping({"profiles": {"b": profile}}, env={})
            with open_store(f"s3://b@{BUCKET}/", config) as store:
                say("serial ListObjectsV2...")
                results.append(
                    measure("serial", lambda: run_serial(store, args.page_size), server_pid)
                )
            with open_store(f"s3://b@{BUCKET}/", config) as store:
                say(f"parallel lister, {args.workers} workers...")
                parallel = lambda: run_parallel(store, args.workers, args.page_size)  # noqa: E731
                results.append(measure("parallel", parallel, server_pid))
            say("rclone lsf -R --fast-list...")
            results.append(
                measure("rclone", lambda: run_rclone(proxy.endpoint, server, root), server_pid)
            )
        finally:
            proxy.stop()
    if args.root is None:
        shutil.rmtree(root, ignore_errors=True)

    by = {r["name"]: r for r in results}
    vs_serial = by["serial"]["seconds"] / by["parallel"]["seconds"]
    vs_rclone = by["rclone"]["seconds"] / by["parallel"]["seconds"]
    complete = all(r["keys"] == expected for r in results)
    summary = {
        "expected_keys": expected,
        "all_complete": complete,
        "parallel_vs_serial": vs_serial,
        "parallel_vs_rclone": vs_rclone,
        "pass_vs_serial": vs_serial >= TARGET_VS_SERIAL,
        "pass_vs_rclone": vs_rclone >= TARGET_VS_RCLONE,
    }
    env = {
        "prefixes": args.prefixes, "per_prefix": args.per_prefix, "flat": args.flat,
        "delay_ms": args.delay_ms, "workers": args.workers, "page_size": args.page_size,
        "python": platform.python_version(), "cpu_count": os.cpu_count(),
        "rclone": subprocess.run([rclone_binary(), "version"], capture_output=True,
                                 text=True).stdout.splitlines()[0],
    }  # fmt: skip
    if args.json:
        print(json.dumps({"environment": env, "results": results, "summary": summary}, indent=2))
    else:
        print_table(env, results, summary)
    return 0 if complete and summary["pass_vs_serial"] and summary["pass_vs_rclone"] else 1


def print_table(
    env: dict[str, Any], results: list[dict[str, Any]], summary: dict[str, Any]
) -> None:
    print(
        f"\n{env['prefixes']} prefixes x {env['per_prefix']:,} keys + {env['flat']:,} flat = "
        f"{summary['expected_keys']:,} keys; rclone serve s3 behind a {env['delay_ms']:g} ms "
        f"round-trip DelayProxy; page {env['page_size']}; {env['workers']} workers; "
        f"{env['cpu_count']} CPUs; python {env['python']}; {env['rclone']}"
    )
    header = ["lister", "seconds", "keys", "keys/s", "client CPU s", "server CPU s", "notes"]
    rows = []
    for r in results:
        notes = ""
        if r["name"] == "parallel":
            notes = (f"{r['requests']} requests, {r['splits']} splits, {r['steals']} steals, "
                     f"{r['overfetched']} overfetched")  # fmt: skip
        elif r["name"] == "rclone":
            notes = "client CPU is in the rclone process (not counted)"
        rows.append([
            r["name"], f"{r['seconds']:.2f}", f"{r['keys']:,}", f"{r['keys_per_s']:,.0f}",
            f"{r['client_cpu_s']:.1f}", f"{r['server_cpu_s']:.1f}", notes,
        ])  # fmt: skip
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print(" | ".join(cell.rjust(w) if i < 6 else cell for i, (cell, w) in
                         enumerate(zip(row, widths, strict=True))))  # fmt: skip
    verdict = lambda ok: "PASS" if ok else "FAIL"  # noqa: E731
    print(
        f"parallel vs serial: {summary['parallel_vs_serial']:.1f}x (target >= "
        f"{TARGET_VS_SERIAL:g}x: {verdict(summary['pass_vs_serial'])}); parallel vs rclone: "
        f"{summary['parallel_vs_rclone']:.1f}x (target >= {TARGET_VS_RCLONE:g}x: "
        f"{verdict(summary['pass_vs_rclone'])}); every lister returned all keys: "
        f"{'yes' if summary['all_complete'] else 'NO'}"
    )


if __name__ == "__main__":
    sys.exit(main())
