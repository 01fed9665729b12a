"""Which physical node each rank runs on, learned once per process group.

Every rank contributes its node identity and local rank to one ``all_gather_object``; the result
is cached per process group, so planning a save costs no further collective. The identity is the
``CKPT_NODE_ID`` environment variable when set (tests and benchmarks run several "nodes" on one
machine that way), else the host name plus the machine id, so two containers on one host with the
same host name are still told apart only when their machine ids differ.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

NODE_ENV = "CKPT_NODE_ID"

_cache: dict[Any, Topology] = {}


def local_node_id() -> str:
    """This process's node identity (``$CKPT_NODE_ID``, else host name and machine id)."""
    override = os.environ.get(NODE_ENV, "").strip()
    if override:
        return override
    machine = ""
    for path in ("/etc/machine-id", "/var/lib/dbus/machine-id"):
        try:
            machine = Path(path).read_text().strip()[:12]
            break
        except OSError:
            continue
    host = socket.gethostname()
    return f"{host}-{machine}" if machine else host


@dataclass(frozen=True)
class Topology:
    """Node id and local rank of every rank of one process group (indexed by group rank)."""

    nodes: tuple[str, ...]
    local_ranks: tuple[int, ...]

    @property
    def world_size(self) -> int:
        return len(self.nodes)

    @property
    def node_ids(self) -> list[str]:
        """The distinct nodes, in order of their first rank."""
        return list(dict.fromkeys(self.nodes))

    def ranks_on(self, node: str) -> list[int]:
        return [r for r, n in enumerate(self.nodes) if n == node]

    @classmethod
    def from_nodes(cls, nodes: Sequence[str]) -> Topology:
        """A topology from node ids alone (local ranks counted in rank order)."""
        seen: dict[str, int] = {}
        local = []
        for node in nodes:
            local.append(seen.get(node, 0))
            seen[node] = local[-1] + 1
        return cls(tuple(nodes), tuple(local))


def discover(group: Any = None) -> Topology:
    """The topology of ``group`` (default: the world), gathered on first use and cached.

    Collective on the first call for a group: every rank of it must call. Outside
    ``torch.distributed`` (no process group) the topology is this process alone.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return Topology((local_node_id(),), (0,))
    key = group if group is not None else "world"
    cached = _cache.get(key)
    if cached is not None:
        return cached
    mine = (local_node_id(), int(os.environ.get("LOCAL_RANK", "0")))
    gathered: list[Any] = [None] * dist.get_world_size(group)
    dist.all_gather_object(gathered, mine, group=group)
    topology = Topology(tuple(g[0] for g in gathered), tuple(int(g[1]) for g in gathered))
    _cache[key] = topology
    log.info(
        "checkpoint topology: %d ranks on %d nodes", topology.world_size, len(topology.node_ids)
    )
    return topology
