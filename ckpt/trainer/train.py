"""The training loop: groups as Megatron lays them out, token shards, checkpoints through ckpt.

``torchrun --nproc-per-node N -m ckpt.trainer --data URL --ckpt-root URL --steps S --save-every K``
(or ``ckpt train --config FILE``). Tensor and pipeline parallel sizes are 1, so the data-parallel
group is the world; expert-parallel groups are consecutive blocks of ``--ep`` ranks and
expert-data-parallel groups the ranks with the same place in them. Dense gradients are averaged
over the world, an expert's over its expert-data-parallel group (scaled to the same mean).

Every batch depends only on (seed, step, rank), and the optimizer state is saved with the
weights, so ``--resume auto`` continues from the newest complete checkpoint exactly as the
uninterrupted run would have.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import tomllib
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..api import AsyncSaver, latest, load, save, step_url
from .data import TokenData
from .model import ModelConfig, MoEDecoder, is_expert_param

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TrainConfig:
    """The ``[train]`` table of ``ckpt train --config`` (flags of the same names override).

    Attributes:
        data: token shards: a local path, an objstore URL or a pcache mount.
        ckpt_root: where ``step-NNNNNNNN/`` checkpoints go (any objstore URL or ``pcache://``).
        steps: optimizer steps to run in total (a resumed run continues up to it).
        save_every: steps between checkpoints.
        batch_size: samples per rank per step.
        ep: expert-parallel size; data-parallel size is world size / ``ep`` for experts.
        lr: AdamW learning rate.
        seed: seeds the model and the data order (the same on every rank).
        planner: ``node-aware``, ``megatron`` or ``torch``: who writes replicated items.
        resume: ``auto`` continues from the newest complete checkpoint; ``none`` starts over.
        async_save: write checkpoints in the background while training goes on.
        verify_load: check every item's CRC when resuming.
        simulate_nodes: split the ranks into this many "nodes" (one-machine tests and demos).
        report: write a JSON summary here (rank 0).
        model: the ``[model]`` table.
    """

    data: str = ""
    ckpt_root: str = ""
    steps: int = 20
    save_every: int = 10
    batch_size: int = 4
    ep: int = 1
    lr: float = 3e-3
    seed: int = 1234
    planner: str = "node-aware"
    resume: str = "auto"  # auto | none
    async_save: bool = False
    verify_load: bool = True
    simulate_nodes: int = 0  # >0: ranks split into this many "nodes" (tests, one machine)
    report: str = ""  # write a JSON summary here (rank 0)
    model: ModelConfig = field(default_factory=ModelConfig)


def load_config(path: str | None, overrides: dict[str, Any]) -> TrainConfig:
    """A TrainConfig from a TOML file (``[train]`` and ``[model]`` tables) and flag overrides.

    Raises:
        ValueError: an unknown key.
    """
    table: dict[str, Any] = {}
    model: dict[str, Any] = {}
    if path:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
        table, model = dict(raw.get("train", {})), dict(raw.get("model", {}))
        unknown = set(raw) - {"train", "model"}
        if unknown:
            raise ValueError(f"{path}: unknown tables {sorted(unknown)}")
    table.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(TrainConfig)} - {"model"}
    if set(table) - known:
        raise ValueError(f"unknown training options {sorted(set(table) - known)}")
    model_known = {f.name for f in dataclasses.fields(ModelConfig)}
    if set(model) - model_known:
        raise ValueError(f"unknown model options {sorted(set(model) - model_known)}")
    return TrainConfig(**table, model=ModelConfig(**model))


def expert_groups(rank: int, world: int, ep: int) -> tuple[Any, Any]:
    """This rank's expert-parallel group (consecutive blocks of ``ep`` ranks) and expert-data-
    parallel group (the ranks at the same place in every block), as Megatron lays them out with
    tensor and pipeline parallel sizes 1. Collective: every rank creates every group, in order."""
    ep_group = edp_group = None
    for k in range(world // ep):
        g = dist.new_group(list(range(k * ep, (k + 1) * ep)))
        if rank // ep == k:
            ep_group = g
    for e in range(ep):
        g = dist.new_group(list(range(e, world, ep)))
        if rank % ep == e:
            edp_group = g
    return ep_group, edp_group


def training_state(
    model: torch.nn.Module, optim: torch.optim.Optimizer, progress: dict[str, Any]
) -> dict[str, Any]:
    """Model and AdamW state, named so replicas match across ranks (dense weights on every rank,
    an expert, named by its global id, on its expert-data-parallel group)."""
    params = dict(model.named_parameters())
    state: dict[str, Any] = {}
    for name, p in params.items():
        st = optim.state.get(p)
        if not st:  # before the first step: the shapes a loaded state fills
            st = optim.state[p] = {
                "step": torch.zeros(()),
                "exp_avg": torch.zeros_like(p),
                "exp_avg_sq": torch.zeros_like(p),
            }
        state[name] = {"exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"], "step": st["step"]}
    return {"model": {n: p.data for n, p in params.items()}, "optim": state, "progress": progress}


class Trainer:
    def __init__(self, cfg: TrainConfig) -> None:
        self.cfg = cfg
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        if self.world % cfg.ep:
            raise ValueError(f"--ep {cfg.ep} does not divide the world size {self.world}")
        ep = cfg.ep
        self.ep_group, self.edp_group = expert_groups(self.rank, self.world, ep)
        self.model = MoEDecoder(
            cfg.model, ep_group=self.ep_group, ep_rank=self.rank % ep, ep_size=ep
        )
        self.optim = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=0.01)
        self.data = TokenData(cfg.data)
        self.step = 0
        self.losses: list[float] = []

    # -- state -------------------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        return training_state(
            self.model, self.optim, {"step": self.step, "losses": list(self.losses)}
        )

    def resume(self) -> int | None:
        found = (
            latest(self.cfg.ckpt_root) if self.cfg.resume == "auto" and self.cfg.ckpt_root else None
        )
        if found is None:
            return None
        step, url = found
        sd = self.state_dict()
        load(sd, url, verify=self.cfg.verify_load)
        self.step = int(sd["progress"]["step"])
        self.losses = list(sd["progress"]["losses"])
        return step

    # -- training ----------------------------------------------------------------------------

    def train_step(self) -> float:
        tokens = self.data.batch(self.cfg.seed, self.step, self.rank, self.cfg.batch_size,
                                 self.cfg.model.seq_len + 1)  # fmt: skip
        lm, aux = self.model(tokens[:, :-1], tokens[:, 1:])
        self.optim.zero_grad(set_to_none=False)
        (lm + aux).backward()
        self._sync_grads()
        self.optim.step()
        self.step += 1
        mean = lm.detach().clone()
        dist.all_reduce(mean)
        loss = float(mean) / self.world
        self.losses.append(loss)
        return loss

    def _sync_grads(self) -> None:
        for name, p in self.model.named_parameters():
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            group = self.edp_group if is_expert_param(name) else None
            dist.all_reduce(p.grad, group=group)
            p.grad.div_(self.world)

    def run(self) -> dict[str, Any]:
        cfg = self.cfg
        resumed = self.resume()
        saver = AsyncSaver(planner=cfg.planner) if cfg.async_save else None
        saves = []
        started = time.perf_counter()
        while self.step < cfg.steps:
            loss = self.train_step()
            if self.rank == 0:
                log.info("step %d loss %.4f", self.step, loss)
            if cfg.ckpt_root and cfg.save_every and self.step % cfg.save_every == 0:
                url = step_url(cfg.ckpt_root, self.step)
                if saver is not None:
                    t0 = time.perf_counter()
                    saver.save(self.state_dict(), url)
                    saves.append(
                        {"step": self.step, "blocked_s": time.perf_counter() - t0, "url": url}
                    )
                else:
                    result = save(self.state_dict(), url, planner=cfg.planner)
                    saves.append({"step": self.step, "seconds": result.seconds, "url": url,
                                  "node_bytes": result.placement.node_bytes if result.placement else None})  # fmt: skip
        if saver is not None:
            saver.close()
        return {
            "resumed_from": resumed,
            "steps": self.step,
            "losses": self.losses,
            "saves": saves,
            "seconds": time.perf_counter() - started,
            "world": self.world,
            "ep": cfg.ep,
            "param_digest": self.param_digest(),
        }

    def param_digest(self) -> float:
        """A number that changes with any parameter (the same on every rank for dense ones)."""
        with torch.no_grad():
            return float(sum(p.double().pow(2).sum() for p in self.model.parameters()))


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ckpt train", description="Train the bundled MoE; checkpoint through ckpt."
    )
    p.add_argument("--config", help="TOML file with [train] and [model] tables")
    p.add_argument("--data", help="token shards: a local path, an objstore URL or a pcache mount")
    p.add_argument("--ckpt-root", dest="ckpt_root", help="where step-NNNNNNNN/ checkpoints go")
    p.add_argument("--steps", type=int)
    p.add_argument("--save-every", dest="save_every", type=int)
    p.add_argument("--batch-size", dest="batch_size", type=int)
    p.add_argument("--ep", type=int, help="expert-parallel size")
    p.add_argument("--planner", choices=["node-aware", "megatron", "torch"])
    p.add_argument("--resume", choices=["auto", "none"])
    p.add_argument("--async-save", dest="async_save", action="store_const", const=True)
    p.add_argument("--simulate-nodes", dest="simulate_nodes", type=int)
    p.add_argument("--report", help="write a JSON summary here (rank 0)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = vars(build_parser().parse_args(argv))
    config_path = args.pop("config")
    try:
        cfg = load_config(config_path, args)
    except (OSError, ValueError, tomllib.TOMLDecodeError) as exc:
        print(f"ckpt train: {exc}", file=sys.stderr)
        return 2
    rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
    if cfg.simulate_nodes > 0:
        os.environ["CKPT_NODE_ID"] = f"sim-node-{rank * cfg.simulate_nodes // world}"
    logging.basicConfig(level=logging.INFO if rank == 0 else logging.WARNING,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")  # fmt: skip
    if not dist.is_initialized():
        if "MASTER_ADDR" not in os.environ:  # one process, outside torchrun
            import socket

            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            os.environ.update(
                MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1"
            )
        dist.init_process_group("gloo")
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(1)
    summary = Trainer(cfg).run()
    if dist.get_rank() == 0:
        text = json.dumps(summary)
        if cfg.report:
            with open(cfg.report, "w") as f:
                f.write(text)
        print("SUMMARY " + text, flush=True)
    dist.destroy_process_group()
    return 0
