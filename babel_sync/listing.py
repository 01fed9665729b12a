"""Parallel metadata prefetch: list a store of millions to billions of keys with many requests
in flight, streaming results to a callback, with resumable per-range cursors.

A serial ListObjectsV2 walk is one round trip per 1,000 keys; across regions that is hours. Here
the key space is cut into **tasks**, key ranges each listed by one worker at a time:

- **Delimiter fan-out.** The first ``fanout_depth`` levels are listed with delimiter ``/``; each
  common prefix becomes a task of its own and objects at that level are emitted by the delimited
  listing itself. A *wide* level (half a page or more of subdirectories on its first page) is
  listed flat instead: a task per subdirectory costs a request per subdirectory however few keys
  each holds, while a flat listing split by key range costs one per page of keys.
- **Range splitting.** When a task's first page is full and continues, the rest of its range is
  cut at keys computed in the *shape* of its keys (the characters each position uses, see
  :class:`_Shape`; :func:`key_between` is the fallback): evenly when the range has an end,
  geometrically when it has none, because nothing tells where an unbounded prefix ends: the
  owner keeps K entries' worth at the density just seen, a new range takes the next 2K, a tail
  the rest, and every cut of a tail grows K fourfold (an exponential search: few empty ranges).
  A flat page that ends a listing proves the prefix has no keys past it: ranges starting there
  finish without a request and later cuts stay below it.
- **Work stealing.** An idle worker takes the running task with the most entries left (its
  latest page's density times the key space left), cuts its range above what the owner's
  request in flight will return, shrinks the owner's end and lists the upper part itself.

**Invariant (no key dropped, none duplicated).** A task covers the entries ``e`` with its prefix
and ``start_after < e < end``, where in a flat task an entry is a key, and in a delimited task an
object at that level or a common prefix standing for its whole subtree (listed by a child task).
The ranges of the tasks are pairwise disjoint and, with the child subtrees, cover the listing,
because a range only ever changes in two ways: (1) a split at ``s`` strictly above the owner's
cursor, after which the owner covers ``(cursor, s]`` (its end becomes ``s + "\\0"``, the
immediate successor of ``s``: ``k < s + "\\0"`` iff ``k <= s``) and the new task ``(s, old
end)``, listed with ``start_after=s``; (2) the owner moving its cursor past entries it emits.
Splits happen under the scheduler lock; a worker checks each page against its *current* end
under the same lock and publishes a cursor only up to what it then emits, so a page fetched
before a steal never emits an entry the thief owns. A delimited listing that starts inside the
subtree of a prefix ``q`` may return ``q`` again: ``q <= start_after`` is dropped, since the range
holding ``q`` itself spawned its task. A delimited task becomes flat only where that covers the
same keys (:func:`_flat_equivalent`).

**Persistence.** With a :class:`ListingState`, a new range is saved *before* its owner is saved
with the shrunken end; a cursor is saved only after ``on_objects`` returned for its page, and
the tasks of the subdirectories on that page are saved just before it (not earlier: a page
listed again after a resume would spawn them twice). A crash at any point leaves ranges that at
worst overlap by a page of keys (or, between two saves, a subtree), never a gap.
"""

from __future__ import annotations

import bisect
import logging
import math
import operator
import string
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Protocol

from objstore import ListPage, ObjectInfo, Store

log = logging.getLogger(__name__)

# Code points that may appear in a key we invent: no NUL (keys can't hold it) and no UTF-16
# surrogates (not encodable as UTF-8). Below 0x20 only when nothing printable fits, because a
# server echoes StartAfter back in XML, where control characters are not allowed.
_MAX_CP = 0x10FFFF
_SURROGATES = (0xD800, 0xDFFF)
_TOP = _MAX_CP + 1  # a virtual character above every real one: "no upper bound"
_GEOMETRIC_MAX_WAYS = 3  # an unbounded cut: the owner keeps K, a part takes 2K, a tail the rest
_MIN_STEAL_PAGES = 2  # stealing less than this costs more round trips than it saves
_MAX_WIDTH = 64  # key characters after the task prefix that shape arithmetic looks at
_FLOAT_CAP = 1e18
_SIZE = operator.attrgetter("size")  # sum(map(_SIZE, objects)): half a generator's per-key CPU


