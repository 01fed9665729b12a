"""Save planners for ``torch.distributed.checkpoint`` that choose who writes replicated items.

torch's :class:`~torch.distributed.checkpoint.DefaultSavePlanner` removes duplicates by giving each
replicated item to the rank with the least planned bytes so far, in state-dict order (counting a
shard as its whole tensor: ``WriteItem.tensor_storage_size``); Megatron gives it to rank 0 of the
data-parallel group. Neither knows that ranks share nodes, and a node's NIC and
host memory are what a save is limited by. :class:`NodeAwareSavePlanner` places by node (see
:mod:`ckpt.placement`); :class:`MegatronDefaultPlanner` reproduces Megatron's choice, for
comparison. Both are ordinary DCP planners: ``dcp.save(sd, storage_writer=w,
planner=NodeAwareSavePlanner())`` works with any storage writer.

Call order (DCP's): every rank ``set_up_planner`` (the first call per process group gathers the
topology: a collective) -> ``create_local_plan``; the coordinator ``create_global_plan`` (the
placement happens here) -> every rank ``finish_plan``.

The coordinator's work grows with ranks x items per rank: 8 million write items for a 290 B MoE on
5,000 ranks (``bench/sim/placement_sim.py``). Items are sized by their chunk, indexed in C-level
loops with replicas' plans recognized whole (:func:`index_plans`), and the global plan is checked by
:func:`validate_global_plan` in place of torch's check, which is quadratic in a tensor's chunks
when they are not cut along its largest dimension (Megatron's ``[layers, experts, ...]`` tensors).
"""

from __future__ import annotations

import collections
import dataclasses
import itertools
import logging
import math
import operator
from collections import ChainMap
from collections.abc import Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any

from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint.default_planner import (
    _validate_global_plan as _torch_validate_global_plan,
)
from torch.distributed.checkpoint.default_planner import create_default_global_save_plan
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    StorageMeta,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, WriteItem, WriteItemType

from .placement import Item, Placement, place
from .topology import Topology, discover

log = logging.getLogger(__name__)

BYTES_ITEM_SIZE = 1024  # a pickled object's size is unknown until written: count it as small


def write_item_bytes(wi: WriteItem) -> int:
    """The bytes ``wi`` writes: its chunk's, where torch's ``tensor_storage_size`` counts the whole
    tensor (a shard of a ``[layers, experts, ...]`` tensor is not that tensor's size)."""
    data = wi.tensor_data
    if wi.type == WriteItemType.BYTE_IO or data is None:
        return BYTES_ITEM_SIZE
    sizes = data.chunk.sizes if data.chunk is not None else data.size
    return math.prod(sizes) * data.properties.dtype.itemsize or BYTES_ITEM_SIZE


# An item's identity is its fqn and offset (MetadataIndex's own equality), read in C: keying the
# millions of write items of a large job by MetadataIndex would call its Python __hash__ and
# __eq__ once per item and replica, most of the time a coordinator spends.
_FQN = operator.attrgetter("index.fqn")
_OFFSET = operator.attrgetter("index.offset")


@dataclass
class PlanIndex:
    """The distinct items of the ranks' local plans, and which item each write item is.

    Attributes:
        items: every distinct item once, in order of first appearance, its key the first write
            item's ``MetadataIndex``, its holders in rank order.
        ids: for every plan, the id of each of its write items (plans of one kind share the
            list).
        item_ids: the id of each of ``items``.
    """

    items: list[Item]
    ids: list[list[int]]
    item_ids: list[int]


@dataclass
class _Kind:
    """Plans listing the same items in the same order (data-parallel replicas)."""

    fqns: list[str]
    offsets: list[Any]
    ids: list[int]
    ranks: list[int]


def index_plans(plans: Sequence[SavePlan]) -> PlanIndex:
    """Every distinct item of the ranks' local plans, with its size and holders.

    One pass over the write items, in C-level loops. A plan that lists the same items as an
    earlier one (a replica's) is recognized by comparing its fqn and offset lists, which costs
    less than hashing its items; Python code runs once per distinct item and per kind of plan.
    """
    ids: dict[tuple[str, Any], int] = {}
    counter = itertools.count()  # a new item's id: how many items were hashed before it
    hashed = 0
    firsts: list[tuple[int, WriteItem]] = []
    kinds: list[_Kind] = []
    by_ends: dict[tuple[Any, ...], list[_Kind]] = {}
    plan_ids: list[list[int]] = []
    for rank, plan in enumerate(plans):
        fqns = list(map(_FQN, plan.items))
        offsets = list(map(_OFFSET, plan.items))
        ends = (len(fqns), fqns[0], offsets[0], fqns[-1], offsets[-1]) if fqns else ()
        for kind in by_ends.get(ends, ()):
            if kind.fqns == fqns and kind.offsets == offsets:
                kind.ranks.append(rank)
                plan_ids.append(kind.ids)
                break
        else:
            mine = list(map(ids.setdefault, zip(fqns, offsets, strict=True), counter))
            if len(ids) > len(firsts):  # new items: those whose id is this plan's own count
                pairs = zip(mine, plan.items, strict=True)
                firsts += itertools.compress(pairs, map(hashed.__le__, mine))
            hashed += len(mine)
            kind = _Kind(fqns, offsets, mine, [rank])
            kinds.append(kind)
            by_ends.setdefault(ends, []).append(kind)
            plan_ids.append(mine)
    holders: dict[int, list[int]] = {item_id: [] for item_id, _ in firsts}
    for kind in kinds:
        collections.deque(
            map(list.extend, map(holders.__getitem__, kind.ids), repeat(kind.ranks)), 0
        )
    items = [Item(wi.index, write_item_bytes(wi), tuple(sorted(holders[i]))) for i, wi in firsts]
    return PlanIndex(items, plan_ids, [i for i, _ in firsts])


