"""Single-client throughput of the pcache client against the physical limit (local disk).

Starts a real S3 endpoint (rclone serve s3) and one pcache worker, puts a SIZE object in the
bucket and warms it into the worker's cache, then measures, in the same run:

- read:  ``open().read()`` of a local file of the same size (the limit) vs the client reading
         the cache files itself (the default on the worker's node), through shared memory, and
         over HTTP; the page cache is dropped before each read
         (``/proc/sys/vm/drop_caches``; reported when that is not possible).
- write: a local file written and fsynced vs the client writing through shared memory and
         committing local-durable (the cache disk, fsynced), and remote-durable (in S3).

Targets (issue 4): a local read through the client (direct, and shared memory) >= 0.6x the local
read; write >= 0.7x local write+fsync.

    .venv/bin/python bench/pcache_client.py [--size 1GiB] [--repeat 2] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.measure import drop_caches, timed  # noqa: E402
from objstore import Config, open_store  # noqa: E402
from objstore.cli import parse_size  # noqa: E402
from objstore.config import Secret  # noqa: E402
from pcache.client import PcacheClient  # noqa: E402
from pcache.config import ClientConfig  # noqa: E402
from tests.servers.pcache_cluster import PcacheCluster  # noqa: E402
from tests.servers.rclone_s3 import RcloneS3Server  # noqa: E402

MiB = 1 << 20


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--size", type=parse_size, default=parse_size("1GiB"))
    parser.add_argument("--repeat", type=int, default=2, help="runs per measurement (best kept)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    size = args.size
    results: dict[str, float] = {}
    dropped = True

    with tempfile.TemporaryDirectory(prefix="pcache-bench-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        with RcloneS3Server(work / "s3") as s3:
            s3.create_bucket("bench")
            profile = s3.profile()
            store = open_store(
                "s3://s3@bench/", Config.from_mapping({"profiles": {"s3": profile}}, env={})
            )
            print(f"preparing a {size / MiB:.0f} MiB object in S3 ...", file=sys.stderr)
            chunk = os.urandom(64 * MiB)
            parts = [chunk[: min(64 * MiB, size - off)] for off in range(0, size, 64 * MiB)]
            store.put_parts("obj.bin", parts)
            local = work / "local.bin"
            with local.open("wb") as f:
                for part in parts:
                    f.write(part)
            cluster = PcacheCluster(
                work / "cluster",
                {"s3": profile},
                {"data": "s3://s3@bench/"},
                nodes=1,
                capacity=3 * size + 256 * MiB,
                block_size="4MiB",
                extra={"fetch_concurrency": 16},
            )
            with cluster:
                config = ClientConfig(worker=cluster.nodes[0].address, token=Secret(cluster.token))
                client = PcacheClient(config)  # local hits straight from the cache files
                shm_client = PcacheClient(
                    ClientConfig(worker=config.worker, token=config.token, direct_reads=False)
                )
                http = PcacheClient(
                    ClientConfig(
                        worker=config.worker, token=config.token, shm=False, direct_reads=False
                    )
                )
                client.warmup("data/obj.bin")
                info = client.stat("data/obj.bin")
                buf = bytearray(size)

                def local_read() -> None:
                    with local.open("rb", buffering=0) as f:
                        view = memoryview(buf)
                        done = 0
                        while done < size:
                            n = f.readinto(view[done : done + 64 * MiB])
                            if not n:
                                break
                            done += n

                def direct_read() -> None:
                    assert client.readinto("data/obj.bin", 0, buf, info) == size

                def shm_read() -> None:
                    assert shm_client.readinto("data/obj.bin", 0, buf, info) == size

                def http_read() -> None:
                    assert http.readinto("data/obj.bin", 0, buf, info) == size

                for name, fn in (
                    ("read local file", local_read),
                    ("read client direct", direct_read),
                    ("read client shm", shm_read),
                    ("read client http", http_read),
                ):
                    best = float("inf")
                    for _ in range(args.repeat):
                        dropped &= drop_caches()
                        best = min(best, timed(fn))
                    results[name] = size / best / MiB
                assert bytes(buf[:4096]) == parts[0][:4096]

                def local_write() -> None:
                    with (work / "out.bin").open("wb", buffering=0) as f:
                        for part in parts:
                            f.write(part)
                        os.fsync(f.fileno())
                    (work / "out.bin").unlink()

                counter = iter(range(1000))

                def client_write(durable: str) -> None:
                    with client.open(f"data/out-{next(counter)}.bin", "wb") as w:
                        w.durable = durable
                        for part in parts:
                            w.write(part)

                for name, fn in (
                    ("write local file + fsync", local_write),
                    ("write client shm, local-durable", lambda: client_write("local")),
                    ("write client shm, remote-durable", lambda: client_write("remote")),
                ):
                    best = float("inf")
                    for _ in range(args.repeat):
                        drop_caches()
                        best = min(best, timed(fn))
                        # let write-back drain so runs do not overlap
                        for _ in range(1000):
                            if client.status()["writeback"]["objects"] == 0:
                                break
                            time.sleep(0.1)
                    results[name] = size / best / MiB
                client.close()
                shm_client.close()
                http.close()

    ratios = {
        "read client direct / local": results["read client direct"] / results["read local file"],
        "read client shm / local": results["read client shm"] / results["read local file"],
        "read client http / local": results["read client http"] / results["read local file"],
        "write local-durable / local": results["write client shm, local-durable"]
        / results["write local file + fsync"],
        "write remote-durable / local": results["write client shm, remote-durable"]
        / results["write local file + fsync"],
    }
    if args.json:
        print(
            json.dumps(
                {"size": size, "page_cache_dropped": dropped, "mb_s": results, "ratios": ratios}
            )
        )
        return 0
    print(f"\nsize {size / MiB:.0f} MiB, best of {args.repeat}, page cache dropped: {dropped}")
    print(f"{'measurement':<36} {'MiB/s':>10}")
    for name, value in results.items():
        print(f"{name:<36} {value:>10.0f}")
    print()
    targets = {
        "read client direct / local": 0.6,
        "read client shm / local": 0.6,
        "write local-durable / local": 0.7,
    }
    for name, value in ratios.items():
        target = targets.get(name)
        verdict = (
            ""
            if target is None
            else f"  target >= {target}: {'PASS' if value >= target else 'FAIL'}"
        )
        print(f"{name:<36} {value:>9.2f}x{verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
