"""File-level metadata cache: stat results and directory listings with a TTL.

A stat is trusted for ``ttl`` seconds, a "does not exist" (negative entry) for ``negative_ttl``;
in immutable mode (datasets that never change) nothing expires. An expired entry is kept
``serve_stale`` seconds longer, answered only while the store cannot be reached
(stale-if-error). Listings are cached per
(namespace, prefix). :meth:`MetadataCache.invalidate` drops everything under a path, which is what
``pcache invalidate`` and the worker's own writes use. Thread-safe; sizes are bounded (oldest
entries dropped first). Entries changed since the last :meth:`MetadataCache.save` are noted
and written to disk by :mod:`pcache.metastore`, and :meth:`MetadataCache.load` takes them back
at start (a restarted worker answers for what it knew, with the TTL each entry had left).

Invariants:
    - In a directory this node wrote into in the last ``negative_ttl`` seconds (bulk creates:
      ``tar x``, ``cp -r``), a complete listing fetched less than ``negative_ttl`` seconds ago
      answers "does not exist" for every name it does not show (:meth:`MetadataCache.absent`):
      no older than the negative entry a lookup of that name would have left. Changes made
      through this node are patched into it as they land; changes other nodes journal reach
      the worker as announcements and are laid over it there; only a writer outside the
      cluster racing on the same directory is seen up to ``negative_ttl`` later, as with
      negative entries. A directory such a listing shows absent (with the directories between
      them), once a name in it is asked for, counts as written into with an empty listing as
      fresh as that listing (a tree being unpacked without markers: its names are answered
      from it, not asked one by one). Elsewhere every new name is asked for.
    - A value fetched from the store while a change it may predate happened (a change logged
      after the fetch began, see the ``generation`` arguments) is not cached, except that a
      listing is cached with the changes that landed meanwhile patched in. Only changes that
      touch the fetched key or prefix count; past :data:`CHANGE_LOG` changes, every one does.
"""

from __future__ import annotations

import bisect
import enum
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, NamedTuple, TypeVar

from objstore.base import ListPage, ObjectInfo

from .metastore import Saved
from .pages import PageAt

if TYPE_CHECKING:
    from .metastore import MetadataStore

log = logging.getLogger(__name__)

T = TypeVar("T")


