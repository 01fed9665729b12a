#!/usr/bin/env python3
"""Listing 190 M keys on a virtual clock: the real ``ParallelLister`` against a simulated store.

The seed (Ling's storage report): listing 190 million OSS files took over six hours serially and
about ten minutes with parallel metadata prefetching, ~36x. Here the same scale runs on one small
machine in a few minutes, because nothing sleeps: time is *simulated* (the model, its clock and
its checks: bench/sim/listing_model.py).

**Workload** (:func:`dataset`): a key space shaped like a multimodal training corpus: a deep image
tree, a level of 200,000 clip directories, one flat prefix of 40 M keys, flat text prefixes.
**Server**: ``--latency-ms`` a request (default 30) and ``--rate-limit`` requests a second
(default 2,000: OSS's documented limit for sequentially named objects, 10,000 otherwise;
help.aliyun.com/en/oss/user-guide/0004-00000302), bursts of a tenth of a second's worth.
Client CPU (parsing each page's XML) is not modelled unless ``--client-cpu-us`` is given; the run
measures objstore's own page parser and prints the floor it sets.

**Contenders**, each on the same key space and server, each in a child process of its own (so
that its peak RSS is its own), each checked to emit every key exactly once:

- ``serial``: :func:`babel_sync.listing.list_serial`, one request at a time. Its time is requests
  x latency, so by default it runs on a tenth of the keys (same shape) and is scaled by its
  request count, labelled *computed* (``--serial-keys`` to run it in full);
- ``fan-out only``: the lister with ``split_ranges=False``: a task per common prefix down to
  ``fanout_depth``, each listed start to end by one worker (a parallel directory walk);
- ``ranges + stealing``: the lister as the sync engine runs it.

**Manifest**: the engine's own listing path (the lister writing ``Journal.manifest_writer``, its
cursors in ``Journal.listing_state``: LMDB) on ``--manifest-keys`` keys of the same shape; bytes on
disk a key, extrapolated linearly to ``--keys``.

Usage: python bench/sim/listing_sim.py [--keys 190e6] [--latency-ms 30] [--rate-limit 2000]
       [--workers 64] [--json PATH] [--quick]
Exit status 1 if a listing is not exact or ranges + stealing is under 36x serial.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import itertools
import json
import logging
import math
import multiprocessing
import os
import platform
import resource
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

# Run from anywhere: the repository root holds the packages.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent.parent))

from babel_sync.journal import Journal
from babel_sync.listing import ListingState, list_serial
from bench.sim.listing_model import (
    ETAG,
    Coverage,
    Field,
    KeySpace,
    Segment,
    Server,
    SimStore,
    VirtualClock,
    VirtualLister,
)
from objstore import ObjectInfo

log = logging.getLogger(__name__)

TARGET_VS_SERIAL = 36.0  # the seed: > 6 h serially, ~10 min in parallel
SEED_KEYS = 190_000_000
DEFAULT_JSON = Path(".artifacts/sim/listing.json")


# -- the workload ------------------------------------------------------------------------------


def dataset(keys: float) -> KeySpace:
    """A key space shaped like a multimodal training corpus, scaled to about ``keys`` keys.

    At 190 M: a three-level image tree of 64 parts with uneven shard counts (80 M), 200,000
    clip directories of 300 frames (60 M: a level too wide for a task per directory), one flat
    prefix of 40 M audio shards (the worst case for prefix fan-out), three flat text prefixes
    (10 M) and a few files at the top. Field widths do not scale, so key lengths do not either.
    """
    s = keys / SEED_KEYS

    def n(count: int) -> int:
        return max(1, round(count * s))

    return KeySpace([
        Segment(["LICENSE"], 11_357),
        Segment(["README.md"], 4_096),
        Segment(["index/manifest-", Field(4, 10), ".json"], 2_000_000),
        Segment(["images/part-", Field(4, 32), "/shard-", Field(5, n(1500)), "/",
                 Field(5, 1000), ".jpg"], 110_000),
        Segment(["images/part-", Field(4, 32, 32), "/shard-", Field(5, n(1000)), "/",
                 Field(5, 1000), ".jpg"], 110_000),
        Segment(["video/clip-", Field(7, n(200_000)), "/frame-", Field(4, 300), ".jpg"], 60_000),
        Segment(["audio/shard-", Field(5, n(4000)), Field(4, 10_000), ".flac"], 150_000),
        Segment(["text/code/doc-", Field(4, n(200)), Field(4, 10_000), ".json.gz"], 20_000),
        Segment(["text/en/doc-", Field(4, n(500)), Field(4, 10_000), ".json.gz"], 30_000),
        Segment(["text/zh/doc-", Field(4, n(300)), Field(4, 10_000), ".json.gz"], 30_000),
    ])  # fmt: skip


# -- running the contenders -------------------------------------------------------------------


@dataclass(frozen=True)
class SimConfig:
    """The server and the lister of a run (see the command's options)."""

    latency_s: float = 0.030
    rate: float = 2000.0  # requests a second; 0: no limit
    burst: int = 200
    workers: int = 64
    page_size: int = 1000
    fanout_depth: int = 2
    client_cpu_s: float = 0.0  # per entry, one client core; 0: not modelled

    def server(self) -> Server:
        return Server(self.latency_s, self.rate, self.burst, self.client_cpu_s)


def _rss() -> int:
    """This process's resident set in bytes (Linux; else the peak so far)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except OSError:
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


class _Peak:
    def __init__(self) -> None:
        self.start = self.peak = _rss()

    def __call__(self) -> None:
        self.peak = max(self.peak, _rss())


@dataclass
class Result:
    """One listing on the virtual clock."""

    name: str
    keys: int
    simulated_s: float
    requests: int
    complete: bool
    real_s: float
    cpu_s: float
    peak_rss: int
    rss_growth: int
    throttled: int = 0
    splits: int = 0
    steals: int = 0
    overfetched: int = 0
    tasks: int = 0
    max_tasks_queued: int = 0
    errors: list[str] = field(default_factory=list)
    computed: bool = False  # simulated_s scaled from a smaller run (serial only)
    measured_keys: int = 0  # keys of the run it was scaled from

    @property
    def requests_per_s(self) -> float:
        return self.requests / self.simulated_s if self.simulated_s else 0.0


class _NoGC:
    """No cyclic GC during a run: it allocates no cycles, and gen-0 passes over millions of
    short-lived objects would double the simulation's CPU time (not the simulated time)."""

    def __enter__(self) -> None:
        self._was = gc.isenabled()
        gc.collect()
        gc.disable()

    def __exit__(self, *exc: object) -> None:
        if self._was:
            gc.enable()
        gc.collect()


def run_serial(space: KeySpace, cfg: SimConfig) -> Result:
    """``list_serial`` on the virtual clock; checks count, first and last key."""
    peak = _Peak()
    clock = VirtualClock(peak)
    server = cfg.server()
    store = SimStore(space, clock, server)
    start, cpu = time.perf_counter(), time.process_time()
    with _NoGC():
        clock.enter()
        try:
            it = list_serial(store, page_size=cfg.page_size)
            first = next(it, None)
            tail = deque(enumerate(it, 2), maxlen=1)  # consumed in C: 1 object of memory
            count, last = tail[0] if tail else (int(first is not None), first)
        finally:
            clock.exit()
    peak()
    n = space.total
    complete = count == n and (
        n == 0 or (first is not None and last is not None and first.key == space.key(0)
                   and last.key == space.key(n - 1))
    )  # fmt: skip
    return Result(
        "serial", n, clock.now, server.stats.requests, complete, time.perf_counter() - start,
        time.process_time() - cpu, peak.peak, peak.peak - peak.start, server.stats.throttled,
    )  # fmt: skip


def run_lister(space: KeySpace, cfg: SimConfig, *, split_ranges: bool = True,
               then: Callable[[list[ObjectInfo]], None] | None = None,
               state: ListingState | None = None, name: str = "") -> Result:  # fmt: skip
    """The real ``ParallelLister`` on the virtual clock, every key checked by :class:`Coverage`."""
    peak = _Peak()
    clock = VirtualClock(peak)
    server = cfg.server()
    store = SimStore(space, clock, server)
    coverage = Coverage(space, then)
    queued = [0]
    pages = itertools.count()

    def on_objects(objects: list[ObjectInfo]) -> None:
        coverage(objects)
        if next(pages) % 256 == 0:
            s = lister.stats
            queued[0] = max(queued[0], s.tasks_pending + s.tasks_running)

    lister = VirtualLister(
        clock, store, workers=cfg.workers, on_objects=on_objects, state=state,
        page_size=cfg.page_size, fanout_depth=cfg.fanout_depth, split_ranges=split_ranges,
    )  # fmt: skip
    start, cpu = time.perf_counter(), time.process_time()
    with _NoGC():
        stats = lister.run()
    peak()
    if stats.objects != coverage.objects or stats.bytes != space.bytes:
        coverage.errors.append(f"lister counted {stats.objects} objects, {stats.bytes} bytes")
    return Result(
        name or ("ranges + stealing" if split_ranges else "fan-out only"), space.total,
        clock.now, server.stats.requests, coverage.complete, time.perf_counter() - start,
        time.process_time() - cpu, peak.peak, peak.peak - peak.start, server.stats.throttled,
        stats.splits, stats.steals, stats.overfetched, stats.tasks_done, queued[0],
        coverage.errors,
    )  # fmt: skip


@dataclass
class Manifest:
    """The source manifest of a journal the lister wrote, measured and extrapolated."""

    keys: int
    file_bytes: int  # data.mdb's size
    disk_bytes: int  # blocks allocated on disk
    bytes_per_key: float
    key_bytes: float  # mean key length
    extrapolated_keys: int
    extrapolated_bytes: int
    write_cpu_s: float  # the listing and its journal writes, together
    listing_ranges_left: int
    complete: bool


def measure_manifest(keys: int, full_keys: int, cfg: SimConfig, workdir: Path) -> Manifest:
    """The engine's listing path (``ParallelLister`` -> ``ManifestWriter``, cursors in
    ``JournalListingState``) into a real LMDB journal, on a key space of the dataset's shape."""
    space = dataset(keys)
    directory = workdir / "journal"
    journal = Journal(directory, {"sim": "listing"})
    try:
        writer = journal.manifest_writer("src")
        state = journal.listing_state("src")
        result = run_lister(space, cfg, then=writer.add, state=state, name="manifest")
        left = len(state.pending())
        count, _ = journal.manifest_stats("src")
    finally:
        journal.close()
    data = directory / "data.mdb"
    st = data.stat()
    per_key = st.st_blocks * 512 / space.total
    return Manifest(
        space.total, st.st_size, st.st_blocks * 512, per_key,
        sum(g.length * g.total for g in space.segments) / space.total, full_keys,
        round(per_key * full_keys), result.cpu_s, left,
        result.complete and count == space.total and left == 0,
    )  # fmt: skip


def run_part(part: str, keys: int, cfg: SimConfig) -> dict[str, Any]:
    """One contender on ``dataset(keys)`` as a dict: the entry point of a child process."""
    space = dataset(keys)
    if part == "serial":
        result = run_serial(space, cfg)
    else:
        result = run_lister(space, cfg, split_ranges=part == "ranges")
    # The process's own peak (kB on Linux): exact where the sampled one may miss a spike.
    result.peak_rss = max(
        result.peak_rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    )
    return asdict(result)


def run_manifest(keys: int, full_keys: int, cfg: SimConfig) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="listing-sim-") as tmp:
        return asdict(measure_manifest(keys, full_keys, cfg, Path(tmp)))


