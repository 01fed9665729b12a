"""File-level metadata cache: stat results and directory listings with a TTL.

A stat is trusted for ``ttl`` seconds, a "does not exist" (negative entry) for ``negative_ttl``;
in immutable mode (datasets that never change) nothing expires. An expired entry is kept
``serve_stale`` seconds longer, answered only while the store cannot be reached
(stale-if-error). Listings are cached per
(namespace, prefix). :meth:`MetadataCache.invalidate` drops everything under a path, which is what
``pcache invalidate`` and the worker's own writes use. Thread-safe; sizes are bounded (oldest
entries dropped first).
"""

from __future__ import annotations

import bisect
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from objstore.base import ListPage, ObjectInfo

log = logging.getLogger(__name__)

T = TypeVar("T")


class Missing:
    """The cached answer "this object does not exist"."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING = Missing()


class _Listed:
    """A stat learned from a listing: size, mtime and ETag, but no user metadata."""

    __slots__ = ("info",)

    def __init__(self, info: ObjectInfo) -> None:
        self.info = info


@dataclass
class _Entry(Generic[T]):
    value: T
    expires: float


class _TTLMap(Generic[T]):
    """Entries expire at their ``expires``; an expired one is kept ``grace`` seconds longer,
    for :meth:`stale` (answers while the store cannot be reached)."""

    def __init__(self, max_entries: int, grace: float = 0.0) -> None:
        self._data: OrderedDict[tuple[str, str], _Entry[T]] = OrderedDict()
        self._max = max_entries
        self.grace = grace

    def get(self, key: tuple[str, str], now: float) -> T | None:
        entry = self.entry(key, now)
        return None if entry is None else entry.value

    def entry(self, key: tuple[str, str], now: float) -> _Entry[T] | None:
        entry = self._data.get(key)
        if entry is None:
            return None
        if entry.expires < now:
            if entry.expires + self.grace < now:
                del self._data[key]
            return None
        return entry

    def stale(self, key: tuple[str, str], now: float) -> T | None:
        """The value, fresh or expired less than ``grace`` seconds ago."""
        entry = self._data.get(key)
        if entry is None or entry.expires + self.grace < now:
            return None
        return entry.value

    def put(self, key: tuple[str, str], value: T, expires: float) -> None:
        self._data[key] = _Entry(value, expires)
        self._data.move_to_end(key)
        while len(self._data) > self._max:
            self._data.popitem(last=False)

    def pop(self, key: tuple[str, str]) -> None:
        self._data.pop(key, None)

    def drop_where(self, doomed: Callable[[tuple[str, str]], bool]) -> int:
        keys = [k for k in self._data if doomed(k)]
        for k in keys:
            del self._data[k]
        return len(keys)

    def __len__(self) -> int:
        return len(self._data)


PROBE = "/?"  # the "delimiter" of a cached probe: the first page of a longer "/" listing
PATCH_MAX = 10_000  # listings up to this many entries are patched by landed(), larger dropped


def _patched(
    page: ListPage, prefix: str, delimiter: str, key: str, info: ObjectInfo | None
) -> ListPage | None:
    """``page`` (the listing of ``prefix``) with ``key`` now ``info`` (None: deleted); None
    when it cannot be told without listing again. A new page: readers may hold the old one."""
    if page.token is not None or len(page.objects) + len(page.prefixes) > PATCH_MAX:
        return None
    rest = key[len(prefix) :]
    if delimiter and delimiter in rest:
        sub = prefix + rest.split(delimiter, 1)[0] + delimiter
        if info is None:  # the last key under it? only a listing can tell
            return None if sub in page.prefixes else page
        if sub in page.prefixes:
            return page
        return ListPage(list(page.objects), sorted([*page.prefixes, sub]), None)
    objects = [o for o in page.objects if o.key != key]
    if info is not None:
        bisect.insort(objects, info, key=lambda o: o.key)
    return ListPage(objects, list(page.prefixes), None)


class MetadataCache:
    """Stat and listing cache with TTLs, negative entries and an immutable mode.

    Args:
        ttl: seconds a positive stat or a listing is trusted.
        negative_ttl: seconds a "does not exist" is trusted.
        immutable: nothing expires (the data never changes under the cache).
        max_entries: bound per map.
        serve_stale: seconds past its TTL an entry is kept, for :meth:`stale_stat` and
            :meth:`stale_listing`: what may be answered while the store cannot be reached
            (0: nothing past its TTL is ever answered).
    """

    def __init__(
        self,
        ttl: float = 30.0,
        negative_ttl: float = 5.0,
        *,
        immutable: bool = False,
        max_entries: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
        serve_stale: float = 0.0,
    ) -> None:
        self.ttl = ttl
        self.negative_ttl = negative_ttl
        self.immutable = immutable
        self._clock = clock
        self._lock = threading.Lock()
        self._stats: _TTLMap[ObjectInfo | Missing | _Listed] = _TTLMap(max_entries, serve_stale)
        self._listings: _TTLMap[ListPage] = _TTLMap(max(1, max_entries // 100), serve_stale)
        self.hits = 0
        self.misses = 0
        self.stale_served = 0  # answers given past their TTL (the store could not be reached)
        # bumped by every invalidation: a value fetched while it changed may predate the
        # change, and is not cached (see the ``generation`` arguments of the put methods)
        self.generation = 0

    def _expiry(self, seconds: float) -> float:
        return float("inf") if self.immutable else self._clock() + seconds

    def get_stat(
        self, namespace: str, key: str, *, full: bool = False
    ) -> ObjectInfo | Missing | None:
        """The cached stat, :data:`MISSING`, or ``None`` when the cache does not know; with
        ``full``, a stat learned only from a listing (no user metadata) does not count."""
        with self._lock:
            value = self._stats.get((namespace, key), self._clock())
            if isinstance(value, _Listed):
                value = None if full else value.info
            if value is None:
                self.misses += 1
            else:
                self.hits += 1
            return value

    def stale_stat(self, namespace: str, key: str) -> ObjectInfo | Missing | None:
        """The stat of ``key`` even past its TTL (within ``serve_stale``), listed or full; the
        caller answers with it only when the store cannot be reached (:meth:`served_stale`)."""
        with self._lock:
            value = self._stats.stale((namespace, key), self._clock())
            return value.info if isinstance(value, _Listed) else value

    def stale_listing(self, namespace: str, prefix: str, delimiter: str = "/") -> ListPage | None:
        """:meth:`stale_stat` for a listing."""
        with self._lock:
            return self._listings.stale((namespace, f"{prefix}\x00{delimiter}"), self._clock())

    def served_stale(self) -> None:
        with self._lock:
            self.stale_served += 1

    def full_stat(self, namespace: str, key: str) -> ObjectInfo | None:
        """The cached stat of ``key`` when it carries the object's user metadata."""
        with self._lock:
            value = self._stats.get((namespace, key), self._clock())
            return value if isinstance(value, ObjectInfo) else None

    def put_stat(
        self,
        namespace: str,
        key: str,
        info: ObjectInfo | Missing,
        generation: int | None = None,
        *,
        listed: bool = False,
    ) -> bool:
        """Cache a stat; not when ``generation`` (read before fetching it) is out of date.
        ``listed``: it comes from a listing (no user metadata), and never replaces a full stat
        of the same version. Returns whether it was cached (or would have been, with caching
        off)."""
        ttl = self.negative_ttl if isinstance(info, Missing) else self.ttl
        with self._lock:
            if generation is not None and generation != self.generation:
                return False
            if ttl > 0 or self.immutable:
                value: ObjectInfo | Missing | _Listed = info
                if listed and isinstance(info, ObjectInfo):
                    old = self._stats.get((namespace, key), self._clock())
                    if isinstance(old, ObjectInfo) and old.version == info.version:
                        return True  # what we know already is more
                    value = _Listed(info)
                self._stats.put((namespace, key), value, self._expiry(ttl))
            return True

    def get_listing(self, namespace: str, prefix: str, delimiter: str = "/") -> ListPage | None:
        with self._lock:
            value = self._listings.get((namespace, f"{prefix}\x00{delimiter}"), self._clock())
            if value is None:
                self.misses += 1
            else:
                self.hits += 1
            return value

    def put_listing(
        self,
        namespace: str,
        prefix: str,
        page: ListPage,
        delimiter: str = "/",
        generation: int | None = None,
    ) -> bool:
        """Cache a listing; not when ``generation`` (read before fetching it) is out of date.
        Returns whether it was cached (or would have been, with caching off)."""
        with self._lock:
            if generation is not None and generation != self.generation:
                return False
            if self.ttl > 0 or self.immutable:
                self._listings.put(
                    (namespace, f"{prefix}\x00{delimiter}"), page, self._expiry(self.ttl)
                )
            return True

    def forget_stat(self, namespace: str, key: str) -> None:
        """Forget one object's stat; listings stay (a change journalled on this node is laid
        over them when they are read, and patched in by :meth:`landed` when it is uploaded)."""
        with self._lock:
            self.generation += 1
            self._stats.pop((namespace, key))

    def landed(self, namespace: str, key: str, info: ObjectInfo | None) -> None:
        """A change of ``key`` reached the store (``info``; None: deleted): its stat is what
        it became, and the cached listings of its parents are patched to match (dropped when
        larger than :data:`PATCH_MAX` entries, or when a deletion may have emptied a
        sub-directory they show)."""
        parts = key.split("/")
        parents = [""] + ["/".join(parts[:i]) + "/" for i in range(1, len(parts))]
        with self._lock:
            self.generation += 1
            now = self._clock()
            value: ObjectInfo | Missing = MISSING if info is None else info
            ttl = self.negative_ttl if info is None else self.ttl
            if ttl > 0 or self.immutable:
                self._stats.put((namespace, key), value, self._expiry(ttl))
            else:
                self._stats.pop((namespace, key))
            for prefix in parents:
                self._listings.pop((namespace, f"{prefix}\x00{PROBE}"))  # not patched: dropped
                for delimiter in ("/", ""):
                    cache_key = (namespace, f"{prefix}\x00{delimiter}")
                    entry = self._listings.entry(cache_key, now)
                    if entry is None:
                        continue
                    patched = _patched(entry.value, prefix, delimiter, key, info)
                    if patched is None:
                        self._listings.pop(cache_key)
                    else:
                        entry.value = patched

    def invalidate_key(self, namespace: str, key: str) -> None:
        """Forget one object's stat and the listings of its parent directories (what a write of
        ``key`` changes): O(depth), where :meth:`invalidate` scans every entry."""
        parts = key.split("/")
        parents = [""] + ["/".join(parts[:i]) + "/" for i in range(1, len(parts))]
        with self._lock:
            self.generation += 1
            self._stats.pop((namespace, key))
            for prefix in parents:
                for delimiter in ("/", "", PROBE):
                    self._listings.pop((namespace, f"{prefix}\x00{delimiter}"))

    def invalidate(self, namespace: str, path: str = "") -> int:
        """Forget every stat under ``path`` and every listing that could contain it."""
        with self._lock:
            self.generation += 1
            dropped = self._stats.drop_where(lambda k: k[0] == namespace and k[1].startswith(path))
            # a listing of any parent directory may mention the path
            parts = path.split("/")
            parents = {""} | {"/".join(parts[:i]) + "/" for i in range(1, len(parts))}

            def affected(k: tuple[str, str]) -> bool:
                prefix = k[1].partition("\x00")[0]
                return k[0] == namespace and (prefix in parents or prefix.startswith(path))

            return dropped + self._listings.drop_where(affected)

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {"stats": len(self._stats), "listings": len(self._listings)}
