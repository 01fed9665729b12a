"""The ``pcache`` command line: run a worker, warm and invalidate the cache, inspect the cluster.

Client commands find the local worker and the token in ``$PCACHE_WORKER`` / ``$PCACHE_TOKEN`` or
the ``[pcache]`` table of ``--config`` (``$PCACHE_CONFIG``). The token is never a command-line
argument (it would show in ``ps``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from objstore.cli import CommandError, ExitCode, add_common_options, human_bytes, print_json, run

from .config import ClientConfig, Durability, WorkerConfig

log = logging.getLogger(__name__)


def _client(args: argparse.Namespace) -> Any:
    from .client import PcacheClient

    config = ClientConfig.load(getattr(args, "config", None))
    if getattr(args, "worker", None):
        config = dataclasses.replace(config, worker=args.worker)
    return PcacheClient(config)


def cmd_worker(args: argparse.Namespace) -> int:
    from .worker import run_worker

    config = WorkerConfig.load(args.config)
    overrides: dict[str, Any] = {}
    if args.node_id:
        overrides["node_id"] = args.node_id
    if args.listen:
        overrides["listen"] = args.listen
    if overrides:
        config = dataclasses.replace(config, **overrides)
    run_worker(config)
    return ExitCode.OK


def cmd_warmup(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.json or not sys.stderr.isatty():
            result = client.warmup(args.path)
        else:
            from rich.progress import (
                BarColumn,
                DownloadColumn,
                Progress,
                TimeRemainingColumn,
                TransferSpeedColumn,
            )

            with Progress(
                "[progress.description]{task.description}",
                BarColumn(),
                DownloadColumn(),
                TransferSpeedColumn(),
                TimeRemainingColumn(),
                transient=True,
            ) as progress:
                task = progress.add_task(f"warming {args.path}", total=None)
                result = client.warmup(
                    args.path,
                    on_progress=lambda done, total: progress.update(
                        task, completed=done, total=total
                    ),
                )
    if args.json:
        print_json(result)
    else:
        by_source = ", ".join(f"{k}: {v}" for k, v in sorted(result["blocks_by_source"].items()))
        print(
            f"warmed {result['objects']} object(s), {human_bytes(result['bytes'])} "
            f"(blocks by source: {by_source or 'none'})"
        )
    return ExitCode.OK


def cmd_invalidate(args: argparse.Namespace) -> int:
    with _client(args) as client:
        result = client.invalidate(args.path, cluster=not args.local, blocks=not args.keep_blocks)
    if args.json:
        print_json(result)
        return ExitCode.OK
    nodes = [result, *result.get("peers", [])]
    for node in nodes:
        if "error" in node:
            print(f"{node.get('node_id', '?')}: error: {node['error']}")
        else:
            print(
                f"{node['node_id']}: dropped {node['metadata_entries']} metadata entries, "
                f"{node['blocks']} blocks"
            )
    failed = [n for n in nodes if "error" in n]
    return ExitCode.FAILED if failed else ExitCode.OK


def cmd_status(args: argparse.Namespace) -> int:
    with _client(args) as client:
        local = client.status()
        cluster = [local]
        for peer in local["peers"]:
            if peer["id"] == local["node_id"]:
                continue
            try:
                cluster.append(client.status(peer["address"]))
            except OSError as exc:
                cluster.append(
                    {"node_id": peer["id"], "address": peer["address"], "error": str(exc)}
                )
    if args.json:
        print_json({"nodes": cluster})
        return ExitCode.OK
    print(
        f"{'node':<16} {'state':<10} {'used':>12} {'capacity':>12} {'local hit':>9} "
        f"{'backlog':>8} {'refused':>8}"
    )
    for node in cluster:
        if "error" in node:
            print(f"{node['node_id']:<16} {'DOWN':<10} {node['error']}")
            continue
        used = sum(d["used"] for d in node["disks"])
        capacity = sum(d["capacity"] for d in node["disks"])
        unhealthy = [d["path"] for d in node["disks"] if not d["healthy"]]
        state = "degraded" if unhealthy else "ok"
        print(
            f"{node['node_id']:<16} {state:<10} {human_bytes(used):>12} {human_bytes(capacity):>12} "
            f"{node['reads']['hit_ratio_local']:>9.1%} {node['writeback']['objects']:>8} "
            f"{node['writeback'].get('failed_permanently', 0):>8}"
        )
    return ExitCode.OK


def cmd_uploads(args: argparse.Namespace) -> int:
    """``pcache uploads [retry|discard NS[/KEY]]``: this node's write-back records."""
    with _client(args) as client:
        if args.action in ("retry", "discard"):
            if not args.path:
                raise CommandError(f"uploads {args.action} needs NS or NS/KEY", ExitCode.USAGE)
            done = client.upload_action(args.action, args.path)
            if args.json:
                print_json({args.action: done})
            else:
                verb = "retrying" if args.action == "retry" else "discarded"
                print(f"{verb} {len(done)} upload(s)" + "".join(f"\n  {k}" for k in done))
            return ExitCode.OK if done else ExitCode.NOT_FOUND
        listing = client.uploads()
    records = listing["records"]
    if args.json:
        print_json(listing)
        return ExitCode.OK
    if not records:
        print(f"{listing['node_id']}: nothing waiting for the store")
        return ExitCode.OK
    print(f"{'state':<10} {'size':>10}  key")
    for record in records:
        state = "refused" if record["permanent"] else "retrying" if record["error"] else "pending"
        if record["delete"]:
            state += "/rm"
        print(f"{state:<10} {human_bytes(record['size']):>10}  {record['ns']}/{record['key']}")
        if record["error"]:
            print(f"{'':<22}{record['error']}")
    refused = sum(1 for r in records if r["permanent"])
    return ExitCode.FAILED if refused else ExitCode.OK


