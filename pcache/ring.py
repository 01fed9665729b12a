"""The weighted multi-probe hash ring: the order in which workers prefer a block.

Each node owns ``_POINTS`` points on a 64-bit ring (hashes of its id); a key has ``_PROBES``
probe positions. A node's score for a key is its smallest clockwise distance from a probe,
divided by its weight; the lowest score comes first. So a node is first for about its weight's
share of the keys, a node joining or leaving moves only the keys it gains or loses, and a key's
first candidates cost a few bisections of the precomputed ring, not a hash per node. The ring is
immutable and shared by everything that uses the same node list (:func:`ring_for`).
:mod:`pcache.selection` builds load balancing and health on top of this order.
"""

from __future__ import annotations

import functools
import hashlib
import math
import operator
import struct
from array import array
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from heapq import heapify, heappop, heappush, heapreplace
from itertools import repeat
from urllib.parse import urlsplit

__all__ = ["Node", "Ring", "check_unique_ids", "key_probes", "rendezvous_order", "ring_for"]

# Ring points per node and probes per key. A node's share of keys deviates from its weight's share
# by about 1 / sqrt(points * probes), 6%; the bounded-load cap absorbs that. More points cost memory
# and build time (10,000 nodes: 640,000 points, 8 MB, about a second), more probes lookup time.
_POINTS = 64
_PROBES = 4
_MASK64 = (1 << 64) - 1
_NODE_FORMAT = struct.Struct(f">{_POINTS}Q")
_KEY_FORMAT = struct.Struct(f">{_PROBES}Q")


@dataclass(frozen=True)
class Node:
    """One cache worker as clients see it.

    Attributes:
        node_id: Stable identity, the only hash input. Changing a worker's address keeps its keys.
        address: Base URL, ``http://host:port`` or ``https://host:port`` (a trailing slash is
            dropped).
        weight: Share of keys relative to other nodes; proportional to cache capacity.

    Raises:
        ValueError: The id is empty or holds a NUL, the weight is not a finite positive number,
            or the address is not ``http(s)://host:port``.
    """

    node_id: str
    address: str
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not isinstance(self.node_id, str) or not self.node_id or "\0" in self.node_id:
            raise ValueError(
                f"node id must be a non-empty string without NUL, got {self.node_id!r}"
            )
        weight = self.weight
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ValueError(f"node {self.node_id!r}: weight must be a number, got {weight!r}")
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"node {self.node_id!r}: weight must be > 0, got {weight!r}")
        if not _valid_address(self.address):
            raise ValueError(
                f"node {self.node_id!r}: address must be http(s)://host:port, got {self.address!r}"
            )
        # One spelling per worker, so clients can append paths and equal nodes compare equal.
        object.__setattr__(self, "address", self.address.rstrip("/"))


def _valid_address(address: object) -> bool:
    if not isinstance(address, str):
        return False
    try:
        parts = urlsplit(address)
        port = parts.port
    except ValueError:
        return False
    return (
        parts.scheme in ("http", "https")
        and bool(parts.hostname)
        and port is not None
        and parts.username is None
        and parts.password is None
        and parts.path in ("", "/")
        and not parts.query
        and not parts.fragment
    )


def check_unique_ids(nodes: Iterable[Node]) -> None:
    """Reject a node list in which two nodes share an id.

    Raises:
        ValueError: A duplicate id, named in a one-line message.
    """
    seen: set[str] = set()
    for node in nodes:
        if node.node_id in seen:
            raise ValueError(f"duplicate node id {node.node_id!r}")
        seen.add(node.node_id)


