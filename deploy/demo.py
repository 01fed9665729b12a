"""`make demo`: the end-to-end story on one machine, with embedded defaults.

This first version sets up the two regions later issues build on:

1. starts two real S3 endpoints (``rclone serve s3``): "region-a" and "region-b";
2. writes a generated token dataset (shards + an index) and a multipart "checkpoint" into
   region-a through objstore, checking the service's CRC-64/NVME against our own;
3. starts ``babel-sync serve`` (its dashboard URL printed) and syncs region-a -> region-b as a
   job on it (bytes move between the two endpoints, CRC-checked while streaming, large objects
   sample-verified), then confirms with the ``babel-sync check`` CLI;
4. lists both regions the way a user would (``babel-sync ls``), and shows what a user sees for
   a mistake (a missing bucket: one line and an exit code);
5. starts two pcache workers ("node1", "node2") over region-b, warms the synced dataset into
   their caches with ``pcache warmup`` (each block on the node worker selection picks), and reads
   it back through the pcache client (cache hits, compared byte for byte with region-b);
6. mounts the namespace with ``pcache mount`` (FUSE, read-only, immutable), reads every file of
   the dataset through the mount as plain files, shows ``pcache stats``;
7. while mounted, trains the bundled MoE (``torchrun -m ckpt.trainer``: 4 ranks on 2 simulated
   nodes, expert parallelism 2) on the dataset read through the mount, checkpointing every 2
   steps to region-b through ckpt (node-aware placement), syncs the checkpoints back to region-a
   as a second job on the service and checks every item's CRC there with ``ckpt verify``;
   unmounts.

Everything lives under ``.demo/`` and is removed on exit (also on Ctrl-C); it can run twice in a row.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from rich.console import Console  # noqa: E402
from rich.table import Table  # noqa: E402

from ckpt.trainer.data import VOCAB, token_shard  # noqa: E402
from objstore import Config, ObjectInfo, Store, open_store  # noqa: E402
from objstore import checksum as crc  # noqa: E402
from tests.servers.pcache_cluster import PcacheCluster  # noqa: E402
from tests.servers.rclone_s3 import RcloneS3Server  # noqa: E402
from tests.servers.s3_process import free_port  # noqa: E402
from tests.servers.sync_service import TOKEN, Service  # noqa: E402

log = logging.getLogger("demo")
console = Console(width=None if sys.stdout.isatty() else 110)

BUCKET = "datasets"
CKPT_BUCKET = "ckpts"


def write_config(path: Path, regions: dict[str, RcloneS3Server]) -> Path:
    lines = []
    for name, server in regions.items():
        lines.append(f"[profiles.{name}]")
        lines += [f'{key} = "{value}"' for key, value in server.profile().items()]
        lines.append("")
    path.write_text("\n".join(lines))
    return path


def run_cli(args: list[str], config: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "babel_sync.cli", *args, "--config", str(config)]
    console.print(f"[dim]$ babel-sync {' '.join(args)}[/dim]")
    return subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shards", type=int, default=24, help="number of token shards")
    parser.add_argument("--shard-tokens", type=int, default=262_144, help="tokens per shard")
    parser.add_argument(
        "--keep", action="store_true", help="leave .demo/ and the servers' data behind"
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING)

    work = REPO / ".demo"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    regions = {
        "region-a": RcloneS3Server(work / "region-a", log_file=work / "region-a.log"),
        "region-b": RcloneS3Server(
            work / "region-b",
            access_key_id="AKIATESTREGIONB00001",
            secret_access_key="testSecretKeyForRcloneS3Server0000000002",
            log_file=work / "region-b.log",
        ),
    }
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    services: list[Service] = []
    try:
        for name, server in regions.items():
            server.start()
            server.create_bucket(BUCKET)
            server.create_bucket(CKPT_BUCKET)
            console.print(f"[green]started[/green] {name}: S3 endpoint {server.endpoint}")
        config_path = write_config(work / "objstore.toml", regions)
        config = Config.load(config_path)
        service = Service(work / "service", {n: s.profile() for n, s in regions.items()}).start()
        services.append(service)
        console.print(
            f"[green]started[/green] babel-sync serve: dashboard {service.url}/#token={TOKEN}"
        )
        summary = populate(config, args.shards, args.shard_tokens)
        summary.update(sync_regions(config_path, work, service))
        summary.update(cache_region_b(work, regions["region-b"], config_path, service))
        show(config_path, summary)
    except KeyboardInterrupt:
        console.print("[yellow]interrupted: cleaning up[/yellow]")
        return 130
    finally:
        for service in services:
            service.stop()
        for server in regions.values():
            server.stop()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    return 0


def populate(config: Config, shards: int, shard_tokens: int) -> dict[str, object]:
    store = open_store(f"s3://region-a@{BUCKET}/tokens/", config)
    rng = random.Random(2026)
    shard_data = [token_shard(rng, shard_tokens) for _ in range(shards)]
    started = time.perf_counter()
    total = 0
    index = []
    for i, data in enumerate(shard_data):
        info = store.put(f"shard-{i:05d}.bin", data)
        index.append(
            {"key": f"shard-{i:05d}.bin", "tokens": shard_tokens, "crc64nvme": info.checksum.value}
        )
        total += len(data)
    store.put(
        "index.json", json.dumps({"vocab": VOCAB, "dtype": "uint16", "shards": index}).encode()
    )
    elapsed = time.perf_counter() - started
    confirmed = 0
    for entry in index:
        reported_crc = store.stat(str(entry["key"])).checksum
        confirmed += reported_crc is not None and reported_crc.value == entry["crc64nvme"]

    ckpt_store = open_store(f"s3://region-a@{BUCKET}/checkpoints/step-0000100/", config)
    part = 8 * 1024 * 1024
    parts = [os.urandom(part) for _ in range(3)] + [os.urandom(1234567)]
    ckpt_started = time.perf_counter()
    written = ckpt_store.put_parts("__0_0.distcp", parts)
    ckpt_elapsed = time.perf_counter() - ckpt_started
    expected = crc.combine_parts(
        "crc64nvme", [(crc.compute("crc64nvme", p), len(p)) for p in parts]
    )
    reported = ckpt_store.stat("__0_0.distcp").checksum
    return {
        "shards": shards,
        "dataset_bytes": total,
        "dataset_rate": total / elapsed,
        "shards_crc_confirmed": confirmed,
        "ckpt_bytes": written.size,
        "ckpt_rate": written.size / ckpt_elapsed,
        "ckpt_crc_expected": expected,
        "ckpt_crc_reported": reported.value if reported else None,
    }


def sync_regions(config_path: Path, work: Path, service: Service) -> dict[str, object]:
    """region-a -> region-b as a job on ``babel-sync serve``, then an independent check of the
    result with the ``babel-sync check`` CLI."""
    job = submit_job(
        service, f"s3://region-a@{BUCKET}/", f"s3://region-b@{BUCKET}/", "region-sync", "8MiB"
    )
    report = dict(job["report"])
    report["job"] = job["id"]
    checked = run_cli(
        [
            "check",
            f"s3://region-a@{BUCKET}/",
            f"s3://region-b@{BUCKET}/",
            "--json",
            "--journal",
            str(work / "journal-check"),
        ],
        config_path,
    )
    check = json.loads(checked.stdout) if checked.stdout else {"exit_code": checked.returncode}
    return {"sync": report, "check": check}


def submit_job(
    service: Service, source: str, dest: str, name: str, part_size: str | None = None
) -> dict[str, Any]:
    """Submit ``source -> dest`` to the service (as ``babel-sync jobs submit`` would) and wait."""
    spec = {"source": source, "destination": dest, "name": name}
    extra = ""
    if part_size:
        spec["part_size"] = part_size
        extra = f" --part-size {part_size}"
    console.print(f"[dim]$ babel-sync jobs submit {source} {dest} --name {name}{extra}[/dim]")
    _, job = service.call("POST", "/api/v1/jobs", spec)
    console.print(f"job {job['id']}: {service.url}/#job={job['id']}")
    done = service.wait_state(job["id"], ("succeeded", "failed", "verify_failed"), timeout=300)
    if done["state"] != "succeeded":
        raise SystemExit(f"sync job {name} {done['state']}: {done.get('error')}")
    return done


def cache_region_b(
    work: Path, region_b: RcloneS3Server, config_path: Path, service: Service
) -> dict[str, object]:
    """Two pcache workers over region-b: warm the dataset, then read it through the cache."""
    from objstore.config import Secret
    from pcache.client import PcacheClient
    from pcache.config import ClientConfig

    cluster = PcacheCluster(
        work / "pcache",
        {"region-b": region_b.profile()},
        {"datasets": f"s3://region-b@{BUCKET}/"},
        nodes=2,
        capacity=256 * 1024 * 1024,
        block_size="1MiB",
    )
    with cluster:
        console.print(
            f"[green]started[/green] pcache workers {', '.join(n.node_id for n in cluster.nodes)} "
            "over region-b"
        )
        env = cluster.env(cluster.nodes[0])
        console.print("[dim]$ pcache warmup datasets/tokens/[/dim]")
        warm = subprocess.run(
            [sys.executable, "-m", "pcache.cli", "warmup", "datasets/tokens/", "--json"],
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if warm.returncode != 0:
            raise SystemExit(f"pcache warmup failed: {warm.stderr.strip()}")
        warmed = json.loads(warm.stdout)
        client = PcacheClient(
            ClientConfig(worker=cluster.nodes[0].address, token=Secret(cluster.token))
        )
        store = open_store(
            f"s3://region-b@{BUCKET}/",
            Config.from_mapping({"profiles": {"region-b": region_b.profile()}}, env={}),
        )
        objects, _ = client.ls("datasets/tokens/", recursive=True)
        started = time.perf_counter()
        read_bytes = 0
        identical = 0
        for info in objects:
            data = client.read(f"datasets/{info.key}")
            read_bytes += len(data)
            identical += data == store.get(info.key)
        elapsed = time.perf_counter() - started - 0.0
        per_node = {n.node_id: client.status(n.address)["blocks"]["blocks"] for n in cluster.nodes}
        client.close()
        mounted = read_through_mount(work, env, store, objects, config_path, service)
    return {
        "mount": mounted,
        "cache": {
            "warmed_objects": warmed["objects"],
            "warmed_bytes": warmed["bytes"],
            "blocks_by_source": warmed["blocks_by_source"],
            "blocks_per_node": per_node,
            "read_sources": dict(client.reads.sources),
            "read_objects": len(objects),
            "identical": identical,
            "read_rate": read_bytes / max(elapsed, 1e-9),
        },
    }


def read_through_mount(
    work: Path,
    env: dict[str, str],
    store: Store,
    objects: list[ObjectInfo],
    config_path: Path,
    service: Service,
) -> dict[str, object]:
    """``pcache mount`` the namespace and read the dataset as plain files."""
    from tests.servers.pcache_mount import force_unmount

    if not os.path.exists("/dev/fuse") or shutil.which("fusermount3") is None:
        console.print(
            "[yellow]no /dev/fuse or fusermount3 here: the mount step is skipped[/yellow]"
        )
        return {"skipped": True}
    mountpoint = work / "mnt"
    mountpoint.mkdir()

    def pcache(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, "-m", "pcache.cli", *args],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
        )  # fmt: skip

    console.print(f"[dim]$ pcache mount datasets {mountpoint} --read-only --immutable[/dim]")
    started = pcache("mount", "datasets", str(mountpoint), "--read-only", "--immutable",
                     "--log-file", str(work / "mount.log"))  # fmt: skip
    if started.returncode != 0:
        raise SystemExit(f"pcache mount failed: {started.stderr.strip()}")
    console.print(started.stdout.strip())
    try:
        identical = 0
        began = time.perf_counter()
        read_bytes = 0
        for info in objects:
            data = (mountpoint / info.key).read_bytes()
            read_bytes += len(data)
            identical += data == store.get(info.key)
        elapsed = time.perf_counter() - began
        console.print(f"[dim]$ ls {mountpoint}/tokens | head -3[/dim]")
        for name in sorted(os.listdir(mountpoint / "tokens"))[:3]:
            console.print(f"  {name}")
        stats = pcache("stats", str(mountpoint), "--json")
        snapshot = json.loads(stats.stdout) if stats.returncode == 0 else {}
        console.print(f"[dim]$ pcache stats {mountpoint}[/dim]")
        console.print(pcache("stats", str(mountpoint)).stdout.rstrip())
        training = train_and_checkpoint(work, mountpoint / "tokens", config_path, service)
    finally:
        done = pcache("umount", str(mountpoint))
        if done.returncode != 0:
            console.print(done.stderr.strip(), style="red")
            force_unmount(mountpoint)
    console.print(f"[dim]$ pcache umount {mountpoint}[/dim]")
    return {
        "skipped": False,
        "identical": identical,
        "objects": len(objects),
        "rate": read_bytes / max(elapsed, 1e-9),
        "blocks_by_source": snapshot.get("blocks_by_source", {}),
        "training": training,
    }


def train_and_checkpoint(
    work: Path, tokens: Path, config_path: Path, service: Service
) -> dict[str, object]:
    """The MoE trainer on 2 simulated nodes (2 ranks each, EP 2) reading the dataset through
    the mount, checkpointing to region-b through ckpt; then the checkpoint synced back to
    region-a with babel-sync and its CRCs checked there with ``ckpt verify``."""
    root_b = f"s3://region-b@{CKPT_BUCKET}/moe/"
    root_a = f"s3://region-a@{CKPT_BUCKET}/moe/"
    args = ["--data", str(tokens), "--ckpt-root", root_b, "--steps", "4", "--save-every", "2",
            "--ep", "2", "--simulate-nodes", "2", "--report", str(work / "train.json")]  # fmt: skip
    console.print(f"[dim]$ torchrun --nproc-per-node 4 -m ckpt.trainer {' '.join(args)}[/dim]")
    env = {**os.environ, "OBJSTORE_CONFIG": str(config_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "4",
         "--master-addr", "127.0.0.1", "--master-port", str(free_port()), "-m", "ckpt.trainer",
         *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"training failed ({done.returncode}): {done.stderr.strip()[-2000:]}")
    report = json.loads((work / "train.json").read_text())
    last = report["saves"][-1]
    console.print(f"trained {report['steps']} steps, loss {report['losses'][0]:.3f} -> "
                  f"{report['losses'][-1]:.3f}; checkpoint {last['url']}")  # fmt: skip
    synced = submit_job(service, root_b, root_a, "checkpoint-back")
    step_dir = last["url"].rstrip("/").rsplit("/", 1)[1]
    console.print(f"[dim]$ ckpt verify {root_a}{step_dir}/[/dim]")
    verify = subprocess.run(
        [sys.executable, "-m", "ckpt.cli", "verify", f"{root_a}{step_dir}/", "--json"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    verified = json.loads(verify.stdout) if verify.returncode in (0, 6) else {}
    return {
        "steps": report["steps"],
        "loss_first": report["losses"][0],
        "loss_last": report["losses"][-1],
        "save_s": last["seconds"],
        "node_bytes": last["node_bytes"],
        "synced": synced["report"]["counters"],
        "job": synced["id"],
        "verify_exit": verify.returncode,
        "verified_items": verified.get("items", 0),
    }


def show(config_path: Path, summary: dict[str, object]) -> None:
    listing = run_cli(["ls", f"s3://region-a@{BUCKET}/", "-R", "--max", "5"], config_path)
    console.print(listing.stdout.rstrip() or listing.stderr)
    console.print(f"[dim](first 5 of {summary['shards']} shards shown)[/dim]")
    stat = run_cli(["stat", f"s3://region-a@{BUCKET}/tokens/shard-00000.bin"], config_path)
    console.print(stat.stdout.rstrip())
    mirrored = run_cli(["ls", f"s3://region-b@{BUCKET}/", "-R"], config_path)
    console.print(f"region-b now holds {len(mirrored.stdout.splitlines())} objects")
    mistake = run_cli(["ls", "s3://region-b@no-such-bucket/"], config_path)
    console.print(mistake.stderr.strip(), style="red", soft_wrap=True)
    console.print(f"(exit code {mistake.returncode}: a mistake is one line, not a traceback)")

    table = Table(title="demo summary")
    table.add_column("what")
    table.add_column("value", justify="right")
    table.add_row("token shards written to region-a", str(summary["shards"]))
    table.add_row("dataset bytes", f"{summary['dataset_bytes']:,}")
    table.add_row("dataset write rate", f"{summary['dataset_rate'] / 1e6:,.1f} MB/s")
    table.add_row(
        "shard CRC-64/NVME confirmed by region-a",
        f"{summary['shards_crc_confirmed']}/{summary['shards']}",
    )
    table.add_row("checkpoint (multipart) bytes", f"{summary['ckpt_bytes']:,}")
    table.add_row("checkpoint write rate", f"{summary['ckpt_rate'] / 1e6:,.1f} MB/s")
    ok = summary["ckpt_crc_expected"] == summary["ckpt_crc_reported"]
    verdict = (
        "match" if ok else ("not reported" if summary["ckpt_crc_reported"] is None else "MISMATCH")
    )
    table.add_row("checkpoint CRC-64/NVME: ours vs service", verdict)
    sync = summary["sync"]
    counters = sync["counters"]  # type: ignore[index]
    verification = sync["verification"]  # type: ignore[index]
    table.add_row("sync job on babel-sync serve", str(sync["job"]))  # type: ignore[index]
    table.add_row(
        "synced region-a -> region-b",
        f"{counters['copied']} objects, {counters['bytes_moved']:,} bytes",
    )
    table.add_row(
        "sync time",
        f"{sync['seconds']:.2f} s ({counters['bytes_moved'] / max(sync['seconds'], 1e-9) / 1e6:,.1f} MB/s)",
    )  # type: ignore[index]
    table.add_row(
        "verified (runtime CRC + sampled)",
        f"{counters['verified']}/{counters['copied']}, {verification['sampled']} sampled "
        f"(seed {verification['seed']}, p(detect 1%)={verification['detection_1pct']:.2f})",
    )
    table.add_row("mismatches / failures", f"{counters['mismatches']} / {counters['failed']}")
    check = summary["check"]
    table.add_row(
        "babel-sync check region-a vs region-b",
        "match" if check.get("exit_code") == 0 else f"exit {check.get('exit_code')}",
    )  # type: ignore[union-attr]
    cache = summary["cache"]
    table.add_row(
        "pcache warmup of region-b (2 workers)",
        f"{cache['warmed_objects']} objects, {cache['warmed_bytes']:,} bytes",  # type: ignore[index]
    )
    table.add_row(
        "cached blocks per node",
        ", ".join(f"{k}: {v}" for k, v in cache["blocks_per_node"].items()),  # type: ignore[index]
    )
    table.add_row(
        "read through pcache (identical to region-b)",
        f"{cache['identical']}/{cache['read_objects']}, blocks by tier "  # type: ignore[index]
        + ", ".join(f"{k}: {v}" for k, v in sorted(cache["read_sources"].items())),  # type: ignore[index]
    )
    mount = summary["mount"]
    if mount["skipped"]:  # type: ignore[index]
        table.add_row("read via pcache mount", "skipped (no FUSE here)")
    else:
        table.add_row(
            "read via pcache mount (identical)",
            f"{mount['identical']}/{mount['objects']}, {mount['rate'] / 1e6:,.1f} MB/s, "  # type: ignore[index]
            "blocks by tier "
            + ", ".join(f"{k}: {v}" for k, v in sorted(mount["blocks_by_source"].items())),  # type: ignore[index]
        )
    training = None if mount["skipped"] else mount["training"]  # type: ignore[index]
    if training:
        table.add_row(
            "MoE trained through the mount (2 nodes)",
            f"{training['steps']} steps, loss {training['loss_first']:.3f} -> {training['loss_last']:.3f}",
        )
        table.add_row(
            "checkpoint saved via ckpt (bytes per node)",
            f"{training['save_s']:.2f} s, "
            + ", ".join(f"{k}: {v:,}" for k, v in training["node_bytes"].items()),
        )
        table.add_row("checkpoint sync job", str(training["job"]))
        table.add_row(
            "checkpoint synced back to region-a",
            f"{training['synced']['copied']} files, verified {training['synced']['verified']}; "
            f"ckpt verify: {training['verified_items']} items, "
            + ("ok" if training["verify_exit"] == 0 else f"exit {training['verify_exit']}"),
        )
    console.print(table)
    if training and training["verify_exit"] != 0:
        raise SystemExit("the checkpoint synced to region-a does not verify")
    if cache["identical"] != cache["read_objects"]:  # type: ignore[index]
        raise SystemExit("data read through pcache differs from region-b")
    if not mount["skipped"] and mount["identical"] != mount["objects"]:  # type: ignore[index]
        raise SystemExit("data read through the pcache mount differs from region-b")
    if counters["mismatches"] or counters["failed"] or check.get("exit_code") != 0:  # type: ignore[union-attr]
        raise SystemExit("the demo sync did not verify")
    if not ok and summary["ckpt_crc_reported"] is not None:
        raise SystemExit("checkpoint CRC mismatch")


if __name__ == "__main__":
    sys.exit(main())
