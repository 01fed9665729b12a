"""Save planners for ``torch.distributed.checkpoint`` that choose who writes replicated items.

torch's :class:`~torch.distributed.checkpoint.DefaultSavePlanner` removes duplicates by giving each
replicated item to the rank with the least planned bytes so far, in state-dict order; Megatron gives
it to rank 0 of the data-parallel group. Neither knows that ranks share nodes, and a node's NIC and
host memory are what a save is limited by. :class:`NodeAwareSavePlanner` places by node (see
:mod:`ckpt.placement`); :class:`MegatronDefaultPlanner` reproduces Megatron's choice, for
comparison. Both are ordinary DCP planners: ``dcp.save(sd, storage_writer=w,
planner=NodeAwareSavePlanner())`` works with any storage writer.

Call order (DCP's): every rank ``set_up_planner`` (the first call per process group gathers the
topology: a collective) -> ``create_local_plan``; the coordinator ``create_global_plan`` (the
placement happens here) -> every rank ``finish_plan``.
"""

from __future__ import annotations

import logging
from typing import Any

from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, WriteItemType

from .placement import Item, Placement, place
from .topology import Topology, discover

log = logging.getLogger(__name__)

BYTES_ITEM_SIZE = 1024  # a pickled object's size is unknown until written: count it as small


def plan_items(plans: list[SavePlan]) -> list[Item]:
    """Every distinct item of the ranks' local plans, with its size and holders."""
    holders: dict[MetadataIndex, list[int]] = {}
    sizes: dict[MetadataIndex, int] = {}
    for rank, plan in enumerate(plans):
        for wi in plan.items:
            holders.setdefault(wi.index, []).append(rank)
            if wi.index not in sizes:
                size = wi.tensor_storage_size() if wi.type != WriteItemType.BYTE_IO else None
                sizes[wi.index] = size if size else BYTES_ITEM_SIZE
    return [Item(index, sizes[index], tuple(ranks)) for index, ranks in holders.items()]


def apply_placement(plans: list[SavePlan], placement: Placement) -> list[SavePlan]:
    """Each rank's plan keeps only the items it was chosen to write."""
    import dataclasses

    return [
        dataclasses.replace(
            plan, items=[wi for wi in plan.items if placement.writer[wi.index] == rank]
        )
        for rank, plan in enumerate(plans)
    ]


class _PlacingSavePlanner(DefaultSavePlanner):
    policy = ""

    def __init__(self, *, topology: Topology | None = None, group: Any = None, **kwargs: Any):
        super().__init__(**kwargs)
        self._topology = topology
        self._group = group
        self.last_placement: Placement | None = None

    def set_up_planner(
        self,
        state_dict: Any,
        storage_meta: StorageMeta | None = None,
        is_coordinator: bool = False,
    ) -> None:
        if self._topology is None:
            self._topology = discover(self._group)
        super().set_up_planner(state_dict, storage_meta, is_coordinator)

    def _dedup_save_plans(self, all_plans: list[SavePlan]) -> list[SavePlan]:
        topology = self._topology or discover(self._group)
        if topology.world_size != len(all_plans):
            raise ValueError(
                f"topology has {topology.world_size} ranks but {len(all_plans)} plans arrived"
            )
        placement = place(plan_items(all_plans), topology.nodes, self.policy)
        self.last_placement = placement
        log.info("checkpoint placement %s", placement.summary())
        return apply_placement(all_plans, placement)


class NodeAwareSavePlanner(_PlacingSavePlanner):
    """Spreads replicated items over nodes: the busiest node's bytes end near the lower bound.

    Args:
        topology: the node of every rank; default: gathered from ``group`` on first use.
        group: the process group the save runs on (default: the world).
        **kwargs: passed to :class:`DefaultSavePlanner`.
    """

    policy = "node_aware"


class MegatronDefaultPlanner(_PlacingSavePlanner):
    """Megatron's choice, as a baseline: the lowest rank holding a replicated item (rank 0 of
    its data-parallel group) writes it."""

    policy = "lowest_rank"


PLANNERS = {
    "node-aware": NodeAwareSavePlanner,
    "megatron": MegatronDefaultPlanner,
    "torch": DefaultSavePlanner,
}


def make_planner(name: str, **kwargs: Any) -> DefaultSavePlanner:
    """A save planner by name: ``node-aware``, ``megatron`` or ``torch``."""
    try:
        cls = PLANNERS[name]
    except KeyError:
        raise ValueError(f"unknown planner {name!r} (expected one of {sorted(PLANNERS)})") from None
    return cls(**kwargs) if cls is not DefaultSavePlanner else cls()