@functools.lru_cache(maxsize=65536)
def _node_digest(node_id: str) -> bytes:
    """The node's ring points, packed: ``_POINTS`` 64-bit big-endian integers."""
    prefix = node_id.encode() + b"\0"
    return b"".join(
        hashlib.blake2b(
            prefix + i.to_bytes(4, "big"), digest_size=64, person=b"pcache.node"
        ).digest()
        for i in range(_POINTS // 8)
    )


def key_probes(block_key: str) -> tuple[int, ...]:
    """The key's ``_PROBES`` ring positions."""
    digest = hashlib.blake2b(block_key.encode(), digest_size=8 * _PROBES, person=b"pcache.key")
    return _KEY_FORMAT.unpack(digest.digest())


class Ring:
    """The ring of one node list (ids sorted, so the input order never matters); immutable.

    Node ``o`` (its index in ``ids``) owns ``_POINTS`` positions; scores as `rendezvous_order`.
    ``pos``/``own`` hold all points sorted with their owners (to walk outward from a probe),
    ``node_pts`` each node's own sorted points (to score every node at once). ``table[k]`` is the
    first point whose top bits are at least ``k``: a probe's place bisects ~16 points, not all.
    """

    __slots__ = ("ids", "index", "node_pts", "own", "pos", "shift", "table", "weights", "wmax")

    def __init__(self, spec: tuple[tuple[str, float], ...]) -> None:
        self.ids = tuple(node_id for node_id, _ in spec)
        self.weights = [weight for _, weight in spec]
        self.wmax = max(self.weights, default=1.0)
        self.index = {node_id: o for o, node_id in enumerate(self.ids)}
        node_pts = array("Q")
        packed: list[int] = []
        shift, mask = operator.lshift, operator.or_
        for o, node_id in enumerate(self.ids):
            points = sorted(_NODE_FORMAT.unpack(_node_digest(node_id)))
            node_pts.extend(points)
            packed.extend(map(mask, map(shift, points, repeat(32)), repeat(o)))
        packed.sort()  # by position, then owner
        self.pos = array("Q", map(operator.rshift, packed, repeat(32)))
        self.own = array("I", map(operator.and_, packed, repeat(0xFFFFFFFF)))
        self.node_pts = node_pts
        bits = max(0, len(packed).bit_length() - 4)
        self.shift = 64 - bits
        self.table = array("I", (bisect_left(self.pos, k << self.shift) for k in range(1 << bits)))
        self.table.append(len(packed))

    def start(self, x: int) -> int:
        """Index of the first point at or after position ``x``, clockwise (0 past the last)."""
        k = x >> self.shift
        i = bisect_left(self.pos, x, self.table[k], self.table[k + 1])
        return 0 if i == len(self.pos) else i

    def walk(self, xs: Sequence[int]) -> Iterator[int]:
        """Node indices in the key's order, lazily: the first few cost a few ring steps.

        The probes walk the ring clockwise together, nearest point first. A node's first point met
        is its nearest, so its score is known then; it is yielded once no node not yet met can
        score lower (all points ahead are farther, and no weight exceeds ``wmax``)."""
        pos, own, weights = self.pos, self.own, self.weights
        n = len(pos)
        if not n:
            return
        wmax, total, shift, table = self.wmax, len(weights), self.shift, self.table
        heads = []
        for x in xs:
            k = x >> shift
            i = bisect_left(pos, x, table[k], table[k + 1])  # as start(x), inlined: hot path
            if i == n:
                i = 0
            heads.append(((pos[i] - x) & _MASK64, i, x))
        heapify(heads)
        seen: set[int] = set()
        found: list[tuple[float, int]] = []
        push, pop, replace = heappush, heappop, heapreplace
        while True:
            d, i, x = heads[0]
            frontier = d / wmax
            while found and found[0][0] < frontier:
                yield pop(found)[1]
            o = own[i]
            if o not in seen:
                seen.add(o)
                push(found, (d / weights[o], o))
                if len(seen) == total:
                    break
            i += 1
            if i == n:
                i = 0
            replace(heads, ((pos[i] - x) & _MASK64, i, x))
        while found:
            yield heappop(found)[1]

    def order(self, xs: Sequence[int], subset: Iterable[int] | None = None) -> list[int]:
        """All node indices (or those of ``subset``) in the key's order, scoring each node by
        bisecting its own points: O(nodes x probes x log points), the same order as `walk`."""
        pts, weights = self.node_pts, self.weights
        scored = []
        for o in range(len(weights)) if subset is None else subset:
            lo = o * _POINTS
            hi = lo + _POINTS
            best = _MASK64 + 1
            for x in xs:
                j = bisect_left(pts, x, lo, hi)
                d = ((pts[j] if j < hi else pts[lo]) - x) & _MASK64
                if d < best:
                    best = d
            scored.append((best / weights[o], o))
        scored.sort()
        return [o for _, o in scored]


@functools.lru_cache(maxsize=4)
def _build_ring(spec: tuple[tuple[str, float], ...]) -> Ring:
    return Ring(spec)


def ring_for(nodes: Iterable[Node]) -> Ring:
    """The ring of ``nodes``, shared by every selector (and call) over the same ids and weights."""
    return _build_ring(tuple(sorted((n.node_id, float(n.weight)) for n in nodes)))


def rendezvous_order(block_key: str, nodes: Sequence[Node]) -> list[Node]:
    """Order nodes for one block key, best first: the placement every selector uses. (The name
    is historical: this was rendezvous hashing, whose cost grows with the node count.)

    Each node owns 64 points on a 64-bit ring: the 64-bit big-endian words of
    ``blake2b(node_id + "\\0" + i.to_bytes(4, "big"), digest_size=64, person="pcache.node")``
    for ``i`` in 0..7. The key has 4 probe positions, the words of
    ``blake2b(block_key, digest_size=32, person="pcache.key")``. A node's score is the smallest
    clockwise distance (mod 2**64) from a probe to one of its points, divided by its weight;
    the lowest score comes first, ties broken by node id. Dividing the distance by the weight
    makes a node first for about ``weight / sum(weights)`` of the keys (the "linear method" of
    weighted consistent hashing); several probes make that share closer to exact. Adding or
    removing a node moves only the keys that node gains or loses, and the order depends only on
    ids, weights and the key, never on the process or the input order.

    Args:
        block_key: The block's key.
        nodes: Candidate nodes, any order, unique ids.

    Returns:
        A new list of the same nodes, best first.

    Raises:
        ValueError: Two nodes share an id.
    """
    if not nodes:
        return []
    check_unique_ids(nodes)
    placement = ring_for(nodes)
    by_id = {n.node_id: n for n in nodes}
    return [by_id[placement.ids[o]] for o in placement.order(key_probes(block_key))]