@dataclass(frozen=True)
class ListTask:
    """A unit of listing work: keys with ``prefix``, ``start_after < key < end``.

    Attributes:
        prefix: only keys starting with this (relative to the store root).
        start_after: exclusive lower bound ("" for none).
        end: exclusive upper bound, ``None`` for none. Splits set it to ``s + "\\0"``, i.e.
            "keys up to and including ``s``"; it is only compared locally, never sent.
        delimited: list with delimiter ``/`` (objects at this level plus common prefixes).
    """

    prefix: str
    start_after: str = ""
    end: str | None = None
    delimited: bool = False


@dataclass(frozen=True)
class ListingStats:
    """A snapshot of listing progress (for a progress bar and the run's summary).

    Attributes:
        objects, bytes: objects emitted so far and their total size.
        prefixes: common prefixes found (each became a task).
        pages: list requests made.
        tasks_pending, tasks_running, tasks_done: tasks queued, being listed, finished.
        splits: ranges created by cutting a running task (first-page splits and steals).
        steals: times an idle worker took part of a running task's range.
        overfetched: entries a request returned past its range's end, dropped.
        elapsed_s: seconds since ``run()`` started (until it returned).
    """

    objects: int = 0
    bytes: int = 0
    prefixes: int = 0
    pages: int = 0
    tasks_pending: int = 0
    tasks_running: int = 0
    tasks_done: int = 0
    splits: int = 0
    steals: int = 0
    overfetched: int = 0
    elapsed_s: float = 0.0


class ListingState(Protocol):
    """Where task cursors persist (the engine's LMDB journal; :class:`MemoryListingState`).

    The lister calls these from worker threads with its scheduler lock held, one call at a time,
    so an implementation needs no locking of its own and must not call back into the lister.
    """

    def save(self, task_id: str, task: ListTask, cursor: str) -> None:
        """Record ``task`` and that every entry of it ``<= cursor`` has been emitted."""

    def done(self, task_id: str) -> None:
        """``task_id`` is finished: every entry of it has been emitted."""

    def pending(self) -> list[tuple[str, ListTask, str]]:
        """Unfinished tasks with their cursors; empty for a fresh listing."""
        ...


class MemoryListingState:
    """An in-memory :class:`ListingState` (tests; a run that needs no resume)."""

    def __init__(self) -> None:
        self._tasks: dict[str, tuple[ListTask, str]] = {}
        self._lock = threading.Lock()

    def save(self, task_id: str, task: ListTask, cursor: str) -> None:
        with self._lock:
            self._tasks[task_id] = (task, cursor)

    def done(self, task_id: str) -> None:
        with self._lock:
            self._tasks.pop(task_id, None)

    def pending(self) -> list[tuple[str, ListTask, str]]:
        with self._lock:
            return [(tid, task, cursor) for tid, (task, cursor) in self._tasks.items()]


def list_serial(store: Store, prefix: str = "", *, page_size: int = 1000) -> Iterator[ObjectInfo]:
    """Every object under ``prefix`` in key order, one page at a time (the baseline)."""
    for page in store.iter_pages(prefix, limit=page_size):
        yield from page.objects


def _valid(cp: int) -> bool:
    return 0 < cp <= _MAX_CP and not _SURROGATES[0] <= cp <= _SURROGATES[1]


def _char_between(a: int, b: int) -> int | None:
    """A valid code point strictly between ``a`` and ``b``, near the middle, printable if any."""
    lo, hi = a + 1, b - 1
    if lo < 0x20 <= hi:
        lo = 0x20
    if lo > hi:
        return None
    mid = (lo + hi) // 2
    if _valid(mid):
        return mid
    # mid fell among the surrogates: take the nearest valid neighbour on either side.
    for cp in (_SURROGATES[0] - 1, _SURROGATES[1] + 1):
        if lo <= cp <= hi and _valid(cp):
            return cp
    return None


