"""The pieces of the listing simulation: a generated key space, a virtual clock, a rate-limited
server and a listing-only store on them, the real ``ParallelLister`` put on the clock, and an
exactly-once check of what it emits (the command is bench/sim/listing_sim.py).

**Key space** (:class:`KeySpace`): segments of keys that are a pure function of their index
(``images/part-0007/shard-00012/00345.jpg``: fixed-width decimal fields in mixed radix), so no
190 M-key list is held. A key is placed among them by arithmetic on the fields
(:meth:`Segment.lower_bound`), a page is built from the index range it covers, and a delimited
page skips a whole subtree per common prefix. Objects are a lean :class:`ObjectInfo` subclass
(the key in a slot; size, mtime and ETag constants of the segment): the lister reads only ``key``
and ``size``, and 190 M ``ObjectInfo.listed`` calls would cost minutes of CPU.

**Server** (:class:`Server`): a request takes ``latency`` seconds, and at most ``rate`` requests
a second start (a GCRA token bucket of ``burst``; excess requests queue at the server rather
than being refused). Optionally one client core then parses each response, in arrival order.

**Clock** (:class:`VirtualClock`): the lister's threads block in exactly two places: in the
store, waiting for a response, and idle in the lister's condition variable. The clock counts
*runnable* threads; when the last one blocks, time jumps to the earliest pending event (a
response, or an idle wait's 0.5 s timeout) and that one thread is woken. Simulated time is thus
what the listing takes given enough client CPU; real time is only this process's CPU. The lister
is the real :class:`ParallelLister` (fan-out by delimiter, range splitting by key shape, work
stealing, request limits), subclassed in :class:`VirtualLister` only to put its condition
variable on the clock and to see its threads exit.

**Check** (:class:`Coverage`): a page's first and last keys are mapped back to their indices,
the index runs merged as they arrive; a listing is exact when they form the single run
``[0, N)``. Memory: a run per range in progress.
"""

from __future__ import annotations

import bisect
import heapq
import itertools
import logging
import math
import threading
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from itertools import repeat
from typing import Any

from babel_sync.listing import ListingStats, ParallelLister
from objstore import ListPage, ObjectInfo, Store, StoreURL

log = logging.getLogger(__name__)

MTIME = 1_767_225_600.0  # 2026-01-01
ETAG = "9b2cf535f27731c974343645a3985328"  # a plain 32-hex-digit ETag, as OSS lists them
_MAX_CHAR = chr(0x10FFFF)

# -- the key space ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Field:
    """A fixed-width decimal field taking ``count`` values from ``start``."""

    width: int
    count: int
    start: int = 0

    def text(self, v: int) -> str:
        return f"{self.start + v:0{self.width}d}"


def _successor(prefix: str) -> str | None:
    """The least string above every string starting with ``prefix`` (None: no such bound)."""
    p = prefix.rstrip(_MAX_CHAR)
    return p[:-1] + chr(ord(p[-1]) + 1) if p else None


_new = object.__new__


