"""The ``babel-sync`` command line.

Commands so far: ``ls`` (list a store URL) and ``stat`` (one object's metadata). Sync, copy,
check and the service client arrive with the sync engine.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Sequence

from objstore import open_object, open_store
from objstore.cli import add_common_options, load_config, print_json, run

log = logging.getLogger(__name__)


def _fmt_time(ts: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(ts))


def cmd_ls(args: argparse.Namespace) -> int:
    store = open_store(args.url, load_config(args))
    delimiter = "" if args.recursive else "/"
    count = 0
    for page in store.iter_pages(args.prefix, delimiter=delimiter):
        for prefix in page.prefixes:
            if args.json:
                print_json({"prefix": prefix})
            else:
                sys.stdout.write(f"{'DIR':>14}  {'':19}  {prefix}\n")
        for obj in page.objects:
            if args.json:
                print_json({"key": obj.key, "size": obj.size, "mtime": obj.mtime, "etag": obj.etag})
            else:
                sys.stdout.write(f"{obj.size:>14}  {_fmt_time(obj.mtime)}  {obj.key}\n")
            count += 1
            if args.max and count >= args.max:
                return 0
    return 0


def cmd_stat(args: argparse.Namespace) -> int:
    store, key = open_object(args.url, load_config(args))
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


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="babel-sync",
        description="Cross-region sync of object stores (s3://, oss://, file://, any fsspec URL).",
    )
    add_common_options(parser)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    ls = sub.add_parser(
        "ls", help="list objects under a URL", description="List objects under a store URL."
    )
    ls.add_argument("url", help="store URL, e.g. s3://PROFILE@bucket/prefix/")
    ls.add_argument(
        "prefix", nargs="?", default="", help="only keys starting with this (relative to URL)"
    )
    ls.add_argument("-R", "--recursive", action="store_true", help="list every key, not one level")
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
