"""Write-back versions other nodes announced: close-to-open across nodes before the upload.

A file closed on node A under write-back lives in A's journal until its upload lands. A's worker
announces each such change to every other worker (``POST /v1/announce``) before the commit
returns, so a ``stat``, listing or read on node B straight after A's ``close`` shows B the new
version; B's reads of it go to A, which serves them from its staging file. When the upload
lands, A's invalidation (which names the version) ends the announcement; so does its expiry.

Invariants:
    - An announcement is dropped when its owner's invalidation names its version (the upload
      landed), by any other invalidation of its key or a prefix above it, by a newer
      announcement of the key, or ``ttl`` seconds after it arrived (A died and never uploaded:
      after that B shows what the store has).
    - A version whose upload is known to have landed (its invalidation came first, overtaking
      the announcement on the network) is never announced again: the late announcement is
      ignored (:meth:`Announced.note` returns False).
    - This node's own pending records win over announcements (the worker looks at them first).

Everything here is in memory: a worker that starts asks the other nodes for what is journalled
there (``GET /v1/announcements``, the same body) before it serves; a node that does not answer
then is seen as the store has it until that node's next commit of the key.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from objstore.base import ObjectInfo

from .keyindex import PrefixIndex

DEFAULT_TTL_S = 600.0
MAX_ENTRIES = 100_000  # past it, the oldest announcements go first
_LANDED_MEMORY = 10_000  # versions remembered as landed (a late announcement is ignored)


@dataclass(frozen=True)
class Announcement:
    """A change of one key journalled on another node.

    Attributes:
        owner: the node id of the worker holding the bytes.
        version: the owner's pending version (``wb-``), unique with the owner.
        info: what the key is there (etag: the version), or None: deleted there.
        expires: monotonic time after which it no longer counts.
    """

    owner: str
    version: str
    info: ObjectInfo | None
    expires: float


class Announced:
    """The announcements this worker received, per (namespace, key). Thread-safe."""

    def __init__(
        self, ttl: float = DEFAULT_TTL_S, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.ttl = ttl
        self._clock = clock
        self._lock = threading.Lock()
        self._entries: OrderedDict[tuple[str, str], Announcement] = OrderedDict()
        self._keys = PrefixIndex()  # the keys of _entries, for under()
        self._landed: OrderedDict[tuple[str, str], None] = OrderedDict()

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def note(
        self, namespace: str, key: str, owner: str, version: str, info: ObjectInfo | None
    ) -> bool:
        """Record an announcement; False when its version is known to have landed already."""
        with self._lock:
            if (owner, version) in self._landed:
                return False
            ident = (namespace, key)
            self._entries.pop(ident, None)
            self._entries[ident] = Announcement(owner, version, info, self._clock() + self.ttl)
            self._keys.add(namespace, key)
            while len(self._entries) > MAX_ENTRIES:
                self._keys.discard(*self._entries.popitem(last=False)[0])
            return True

    def get(self, namespace: str, key: str) -> Announcement | None:
        ident = (namespace, key)
        with self._lock:
            entry = self._entries.get(ident)
            if entry is not None and entry.expires <= self._clock():
                del self._entries[ident]
                self._keys.discard(*ident)
                return None
            return entry

    def under(self, namespace: str, prefix: str) -> dict[str, Announcement]:
        """The live announcements of keys starting with ``prefix``."""
        now = self._clock()
        with self._lock:
            found = (
                (key, self._entries[(namespace, key)])
                for key in self._keys.under(namespace, prefix)
            )
            return {key: entry for key, entry in found if entry.expires > now}

    def landed(self, namespace: str, key: str, owner: str, version: str) -> bool:
        """The owner's upload of ``version`` reached the store: its announcement ends (a newer
        one of the key stays). True when one was dropped."""
        ident = (namespace, key)
        with self._lock:
            self._landed[(owner, version)] = None
            while len(self._landed) > _LANDED_MEMORY:
                self._landed.popitem(last=False)
            entry = self._entries.get(ident)
            if entry is None or (entry.owner, entry.version) != (owner, version):
                return False
            del self._entries[ident]
            self._keys.discard(*ident)
            return True

    def forget_prefix(self, namespace: str, prefix: str) -> int:
        """Drop every announcement under ``prefix`` (a cluster invalidation of it)."""
        with self._lock:
            gone = self._keys.under(namespace, prefix)
            for key in gone:
                del self._entries[(namespace, key)]
                self._keys.discard(namespace, key)
            return len(gone)
