"""Keys kept in order per namespace, for "every key under this prefix" without a scan.

The worker lays the changes pending on this node (its write-back journal) and those other
nodes announced over every listing and probe it answers. Asked by scanning every pending key,
each lookup cost time in proportion to all that was pending: an untar of thousands of files
into a store that lags (or is down) slowed down as it went. :class:`PrefixIndex` answers in
O(log n + k) for k keys under the prefix; adding or removing a key moves pointers in one list
(memmove-fast at 100,000 keys). Not thread-safe: its owner's lock guards it.
"""

from __future__ import annotations

import bisect


class PrefixIndex:
    """The keys of each namespace, sorted (as ``str``: the order stores list in)."""

    def __init__(self) -> None:
        self._keys: dict[str, list[str]] = {}

    def add(self, namespace: str, key: str) -> None:
        keys = self._keys.setdefault(namespace, [])
        at = bisect.bisect_left(keys, key)
        if at == len(keys) or keys[at] != key:
            keys.insert(at, key)

    def discard(self, namespace: str, key: str) -> None:
        keys = self._keys.get(namespace)
        if not keys:
            return
        at = bisect.bisect_left(keys, key)
        if at < len(keys) and keys[at] == key:
            del keys[at]

    def under(self, namespace: str, prefix: str) -> list[str]:
        """The keys starting with ``prefix``, in order."""
        keys = self._keys.get(namespace)
        if not keys:
            return []
        start = bisect.bisect_left(keys, prefix)
        if not prefix:
            return keys[start:]
        end = start
        while end < len(keys) and keys[end].startswith(prefix):
            end += 1
        return keys[start:end]

    def __len__(self) -> int:
        return sum(len(keys) for keys in self._keys.values())
