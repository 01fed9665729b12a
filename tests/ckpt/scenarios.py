"""What each rank of a multi-process ckpt test runs (``torchrun ... -m tests.ckpt.scenarios``).

The state dict imitates a Megatron MoE rank's: dense weights replicated on every rank, and
experts split over the ranks (each expert on exactly one rank), all values derived from their
names so any rank of any world size can check what it loaded. ``$CKPT_TEST_RANKS_PER_NODE``
makes consecutive ranks share a simulated node. The coordinator prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import zlib

import torch
import torch.distributed as dist

EXPERTS = 8
DENSE = {"embed.weight": (64, 32), "attn.qkv": (96, 32), "norm.weight": (32,), "head.w": (32, 64)}
EXPERT_SHAPE = (48, 32)


def value(name: str, shape: tuple[int, ...]) -> torch.Tensor:
    gen = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    return torch.randn(*shape, generator=gen)


def experts_of(rank: int, world: int) -> list[int]:
    per = EXPERTS // world
    return list(range(rank * per, (rank + 1) * per))


def state_dict(rank: int, world: int, *, empty: bool = False) -> dict:
    def t(name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(*shape) if empty else value(name, shape)

    model = {name: t(name, shape) for name, shape in DENSE.items()}
    for e in experts_of(rank, world):
        model[f"experts.{e}.w"] = t(f"experts.{e}.w", EXPERT_SHAPE)
    optim = {f"exp_avg.{name}": t(f"m.{name}", shape) for name, shape in DENSE.items()}
    return {"model": model, "optim": optim, "step": 0 if empty else 42}


def check(sd: dict, rank: int, world: int) -> list[str]:
    wrong = []
    expected = state_dict(rank, world)
    for group in ("model", "optim"):
        for name, tensor in expected[group].items():
            if not torch.equal(sd[group][name], tensor):
                wrong.append(f"{group}.{name}")
    if sd["step"] != 42:
        wrong.append("step")
    return wrong


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["save", "load", "crash"])
    parser.add_argument("url")
    parser.add_argument("--planner", default="node-aware")
    parser.add_argument("--verify", action="store_true")
    parser.add_argument("--async-save", action="store_true")
    args = parser.parse_args()
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    per_node = int(os.environ.get("CKPT_TEST_RANKS_PER_NODE", "1"))
    os.environ["CKPT_NODE_ID"] = f"node{rank // per_node}"
    dist.init_process_group("gloo")
    from ckpt.api import AsyncSaver, load, save
    from ckpt.storage import CheckpointError, Writer

    report: dict = {"rank": rank}
    try:
        if args.action == "save":
            sd = state_dict(rank, world)
            if args.async_save:
                saver = AsyncSaver(planner=args.planner)
                handle = saver.save(sd, args.url)
                for tensor in sd["model"].values():  # training goes on: the save has its copy
                    tensor.add_(1000.0)
                result = handle.result()
                saver.close()
                report["staged_bytes"] = handle.staged_bytes
            else:
                result = save(sd, args.url, planner=args.planner)
            report["bytes_written"] = result.bytes_written
            if result.placement is not None:
                report["node_bytes"] = result.placement.node_bytes
                report["lower_bound"] = result.placement.lower_bound
        elif args.action == "crash":

            def die(self: Writer, *a: object, **k: object) -> None:
                os._exit(17)  # the coordinator dies after every file, before .metadata

            Writer.finish = die  # type: ignore[method-assign]
            save(state_dict(rank, world), args.url, planner=args.planner)
        else:
            sd = state_dict(rank, world, empty=True)
            result = load(sd, args.url, verify=args.verify)
            report["wrong"] = check(sd, rank, world)
            report["bytes_read"] = result.bytes_read
            report["items_shared"] = result.items_shared
    except CheckpointError as exc:
        report["error"] = f"{type(exc).__name__}: {exc}"
    gathered: list = [None] * world
    dist.all_gather_object(gathered, report)
    if rank == 0:
        print("RESULT " + json.dumps(gathered), flush=True)
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    code = main()
    sys.stdout.flush()
    sys.stderr.flush()
    # skip interpreter teardown: native libraries' static destructors (gloo, awscrt) racing at
    # exit can abort a process whose work is done (see docs/ckpt.md)
    os._exit(code)
