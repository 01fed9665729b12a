#!/usr/bin/env python3
"""Benchmark ``babel-sync sync`` against ``rclone sync`` and s5cmd between two S3 endpoints.

Two ``rclone serve s3`` servers stand for two regions (source and destination). They have
different credentials, so no tool can use a server-side copy: every byte is read from one
endpoint and written to the other, as in a cross-region sync. The source is populated by writing
files straight into the source server's root directory before it starts (``ROOT/BUCKET/KEY`` is an
object), with os.urandom content:

* (a) ``--big-count`` x ``--big-size`` (default 4 x 256 MiB) under ``big/``;
* (b) ``--small-count`` x ``--small-size`` (default 5,000 x 16 KiB) spread over
  ``--small-prefixes`` prefixes under ``small/``;
* (c) both: the whole bucket (``big/`` and ``small/``).

For each dataset, each tool syncs the source prefix into a fresh destination bucket (created
through the S3 API), and the whole command is timed by wall clock, process start-up included:

* ``babel-sync sync s3://src@BUCKET/PREFIX/ s3://dst@BUCKET2/PREFIX/ -q --json`` with profiles in
  a temporary TOML file and a fresh ``--journal`` per run; its default verification (runtime CRC
  on every object, plus sampled CRC of multipart objects) stays on;
* ``rclone sync src:BUCKET/PREFIX dst:BUCKET2/PREFIX --transfers 8 --checkers 16`` with a
  temporary rclone.conf (default multipart settings);
* s5cmd, which cannot copy between two endpoints in one command: ``cp`` from the source to a
  local temporary directory, then ``cp`` from there to the destination (default
  ``--numworkers``); the reported time is the sum of both, and the bytes go through local disk.

After each run the destination is listed (boto3) and must hold exactly the source's keys with
the same sizes; a tool that exits non-zero or leaves a different result is reported FAILED and
never timed as a success. ``--repeat N`` keeps each tool's best of N (runs interleave tools).

Targets (the issue): babel-sync at least as fast as the best peer on (a) and (c), and no slower
than 1.2x the best peer on (b). Everything runs on this machine: both servers, the tools and
the page cache share its cores, and there is no network latency; the source files are written
just before, so they are read from the page cache.

Usage: python bench/sync_vs_peers.py [--datasets a,b,c] [--big-count 4] [--big-size 256MiB]
       [--small-count 5000] [--small-size 16KiB] [--repeat 1] [--json]
Exit status 1 if babel-sync misses a target or fails.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

# Run from anywhere: the repository root holds the packages and the test servers.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from objstore.cli import human_bytes, parse_size  # noqa: E402
from tests.servers.rclone_s3 import RcloneS3Server, rclone_binary  # noqa: E402

log = logging.getLogger(__name__)

SRC_BUCKET = "source"
TOOLS = ("babel-sync", "rclone", "s5cmd")
PEERS = ("rclone", "s5cmd")
TARGETS = {"a": 1.0, "b": 1.2, "c": 1.0}
RCLONE_FLAGS = ["--transfers", "8", "--checkers", "16"]
# Keys of 16+ characters (rclone serve s3 wants them); two pairs, so no server-side copy.
SRC_KEYS = ("AKIABENCHSOURCE00001", "benchSourceSecretKeyForRegionA0000000001")
DST_KEYS = ("AKIABENCHDEST0000002", "benchDestSecretKeyForRegionB00000000002")
# Variables that would steer a tool to other endpoints or credentials than the ones given here.
_FOREIGN_ENV = re.compile(r"^(AWS_|RCLONE_|S3_|OBJSTORE_|BABEL_SYNC_)")


# -- data sets ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dataset:
    """One data set: a prefix of the source bucket and what the source server lists under it."""

    name: str
    prefix: str  # "" (the whole bucket) or "big/" etc.
    description: str
    inventory: dict[str, int]  # key relative to the prefix -> size

    @property
    def objects(self) -> int:
        return len(self.inventory)

    @property
    def bytes(self) -> int:
        return sum(self.inventory.values())


def write_source(root: Path, args: argparse.Namespace, names: Sequence[str]) -> None:
    """Write the objects the chosen data sets need under ``root/SRC_BUCKET`` (server not up)."""
    bucket = root / SRC_BUCKET
    if {"a", "c"} & set(names):
        (bucket / "big").mkdir(parents=True)
        for i in range(args.big_count):
            with open(bucket / "big" / f"big-{i:04d}.bin", "wb") as f:
                left = args.big_size
                while left:  # 8 MiB at a time: never the whole object in memory
                    n = min(8 << 20, left)
                    f.write(os.urandom(n))
                    left -= n
    if {"b", "c"} & set(names):
        for i in range(args.small_count):
            sub = bucket / "small" / f"p{i % args.small_prefixes:02d}"
            sub.mkdir(parents=True, exist_ok=True)
            (sub / f"small-{i:06d}.bin").write_bytes(os.urandom(args.small_size))


def list_inventory(server: RcloneS3Server, bucket: str, prefix: str) -> dict[str, int]:
    """Every key under ``prefix`` (made relative to it) and its size, through the S3 API."""
    client = server.client()
    try:
        found: dict[str, int] = {}
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
            for obj in page.get("Contents", []):
                found[obj["Key"][len(prefix) :]] = obj["Size"]
        return found
    finally:
        client.close()


def datasets(server: RcloneS3Server, names: Sequence[str]) -> list[Dataset]:
    described = {
        "a": ("big/", "large objects"),
        "b": ("small/", "small objects"),
        "c": ("", "large + small objects (the whole bucket)"),
    }
    result = []
    for name in names:
        prefix, what = described[name]
        inventory = list_inventory(server, SRC_BUCKET, prefix)
        if not inventory:
            raise RuntimeError(f"the source server lists nothing under {SRC_BUCKET}/{prefix}")
        result.append(Dataset(name, prefix, what, inventory))
    return result


# -- running the tools ---------------------------------------------------------------------------


@dataclass
class Run:
    """One timed run of one tool on one data set."""

    tool: str
    seconds: float = 0.0
    ok: bool = False
    error: str = ""
    phases: dict[str, float] = field(default_factory=dict)  # s5cmd: download and upload
    detail: dict[str, Any] = field(default_factory=dict)  # babel-sync: its --json report


@dataclass
class Bench:
    """Shared state of one invocation: the servers, their configs, the temp dir, tool paths."""

    src: RcloneS3Server
    dst: RcloneS3Server
    work: Path
    bin_dir: Path
    timeout: float
    s5cmd_workers: int | None
    babel_args: list[str]
    counter: int = 0

    def env(self) -> dict[str, str]:
        return {k: v for k, v in os.environ.items() if not _FOREIGN_ENV.match(k)}

    def fresh_dir(self, stem: str) -> Path:
        self.counter += 1
        path = self.work / f"{stem}-{self.counter}"
        path.mkdir()
        return path


def tool_path(bin_dir: Path, name: str) -> str:
    """The executable beside this interpreter (the project's virtualenv), else one on PATH."""
    candidate = bin_dir / name
    if candidate.exists():
        return str(candidate)
    found = shutil.which(name)
    if found is None:
        raise RuntimeError(f"{name} not found beside {sys.executable} or on PATH")
    return found


def timed(cmd: list[str], env: dict[str, str], timeout: float) -> tuple[float, str, str]:
    """Run ``cmd`` and return (seconds, stdout, error); ``error`` is empty on exit status 0."""
    log.debug("running %s", " ".join(cmd))
    start = time.perf_counter()
    try:
        # subprocess.run kills the child if we are interrupted (Ctrl-C) or it runs too long.
        proc = subprocess.run(
            cmd, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return time.perf_counter() - start, "", f"timed out after {timeout:.0f}s"
    seconds = time.perf_counter() - start
    stdout = proc.stdout.decode(errors="replace")
    if proc.returncode != 0:
        tail = proc.stderr.decode(errors="replace").strip().splitlines()[-3:]
        return seconds, stdout, f"exit status {proc.returncode}: {' / '.join(tail)}"
    return seconds, stdout, ""


def s3_url(bucket: str, prefix: str) -> str:
    return f"{bucket}/{prefix}" if prefix else f"{bucket}/"


def run_babel(bench: Bench, ds: Dataset, bucket: str, config: Path) -> Run:
    journal = bench.fresh_dir("journal")
    # BENCH_BABEL_WRAP="py-spy record -o /tmp/p.txt -f raw --" profiles babel-sync's run
    wrap = os.environ.get("BENCH_BABEL_WRAP", "").split()
    cmd = [
        *wrap,
        tool_path(bench.bin_dir, "babel-sync"),
        "sync",
        f"s3://src@{s3_url(SRC_BUCKET, ds.prefix)}",
        f"s3://dst@{s3_url(bucket, ds.prefix)}",
        "--config",
        str(config),
        "--journal",
        str(journal),
        "-q",
        "--json",
        *bench.babel_args,
    ]
    env = bench.env() | {"BABEL_SYNC_HOME": str(journal)}
    seconds, stdout, error = timed(cmd, env, bench.timeout)
    run = Run("babel-sync", seconds, not error, error)
    try:
        report = json.loads(stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        report = {}
    run.detail = {
        "engine_seconds": report.get("seconds"),
        "verification": report.get("verification", {}),
        "counters": report.get("counters", {}),
    }
    return run


def run_rclone(bench: Bench, ds: Dataset, bucket: str, config: Path) -> Run:
    # rclone paths have no trailing slash; the bucket alone is the whole bucket.
    src = f"src:{s3_url(SRC_BUCKET, ds.prefix)}".rstrip("/")
    dst = f"dst:{s3_url(bucket, ds.prefix)}".rstrip("/")
    cmd = [rclone_binary(), "sync", src, dst, *RCLONE_FLAGS, "--config", str(config), "-q"]
    seconds, _, error = timed(cmd, bench.env(), bench.timeout)
    return Run("rclone", seconds, not error, error)


def run_s5cmd(bench: Bench, ds: Dataset, bucket: str) -> Run:
    s5cmd = tool_path(bench.bin_dir, "s5cmd")
    workers = ["--numworkers", str(bench.s5cmd_workers)] if bench.s5cmd_workers else []
    staging = bench.fresh_dir("s5cmd-staging")
    try:
        down_env = bench.env() | _aws_env(bench.src)
        down = [s5cmd, "--endpoint-url", bench.src.endpoint, *workers, "cp"]
        down += [f"s3://{s3_url(SRC_BUCKET, ds.prefix)}*", f"{staging}/"]
        down_s, _, error = timed(down, down_env, bench.timeout)
        if error:
            return Run("s5cmd", down_s, False, f"download: {error}", {"download": down_s})
        up_env = bench.env() | _aws_env(bench.dst)
        up = [s5cmd, "--endpoint-url", bench.dst.endpoint, *workers, "cp"]
        up += [f"{staging}/*", f"s3://{s3_url(bucket, ds.prefix)}"]
        up_s, _, error = timed(up, up_env, bench.timeout)
        phases = {"download": down_s, "upload": up_s}
        return Run("s5cmd", down_s + up_s, not error, f"upload: {error}" if error else "", phases)
    finally:
        shutil.rmtree(staging, ignore_errors=True)  # not timed


def _aws_env(server: RcloneS3Server) -> dict[str, str]:
    return {
        "AWS_ACCESS_KEY_ID": server.access_key_id,
        "AWS_SECRET_ACCESS_KEY": server.secret_access_key,
        "AWS_REGION": "us-east-1",
    }


def check_destination(bench: Bench, ds: Dataset, bucket: str, run: Run) -> None:
    """Mark ``run`` failed unless the destination holds exactly the source's keys and sizes."""
    if not run.ok:
        return
    got = list_inventory(bench.dst, bucket, ds.prefix)
    if got == ds.inventory:
        return
    missing = ds.inventory.keys() - got.keys()
    extra = got.keys() - ds.inventory.keys()
    resized = [k for k in ds.inventory.keys() & got.keys() if got[k] != ds.inventory[k]]
    run.ok = False
    run.error = (
        f"destination differs: {len(got)} objects / {sum(got.values()):,} bytes vs "
        f"{ds.objects} / {ds.bytes:,} at the source ({len(missing)} missing, {len(extra)} "
        f"extra, {len(resized)} of another size; e.g. {sorted(missing or extra or resized)[:2]})"
    )


def run_tool(bench: Bench, tool: str, ds: Dataset, configs: dict[str, Path], rep: int) -> Run:
    bucket = f"{ds.name}-{tool}-{rep}"
    bench.dst.create_bucket(bucket)
    try:
        if tool == "babel-sync":
            run = run_babel(bench, ds, bucket, configs["babel-sync"])
        elif tool == "rclone":
            run = run_rclone(bench, ds, bucket, configs["rclone"])
        else:
            run = run_s5cmd(bench, ds, bucket)
        check_destination(bench, ds, bucket, run)
    finally:
        # Free the disk for the next run; the bucket name is never used again.
        shutil.rmtree(bench.dst.root / bucket, ignore_errors=True)
    state = f"{run.seconds:.2f}s" if run.ok else f"FAILED ({run.error})"
    log.info("  %s, run %d: %s", tool, rep, state)
    return run


def write_configs(work: Path, src: RcloneS3Server, dst: RcloneS3Server) -> dict[str, Path]:
    babel = work / "babel-sync.toml"
    lines = []
    for name, server in (("src", src), ("dst", dst)):
        lines.append(f"[profiles.{name}]")
        lines += [f"{k} = {json.dumps(v)}" for k, v in server.profile().items()]
        lines.append("")
    babel.write_text("\n".join(lines))
    rclone = work / "rclone.conf"
    lines = []
    for name, server in (("src", src), ("dst", dst)):
        lines += [
            f"[{name}]",
            "type = s3",
            "provider = Other",
            f"endpoint = {server.endpoint}",
            "region = us-east-1",
            f"access_key_id = {server.access_key_id}",
            f"secret_access_key = {server.secret_access_key}",
            "",
        ]
    rclone.write_text("\n".join(lines))
    for path in (babel, rclone):
        path.chmod(0o600)
    return {"babel-sync": babel, "rclone": rclone}


# -- results ------------------------------------------------------------------------------------


def summarize(ds: Dataset, runs: dict[str, list[Run]]) -> dict[str, Any]:
    """Best run per tool, ratios against the best peer, and the verdict for babel-sync."""
    rows = []
    for tool, tool_runs in runs.items():
        good = [r for r in tool_runs if r.ok]
        best = min(good, key=lambda r: r.seconds) if good else None
        failed = [r for r in tool_runs if not r.ok]
        row: dict[str, Any] = {
            "tool": tool,
            "ok": best is not None and not failed,
            "runs": len(tool_runs),
            "failed_runs": len(failed),
            "error": failed[0].error if failed else "",
            "seconds": best.seconds if best else None,
            "all_seconds": [round(r.seconds, 3) for r in tool_runs],
            "mb_s": ds.bytes / best.seconds / 1e6 if best else None,
            "objects_s": ds.objects / best.seconds if best else None,
            "phases": best.phases if best else {},
            "detail": best.detail if best else (failed[0].detail if failed else {}),
        }
        rows.append(row)
    peer_times = [r["seconds"] for r in rows if r["tool"] in PEERS and r["ok"]]
    best_peer = min(peer_times) if peer_times else None
    best_peer_tool = next((r["tool"] for r in rows if r["ok"] and r["seconds"] == best_peer), None)
    for row in rows:
        row["ratio"] = row["seconds"] / best_peer if best_peer and row["ok"] else None
    babel = next((r for r in rows if r["tool"] == "babel-sync"), None)
    target = TARGETS[ds.name]
    verdict = None
    if babel is not None:
        verdict = bool(babel["ok"] and babel["ratio"] is not None and babel["ratio"] <= target)
    return {
        "dataset": ds.name,
        "description": ds.description,
        "prefix": ds.prefix,
        "objects": ds.objects,
        "bytes": ds.bytes,
        "best_peer": best_peer_tool,
        "target_ratio": target,
        "ratio": babel["ratio"] if babel else None,
        "pass": verdict,
        "results": rows,
    }


def _note(row: dict[str, Any]) -> str:
    if not row["ok"]:
        return f"FAILED: {row['error']}"
    if row["tool"] == "babel-sync":
        v = row["detail"].get("verification", {})
        c = row["detail"].get("counters", {})
        return (
            f"verify={v.get('mode', '?')} (runtime CRC all, {v.get('sampled', 0)} sampled, "
            f"{v.get('full', 0)} full; {c.get('verified', 0)} verified)"
        )
    if row["tool"] == "s5cmd":
        p = row["phases"]
        return f"via local disk: download {p['download']:.2f}s + upload {p['upload']:.2f}s"
    return " ".join(RCLONE_FLAGS)


def print_tables(env: dict[str, Any], summaries: list[dict[str, Any]]) -> None:
    print(
        f"sync benchmark: 2 x rclone serve s3 on 127.0.0.1 (different keys: no server-side copy), "
        f"{env['cpu_count']} CPUs, python {env['python']}, best of {env['repeat']}; MB = 10^6 B"
    )
    print(
        "versions: "
        + ", ".join(f"{k} {v}" for k, v in env["versions"].items())
        + f"; s5cmd --numworkers {env['s5cmd_numworkers']}"
    )
    for s in summaries:
        target = s["target_ratio"]
        print()
        print(
            f"({s['dataset']}) {s['description']}: {s['objects']:,} objects, {human_bytes(s['bytes'])} "
            f"[{SRC_BUCKET}/{s['prefix']}] - target babel-sync <= {target:g}x best peer "
            f"({s['best_peer'] or 'none succeeded'})"
        )
        head = ["tool", "seconds", "MB/s", "objects/s", "vs best peer", "target", "notes"]
        table = [head]
        for r in s["results"]:
            verdict = ""
            if r["tool"] == "babel-sync":
                verdict = ("PASS" if s["pass"] else "FAIL") + f" (<= {target:g}x)"
            table.append(
                [
                    r["tool"],
                    f"{r['seconds']:.2f}" if r["ok"] else "FAILED",
                    f"{r['mb_s']:,.1f}" if r["ok"] else "-",
                    f"{r['objects_s']:,.1f}" if r["ok"] else "-",
                    f"{r['ratio']:.2f}x" if r["ratio"] is not None else "-",
                    verdict,
                    _note(r),
                ]
            )
        widths = [max(len(row[i]) for row in table) for i in range(len(head) - 1)]
        for i, row in enumerate(table):
            cells = [
                c.ljust(w) if j == 0 else c.rjust(w)
                for j, (c, w) in enumerate(zip(row[:-1], widths, strict=True))
            ]
            print(" | ".join([*cells, row[-1]]))
            if i == 0:
                print("-+-".join("-" * w for w in widths) + "-+------")


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({exc})"
    return out.strip().splitlines()[0] if out.strip() else "unknown"


def source_revision() -> str:
    """The commit babel-sync runs from, with ``+dirty`` when its packages have local edits."""
    head = _version(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"])
    status = subprocess.run(
        ["git", "-C", str(ROOT), "status", "--porcelain", "--", "babel_sync", "objstore"],
        capture_output=True,
        text=True,
    ).stdout
    return head + ("+dirty" if status.strip() else "")


def environment(args: argparse.Namespace, bin_dir: Path) -> dict[str, Any]:
    versions = {
        "rclone": _version([rclone_binary(), "version"]).removeprefix("rclone "),
        "s5cmd": _version([tool_path(bin_dir, "s5cmd"), "version"]),
    }
    for pkg in ("babel-storage", "boto3"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = "not installed"
    versions["babel-sync source"] = source_revision()
    return {
        "cpu_count": os.cpu_count(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "versions": versions,
        "repeat": args.repeat,
        "big": {"count": args.big_count, "size": args.big_size},
        "small": {"count": args.small_count, "size": args.small_size},
        "small_prefixes": args.small_prefixes,
        "rclone_flags": RCLONE_FLAGS,
        "s5cmd_numworkers": args.s5cmd_workers or "default",
        "babel_sync_extra_args": args.babel_args,
        "babel_sync_verification": "default (runtime CRC + sampled CRC of multipart objects)"
        if not args.babel_args
        else "see babel_sync_extra_args",
    }


# -- main ---------------------------------------------------------------------------------------


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Let SIGTERM unwind like Ctrl-C, so servers stop and temp dirs go away."""

    def handler(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def bench_all(args: argparse.Namespace, names: list[str], tools: list[str]) -> list[dict[str, Any]]:
    bin_dir = Path(sys.executable).parent
    with ExitStack() as stack:
        work = Path(tempfile.mkdtemp(prefix="bench-sync-", dir=args.dir))
        stack.callback(shutil.rmtree, work, ignore_errors=True)
        src_root = work / "src-root"
        log.info("writing the source data sets %s under %s ...", ",".join(names), src_root)
        started = time.perf_counter()
        write_source(src_root, args, names)
        log.info("source written in %.1fs", time.perf_counter() - started)
        src = RcloneS3Server(src_root, access_key_id=SRC_KEYS[0], secret_access_key=SRC_KEYS[1],
                             log_file=work / "src-server.log")  # fmt: skip
        dst = RcloneS3Server(work / "dst-root", access_key_id=DST_KEYS[0],
                             secret_access_key=DST_KEYS[1], log_file=work / "dst-server.log")  # fmt: skip
        stack.callback(src.stop)
        src.start()
        stack.callback(dst.stop)
        dst.start()
        bench = Bench(
            src, dst, work, bin_dir, args.timeout, args.s5cmd_workers, list(args.babel_args)
        )
        configs = write_configs(work, src, dst)
        summaries = []
        for ds in datasets(src, names):
            log.info(
                "(%s) %s: %d objects, %s",
                ds.name,
                ds.description,
                ds.objects,
                human_bytes(ds.bytes),
            )
            runs: dict[str, list[Run]] = {tool: [] for tool in tools}
            for rep in range(1, args.repeat + 1):
                for tool in tools:  # interleaved, so drift hits every tool alike
                    runs[tool].append(run_tool(bench, tool, ds, configs, rep))
            summaries.append(summarize(ds, runs))
        return summaries


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0],
        epilog="Exit status 1 if babel-sync misses a target or fails.",
    )
    parser.add_argument("--datasets", default="a,b,c", help="which of a,b,c (default all)")
    parser.add_argument("--big-count", type=int, default=4, help="large objects in (a) (4)")
    parser.add_argument(
        "--big-size", type=parse_size, default=256 << 20, help="size of each large object (256MiB)"
    )
    parser.add_argument("--small-count", type=int, default=5000, help="small objects in (b) (5000)")
    parser.add_argument(
        "--small-size", type=parse_size, default=16 << 10, help="size of each small object (16KiB)"
    )
    parser.add_argument("--small-prefixes", type=int, default=8, help="prefixes for (b) (8)")
    parser.add_argument("--repeat", type=int, default=1, help="runs per tool, best kept (1)")
    parser.add_argument(
        "--tools", default=",".join(TOOLS), help=f"which of {','.join(TOOLS)} (default all)"
    )
    parser.add_argument(
        "--s5cmd-workers", type=int, default=None, metavar="N", help="s5cmd --numworkers (default)"
    )
    parser.add_argument(
        "--babel-arg",
        dest="babel_args",
        action="append",
        default=[],
        metavar="ARG",
        help="extra argument for babel-sync sync, e.g. --babel-arg=--transfers=32 (repeatable)",
    )
    parser.add_argument("--timeout", type=float, default=900, help="seconds per command (900)")
    parser.add_argument(
        "--dir",
        type=Path,
        default=Path(tempfile.gettempdir()),
        help="where the temporary data goes (system temp dir)",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="-v: commands run")
    args = parser.parse_args(argv)
    names = [n for n in args.datasets.split(",") if n]
    tools = [t for t in args.tools.split(",") if t]
    if not names or not set(names) <= set(TARGETS):
        parser.error(f"--datasets: choose from a,b,c, got {args.datasets!r}")
    if not tools or not set(tools) <= set(TOOLS):
        parser.error(f"--tools: choose from {','.join(TOOLS)}, got {args.tools!r}")
    if min(args.big_count, args.small_count, args.small_prefixes, args.repeat) < 1:
        parser.error("counts, --small-prefixes and --repeat must be >= 1")
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("botocore", "boto3", "urllib3", "s3transfer", "tests.servers"):
        logging.getLogger(noisy).setLevel(logging.WARNING)

    env = environment(args, Path(sys.executable).parent)
    try:
        with sigterm_as_interrupt():
            summaries = bench_all(args, names, tools)
    except KeyboardInterrupt:
        print("interrupted; servers stopped and temporary data removed", file=sys.stderr)
        return 130
    if args.json:
        print(json.dumps({"environment": env, "datasets": summaries}, indent=2))
    else:
        print_tables(env, summaries)
    return 0 if all(s["pass"] is not False for s in summaries) else 1


if __name__ == "__main__":
    sys.exit(main())
