#!/usr/bin/env python3
"""Benchmark a 3-node pcache cluster on rate-capped links: aggregate throughput and load skew.

Topology (:mod:`bench.netns`): three network namespaces ``pcb-n1..3`` (``10.77.0.11-13``) on a
bridge in the root namespace (``10.77.0.1``); each namespace's link is capped with ``tc htb`` at
``--rate`` in each direction. ``rclone serve s3`` (the backing store) runs in the root namespace
on the bridge address, uncapped itself, but every byte a worker fetches from it crosses that
worker's capped link. One ``pcache worker`` runs in each namespace with a cache of ``--cache``
bytes; the dataset (``--objects`` x ``--object-size``, random bytes) is twice one worker's cache
by default. Three client processes run one in each namespace; each talks to the worker of its
own namespace (``PCACHE_WORKER``), which gives it the cluster view, and then picks a worker per
block itself (rendezvous + two choices + bounded load). Shared memory is off (the workers are
remote for two clients out of three, and the comparison must use one path). A client's
requests to the worker in its own namespace go over that namespace's loopback, uncapped, as on a
real node.

Runs, in order, all with the same data and three clients:

1. ``3 workers``: a cold pass (each client reads every object once, in its own random order;
   timed separately), then ``--passes`` warm passes (new orders). A client reads ``--streams``
   objects at a time, each block by block through :class:`pcache.client.PcacheReader`
   (``--readahead`` blocks ahead), and checks each against the CRC32 of what was uploaded.
2. Load skew on the same cluster: each client issues ``--requests`` single-block reads from
   ``--threads`` threads, (a) blocks drawn from Zipf(``--zipf``) over all the dataset's blocks
   (the same ranking for every client), (b) ``--hot-fraction`` of the requests on the blocks of
   one object, the rest uniform. Requests per worker = the growth of ``served.requests.client +
   served.requests.peer`` in each worker's ``/v1/status``; the figure is max/mean over the
   workers, against the target ``--skew-target`` (1.3).
3. ``1 worker (forced)``: the 3-worker cluster is stopped and a one-node cluster (its peer list
   names only node1, same cache size, fresh cache) runs in ``pcb-n1``; every client's
   ``PCACHE_WORKER`` is that worker, so every request goes to it. Cold pass, then warm passes.

Reported per pass: aggregate MB/s (all bytes the three clients read / time from the first
client's start to the last one's end; MB = 10^6 bytes), each client's MB/s, where the clients'
blocks came from (local/peer/backend as the serving worker says), CPU seconds of each worker,
the clients and rclone, how busy the box's CPUs were, and the busiest link direction relative to
the cap. ``limit`` says ``link`` when some link direction ran at >= 85% of the cap, ``CPU`` when
the box's cores were >= 90% busy (both can hold; on this 2-core box the clients, workers and
rclone share the cores), ``-`` otherwise (neither: the request pipeline is what limits).
``CPU ours/box`` separates this benchmark's processes from everything else on the machine, so a
run disturbed by other load shows it. Every figure printed is measured in this invocation.

``--quick`` is a smoke run (about 20 s): 16 MiB cache per worker, 4 x 8 MiB objects, 1 MiB
blocks, one warm pass, 100 skew requests per client.

Needs root (namespaces, tc). If a run is killed hard, ``--cleanup`` removes what it left.

Usage:
    .venv/bin/python bench/pcache_cluster.py [--quick] [--rate 400mbit] [--cache 96MiB]
        [--objects 12] [--object-size 16MiB] [--block-size 4MiB] [--passes 2] [--streams 4]
        [--readahead 4] [--requests 300] [--threads 4] [--zipf 1.1] [--hot-fraction 0.9]
        [--json] [--keep] [--cleanup]
Exit status: 0 when the skew target holds, 1 when it does not, 2 when the run could not be set up.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import os
import random
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
import zlib
from collections.abc import Iterator, Sequence
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

# Run from anywhere: the repository root holds the packages and the test servers.
ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.netns import Topology, TopologyError  # noqa: E402
from objstore.cli import human_bytes, parse_size  # noqa: E402
from tests.servers.pcache_cluster import PcacheCluster  # noqa: E402
from tests.servers.rclone_s3 import RcloneS3Server  # noqa: E402
from tests.servers.s3_process import wait_for_port  # noqa: E402

log = logging.getLogger(__name__)

MB = 1e6
NAMESPACE = "data"
BUCKET = "pcache-bench"
LINK_SATURATED = 0.85
CPU_SATURATED = 0.90
READY_TIMEOUT_S = 120.0


def say(*parts: object) -> None:
    print(*parts, file=sys.stderr, flush=True)


# -- the backing store on the bridge ---------------------------------------------------------


class BridgeS3Server(RcloneS3Server):
    """``rclone serve s3`` listening on the bridge address, so namespaces can reach it."""

    def __init__(self, root: Path, host: str, **kwargs: Any) -> None:
        super().__init__(root, **kwargs)
        self.host = host
        self.endpoint = f"http://{host}:{self.port}"

    def command(self) -> list[str]:
        cmd = super().command()
        cmd[cmd.index("--addr") + 1] = f"{self.host}:{self.port}"
        return cmd

    def start(self) -> BridgeS3Server:
        out: Any = open(self._log_file, "ab") if self._log_file else subprocess.DEVNULL  # noqa: SIM115
        self._proc = subprocess.Popen(
            self.command(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            wait_for_port(self.host, self.port, self.startup_timeout, self._proc)
        except BaseException:
            self.stop()
            raise
        return self

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None


# -- measurements ----------------------------------------------------------------------------


def proc_cpu_s(pid: int | None) -> float:
    """User + system CPU seconds of a process (all its threads), 0 if it is gone."""
    if pid is None:
        return 0.0
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


BOX_FIELDS = ("user", "nice", "system", "idle", "iowait", "irq", "softirq", "steal")


def box_cpu() -> dict[str, int]:
    """Jiffies over all CPUs since boot, by kind (``/proc/stat``)."""
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:9]]
    return dict(zip(BOX_FIELDS, values, strict=True))


def fetch_status(address: str, token: str) -> dict[str, Any]:
    request = urllib.request.Request(
        address + "/v1/status", headers={"Authorization": f"Bearer {token}"}
    )
    with urllib.request.urlopen(request, timeout=10) as response:
        return json.loads(response.read())


@dataclass
class Snapshot:
    """Counters at one instant, subtracted pairwise to describe a phase."""

    status: dict[str, dict[str, Any]]
    cpu: dict[str, float]
    links: dict[int, tuple[int, int]]
    box: dict[str, int]

    @classmethod
    def take(cls, topo: Topology, cluster: PcacheCluster, s3: BridgeS3Server) -> Snapshot:
        status = {n.node_id: fetch_status(n.address, cluster.token) for n in cluster.nodes}
        cpu = {n.node_id: proc_cpu_s(n.process.pid if n.process else None) for n in cluster.nodes}
        cpu["rclone"] = proc_cpu_s(s3.pid)
        return cls(status, cpu, topo.link_bytes(), box_cpu())


def _served(status: dict[str, Any]) -> tuple[int, int]:
    requests = status["served"]["requests"]
    return int(requests.get("client", 0)), int(requests.get("peer", 0))


# -- client processes ------------------------------------------------------------------------


@dataclass
class ClientSpec:
    """What one client process does (written to a 0600 file: it holds the token)."""

    node: int  # namespace index the client runs in
    worker: str
    token: str
    mode: str  # "scan" or "requests"
    objects: list[dict[str, Any]]  # {"key", "size", "crc"}
    order: list[int] = field(default_factory=list)  # scan: object indexes
    requests: list[tuple[int, int]] = field(default_factory=list)  # (object, block)
    threads: int = 4  # requests: parallel single-block reads; scan: objects read at once
    readahead: int = 4
    verify: bool = True


class ClientGroup:
    """Client processes started in their namespaces, released together, results collected."""

    def __init__(self, topo: Topology, specs: Sequence[ClientSpec], workdir: Path) -> None:
        self.procs: list[tuple[ClientSpec, subprocess.Popen[str], Path]] = []
        workdir.mkdir(parents=True, exist_ok=True)
        for i, spec in enumerate(specs):
            spec_path = workdir / f"client{i + 1}.json"
            fd = os.open(spec_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(spec.__dict__, f)
            log_path = workdir / f"client{i + 1}.log"
            cmd = [
                "ip",
                "netns",
                "exec",
                topo.netns(spec.node),
                sys.executable,
                str(Path(__file__).resolve()),
                "--client-mode",
                str(spec_path),
            ]
            with log_path.open("ab") as log_file:
                proc = subprocess.Popen(
                    cmd,
                    cwd=ROOT,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=log_file,
                    text=True,
                    env={**os.environ, "PYTHONPATH": str(ROOT)},
                )
            self.procs.append((spec, proc, log_path))

    def _line(self, proc: subprocess.Popen[str], log_path: Path, deadline: float) -> str:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], max(0.0, deadline - time.monotonic()))
        line = proc.stdout.readline() if ready else ""
        if not line:
            proc.poll()
            tail = log_path.read_text()[-3000:] if log_path.exists() else ""
            why = "timed out" if not ready else f"exited ({proc.returncode})"
            raise RuntimeError(f"{log_path.parent.name} {log_path.stem} {why}; log ends:\n{tail}")
        return line

    def wait_ready(self) -> None:
        deadline = time.monotonic() + READY_TIMEOUT_S
        for _, proc, log_path in self.procs:
            line = self._line(proc, log_path, deadline)
            if line.strip() != "READY":
                raise RuntimeError(f"client said {line.strip()!r} instead of READY")

    def go(self) -> None:
        for _, proc, _ in self.procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()

    def results(self, timeout: float) -> list[dict[str, Any]]:
        deadline = time.monotonic() + timeout
        out = []
        for _, proc, log_path in self.procs:
            out.append(json.loads(self._line(proc, log_path, deadline)))
            proc.wait(timeout=30)
        return out

    def stop(self) -> None:
        for _, proc, _ in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def client_main(spec_path: str) -> int:
    """``--client-mode``: one client process (runs inside a namespace)."""
    from concurrent.futures import ThreadPoolExecutor

    from objstore.config import Secret
    from pcache.client import PcacheClient, PcacheReader
    from pcache.config import ClientConfig

    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    spec = ClientSpec(**json.loads(Path(spec_path).read_text()))
    client = PcacheClient(
        ClientConfig(worker=spec.worker, token=Secret(spec.token), shm=False),
        readahead=spec.readahead,
        threads=max(16, spec.threads * (spec.readahead + 1)),
    )
    infos = [client.stat(f"{NAMESPACE}/{o['key']}") for o in spec.objects]
    client.info()
    print("READY", flush=True)
    if sys.stdin.readline().strip() != "go":
        return 1
    cpu0, start = time.process_time(), time.monotonic()
    nbytes = 0
    bad: list[str] = []
    if spec.mode == "scan":

        def scan(index: int) -> tuple[int, bool]:
            obj = spec.objects[index]
            buf = bytearray(obj["size"])
            view = memoryview(buf)
            done = 0
            with PcacheReader(client, f"{NAMESPACE}/{obj['key']}") as reader:
                while done < len(view):
                    n = reader.readinto(view[done:])
                    if not n:
                        break
                    done += n
            ok = done == obj["size"] and (not spec.verify or zlib.crc32(view) == obj["crc"])
            return done, ok

        with ThreadPoolExecutor(spec.threads) as pool:
            for index, (n, ok) in zip(spec.order, pool.map(scan, spec.order), strict=True):
                nbytes += n
                if not ok:
                    bad.append(spec.objects[index]["key"])
    else:

        def one(request: tuple[int, int]) -> int:
            obj, block = request
            data = client.reads.read_block(NAMESPACE, infos[obj], block)
            return len(data)

        bs = client.block_size
        with ThreadPoolExecutor(spec.threads) as pool:
            for (obj, block), n in zip(spec.requests, pool.map(one, spec.requests), strict=True):
                nbytes += n
                if n != min(bs, spec.objects[obj]["size"] - block * bs):
                    bad.append(f"{spec.objects[obj]['key']}#{block}")
    end, cpu = time.monotonic(), time.process_time() - cpu0
    result = {
        "node": spec.node,
        "bytes": nbytes,
        "start": start,
        "end": end,
        "cpu_s": cpu,
        "sources": dict(client.reads.sources),
        "selector": client.selector.snapshot(),
        "bad": bad,
    }
    client.close()
    print(json.dumps(result), flush=True)
    return 0


# -- phases ----------------------------------------------------------------------------------


@dataclass
class Dataset:
    objects: list[dict[str, Any]]
    block_size: int

    @property
    def size(self) -> int:
        return sum(o["size"] for o in self.objects)

    def blocks(self) -> list[tuple[int, int]]:
        return [
            (i, b)
            for i, o in enumerate(self.objects)
            for b in range(max(1, -(-o["size"] // self.block_size)))
        ]


def upload(s3: BridgeS3Server, count: int, size: int, block_size: int) -> Dataset:
    s3.create_bucket(BUCKET)
    client = s3.client()
    objects = []
    try:
        for i in range(count):
            data = os.urandom(size)
            key = f"shards/shard-{i:04d}.bin"
            client.put_object(Bucket=BUCKET, Key=key, Body=data)
            objects.append({"key": key, "size": size, "crc": zlib.crc32(data)})
    finally:
        client.close()
    return Dataset(objects, block_size)


def run_phase(
    name: str,
    topo: Topology,
    cluster: PcacheCluster,
    s3: BridgeS3Server,
    specs: Sequence[ClientSpec],
    workdir: Path,
    timeout: float,
) -> dict[str, Any]:
    """Start the clients, release them together, and describe what happened meanwhile."""
    group = ClientGroup(topo, specs, workdir / name.replace(" ", "_"))
    try:
        group.wait_ready()
        before = Snapshot.take(topo, cluster, s3)
        group.go()
        results = group.results(timeout)
        after = Snapshot.take(topo, cluster, s3)
    finally:
        group.stop()
    bad = [b for r in results for b in r["bad"]]
    if bad:
        raise RuntimeError(f"{name}: wrong data read for {', '.join(bad[:5])}")
    start = min(r["start"] for r in results)
    end = max(r["end"] for r in results)
    elapsed = end - start
    total = sum(r["bytes"] for r in results)
    sources: dict[str, int] = {}
    for r in results:
        for k, v in r["sources"].items():
            sources[k] = sources.get(k, 0) + v
    workers = {}
    for node_id, status in after.status.items():
        c1, p1 = _served(status)
        c0, p0 = _served(before.status[node_id])
        tiers0 = before.status[node_id]["reads"]["by_tier"]
        workers[node_id] = {
            "requests_client": c1 - c0,
            "requests_peer": p1 - p0,
            "requests": (c1 - c0) + (p1 - p0),
            "by_tier": {t: v - tiers0.get(t, 0) for t, v in status["reads"]["by_tier"].items()},
            "evictions": status["blocks"].get("evictions", 0)
            - before.status[node_id]["blocks"].get("evictions", 0),
            "cpu_s": after.cpu[node_id] - before.cpu[node_id],
        }
    jiffies = {k: after.box[k] - before.box[k] for k in BOX_FIELDS}
    total_jiffies = sum(jiffies.values()) or 1
    box = {k: v / total_jiffies for k, v in jiffies.items()}
    # steal is time the hypervisor gave to other guests: not ours, yet not available to us either
    box_busy = 1.0 - box["idle"] - box["iowait"] - box["steal"]
    cap = topo.rate_bytes_per_s()
    links = {}
    for i, (into, out) in after.links.items():
        into0, out0 = before.links[i]
        links[topo.netns(i)] = {
            "in_MBps": (into - into0) / elapsed / MB,
            "out_MBps": (out - out0) / elapsed / MB,
            "in_util": (into - into0) / elapsed / cap,
            "out_util": (out - out0) / elapsed / cap,
        }
    our_cpu = (
        sum(w["cpu_s"] for w in workers.values())
        + sum(r["cpu_s"] for r in results)
        + after.cpu["rclone"]
        - before.cpu["rclone"]
    )
    busiest = max(
        ((ns, d, v[f"{d}_util"]) for ns, v in links.items() for d in ("in", "out")),
        key=lambda t: t[2],
    )
    limits = []
    if busiest[2] >= LINK_SATURATED:
        limits.append("link")
    if box_busy >= CPU_SATURATED:
        limits.append("CPU")
    return {
        "name": name,
        "elapsed_s": elapsed,
        "bytes": total,
        "MBps": total / elapsed / MB,
        "clients": [
            {
                "node": topo.netns(r["node"]),
                "bytes": r["bytes"],
                "MBps": r["bytes"] / (r["end"] - r["start"]) / MB,
                "cpu_s": r["cpu_s"],
                "sources": r["sources"],
                "selector": r["selector"],
            }
            for r in results
        ],
        "sources": sources,
        "workers": workers,
        "rclone_cpu_s": after.cpu["rclone"] - before.cpu["rclone"],
        "box_cpu_busy": box_busy,
        "box_cpu_split": box,
        "our_cpu_s": our_cpu,
        "our_cpu_busy": our_cpu / (elapsed * (os.cpu_count() or 1)),
        "links": links,
        "busiest_link": {"netns": busiest[0], "direction": busiest[1], "util": busiest[2]},
        "limit": "+".join(limits) or "-",
    }


def scan_specs(
    topo: Topology,
    workers: Sequence[str],
    token: str,
    data: Dataset,
    seed: int,
    args: argparse.Namespace,
) -> list[ClientSpec]:
    specs = []
    for c in range(1, topo.count + 1):
        order = list(range(len(data.objects)))
        random.Random(seed * 1000 + c).shuffle(order)
        specs.append(
            ClientSpec(
                c,
                workers[c - 1],
                token,
                "scan",
                data.objects,
                order=order,
                threads=args.streams,
                readahead=args.readahead,
                verify=not args.no_verify,
            )
        )
    return specs


def skew_specs(
    topo: Topology,
    workers: Sequence[str],
    token: str,
    data: Dataset,
    workload: str,
    args: argparse.Namespace,
) -> list[ClientSpec]:
    blocks = data.blocks()
    ranking = list(blocks)
    random.Random(7).shuffle(ranking)  # which blocks are hot: the same for every client
    cum: list[float] = []
    acc = 0.0
    for rank in range(len(ranking)):
        acc += 1.0 / (rank + 1) ** args.zipf
        cum.append(acc)
    hot = [b for b in blocks if b[0] == 0]
    specs = []
    for c in range(1, topo.count + 1):
        rng = random.Random(100 + c)
        if workload == "zipf":
            requests = rng.choices(ranking, cum_weights=cum, k=args.requests)
        else:
            requests = [
                rng.choice(hot) if rng.random() < args.hot_fraction else rng.choice(blocks)
                for _ in range(args.requests)
            ]
        specs.append(
            ClientSpec(
                c,
                workers[c - 1],
                token,
                "requests",
                data.objects,
                requests=requests,
                threads=args.threads,
            )
        )
    return specs


def skew_summary(phase: dict[str, Any], target: float) -> dict[str, Any]:
    per_worker = {k: v["requests"] for k, v in phase["workers"].items()}
    client_only = {k: v["requests_client"] for k, v in phase["workers"].items()}
    mean = sum(per_worker.values()) / len(per_worker)
    cmean = sum(client_only.values()) / len(client_only)
    ratio = max(per_worker.values()) / mean if mean else float("inf")
    return {
        "requests_per_worker": per_worker,
        "client_requests_per_worker": client_only,
        "max_over_mean": ratio,
        "client_max_over_mean": max(client_only.values()) / cmean if cmean else float("inf"),
        "target": target,
        "pass": ratio <= target,
    }


def start_cluster(
    root: Path,
    s3: BridgeS3Server,
    topo: Topology,
    nodes: int,
    args: argparse.Namespace,
) -> PcacheCluster:
    cluster = PcacheCluster(
        root,
        {"s3": s3.profile(max_attempts=3)},
        {NAMESPACE: f"s3://s3@{BUCKET}/"},
        nodes=nodes,
        capacity=args.cache,
        hosts=topo.addresses[:nodes],
        netns=topo.namespaces[:nodes],
        block_size=str(args.block_size),
        extra={"request_timeout": 30.0},
    )
    cluster.start(timeout=60)
    return cluster


def stop_cluster(cluster: PcacheCluster) -> None:
    try:
        cluster.stop()
    except Exception as exc:  # a stuck worker must not keep the namespaces alive
        log.warning("stopping workers: %s", exc)
        for node in cluster.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.kill()


def throughput_runs(
    label: str,
    topo: Topology,
    cluster: PcacheCluster,
    s3: BridgeS3Server,
    workers: Sequence[str],
    data: Dataset,
    args: argparse.Namespace,
    workdir: Path,
) -> list[dict[str, Any]]:
    phases = []
    for p in range(args.passes + 1):
        kind = "cold" if p == 0 else f"warm{p}"
        say(f"  {label}: {kind} pass ...")
        specs = scan_specs(topo, workers, cluster.token, data, seed=p, args=args)
        phase = run_phase(f"{label} {kind}", topo, cluster, s3, specs, workdir, args.phase_timeout)
        phase.update(run=label, kind=kind)
        say(f"    {phase['MBps']:.1f} MB/s in {phase['elapsed_s']:.1f}s (limit: {phase['limit']})")
        phases.append(phase)
    return phases


def warm_mbps(phases: Sequence[dict[str, Any]]) -> float:
    warm = [p for p in phases if p["kind"] != "cold"]
    return sum(p["bytes"] for p in warm) / sum(p["elapsed_s"] for p in warm) / MB


# -- output ----------------------------------------------------------------------------------


def _tiers(sources: dict[str, int]) -> str:
    total = sum(sources.values()) or 1
    return "/".join(f"{100 * sources.get(t, 0) / total:.0f}" for t in ("local", "peer", "backend"))


def _cpu(phase: dict[str, Any]) -> str:
    return f"{100 * phase['our_cpu_busy']:.0f}/{100 * phase['box_cpu_busy']:.0f}%"


def print_table(report: dict[str, Any]) -> None:
    o = report["options"]
    print(
        f"pcache cluster benchmark: {o['workers']} workers in netns, links capped at {o['rate']} "
        f"each way (htb), cache {human_bytes(o['cache'])}/worker, dataset "
        f"{human_bytes(o['dataset'])} ({o['objects']} x {human_bytes(o['object_size'])}), "
        f"block {human_bytes(o['block_size'])}, 3 clients (one per netns, {o['streams']} "
        f"objects at a time, readahead {o['readahead']}), {o['passes']} warm pass(es), "
        f"{o['requests_per_client']} skew requests x {o['threads_per_client']} threads per "
        f"client; cap = {o['cap_MBps']:.1f} MB/s per link direction; {o['cpus']} CPUs"
    )
    print()
    header = (
        f"{'run':<18} {'pass':<6} {'MB/s':>7} {'per client MB/s':>19} {'hit% l/p/b':>11} "
        f"{'worker CPU s':>16} {'cli CPU':>7} {'rcl CPU':>7} {'CPU ours/box':>12} "
        f"{'busiest link':>20} {'limit':>8}"
    )
    print(header)
    print("-" * len(header))
    for p in report["throughput"]:
        per_client = "/".join(f"{c['MBps']:.0f}" for c in p["clients"])
        wcpu = "/".join(f"{w['cpu_s']:.1f}" for w in p["workers"].values())
        ccpu = sum(c["cpu_s"] for c in p["clients"])
        link = p["busiest_link"]
        busiest = f"{link['netns']} {link['direction']} {100 * link['util']:.0f}%"
        print(
            f"{p['run']:<18} {p['kind']:<6} {p['MBps']:>7.1f} {per_client:>19} "
            f"{_tiers(p['sources']):>11} {wcpu:>16} {ccpu:>7.1f} {p['rclone_cpu_s']:>7.1f} "
            f"{_cpu(p):>12} {busiest:>20} {p['limit']:>8}"
        )
    s = report["summary"]
    print()
    print(
        f"warm aggregate: 3 workers {s['mbps_3']:.1f} MB/s, 1 worker (forced) "
        f"{s['mbps_1']:.1f} MB/s, ratio {s['ratio']:.2f}x"
    )
    print()
    header = (
        f"{'skew workload':<28} {'requests/worker (client+peer)':>32} {'max/mean':>9} "
        f"{'client-only':>11} {'target':>7} {'MB/s':>7} {'CPU ours/box':>12} {'result':>7}"
    )
    print(header)
    print("-" * len(header))
    for k in report["skew"]:
        sk = k["skew"]
        counts = "/".join(
            f"{w['requests_client']}+{w['requests_peer']}" for w in k["phase"]["workers"].values()
        )
        print(
            f"{k['workload']:<28} {counts:>32} {sk['max_over_mean']:>9.3f} "
            f"{sk['client_max_over_mean']:>11.3f} {sk['target']:>7.2f} "
            f"{k['phase']['MBps']:>7.1f} {_cpu(k['phase']):>12} "
            f"{'PASS' if sk['pass'] else 'FAIL':>7}"
        )
    print()
    print(
        "hit% l/p/b: share of the clients' blocks the serving worker had locally / got from a "
        "peer / read from S3. worker CPU s: per worker, during the pass. limit: link = a link "
        f"direction at >= {100 * LINK_SATURATED:.0f}% of the cap, CPU = box >= "
        f"{100 * CPU_SATURATED:.0f}% busy. CPU ours/box: share of all cores used by the "
        "workers, clients and rclone / by everything on the box. Requests a client sends to "
        "its own namespace's worker use loopback (not capped)."
    )


# -- main ------------------------------------------------------------------------------------


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0] if __doc__ else None,
        epilog="Needs root. See the module docstring for what each run does.",
    )
    parser.add_argument("--rate", default="400mbit", help="htb cap per link direction")
    parser.add_argument("--cache", type=parse_size, default=None, help="cache per worker")
    parser.add_argument("--objects", type=int, default=None, help="objects in the dataset")
    parser.add_argument("--object-size", type=parse_size, default=None)
    parser.add_argument("--block-size", type=parse_size, default=None)
    parser.add_argument("--passes", type=int, default=None, help="warm passes per run")
    parser.add_argument("--requests", type=int, default=None, help="skew requests per client")
    parser.add_argument("--threads", type=int, default=4, help="skew threads per client")
    parser.add_argument(
        "--streams", type=int, default=4, help="objects each client reads at once (scan)"
    )
    parser.add_argument("--readahead", type=int, default=4, help="client readahead (blocks)")
    parser.add_argument("--zipf", type=float, default=1.1, help="Zipf exponent")
    parser.add_argument("--hot-fraction", type=float, default=0.9)
    parser.add_argument("--skew-target", type=float, default=1.3)
    parser.add_argument("--phase-timeout", type=float, default=600.0)
    parser.add_argument("--no-verify", action="store_true", help="skip CRC32 checks of reads")
    parser.add_argument("--prefix", default="pcb", help="namespace/interface name prefix")
    parser.add_argument("--subnet", default="10.77.0", help="first three octets of a free /24")
    parser.add_argument(
        "--quick", action="store_true", help="small smoke run (well under a minute)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    parser.add_argument("--keep", action="store_true", help="keep the scratch directory")
    parser.add_argument(
        "--cleanup", action="store_true", help="remove namespaces/links a killed run left"
    )
    parser.add_argument("-v", "--verbose", action="store_true")
    parser.add_argument("--client-mode", metavar="SPEC", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    MiB = 1 << 20
    defaults = (
        {
            "cache": 16 * MiB,
            "objects": 4,
            "object_size": 8 * MiB,
            "block_size": 1 * MiB,
            "passes": 1,
            "requests": 100,
        }
        if args.quick
        else {
            "cache": 96 * MiB,
            "objects": 12,
            "object_size": 16 * MiB,
            "block_size": 4 * MiB,
            "passes": 2,
            "requests": 300,
        }
    )
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.block_size & (args.block_size - 1) or args.block_size < 64 << 10:
        parser.error("--block-size must be a power of two >= 64KiB")
    if min(args.objects, args.passes, args.requests, args.threads, args.streams) < 1:
        parser.error("--objects, --passes, --requests, --threads and --streams must be >= 1")
    if args.readahead < 0:
        parser.error("--readahead must be >= 0")
    return args


@contextmanager
def _terminate_as_exit() -> Iterator[None]:
    """SIGTERM unwinds like Ctrl-C, so the finally blocks remove namespaces and processes."""

    def handler(signum: int, frame: Any) -> None:
        raise SystemExit(128 + signum)

    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def run_bench(args: argparse.Namespace) -> int:
    topo = Topology(prefix=args.prefix, subnet=args.subnet, count=3, rate=args.rate)
    workdir = Path(tempfile.mkdtemp(prefix="pcache-cluster-bench-"))
    report: dict[str, Any] = {}
    with ExitStack() as stack, _terminate_as_exit():
        if not args.keep:
            stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        else:
            say(f"scratch directory kept: {workdir}")
        topo.setup()
        atexit.register(topo.teardown)  # in case something below escapes the ExitStack
        stack.callback(topo.teardown)
        say(f"topology: {', '.join(topo.namespaces)} at {', '.join(topo.addresses)}, {args.rate}")

        s3 = BridgeS3Server(
            workdir / "s3", topo.host_address, log_file=workdir / "rclone.log"
        ).start()
        stack.callback(s3.stop)
        say(f"rclone serve s3 on {s3.endpoint}; uploading the dataset ...")
        data = upload(s3, args.objects, args.object_size, args.block_size)
        say(f"dataset: {human_bytes(data.size)} in {len(data.objects)} objects")

        cluster3 = start_cluster(workdir / "cluster3", s3, topo, 3, args)
        stack.callback(stop_cluster, cluster3)
        workers3 = [n.address for n in cluster3.nodes]
        say(f"3 workers up: {', '.join(workers3)}")
        runs = throughput_runs("3 workers", topo, cluster3, s3, workers3, data, args, workdir)
        skew = []
        for workload, label in (
            ("zipf", f"zipf({args.zipf}) over {len(data.blocks())} blocks"),
            ("hot", f"{100 * args.hot_fraction:.0f}% on one object"),
        ):
            say(f"  skew: {label} ...")
            specs = skew_specs(topo, workers3, cluster3.token, data, workload, args)
            phase = run_phase(
                f"skew {workload}", topo, cluster3, s3, specs, workdir, args.phase_timeout
            )
            summary = skew_summary(phase, args.skew_target)
            say(f"    max/mean {summary['max_over_mean']:.3f} ({summary['requests_per_worker']})")
            skew.append({"workload": label, "skew": summary, "phase": phase})
        stop_cluster(cluster3)

        cluster1 = start_cluster(workdir / "cluster1", s3, topo, 1, args)
        stack.callback(stop_cluster, cluster1)
        only = cluster1.nodes[0].address
        say(f"1 worker up: {only} (every client uses it)")
        runs += throughput_runs(
            "1 worker (forced)", topo, cluster1, s3, [only] * 3, data, args, workdir
        )
        stop_cluster(cluster1)

        three = [r for r in runs if r["run"] == "3 workers"]
        one = [r for r in runs if r["run"] != "3 workers"]
        report = {
            "options": {
                "workers": 3,
                "rate": args.rate,
                "cap_MBps": topo.rate_bytes_per_s() / MB,
                "cache": args.cache,
                "dataset": data.size,
                "objects": args.objects,
                "object_size": args.object_size,
                "block_size": args.block_size,
                "passes": args.passes,
                "requests_per_client": args.requests,
                "threads_per_client": args.threads,
                "readahead": args.readahead,
                "streams": args.streams,
                "zipf": args.zipf,
                "hot_fraction": args.hot_fraction,
                "quick": args.quick,
                "cpus": os.cpu_count(),
                "kernel": os.uname().release,
            },
            "throughput": runs,
            "summary": {
                "mbps_3": warm_mbps(three),
                "mbps_1": warm_mbps(one),
                "ratio": warm_mbps(three) / warm_mbps(one),
                "cold_mbps_3": three[0]["MBps"],
                "cold_mbps_1": one[0]["MBps"],
            },
            "skew": skew,
        }
    if args.json:
        print(json.dumps(report, indent=2, default=str))
    else:
        print_table(report)
    return 0 if all(k["skew"]["pass"] for k in report["skew"]) else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.client_mode:
        return client_main(args.client_mode)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    topo = Topology(prefix=args.prefix, subnet=args.subnet, count=3, rate=args.rate)
    try:
        topo.check_privileges()
        if args.cleanup:
            for i in range(1, topo.count + 1):
                for pid in topo.pids(i):
                    say(f"killing pid {pid} left in {topo.netns(i)}")
                    os.kill(pid, signal.SIGKILL)
            topo.teardown()
            say("left after cleanup: " + (", ".join(topo.leftovers()) or "nothing"))
            return 0
        return run_bench(args)
    except TopologyError as exc:
        say(f"error: {exc}")
        return 2
    except KeyboardInterrupt:
        say("interrupted; cleaned up")
        return 130


if __name__ == "__main__":
    sys.exit(main())