def plan_items(plans: Sequence[SavePlan]) -> list[Item]:
    """Every distinct item of the ranks' local plans, with its size and holders."""
    return index_plans(plans).items


def apply_placement(
    plans: Sequence[SavePlan], placement: Placement, index: PlanIndex | None = None
) -> list[SavePlan]:
    """Each rank's plan keeps only the items it was chosen to write (``index``: the plans'
    :func:`index_plans`, if already built)."""
    index = index if index is not None else index_plans(plans)
    writer_of = {
        i: placement.writer[it.key] for i, it in zip(index.item_ids, index.items, strict=True)
    }
    return [
        dataclasses.replace(
            plan,
            items=list(
                itertools.compress(
                    plan.items, map(operator.eq, map(writer_of.__getitem__, ids), repeat(rank))
                )
            ),
        )
        for rank, (plan, ids) in enumerate(zip(plans, index.ids, strict=True))
    ]


def _grid_errors(key: str, md: TensorStorageMetadata, whole: bool) -> list[str] | None:
    """torch's checks of one tensor's chunks (in bounds, not overlapping, filling the tensor when
    ``whole``), when the chunks are the cells of a grid: each spans exactly one interval between
    consecutive chunk boundaries in every dimension, and then two chunks overlap only by being
    the same cell. None when they are not (the caller falls back to torch). Column by column, in
    C-level loops: a large MoE has tens of thousands of chunks."""
    chunks = md.chunks
    errors: list[str] = []
    cells: list[list[int]] = []
    in_bounds = True
    for d, extent in enumerate(md.size):
        starts = [chunk.offsets[d] for chunk in chunks]
        lengths = [chunk.sizes[d] for chunk in chunks]
        ends = list(map(operator.add, starts, lengths))
        if chunks and (min(starts) < 0 or min(lengths) < 0 or max(ends) > extent):
            in_bounds = False
        position = {cut: i for i, cut in enumerate(sorted({*starts, *ends}))}
        first = list(map(position.__getitem__, starts))
        if list(map(position.__getitem__, ends)) != [i + 1 for i in first]:
            return None
        cells.append(first)
    if not in_bounds:
        errors += [
            f"key:{key} has out of bounds chunk: tensor-size:{md.size} chunk: {chunk}"
            for chunk in chunks
            if any(
                o < 0 or n < 0 or o + n > extent
                for o, n, extent in zip(chunk.offsets, chunk.sizes, md.size, strict=True)
            )
        ]
    seen: dict[tuple[int, ...], ChunkStorageMetadata] = {}
    for cell, chunk in zip(zip(*cells, strict=True), chunks, strict=True):
        other = seen.setdefault(cell, chunk)
        if other is not chunk:
            errors.append(f"key:{key} has overlapping chunks: {chunk} {other}")
    volume = sum(math.prod(chunk.sizes) for chunk in chunks)
    if whole and volume != math.prod(md.size):
        errors.append(
            f"key:{key} invalid fill tensor-volume: {math.prod(md.size)} chunks-volume: {volume}"
        )
    return errors


def validate_global_plan(global_plan: Sequence[SavePlan], metadata: Metadata) -> list[str]:
    """torch's ``_validate_global_plan`` (the errors it would list), in time linear in the chunks
    for tensors chunked on a grid (every DTensor, ShardedTensor and Megatron layout); torch's
    own code for any other tensor. torch sweeps along the largest dimension, and where the chunks
    are cut along others (a ``[layers, experts, ffn, hidden]`` tensor cut by layer and expert)
    every pair is compared: seconds per tensor, minutes per save, for a large MoE."""
    errors: list[str] = []
    whole = len(global_plan) > 1
    for key, md in metadata.state_dict_metadata.items():
        if isinstance(md, BytesStorageMetadata) or len(md.size) == 0:
            continue
        found = _grid_errors(key, md, whole)
        if found is None:
            found = _torch_validate_global_plan(list(global_plan), Metadata({key: md}))
        errors.extend(found)
    return errors


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
        index = index_plans(all_plans)
        placement = place(index.items, topology.nodes, self.policy)
        self.last_placement = placement
        log.info("checkpoint placement %s", placement.summary())
        return apply_placement(all_plans, placement, index)

    def _create_global_plan(self, all_plans: list[SavePlan]) -> tuple[list[SavePlan], Metadata]:
        # torch's own steps, with its plan validation replaced by validate_global_plan
        global_plan, metadata = create_default_global_save_plan(self._dedup_save_plans(all_plans))
        if self.flatten_state_dict:
            merged = dict(ChainMap(*[plan.planner_data for plan in global_plan]))
            metadata = dataclasses.replace(metadata, planner_data=merged)
        errors = validate_global_plan(global_plan, metadata)
        if errors:
            summary = "; ".join(errors)
            summary = summary[:500] + "... (truncated)" if len(summary) > 500 else summary
            raise ValueError(f"Failed to validate global plan: {summary}")
        return global_plan, metadata


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