class Segment:
    """Keys ``parts[0] + parts[1] + ...`` where literal parts are ``str`` and :class:`Field` parts
    count in mixed radix, the last fastest. Fixed widths make index order key order, every key
    the same length, and the ``/`` positions the same in every key.

    Args:
        parts: literals and fields; only literals may follow the last field.
        size: every object's size in bytes.
    """

    def __init__(self, parts: Sequence[str | Field], size: int) -> None:
        self.parts = tuple(parts)
        self.size = size
        self.fields = [p for p in self.parts if isinstance(p, Field)]
        for f in self.fields:
            if f.count < 1 or f.start < 0 or f.start + f.count > 10**f.width:
                raise ValueError(f"field {f} does not fit its width")
        counts = [f.count for f in self.fields]
        self.total = math.prod(counts)
        self.strides = [math.prod(counts[k + 1 :]) for k in range(len(counts))]
        fmt, offsets, pos, k = [], [], 0, 0
        for p in self.parts:
            if isinstance(p, Field):
                fmt.append(f"{{{k}:0{p.width}d}}")
                offsets.append(pos)
                pos, k = pos + p.width, k + 1
            else:
                fmt.append(p.replace("{", "{{").replace("}", "}}"))
                pos += len(p)
        self._fmt = "".join(fmt)
        self._offsets = offsets
        if self.fields:
            last = max(i for i, p in enumerate(self.parts) if isinstance(p, Field))
            self._stem_fmt = "".join(fmt[:last])
            tail = "".join(str(p) for p in self.parts[last + 1 :])
            self._tails = [self.fields[-1].text(v) + tail for v in range(self.fields[-1].count)]
        self.first = self.key(0)
        self.last = self.key(self.total - 1)
        self.length = len(self.first)
        # Listings return these: the key in a slot, the other fields constants of the class.
        self.cls: type[ObjectInfo] = type(
            "SimObjectInfo", (ObjectInfo,),
            {"__slots__": ("key",), "size": size, "mtime": MTIME, "etag": ETAG, "metadata": {}},
        )  # fmt: skip
        self._set_key = self.cls.__dict__["key"].__set__

    @property
    def shape(self) -> str:
        """The keys with each field's digits as ``#``."""
        return "".join(p if isinstance(p, str) else "#" * p.width for p in self.parts)

    def __repr__(self) -> str:
        return f"Segment({self.shape!r}, {self.total:,} keys)"

    def _values(self, i: int) -> list[int]:
        values = []
        for f, stride in zip(self.fields, self.strides, strict=True):
            digit, i = divmod(i, stride)
            values.append(f.start + digit)
        return values

    def key(self, i: int) -> str:
        """The ``i``-th key (0 <= i < total)."""
        return self._fmt.format(*self._values(i))

    def keys(self, lo: int, hi: int) -> list[str]:
        """Keys ``lo`` to ``hi - 1``: runs of the last field share a formatted stem."""
        if not self.fields:
            return [self.first] if lo < hi else []
        out: list[str] = []
        n = self.fields[-1].count
        tails = self._tails
        while lo < hi:
            head, v = divmod(lo, n)
            take = min(hi - lo, n - v)
            stem = self._stem_fmt.format(*self._values(head * n)[:-1])
            out.extend(map(stem.__add__, tails[v : v + take]))
            lo += take
        return out

    def objects(self, lo: int, hi: int) -> list[ObjectInfo]:
        keys = self.keys(lo, hi)
        objects = list(map(_new, repeat(self.cls, len(keys))))
        deque(map(self._set_key, objects, keys), maxlen=0)
        return objects

    def lower_bound(self, s: str) -> int:
        """How many keys of the segment are ``< s`` (any string), by walking the parts."""
        base, span, pos = 0, self.total, 0
        for p in self.parts:
            if isinstance(p, str):
                t = s[pos : pos + len(p)]
                if t != p:
                    return base if t < p else base + span
                pos += len(p)
                continue
            span //= p.count
            t = s[pos : pos + p.width]
            v = int(t) - p.start if len(t) == p.width and t.isascii() and t.isdigit() else -1
            if 0 <= v < p.count:
                base += v * span
                pos += p.width
                continue
            # t is no value of the field: count the values whose text sorts below it.
            return base + span * bisect.bisect_left(range(p.count), t, key=p.text)
        return base if pos >= len(s) else base + 1  # equal to s, or a proper prefix of it

    def slash_after(self, n: int) -> int:
        """Where the first ``/`` at or after position ``n`` is in every key (-1: none)."""
        return self.first.find("/", n)

    def index_of(self, key: str) -> int | None:
        """The index of ``key`` in the segment, or None if it is not one of its keys."""
        if len(key) != self.length:
            return None
        i = 0
        for f, off, stride in zip(self.fields, self._offsets, self.strides, strict=True):
            t = key[off : off + f.width]
            if not (t.isascii() and t.isdigit()) or not 0 <= int(t) - f.start < f.count:
                return None
            i += (int(t) - f.start) * stride
        return i if self.key(i) == key else None


