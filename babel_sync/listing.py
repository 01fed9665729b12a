"""Parallel metadata prefetch: list a store of millions to billions of keys with many requests
in flight, streaming results to a callback, with resumable per-range cursors.

A serial ListObjectsV2 walk is one round trip per 1,000 keys; across regions that is hours. Here
the key space is cut into **tasks**, each a key range listed by one worker at a time:

- **Delimiter fan-out.** The first ``fanout_depth`` levels are listed with delimiter ``/``: each
  common prefix becomes its own task, objects at that level are emitted by the delimited listing.
  A level that turns out to hold many prefixes (more than ``4 * workers``) already gives enough
  parallelism, so its children are listed flat rather than fanned out further.
- **Range splitting.** When a task's first page is full and continues, the remainder is split
  into sub-ranges at keys computed from the shape of the first page (its alphabet; see
  :class:`_Shape`): evenly when the range is bounded, geometrically (1, 2, 4... pages ahead)
  when it is not, because nothing tells us where an unbounded prefix ends.
- **Work stealing.** An idle worker picks the running task with the most keys left (estimated
  from its density so far), computes a split point above its published cursor, shrinks the
  owner's end to it and lists the upper part itself.

**Invariant (no key dropped, none duplicated).** A task covers the keys ``k`` with its prefix and
``start_after < k < end``. In a delimited task an "entry" is an object or a common prefix, and a
common prefix stands for its whole subtree, which a child task lists. Tasks' ranges are pairwise
disjoint and their union (with the child subtrees) is the whole listing, because the only ways a
range changes are: (1) splitting at a point ``s`` strictly above the owner's cursor, after which
the owner covers ``(cursor, s]`` (its end becomes ``s + "\\0"``, the immediate successor of
``s``: ``k < s + "\\0"`` iff ``k <= s``) and the new task covers ``(s, old end)`` by listing with
``start_after=s``; (2) a worker moving its cursor past entries it has emitted. Splits happen
under the scheduler lock, a worker checks each page against its *current* end under the same
lock, and it only publishes a cursor it is about to emit up to, so a page fetched before a steal
never emits keys the thief owns. A delimited listing started inside a subtree (``start_after``
below a common prefix ``q``) may see ``q`` again; ``q <= start_after`` is dropped because the
range holding the string ``q`` spawned its task.

**Persistence.** With a :class:`ListingState`, every task is saved before it is queued, a new
range is saved *before* its owner is saved with the shrunken end, and a cursor is saved only
after ``on_objects`` returned for the page. A crash at any point therefore leaves ranges that
overlap at worst (a few keys emitted twice), never a gap.
"""

from __future__ import annotations

import bisect
import logging
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
_GEOMETRIC_MAX_WAYS = 8  # unbounded splits cover 1+2+...+64 first-page spans, then a tail
_MIN_STEAL_PAGES = 2  # stealing less than this costs more round trips than it saves
_MAX_WIDTH = 128  # characters of a key that split arithmetic looks at


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
    """A snapshot of listing progress (for a progress bar and the run's summary)."""

    objects: int = 0
    bytes: int = 0
    prefixes: int = 0
    pages: int = 0
    tasks_pending: int = 0
    tasks_running: int = 0
    tasks_done: int = 0
    splits: int = 0
    steals: int = 0
    overfetched: int = 0  # entries fetched past a range end (shrunk by a steal) and dropped
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


def _common_prefix(a: str, b: str) -> str:
    """The longest common prefix, by character (``os.path.commonprefix`` is meant for paths)."""
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return a[:i]


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


class _Shape:
    """Coordinates for the keys of one task: arithmetic on keys in the alphabet they use.

    ``key_between`` works in the space of all code points, where the middle of "file-0001" and
    *no bound* is U+88000, far from any real key. Real keys use a small alphabet (digits, hex, a
    few letters), so a key after ``base`` (the task's prefix) is read as a ``width``-digit number
    in base ``len(alphabet) + 1`` over the characters seen on the task's first page, digit 0
    being "end of key". Densities (entries per unit) and split points are computed there. The
    map is monotone for keys inside the alphabet and only roughly so outside it, so callers
    check every computed point against the true bounds.
    """

    def __init__(self, alphabet: str, base: str, width: int) -> None:
        self.alphabet = alphabet
        self.base = base
        self.width = width
        self.radix = len(alphabet) + 1
        self.top = self.radix**width  # the end of the base's key space (exclusive)

    @classmethod
    def sample(cls, base: str, keys: list[str]) -> _Shape | None:
        tails = [k[len(base) :] for k in keys if k.startswith(base)]
        chars = sorted({ch for tail in tails for ch in tail} - {"\0"})
        if len(chars) < 2:
            return None
        width = min(_MAX_WIDTH, 4 + max(len(t) for t in tails))
        return cls("".join(chars), base, width)

    def value(self, key: str) -> int:
        if not key.startswith(self.base):
            return 0 if key < self.base else self.top
        tail = key[len(self.base) : len(self.base) + self.width]
        v = 0
        for ch in tail:
            v = v * self.radix + bisect.bisect_right(self.alphabet, ch)
        return v * self.radix ** (self.width - len(tail))

    def key(self, value: int) -> str:
        digits = []
        for _ in range(self.width):
            value, d = divmod(value, self.radix)
            digits.append(d)
        while digits and digits[0] == 0:  # least significant first: drop "end of key" digits
            digits.pop(0)
        digits.reverse()
        return self.base + "".join(self.alphabet[max(d, 1) - 1] for d in digits)


