"""``babel-sync serve`` under load: 20 jobs at once vs the same syncs one after another.

Two S3 "regions" (two ``rclone serve s3`` with different credentials, so every byte moves through
the jobs). The source holds 20 prefixes: 15 small jobs (``--small-objects`` objects of 16 KiB
each) and 5 large ones (``--large-objects`` objects of 16 MiB). The service (``--concurrent`` jobs
at once) gets all 20 at the same moment while a client polls the API (``GET /api/v1/jobs`` and
``GET /api/v1/jobs/ID``, back to back); then the same 20 syncs run one after another with the CLI
into fresh destinations. Printed: total time and throughput of both, their ratio, and the API's
latency percentiles while the jobs ran.

Then the whole source once with the local engine and once with ``--engine ray`` on a local Ray
cluster of two nodes (``ray start --head`` plus a worker).

    .venv/bin/python bench/service_load.py [--concurrent 4] [--ray-cpus 1] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
import tomllib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from objstore import Config, open_store  # noqa: E402
from tests.servers.rclone_s3 import RcloneS3Server  # noqa: E402
from tests.servers.sync_service import Service  # noqa: E402

KiB, MiB = 1024, 1024 * 1024


def percentile(values: list[float], pct: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return 0.0
    return ordered[min(len(ordered) - 1, int(len(ordered) * pct / 100))]


def populate(store: Any, args: argparse.Namespace) -> tuple[list[str], int]:
    """The 20 source prefixes and the bytes they hold."""
    prefixes, total = [], 0
    small = os.urandom(16 * KiB)
    large = os.urandom(16 * MiB)
    puts = []
    for j in range(args.jobs):
        big = j % 4 == 3  # every fourth job is a large one: 5 of 20
        prefix = f"job-{j:02d}/"
        prefixes.append(prefix)
        count = args.large_objects if big else args.small_objects
        for i in range(count):
            puts.append((f"{prefix}f-{i:04d}.bin", large if big else small))
            total += len(large if big else small)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: store.put(*kv), puts))
    return prefixes, total


def run_service(
    work: Path, profiles: dict[str, Any], prefixes: list[str], args: argparse.Namespace
) -> dict[str, Any]:
    service = Service(work / "service", profiles, max_concurrent=args.concurrent).start()
    latencies: list[float] = []
    stop = threading.Event()
    try:
        ids: list[str] = []

        def poll() -> None:
            while not stop.is_set():
                for path in ["/api/v1/jobs", *(f"/api/v1/jobs/{i}" for i in ids[:1])]:
                    t0 = time.perf_counter()
                    service.call("GET", path)
                    latencies.append(time.perf_counter() - t0)

        started = time.perf_counter()
        for prefix in prefixes:
            _, job = service.call("POST", "/api/v1/jobs", {
                "source": f"s3://region-a@src/{prefix}", "destination": f"s3://region-b@svc/{prefix}",
                "name": prefix.rstrip("/"),
            })  # fmt: skip
            ids.append(job["id"])
        poller = threading.Thread(target=poll, daemon=True)
        poller.start()
        states = {}
        for job_id in ids:
            states[job_id] = service.wait_state(
                job_id, ("succeeded", "failed", "verify_failed"), timeout=1800
            )["state"]
        elapsed = time.perf_counter() - started
        stop.set()
        poller.join()
    finally:
        service.stop()
    failed = [i for i, s in states.items() if s != "succeeded"]
    if failed:
        raise RuntimeError(f"jobs did not succeed: {failed}")
    return {"seconds": elapsed, "api_requests": len(latencies),
            "api_p50_ms": 1e3 * percentile(latencies, 50), "api_p99_ms": 1e3 * percentile(latencies, 99),
            "api_max_ms": 1e3 * max(latencies, default=0.0)}  # fmt: skip


def run_cli_sequential(config: Path, prefixes: list[str]) -> dict[str, Any]:
    started = time.perf_counter()
    for prefix in prefixes:
        done = subprocess.run(
            [sys.executable, "-m", "babel_sync.cli", "sync", f"s3://region-a@src/{prefix}",
             f"s3://region-b@cli/{prefix}", "--json", "--config", str(config)],
            cwd=ROOT, capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"babel-sync sync {prefix} failed: {done.stderr.strip()[-500:]}")
    return {"seconds": time.perf_counter() - started}


def run_engines(work: Path, config: Path, args: argparse.Namespace) -> dict[str, Any]:
    """The whole source synced by the local engine, then by the Ray engine on a local Ray
    cluster of two nodes (head + worker, ``--ray-cpus`` CPUs each)."""
    ray = str(Path(sys.executable).with_name("ray"))
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    out: dict[str, Any] = {}

    def sync(dst: str, *extra: str) -> float:
        started = time.perf_counter()
        done = subprocess.run(
            [sys.executable, "-m", "babel_sync.cli", "sync", "s3://region-a@src/", dst, "--json",
             "--config", str(config), *extra],
            cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"sync to {dst} failed: {done.stderr.strip()[-800:]}")
        return time.perf_counter() - started

    out["local_s"] = sync("s3://region-b@eng-local/", "--journal", str(work / "j-local"))
    port = 6400 + os.getpid() % 500
    subprocess.run([ray, "stop", "--force"], env=env, capture_output=True)
    started = subprocess.run(
        [ray, "start", "--head", "--port", str(port), "--num-cpus", str(args.ray_cpus),
         "--include-dashboard", "false", "--disable-usage-stats", "--temp-dir", str(work / "ray")],
        env=env, capture_output=True, text=True,
    )  # fmt: skip
    if started.returncode != 0:
        raise RuntimeError(f"ray start failed: {started.stderr.strip()[-500:]}")
    try:
        subprocess.run([ray, "start", "--address", f"127.0.0.1:{port}", "--num-cpus",
                        str(args.ray_cpus), "--disable-usage-stats"], env=env, check=True,
                       capture_output=True)  # fmt: skip
        out["ray_s"] = sync("s3://region-b@eng-ray/", "--journal", str(work / "j-ray"),
                            "--engine", "ray", "--ray-address", f"127.0.0.1:{port}")  # fmt: skip
    finally:
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=20)
    parser.add_argument("--concurrent", type=int, default=4, help="jobs the service runs at once")
    parser.add_argument(
        "--small-objects", type=int, default=200, help="16 KiB objects per small job"
    )
    parser.add_argument("--large-objects", type=int, default=4, help="16 MiB objects per large job")
    parser.add_argument("--ray-cpus", type=int, default=1,
                        help="CPUs per node of the 2-node local Ray cluster (0: skip the Ray run)")  # fmt: skip
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="service-load-", dir="/var/tmp") as tmp:
        work = Path(tmp)
        a = RcloneS3Server(work / "region-a")
        b = RcloneS3Server(work / "region-b", access_key_id="AKIABENCHREGIONB0001",
                           secret_access_key="benchSecretKeyForRegionB000000000000002")  # fmt: skip
        with a, b:
            a.create_bucket("src")
            for bucket in ("svc", "cli", "eng-local", "eng-ray"):
                b.create_bucket(bucket)
            profiles = {"region-a": a.profile(), "region-b": b.profile()}
            config = work / "objstore.toml"
            lines = []
            for name, table in profiles.items():
                lines.append(f"[profiles.{name}]")
                lines += [f'{k} = "{v}"' for k, v in table.items()]
            config.write_text("\n".join(lines) + "\n")
            store = open_store(
                "s3://region-a@src/", Config.from_mapping(tomllib.loads(config.read_text()), env={})
            )
            print(f"preparing {args.jobs} source prefixes ...", file=sys.stderr)
            prefixes, total = populate(store, args)
            print("service: all jobs at once ...", file=sys.stderr)
            service = run_service(work, profiles, prefixes, args)
            print("CLI: one after another ...", file=sys.stderr)
            cli = run_cli_sequential(config, prefixes)
            engines = run_engines(work, config, args) if args.ray_cpus else {}
    result = {"bytes": total, "jobs": args.jobs, "concurrent": args.concurrent, "service": service, "cli": cli,
              "service_vs_cli": cli["seconds"] / service["seconds"], "engines": engines}  # fmt: skip
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    mb = total / 1e6
    print(f"{args.jobs} jobs ({args.jobs - args.jobs // 4} x {args.small_objects} x 16 KiB, "
          f"{args.jobs // 4} x {args.large_objects} x 16 MiB; {mb:,.0f} MB), service runs {args.concurrent} at once")  # fmt: skip
    print(f"{'run':<34} | {'time (s)':>8} | {'MB/s':>8}")
    print(
        f"{'babel-sync serve, 20 jobs at once':<34} | {service['seconds']:>8.2f} | {mb / service['seconds']:>8.1f}"
    )
    print(
        f"{'babel-sync CLI, one after another':<34} | {cli['seconds']:>8.2f} | {mb / cli['seconds']:>8.1f}"
    )
    print(f"service throughput / sequential CLI: {result['service_vs_cli']:.2f}x")
    print(f"API latency while the jobs ran ({service['api_requests']:,} requests): "
          f"p50 {service['api_p50_ms']:.1f} ms, p99 {service['api_p99_ms']:.1f} ms, max {service['api_max_ms']:.1f} ms")  # fmt: skip
    if engines:
        print(f"one sync of all {mb:,.0f} MB: local engine {engines['local_s']:.2f} s "
              f"({mb / engines['local_s']:.1f} MB/s), Ray engine on 2 local nodes "
              f"{engines['ray_s']:.2f} s ({mb / engines['ray_s']:.1f} MB/s): "
              f"{engines['local_s'] / engines['ray_s']:.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