class Missing:
    """The cached answer "this object does not exist"."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"


MISSING = Missing()


class _CompactPage(NamedTuple):
    """A cached page of a long listing as plain tuples: a third of the memory of its
    ``ObjectInfo`` objects, and nothing for the garbage collector to walk."""

    rows: tuple[tuple[str, int, float, str], ...]  # key, size, mtime, etag
    prefixes: tuple[str, ...]
    token: str | None

    @classmethod
    def of(cls, page: ListPage) -> _CompactPage | ListPage:
        if any(o.metadata or o.checksum is not None for o in page.objects):
            return page  # not a plain listing: kept as it is
        rows = tuple((o.key, o.size, o.mtime, o.etag) for o in page.objects)
        return cls(rows, tuple(page.prefixes), page.token)

    @staticmethod
    def page(value: _CompactPage | ListPage) -> ListPage:
        if isinstance(value, ListPage):
            return value
        objects = [ObjectInfo.listed(*row) for row in value.rows]
        return ListPage(objects, list(value.prefixes), value.token)


class _Listed:
    """A stat learned from a listing: size, mtime and ETag, but no user metadata."""

    __slots__ = ("info",)

    def __init__(self, info: ObjectInfo) -> None:
        self.info = info


@dataclass
class _Entry(Generic[T]):
    value: T
    expires: float
    fetched: float = 0.0  # when the store said it (patches do not move it)


class _TTLMap(Generic[T]):
    """Entries expire at their ``expires``; an expired one is kept ``grace`` seconds longer,
    for :meth:`stale` (answers while the store cannot be reached)."""

    def __init__(self, max_entries: int, grace: float = 0.0) -> None:
        self._data: OrderedDict[tuple[str, str], _Entry[T]] = OrderedDict()
        self._max = max_entries
        self.grace = grace
        self.dirty: set[tuple[str, str]] = set()  # changed since the last save to disk

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
                self.dirty.add(key)
            return None
        return entry

    def stale(self, key: tuple[str, str], now: float) -> T | None:
        """The value, fresh or expired less than ``grace`` seconds ago."""
        entry = self._data.get(key)
        if entry is None or entry.expires + self.grace < now:
            return None
        return entry.value

    def put(self, key: tuple[str, str], value: T, expires: float, fetched: float = 0.0) -> None:
        self._data[key] = _Entry(value, expires, fetched)
        self._data.move_to_end(key)
        self.dirty.add(key)
        while len(self._data) > self._max:
            self.dirty.add(self._data.popitem(last=False)[0])

    def pop(self, key: tuple[str, str]) -> None:
        if self._data.pop(key, None) is not None:
            self.dirty.add(key)

    def drop_where(self, doomed: Callable[[tuple[str, str]], bool]) -> int:
        keys = [k for k in self._data if doomed(k)]
        for k in keys:
            del self._data[k]
        self.dirty.update(keys)
        return len(keys)

    def peek(self, key: tuple[str, str]) -> _Entry[T] | None:
        """The entry as it is, expired or not (for saving it)."""
        return self._data.get(key)

    def __len__(self) -> int:
        return len(self._data)


PROBE = "/?"  # the "delimiter" of a cached probe: the first page of a longer "/" listing
PATCH_MAX = 10_000  # listings up to this many entries are patched by landed(), larger dropped
PAGES_MAX = 128  # pages of long listings kept (up to 1,000 names each): bounded memory
CHANGE_LOG = 4096  # changes remembered for the generation checks of fetches in flight
WRITING_MAX = 4096  # directories remembered as written into (for absent())


class _Kind(enum.Enum):
    """What a logged change touched."""

    STAT = "stat"  # one stat (forget_stat: a change journalled here, laid over listings)
    KEY = "key"  # one stat and the listings of its parents (invalidate_key)
    LANDED = "landed"  # as KEY, with what the key became (landed: listings can be patched)
    TREE = "tree"  # every stat under a path and every listing that can show it (invalidate)


@dataclass(frozen=True)
class _Change:
    generation: int
    namespace: str
    path: str
    kind: _Kind
    info: ObjectInfo | None = None

    def touches_stat(self, key: str) -> bool:
        if self.kind is _Kind.TREE:
            return key.startswith(self.path)
        return key == self.path

    def touches_listing(self, prefix: str) -> bool:
        if self.kind is _Kind.TREE:
            return prefix.startswith(self.path) or self.path.startswith(prefix)
        return self.kind is not _Kind.STAT and self.path.startswith(prefix)


def _shows(page: ListPage, name: str) -> bool:
    """Whether a sorted listing page holds ``name`` (a key, or a prefix ``d/``)."""
    if name.endswith("/"):
        at = bisect.bisect_left(page.prefixes, name)
        return at < len(page.prefixes) and page.prefixes[at] == name
    at = bisect.bisect_left(page.objects, name, key=lambda o: o.key)
    return at < len(page.objects) and page.objects[at].key == name


def _parent_prefix(name: str) -> str:
    """The directory prefix whose ``/`` listing shows ``name`` (a key, or a prefix ``d/``)."""
    head = name[:-1] if name.endswith("/") else name
    parent = head.rpartition("/")[0]
    return parent + "/" if parent else ""


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
    objects = list(page.objects)  # a copy (C speed); the key found by bisection, not a scan
    at = bisect.bisect_left(objects, key, key=lambda o: o.key)
    if at < len(objects) and objects[at].key == key:
        if info is None:
            del objects[at]
        else:
            objects[at] = info
    elif info is not None:
        objects.insert(at, info)
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
        # pages of listings too long to hold whole, by (prefix, delimiter, after, limit); the
        # least recently used dropped first (saved to disk with the rest, see save())
        self._pages: _TTLMap[_CompactPage | ListPage] = _TTLMap(PAGES_MAX, serve_stale)
        self.hits = 0
        self.misses = 0
        self.stale_served = 0  # answers given past their TTL (the store could not be reached)
        # bumped by every change, which is logged: a value fetched while a change that touches
        # it happened may predate it, and is not cached (the ``generation`` arguments)
        self.generation = 0
        self._changes: deque[_Change] = deque(maxlen=CHANGE_LOG)
        # (namespace, directory prefix) -> when a change there was last journalled or landed
        self._writing: OrderedDict[tuple[str, str], float] = OrderedDict()
        # directories listed for their new names once and found longer than LIST_FOR_NAMES
        self._too_long: OrderedDict[tuple[str, str], float] = OrderedDict()

    def _expiry(self, seconds: float) -> float:
        return float("inf") if self.immutable else self._clock() + seconds

    def _log(self, kind: _Kind, namespace: str, path: str, info: ObjectInfo | None = None) -> None:
        self.generation += 1
        self._changes.append(_Change(self.generation, namespace, path, kind, info))

    def _wrote(self, namespace: str, key: str) -> None:
        """A change of ``key`` was made through this node: its directory (and, for a marker
        ``d/``, the directory itself) is being written into."""
        now = self._clock()
        for prefix in {_parent_prefix(key), key} if key.endswith("/") else {_parent_prefix(key)}:
            self._writing[(namespace, prefix)] = now
            self._writing.move_to_end((namespace, prefix))
        while len(self._writing) > WRITING_MAX:
            self._writing.popitem(last=False)

    def _writing_into(self, namespace: str, prefix: str, now: float) -> bool:
        return self._writing.get((namespace, prefix), float("-inf")) + self.negative_ttl > now

    def _changes_since(self, generation: int, namespace: str) -> list[_Change] | None:
        """The changes of ``namespace`` after ``generation``, oldest first; None when the log
        no longer reaches back that far."""
        if generation == self.generation:
            return []
        if not self._changes or self._changes[0].generation > generation + 1:
            return None
        found = []
        for change in reversed(self._changes):
            if change.generation <= generation:
                break
            if change.namespace == namespace:
                found.append(change)
        found.reverse()
        return found

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
            if generation is not None:
                changes = self._changes_since(generation, namespace)
                if changes is None or any(c.touches_stat(key) for c in changes):
                    return False
            if ttl > 0 or self.immutable:
                value: ObjectInfo | Missing | _Listed = info
                if listed and isinstance(info, ObjectInfo):
                    old = self._stats.get((namespace, key), self._clock())
                    if isinstance(old, ObjectInfo) and old.version == info.version:
                        return True  # what we know already is more
                    value = _Listed(info)
                self._stats.put((namespace, key), value, self._expiry(ttl), self._clock())
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
    ) -> ListPage | None:
        """Cache a listing fetched since ``generation`` (read before fetching it), with the
        changes that landed meanwhile patched in. Returns the page as cached (or as it would
        have been, with caching off), or None when it is out of date: a change it cannot be
        patched with touched it."""
        with self._lock:
            if generation is not None:
                changes = self._changes_since(generation, namespace)
                if changes is None:
                    return None
                for change in changes:
                    if not change.touches_listing(prefix):
                        continue
                    if change.kind is not _Kind.LANDED or delimiter == PROBE:
                        return None
                    patched = _patched(page, prefix, delimiter, change.path, change.info)
                    if patched is None:
                        return None
                    page = patched
            if self.ttl > 0 or self.immutable:
                now = self._clock()
                self._listings.put(
                    (namespace, f"{prefix}\x00{delimiter}"), page, self._expiry(self.ttl), now
                )
            return page

    def get_page(self, namespace: str, at: PageAt, *, stale: bool = False) -> ListPage | None:
        """A cached page of a long listing (see :meth:`put_page`); ``stale``: even past its
        TTL, within ``serve_stale`` (only while the store cannot be reached)."""
        key = (namespace, at.key)
        with self._lock:
            if stale:
                value = self._pages.stale(key, self._clock())
            else:
                value = self._pages.get(key, self._clock())
                if value is None:
                    self.misses += 1
                else:
                    self.hits += 1
        return None if value is None else _CompactPage.page(value)

    def has_page(self, namespace: str, at: PageAt) -> bool:
        """Whether :meth:`get_page` would answer (not counted as a hit or a miss)."""
        with self._lock:
            return self._pages.entry((namespace, at.key), self._clock()) is not None

    def put_page(self, namespace: str, at: PageAt, page: ListPage, generation: int) -> bool:
        """Cache the store page ``at`` (with its token) of a listing too long to hold whole,
        fetched since ``generation``: not when a change that touches the listing happened
        meanwhile (pages are not patched). Every change that drops the listing drops its
        pages."""
        with self._lock:
            changes = self._changes_since(generation, namespace)
            if changes is None or any(c.touches_listing(at.prefix) for c in changes):
                return False
            if self.ttl > 0 or self.immutable:
                key = (namespace, at.key)
                self._pages.put(key, _CompactPage.of(page), self._expiry(self.ttl), self._clock())
            return True

    def _drop_pages(self, namespace: str, prefixes: set[str]) -> None:
        if len(self._pages):
            self._pages.drop_where(
                lambda k: k[0] == namespace and k[1].partition("\x00")[0] in prefixes
            )

    def absent(self, namespace: str, name: str) -> bool:
        """Whether ``name`` (a key, or a prefix ``d/``) is surely not there: this node is
        writing into its directory and the directory's complete listing, fetched less than
        ``negative_ttl`` seconds ago, does not show it (see the module's invariants). Counted
        as a hit when it says so."""
        with self._lock:
            return self._absent_locked(namespace, name, self._clock()) is not None

    def _absent_locked(self, namespace: str, name: str, now: float) -> _Entry[ListPage] | None:
        """The listing entry that shows ``name`` is not there (see :meth:`absent`), or None."""
        parent = _parent_prefix(name)
        if self.immutable or self.negative_ttl <= 0:
            return None
        entry = self._listings.entry((namespace, f"{parent}\x00/"), now)
        if entry is None:
            entry = self._new_directory_locked(namespace, parent, now)
        if not self._writing_into(namespace, parent, now):
            return None
        if entry is None or entry.value.token is not None:
            return None
        if entry.fetched + self.negative_ttl < now:
            return None
        if _shows(entry.value, name):
            return None
        self.hits += 1
        if not name.endswith("/"):  # as the negative entry a lookup would leave
            self._stats.put((namespace, name), MISSING, entry.fetched + self.negative_ttl)
        return entry

    def _new_directory_locked(
        self, namespace: str, prefix: str, now: float
    ) -> _Entry[ListPage] | None:
        """The empty listing of ``prefix`` when it is a directory being made: the fresh
        complete listing of its nearest listed ancestor does not show it (nor the directories
        between), and this node writes into one of them. Cached, as fresh as that listing, for
        ``prefix`` and the directories between, which count as written into from now (a tree
        being unpacked without markers: its names are answered from these, see the module's
        invariants); None otherwise."""
        made: list[str] = []
        below = prefix
        while below:
            made.append(below)
            above = _parent_prefix(below)
            listed = self._listings.entry((namespace, f"{above}\x00/"), now)
            if listed is not None:
                break
            below = above
        else:
            return None  # no ancestor is listed
        if listed.value.token is not None or listed.fetched + self.negative_ttl < now:
            return None
        if _shows(listed.value, made[-1]):
            return None  # the topmost of them is there: its own listing is needed
        if not any(self._writing_into(namespace, p, now) for p in [above, *made]):
            return None
        entry = None
        for made_prefix in made:
            self._writing[(namespace, made_prefix)] = now
            self._writing.move_to_end((namespace, made_prefix))
            self._listings.put(
                (namespace, f"{made_prefix}\x00/"),
                ListPage([], [], None),
                self._expiry(self.ttl),
                listed.fetched,
            )
            entry = entry or self._listings.entry((namespace, f"{made_prefix}\x00/"), now)
        while len(self._writing) > WRITING_MAX:
            self._writing.popitem(last=False)
        return entry

    def stale_absent(self, namespace: str, name: str) -> bool:
        """Whether the complete listing of ``name``'s directory, even past its TTL (within
        ``serve_stale``), does not show it: the stale "not there" the caller answers with only
        when the store cannot be reached (a new name created during an outage)."""
        with self._lock:
            page = self._listings.stale((namespace, f"{_parent_prefix(name)}\x00/"), self._clock())
            return page is not None and page.token is None and not _shows(page, name)

    def to_refresh(self, namespace: str, name: str) -> str | None:
        """The directory prefix of ``name`` when its listing is worth fetching again so that
        :meth:`absent` can answer: this node is writing into it, and its listing is cached,
        complete, up to :data:`PATCH_MAX` entries, older than ``negative_ttl``, and does not
        show ``name`` (a name it shows is most likely there: asked for itself)."""
        if self.negative_ttl <= 0 or self.immutable:
            return None
        parent = _parent_prefix(name)
        with self._lock:
            now = self._clock()
            if not self._writing_into(namespace, parent, now):
                return None
            entry = self._listings.entry((namespace, f"{parent}\x00/"), now)
            if entry is None or entry.value.token is not None:
                return None
            if entry.fetched + self.negative_ttl >= now:
                return None
            size = len(entry.value.objects) + len(entry.value.prefixes)
            if size > PATCH_MAX or _shows(entry.value, name):
                return None
            return parent

    def to_list(self, namespace: str, name: str) -> str | None:
        """The directory prefix of ``name`` when it is worth listing for the first time so that
        :meth:`absent` can answer: this node is writing into it, no listing of it is cached,
        and it was not found too long to list (:meth:`too_long_to_list`) within ``ttl``."""
        if self.negative_ttl <= 0 or self.immutable or self.ttl <= 0:
            return None
        parent = _parent_prefix(name)
        with self._lock:
            now = self._clock()
            if self._listings.entry((namespace, f"{parent}\x00/"), now) is not None:
                return None
            if self._new_directory_locked(namespace, parent, now) is not None:
                return None  # a directory being made: its (empty) listing follows from above
            if not self._writing_into(namespace, parent, now):
                return None
            if self._too_long.get((namespace, parent), float("-inf")) > now:
                return None
            return parent

    def too_long_to_list(self, namespace: str, prefix: str) -> None:
        """``prefix`` has more entries than are listed for its new names: its names are asked
        one by one for ``ttl`` seconds."""
        with self._lock:
            self._too_long[(namespace, prefix)] = self._clock() + self.ttl
            self._too_long.move_to_end((namespace, prefix))
            while len(self._too_long) > WRITING_MAX:
                self._too_long.popitem(last=False)

    def forget_stat(self, namespace: str, key: str) -> None:
        """Forget one object's stat; listings stay (a change journalled on this node is laid
        over them when they are read, and patched in by :meth:`landed` when it is uploaded)."""
        with self._lock:
            self._log(_Kind.STAT, namespace, key)
            self._wrote(namespace, key)
            self._stats.pop((namespace, key))

    def landed(self, namespace: str, key: str, info: ObjectInfo | None) -> None:
        """A change of ``key`` reached the store (``info``; None: deleted): its stat is what
        it became, and the cached listings of its parents are patched to match (dropped when
        larger than :data:`PATCH_MAX` entries, or when a deletion may have emptied a
        sub-directory they show)."""
        parts = key.split("/")
        parents = [""] + ["/".join(parts[:i]) + "/" for i in range(1, len(parts))]
        with self._lock:
            self._log(_Kind.LANDED, namespace, key, info)
            self._wrote(namespace, key)
            now = self._clock()
            self._drop_pages(namespace, set(parents))
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
                        self._listings.dirty.add(cache_key)

    def invalidate_key(self, namespace: str, key: str) -> None:
        """Forget one object's stat and the listings of its parent directories (what a write of
        ``key`` changes): O(depth), where :meth:`invalidate` scans every entry."""
        parts = key.split("/")
        parents = [""] + ["/".join(parts[:i]) + "/" for i in range(1, len(parts))]
        with self._lock:
            self._log(_Kind.KEY, namespace, key)
            self._stats.pop((namespace, key))
            self._drop_pages(namespace, set(parents))
            for prefix in parents:
                for delimiter in ("/", "", PROBE):
                    self._listings.pop((namespace, f"{prefix}\x00{delimiter}"))

    def invalidate(self, namespace: str, path: str = "") -> int:
        """Forget every stat under ``path`` and every listing that could contain it."""
        with self._lock:
            self._log(_Kind.TREE, namespace, path)
            dropped = self._stats.drop_where(lambda k: k[0] == namespace and k[1].startswith(path))
            # a listing of any parent directory may mention the path
            parts = path.split("/")
            parents = {""} | {"/".join(parts[:i]) + "/" for i in range(1, len(parts))}

            def affected(k: tuple[str, str]) -> bool:
                prefix = k[1].partition("\x00")[0]
                return k[0] == namespace and (prefix in parents or prefix.startswith(path))

            self._pages.drop_where(affected)
            return dropped + self._listings.drop_where(affected)

    # -- on disk (pcache.metastore) --------------------------------------------------------

    def load(self, store: MetadataStore) -> int:
        """Take back what ``store`` kept (a restarted worker): entries keep the TTL they had
        left. Returns how many were loaded."""
        wall, now = time.time(), self._clock()
        loaded = 0
        with self._lock:
            for saved in store.load():
                expires = float("inf") if saved.expires is None else now + saved.expires - wall
                fetched = now - (wall - saved.fetched)
                if saved.kind == "listing":
                    self._listings.put(saved.key, saved.value, expires, fetched)
                elif saved.kind == "page":
                    self._pages.put(saved.key, _CompactPage.of(saved.value), expires, fetched)
                else:
                    value = saved.value
                    if value == "missing":
                        value = MISSING
                    elif isinstance(value, tuple):
                        value = _Listed(value[1])
                    self._stats.put(saved.key, value, expires, fetched)
                loaded += 1
            self._stats.dirty.clear()
            self._listings.dirty.clear()
            self._pages.dirty.clear()
        return loaded

    def save(self, store: MetadataStore) -> int:
        """Write the entries changed since the last save to ``store``; returns how many."""
        wall, now = time.time(), self._clock()

        def saved(kind: str, key: tuple[str, str], entry: _Entry[Any] | None) -> Any:
            if entry is None:
                return kind, key, None
            value = entry.value
            if isinstance(value, Missing):
                value = "missing"
            elif isinstance(value, _Listed):
                value = ("listed", value.info)
            elif isinstance(value, _CompactPage):
                value = _CompactPage.page(value)
            expires = None if entry.expires == float("inf") else wall + entry.expires - now
            fetched = wall - (now - entry.fetched) if entry.fetched else wall
            return kind, key, Saved(kind, key, value, expires, fetched)

        with self._lock:
            changes = [saved("stat", k, self._stats.peek(k)) for k in self._stats.dirty]
            changes += [saved("listing", k, self._listings.peek(k)) for k in self._listings.dirty]
            changes += [saved("page", k, self._pages.peek(k)) for k in self._pages.dirty]
            self._stats.dirty.clear()
            self._listings.dirty.clear()
            self._pages.dirty.clear()
        if not changes:
            return 0
        return store.save(changes, self._stats.grace)

    def sizes(self) -> dict[str, int]:
        with self._lock:
            return {
                "stats": len(self._stats),
                "listings": len(self._listings),
                "pages": len(self._pages),
            }