def key_between(lo: str, hi: str | None) -> str | None:
    """A key strictly between ``lo`` and ``hi`` in UTF-8 byte order, or ``None`` if none exists.

    The math: UTF-8 byte order equals code-point order, so read a key as a fraction in base
    0x110001 whose digits are its code points, with "end of key" as digit 0 (below every
    character) and ``hi=None`` as the virtual digit 0x110000 (above every character). Let ``i``
    be the length of the common prefix ``c``, ``a`` = ``lo[i]`` (0 when ``lo`` ends there) and
    ``b`` = ``hi[i]``; ``a < b`` because ``lo < hi``. Then:

    - a valid code point ``m`` with ``a < m < b`` gives ``c + m``: above ``lo`` (it is larger at
      position ``i``, or extends ``lo``) and below ``hi`` (smaller at ``i``). We take the middle
      of ``(a, b)``, preferring printable characters.
    - otherwise ``a`` and ``b`` are adjacent. If ``hi`` continues past ``i``, ``c + b`` is a
      proper prefix of ``hi`` (so below it) and above ``lo``. Else, if ``a > 0``, recurse on
      the tails: ``c + a + key_between(lo[i+1:], None)``, which exceeds ``lo`` and is below
      ``hi`` at position ``i``; an unbounded upper side always has an answer.
    - else ``lo == c`` and ``hi == c + chr(1)``: only keys with a NUL byte lie between. NUL and
      surrogates are never produced (no store accepts them), so the answer is ``None``.
    """
    if hi is not None and lo >= hi:
        return None
    i = 0
    limit = len(lo) if hi is None else min(len(lo), len(hi))
    while i < limit and hi is not None and lo[i] == hi[i]:
        i += 1
    common = lo[:i]
    a = ord(lo[i]) if i < len(lo) else 0
    b = _TOP if hi is None else ord(hi[i])
    mid = _char_between(a, b)
    if mid is not None:
        return common + chr(mid)
    if hi is not None and len(hi) > i + 1 and _valid(b):
        return common + chr(b)
    if a > 0:
        rest = key_between(lo[i + 1 :], None)
        return None if rest is None else common + chr(a) + rest
    return None


def _upper(end: str | None) -> str | None:
    """The largest bound a split point must stay below (an end ``s + "\\0"`` admits ``s``)."""
    if end is not None and end.endswith("\0"):
        return end[:-1]
    return end


def _flat_equivalent(task: ListTask) -> bool:
    """Whether listing ``task`` without a delimiter covers exactly the same keys.

    A delimited range covers whole subtrees of the common prefixes inside it. A flat range
    covers the keys inside it. They differ only on a subtree a bound cuts through, and a bound
    strictly inside the subtree of ``q`` starts with ``q``, so contains a ``/`` below the
    task's prefix (this includes an end ``q + "\0"``). Bounds without one cut no subtree.
    """
    n = len(task.prefix)
    bounds = [task.start_after] if task.end is None else [task.start_after, task.end]
    return not any(b.startswith(task.prefix) and "/" in b[n:] for b in bounds)


def _column(seen: set[str]) -> str:
    """The characters a key position may hold, from those seen there on a page.

    A page shows a few values of each position: "000"-"049" of a counter, some of the hex
    digits. Widen each to its class (all digits; a-f or a-z; A-F or A-Z) so cuts land where the
    rest of the range's keys are; other characters (literal parts like "shard-") stay as seen.
    """
    chars = set(seen)
    if chars & set(string.digits):
        chars |= set(string.digits)
    for letters, hexdigits in (
        (string.ascii_lowercase, "abcdef"),
        (string.ascii_uppercase, "ABCDEF"),
    ):
        found = chars & set(letters)
        if len(found) >= 2:
            chars |= set(hexdigits) if found <= set(hexdigits) else set(letters)
    return "".join(sorted(chars))


