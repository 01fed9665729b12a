#!/usr/bin/env python3
"""Benchmark the native checksum fast path of objstore.checksum against crcmod.

For each algorithm, hashes ``--size`` bytes (default 1 GiB) with crcmod (the reference) and with
the fast path, single-threaded and over ``--threads`` threads, checks that both give the same
CRC, and reports MB/s (10^6 bytes/s). The target is fast path >= 5x crcmod.

The data is generated once with os.urandom into one buffer (64 MiB by default) that is hashed
repeatedly to make up the size, so the benchmark measures hashing, not data generation.

Usage: python bench/checksum.py [--size 1GiB] [--buffer 64MiB] [--repeat 3] [--threads 2] [--json]
Exit status 1 if any algorithm misses the target or disagrees with crcmod.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import threading
import time
from collections.abc import Callable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

# Run from anywhere: the repository root holds the objstore package.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from objstore.checksum import (
    ALGORITHMS,
    Checksum,
    reference,
    reference_uses_extension,
)

TARGET_RATIO = 5.0
_UNITS = {
    "": 1,
    "b": 1,
    "k": 1 << 10,
    "kib": 1 << 10,
    "m": 1 << 20,
    "mib": 1 << 20,
    "g": 1 << 30,
    "gib": 1 << 30,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
}


def parse_size(text: str) -> int:
    """'1GiB', '64MiB', '512M' (binary), '1GB' (decimal) or a plain byte count."""
    match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*", text)
    unit = match.group(2).lower() if match else None
    if not match or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"bad size {text!r}; e.g. 1GiB, 64MiB, 1000000")
    size = int(float(match.group(1)) * _UNITS[unit])
    if size <= 0:
        raise argparse.ArgumentTypeError(f"size must be positive, got {text!r}")
    return size


def make_buffer(size: int) -> bytearray:
    # os.urandom in 1 MiB chunks: one huge call would hold a second copy of the buffer.
    buf = bytearray()
    while len(buf) < size:
        buf += os.urandom(min(1 << 20, size - len(buf)))
    return buf


def stream(view: memoryview, total: int) -> Iterator[memoryview]:
    """Slices of ``view``, reused from its start as often as needed, totalling ``total`` bytes."""
    done = 0
    while done < total:
        n = min(len(view), total - done)
        yield view[:n]
        done += n


def run_reference(name: str, view: memoryview, total: int) -> tuple[int, float]:
    fn = reference(name)
    crc = 0
    start = time.perf_counter()
    for chunk in stream(view, total):
        crc = fn(chunk, crc)
    return crc, time.perf_counter() - start


def run_fast(name: str, view: memoryview, total: int) -> tuple[int, float]:
    c = Checksum(name)
    start = time.perf_counter()
    for chunk in stream(view, total):
        c.update(chunk)
    return c.value, time.perf_counter() - start


def run_threads(name: str, view: memoryview, total: int, threads: int) -> float:
    """Wall time for ``threads`` threads each hashing ``total / threads`` bytes.

    Each thread reads its own slice of the buffer, so no thread is served from cache lines
    another just pulled in, and the figure is what separate streams would get.
    """
    width = len(view) // threads
    share = total // threads
    barrier = threading.Barrier(threads + 1)

    def work(i: int) -> None:
        own = view[i * width : (i + 1) * width]
        c = Checksum(name)
        barrier.wait()
        for chunk in stream(own, share):
            c.update(chunk)

    workers = [threading.Thread(target=work, args=(i,)) for i in range(threads)]
    for w in workers:
        w.start()
    barrier.wait()
    start = time.perf_counter()
    for w in workers:
        w.join()
    return time.perf_counter() - start


def best(fn: Callable[[], float], repeat: int) -> float:
    return min(fn() for _ in range(repeat))


def bench(name: str, view: memoryview, total: int, repeat: int, threads: int) -> dict[str, Any]:
    spec = ALGORITHMS[name]
    ref_crc, ref_s = run_reference(name, view, total)
    run_fast(name, view, min(total, len(view)))  # warm-up: page in the buffer, build tables
    fast_crc, fast_s = run_fast(name, view, total)
    fast_s = min([fast_s] + [run_fast(name, view, total)[1] for _ in range(repeat - 1)])
    thr_s = best(lambda: run_threads(name, view, total, threads), repeat) if threads > 1 else None
    ratio = ref_s / fast_s
    return {
        "algorithm": name,
        "backend": spec.backend,
        "releases_gil": spec.releases_gil,
        "crc_reference": f"{ref_crc:0{spec.width // 4}x}",
        "crc_fast": f"{fast_crc:0{spec.width // 4}x}",
        "match": ref_crc == fast_crc,
        "crcmod_mb_s": total / ref_s / 1e6,
        "fast_mb_s": total / fast_s / 1e6,
        "ratio": ratio,
        "threads": threads,
        "fast_threads_mb_s": total / thr_s / 1e6 if thr_s else None,
        "thread_scaling": fast_s / thr_s if thr_s else None,
        "target_ratio": TARGET_RATIO,
        "pass": ref_crc == fast_crc and ratio >= TARGET_RATIO,
    }


def environment(args: argparse.Namespace, buffer_size: int) -> dict[str, Any]:
    versions: dict[str, str | None] = {}
    for pkg in ("anycrc", "awscrt", "crcmod"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "size_bytes": args.size,
        "buffer_bytes": buffer_size,
        "buffer_passes": -(-args.size // buffer_size),
        "repeat": args.repeat,
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "crcmod_c_extension": reference_uses_extension(),
        "versions": versions,
    }


def print_table(env: dict[str, Any], results: list[dict[str, Any]]) -> None:
    mib = 1 << 20
    print(
        f"data: {env['size_bytes'] / mib:.0f} MiB = one {env['buffer_bytes'] / mib:.0f} MiB "
        f"os.urandom buffer hashed {env['buffer_passes']}x; MB = 10^6 bytes"
    )
    print(
        f"timing: crcmod 1 run, fast path best of {env['repeat']}; "
        f"threaded: each thread hashes its own slice of the buffer, same total bytes"
    )
    print(
        f"python {env['python']}, {env['cpu_count']} CPUs, crcmod C extension: "
        f"{env['crcmod_c_extension']}, versions: {env['versions']}"
    )
    header = [
        "algorithm",
        "backend",
        "crcmod MB/s",
        "fast MB/s",
        "fast/crcmod",
        f"fast {results[0]['threads']}thr MB/s",
        "thr scaling",
        "GIL released",
        "crc match",
        f">= {TARGET_RATIO:g}x",
    ]
    rows = [
        [
            r["algorithm"],
            r["backend"],
            f"{r['crcmod_mb_s']:,.0f}",
            f"{r['fast_mb_s']:,.0f}",
            f"{r['ratio']:.1f}x",
            f"{r['fast_threads_mb_s']:,.0f}" if r["fast_threads_mb_s"] else "-",
            f"{r['thread_scaling']:.2f}x" if r["thread_scaling"] else "-",
            "yes" if r["releases_gil"] else "no",
            "yes" if r["match"] else "NO",
            "PASS" if r["pass"] else "FAIL",
        ]
        for r in results
    ]
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print(" | ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--size",
        type=parse_size,
        default=1 << 30,
        help="bytes to hash per measurement (default 1GiB)",
    )
    parser.add_argument(
        "--buffer",
        type=parse_size,
        default=64 << 20,
        help="random buffer reused to make up --size (default 64MiB)",
    )
    parser.add_argument("--repeat", type=int, default=3, help="fast-path runs, best kept")
    parser.add_argument("--threads", type=int, default=2, help="threads for the threaded run")
    parser.add_argument(
        "--algorithm",
        action="append",
        choices=list(ALGORITHMS),
        help="only these (repeatable; default all)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if args.repeat < 1 or args.threads < 1:
        parser.error("--repeat and --threads must be >= 1")

    buffer_size = min(args.buffer, args.size)
    if not args.json:
        print(f"generating {buffer_size / (1 << 20):.0f} MiB of random data...", flush=True)
    view = memoryview(make_buffer(buffer_size))
    env = environment(args, buffer_size)
    results = []
    for name in args.algorithm or list(ALGORITHMS):
        if not args.json:
            print(f"benchmarking {name}...", flush=True)
        results.append(bench(name, view, args.size, args.repeat, args.threads))

    if args.json:
        print(json.dumps({"environment": env, "results": results}, indent=2))
    else:
        print_table(env, results)
    return 0 if all(r["pass"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
