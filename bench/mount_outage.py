"""Reading a cached dataset through a pcache mount while things fail (issue 18).

One worker over ``rclone serve s3`` behind a fault proxy (``tests/servers/proxies.py``), a
mount of its namespace with the node's config (its profiles: the client can reach the store
itself, as deployed), metadata TTL ``--ttl`` seconds. A dataset of FILES files of SIZE is put in
the store and read once through the mount (cached). Then three full reads of every file, each
with the page cache dropped first and every byte checked against what was written:

- ``store up``: the reference rate;
- ``store cut off``: every request to the store refused at the proxy, past every metadata TTL
  (serve-stale answers the lookups, the blocks come from the cache): errors and rate; target 0
  errors and >= 0.9x the store-up rate;
- ``worker restarts``: the store up, the node's only worker SIGKILLed and started again every
  ``--restart-every`` seconds, full reads going on until ``--restarts`` restarts: errors and
  rate; target 0 errors.

The issue's scale is a 10 GiB-scale dataset; the default (64 x 16 MiB = 1 GiB) is what this
machine's cache disk and time allow.

    .venv/bin/python bench/mount_outage.py [--files 64] [--size 16MiB] [--ttl 2]
        [--restart-every 2] [--restarts 4] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.measure import drop_caches  # noqa: E402
from objstore import Config, open_store  # noqa: E402
from objstore.cli import parse_size  # noqa: E402
from tests.servers.pcache_cluster import PcacheCluster  # noqa: E402
from tests.servers.pcache_mount import PcacheMount  # noqa: E402
from tests.servers.proxies import FaultProxy  # noqa: E402
from tests.servers.rclone_s3 import RcloneS3Server  # noqa: E402

MiB = 1 << 20
OUTAGE_RATE_MIN = 0.9  # of the store-up rate


def read_all(root: Path, digests: dict[str, str]) -> tuple[float, int, int]:
    """Read every file (1 MiB reads), page cache dropped first: (MiB/s, errors, wrong files)."""
    drop_caches()
    errors = wrong = 0
    total = 0
    started = time.monotonic()
    for key, digest in digests.items():
        try:
            sha = hashlib.sha256()
            with open(root / key, "rb", buffering=0) as file:
                while chunk := file.read(MiB):
                    sha.update(chunk)
                    total += len(chunk)
            if sha.hexdigest() != digest:
                wrong += 1
        except OSError as exc:
            errors += 1
            print(f"  {key}: {exc}", file=sys.stderr)
    return total / MiB / (time.monotonic() - started), errors, wrong


class Restarter:
    """SIGKILL and start again the cluster's first worker every ``every`` seconds."""

    def __init__(self, cluster: PcacheCluster, every: float) -> None:
        self.cluster, self.every = cluster, every
        self.restarts = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        node = self.cluster.nodes[0]
        while not self._stop.wait(self.every):
            self.cluster.kill(node)
            self.cluster.start(node)
            self.restarts += 1

    def __enter__(self) -> Restarter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--files", type=int, default=64)
    parser.add_argument("--size", type=parse_size, default=parse_size("16MiB"))
    parser.add_argument("--ttl", type=float, default=2.0, help="the worker's metadata TTL (2 s)")
    parser.add_argument("--restart-every", type=float, default=2.0, help="seconds (2)")
    parser.add_argument(
        "--restarts", type=int, default=4, help="full reads go on until this many restarts (4)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    rows: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="mount-outage-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        with RcloneS3Server(work / "s3") as s3:
            s3.create_bucket("data")
            proxy = FaultProxy(s3.endpoint).start()
            try:
                profile = s3.profile(endpoint=proxy.endpoint, max_attempts=2, retry_deadline=2.0)
                store = open_store(
                    "s3://s3@data/", Config.from_mapping({"profiles": {"s3": s3.profile()}}, env={})
                )
                digests = {}
                for i in range(args.files):
                    data = os.urandom(args.size)
                    key = f"ds/shard-{i:04d}.bin"
                    store.put(key, data)
                    digests[key] = hashlib.sha256(data).hexdigest()
                cluster = PcacheCluster(
                    work / "cluster", {"s3": profile}, {"data": "s3://s3@data/"}, nodes=1,
                    capacity=args.files * args.size + 256 * MiB, block_size="4MiB",
                    extra={"metadata_ttl": args.ttl, "negative_ttl": args.ttl},
                )  # fmt: skip
                with cluster:
                    node = cluster.nodes[0]
                    mount = PcacheMount(
                        node.address, cluster.token, work / "mnt",
                        env={"PCACHE_CONFIG": str(node.config_path)},
                    )  # fmt: skip
                    try:
                        rate, errors, wrong = read_all(mount.path, digests)  # cold: caches fill
                        rows["first read, cold (MiB/s)"] = rate
                        rate_up, errors, wrong = read_all(mount.path, digests)
                        rows["store up (MiB/s)"] = rate_up
                        rows["store up: errors"] = errors + wrong
                        proxy.outage(True)
                        time.sleep(args.ttl + 1.5)  # past the worker's TTL and the kernel's
                        rate, errors, wrong = read_all(mount.path, digests)
                        rows["store cut off (MiB/s)"] = rate
                        rows["store cut off: errors"] = errors + wrong
                        rows["store cut off / store up"] = rate / rate_up
                        proxy.outage(False)
                        passes, rates, failed = 0, [], 0
                        with Restarter(cluster, args.restart_every) as restarter:
                            while restarter.restarts < args.restarts:  # full reads, until then
                                rate, errors, wrong = read_all(mount.path, digests)
                                passes, failed = passes + 1, failed + errors + wrong
                                rates.append(rate)
                            restarts = restarter.restarts
                        rows["worker restarts (MiB/s)"] = sum(rates) / len(rates)
                        rows["worker restarts: errors"] = failed
                        rows["worker restarts: restarts"] = restarts
                        rows["worker restarts: full reads"] = passes
                    finally:
                        mount.stop()
            finally:
                proxy.stop()
    verdicts = {
        "store cut off: errors": rows["store cut off: errors"] == 0,
        "store cut off / store up": rows["store cut off / store up"] >= OUTAGE_RATE_MIN,
        "worker restarts: errors": rows["worker restarts: errors"] == 0,
    }
    targets = {
        "store cut off: errors": "0",
        "store cut off / store up": f">= {OUTAGE_RATE_MIN}x",
        "worker restarts: errors": "0",
    }
    if args.json:
        print(json.dumps({"rows": rows, "pass": verdicts}, indent=2))
    else:
        print(f"\n{args.files} x {args.size // MiB} MiB, {os.cpu_count()} CPUs, rclone serve s3 "
              f"behind a fault proxy, metadata TTL {args.ttl:g} s")  # fmt: skip
        print(f"{'measurement':45} | {'pcache':>10} | target")
        print(f"{'-' * 45} | {'-' * 10} | ------")
        for name, value in rows.items():
            verdict = ""
            if name in verdicts:
                verdict = f"{targets[name]}: {'PASS' if verdicts[name] else 'FAIL'}"
            shown = f"{value:10.3g}" if isinstance(value, float) else f"{value:10d}"
            print(f"{name:45} | {shown} | {verdict}")
    return 0 if all(verdicts.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