class _Shape:
    """Coordinates for the keys of one region of a task, for arithmetic on keys.

    :func:`key_between` works in the space of all code points, where the middle of "file-0001"
    and *no bound* is U+88000, far from any real key. Here a key is read after ``base`` (the task
    prefix) as a mixed-radix number: position ``j`` has the digits "end of key" (0) and the
    characters of ``columns[j]`` (1..n). Densities (entries per unit) and cut points are computed
    in these units, so cuts land among real keys. The map is monotone for keys that fit the shape
    and only roughly so otherwise, so callers check every point against the true bounds, and a
    page whose keys no longer fit (the listing moved to another kind of key) re-samples it.
    """

    def __init__(self, base: str, columns: list[str]) -> None:
        self.base = base
        self.columns = columns
        self.sets = [frozenset(c) for c in columns]
        self.radixes = [len(c) + 1 for c in columns]
        self.top = math.prod(self.radixes)  # end of the base's key space (exclusive)

    @classmethod
    def sample(cls, base: str, keys: list[str]) -> _Shape | None:
        tails = [k[len(base) :] for k in keys if k.startswith(base)]
        if len(tails) < 2:
            return None
        width = min(_MAX_WIDTH, 4 + max(len(t) for t in tails))
        seen: list[set[str]] = [set() for _ in range(width)]
        for tail in tails:
            for j, ch in enumerate(tail[:width]):
                seen[j].add(ch)
        anything = set().union(*seen) - {"\0"}
        return cls(base, [_column(chars or anything) for chars in seen]) if anything else None

    def fits(self, key: str) -> bool:
        tail = key[len(self.base) :]
        return (
            key.startswith(self.base)
            and len(tail) <= len(self.columns)
            and all(ch in self.sets[j] for j, ch in enumerate(tail))
        )

    def value(self, key: str) -> int:
        if not key.startswith(self.base):
            return 0 if key < self.base else self.top
        tail = key[len(self.base) :]
        v = 0
        for j, column in enumerate(self.columns):
            digit = bisect.bisect_right(column, tail[j]) if j < len(tail) else 0
            v = v * self.radixes[j] + digit
        return v

    def key(self, value: int) -> str:
        digits = []
        for radix in reversed(self.radixes):
            value, d = divmod(value, radix)
            digits.append(d)
        digits.reverse()
        while digits and digits[-1] == 0:  # trailing "end of key" digits
            digits.pop()
        return self.base + "".join(self.columns[j][max(d, 1) - 1] for j, d in enumerate(digits))


class _Running:
    """A task with its live bookkeeping; mutable fields are guarded by the scheduler lock."""

    def __init__(self, task_id: str, task: ListTask, depth: int, shape: _Shape | None = None,
                 density: float | None = None, reach: int = 0) -> None:  # fmt: skip
        self.id = task_id
        self.task = task
        self.depth = depth
        self.cursor = task.start_after  # listed up to here (published for thieves)
        self.saved = task.start_after  # emitted up to here (what the state may record)
        self.shape = shape
        self.density = density  # entries per shape unit on the latest page (or the parent's)
        # For an unbounded range: entries the next cut keeps ahead at least. Each cut of an
        # unbounded range doubles it for the new unbounded tail, so a chain of cuts (tail
        # listed, tail cut again...) grows geometrically instead of by a page per round trip.
        self.reach = reach
        self.filled = False  # the last page was full and wholly inside the range
        self.position = task.start_after  # where the server's listing is (last key returned)
        self.inflight = 0  # entries the request in flight asks for (0: none in flight)
        self.entries = 0
        self.pages = 0
        self.more = False  # the last page said the listing continues
        self.prefixes_found = 0
        self.unsplittable_at: str | None = None  # cursor at which no cut point was found


