#!/usr/bin/env python3
"""Benchmark post-transfer verification: full CRC re-read vs sampled verification of one object.

For each backend (a local store, and an S3 store on a local ``rclone serve s3``), writes a source
object of ``--size`` (default 4 GiB) and an identical copy, then times:

* ``full (expected)``: :func:`babel_sync.verify.verify_full` with the CRC computed while writing,
  reading the destination only (the normal post-transfer case, and the baseline);
* ``full (re-read)``: the same without an expected CRC, re-reading the source too;
* ``sampled``: :func:`babel_sync.verify.verify_sampled` with the part boundaries of the upload.

Target: sampled takes under 5% of full (expected). The table also states the sampled mode's
detection probability for damage covering 1% and 10% of the blocks (an isolated bit flip is not
covered: see the module docstring of babel_sync.verify).

Data: one 64 MiB os.urandom pattern, repeated, with each part stamped with its number so parts
differ; written as real bytes (no sparse files). Page cache: before each timed run the objects'
files are flushed and dropped from the page cache (posix_fadvise DONTNEED on our own files only),
so reads come from the disk, as for an object nobody read lately; ``--warm`` skips that.
The S3 server is ``rclone serve s3`` run with ``--buffer-size 0`` (``--rclone-buffer-size``):
rclone's default reads 16 MiB ahead on every GET, which turns each small ranged GET of a cold
object into 16 MiB of disk reads, a cost of that server, not of object stores or of sampling.
Both "regions" are on this machine: there is no network latency, so the sampled mode's time here
is its floor; across regions each of its round trips costs more, which its thread pool overlaps.

Usage: python bench/verify.py [--size 4GiB] [--part-size 64MiB] [--backends local,s3] [--json]
Exit status 1 if a backend misses the target or a verification of the identical copy fails.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

# Run from anywhere: the repository root holds the packages and the test servers.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from babel_sync.verify import VerifyResult, verify_full, verify_sampled  # noqa: E402
from objstore import ChecksumValue, Config, Store, open_store  # noqa: E402
from objstore.checksum import Checksum  # noqa: E402
from objstore.cli import human_bytes, parse_size  # noqa: E402
from tests.servers.rclone_s3 import RcloneS3Server  # noqa: E402

TARGET = 0.05
PATTERN = 64 << 20
MIN_SIZE = 256 << 20


def parts(total: int, part_size: int, pattern: bytes) -> Iterator[bytearray]:
    """``total`` bytes as parts: the pattern repeated, each part stamped with its number."""
    for number, start in enumerate(range(0, total, part_size)):
        n = min(part_size, total - start)
        chunk = bytearray(n)
        done = 0
        while done < n:
            at = (start + done) % len(pattern)
            piece = min(n - done, len(pattern) - at)
            chunk[done : done + piece] = pattern[at : at + piece]
            done += piece
        stamp = number.to_bytes(8, "big")[: min(8, n)]
        chunk[: len(stamp)] = stamp
        yield chunk


def drop_cache(paths: list[Path]) -> None:
    """Flush and evict our own files from the page cache (not the whole machine's)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def make_local(base: Path, size: int, part_size: int, pattern: bytes) -> tuple[Store, list[Path]]:
    root = base / "local"
    root.mkdir()
    files = [root / "src", root / "dst"]
    for path in files:
        with open(path, "wb") as f:  # plain writes: real blocks, nothing sparse
            for chunk in parts(size, part_size, pattern):
                f.write(chunk)
    return open_store(str(root)), files


class BenchRcloneServer(RcloneS3Server):
    """The tests' rclone server with a chosen read-ahead (``--buffer-size``, 16 MiB by default):
    rclone reads that much ahead on every GET, so each small ranged GET of a cold object costs
    16 MiB of disk, a cost of this server that object stores do not have."""

    def __init__(self, root: Path, buffer_size: str, **kw: Any) -> None:
        super().__init__(root, **kw)
        self.buffer_size = buffer_size

    def command(self) -> list[str]:
        cmd = super().command()
        return [*cmd[:-1], "--buffer-size", self.buffer_size, cmd[-1]]


def make_s3(
    base: Path, size: int, part_size: int, pattern: bytes, buffer_size: str
) -> tuple[Store, list[Path], RcloneS3Server]:
    server = BenchRcloneServer(base / "rclone", buffer_size, log_file=base / "rclone.log")
    server.start()
    server.create_bucket("bench")
    config = Config.from_mapping({"profiles": {"bench": server.profile()}}, env={})
    store = open_store("s3://bench@bench/", config)
    for key in ("src", "dst"):  # the copy: uploaded again, part by part, as a transfer would
        store.put_parts(key, parts(size, part_size, pattern))
    return store, [server.root / "bench" / "src", server.root / "bench" / "dst"], server


def timed(
    fn: Callable[[], VerifyResult], repeat: int, files: list[Path], warm: bool
) -> tuple[float, VerifyResult]:
    times, result = [], None
    for _ in range(repeat):
        if not warm:
            drop_cache(files)
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    assert result is not None
    return statistics.median(times), result


def bench_backend(
    name: str, store: Store, files: list[Path], args: argparse.Namespace, crc: int
) -> list[dict[str, Any]]:
    # rclone computes an object's MD5 ETag on its first HEAD (seconds for GiBs) and caches it;
    # object stores keep it from the upload. Pay that here, outside the timings.
    size = store.stat("src").size
    store.stat("dst")
    boundaries = list(range(args.part_size, size, args.part_size))
    expected = ChecksumValue("crc64nvme", crc)
    runs = {
        "full (expected)": lambda: verify_full(
            store,
            "src",
            store,
            "dst",
            expected=expected,
            block_size=args.full_block_size,
            workers=args.full_workers,
        ),
        "full (re-read)": lambda: verify_full(
            store, "src", store, "dst", block_size=args.full_block_size, workers=args.full_workers
        ),
        "sampled": lambda: verify_sampled(
            store,
            "src",
            store,
            "dst",
            part_boundaries=boundaries,
            samples=args.samples,
            block_size=args.block_size,
            seed=args.seed,
            workers=args.workers,
            boundary_bytes=args.boundary_bytes,
        ),
    }
    rows: list[dict[str, Any]] = []
    for mode, fn in runs.items():
        print(f"  {name}: {mode}...", file=sys.stderr, flush=True)
        seconds, result = timed(fn, args.repeat, files, args.warm)
        rows.append(
            {
                "backend": name,
                "mode": mode,
                "seconds": seconds,
                "bytes_read": result.bytes_read,
                "blocks": result.blocks_checked,
                "ok": result.ok,
                "seed": result.seed,
                "detection_1pct": result.detection_1pct,
                "detection_10pct": result.detection_10pct,
                "gb_per_s": result.bytes_read / seconds / 1e9,
            }
        )
    base = rows[0]["seconds"]
    for row in rows:
        row["ratio_vs_full"] = row["seconds"] / base
    sampled = rows[-1]
    sampled["target"] = TARGET
    sampled["pass"] = sampled["ratio_vs_full"] < TARGET and all(r["ok"] for r in rows)
    return rows


def fit_size(size: int, backends: list[str], base: Path) -> int:
    """The size that fits the disk (two objects per backend, 10% spare), or 0."""
    free = shutil.disk_usage(base).free

    def need(s: int) -> int:
        return int(2 * s * len(backends) * 1.1)

    fitted = size
    while fitted >= MIN_SIZE and need(fitted) > free:
        fitted //= 2
    if fitted < MIN_SIZE:
        print(
            f"not enough disk in {base}: {human_bytes(free)} free, {human_bytes(need(MIN_SIZE))} needed "
            f"even at {human_bytes(MIN_SIZE)}; skipping",
            file=sys.stderr,
        )
        return 0
    if fitted != size:
        print(
            f"reducing --size from {human_bytes(size)} to {human_bytes(fitted)}: {human_bytes(free)} free in "
            f"{base}, {human_bytes(need(size))} needed",
            file=sys.stderr,
        )
    return fitted


def print_table(env: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    print(
        f"verify benchmark: object {human_bytes(env['size'])}, parts of {human_bytes(env['part_size'])}, "
        f"sampled {env['samples']} x {human_bytes(env['block_size'])} blocks, "
        f"cache {'warm' if env['warm'] else 'cold'}, rclone --buffer-size "
        f"{env['rclone_buffer_size']}, {env['cpus']} CPUs, python {env['python']}"
    )
    head = [
        "backend",
        "mode",
        "time s",
        "bytes read",
        "GB/s",
        "P(f=1%)",
        "P(f=10%)",
        "vs full",
        "target",
    ]
    table = [head]
    for r in rows:
        sampled = r["mode"] == "sampled"
        verdict = ("PASS" if r["pass"] else "FAIL") + f" (<{TARGET:.0%})" if sampled else ""
        table.append(
            [
                r["backend"],
                r["mode"] + ("" if r["ok"] else " NOT OK"),
                f"{r['seconds']:.3f}",
                human_bytes(r["bytes_read"]),
                f"{r['gb_per_s']:.2f}",
                f"{r['detection_1pct']:.3f}" if sampled else "any change",
                f"{r['detection_10pct']:.3f}" if sampled else "any change",
                f"{r['ratio_vs_full']:.2%}",
                verdict,
            ]
        )
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for i, row in enumerate(table):
        print(
            " | ".join(
                cell.ljust(w) if j < 2 else cell.rjust(w)
                for j, (cell, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if i == 0:
            print("-+-".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=parse_size, default=parse_size("4GiB"))
    parser.add_argument(
        "--part-size",
        type=parse_size,
        default=parse_size("64MiB"),
        help="upload part size; boundaries are sampled",
    )
    parser.add_argument("--block-size", type=parse_size, default=1 << 20, help="sampled block")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument(
        "--boundary-bytes", type=parse_size, default=None, help="probe per side of a boundary"
    )
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workers", type=int, default=8, help="sampled mode threads")
    parser.add_argument("--full-block-size", type=parse_size, default=8 << 20)
    parser.add_argument("--full-workers", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3, help="median of this many runs")
    parser.add_argument("--backends", default="local,s3")
    parser.add_argument(
        "--dir", type=Path, default=Path(tempfile.gettempdir()), help="where the objects go"
    )
    parser.add_argument("--warm", action="store_true", help="keep the page cache between runs")
    parser.add_argument(
        "--rclone-buffer-size", default="0", help="rclone's per-GET read-ahead (its default: 16M)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    backends = [b for b in args.backends.split(",") if b]
    if not set(backends) <= {"local", "s3"}:
        parser.error(f"unknown backend in {args.backends!r}; valid: local, s3")
    if args.part_size < 5 << 20 and "s3" in backends:
        parser.error("--part-size must be at least 5MiB (S3's smallest part)")
    args.size = fit_size(args.size, backends, args.dir)
    if not args.size:
        return 1
    pattern = os.urandom(PATTERN)
    crc = Checksum("crc64nvme")
    for chunk in parts(args.size, args.part_size, pattern):
        crc.update(chunk)  # what a transfer computes while streaming the source
    rows: list[dict[str, Any]] = []
    base = Path(tempfile.mkdtemp(prefix="bench-verify-", dir=args.dir))
    server = None
    try:
        for name in backends:
            print(f"writing 2 x {human_bytes(args.size)} to {name}...", file=sys.stderr, flush=True)
            if name == "local":
                store, files = make_local(base, args.size, args.part_size, pattern)
            else:
                store, files, server = make_s3(
                    base, args.size, args.part_size, pattern, args.rclone_buffer_size
                )
            try:
                rows += bench_backend(name, store, files, args, crc.value)
            finally:
                store.close()
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(base, ignore_errors=True)
    env = {
        "size": args.size,
        "part_size": args.part_size,
        "block_size": args.block_size,
        "samples": args.samples,
        "warm": args.warm,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "rclone_buffer_size": args.rclone_buffer_size,
        "target": TARGET,
    }
    if args.json:
        print(json.dumps({"environment": env, "results": rows}, indent=2))
    else:
        print_table(env, rows)
    return 0 if all(r.get("pass", True) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
