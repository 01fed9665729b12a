"""The ``babel-sync`` command line: sync, copy, check, ls, stat.

Exit codes (shared with every CLI of the project, :class:`objstore.cli.ExitCode`): 0 done and
verified, 1 some objects failed, 2 bad usage or configuration, 3 not found, 4 credentials or
permission, 5 endpoint unreachable, 6 verification mismatch.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import logging
import operator
import os
import sys
import threading
import time
from collections.abc import Iterable, Iterator, Sequence
from contextlib import nullcontext
from pathlib import Path

from objstore import ObjectInfo, open_object, open_store
from objstore.cli import (
    ExitCode,
    add_common_options,
    load_config,
    parse_size,
    print_json,
    run,
)

from .engine import VERIFY_MODES, SyncJob, SyncOptions, SyncReport
from .filters import KeyFilter
from .listing import ParallelLister
from .progress import Counters, Reporter
from .transfer import TransferOptions

log = logging.getLogger(__name__)


SECTIONS = ("service",)  # a config file may also configure `babel-sync serve`


def _fmt_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


def _print_object(obj: ObjectInfo, as_json: bool) -> None:
    if as_json:
        print_json({"key": obj.key, "size": obj.size, "mtime": obj.mtime, "etag": obj.etag})
    else:
        sys.stdout.write(f"{obj.size:>14}  {_fmt_time(obj.mtime)}  {obj.key}\n")


# -- ls / stat ---------------------------------------------------------------------------


@contextlib.contextmanager
def _few_collections() -> Iterator[None]:
    """Run the cyclic garbage collector rarely while a command builds millions of small objects.

    Listing creates an ObjectInfo (and its dict) per key; with the default thresholds the
    collector runs every 700 allocations and rescans what the listing holds, about a fifth of
    a recursive ls's CPU. The objects form no cycles, so collecting seldom loses nothing.
    """
    old = gc.get_threshold()
    gc.set_threshold(100_000, 50, 100)
    try:
        yield
    finally:
        gc.set_threshold(*old)


def cmd_ls(args: argparse.Namespace) -> int:
    with _few_collections():
        return _ls(args)


def _ls(args: argparse.Namespace) -> int:
    store = open_store(args.url, load_config(args, SECTIONS))
    if not args.recursive:
        count = 0
        for page in store.iter_pages(args.prefix, delimiter="/"):
            for prefix in page.prefixes:
                if args.json:
                    print_json({"prefix": prefix})
                else:
                    sys.stdout.write(f"{'DIR':>14}  {'':19}  {prefix}\n")
            for obj in page.objects:
                _print_object(obj, args.json)
                count += 1
                if args.max and count >= args.max:
                    return 0
        return 0
    return _ls_parallel(store, args)


# Recursive ls sorts in memory up to this many objects, then spills into an LMDB manifest
# (bounded memory for listings of any size).
LS_MEMORY_OBJECTS = 2_000_000


def _ls_parallel(store, args: argparse.Namespace) -> int:
    """Recursive listing: parallel ranges, sorted in memory (or in an LMDB manifest past
    ``LS_MEMORY_OBJECTS``), then printed in key order."""
    import tempfile

    from .journal import Journal

    with (
        tempfile.TemporaryDirectory(prefix="babel-ls-") as tmp,
        Journal(tmp, {"ls": str(store.url)}) as journal,
    ):
        pages: list[list[ObjectInfo]] = []
        held = 0
        writer = None
        lock = threading.Lock()

        def on_objects(objects: list[ObjectInfo]) -> None:
            nonlocal held, writer
            with lock:
                if writer is None:
                    pages.append(objects)
                    held += len(objects)
                    if held <= LS_MEMORY_OBJECTS:
                        return
                    writer = journal.manifest_writer("src")
                    for page in pages:
                        writer.add(page)
                    pages.clear()
                    return
            writer.add(objects)

        lister = ParallelLister(store, workers=args.list_workers, on_objects=on_objects)
        stats = lister.run(args.prefix)
        if writer is not None:
            _print_objects(journal.iter_manifest("src"), args.json, args.max)
        else:
            # Pages are sorted runs: ordered by their first keys they are nearly sorted, which
            # Python's sort (timsort) finishes in about linear time.
            pages.sort(key=lambda page: page[0].key)
            objects = [obj for page in pages for obj in page]
            objects.sort(key=operator.attrgetter("key"))  # str order is UTF-8 byte order
            _print_objects(objects, args.json, args.max)
    log.info("listed %s", stats)
    return 0


def _print_objects(objects: Iterable[ObjectInfo], as_json: bool, limit: int) -> None:
    """Print listing lines in chunks, formatting each distinct second once."""
    if as_json:
        for count, obj in enumerate(objects, start=1):
            _print_object(obj, True)
            if limit and count >= limit:
                return
        return
    write = sys.stdout.write
    stamps: dict[float, str] = {}
    lines: list[str] = []
    for count, obj in enumerate(objects, start=1):
        second = obj.mtime // 1
        stamp = stamps.get(second)
        if stamp is None:
            if len(stamps) > 100_000:
                stamps.clear()
            stamp = stamps[second] = _fmt_time(second)
        lines.append(f"{obj.size:>14}  {stamp}  {obj.key}\n")
        if len(lines) >= 4096 or count == limit:
            write("".join(lines))
            lines.clear()
            if count == limit:
                return
    write("".join(lines))


def cmd_stat(args: argparse.Namespace) -> int:
    store, key = open_object(args.url, load_config(args, SECTIONS))
    info = store.stat(key)
    record = {
        "key": info.key,
        "size": info.size,
        "mtime": info.mtime,
        "etag": info.etag,
        "checksum": str(info.checksum) if info.checksum else None,
        "metadata": info.metadata,
    }
    if args.json:
        print_json(record)
    else:
        for name, value in record.items():
            sys.stdout.write(f"{name:>9}: {value}\n")
    return 0


# -- sync / copy / check ----------------------------------------------------------------


def _options(args: argparse.Namespace, mode: str) -> SyncOptions:
    part_size = None if args.part_size == "auto" else parse_size(args.part_size)
    return SyncOptions(
        mode=mode,
        delete=getattr(args, "delete", False),
        max_delete=getattr(args, "max_delete", None),
        key_filter=KeyFilter.from_args(args.include, args.exclude),
        dry_run=args.dry_run,
        transfers=args.transfers,
        list_workers=args.list_workers,
        # An explicit part size also means: anything larger than one part goes multipart.
        transfer=TransferOptions(part_size=part_size, multipart_threshold=part_size)
        if part_size
        else TransferOptions(),
        bwlimit=float(parse_size(args.bwlimit)) if args.bwlimit else None,
        verify=args.verify,
        sample_blocks=args.sample_blocks,
        sample_seed=args.seed,
        compare="size" if args.size_only else "checksum",
        max_memory=parse_size(args.max_memory),
        journal_dir=Path(args.journal) if args.journal else None,
        engine=args.engine,
        ray_address=args.ray_address or os.environ.get("RAY_ADDRESS"),
    )


def _run_job(args: argparse.Namespace, mode: str) -> int:
    options = _options(args, mode)
    counters = Counters()
    job = SyncJob(
        args.src,
        args.dst,
        options,
        config=load_config(args, SECTIONS),
        counters=counters,
        plan_out=sys.stdout if options.dry_run else None,
    )
    # Ray's driver prints cluster messages (a worker lost, a task retried) on stdout; stdout is
    # the report's, so anything else printed during the run goes to stderr
    with (
        _few_collections(),
        contextlib.redirect_stdout(sys.stderr) if options.engine == "ray" else nullcontext(),
        Reporter(
            counters,
            enabled=not args.quiet and not args.json,
            interval=args.stats_interval,
            json_lines=args.progress_json,
        ),
    ):
        report = job.run()
    _print_report(report, args)
    return int(report.exit_code)


def _print_report(report: SyncReport, args: argparse.Namespace) -> None:
    if args.json:
        print_json(report.to_json())
        return
    if args.dry_run:
        c = report.counters
        print(
            f"dry run: would copy {c['to_copy']:,} objects ({c['to_copy_bytes']:,} bytes), "
            f"skip {c['skipped']:,}",
            file=sys.stderr,
        )
        return
    c = report.counters
    rate = c["bytes_moved"] / report.seconds if report.seconds else 0
    v = report.verification
    print(
        f"{report.source} -> {report.destination}: copied {c['copied']:,} objects "
        f"({c['copied_bytes']:,} bytes, {rate / 1e6:,.1f} MB/s), skipped {c['skipped']:,}, "
        f"deleted {c['deleted']:,}, failed {c['failed']:,} in {report.seconds:,.1f}s",
        file=sys.stderr,
    )
    print(
        f"verification ({v['mode']}): {c['verified']:,} objects verified, {v['sampled']:,} sampled "
        f"(seed {v['seed']}, {v['sample_blocks']} blocks: detects 1% corruption with p={v['detection_1pct']:.3f}), "
        f"{v['full']:,} full, {len(report.mismatches):,} mismatches",
        file=sys.stderr,
    )
    for failure in report.failures[:20]:
        print(f"  FAILED {failure['key']}: {failure['error']}", file=sys.stderr)
    for mismatch in report.mismatches[:20]:
        print(f"  MISMATCH {mismatch}", file=sys.stderr)


def _add_job_options(p: argparse.ArgumentParser, *, mirror: bool) -> None:
    p.add_argument("src", help="source URL, e.g. s3://region-a@bucket/prefix/")
    p.add_argument("dst", help="destination URL, e.g. oss://region-b@bucket/prefix/")
    if mirror:
        p.add_argument(
            "--delete", action="store_true", help="delete destination objects missing at the source"
        )
        p.add_argument(
            "--max-delete", type=int, metavar="N", help="refuse to delete more than N objects"
        )
    p.add_argument(
        "--include", action="append", metavar="GLOB", help="only keys matching (repeatable)"
    )
    p.add_argument(
        "--exclude", action="append", metavar="GLOB", help="skip keys matching (repeatable)"
    )
    p.add_argument(
        "--dry-run", action="store_true", help="write the plan as JSON lines; change nothing"
    )
    p.add_argument(
        "--transfers", type=int, default=16, metavar="N", help="objects/parts in flight (16)"
    )
    p.add_argument(
        "--list-workers", type=int, default=64, metavar="N", help="parallel listing workers (64)"
    )
    p.add_argument(
        "--part-size", default="auto", metavar="auto|SIZE", help="multipart part size (auto)"
    )
    p.add_argument("--bwlimit", metavar="SIZE", help="bandwidth limit per second, e.g. 100M")
    p.add_argument(
        "--max-memory", default="1GiB", metavar="SIZE", help="transfer buffers in flight (1GiB)"
    )
    p.add_argument(
        "--verify",
        choices=VERIFY_MODES,
        default="sample",
        help="none | runtime (streaming CRC) | sample (runtime + sampled blocks, default) | full",
    )
    p.add_argument(
        "--sample-blocks", type=int, default=16, metavar="N", help="random blocks per object (16)"
    )
    p.add_argument(
        "--seed", type=int, help="seed for sampled verification (default: random, reported)"
    )
    p.add_argument(
        "--size-only", action="store_true", help="compare by size only (skip checksum checks)"
    )
    p.add_argument(
        "--journal",
        metavar="DIR",
        help="job journal directory (default: ~/.cache/babel-sync/jobs/ID)",
    )
    p.add_argument("--json", action="store_true", help="print a machine-readable summary")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress display")
    p.add_argument(
        "--engine",
        choices=["local", "ray"],
        default="local",
        help="where transfers run: this process (local) or a Ray cluster (ray)",
    )
    p.add_argument(
        "--ray-address",
        metavar="ADDR",
        help="the Ray cluster for --engine ray (default: $RAY_ADDRESS, else auto)",
    )
    p.add_argument(
        "--progress-json",
        action="store_true",
        help="progress as 'PROGRESS {json}' lines on stderr, for programs",
    )
    p.add_argument(
        "--stats-interval",
        type=float,
        default=5.0,
        metavar="S",
        help="seconds between progress lines when not on a terminal (5)",
    )
    add_common_options(p, subcommand=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="babel-sync",
        description="Cross-region sync of object stores (s3://, oss://, file://, any fsspec URL): "
        "parallel listing, multipart transfers, CRC verification, crash-safe resume.",
    )
    add_common_options(parser)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    jobs = (
        ("sync", "make DST mirror SRC", "Make DST mirror SRC.", True),
        ("copy", "copy new and changed objects, never delete",
         "Copy new and changed objects from SRC to DST; never delete.", False),
        ("check", "verify DST matches SRC, change nothing",
         "Verify that DST matches SRC (sampled or full CRC); change nothing.", False),
    )  # fmt: skip
    for mode, summary, description, mirror in jobs:
        job = sub.add_parser(mode, help=summary, description=description)
        _add_job_options(job, mirror=mirror)
        job.set_defaults(func=functools.partial(_run_job, mode=mode))

    ls = sub.add_parser(
        "ls", help="list objects under a URL", description="List objects under a store URL."
    )
    ls.add_argument("url", help="store URL, e.g. s3://PROFILE@bucket/prefix/")
    ls.add_argument(
        "prefix", nargs="?", default="", help="only keys starting with this (relative to URL)"
    )
    ls.add_argument(
        "-R", "--recursive", action="store_true", help="list every key (parallel), not one level"
    )
    ls.add_argument(
        "--list-workers", type=int, default=64, metavar="N", help="parallel listing workers (64)"
    )
    ls.add_argument("--max", type=int, default=0, metavar="N", help="stop after N objects")
    ls.add_argument("--json", action="store_true", help="one JSON object per line")
    add_common_options(ls, subcommand=True)
    ls.set_defaults(func=cmd_ls)

    stat = sub.add_parser(
        "stat", help="show one object's metadata", description="Show one object's metadata."
    )
    stat.add_argument("url", help="object URL, e.g. oss://bucket/dir/file.bin")
    stat.add_argument("--json", action="store_true", help="machine-readable output")
    add_common_options(stat, subcommand=True)
    stat.set_defaults(func=cmd_stat)
    from .service.cli import add_commands

    add_commands(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from objstore.s3 import S3Store

    # A command served by the lean S3 data path never builds a boto3 client (half a second).
    lazy = S3Store.lazy_client
    S3Store.lazy_client = True
    try:
        return run(build_parser(), argv)
    finally:
        S3Store.lazy_client = lazy


if __name__ == "__main__":
    sys.exit(main())


__all__ = ["ExitCode", "build_parser", "main"]