def cmd_ls(args: argparse.Namespace) -> int:
    """Streams: each page of the listing is printed as it arrives (``--json``: one document)."""
    with _client(args) as client:
        pages = client.iter_dir(args.path, recursive=args.recursive)
        if args.json:
            objects: list[dict[str, Any]] = []
            prefixes: list[str] = []
            for page in pages:
                objects.extend({"key": o.key, "size": o.size, "etag": o.etag} for o in page.objects)
                prefixes.extend(page.prefixes)
            print_json({"objects": objects, "prefixes": prefixes})
            return ExitCode.OK
        for page in pages:
            lines = [(p, f"{'DIR':>12}  {p}") for p in page.prefixes]
            lines += [(o.key, f"{o.size:>12}  {o.key}") for o in page.objects]
            sys.stdout.write("".join(line + "\n" for _, line in sorted(lines)))
            sys.stdout.flush()
    return ExitCode.OK


def cmd_cat(args: argparse.Namespace) -> int:
    with _client(args) as client, client.open(args.path, "rb") as reader:
        while chunk := reader.read(8 << 20):
            sys.stdout.buffer.write(chunk)
    return ExitCode.OK


def cmd_put(args: argparse.Namespace) -> int:
    source = Path(args.local)
    if not source.is_file():
        raise CommandError(f"not a file: {source}", ExitCode.NOT_FOUND)
    with _client(args) as client:
        with source.open("rb") as file, client.open(args.path, "wb") as writer:
            while chunk := file.read(32 << 20):
                writer.write(chunk)
        info = client.flush(args.path) if args.durable == "remote" else client.stat(args.path)
    if args.json:
        print_json({"key": info.key, "size": info.size, "etag": info.etag, "durable": args.durable})
    else:
        print(f"wrote {args.path} ({human_bytes(info.size)}, {args.durable}-durable)")
    return ExitCode.OK


def cmd_mount(args: argparse.Namespace) -> int:
    from .mount import mount_command

    return mount_command(args)


def cmd_umount(args: argparse.Namespace) -> int:
    from .mount import umount_command

    return umount_command(args.mountpoint)


