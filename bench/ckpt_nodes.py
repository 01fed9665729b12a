"""Checkpoint save time and memory per node: node-aware placement vs Megatron's and torch's.

Four "nodes" are network namespaces (:mod:`bench.netns`), each with its own address and its link
to the storage server capped with ``tc htb`` (``--rate``, 400 Mbit/s by default); one
``torchrun --nnodes 4 --node-rank i`` per namespace starts 4 ranks there (16 in all, gloo,
rendezvous on node 1). The S3 endpoint (``rclone serve s3``) runs in the root namespace on the
bridge. Every rank builds the bundled trainer's MoE (``ckpt.trainer``) at a size whose checkpoint
(weights plus AdamW moments) exceeds 1 GiB, with expert parallelism 8 (so each expert is held by
2 ranks and every dense weight by all 16), and saves it through ckpt's writer with each planner in
turn, same data, same run:

- ``node-aware``: :class:`ckpt.planner.NodeAwareSavePlanner`;
- ``megatron``: rank 0 of each data-parallel group writes the replicated items;
- ``torch``: torch's ``DefaultSavePlanner`` (per-rank greedy dedup).

Reported per planner: save time (slowest rank, from a barrier to the end of ``dcp.save``), bytes
written per node, and peak RSS per node during the save (the node's ranks summed, sampled every
10 ms), with the ratios the issue targets. A multipart-sized save per mode runs first, and glibc's
mmap threshold is fixed, so no run pays another's first-use memory or reuses heap another left.
Needs root (namespaces, tc).

    .venv/bin/python bench/ckpt_nodes.py [--rate 400mbit] [--json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.measure import RssPeak  # noqa: E402

PLANNERS = ("node-aware", "megatron", "torch")
BUCKET = "ckpt-bench"


# -- one rank ------------------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> int:
    import torch
    import torch.distributed as dist

    from ckpt.trainer.model import ModelConfig, MoEDecoder
    from ckpt.trainer.train import expert_groups, training_state

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    ep = args.ep
    ep_group, _ = expert_groups(rank, world, ep)
    cfg = ModelConfig(
        vocab=args.vocab, d_model=args.d_model, n_layers=args.layers, n_heads=8,
        n_experts=args.experts, expert_hidden=args.expert_hidden, shared_hidden=2 * args.d_model,
    )  # fmt: skip
    model = MoEDecoder(cfg, ep_group=ep_group, ep_rank=rank % ep, ep_size=ep)
    optim = torch.optim.AdamW(model.parameters())
    state = training_state(model, optim, {"step": 1})
    for p in model.parameters():  # moments that are not all zeros
        st = optim.state[p]
        st["exp_avg"].copy_(p.data * 0.1)
        st["exp_avg_sq"].copy_(p.data.abs() * 0.01)
    # first-use costs outside the measurements (topology all-gather, connections, thread pools,
    # multipart buffers): one multipart-sized save per mode, 24 MiB per rank
    warm = {"warm": torch.full((6 * 2**20,), float(rank))}
    for mode in ("sync", "async"):
        run_save(warm, f"s3://s3@{BUCKET}/warmup-{mode}/", "node-aware", mode)
    del warm
    gc.collect()
    dist.barrier()
    results = []
    for planner in args.planners.split(","):
        for mode in ("sync", "async"):
            url = f"s3://s3@{BUCKET}/{planner}-{mode}/step-00000001/"
            gc.collect()
            dist.barrier()
            rss = RssPeak([os.getpid()])
            base = rss.before
            started = time.perf_counter()
            with rss:
                written = run_save(state, url, planner, mode)
            seconds = time.perf_counter() - started
            mine = {
                "rank": rank, "node": os.environ["CKPT_NODE_ID"], "seconds": seconds,
                "bytes_written": written, "peak_rss": rss.peak, "base_rss": base,
            }  # fmt: skip
            gathered: list[Any] = [None] * world
            dist.all_gather_object(gathered, mine)
            results.append({"planner": planner, "mode": mode, "ranks": gathered})
    if rank == 0:
        print("BENCH " + json.dumps(results), flush=True)
    dist.barrier()
    dist.destroy_process_group()
    return 0


def run_save(state: dict[str, Any], url: str, planner: str, mode: str) -> int:
    """One save; returns the bytes this rank wrote. ``async`` stages first, as GPU training
    must (device to host): ckpt's saver copies only this rank's share, torch's ``async_save``
    (the torch baseline) copies the whole state dict."""
    import torch.distributed.checkpoint as dcp

    from ckpt.api import AsyncSaver, save
    from ckpt.storage import Writer

    if mode == "sync":
        return save(state, url, planner=planner).bytes_written
    if planner == "torch":
        writer = Writer(url)
        dcp.async_save(state, storage_writer=writer, planner=dcp.DefaultSavePlanner()).result()
        writer.close()
        return writer.bytes_written
    saver = AsyncSaver(planner=planner)
    try:
        return saver.save(state, url).result().bytes_written
    finally:
        saver.close()


# -- the launcher --------------------------------------------------------------------------------


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for run in runs:
        ranks = run["ranks"]
        nodes = sorted({r["node"] for r in ranks})
        per_node = {
            n: {
                "bytes": sum(r["bytes_written"] for r in ranks if r["node"] == n),
                "peak_rss": sum(r["peak_rss"] for r in ranks if r["node"] == n),
                "rss_growth": sum(r["peak_rss"] - r["base_rss"] for r in ranks if r["node"] == n),
            }
            for n in nodes
        }
        out[f"{run['planner']} {run['mode']}"] = {
            "save_s": max(r["seconds"] for r in ranks),
            "nodes": per_node,
            "busiest_bytes": max(v["bytes"] for v in per_node.values()),
            "busiest_rss": max(v["peak_rss"] for v in per_node.values()),
            "busiest_rss_growth": max(v["rss_growth"] for v in per_node.values()),
            "total_bytes": sum(v["bytes"] for v in per_node.values()),
        }
    return out


def launch(args: argparse.Namespace, work: Path) -> list[dict[str, Any]]:
    from bench.netns import Topology
    from bench.pcache_cluster import BridgeS3Server
    from tests.servers.s3_process import write_config

    topo = Topology(prefix="ckb", subnet="10.78.0", count=args.nodes, rate=args.rate)
    topo.check_privileges()
    topo.teardown()
    topo.setup()
    try:
        with BridgeS3Server(work / "s3", topo.host_address) as s3:
            s3.create_bucket(BUCKET)
            config = write_config(work / "objstore.toml", s3=s3.profile(max_attempts=5))
            port = 29400 + os.getpid() % 500
            procs = []
            for i in range(1, args.nodes + 1):
                env = {
                    **os.environ, "OBJSTORE_CONFIG": str(config), "CKPT_NODE_ID": f"node{i}",
                    "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT),
                    # a fixed threshold: glibc's moving one (up to 32 MiB after a free) would let a
                    # run reuse heap an earlier run left, so growth would depend on the order
                    "MALLOC_MMAP_THRESHOLD_": "131072",
                    "GLOO_SOCKET_IFNAME": topo.ns_veth(i),  # not the namespace's loopback
                }  # fmt: skip
                cmd = [
                    "ip", "netns", "exec", topo.netns(i),
                    sys.executable, "-m", "torch.distributed.run",
                    "--nnodes", str(args.nodes), "--node-rank", str(i - 1),
                    "--nproc-per-node", str(node_ranks(args)[i - 1]),
                    "--master-addr", topo.address(1), "--master-port", str(port),
                    str(Path(__file__).resolve()), "--worker",
                    "--planners", args.planners, "--ep", str(args.ep),
                    "--vocab", str(args.vocab), "--d-model", str(args.d_model),
                    "--layers", str(args.layers), "--experts", str(args.experts),
                    "--expert-hidden", str(args.expert_hidden),
                ]  # fmt: skip
                log = open(work / f"node{i}.log", "w")  # noqa: SIM115 - closed below
                procs.append((subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                               stderr=log, text=True), log))  # fmt: skip
            outputs = []
            for proc, log in procs:
                out, _ = proc.communicate(timeout=args.timeout)
                log.close()
                outputs.append(out)
                if proc.returncode != 0:
                    tail = (work / f"node{len(outputs)}.log").read_text()[-2000:]
                    raise RuntimeError(f"node {len(outputs)} failed ({proc.returncode}):\n{tail}")
            for out in outputs:
                for line in out.splitlines():
                    if line.startswith("BENCH "):
                        return list(json.loads(line[len("BENCH ") :]))
            raise RuntimeError("no results from rank 0")
    finally:
        topo.teardown()


def ranks_per_node(text: str) -> tuple[int, ...]:
    """``4`` or ``6,2,4,4``: positive rank counts."""
    try:
        counts = tuple(int(part) for part in text.split(","))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a count or a list of counts: {text!r}") from None
    if not counts or min(counts) < 1:
        raise argparse.ArgumentTypeError(f"rank counts must be >= 1: {text!r}")
    return counts


def node_ranks(args: argparse.Namespace) -> list[int]:
    """The rank count of each node, 1-based order."""
    counts = list(args.ranks_per_node)
    if len(counts) == 1:
        return counts * args.nodes
    if len(counts) != args.nodes:
        raise ValueError(f"--ranks-per-node names {len(counts)} nodes, --nodes is {args.nodes}")
    return counts


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument(
        "--rate",
        default="100mbit",
        help="per-node link cap (tc htb); 100mbit keeps the links, not this 2-core host's CPU "
        "(16 ranks and the S3 server share it), the bottleneck",
    )
    parser.add_argument("--nodes", type=int, default=4)
    parser.add_argument(
        "--ranks-per-node",
        type=ranks_per_node,
        default=(4,),
        help="ranks on every node (4), or one count per node (6,2,4,4: nodes of unequal size, "
        "as a job placed on partly-free machines gets)",
    )
    parser.add_argument("--planners", default=",".join(PLANNERS))
    parser.add_argument("--ep", type=int, default=8, help="expert-parallel size")
    parser.add_argument("--vocab", type=int, default=16_384)
    parser.add_argument("--d-model", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--experts", type=int, default=32)
    parser.add_argument("--expert-hidden", type=int, default=512)
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    try:
        world = sum(node_ranks(args))
    except ValueError as e:
        parser.error(str(e))
    if world % args.ep:
        parser.error(f"the world size ({world}) must be a multiple of --ep ({args.ep})")
    if args.worker:
        code = worker(args)
        sys.stdout.flush()
        os._exit(code)  # see ckpt.trainer.__main__: no native-teardown aborts after the work
    with tempfile.TemporaryDirectory(prefix="ckpt-bench-", dir="/var/tmp") as tmp:
        runs = launch(args, Path(tmp))
    summary = summarize(runs)
    if args.json:
        print(json.dumps(summary, indent=2))
        return 0
    gib = 2**30
    total = next(iter(summary.values()))["total_bytes"]
    # equal links: no placement can put less than an equal share on the busiest node
    bound = total / args.nodes
    layout = "+".join(map(str, node_ranks(args)))
    print(
        f"checkpoint {total / gib:.2f} GiB, {args.nodes} nodes ({layout} ranks), links capped "
        f"at {args.rate}, EP {args.ep}; lower bound on the busiest node {bound / gib:.2f} GiB"
    )
    print(f"{'planner / mode':<17} | {'save (s)':>8} | {'busiest node (GiB)':>18} | "
          f"{'over bound':>10} | {'busiest node RSS: peak / growth (GiB)':>37} | "
          f"bytes per node (GiB)")  # fmt: skip
    for name, s in summary.items():
        per = " ".join(f"{v['bytes'] / gib:.2f}" for v in s["nodes"].values())
        rss = f"{s['busiest_rss'] / gib:.2f} / {s['busiest_rss_growth'] / gib:.2f}"
        over = s["busiest_bytes"] / bound
        print(f"{name:<17} | {s['save_s']:>8.2f} | {s['busiest_bytes'] / gib:>18.2f} | "
              f"{over:>9.2f}x | {rss:>37} | {per}")  # fmt: skip
    torch_run = summary.get("torch sync")
    if torch_run:
        # the link time scales with the busiest node's bytes: the best any placement can do
        floor = bound / torch_run["busiest_bytes"]
        print(f"best possible node-aware / torch at this layout (bound / torch's busiest node): "
              f"{floor:.2f}x")  # fmt: skip
    for mode in ("sync", "async"):
        aware = summary.get(f"node-aware {mode}")
        for peer, target in (("megatron", 0.5), ("torch", 0.8)):
            other = summary.get(f"{peer} {mode}")
            if aware and other:
                r = aware["save_s"] / other["save_s"]
                print(f"{mode} save time, node-aware / {peer}: {r:.2f}x (target <= {target}x: "
                      f"{'PASS' if r <= target else 'FAIL'})")  # fmt: skip
    aware, megatron = summary.get("node-aware async"), summary.get("megatron async")
    if aware and megatron:
        # the model itself lives in host memory here (CPU training); on GPUs the host memory a
        # save needs is its staging, which is what the growth during the save measures
        g = aware["busiest_rss_growth"] / max(1, megatron["busiest_rss_growth"])
        r = aware["busiest_rss"] / megatron["busiest_rss"]
        print(f"busiest node's memory growth during an async save, node-aware / megatron: "
              f"{g:.2f}x (target <= 0.5x: {'PASS' if g <= 0.5 else 'FAIL'}); "
              f"peak RSS including the model {r:.2f}x")  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