class KeySpace:
    """An ordered key space made of segments whose key ranges do not interleave."""

    def __init__(self, segments: Iterable[Segment]) -> None:
        self.segments = sorted(segments, key=lambda g: g.first)
        for a, b in itertools.pairwise(self.segments):
            if not a.last < b.first:
                raise ValueError(f"{a} and {b} interleave")
        self.offsets = [0, *itertools.accumulate(g.total for g in self.segments)]
        self.total = self.offsets[-1]
        self.bytes = sum(g.total * g.size for g in self.segments)
        self._firsts = [g.first for g in self.segments]

    def _segment(self, i: int) -> int:
        return bisect.bisect_right(self.offsets, i) - 1

    def key(self, i: int) -> str:
        j = self._segment(i)
        return self.segments[j].key(i - self.offsets[j])

    def rank(self, s: str) -> int:
        """How many keys are ``< s``."""
        j = bisect.bisect_left(self._firsts, s)  # segments from j on start at or above s
        return 0 if j == 0 else self.offsets[j - 1] + self.segments[j - 1].lower_bound(s)

    def rank_after(self, s: str) -> int:
        """How many keys are ``<= s`` (``s + NUL`` is the least string above ``s``)."""
        return self.rank(s + "\0")

    def prefix_bounds(self, prefix: str) -> tuple[int, int]:
        """The index range of the keys starting with ``prefix``."""
        nxt = _successor(prefix)
        return self.rank(prefix), self.total if nxt is None else self.rank(nxt)

    def objects(self, lo: int, hi: int) -> list[ObjectInfo]:
        out: list[ObjectInfo] = []
        while lo < hi:
            j = self._segment(lo)
            off, end = self.offsets[j], min(hi, self.offsets[j + 1])
            out += self.segments[j].objects(lo - off, end - off)
            lo = end
        return out

    def index_of(self, key: str) -> int | None:
        j = bisect.bisect_right(self._firsts, key) - 1
        if j < 0:
            return None
        i = self.segments[j].index_of(key)
        return None if i is None else self.offsets[j] + i

    def all_keys(self) -> list[str]:
        """Every key in order (tests, on small spaces)."""
        return [k for g in self.segments for k in g.keys(0, g.total)]

    def describe(self) -> list[dict[str, Any]]:
        return [{"shape": g.shape, "keys": g.total, "size": g.size} for g in self.segments]


# -- the virtual clock -------------------------------------------------------------------------


class _Wake:
    """One blocked thread: it sleeps on ``lock`` until the clock or a notify releases it."""

    __slots__ = ("done", "lock", "popped")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lock.acquire()
        self.done = False  # released (by its timer or a notify): its timer is void
        self.popped = False  # taken off a condition's waiters by a notify


class VirtualClock:
    """Simulated time for a set of threads that block only through this clock.

    ``runnable`` counts the threads that may still act at the current time. A thread that
    blocks (:meth:`sleep_until`, :meth:`VirtualCondition.wait`) decrements it; when it reaches
    zero, time jumps to the earliest timer and that one thread is released (counted runnable
    again before it runs, so no other thread can move time meanwhile). Thread-safe.
    """

    def __init__(self, on_tick: Callable[[], None] | None = None) -> None:
        self.lock = threading.Lock()
        self.now = 0.0
        self.advances = 0
        self._runnable = 0
        self._timers: list[tuple[float, int, _Wake]] = []
        self._seq = itertools.count()
        self._on_tick = on_tick

    def enter(self, threads: int = 1) -> None:
        """``threads`` more threads run on this clock (count them before they start)."""
        with self.lock:
            self._runnable += threads

    def exit(self) -> None:
        """The calling thread stops using the clock (it is returning)."""
        with self.lock:
            self._runnable -= 1
            self._advance_locked()

    def sleep_until(self, when: float) -> None:
        wake = _Wake()
        with self.lock:
            heapq.heappush(self._timers, (when, next(self._seq), wake))
            self._runnable -= 1
            self._advance_locked()
        wake.lock.acquire()

    def _advance_locked(self) -> None:
        while self._runnable <= 0 and self._timers:
            when, _, wake = heapq.heappop(self._timers)
            if wake.done:
                continue
            wake.done = True
            self.now = max(self.now, when)
            self._runnable += 1
            self.advances += 1
            if self._on_tick is not None and self.advances % 2048 == 0:
                self._on_tick()
            wake.lock.release()


class VirtualCondition:
    """A ``threading.Condition`` (non-reentrant) whose waits block on a :class:`VirtualClock`:
    a waiting thread is not runnable, a notify makes it runnable at once, a timeout is virtual."""

    def __init__(self, clock: VirtualClock) -> None:
        self._clock = clock
        self._lock = threading.Lock()
        self._waiters: deque[_Wake] = deque()

    def __enter__(self) -> bool:
        return self._lock.acquire()

    def __exit__(self, *exc: object) -> None:
        self._lock.release()

    def wait(self, timeout: float | None = None) -> bool:
        clock = self._clock
        wake = _Wake()
        self._waiters.append(wake)
        with clock.lock:
            if timeout is not None:
                heapq.heappush(clock._timers, (clock.now + timeout, next(clock._seq), wake))
            elif clock._runnable <= 1 and not clock._timers:
                self._waiters.pop()
                raise RuntimeError("virtual clock: every thread would wait with no timer set")
            clock._runnable -= 1
            clock._advance_locked()
        self._lock.release()
        try:
            wake.lock.acquire()
        finally:
            self._lock.acquire()
        if not wake.popped:  # timed out
            self._waiters.remove(wake)
        return wake.popped

    def notify(self, n: int = 1) -> None:
        clock = self._clock
        with clock.lock:
            while n > 0 and self._waiters:
                wake = self._waiters.popleft()
                wake.popped = True
                n -= 1
                if not wake.done:  # else its timeout fired already: it is awake anyway
                    wake.done = True
                    clock._runnable += 1
                    wake.lock.release()

    def notify_all(self) -> None:
        self.notify(len(self._waiters))


