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
scale simulator both call this code; nothing here knows about torch.
"""

from __future__ import annotations

import logging
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


def _tiebreak(key: Hashable, rank: int) -> int:
    return zlib.crc32(f"{key!r}|{rank}".encode())


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
    rank_bytes = [0] * nranks
    node_bytes: dict[str, int] = dict.fromkeys(node_of_rank, 0)
    writer: dict[Hashable, int] = {}
    replicated: list[Item] = []
    for item in items:
        if not item.holders:
            raise ValueError(f"checkpoint item {item.key!r} has no holder")
        if min(item.holders) < 0 or max(item.holders) >= nranks:
            raise ValueError(f"checkpoint item {item.key!r} names a rank outside 0..{nranks - 1}")
        if len(item.holders) == 1 or policy == "lowest_rank":
            rank = min(item.holders)
            writer[item.key] = rank
            rank_bytes[rank] += item.size
            node_bytes[node_of_rank[rank]] += item.size
        else:
            replicated.append(item)
    fixed = dict(node_bytes)
    replicated.sort(key=lambda it: (-it.size, repr(it.key)))
    for item in replicated:
        size = item.size
        rank = min(
            item.holders,
            key=lambda r: (
                node_bytes[node_of_rank[r]] + size,  # the least loaded node: minimizes the max
                rank_bytes[r] + size,
                _tiebreak(item.key, r),
            ),
        )
        writer[item.key] = rank
        rank_bytes[rank] += size
        node_bytes[node_of_rank[rank]] += size
    placement = Placement(
        writer=writer,
        rank_bytes=rank_bytes,
        node_bytes=node_bytes,
        lower_bound=lower_bound(items, node_of_rank, fixed if policy == "node_aware" else None),
        policy=policy,
        replicated_items=sum(1 for it in items if len(it.holders) > 1),
    )
    return placement


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
    for item in items:
        if len(item.holders) > 1:
            bound = max(bound, min(fixed[node_of_rank[r]] for r in item.holders) + item.size)
    return bound