class ParallelLister:
    """Lists a store with ``workers`` threads; see the module docstring for the design.

    Call order: construct, then ``run()`` once (it blocks); ``stats`` and ``stop()`` may be
    called from any thread meanwhile. ``on_objects`` is called from the worker threads,
    concurrently, each time with one page's objects in key order; the caller makes it
    thread-safe. Its return is what lets the page's cursor be persisted.

    Args:
        store: the (thread-safe) store to list; it retries transient errors itself.
        workers: threads; listing is latency-bound, so many more than CPU cores.
        on_objects: receives every object once (a page again after a resume).
        state: persists task cursors; ``run()`` resumes the tasks ``state.pending()`` returns.
        page_size: objects + prefixes per request (at most 1,000 on S3 and OSS).
        fanout_depth: levels listed with delimiter ``/`` (0: one flat listing, split by range).
        split_ways: parts a task is cut into when its first page continues; ``None``: as many
            as there are idle workers.
        split_ranges: ``False`` never cuts a range (no first-page splits, no stealing): each
            task is listed start to end by one worker, parallel only across the prefixes of the
            delimiter fan-out (a baseline for benchmarks, bench/sim/listing_sim.py). Then every
            level down to ``fanout_depth`` gets a task per common prefix: listing a wide level
            flat, and stopping at 4x the workers, pay off only when ranges are cut.
    """

    def __init__(self, store: Store, *, workers: int = 32,
                 on_objects: Callable[[list[ObjectInfo]], None],
                 state: ListingState | None = None, page_size: int = 1000,
                 fanout_depth: int = 2, split_ways: int | None = None,
                 split_ranges: bool = True) -> None:  # fmt: skip
        if workers < 1 or page_size < 1 or fanout_depth < 0:
            raise ValueError("workers and page_size must be >= 1, fanout_depth >= 0")
        if split_ways is not None and split_ways < 1:
            raise ValueError("split_ways must be >= 1")
        self.store = store
        self.workers = workers
        self.on_objects = on_objects
        self.state = state
        self.page_size = page_size
        self.fanout_depth = fanout_depth
        self.split_ways = split_ways
        self.split_ranges = split_ranges
        self._cond = threading.Condition()
        self._pending: deque[_Running] = deque()
        self._running: dict[str, _Running] = {}
        self._idle = 0
        self._gen = 0  # bumped whenever a task's progress may make a steal possible
        # prefix -> a key past which a flat listing of the prefix found nothing (the page said
        # the listing is over). Ranges starting there need no request; cuts stay below it.
        self._known_end: dict[str, str] = {}
        self._stopping = False
        self._error: BaseException | None = None
        self._root = ""
        self._run_id = uuid.uuid4().hex[:8]
        self._next_id = 0
        self._counts = dict.fromkeys(
            ("objects", "bytes", "prefixes", "pages", "done", "splits", "steals", "over"), 0
        )
        self._started = 0.0
        self._finished: float | None = None

    # -- public --------------------------------------------------------------------------------

    @property
    def stats(self) -> ListingStats:
        with self._cond:
            c = self._counts
            end = self._finished if self._finished is not None else time.monotonic()
            return ListingStats(
                objects=c["objects"], bytes=c["bytes"], prefixes=c["prefixes"], pages=c["pages"],
                tasks_pending=len(self._pending), tasks_running=len(self._running),
                tasks_done=c["done"], splits=c["splits"], steals=c["steals"],
                overfetched=c["over"], elapsed_s=end - self._started if self._started else 0.0,
            )  # fmt: skip

    def stop(self) -> None:
        """Make ``run()`` return after the pages in flight; unfinished tasks stay in the state."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def run(self, prefix: str = "") -> ListingStats:
        """List everything under ``prefix``, or resume the state's unfinished tasks, and return.

        ``prefix`` must be the same when resuming (it sets the fan-out depth of tasks).

        Raises:
            The first error a worker met (``BucketNotFound``, ``AccessDenied``, a transient error
            the store's retries gave up on, or whatever ``on_objects`` raised), once every worker
            has stopped.
        """
        with self._cond:
            if self._started:
                raise RuntimeError("ParallelLister.run() may be called once")
            self._started = time.monotonic()
            self._root = prefix
            saved = self.state.pending() if self.state is not None else []
            for task_id, task, cursor in saved:
                task = replace(task, start_after=max(task.start_after, cursor))
                self._pending.append(_Running(task_id, task, self._depth(task.prefix)))
            if saved:
                log.info("resuming the listing of %s: %d unfinished ranges", self.store, len(saved))
            else:
                self._add_locked(ListTask(prefix, "", None, self.fanout_depth > 0), 0)
        threads = [
            threading.Thread(target=self._worker, name=f"lister-{n}", daemon=True)
            for n in range(self.workers)
        ]
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
        except BaseException:  # KeyboardInterrupt in the caller: stop the workers too
            self.stop()
            for thread in threads:
                if thread.is_alive():
                    thread.join()
            raise
        with self._cond:
            self._finished = time.monotonic()
        stats = self.stats
        if self._error is not None:
            raise self._error
        log.info(
            "listed %d objects (%d bytes) in %d requests, %.2fs; %d splits, %d steals",
            stats.objects, stats.bytes, stats.pages, stats.elapsed_s, stats.splits, stats.steals,
        )  # fmt: skip
        return stats

    # -- scheduling (the *_locked methods run with self._cond held) ----------------------------

    def _depth(self, prefix: str) -> int:
        return prefix[len(self._root) :].count("/") if prefix.startswith(self._root) else 0

    def _new_id(self) -> str:
        self._next_id += 1
        return f"{self._run_id}.{self._next_id}"

    def _save_locked(self, r: _Running) -> None:
        if self.state is not None:
            self.state.save(r.id, r.task, r.saved)

    def _add_locked(self, task: ListTask, depth: int) -> None:
        r = _Running(self._new_id(), task, depth)
        self._save_locked(r)  # saved before the parent's cursor can move past it
        self._pending.append(r)
        self._cond.notify()

    def _worker(self) -> None:
        try:
            while True:
                with self._cond:
                    r = self._next_locked()
                if r is None:
                    return
                self._list(r)
        except BaseException as exc:
            with self._cond:
                if self._error is None:
                    self._error = exc
                self._stopping = True
                self._cond.notify_all()

    def _next_locked(self) -> _Running | None:
        tried_gen = -1
        while not self._stopping:
            if self._pending:
                r = self._pending.popleft()
                self._running[r.id] = r
                if self._exhausted_locked(r):  # nothing past its start: no request needed
                    self._finish_locked(r)
                    continue
                return r
            # A steal can only succeed after some task progressed.
            if self.split_ranges and tried_gen != self._gen:
                tried_gen = self._gen
                stolen = self._steal_locked()
                if stolen is not None:
                    return stolen
            if not self._running:  # nothing queued, nothing in flight: the listing is complete
                self._cond.notify_all()
                return None
            self._idle += 1
            try:
                self._cond.wait(0.5)
            finally:
                self._idle -= 1
        return None

    def _hi_locked(self, r: _Running) -> str | None:
        """The bound cut points stay below: the range's end, or where its prefix is known to end."""
        hi = _upper(r.task.end)
        known = None if r.task.delimited else self._known_end.get(r.task.prefix)
        return known if known is not None and (hi is None or known < hi) else hi

    def _exhausted_locked(self, r: _Running) -> bool:
        known = None if r.task.delimited else self._known_end.get(r.task.prefix)
        return known is not None and r.cursor >= known

    def _finish_locked(self, r: _Running) -> None:
        del self._running[r.id]
        self._counts["done"] += 1
        if self.state is not None:
            self.state.done(r.id)
        if not self._running and not self._pending:
            self._cond.notify_all()  # the listing is complete: release everyone

    def _left(self, r: _Running) -> float | None:
        """Entries between ``r``'s cursor and end at its latest density; None if unknown."""
        if r.shape is None or r.density is None:
            return None
        hi = self._hi_locked(r)
        span = (r.shape.top if hi is None else r.shape.value(hi)) - r.shape.value(r.cursor)
        return max(0.0, min(r.density * min(span, 10**300), _FLOAT_CAP) - r.inflight)

    def _steal_locked(self) -> _Running | None:
        """Cut the running range with the most entries left; the caller lists the first part."""
        floor = _MIN_STEAL_PAGES * self.page_size
        candidates = []
        for r in self._running.values():
            if r.more and r.unsplittable_at != r.cursor:
                left = self._left(r)
                left = float(r.entries) if left is None else left  # unknown: as much again
                if left >= floor:
                    candidates.append((left, r))
        candidates.sort(key=lambda c: c[0], reverse=True)
        for _, victim in candidates:
            ways = 2 if victim.task.end is not None else self._idle + 2
            pieces = self._split_locked(victim, ways)
            if pieces:
                self._pending.extend(pieces[1:])
                self._cond.notify(len(pieces))  # idle workers for the rest, and to steal on
                self._running[pieces[0].id] = pieces[0]
                self._counts["steals"] += 1
                log.debug("task %s stole (%r, %r) from %s", pieces[0].id,
                          pieces[0].task.start_after, pieces[0].task.end, victim.id)  # fmt: skip
                return pieces[0]
        return None

    def _cut_points(self, r: _Running, ways: int) -> tuple[list[str], int]:
        """Up to ``ways - 1`` increasing keys strictly between ``r``'s cursor and end, and the
        ``reach`` of the last part if it is unbounded."""
        lo, hi = r.cursor, self._hi_locked(r)
        if hi is not None and lo >= hi:
            return [], 0
        points: list[str] = []
        reach = 0
        shape = r.shape
        if shape is not None:
            # Cut above what the owner's request in flight will return anyway: a thief taking
            # that part would make the owner's whole page overfetch.
            v_lo = shape.value(lo) + (int(r.inflight / r.density) if r.density else 0)
            values: list[int] = []
            if hi is not None:  # bounded: equal parts
                v_hi = shape.value(hi)
                if v_hi <= v_lo:
                    return [], 0  # what is left will come back with the page in flight
                values = [v_lo + (v_hi - v_lo) * k // ways for k in range(1, ways)]
            elif r.density:
                # Unbounded: the owner keeps K entries at the density just seen (as many again
                # as it listed, two pages, its reach: the most), the next parts take 2K, 4K...,
                # the last keeps no bound: an exponential search, few empty parts however long
                # the prefix turns out to be.
                keep = max(_MIN_STEAL_PAGES * self.page_size, r.entries, r.reach)
                ways = min(ways, _GEOMETRIC_MAX_WAYS)
                unit = keep / r.density
                values = [v_lo + int(min(unit * (2**k - 1), 1e300)) for k in range(1, ways)]
                reach = keep * 2 ** (ways - 1)
            for v in values:
                if v >= shape.top:
                    break
                s = shape.key(v)
                if s > (points[-1] if points else lo) and (hi is None or s < hi):
                    points.append(s)
        if not points and hi is not None:
            mid = key_between(lo, hi)  # keys that don't fit a shape: code-point arithmetic
            if mid is not None:
                points.append(mid)
        return points, reach

    def _split_locked(self, r: _Running, ways: int) -> list[_Running]:
        """Cut ``r``'s range above its cursor into up to ``ways`` parts; return the new ones."""
        points, reach = self._cut_points(r, ways)
        if not points:
            r.unsplittable_at = r.cursor
            return []
        pieces = []
        for i, s in enumerate(points):
            end = points[i + 1] + "\0" if i + 1 < len(points) else r.task.end
            task = ListTask(r.task.prefix, s, end, r.task.delimited)
            piece = _Running(self._new_id(), task, r.depth, r.shape, r.density,
                             reach if end is None else 0)  # fmt: skip
            self._save_locked(piece)  # persisted before the owner gives the range up
            pieces.append(piece)
        r.task = replace(r.task, end=points[0] + "\0")
        self._save_locked(r)
        self._counts["splits"] += len(pieces)
        return pieces

    # -- listing one task ------------------------------------------------------------------------

    def _list(self, r: _Running) -> None:
        token: str | None = None
        start_after = r.task.start_after
        delimited = r.task.delimited
        limit = 0
        while True:
            with self._cond:
                if self._stopping:  # the task stays in the state, resumable from r.saved
                    del self._running[r.id]
                    return
                if delimited != r.task.delimited:  # converted to a flat listing: start over
                    delimited, token = r.task.delimited, None
                limit = r.inflight = self._limit_locked(r, limit)
            page = self.store.list_page(r.task.prefix, start_after=start_after,
                                        delimiter="/" if delimited else "",
                                        limit=limit, token=token)  # fmt: skip
            with self._cond:
                finished, objects, subdirs = self._take_page_locked(r, page, start_after, limit)
            if objects:
                self.on_objects(objects)
            with self._cond:
                self._counts["objects"] += len(objects)
                self._counts["bytes"] += sum(map(_SIZE, objects))
                # Subdirectory tasks are saved together with the cursor that passes them,
                # after on_objects took the page: saved any earlier, a page whose cursor is
                # never saved (on_objects raised, the process died) would be listed again on
                # resume and spawn the same subtrees a second time. Saved before the cursor,
                # a crash between the two saves costs a duplicate, never a lost subtree.
                for q in subdirs:
                    self._spawn_locked(r, q)
                if finished or self._exhausted_locked(r):
                    self._finish_locked(r)
                    return
                r.saved = r.cursor
                self._save_locked(r)
            token = page.token

    def _limit_locked(self, r: _Running, previous: int) -> int:
        """Entries to ask for: a page, or a little more than a bounded range has left.

        Every entry past a range's end is transferred and parsed for nothing, and each range's
        last page would otherwise overshoot by half a page on average. A guess that was too
        small (the page came back full) doubles, so it costs few extra requests.
        """
        left = self._left(r) if r.task.end is not None else None
        if left is None:
            return self.page_size
        want = int(left * 1.1) + 16
        if r.filled and previous < self.page_size:  # our last guess was short: grow it
            want = max(want, 2 * previous)
        return max(1, min(self.page_size, want))

    def _take_page_locked(self, r: _Running, page: ListPage, start_after: str, limit: int) -> tuple[bool, list[ObjectInfo], list[str]]:  # fmt: skip
        """Keep the page's entries inside ``r``'s current range, advance its cursor, maybe split.

        Returns (task finished, objects to emit, subdirectories to spawn tasks for).
        """
        end = r.task.end  # read now, not before the request: a thief may have shrunk it
        r.inflight = 0
        objects = page.objects  # in key order: only its ends can fall outside the range
        if objects and (
            objects[0].key <= start_after or (end is not None and objects[-1].key >= end)
        ):
            objects = [o for o in objects if o.key > start_after and (end is None or o.key < end)]
        # A prefix at or below start_after was reached from inside its subtree: the range that
        # holds the prefix itself spawned its task.
        subdirs = [q for q in page.prefixes if q > start_after and (end is None or q < end)]
        entries = len(objects) + len(subdirs)
        self._counts["pages"] += 1
        if (
            self.split_ranges
            and r.task.delimited
            and r.pages == 0
            and page.token is not None
            and 2 * len(subdirs) >= self.page_size
            and _flat_equivalent(r.task)
        ):
            # A wide level: drop this page and list the same range flat (module docstring).
            r.task = replace(r.task, delimited=False)
            self._save_locked(r)
            self._counts["over"] += len(page.objects) + len(page.prefixes)
            log.debug("listing %r flat: %d subdirectories on one page", r.task.prefix, len(subdirs))
            return False, [], []
        self._counts["over"] += len(page.objects) + len(page.prefixes) - entries
        if entries:
            if subdirs:
                keys = sorted([o.key for o in objects] + subdirs)
                first, last = keys[0], keys[-1]
            else:  # no list of keys unless a shape must be sampled (per-key CPU adds up)
                keys = []
                first, last = objects[0].key, objects[-1].key
            # The shape serves cuts only; sampling it costs about 1 ms per 1,000-key page.
            if self.split_ranges and (
                r.shape is None or not (r.shape.fits(first) and r.shape.fits(last))
            ):
                keys = keys or [o.key for o in objects]
                r.shape = _Shape.sample(r.task.prefix, keys) or r.shape
            if r.shape is not None and entries >= 2:
                # This page's own density: where listing is now, not where it started.
                span = r.shape.value(last) - r.shape.value(first)
                r.density = (entries - 1) / span if span > 0 else None
            r.cursor = max(r.cursor, last)
        r.entries += entries
        r.pages += 1
        past_end = end is not None and (
            (bool(page.objects) and page.objects[-1].key >= end)
            or (bool(page.prefixes) and page.prefixes[-1] >= end)
        )
        r.more = page.token is not None and not past_end
        if page.objects:
            r.position = page.objects[-1].key
        if page.token is None and not r.task.delimited:
            # The server has nothing under this prefix past what it just returned.
            known = self._known_end.get(r.task.prefix)
            self._known_end[r.task.prefix] = r.position if known is None else min(known, r.position)
        r.filled = r.more and entries == limit
        if r.pages == 1 and r.more:
            ways = self._ways_locked(r)
            if ways >= 2:
                self._pending.extend(self._split_locked(r, ways))
                self._cond.notify_all()
        if r.more:
            self._gen += 1
            self._cond.notify()  # an idle worker may steal from r now
        return not r.more, objects, subdirs

    def _ways_locked(self, r: _Running) -> int:
        if not self.split_ranges:
            return 1
        idle = max(0, self._idle - len(self._pending))
        ways = self.split_ways if self.split_ways is not None else idle + 1
        if r.task.end is not None:  # bounded: no part smaller than a page
            left = self._left(r)
            ways = min(ways, 1 + int((left or 0.0) // self.page_size))
        return ways

    def _spawn_locked(self, parent: _Running, prefix: str) -> None:
        self._counts["prefixes"] += 1
        parent.prefixes_found += 1
        depth = parent.depth + 1
        # Fan out further only while a level is narrow: past 4x the workers there is enough
        # parallelism, and a delimited listing of each child costs requests for every subdir.
        narrow = parent.prefixes_found <= 4 * self.workers or not self.split_ranges
        delimited = depth < self.fanout_depth and narrow
        self._add_locked(ListTask(prefix, "", None, delimited), depth)
