"""The block store's eviction policy: S3-FIFO over byte-sized entries, one instance per cache dir.

S3-FIFO (Yang et al., SOSP '23) keeps three queues:

* **small** (S): a FIFO that every new entry enters, sized to ~10% of the capacity. An entry that
  reaches its head having been read at least ``promote_threshold`` times since it was inserted
  moves to main; one that was not is evicted and its id goes to the ghost queue. A one-time scan
  therefore only ever churns through S and never displaces the main working set.
* **main** (M): a FIFO with CLOCK-style 2-bit frequency counters (0-3). The head entry is evicted
  when its counter is 0, otherwise the counter is decremented and the entry reinserted at the tail.
* **ghost** (G): ids (hashes only, no data) of entries recently evicted from S. An entry inserted
  while its id is in G goes straight to M: it was evicted too early the first time.

Eviction only runs when the owner asks for room (:meth:`S3FIFO.evict`), so the queues are not
bounded by themselves; the owner does the capacity accounting. Entries the owner reports as
pinned are never chosen: they rotate to the tail of their queue and keep their frequency.

Nothing here is thread-safe: the owner (``pcache.blockstore.BlockStore``) calls every method
with its lock held. Nothing here touches disk.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Iterator

log = logging.getLogger(__name__)

#: Saturation value of the frequency counter (two bits).
MAX_FREQ = 3


class Node:
    """One cached entry as the policy sees it; the owner may subclass it to carry more.

    Attributes:
        key: the entry's unique id (the block's index key).
        size: bytes it occupies (what evicting it frees).
        freq: reads since insertion (small) or CLOCK counter (main), 0..:data:`MAX_FREQ`.
        main: whether it is in the main queue (else small).
    """

    __slots__ = ("freq", "key", "main", "size")

    def __init__(self, key: bytes, size: int) -> None:
        self.key = key
        self.size = size
        self.freq = 0
        self.main = False


class GhostQueue:
    """A bounded FIFO of the ids of recently evicted entries (hashes only: no data, small keys).

    A false positive from a hash collision only sends an entry to main early, which is harmless.
    """

    def __init__(self, max_entries: int) -> None:
        self._max = max(1, max_entries)
        self._ids: OrderedDict[int, None] = OrderedDict()

    def add(self, key: bytes) -> None:
        h = hash(key)
        self._ids[h] = None
        self._ids.move_to_end(h)
        while len(self._ids) > self._max:
            self._ids.popitem(last=False)

    def pop(self, key: bytes) -> bool:
        """Remove ``key``'s id; return whether it was there."""
        h = hash(key)
        if h in self._ids:
            del self._ids[h]
            return True
        return False

    def __contains__(self, key: bytes) -> bool:
        return hash(key) in self._ids

    def __len__(self) -> int:
        return len(self._ids)


class S3FIFO:
    """S3-FIFO over the entries of one capacity domain (one cache directory).

    Args:
        capacity: bytes of the domain; sets the small queue's target (``small_fraction`` of it).
        ghost: the ghost queue; several instances may share one.
        small_fraction: the small queue's share of the capacity.
        promote_threshold: reads while in small needed to move to main instead of out.
    """

    def __init__(
        self,
        capacity: int,
        ghost: GhostQueue,
        *,
        small_fraction: float = 0.1,
        promote_threshold: int = 1,
    ) -> None:
        if not 0.0 < small_fraction < 1.0:
            raise ValueError(f"small_fraction must be in (0, 1), not {small_fraction}")
        self._ghost = ghost
        self._fraction = small_fraction
        self._promote = max(1, promote_threshold)
        self._small: OrderedDict[bytes, Node] = OrderedDict()
        self._main: OrderedDict[bytes, Node] = OrderedDict()
        self.small_bytes = 0
        self.main_bytes = 0
        self.capacity = capacity

    @property
    def capacity(self) -> int:
        return self._capacity

    @capacity.setter
    def capacity(self, value: int) -> None:
        self._capacity = max(0, value)
        self._small_target = int(self._capacity * self._fraction)

    @property
    def nbytes(self) -> int:
        return self.small_bytes + self.main_bytes

    def __len__(self) -> int:
        return len(self._small) + len(self._main)

    def __iter__(self) -> Iterator[Node]:
        yield from self._small.values()
        yield from self._main.values()

    def insert(self, node: Node, *, to_main: bool = False) -> None:
        """Add a new entry: to main if ``to_main`` or its id is in the ghost queue, else to small."""
        node.freq = 0
        if self._ghost.pop(node.key) or to_main:
            node.main = True
            self._main[node.key] = node
            self.main_bytes += node.size
        else:
            node.main = False
            self._small[node.key] = node
            self.small_bytes += node.size

    def hit(self, node: Node) -> None:
        """Record a read of a resident entry."""
        if node.freq < MAX_FREQ:
            node.freq += 1

    def remove(self, node: Node) -> None:
        """Take an entry out (dropped, corrupt, its disk failed); it does not go to the ghost."""
        if node.main:
            if self._main.pop(node.key, None) is not None:
                self.main_bytes -= node.size
        elif self._small.pop(node.key, None) is not None:
            self.small_bytes -= node.size

    def evict(self, need: int, is_pinned: Callable[[bytes], bool]) -> list[Node]:
        """Choose and remove victims until at least ``need`` bytes are freed, or nothing is left.

        Victims are removed from the queues (the caller deletes their data). Fewer bytes than
        ``need`` come back only when every remaining entry is pinned; callers check beforehand
        that unpinned bytes suffice.
        """
        victims: list[Node] = []
        freed = 0
        # Consecutive pinned entries seen at a queue's head: once a whole queue has rotated
        # without progress, it is exhausted for this call.
        skip_small = skip_main = 0
        while freed < need:
            small_ok = bool(self._small) and skip_small < len(self._small)
            main_ok = bool(self._main) and skip_main < len(self._main)
            if not small_ok and not main_ok:
                break
            if small_ok and (self.small_bytes >= self._small_target or not main_ok):
                key, node = self._small.popitem(last=False)
                if is_pinned(key):
                    self._small[key] = node
                    skip_small += 1
                    continue
                skip_small = 0
                self.small_bytes -= node.size
                if node.freq >= self._promote:
                    node.main = True
                    self._main[key] = node
                    self.main_bytes += node.size
                    skip_main = 0
                else:
                    self._ghost.add(key)
                    victims.append(node)
                    freed += node.size
            else:
                key, node = self._main.popitem(last=False)
                if is_pinned(key):
                    self._main[key] = node
                    skip_main += 1
                    continue
                if node.freq > 0:
                    # A decrement is progress: within MAX_FREQ rounds every counter reaches 0.
                    node.freq -= 1
                    self._main[key] = node
                    skip_main = 0
                    continue
                self.main_bytes -= node.size
                victims.append(node)
                freed += node.size
        return victims
