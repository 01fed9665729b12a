"""Which rank writes each checkpoint item: the placement policies, on plain data.

A distributed checkpoint's items are either held by one rank (its own shard: an expert's weights
on its expert-parallel rank) or replicated on several (dense weights and their Adam states on every
data-parallel rank). Every item must be written exactly once; who writes a replicated item is the
choice. Megatron's default gives it to rank 0 of its data-parallel group (the lowest holder), and
since those ranks sit on the same few physical nodes, those nodes' NICs and memory do all the work.

:func:`place` assigns every item, given the node of every rank, under one of the policies:

- ``node_aware``: charge every rank and node with the bytes only it holds; then place replicated
  items largest first on the holder whose node is least loaded (which is the holder that minimizes
  the maximum node load), then whose rank is least loaded, ties broken by a hash of the item and
  rank (deterministic, and never "the lowest rank" by default);
- ``lowest_rank``: Megatron's default.

The result carries the per-node and per-rank bytes and a lower bound on the busiest node's bytes,
so callers can log how far from optimal a placement is. The planners (:mod:`ckpt.planner`) and the
scale simulator (``bench/sim/placement_sim.py``) both call this code; nothing here knows about
torch. Placing an item scans its holders' nodes (grouped once per distinct holder set) in C-level
loops, so that jobs of thousands of ranks place in seconds.
"""

from __future__ import annotations

import itertools
import logging
import operator
import zlib
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field

log = logging.getLogger(__name__)

POLICIES = ("node_aware", "lowest_rank")


@dataclass(frozen=True)
class Item:
    """One checkpoint item: its identity, its size in bytes and the ranks that hold it."""

    key: Hashable
    size: int
    holders: tuple[int, ...]


@dataclass
class Placement:
    """The writer of every item and the load that results.

    Attributes:
        writer: item key -> the rank that writes it.
        rank_bytes: bytes each rank writes.
        node_bytes: bytes each node writes.
        lower_bound: no placement can give the busiest node fewer bytes than this.
    """

    writer: dict[Hashable, int]
    rank_bytes: list[int]
    node_bytes: dict[str, int]
    lower_bound: int
    policy: str = ""
    replicated_items: int = 0
    notes: dict[str, float] = field(default_factory=dict)

    @property
    def max_node_bytes(self) -> int:
        return max(self.node_bytes.values(), default=0)

    @property
    def mean_node_bytes(self) -> float:
        return sum(self.node_bytes.values()) / len(self.node_bytes) if self.node_bytes else 0.0

    @property
    def imbalance(self) -> float:
        """Busiest node over the mean (1.0 is perfect)."""
        mean = self.mean_node_bytes
        return self.max_node_bytes / mean if mean else 1.0

    @property
    def over_lower_bound(self) -> float:
        """Busiest node over the lower bound (1.0 is optimal)."""
        return self.max_node_bytes / self.lower_bound if self.lower_bound else 1.0

    def summary(self) -> str:
        return (
            f"{self.policy}: busiest node {self.max_node_bytes / 2**20:,.1f} MiB, "
            f"mean {self.mean_node_bytes / 2**20:,.1f} MiB ({self.imbalance:.3f}x), "
            f"lower bound {self.lower_bound / 2**20:,.1f} MiB ({self.over_lower_bound:.3f}x)"
        )


class _Holders:
    """The ranks holding some replicated items, grouped by node: built once per distinct holder
    tuple (a data-parallel group holds hundreds of items), so that choosing a writer scans the
    group's nodes, in C-level loops, and not its ranks."""

    __slots__ = ("load_of", "nodes", "ranks_on")

    def __init__(self, holders: tuple[int, ...], node_of: list[int]) -> None:
        ranks_on: dict[int, list[int]] = {}
        for rank in holders:
            ranks_on.setdefault(node_of[rank], []).append(rank)  # in holder order
        self.ranks_on = ranks_on
        self.nodes = list(ranks_on)
        self.load_of = operator.itemgetter(*self.nodes) if len(self.nodes) > 1 else None

    def choose(
        self, key_repr: str, node_load: list[int], rank_bytes: list[int], rank_names: list[bytes]
    ) -> int:
        """The holder on the least loaded node, then the least loaded rank there, then the one
        with the least ``crc32(f"{key!r}|{rank}")``: ``min`` over the holders by ``(node load,
        rank load, that hash)``, the hash computed only for the ranks still tied (with equal item
        sizes, many are)."""
        if self.load_of is None:
            ranks = self.ranks_on[self.nodes[0]]
        else:
            loads = self.load_of(node_load)
            least = min(loads)
            if loads.count(least) == 1:
                ranks = self.ranks_on[self.nodes[loads.index(least)]]
            else:
                tied_nodes = itertools.compress(self.nodes, map(least.__eq__, loads))
                ranks = list(
                    itertools.chain.from_iterable(map(self.ranks_on.__getitem__, tied_nodes))
                )
        if len(ranks) == 1:
            return ranks[0]
        written = list(map(rank_bytes.__getitem__, ranks))
        least = min(written)
        if written.count(least) == 1:
            return ranks[written.index(least)]
        tied = list(itertools.compress(ranks, map(least.__eq__, written)))
        seed = zlib.crc32(f"{key_repr}|".encode())  # the common prefix, hashed once
        hashes = list(map(zlib.crc32, map(rank_names.__getitem__, tied), itertools.repeat(seed)))
        return tied[hashes.index(min(hashes))]