def _isolated(fn: Callable[..., dict[str, Any]], *args: Any) -> dict[str, Any]:
    """``fn(*args)`` in a fresh interpreter, so that each run's peak memory is its own."""
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=ctx) as pool:
        return pool.submit(fn, *args).result()


def client_parse_cost(pages: int = 20) -> float:
    """Seconds of CPU per key that objstore's S3 client spends on a 1,000-key page: parsing the
    ListObjectsV2 XML (``parse_list_v2``) and building the ``ObjectInfo`` list, as
    ``S3Store._list_page_lean`` does. Not part of the simulated times."""
    from objstore.s3_data import parse_list_v2

    keys = Segment(["images/part-", Field(4, 64), "/shard-", Field(5, 1500), "/", Field(5, 1000),
                    ".jpg"], 110_000).keys(0, 1000)  # fmt: skip
    body = "".join(
        f"<Contents><Key>{k}</Key><LastModified>2026-01-01T00:00:00.000Z</LastModified>"
        f"<ETag>&quot;{ETAG}&quot;</ETag><Size>110000</Size>"
        "<StorageClass>STANDARD</StorageClass></Contents>"
        for k in keys
    )
    xml = (
        '<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult '
        'xmlns="http://s3.amazonaws.com/doc/2006-03-01/"><Name>bucket</Name><Prefix></Prefix>'
        "<KeyCount>1000</KeyCount><MaxKeys>1000</MaxKeys><EncodingType>url</EncodingType>"
        f"<IsTruncated>true</IsTruncated>{body}<NextContinuationToken>dG9rZW4=</NextContinuationToken>"
        "</ListBucketResult>"
    ).encode()
    listed = ObjectInfo.listed
    best = math.inf
    for _ in range(pages):
        t = time.process_time()
        got = parse_list_v2(xml)
        [listed(k, size, mtime, etag) for k, size, mtime, etag in got.contents]
        best = min(best, time.process_time() - t)
    return best / len(keys)


