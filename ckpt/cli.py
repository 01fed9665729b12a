"""The ``ckpt`` command line: inspect and verify checkpoints, run the bundled trainer.

``ckpt dataset URL`` writes a synthetic token dataset for the trainer; ``ckpt inspect URL`` lists a checkpoint's items, sizes, which node and rank wrote each file and
whether CRCs were recorded; ``ckpt verify URL`` reads every item and checks its CRC32C (exit 6 on
a mismatch, 3 when there is no complete checkpoint); ``ckpt train ...`` is the trainer
(``torchrun -m ckpt.trainer`` for several ranks; its ``--config`` is the training TOML, store
profiles come from ``$OBJSTORE_CONFIG``).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from objstore.cli import CommandError, ExitCode, add_common_options, run
from objstore.config import Config


def _open(args: argparse.Namespace) -> Any:
    from .backend import open_backend

    config = Config.load(args.config) if getattr(args, "config", None) else None
    return open_backend(args.url, config=config)


def _metadata(backend: Any) -> Any:
    from .storage import CheckpointError, CheckpointNotFound, read_metadata

    try:
        return read_metadata(backend)
    except CheckpointNotFound as exc:
        raise CommandError(str(exc), ExitCode.NOT_FOUND) from None
    except CheckpointError as exc:
        raise CommandError(str(exc)) from None


def describe(metadata: Any) -> dict[str, Any]:
    """A checkpoint's contents as plain JSON types."""
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata

    extra = getattr(metadata, "ckpt", None) or {}
    crcs = extra.get("crc32c", {})
    items = []
    with_crc = {index.fqn for index in crcs}
    sizes: dict[str, int] = {}
    for index, info in (metadata.storage_data or {}).items():
        sizes[index.fqn] = sizes.get(index.fqn, 0) + info.length
    for fqn, md in sorted(metadata.state_dict_metadata.items()):
        entry: dict[str, Any] = {"name": fqn, "stored_bytes": sizes.get(fqn, 0)}
        if isinstance(md, BytesStorageMetadata):
            entry["type"] = "object"
        else:
            entry["type"] = "tensor"
            entry["shape"] = list(md.size)
            entry["dtype"] = str(md.properties.dtype).replace("torch.", "")
        entry["crc"] = fqn in with_crc
        items.append(entry)
    nodes: dict[str, dict[str, int]] = {}
    for _, f in sorted(extra.get("files", {}).items()):
        node = nodes.setdefault(f["node"], {"files": 0, "bytes": 0, "items": 0})
        node["files"] += 1
        node["bytes"] += f["bytes"]
        node["items"] += f["items"]
    return {
        "items": items,
        "files": extra.get("files", {}),
        "nodes": nodes,
        "total_bytes": sum(sizes.values()),
        "crc_recorded": bool(crcs),
        "written_by": "ckpt" if extra else "another DCP writer",
    }


def cmd_inspect(args: argparse.Namespace) -> int:
    backend = _open(args)
    try:
        summary = describe(_metadata(backend))
    finally:
        backend.close()
    if args.json:
        print(json.dumps(summary, indent=2))
        return ExitCode.OK
    print(f"{args.url}: {len(summary['items'])} items, {summary['total_bytes']:,} bytes "
          f"(written by {summary['written_by']}; CRC32C "
          f"{'recorded' if summary['crc_recorded'] else 'not recorded'})")  # fmt: skip
    for item in summary["items"]:
        shape = "x".join(map(str, item.get("shape", []))) or "-"
        print(f"  {item['name']:<60} {item['type']:<6} {item.get('dtype', ''):<9} "
              f"{shape:<14} {item['stored_bytes']:>12,}")  # fmt: skip
    if summary["nodes"]:
        print("written per node:")
        for node, n in summary["nodes"].items():
            print(
                f"  {node:<30} {n['files']} file(s) {n['items']:>5} items {n['bytes']:>14,} bytes"
            )
    return ExitCode.OK


def cmd_verify(args: argparse.Namespace) -> int:
    from .storage import crc32c

    backend = _open(args)
    try:
        metadata = _metadata(backend)
        crcs = (getattr(metadata, "ckpt", None) or {}).get("crc32c", {})
        if not crcs:
            raise CommandError(f"{args.url}: no CRCs recorded (not written by ckpt)")
        bad, checked, nbytes = [], 0, 0
        for index, info in metadata.storage_data.items():
            try:
                raw = backend.read_range(info.relative_path, info.offset, info.length)
            except FileNotFoundError as exc:
                bad.append({"item": index.fqn, "file": info.relative_path, "problem": str(exc)})
                continue
            checked += 1
            nbytes += len(raw)
            if len(raw) != info.length:
                bad.append({"item": index.fqn, "file": info.relative_path, "problem": "short"})
            elif crc32c(raw) != crcs.get(index):
                bad.append(
                    {"item": index.fqn, "file": info.relative_path, "problem": "CRC32C mismatch"}
                )
    finally:
        backend.close()
    result = {"url": args.url, "items": checked, "bytes": nbytes, "bad": bad}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for b in bad:
            print(f"BAD {b['item']} in {b['file']}: {b['problem']}")
        print(f"{args.url}: {checked} items, {nbytes:,} bytes checked, {len(bad)} bad")
    return ExitCode.VERIFY if bad else ExitCode.OK


def cmd_dataset(args: argparse.Namespace) -> int:
    from objstore import open_store

    from .trainer.data import write_token_dataset

    if args.shards < 1 or args.tokens < 1:
        raise CommandError("--shards and --tokens must be >= 1", ExitCode.USAGE)
    store = open_store(args.url, Config.load(args.config))
    index = write_token_dataset(store, args.shards, args.tokens, seed=args.seed)
    total = sum(s["tokens"] for s in index)
    result = {"url": args.url, "shards": len(index), "tokens": total, "bytes": 2 * total}
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print(
            f"{args.url}: {len(index)} shards, {total:,} tokens ({2 * total:,} bytes) + index.json"
        )
    return ExitCode.OK


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="ckpt",
        description="Distributed checkpoints for torch.distributed.checkpoint with node-aware "
        "write placement: inspect, verify, and the bundled MoE trainer.",
    )
    add_common_options(parser)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    for name, func, text in (
        ("inspect", cmd_inspect, "items, sizes, writer placement per node and CRC status"),
        ("verify", cmd_verify, "read every item and check its CRC32C (exit 6 on a mismatch)"),
    ):
        p = sub.add_parser(name, help=text, description=text)
        p.add_argument("url", help="the checkpoint directory (objstore URL, path, pcache://)")
        p.add_argument("--json", action="store_true", help="machine-readable output")
        add_common_options(p, subcommand=True)
        p.set_defaults(func=func)
    text = "write a synthetic token dataset (uint16 shards + index.json) for the trainer"
    p = sub.add_parser("dataset", help=text, description=text)
    p.add_argument("url", help="where the shards go (objstore URL or path)")
    p.add_argument("--shards", type=int, default=8, help="shard files (default 8)")
    p.add_argument("--tokens", type=int, default=262_144, help="tokens per shard (default 262144)")
    p.add_argument("--seed", type=int, default=0, help="the same seed writes the same bytes")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    add_common_options(p, subcommand=True)
    p.set_defaults(func=cmd_dataset)
    sub.add_parser(
        "train", help="run the bundled MoE trainer (see `ckpt train --help`)", add_help=False
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["train"]:
        from .trainer.train import main as train_main

        return train_main(args[1:])
    return run(build_parser(), args)


if __name__ == "__main__":
    sys.exit(main())