# -- the server and the store ------------------------------------------------------------------


@dataclass
class ServerStats:
    requests: int = 0
    entries: int = 0
    throttled: int = 0  # requests that waited for the rate limit
    throttled_s: float = 0.0  # their total wait
    max_wait_s: float = 0.0


class Server:
    """When a request started at ``now`` completes: a GCRA token bucket admits ``rate``
    requests a second with bursts of ``burst`` (the rest queue), each then takes ``latency``.
    With ``cpu_per_entry``, a single client core then parses each response, in arrival order.
    Called with the clock's lock held (or by one thread)."""

    def __init__(self, latency: float, rate: float = 0.0, burst: int = 1,
                 cpu_per_entry: float = 0.0) -> None:  # fmt: skip
        self.latency = latency
        self.interval = 1.0 / rate if rate > 0 else 0.0
        self.tolerance = max(0, burst - 1) * self.interval
        self.cpu_per_entry = cpu_per_entry
        self._tat = 0.0  # theoretical arrival time of the next request
        self._cpu_free = 0.0
        self.stats = ServerStats()

    def complete_at(self, now: float, entries: int) -> float:
        st = self.stats
        st.requests += 1
        st.entries += entries
        start = now
        if self.interval:
            start = max(now, self._tat - self.tolerance)
            self._tat = max(self._tat, start) + self.interval
            if start > now:
                st.throttled += 1
                st.throttled_s += start - now
                st.max_wait_s = max(st.max_wait_s, start - now)
        done = start + self.latency
        if self.cpu_per_entry:
            done = self._cpu_free = max(done, self._cpu_free) + entries * self.cpu_per_entry
        return done


class SimStore(Store):
    """A listing-only :class:`Store` over a :class:`KeySpace`, answering on a virtual clock.

    Tokens are the index of the next entry. A delimited listing that starts inside a common
    prefix's subtree leaves that prefix out, as S3 does for a StartAfter inside it.
    """

    def __init__(self, space: KeySpace, clock: VirtualClock, server: Server) -> None:
        super().__init__(StoreURL("sim", None, "bucket"))
        self.space = space
        self.clock = clock
        self.server = server
        self._bounds: dict[str, tuple[int, int]] = {}
        self._bounds_lock = threading.Lock()

    def prefix_bounds(self, prefix: str) -> tuple[int, int]:
        with self._bounds_lock:
            found = self._bounds.get(prefix)
        if found is None:
            found = self.space.prefix_bounds(prefix)
            with self._bounds_lock:
                if len(self._bounds) > 100_000:
                    self._bounds.clear()
                self._bounds[prefix] = found
        return found

    def page(self, prefix: str = "", *, start_after: str = "", delimiter: str = "",
             limit: int = 1000, token: str | None = None) -> ListPage:  # fmt: skip
        """The page ``list_page`` returns, computed at once (no clock)."""
        space = self.space
        limit = max(1, min(limit, 1000))
        lo, hi = self.prefix_bounds(prefix)
        if token is not None:
            pos = int(token)
            if not lo <= pos <= hi:
                raise ValueError(f"token {token} is outside prefix {prefix!r}")
        else:
            pos = max(lo, space.rank_after(start_after)) if start_after else lo
        if delimiter not in ("", "/"):
            raise ValueError("only the delimiter '/' is simulated")
        if not delimiter:
            stop = min(hi, pos + limit)
            return ListPage(space.objects(pos, stop), [], str(stop) if stop < hi else None)
        objects: list[ObjectInfo] = []
        prefixes: list[str] = []
        n = len(prefix)
        while pos < hi and len(objects) + len(prefixes) < limit:
            j = space._segment(pos)
            seg, off = space.segments[j], space.offsets[j]
            cut = seg.slash_after(n)
            if cut < 0:  # the segment's keys here are all objects at this level
                stop = min(hi, space.offsets[j + 1], pos + limit - len(objects) - len(prefixes))
                objects += seg.objects(pos - off, stop - off)
                pos = stop
                continue
            q = seg.key(pos - off)[: cut + 1]
            if token is not None or q > start_after:
                prefixes.append(q)
            nxt = _successor(q)
            pos = space.total if nxt is None else space.rank(nxt)
        return ListPage(objects, prefixes, str(pos) if pos < hi else None)

    def list_page(self, prefix: str = "", *, start_after: str = "", delimiter: str = "",
                  limit: int = 1000, token: str | None = None) -> ListPage:  # fmt: skip
        page = self.page(prefix, start_after=start_after, delimiter=delimiter, limit=limit,
                         token=token)  # fmt: skip
        clock = self.clock
        with clock.lock:
            done = self.server.complete_at(clock.now, len(page.objects) + len(page.prefixes))
        clock.sleep_until(done)
        return page

    def _no(self, *args: object, **kwargs: object) -> Any:
        raise NotImplementedError("SimStore only lists")

    stat = get_range = put = create_upload = upload_part = complete_upload = _no
    list_parts = abort_upload = list_uploads = copy = delete = _no