def place(
    items: Sequence[Item], node_of_rank: Sequence[str], policy: str = "node_aware"
) -> Placement:
    """Choose the writer of every item.

    Args:
        items: every item once, with all its holders (ranks index ``node_of_rank``).
        node_of_rank: the node id of each rank.
        policy: ``node_aware`` or ``lowest_rank``.

    Raises:
        ValueError: an unknown policy, an item without holders, or a holder out of range.
    """
    if policy not in POLICIES:
        raise ValueError(f"unknown placement policy {policy!r} (expected one of {POLICIES})")
    nranks = len(node_of_rank)
    node_ids = list(dict.fromkeys(node_of_rank))
    node_index = {node: i for i, node in enumerate(node_ids)}
    node_of = [node_index[node] for node in node_of_rank]
    node_load = [0] * len(node_ids)
    rank_bytes = [0] * nranks
    writer: dict[Hashable, int] = {}
    replicated: list[Item] = []
    lowest = policy == "lowest_rank"
    for item in items:
        if not item.holders:
            raise ValueError(f"checkpoint item {item.key!r} has no holder")
        first = min(item.holders)
        if first < 0 or max(item.holders) >= nranks:
            raise ValueError(f"checkpoint item {item.key!r} names a rank outside 0..{nranks - 1}")
        if len(item.holders) == 1 or lowest:
            writer[item.key] = first
            rank_bytes[first] += item.size
            node_load[node_of[first]] += item.size
        else:
            replicated.append(item)
    fixed = dict(zip(node_ids, node_load, strict=True))
    order = sorted((-it.size, repr(it.key), i) for i, it in enumerate(replicated))
    rank_names = [str(rank).encode() for rank in range(nranks)]
    groups: dict[tuple[int, ...], _Holders] = {}
    for _, key_repr, i in order:
        item = replicated[i]
        group = groups.get(item.holders)
        if group is None:
            group = groups[item.holders] = _Holders(item.holders, node_of)
        rank = group.choose(key_repr, node_load, rank_bytes, rank_names)
        writer[item.key] = rank
        rank_bytes[rank] += item.size
        node_load[node_of[rank]] += item.size
    return Placement(
        writer=writer,
        rank_bytes=rank_bytes,
        node_bytes=dict(zip(node_ids, node_load, strict=True)),
        lower_bound=lower_bound(items, node_of_rank, fixed if policy == "node_aware" else None),
        policy=policy,
        replicated_items=sum(1 for it in items if len(it.holders) > 1),
    )


def lower_bound(
    items: Sequence[Item], node_of_rank: Sequence[str], fixed: dict[str, int] | None = None
) -> int:
    """A lower bound on the busiest node's bytes under any placement: the largest of the mean
    node load, the largest load a node must carry alone, and, for every replicated item, the
    least its lightest holder node would then carry."""
    if fixed is None:
        fixed = dict.fromkeys(node_of_rank, 0)
        for item in items:
            if len(item.holders) == 1:
                fixed[node_of_rank[item.holders[0]]] += item.size
    nodes = len(set(node_of_rank)) or 1
    total = sum(item.size for item in items)
    bound = max(-(-total // nodes), max(fixed.values(), default=0))
    fixed_of_rank = [fixed[node] for node in node_of_rank]
    lightest: dict[tuple[int, ...], int] = {}  # per holder tuple: items share their groups
    for item in items:
        if len(item.holders) > 1:
            least = lightest.get(item.holders)
            if least is None:
                least = lightest[item.holders] = min(map(fixed_of_rank.__getitem__, item.holders))
            bound = max(bound, least + item.size)
    return bound