class _Running:
    """A task with its live bookkeeping; mutable fields are guarded by the scheduler lock."""

    def __init__(self, task_id: str, task: ListTask, depth: int, shape: _Shape | None = None,
                 ahead: int = 0) -> None:  # fmt: skip
        self.id = task_id
        self.task = task
        self.depth = depth
        self.cursor = task.start_after  # listed up to here (published for thieves)
        self.saved = task.start_after  # emitted up to here (what the state may record)
        self.shape = shape
        # Entries of the same unbounded range before this one's start: how far a cut of an
        # unbounded range reaches, so a chain of cuts grows geometrically, not page by page.
        self.ahead = ahead
        self.density: float | None = None  # entries per shape unit on the latest page
        self.entries = 0
        self.pages = 0
        self.more = False  # the last page said the listing continues
        self.prefixes_found = 0
        self.unsplittable_at: str | None = None  # cursor at which no split point was found
        self.estimate: tuple[str, str | None, float] | None = None  # (cursor, end, entries left)


class ParallelLister:
    """Lists a store with ``workers`` threads; see the module docstring for the design.

    Call order: construct, then ``run()`` once (blocking); ``stats`` and ``stop()`` may be
    called from any thread meanwhile. ``on_objects`` is called from worker threads, concurrently,
    each time with a key-ordered batch (one page); the caller makes it thread-safe. It returning
    is what lets the page's cursor be persisted.

    Args:
        store: the (thread-safe) store to list; it retries transient errors itself.
        workers: threads; listing is latency-bound, so many more than CPU cores.
        on_objects: receives every object once (a few twice after a resume).
        state: persists task cursors; a run resumes the tasks ``state.pending()`` returns.
        page_size: objects + prefixes per request (at most 1,000 on S3/OSS).
        fanout_depth: levels listed with delimiter ``/`` (0: one flat listing, split by range).
        split_ways: ranges a task is cut into when its first page continues; ``None``: as many as
            there are idle workers.
    """

    def __init__(self, store: Store, *, workers: int = 32,
                 on_objects: Callable[[list[ObjectInfo]], None],
                 state: ListingState | None = None, page_size: int = 1000,
                 fanout_depth: int = 2, split_ways: int | None = None) -> None:  # fmt: skip
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
        self._cond = threading.Condition()
        self._pending: deque[_Running] = deque()
        self._running: dict[str, _Running] = {}
        self._idle = 0
        self._stopping = False
        self._error: BaseException | None = None
        self._root = ""
        self._run_id = uuid.uuid4().hex[:8]
        self._next_id = 0
        self._gen = 0  # bumped whenever a task's progress might make a steal possible
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
        """Make ``run()`` return soon (after in-flight pages); unfinished tasks stay in the state."""
        with self._cond:
            self._stopping = True
            self._cond.notify_all()

    def run(self, prefix: str = "") -> ListingStats:
        """List everything under ``prefix`` (or resume the state's pending tasks) and return.

        Raises:
            The first error a worker met (``BucketNotFound``, ``AccessDenied``, a transient error
            the store's retries gave up on, or an exception from ``on_objects``), after every
            worker has stopped.
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
                log.info("resuming listing of %s: %d unfinished ranges", self.store, len(saved))
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
        except BaseException:  # KeyboardInterrupt in the caller's thread: stop the workers too
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

    # -- scheduling (all *_locked methods run with self._cond held) ---------------------------

    def _depth(self, prefix: str) -> int:
        return prefix[len(self._root) :].count("/") if prefix.startswith(self._root) else 0

    def _new_id(self) -> str:
        self._next_id += 1
        return f"{self._run_id}.{self._next_id}"

    def _save_locked(self, r: _Running) -> None:
        if self.state is not None:
            self.state.save(r.id, r.task, r.saved)

    def _add_locked(self, task: ListTask, depth: int) -> _Running:
        r = _Running(self._new_id(), task, depth)
        self._save_locked(r)  # saved before it can be the reason a parent's cursor moves on
        self._pending.append(r)
        self._cond.notify()
        return r

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
                return r
            if tried_gen != self._gen:  # a steal can only succeed after some task progressed
                tried_gen = self._gen
                stolen = self._steal_locked()
                if stolen is not None:
                    self._cond.notify()  # let the next idle worker look for more to steal
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

    def _estimate(self, r: _Running) -> float:
        """Entries ``r`` has left at its latest density (an unbounded range looks huge)."""
        if r.estimate is None or r.estimate[:2] != (r.cursor, r.task.end):
            left = 0.0
            if r.more and r.shape is not None:
                hi = _upper(r.task.end)
                top = r.shape.top if hi is None else r.shape.value(hi)
                span = top - r.shape.value(r.cursor)
                if span > 0:
                    # Unknown density (keys longer than the shape's width): assume as much again.
                    left = float(r.entries) if r.density is None else min(r.density * span, 1e18)
            r.estimate = (r.cursor, r.task.end, left)
        return r.estimate[2]

    def _steal_locked(self) -> _Running | None:
        """Split the running range with the most entries left; the caller lists the upper part."""
        floor = _MIN_STEAL_PAGES * self.page_size
        candidates = [
            (left, r)
            for r in self._running.values()
            if r.unsplittable_at != r.cursor and (left := self._estimate(r)) >= floor
        ]
        candidates.sort(key=lambda c: c[0], reverse=True)
        for _, victim in candidates:
            pieces = self._split_locked(victim, 2)
            if pieces:
                thief = pieces[0]
                self._running[thief.id] = thief
                self._counts["steals"] += 1
                log.debug("task %s stole (%r, %r) from %s", thief.id, thief.task.start_after,
                          thief.task.end, victim.id)  # fmt: skip
                return thief
        return None

    def _split_points(self, r: _Running, ways: int) -> list[tuple[str, int]]:
        """Up to ``ways - 1`` increasing (key, ahead) cut points strictly inside ``r``'s range."""
        lo, hi = r.cursor, _upper(r.task.end)
        if hi is not None and lo >= hi:
            return []
        shape, values = r.shape, []
        if shape is not None:
            v_lo = shape.value(lo)
            if hi is not None:  # bounded: equal parts
                v_hi = shape.value(hi)
                values = [(v_lo + (v_hi - v_lo) * k // ways, 0) for k in range(1, ways)]
            elif r.density:
                # Unbounded: nothing says where the prefix ends. Let the owner keep as many
                # entries as the range has behind it (at least a page), then cut the rest at
                # 1, 2, 4... times that and leave the last part unbounded: an exponential search
                # that leaves few empty ranges however long the prefix turns out to be.
                unit = max(self.page_size, r.ahead + r.entries)
                ways = min(ways, _GEOMETRIC_MAX_WAYS)
                for k in range(1, ways):
                    ahead = unit * (2**k - 1)
                    values.append((v_lo + int(ahead / r.density), r.ahead + r.entries + ahead))
        points: list[tuple[str, int]] = []
        for v, ahead in values:
            if v >= shape.top:  # type: ignore[union-attr]  # values is empty without a shape
                break
            s = shape.key(v)  # type: ignore[union-attr]
            if s > (points[-1][0] if points else lo) and (hi is None or s < hi):
                points.append((s, ahead))
        if not points and hi is not None:
            mid = key_between(lo, hi)  # outside the alphabet: plain code-point arithmetic
            if mid is not None:
                points.append((mid, 0))
        return points

    def _split_locked(self, r: _Running, ways: int) -> list[_Running]:
        """Cut ``r``'s range above its cursor into up to ``ways`` parts; return the new ones."""
        points = self._split_points(r, ways)
        if not points:
            r.unsplittable_at = r.cursor
            return []
        old_end = r.task.end
        pieces = []
        for i, (s, ahead) in enumerate(points):
            end = points[i + 1][0] + "\0" if i + 1 < len(points) else old_end
            task = ListTask(r.task.prefix, s, end, r.task.delimited)
            piece = _Running(self._new_id(), task, r.depth, r.shape, ahead)
            self._save_locked(piece)  # persisted before the owner gives the range up
            pieces.append(piece)
        r.task = replace(r.task, end=points[0][0] + "\0")
        self._save_locked(r)
        self._counts["splits"] += len(pieces)
        return pieces

    # -- listing one task ------------------------------------------------------------------------

    def _list(self, r: _Running) -> None:
        token: str | None = None
        start_after = r.task.start_after
        delimited = r.task.delimited
        while True:
            with self._cond:
                if self._stopping:  # the task stays in the state, resumable from r.saved
                    del self._running[r.id]
                    return
                if delimited != r.task.delimited:  # converted to a flat listing: start over
                    delimited, token = r.task.delimited, None
            page = self.store.list_page(r.task.prefix, start_after=start_after,
                                        delimiter="/" if delimited else "",
                                        limit=self.page_size, token=token)  # fmt: skip
            with self._cond:
                finished, objects = self._take_page_locked(r, page, start_after)
            if objects:
                self.on_objects(objects)
            with self._cond:
                self._counts["objects"] += len(objects)
                self._counts["bytes"] += sum(o.size for o in objects)
                if finished:
                    del self._running[r.id]
                    self._counts["done"] += 1
                    if self.state is not None:
                        self.state.done(r.id)
                    self._cond.notify_all()
                    return
                # Persist only what on_objects has taken; the page's prefixes were saved as
                # tasks already, so the cursor may pass them too.
                r.saved = r.cursor
                self._save_locked(r)
            token = page.token

    def _take_page_locked(self, r: _Running, page: ListPage, start_after: str) -> tuple[bool, list[ObjectInfo]]:  # fmt: skip
        """Keep the page's entries inside ``r``'s current range, spawn prefix tasks, maybe split.

        Returns (task finished, objects to emit).
        """
        end = r.task.end  # read now, not before the request: a thief may have shrunk it
        inside = lambda k: k > start_after and (end is None or k < end)  # noqa: E731
        objects = [o for o in page.objects if inside(o.key)]
        # A prefix at or below start_after was reached from inside its subtree: its task was
        # spawned by the range that holds the prefix itself.
        subdirs = [q for q in page.prefixes if inside(q)]
        entries = len(objects) + len(subdirs)
        self._counts["pages"] += 1
        if (
            r.task.delimited
            and r.pages == 0
            and page.token is not None
            and 2 * len(subdirs) >= self.page_size
            and _flat_equivalent(r.task)
        ):
            # A wide level (hundreds of subdirectories per page): a task per subdirectory
            # costs a request per subdirectory however few keys each holds, while a flat
            # listing split by key range costs one per page of keys. Drop this page and
            # list the same range flat.
            r.task = replace(r.task, delimited=False)
            self._save_locked(r)
            self._counts["over"] += len(page.objects) + len(page.prefixes)
            log.debug("listing %r flat: %d subdirectories on one page", r.task.prefix, len(subdirs))
            return False, []
        self._counts["over"] += len(page.objects) + len(page.prefixes) - entries
        if entries:
            first = min(
                objects[0].key if objects else subdirs[0], subdirs[0] if subdirs else objects[0].key
            )
            last = max(objects[-1].key if objects else "", subdirs[-1] if subdirs else "")
            if r.shape is None:
                keys = [o.key for o in objects] + subdirs
                r.shape = _Shape.sample(r.task.prefix, keys)
            if r.shape is not None and entries >= 2:
                # This page's own density: robust to outliers far from where listing now is.
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
        for q in subdirs:
            self._spawn_locked(r, q)
        if r.pages == 1 and r.more:
            ways = self._ways_locked(r)
            if ways >= 2:
                self._pending.extend(self._split_locked(r, ways))
                self._cond.notify_all()
        if r.more:
            self._gen += 1
            self._cond.notify()  # an idle worker may steal from r now
        return not r.more, objects

    def _ways_locked(self, r: _Running) -> int:
        idle = max(0, self._idle - len(self._pending))
        ways = self.split_ways if self.split_ways is not None else idle + 1
        if r.task.end is not None:  # bounded: no piece smaller than a page
            ways = min(ways, int(self._estimate(r) // self.page_size) + 1)
        return ways

    def _spawn_locked(self, parent: _Running, prefix: str) -> None:
        self._counts["prefixes"] += 1
        parent.prefixes_found += 1
        depth = parent.depth + 1
        # Fan out further only while a level is narrow: past 4x the workers there is enough
        # parallelism, and a delimited listing of each child costs requests for every subdir.
        delimited = depth < self.fanout_depth and parent.prefixes_found <= 4 * self.workers
        self._add_locked(ListTask(prefix, "", None, delimited), depth)