class VirtualLister(ParallelLister):
    """The real :class:`ParallelLister` on a :class:`VirtualClock`.

    Its threads block only in ``store.list_page`` and in ``self._cond.wait``; this swaps the
    condition for a :class:`VirtualCondition` and tells the clock when a worker returns.
    Scheduling, splitting, stealing and page handling are the lister's own code.
    """

    def __init__(self, clock: VirtualClock, store: Store, **kwargs: Any) -> None:
        super().__init__(store, **kwargs)
        self._clock = clock
        self._cond = VirtualCondition(clock)  # type: ignore[assignment]

    def run(self, prefix: str = "") -> ListingStats:
        self._clock.enter(self.workers)
        return super().run(prefix)

    def _worker(self) -> None:
        try:
            super()._worker()
        finally:
            self._clock.exit()


# -- checking a listing -----------------------------------------------------------------------


class Coverage:
    """Checks that a parallel listing emits every key of a :class:`KeySpace` exactly once.

    Each page's objects are mapped to runs of indices (first and last key; key by key only when
    the page is not one run) and merged with adjacent runs as they arrive. Merging only ever
    joins disjoint neighbours, so a single run ``[0, N)`` at the end proves every key came
    once; a run that starts or ends where another does is an overlap, reported at once.
    """

    def __init__(self, space: KeySpace, then: Callable[[list[ObjectInfo]], None] | None = None):
        self.space = space
        self.then = then
        self.objects = 0
        self.errors: list[str] = []
        self._starts: dict[int, int] = {}  # run start -> end (exclusive)
        self._ends: dict[int, int] = {}  # run end -> start
        self._lock = threading.Lock()

    def __call__(self, objects: list[ObjectInfo]) -> None:
        if self.then is not None:
            self.then(objects)
        if not objects:
            return
        index_of = self.space.index_of
        first, last = index_of(objects[0].key), index_of(objects[-1].key)
        if first is not None and last is not None and last - first + 1 == len(objects):
            runs = [(first, last + 1)]
        else:
            runs = []
            for o in objects:
                i = index_of(o.key)
                if i is None:
                    self._error(f"unknown key {o.key!r}")
                    return
                if runs and i == runs[-1][1]:
                    runs[-1] = (runs[-1][0], i + 1)
                elif runs and i < runs[-1][1]:
                    self._error(f"page out of order at {o.key!r}")
                    return
                else:
                    runs.append((i, i + 1))
        with self._lock:
            self.objects += len(objects)
            for a, b in runs:
                self._add_locked(a, b)

    def _error(self, message: str) -> None:
        with self._lock:
            if len(self.errors) < 10:
                self.errors.append(message)

    def _add_locked(self, a: int, b: int) -> None:
        if a in self._starts or b in self._ends:
            if len(self.errors) < 10:
                self.errors.append(f"keys {a}..{b - 1} overlap a run emitted before")
            return
        if a in self._ends:
            a = self._ends.pop(a)
            del self._starts[a]
        if b in self._starts:
            b2 = self._starts.pop(b)
            del self._ends[b2]
            b = b2
        self._starts[a] = b
        self._ends[b] = a

    @property
    def runs(self) -> int:
        return len(self._starts)

    @property
    def complete(self) -> bool:
        n = self.space.total
        return not self.errors and self.objects == n and self._starts == ({0: n} if n else {})
