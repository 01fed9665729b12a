"""Client-side worker selection: which cache worker serves each block.

Every block key gets an ordered candidate list of workers from a weighted multi-probe hash ring
over stable node ids (:func:`rendezvous_order`): a node is first for about its weight's share of
the keys, a membership change moves only the keys the changed node gains or loses, and a key's
first candidates cost a few bisections of a precomputed ring, not a hash per node. A
`WorkerSelector` then picks one candidate per request: the local worker when it is among the top
two, otherwise the less busy of the top two (power of two choices), both subject to a
bounded-load cap so one hot key cannot pile onto one worker (a hot key spills round-robin along
the ring). Failing workers are skipped and readmitted gradually, slow ones are avoided, and when
no worker can serve, `choose()` returns None so the caller reads the backing store: a dead worker
never becomes an I/O error for the reader. A choice costs the same at 10,000 workers as at 10.
"""

from __future__ import annotations

import enum
import errno
import logging
import math
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from .ring import Node, check_unique_ids, key_probes, rendezvous_order, ring_for

__all__ = [
    "DEFAULT_LOAD_FACTOR",
    "Node",
    "NodeState",
    "WorkerSelector",
    "check_unique_ids",
    "rendezvous_order",
]

log = logging.getLogger(__name__)

# The bounded-load cap's default: a node takes at most 1.25x its weighted share of recent
# choices (docs/scale.md: 1.1 balances tighter at the cost of blocks leaving their home nodes).
DEFAULT_LOAD_FACTOR = 1.25

# Ring points a spilling choice scans at most before settling for the least loaded it saw.
_SPILL_SCAN = 32
# Recent keys whose first two candidates and spill position a selector remembers (least recently
# used go first): a hot key then costs no ring walk.
_MEMO = 4096
# The load window spans at least this many choices per node, so the cap (a multiple of a node's
# mean share of the window) stays above one choice even for a light node in a large cluster.
_WINDOW_PER_NODE = 8
# Load counts are kept multiplied by a growing scale (so decaying them is O(1) per choice); past
# this scale they are divided back down.
_RESCALE_AT = 1e100
# EWMA samples a node needs before it may be called slow: the first requests to a worker are
# often cold misses that go to the backing store, which says nothing about the worker itself.
_SLOW_MIN_SAMPLES = 5


class NodeState(enum.Enum):
    """Health of a node as one selector sees it."""

    HEALTHY = "healthy"
    PROBATION = "probation"
    DEAD = "dead"


class _Stats:
    """Mutable per-node bookkeeping; only touched under the selector's lock."""

    __slots__ = (
        "backoff_s",
        "consecutive_failures",
        "credit",
        "dead_until",
        "died_refusing",
        "ewma_s",
        "failures",
        "inflight",
        "last_chosen",
        "load",
        "node",
        "probation_successes",
        "requests",
        "samples",
        "state",
    )

    def __init__(self, node: Node, backoff_s: float) -> None:
        self.node = node
        self.state = NodeState.HEALTHY
        self.inflight = 0
        self.ewma_s: float | None = None
        self.samples = 0
        self.requests = 0
        self.failures = 0
        self.consecutive_failures = 0
        self.load = 0.0  # decayed count of recent choices (the load cap's measure), scaled
        self.dead_until = 0.0
        self.died_refusing = False  # marked dead by a refused connection: cheap to probe
        self.backoff_s = backoff_s
        self.probation_successes = 0
        self.credit = 0.0
        self.last_chosen = -math.inf


_NO_STATS: frozenset[_Stats] = frozenset()