def cmd_stats(args: argparse.Namespace) -> int:
    from .mount import stats_command

    return stats_command(args.mountpoint, args.json)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="pcache",
        description="Node cache for object stores: cache workers, warmup, invalidation, status.",
    )
    add_common_options(parser)
    commands = parser.add_subparsers(title="commands", metavar="COMMAND")

    def command(
        name: str, help_text: str, func: Any, client: bool = True
    ) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text, description=help_text)
        add_common_options(sub, subcommand=True)
        if client:
            sub.add_argument(
                "--worker",
                metavar="URL",
                help="local worker (default: $PCACHE_WORKER or the config's listen)",
            )
            sub.add_argument("--json", action="store_true", help="machine-readable output")
        sub.set_defaults(func=func)
        return sub

    worker = command(
        "worker", "run this node's cache worker (until SIGTERM)", cmd_worker, client=False
    )
    worker.add_argument("--node-id", help="override [pcache] node_id")
    worker.add_argument("--listen", metavar="HOST:PORT", help="override [pcache] listen")

    warmup = command(
        "warmup",
        "load an object or every object under a prefix into the cluster's cache",
        cmd_warmup,
    )
    warmup.add_argument(
        "path", metavar="NS/PREFIX", help="e.g. datasets/tokens/ or pcache://datasets/x.bin"
    )

    inval = command(
        "invalidate", "forget cached metadata and blocks under a path (all nodes)", cmd_invalidate
    )
    inval.add_argument("path", metavar="NS/PATH")
    inval.add_argument("--local", action="store_true", help="only this node")
    inval.add_argument("--keep-blocks", action="store_true", help="drop metadata only")

    command("status", "show the cluster: disks, hit ratios, upload backlog", cmd_status)

    uploads = command(
        "uploads",
        "write-back records of this node: pending, retrying and refused uploads; retry or "
        "discard refused ones",
        cmd_uploads,
    )
    uploads.add_argument("action", nargs="?", choices=("list", "retry", "discard"), default="list")
    uploads.add_argument("path", nargs="?", metavar="NS[/KEY]", help="what to retry or discard")

    ls = command("ls", "list a directory through the cache", cmd_ls)
    ls.add_argument("path", metavar="NS/PREFIX")
    ls.add_argument("-R", "--recursive", action="store_true")

    cat = command("cat", "write an object to stdout through the cache", cmd_cat)
    cat.add_argument("path", metavar="NS/KEY")

    put = command("put", "write a local file through the cache (write-back)", cmd_put)
    put.add_argument("local", metavar="FILE")
    put.add_argument("path", metavar="NS/KEY")
    put.add_argument(
        "--durable",
        choices=("local", "remote"),
        default="remote",
        help="return once on the cache disk (local) or in the backing store (remote, default)",
    )

    mount = command(
        "mount", "mount a namespace (or a prefix of it) with FUSE", cmd_mount, client=False
    )
    mount.add_argument("source", metavar="NS[/PREFIX]", help="e.g. datasets or datasets/tokens")
    mount.add_argument("mountpoint", metavar="MOUNTPOINT", help="an existing empty directory")
    mount.add_argument(
        "--worker",
        metavar="URL",
        help="local worker (default: $PCACHE_WORKER or the config's listen)",
    )
    mount.add_argument(
        "--foreground", action="store_true", help="stay in the foreground (default: daemon)"
    )
    mount.add_argument("--read-only", action="store_true", help="refuse all changes (EROFS)")
    mount.add_argument(
        "--immutable",
        action="store_true",
        help="objects never change: long kernel cache timeouts, page cache kept across opens",
    )
    mount.add_argument("--log-file", metavar="FILE", help="the mount's log (daemon default: /tmp)")
    mount.add_argument(
        "--allow-other",
        action="store_true",
        help="let other users use the mount (non-root: user_allow_other in /etc/fuse.conf)",
    )
    mount.add_argument(
        "--timeout",
        type=float,
        metavar="SECONDS",
        help="bound on each request to a worker (default 30, or $PCACHE_TIMEOUT); a request "
        "that runs out tries the next worker, then the backing store",
    )
    mount.add_argument("--uid", type=int, help="owner of objects that carry none (default: yours)")
    mount.add_argument("--gid", type=int, help="group of objects that carry none (default: yours)")
    mount.add_argument(
        "--durability",
        choices=[d.value for d in Durability],
        default=Durability.LOCAL.value,
        help="when close() returns: once the file is fsynced on the cache disk and journalled "
        "(local, default; the upload follows, fsync() waits for it) or once it is in the "
        "backing store (remote)",
    )
    mount.add_argument(
        "--sync-timeout",
        type=float,
        metavar="SECONDS",
        help="how long fsync (and a remote-durable close) waits for a store that fails "
        "transiently before EIO (default 120; the upload goes on)",
    )
    mount.add_argument(
        "--negative-ttl",
        type=float,
        metavar="SECONDS",
        help="answer a lookup of a name missing from its directory's listing without asking "
        "the store, for this long after the listing (default 0: always ask; a positive value "
        "speeds up creating many files, e.g. untar, but an object another writer puts is "
        "seen up to that much later)",
    )

    umount = command("umount", "unmount a pcache mount", cmd_umount, client=False)
    umount.add_argument("mountpoint", metavar="MOUNTPOINT")

    stats = command(
        "stats",
        "live statistics of a mount: ops, latency percentiles, bytes, hit ratios",
        cmd_stats,
        client=False,
    )
    stats.add_argument("mountpoint", metavar="MOUNTPOINT")
    stats.add_argument("--json", action="store_true", help="machine-readable output")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    return run(build_parser(), argv)


if __name__ == "__main__":
    sys.exit(main())