# -- the command ------------------------------------------------------------------------------


def _keys_arg(text: str) -> int:
    value = float(text)
    if not value >= 1 or value != int(value):
        raise argparse.ArgumentTypeError(f"not a positive whole number of keys: {text}")
    return int(value)


def _duration(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.2f} h"
    if seconds >= 60:
        return f"{seconds / 60:.1f} min"
    return f"{seconds:.2f} s"


def _size(n: float) -> str:
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000:
            return f"{n:.3g} {unit}"
        n /= 1000
    return f"{n:,.1f} PB"


def _verdict(ok: bool | None) -> str:
    return "n/a" if ok is None else "PASS" if ok else "FAIL"


def _mb(n: float) -> str:
    return f"{n / 2**20:,.0f} MiB"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--keys",
        type=_keys_arg,
        default=SEED_KEYS,
        help="keys in the simulated bucket (default 190e6, the seed's)",
    )
    parser.add_argument(
        "--latency-ms", type=float, default=30.0, help="time of one list request (default 30)"
    )
    parser.add_argument(
        "--rate-limit",
        type=float,
        default=2000.0,
        help="list requests a second the server starts; 0: none (default 2000, "
        "OSS's limit for sequential names)",
    )
    parser.add_argument(
        "--burst",
        type=int,
        default=None,
        help="requests the rate limit lets through at once (default rate/10)",
    )
    parser.add_argument("--workers", type=int, default=64, help="lister threads (default 64)")
    parser.add_argument("--page-size", type=int, default=1000, help="keys a request (1000)")
    parser.add_argument(
        "--fanout-depth",
        type=int,
        default=2,
        help="levels listed with a delimiter (default 2, the engine's)",
    )
    parser.add_argument(
        "--serial-keys",
        type=_keys_arg,
        default=None,
        help="run serial on this many keys of the same shape and scale its time by the "
        "request count, labelled computed (default: a tenth of --keys; serial time is "
        "requests x latency, so its full run would only cost CPU)",
    )
    parser.add_argument(
        "--manifest-keys",
        type=_keys_arg,
        default=1_000_000,
        help="keys written to a real LMDB journal to measure the manifest "
        "(default 1e6; extrapolated to --keys)",
    )
    parser.add_argument(
        "--client-cpu-us",
        type=float,
        default=0.0,
        help="model this much client CPU per listed key on one core "
        "(default 0: not modelled; the floor is printed either way)",
    )
    parser.add_argument(
        "--only",
        default="serial,fanout,ranges,manifest",
        help="comma-separated parts to run (default all: serial,fanout,ranges,manifest)",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=DEFAULT_JSON,
        help=f"where to write the results (default {DEFAULT_JSON})",
    )
    parser.add_argument(
        "--in-process",
        action="store_true",
        help="run every part in this process (default: each in a child, for its own peak RSS)",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="a smoke run: 2e6 keys, manifest of 1e5 (seconds, not minutes)",
    )
    args = parser.parse_args(argv)  # fmt: skip
    if args.quick:
        args.keys = min(args.keys, 2_000_000)
        args.manifest_keys = min(args.manifest_keys, 100_000)
    only = set(args.only.split(","))
    unknown = only - {"serial", "fanout", "ranges", "manifest"}
    if unknown:
        parser.error(f"unknown parts: {', '.join(sorted(unknown))}")
    burst = args.burst if args.burst is not None else max(1, int(args.rate_limit / 10))
    cfg = SimConfig(args.latency_ms / 1000, args.rate_limit, burst, args.workers,
                    args.page_size, args.fanout_depth, args.client_cpu_us / 1e6)  # fmt: skip
    wall = time.perf_counter()
    space = dataset(args.keys)
    say = lambda *a: print(*a, flush=True)  # noqa: E731
    say(f"key space: {space.total:,} keys, {_size(space.bytes)}, in "
        f"{len(space.segments)} segments:")  # fmt: skip
    for g in space.segments:
        say(f"  {g.shape:40} {g.total:>12,} keys of {g.size:>9,} B")
    call = (lambda fn, *a: fn(*a)) if args.in_process else _isolated
    results: list[Result] = []
    if "serial" in only:
        n = min(args.serial_keys or max(1, space.total // 10), space.total)
        say(f"serial: list_serial over {dataset(n).total:,} keys...")
        r = Result(**call(run_part, "serial", n, cfg))
        if r.keys != space.total:  # one request per page, one at a time: scale by requests
            requests = max(1, math.ceil(space.total / cfg.page_size))
            r.simulated_s *= requests / r.requests
            r.measured_keys, r.keys, r.requests, r.computed = r.keys, space.total, requests, True
        results.append(r)
        say(f"  {_duration(r.simulated_s)} simulated, {r.real_s:.1f} s real")
    for mode, split in (("fanout", False), ("ranges", True)):
        if mode in only:
            say(f"{'ranges + stealing' if split else 'prefix fan-out only'}: "
                f"ParallelLister, {cfg.workers} workers...")  # fmt: skip
            r = Result(**call(run_part, mode, args.keys, cfg))
            results.append(r)
            say(f"  {_duration(r.simulated_s)} simulated, {r.real_s:.1f} s real, "
                f"complete: {r.complete}")  # fmt: skip
    manifest = None
    if "manifest" in only:
        say("manifest: the lister writing a journal (Journal.manifest_writer, LMDB)...")
        n = min(args.manifest_keys, space.total)
        manifest = Manifest(**call(run_manifest, n, space.total, cfg))
    parse_s = client_parse_cost()
    by = {r.name: r for r in results}
    serial = by.get("serial")

    def speedup(name: str) -> float | None:
        r = by.get(name)
        return serial.simulated_s / r.simulated_s if serial and r and r.simulated_s else None

    ours = speedup("ranges + stealing")
    summary = {
        "keys": space.total,
        "all_complete": all(r.complete for r in results)
        and (manifest is None or manifest.complete),
        "fanout_vs_serial": speedup("fan-out only"),
        "ranges_vs_serial": ours,
        "ranges_vs_fanout": (by["fan-out only"].simulated_s / by["ranges + stealing"].simulated_s
                             if {"fan-out only", "ranges + stealing"} <= by.keys() else None),
        "target_vs_serial": TARGET_VS_SERIAL,
        "pass": None if ours is None else ours >= TARGET_VS_SERIAL,
        "ideal_vs_serial": min(cfg.workers, cfg.rate * cfg.latency_s if cfg.rate else math.inf),
        "client_parse_us_per_key": parse_s * 1e6,
        "client_parse_floor_s": parse_s * space.total,
        "wall_s": time.perf_counter() - wall,
    }  # fmt: skip
    env = {
        "keys": space.total, "latency_ms": args.latency_ms, "rate_limit": cfg.rate,
        "burst": cfg.burst, "workers": cfg.workers, "page_size": cfg.page_size,
        "fanout_depth": cfg.fanout_depth, "client_cpu_us": args.client_cpu_us,
        "python": platform.python_version(), "cpu_count": os.cpu_count(),
    }  # fmt: skip
    print_report(env, space, results, manifest, summary)
    out = {
        "environment": env, "dataset": space.describe(),
        "results": [asdict(r) | {"requests_per_s": r.requests_per_s} for r in results],
        "manifest": asdict(manifest) if manifest else None, "summary": summary,
    }  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(out, indent=2) + "\n")
    print(f"JSON: {args.json}; wall time {summary['wall_s']:.0f} s")
    return 0 if summary["all_complete"] and summary["pass"] is not False else 1


def _table(header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]
    for row in [header, ["-" * w for w in widths], *rows]:
        print(" | ".join(c.ljust(w) if i == 0 else c.rjust(w)
                         for i, (c, w) in enumerate(zip(row, widths, strict=True))))  # fmt: skip


def print_report(env: dict[str, Any], space: KeySpace, results: list[Result],
                 manifest: Manifest | None, summary: dict[str, Any]) -> None:  # fmt: skip
    rate = f"{env['rate_limit']:,.0f} req/s, burst {env['burst']}" if env["rate_limit"] else "none"
    cpu = f"{env['client_cpu_us']:g} us/key" if env["client_cpu_us"] else "not modelled"
    print(
        f"\n{space.total:,} keys; {env['latency_ms']:g} ms a request; rate limit {rate}; page "
        f"{env['page_size']}; {env['workers']} workers; fan-out depth {env['fanout_depth']}; "
        f"client CPU {cpu}; {env['cpu_count']} CPUs; python {env['python']}"
    )
    serial = next((r for r in results if r.name == "serial"), None)
    rows = []
    for r in results:
        ratio = f"{serial.simulated_s / r.simulated_s:.1f}x" if serial and r.simulated_s else "-"
        lister = r.name != "serial"
        rows.append([
            r.name + (" (computed)" if r.computed else ""), _duration(r.simulated_s), ratio,
            f"{r.requests:,}", f"{r.requests_per_s:,.0f}", f"{r.throttled:,}",
            f"{r.splits:,}" if lister else "-", f"{r.steals:,}" if lister else "-",
            f"{r.overfetched:,}" if lister else "-", f"{r.tasks:,}" if lister else "-",
            _mb(r.peak_rss), f"{r.real_s:.0f}", "yes" if r.complete else "NO",
        ])  # fmt: skip
    _table(["lister", "simulated", "vs serial", "requests", "req/s", "throttled", "splits",
            "steals", "overfetched", "tasks", "peak RSS", "real s", "complete"], rows)  # fmt: skip
    for r in results:
        if r.computed:
            print(f"serial (computed): simulated on {r.measured_keys:,} keys of the same shape, "
                  f"scaled to {r.requests:,} requests (one at a time: requests x latency)")  # fmt: skip
        elif r.name != "serial":
            print(f"{r.name}: peak RSS {_mb(r.peak_rss)} (its process's), {_mb(r.rss_growth)} "
                  f"above the run's start (sampled); at most {r.max_tasks_queued:,} tasks queued or running; "
                  f"{r.cpu_s:.0f} s CPU" + (f"; errors: {r.errors}" if r.errors else ""))  # fmt: skip
    if manifest is not None:
        m = manifest
        print(
            "\nmanifest on disk (the engine's LMDB journal, source side: key -> size, mtime, ETag)"
        )
        _table(["", "keys", "on disk", "B/key"], [
            ["measured: the lister writing through Journal.manifest_writer", f"{m.keys:,}",
             _mb(m.disk_bytes), f"{m.bytes_per_key:.0f}"],
            ["extrapolated (linear in keys)", f"{m.extrapolated_keys:,}",
             f"{m.extrapolated_bytes / 2**30:,.1f} GiB", f"{m.bytes_per_key:.0f}"],
        ])  # fmt: skip
        print(f"keys average {m.key_bytes:.0f} B; listing + journal writes took "
              f"{m.write_cpu_s / m.keys * 1e6:.1f} us of CPU a key here; journal complete and "
              f"no listing ranges left: {'yes' if m.complete else 'NO'}")  # fmt: skip
    fmt = lambda v: "n/a" if v is None else f"{v:.1f}x"  # noqa: E731
    print(
        f"\nranges + stealing vs serial: {fmt(summary['ranges_vs_serial'])} (target >= "
        f"{summary['target_vs_serial']:g}x, the seed's: {_verdict(summary['pass'])}; "
        f"ceiling {summary['ideal_vs_serial']:g}x = min(workers, rate x latency)); vs fan-out "
        f"only: {fmt(summary['ranges_vs_fanout'])}; fan-out only vs serial: "
        f"{fmt(summary['fanout_vs_serial'])}; every listing exact: "
        f"{'yes' if summary['all_complete'] else 'NO'}"
    )
    modelled = (
        f"modelled at {env['client_cpu_us']:g} us/key" if env["client_cpu_us"] else "not simulated"
    )
    print(
        f"client CPU {modelled}: objstore's S3 page parser takes "
        f"{summary['client_parse_us_per_key']:.2f} us a key here, "
        f"{_duration(summary['client_parse_floor_s'])} for {space.total:,} keys on one core: a "
        f"floor under any listing in one process (--client-cpu-us puts it in the model)"
    )


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING)
    sys.exit(main())