class WorkerSelector:
    """Pick the cache worker that serves each block, from one client's point of view.

    The rule for ``choose(key)``, over the alive nodes in the key's order
    (:func:`rendezvous_order`):

    1. The local node wins if it is among the top two and under the load cap.
    2. Otherwise the top two compete (power of two choices) on in-flight requests from this
       selector; on a tie the lower EWMA latency wins when the two differ by more than
       ``latency_tie_ratio``, else the first node (so each block keeps one home).
       Only nodes under the cap compete.
    3. If neither is under the cap, the key spills to the next node under the cap along the ring
       from its first probe, going on from where its last spill went, and back to its first
       spill node once that is under the cap again: a hot key's load goes round a set of nodes
       just large enough to carry it. If a bounded scan finds none, the least loaded node seen.

    The load cap is bounded-load consistent hashing applied to a decayed count of this selector's
    recent choices (a window of about ``max(load_window, 8 * nodes)`` choices): a node is under
    the cap when ``recent + 1 <= max(1, load_factor * (total + 1) * weight / serving_weight)``.
    Counting recent choices rather than only in-flight requests makes the cap hold for clients
    with little concurrency too; a window growing with the cluster keeps a node's mean share of
    it above one choice, so the cap means what it says at 10,000 nodes as at 3. Every client
    capping its own choices caps the sum of them.

    Health: ``fail_threshold`` consecutive failures, or one ``fatal`` failure, make a node dead.
    After ``probation_s`` it enters probation and wins only a fraction of the choices it would
    win: ``(1 + s) / (1 + probation_successes)`` after ``s`` successes, so 1 in 4 at first with
    the defaults; ``probation_successes`` successes make it healthy again, one failure makes it
    dead again with the wait doubled (up to ``max_probation_s``). A node whose EWMA latency
    exceeds ``slow_factor`` times the median of the others (and the median by ``slow_min_s``) is
    slow: chosen only when no other node is under the cap, plus one probe request per
    ``probation_s`` when it is among the top two, so its latency estimate can recover. The slow
    set is recomputed on every health change and after every ``max(1, nodes // 2)`` latency
    samples (each sample, up to 3 nodes), so its cost per request does not grow with the cluster.

    Thread-safety: every method may be called from any thread; one lock guards the state, and
    key hashing and full-order scoring happen outside it. Call order per request: ``choose()``
    (counts the choice against the node's load), then ``with track(node):`` around the request,
    or ``record_success`` / ``record_failure`` when the caller measures itself.

    Args:
        nodes: The workers. Ids must be unique.
        local_id: Id of the worker on this node, if any.
        load_factor: Bounded-load cap as a multiple of the mean load (>= 1; ``math.inf`` disables).
        ewma_alpha: Weight of the newest latency sample in the EWMA, in (0, 1].
        fail_threshold: Consecutive failures that make a healthy node dead.
        probation_s: First wait before a dead node is readmitted; doubles per failed probation.
        clock: Monotonic clock in seconds; injectable for tests.
        slow_factor: EWMA latency ratio to the median of the others above which a node is slow
            (``math.inf`` disables slow detection).
        slow_min_s: Minimum EWMA excess over that median for a node to be slow, so sub-millisecond
            jitter never marks a node slow.
        probation_successes: Successes in probation that return a node to healthy.
        max_probation_s: Cap on the doubled probation wait (at least ``probation_s``).
        load_window: About how many recent choices the load count spans, at least; the window is
            ``max(load_window, 8 * len(nodes))``.
        latency_tie_ratio: EWMA ratio beyond which latency breaks an in-flight tie.

    Raises:
        ValueError: Invalid nodes (duplicate id) or out-of-range settings.
    """

    def __init__(
        self,
        nodes: Sequence[Node],
        *,
        local_id: str | None = None,
        load_factor: float = DEFAULT_LOAD_FACTOR,
        ewma_alpha: float = 0.2,
        fail_threshold: int = 3,
        probation_s: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
        slow_factor: float = 4.0,
        slow_min_s: float = 0.002,
        probation_successes: int = 3,
        max_probation_s: float = 300.0,
        load_window: float = 200.0,
        latency_tie_ratio: float = 1.5,
    ) -> None:
        if not load_factor >= 1.0:
            raise ValueError(f"load_factor must be >= 1, got {load_factor!r}")
        if not 0.0 < ewma_alpha <= 1.0:
            raise ValueError(f"ewma_alpha must be in (0, 1], got {ewma_alpha!r}")
        if fail_threshold < 1:
            raise ValueError(f"fail_threshold must be >= 1, got {fail_threshold!r}")
        if not probation_s >= 0.0:
            raise ValueError(f"probation_s must be >= 0, got {probation_s!r}")
        if not slow_factor > 1.0:
            raise ValueError(f"slow_factor must be > 1, got {slow_factor!r}")
        if probation_successes < 1:
            raise ValueError(f"probation_successes must be >= 1, got {probation_successes!r}")
        if not load_window >= 1.0:
            raise ValueError(f"load_window must be >= 1, got {load_window!r}")
        if not latency_tie_ratio >= 1.0:
            raise ValueError(f"latency_tie_ratio must be >= 1, got {latency_tie_ratio!r}")
        self._local_id = local_id
        self._load_factor = load_factor
        self._uncapped = math.isinf(load_factor)
        self._alpha = ewma_alpha
        self._fail_threshold = fail_threshold
        self._probation_s = probation_s
        self._max_probation_s = max(max_probation_s, probation_s)
        self._clock = clock
        self._slow_factor = slow_factor
        self._slow_min_s = slow_min_s
        self._probation_needed = probation_successes
        self._load_window = load_window
        self._decay = 1.0 - 1.0 / load_window
        self._tie_ratio = latency_tie_ratio
        self._lock = threading.Lock()
        self._nodes: tuple[Node, ...] = ()
        self._stats: dict[str, _Stats] = {}
        self._placement = ring_for(())
        self._slots: list[_Stats] = []  # stats by placement index
        self._local: _Stats | None = None
        self._dead: set[_Stats] = set()
        self._wake = math.inf  # earliest end of a dead node's wait
        self._scale = 1.0  # load counts and the total are kept multiplied by this
        self._total = 0.0  # decayed count of all recent choices, times the scale
        self._memo: dict[str, list[int]] = {}  # recent keys: see _pick
        # Cached view of all nodes; None when a health change requires recomputing it.
        self._slow: frozenset[_Stats] | None = None
        self._serving = 1.0  # weight of the nodes that serve (the load cap's denominator)
        self._fast = 0  # alive nodes not slow
        self._stale = 0  # latency samples since the view was computed
        self._stale_limit = 1
        self.set_nodes(nodes)

    # -- membership -----------------------------------------------------------------------

    def set_nodes(self, nodes: Sequence[Node]) -> None:
        """Replace the node list at run time.

        Nodes whose id stays keep their statistics and health (their address and weight are
        updated); new nodes start healthy; removed nodes are forgotten. Building the ring of a
        new node list costs about a second per 10,000 nodes; selectors over the same ids and
        weights share one.

        Raises:
            ValueError: Two nodes share an id.
        """
        new = tuple(nodes)
        check_unique_ids(new)
        with self._lock:
            if new == self._nodes:
                return
        placement = ring_for(new)
        with self._lock:
            old = self._stats
            stats: dict[str, _Stats] = {}
            for node in new:
                s = old.get(node.node_id)
                if s is None:
                    s = _Stats(node, self._probation_s)
                else:
                    s.node = node
                stats[node.node_id] = s
            added = [n.node_id for n in new if n.node_id not in old]
            removed = [i for i in old if i not in stats]
            self._nodes = new
            self._stats = stats
            self._placement = placement
            self._slots = [stats[node_id] for node_id in placement.ids]
            self._local = stats.get(self._local_id) if self._local_id is not None else None
            self._dead = {s for s in stats.values() if s.state is NodeState.DEAD}
            self._wake = min((s.dead_until for s in self._dead), default=math.inf)
            window = max(self._load_window, _WINDOW_PER_NODE * len(new))
            self._decay = 1.0 - 1.0 / window
            self._memo.clear()
            self._stale_limit = max(1, len(new) // 2)
            self._slow = None
        if old and (added or removed):
            log.info("worker membership changed: added %s, removed %s", added, removed)

    # -- selection ------------------------------------------------------------------------

    def candidates(self, block_key: str, limit: int | None = None) -> list[Node]:
        """Alive nodes (healthy, slow or in probation, not dead) in the key's order.

        Args:
            block_key: The block's key.
            limit: Return at most this many (the first ones). The first few cost microseconds at
                any cluster size; the full list costs time in proportion to the node count.
        """
        xs = key_probes(block_key)
        if limit is not None:
            with self._lock:
                self._refresh_states()
                want = min(limit, len(self._slots) - len(self._dead))
                out: list[Node] = []
                if want <= 0:
                    return out
                slots = self._slots
                for o in self._placement.walk(xs):
                    s = slots[o]
                    if s.state is not NodeState.DEAD:
                        out.append(s.node)
                        if len(out) >= want:
                            break
                return out
        while True:
            with self._lock:
                placement = self._placement
            order = placement.order(xs)
            with self._lock:
                if self._placement is not placement:
                    continue  # set_nodes() ran meanwhile: score the new list
                self._refresh_states()
                slots = self._slots
                return [slots[o].node for o in order if slots[o].state is not NodeState.DEAD]

    def last_resort(self, block_key: str) -> list[Node]:
        """Dead nodes worth one more try before the backing store when no live node is left:
        the local one (its restart is the common case, and it may be back before its wait
        ends), then those marked dead by a refused connection (a refusal costs a round trip,
        not a timeout), in the key's order."""
        xs = key_probes(block_key)
        with self._lock:
            placement, slots = self._placement, self._slots
            dead = [placement.index[s.node.node_id] for s in self._dead]
            order = [slots[o] for o in placement.order(xs, dead)]
            local = [s.node for s in order if s is self._local]
            return local + [s.node for s in order if s.died_refusing and s is not self._local]

    def is_dead(self, node_id: str) -> bool:
        with self._lock:
            self._refresh_states()
            s = self._stats.get(node_id)
            return s is not None and s.state is NodeState.DEAD

    def node(self, node_id: str) -> Node | None:
        with self._lock:
            s = self._stats.get(node_id)
            return s.node if s is not None else None

    def revive(self, node_id: str) -> None:
        """A request to a node marked dead succeeded: on probation now, not when its wait ends."""
        with self._lock:
            s = self._stats.get(node_id)
            if s is not None and s.state is NodeState.DEAD:
                s.dead_until = self._clock()
                self._wake = min(self._wake, s.dead_until)
                self._refresh_states()

    def choose(self, block_key: str) -> Node | None:
        """Pick the worker to serve ``block_key`` and count the choice against its load.

        Returns:
            The chosen node, or None when no worker can serve (all dead, or the only ones left
            are in probation and this choice is not theirs): read the backing store instead.
        """
        xs = key_probes(block_key)
        with self._lock:
            self._refresh_states()
            refused: frozenset[_Stats] = _NO_STATS
            while True:
                winner = self._pick(block_key, xs, refused)
                if winner is None:
                    return None
                if winner.state is NodeState.PROBATION and not self._admit(winner):
                    refused = refused | {winner}
                    continue
                self._count_choice(winner)
                return winner.node

    def _pick(self, block_key: str, xs: Sequence[int], refused: frozenset[_Stats]) -> _Stats | None:
        """The rule in the class docstring, over alive nodes not in ``refused``."""
        slow = self._slow_ids()
        slots, dead = self._slots, NodeState.DEAD
        alive = len(slots) - len(self._dead) - len(refused)
        if alive <= 0:
            return None
        fast_left = self._fast
        if refused:
            fast_left -= sum(1 for s in refused if s not in slow)
        # The key's memo: [first, second placement candidate, ring index of its first probe,
        # first spill offset, next spill offset]; -1 where not known yet.
        memo = self._memo.pop(block_key, None)
        if memo is None:
            if len(self._memo) >= _MEMO:
                del self._memo[next(iter(self._memo))]  # the least recently used
            memo = [-1, -1, -1, -1, 0]
        self._memo[block_key] = memo
        pool: list[_Stats] = []  # the first two alive
        fast: list[_Stats] = []  # the first two alive and not slow
        if memo[1] >= 0:
            a, b = slots[memo[0]], slots[memo[1]]
            if (
                a.state is not dead
                and b.state is not dead
                and a not in slow
                and b not in slow
                and a not in refused
                and b not in refused
            ):
                pool = fast = [a, b]  # a repeated key skips the walk
        if not pool:
            want_pool, want_fast = min(2, alive), min(2, fast_left)
            for rank, o in enumerate(self._placement.walk(xs)):
                if rank < 2:
                    memo[rank] = o  # the placement's first two, whatever their state
                s = slots[o]
                if s.state is dead or s in refused:
                    continue
                if len(pool) < want_pool:
                    pool.append(s)
                if len(fast) < want_fast and s not in slow:
                    fast.append(s)
                if len(pool) >= want_pool and len(fast) >= want_fast and rank >= 1:
                    break
        if slow:
            now = self._clock()
            for s in pool:
                if s in slow and s.inflight == 0 and now - s.last_chosen >= self._probation_s:
                    return s  # probe, so a slow node's latency estimate can recover
        unit = self._unit_cap()
        local = self._local
        if local is not None and local in fast and self._eligible(local, unit):
            return local
        if len(fast) == 2:
            a_ok, b_ok = self._eligible(fast[0], unit), self._eligible(fast[1], unit)
            if a_ok and b_ok:
                return self._less_busy(fast[0], fast[1])
            if a_ok or b_ok:
                return fast[0] if a_ok else fast[1]
        elif fast and self._eligible(fast[0], unit):
            return fast[0]
        seen = pool + fast
        if fast_left > len(fast):
            spilled = self._spill_to(memo, xs[0], slow, unit, refused, seen)
            if spilled is not None:
                return spilled
        for s in seen:
            if s in slow and self._eligible(s, unit):
                return s
        rest = [s for s in seen if s not in slow] or seen
        ranked = min(
            enumerate(rest),
            key=lambda t: (t[1].load / t[1].node.weight, t[1].inflight, t[0]),
        )
        return ranked[1]

    def _spill_to(
        self,
        memo: list[int],
        x: int,
        slow: frozenset[_Stats],
        unit: float,
        refused: frozenset[_Stats],
        seen: list[_Stats],
    ) -> _Stats | None:
        """The next node under the cap along the ring from the key's first probe ``x``, going on
        from the key's last spill (or back to its first one once under the cap again); None if
        ``_SPILL_SCAN`` points hold none. Appends the alive nodes it sees to ``seen``."""
        own, slots = self._placement.own, self._slots
        n = len(own)
        if memo[2] < 0:
            memo[2] = self._placement.start(x)
        start = memo[2]
        dead = NodeState.DEAD
        if memo[3] >= 0:
            s = slots[own[(start + memo[3]) % n]]
            if (
                s.state is not dead
                and s not in refused
                and s not in slow
                and self._eligible(s, unit)
            ):
                memo[4] = memo[3] + 1
                return s
        first = memo[4]
        for t in range(first, first + min(n, _SPILL_SCAN)):
            s = slots[own[(start + t) % n]]
            if s.state is dead or s in refused:
                continue
            seen.append(s)
            if s in slow or not self._eligible(s, unit):
                continue
            if memo[3] < 0:
                memo[3] = t % n
            else:
                head = slots[own[(start + memo[3]) % n]]
                if head.state is dead or head in slow:
                    memo[3] = t % n  # the first spill node is gone: this one is first now
            memo[4] = (t + 1) % n
            return s
        memo[4] = (first + min(n, _SPILL_SCAN)) % n
        return None

    def _less_busy(self, first: _Stats, second: _Stats) -> _Stats:
        if first.inflight != second.inflight:
            return first if first.inflight < second.inflight else second
        a, b = first.ewma_s, second.ewma_s
        if a is not None and b is not None and b * self._tie_ratio < a:
            return second
        return first

    def _unit_cap(self) -> float:
        """The load cap per unit of weight: ``load_factor * (total + 1) / serving_weight``."""
        if self._uncapped:
            return math.inf
        self._slow_ids()  # the serving weight is computed with the slow set
        return self._load_factor * (self._total / self._scale + 1.0) / self._serving

    def _eligible(self, s: _Stats, unit: float) -> bool:
        cap = unit * s.node.weight
        return s.load / self._scale + 1.0 <= (cap if cap > 1.0 else 1.0)

    def _count_choice(self, s: _Stats) -> None:
        # Decaying every count by d is multiplying the scale by 1 / d: O(1), not O(nodes).
        if self._scale > _RESCALE_AT:
            for other in self._stats.values():
                other.load /= self._scale
            self._total /= self._scale
            self._scale = 1.0
        self._scale /= self._decay
        self._total += self._scale
        s.load += self._scale
        s.requests += 1
        s.last_chosen = self._clock()

    # -- health ---------------------------------------------------------------------------

    def _probation_share(self, s: _Stats) -> float:
        return (1 + s.probation_successes) / (1 + self._probation_needed)

    def _admit(self, s: _Stats) -> bool:
        """Whether a probation node gets a choice it would win (a share of them, evenly spread)."""
        s.credit += self._probation_share(s)
        if s.credit >= 1.0 - 1e-9:
            s.credit -= 1.0
            return True
        return False

    def _refresh_states(self) -> None:
        now = self._clock()
        if now < self._wake:
            return
        wake = math.inf
        for s in list(self._dead):
            if now >= s.dead_until:
                self._dead.discard(s)
                s.state = NodeState.PROBATION
                s.probation_successes = 0
                # The first choice it would win goes to it: a prompt probe.
                s.credit = 1.0 - self._probation_share(s)
                self._slow = None
                log.info("worker %s on probation", s.node.node_id)
            elif s.dead_until < wake:
                wake = s.dead_until
        self._wake = wake

    def _mark_dead(self, s: _Stats, reason: str, refused: bool = False) -> None:
        if s.state is NodeState.PROBATION:
            s.backoff_s = min(s.backoff_s * 2.0, self._max_probation_s)
        s.state = NodeState.DEAD
        s.died_refusing = refused
        s.dead_until = self._clock() + s.backoff_s
        s.consecutive_failures = 0
        if self._stats.get(s.node.node_id) is s:
            self._dead.add(s)
            self._wake = min(self._wake, s.dead_until)
        self._slow = None
        log.warning(
            "worker %s (%s) marked dead after %s; retry in %.1fs",
            s.node.node_id,
            s.node.address,
            reason,
            s.backoff_s,
        )

    def record_success(self, node_id: str, latency_s: float) -> None:
        """Record a successful request to ``node_id`` that took ``latency_s`` seconds."""
        with self._lock:
            s = self._stats.get(node_id)
            if s is None:
                return
            s.consecutive_failures = 0
            latency_s = max(0.0, latency_s)
            s.ewma_s = (
                latency_s if s.ewma_s is None else s.ewma_s + self._alpha * (latency_s - s.ewma_s)
            )
            s.samples += 1
            self._stale += 1
            if s.state is NodeState.PROBATION:
                s.probation_successes += 1
                self._slow = None  # its share of the serving weight grew
                if s.probation_successes >= self._probation_needed:
                    s.state = NodeState.HEALTHY
                    s.backoff_s = self._probation_s
                    log.info("worker %s healthy again", node_id)
            # A success while dead is a request from before the failure: the wait still applies.

    def record_failure(self, node_id: str, *, fatal: bool = False) -> None:
        """Record a failed request to ``node_id``.

        Args:
            node_id: The node that failed.
            fatal: The failure proves the worker is down (connection refused): dead at once
                rather than after ``fail_threshold`` consecutive failures.
        """
        with self._lock:
            s = self._stats.get(node_id)
            if s is None:
                return
            s.failures += 1
            if s.state is NodeState.DEAD:
                return
            if s.state is NodeState.PROBATION:
                self._mark_dead(s, "a failure in probation")
                return
            s.consecutive_failures += 1
            if fatal:
                self._mark_dead(s, "a fatal failure", refused=True)
            elif s.consecutive_failures >= self._fail_threshold:
                self._mark_dead(s, f"{s.consecutive_failures} consecutive failures")

    @contextmanager
    def track(
        self,
        node: Node,
        failures: type[Exception] | tuple[type[Exception], ...] = Exception,
    ) -> Iterator[None]:
        """Count a request to ``node`` as in flight and record its outcome.

        On normal exit the latency goes into the node's EWMA as a success. An exception of
        ``failures`` inside marks a failure (fatal when it is, or wraps, connection refused) and
        propagates; any other ``Exception`` is an answer (a "not found" from a working worker)
        and counts as a success. Cancellation and other ``BaseException`` only end the in-flight
        count: they say nothing about the worker.
        """
        node_id = node.node_id
        with self._lock:
            s = self._stats.get(node_id)
            if s is not None:
                s.inflight += 1
        start = self._clock()
        try:
            yield
        except failures as exc:
            self._end(s)
            self.record_failure(node_id, fatal=_is_connection_refused(exc))
            raise
        except Exception:
            self._end(s)
            self.record_success(node_id, self._clock() - start)
            raise
        except BaseException:
            self._end(s)
            raise
        self._end(s)
        self.record_success(node_id, self._clock() - start)

    def _end(self, s: _Stats | None) -> None:
        if s is not None:
            with self._lock:
                s.inflight -= 1

    # -- slowness -------------------------------------------------------------------------

    def _slow_ids(self) -> frozenset[_Stats]:
        """The slow nodes; also refreshes the serving weight and the count of fast nodes."""
        if self._slow is None or self._stale >= self._stale_limit:
            self._compute_view()
        assert self._slow is not None
        return self._slow

    def _compute_view(self) -> None:
        """Recompute the slow set, serving weight and fast count: O(nodes log nodes)."""
        alive = [s for s in self._slots if s.state is not NodeState.DEAD]
        values = sorted(s.ewma_s for s in alive if s.ewma_s is not None)
        m = len(values)
        slow = set()
        if m >= 2:
            for s in alive:
                v = s.ewma_s
                if v is None or s.samples < _SLOW_MIN_SAMPLES:
                    continue
                median = _median_without(values, bisect_left(values, v))
                if v > self._slow_factor * median and v - median > self._slow_min_s:
                    slow.add(s)
        serving = 0.0
        for s in alive:
            if s.state is NodeState.HEALTHY and s not in slow:
                serving += s.node.weight
            elif s.state is NodeState.PROBATION:
                serving += s.node.weight * self._probation_share(s)
        if serving <= 0.0:
            serving = sum(s.node.weight for s in self._slots) or 1.0
        if slow and slow != self._slow:
            log.debug("slow workers: %s", sorted(s.node.node_id for s in slow))
        self._slow = frozenset(slow)
        self._serving = serving
        self._fast = len(alive) - len(slow)
        self._stale = 0

    # -- introspection --------------------------------------------------------------------

    def snapshot(self) -> list[dict[str, Any]]:
        """Per-node state for metrics and debugging, in node-list order.

        Returns:
            One dict per node: ``id``, ``address``, ``state`` (healthy, probation, dead or slow),
            ``inflight``, ``ewma_ms`` (None before the first success), ``requests`` (times
            chosen) and ``failures`` (total).
        """
        with self._lock:
            self._refresh_states()
            self._slow = None  # a fresh view, whatever the sample count
            slow = self._slow_ids()
            out = []
            for node in self._nodes:
                s = self._stats[node.node_id]
                state = s.state.value
                if s.state is NodeState.HEALTHY and s in slow:
                    state = "slow"
                out.append(
                    {
                        "id": node.node_id,
                        "address": node.address,
                        "state": state,
                        "inflight": s.inflight,
                        "ewma_ms": None if s.ewma_s is None else s.ewma_s * 1000.0,
                        "requests": s.requests,
                        "failures": s.failures,
                    }
                )
            return out


def _median_without(values: Sequence[float], p: int) -> float:
    """The median of sorted ``values`` without the element at index ``p``: O(1)."""
    half = (len(values) - 1) // 2  # the remaining middle (upper middle when their count is even)
    upper = values[half] if half < p else values[half + 1]
    if len(values) % 2 == 0:  # an odd count remains
        return upper
    lower = values[half - 1] if half - 1 < p else values[half]
    return (lower + upper) / 2.0


def _is_connection_refused(exc: BaseException) -> bool:
    """Whether ``exc`` or an exception it wraps is a refused connection (worker not listening)."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, ConnectionRefusedError) or (
            isinstance(cur, OSError) and cur.errno == errno.ECONNREFUSED
        ):
            return True
        cur = cur.__cause__ or cur.__context__
    return False
