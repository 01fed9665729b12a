"""Client-side worker selection: which cache worker serves each block.

Every block key gets an ordered candidate list of workers from weighted rendezvous (HRW) hashing
over stable node ids, so a membership change moves only the keys it must. A `WorkerSelector`
then picks one candidate per request: the local worker when it is among the top two, otherwise
the less busy of the top two (power of two choices), both subject to a bounded-load cap so one
hot key cannot pile onto one worker. Failing workers are skipped and readmitted gradually, slow
ones are avoided, and when no worker can serve, `choose()` returns None so the caller reads the
backing store: a dead worker never becomes an I/O error for the reader.
"""

from __future__ import annotations

import enum
import errno
import functools
import hashlib
import logging
import math
import operator
import statistics
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "Node",
    "NodeState",
    "WorkerSelector",
    "check_unique_ids",
    "rendezvous_order",
]

log = logging.getLogger(__name__)

# 2**53: a 53-bit integer maps exactly onto a float mantissa, so the uniform below is exact.
_TWO_53 = float(1 << 53)
# EWMA samples a node needs before it may be called slow: the first requests to a worker are
# often cold misses that go to the backing store, which says nothing about the worker itself.
_SLOW_MIN_SAMPLES = 5


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


@functools.lru_cache(maxsize=4096)
def _hash_prefix(node_id: str) -> bytes:
    return node_id.encode() + b"\0"


def rendezvous_order(block_key: str, nodes: Sequence[Node]) -> list[Node]:
    """Order nodes by weighted rendezvous (HRW) score for one block key, best first.

    The score is ``-weight / ln(h)`` where ``h`` is a uniform (0, 1) float taken from a 64-bit
    blake2b hash of ``f"{node_id}\\0{block_key}"``. A node of weight ``w`` is first for a share
    ``w / sum(weights)`` of keys; adding or removing a node moves only the keys that node gains
    or loses. The order depends only on the inputs, never on the process (no ``hash()``).

    Args:
        block_key: The block's key.
        nodes: Candidate nodes, any order.

    Returns:
        A new list of the same nodes, highest score first (ties broken by node id).
    """
    key = block_key.encode()
    blake2b = hashlib.blake2b
    log_ = math.log
    scored = []
    for n in nodes:
        x = int.from_bytes(blake2b(_hash_prefix(n.node_id) + key, digest_size=8).digest(), "big")
        # h: the top 53 bits plus one half, strictly inside (0, 1), so ln(h) is finite and < 0.
        # Sorting ascending on weight / ln(h) puts the highest score -weight / ln(h) first.
        h = ((x >> 11) + 0.5) / _TWO_53
        scored.append((n.weight / log_(h), n.node_id, n))
    scored.sort(key=_by_score)
    return [t[2] for t in scored]


_by_score = operator.itemgetter(0, 1)


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
        "node",
        "probation_successes",
        "recent",
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
        self.recent = 0.0  # decayed count of recent choices: the bounded-load measure
        self.dead_until = 0.0
        self.died_refusing = False  # marked dead by a refused connection: cheap to probe
        self.backoff_s = backoff_s
        self.probation_successes = 0
        self.credit = 0.0
        self.last_chosen = -math.inf


class WorkerSelector:
    """Pick the cache worker that serves each block, from one client's point of view.

    The rule for ``choose(key)``, over the alive nodes in HRW order for ``key``:

    1. The local node wins if it is among the top two and under the load cap.
    2. Otherwise the top two compete (power of two choices) on in-flight requests from this
       selector; on a tie the lower EWMA latency wins when the two differ by more than
       ``latency_tie_ratio``, else the HRW-first node (so each block keeps one home).
       Only nodes under the cap compete.
    3. If neither is under the cap, the first node further down the HRW list that is.
    4. If none is, the least loaded node.

    The load cap is bounded-load consistent hashing applied to a decayed count of this selector's
    recent choices (a window of about ``load_window`` choices): a node is under the cap when
    ``recent + 1 <= max(1, ceil(load_factor * (total + 1) * weight / serving_weight))``. Counting
    recent choices rather than only in-flight requests makes the cap hold for clients with little
    concurrency too, where in-flight counts are mostly zero.

    Health: ``fail_threshold`` consecutive failures, or one ``fatal`` failure, make a node dead.
    After ``probation_s`` it enters probation and wins only a fraction of the choices it would
    win: ``(1 + s) / (1 + probation_successes)`` after ``s`` successes, so 1 in 4 at first with
    the defaults; ``probation_successes`` successes make it healthy again, one failure makes it
    dead again with the wait doubled (up to ``max_probation_s``). A node whose EWMA latency
    exceeds ``slow_factor`` times the median of the others (and the median by ``slow_min_s``) is
    slow: chosen only when no other node is under the cap, plus one probe request per
    ``probation_s`` when it is among the top two, so its latency estimate can recover.

    Thread-safety: every method may be called from any thread; one lock guards the state and
    hashing happens outside it. Call order per request: ``choose()`` (counts the choice against
    the node's load), then ``with track(node):`` around the request, or ``record_success`` /
    ``record_failure`` when the caller measures itself.

    Args:
        nodes: The workers. Ids must be unique.
        local_id: Id of the worker on this node, if any.
        load_factor: Bounded-load cap as a multiple of the mean load (>= 1; ``math.inf`` disables).
        ewma_alpha: Weight of the newest latency sample in the EWMA, in (0, 1].
        fail_threshold: Consecutive failures that make a healthy node dead.
        probation_s: First wait before a dead node is readmitted; doubles per failed probation.
        clock: Monotonic clock in seconds; injectable for tests.
        slow_factor: EWMA latency ratio to the median of the others above which a node is slow.
        slow_min_s: Minimum EWMA excess over that median for a node to be slow, so sub-millisecond
            jitter never marks a node slow.
        probation_successes: Successes in probation that return a node to healthy.
        max_probation_s: Cap on the doubled probation wait (at least ``probation_s``).
        load_window: About how many recent choices the load count spans.
        latency_tie_ratio: EWMA ratio beyond which latency breaks an in-flight tie.

    Raises:
        ValueError: Invalid nodes (duplicate id) or out-of-range settings.
    """

    def __init__(
        self,
        nodes: Sequence[Node],
        *,
        local_id: str | None = None,
        load_factor: float = 1.25,
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
        self._alpha = ewma_alpha
        self._fail_threshold = fail_threshold
        self._probation_s = probation_s
        self._max_probation_s = max(max_probation_s, probation_s)
        self._clock = clock
        self._slow_factor = slow_factor
        self._slow_min_s = slow_min_s
        self._probation_needed = probation_successes
        self._decay = 1.0 - 1.0 / load_window
        self._tie_ratio = latency_tie_ratio
        self._lock = threading.Lock()
        self._nodes: tuple[Node, ...] = ()
        self._stats: dict[str, _Stats] = {}
        self._total = 0.0  # decayed count of all recent choices
        self._slow: frozenset[str] | None = None  # cached; None when it must be recomputed
        self.set_nodes(nodes)

    # -- membership -----------------------------------------------------------------------

    def set_nodes(self, nodes: Sequence[Node]) -> None:
        """Replace the node list at run time.

        Nodes whose id stays keep their statistics and health (their address and weight are
        updated); new nodes start healthy; removed nodes are forgotten.

        Raises:
            ValueError: Two nodes share an id.
        """
        new = tuple(nodes)
        check_unique_ids(new)
        with self._lock:
            if new == self._nodes:
                return
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
            self._slow = None
        if old and (added or removed):
            log.info("worker membership changed: added %s, removed %s", added, removed)

    # -- selection ------------------------------------------------------------------------

    def candidates(self, block_key: str) -> list[Node]:
        """Alive nodes (healthy, slow or in probation, not dead) in HRW order for ``block_key``."""
        order = rendezvous_order(block_key, self._nodes)
        with self._lock:
            self._refresh_states()
            return [s.node for s in self._alive(order)]

    def last_resort(self, block_key: str) -> list[Node]:
        """Dead nodes worth one more try before the backing store when no live node is left:
        the local one (its restart is the common case, and it may be back before its wait
        ends), then those marked dead by a refused connection (a refusal costs a round trip,
        not a timeout), in HRW order."""
        order = rendezvous_order(block_key, self._nodes)
        with self._lock:
            dead = [
                s
                for node in order
                if (s := self._stats.get(node.node_id)) is not None
                and s.node is node
                and s.state is NodeState.DEAD
            ]
            local = [s.node for s in dead if s.node.node_id == self._local_id]
            return local + [
                s.node for s in dead if s.died_refusing and s.node.node_id != self._local_id
            ]

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
                self._refresh_states()

    def choose(self, block_key: str) -> Node | None:
        """Pick the worker to serve ``block_key`` and count the choice against its load.

        Returns:
            The chosen node, or None when no worker can serve (all dead, or the only ones left
            are in probation and this choice is not theirs): read the backing store instead.
        """
        order = rendezvous_order(block_key, self._nodes)
        with self._lock:
            self._refresh_states()
            pool = self._alive(order)
            while pool:
                winner = self._pick(pool)
                if winner.state is NodeState.PROBATION and not self._admit(winner):
                    pool = [s for s in pool if s is not winner]
                    continue
                self._count_choice(winner)
                return winner.node
            return None

    def _alive(self, order: Sequence[Node]) -> list[_Stats]:
        out = []
        for node in order:
            s = self._stats.get(node.node_id)
            # A node set_nodes() removed after the order was computed is skipped.
            if s is not None and s.node is node and s.state is not NodeState.DEAD:
                out.append(s)
        return out

    def _pick(self, pool: list[_Stats]) -> _Stats:
        slow = self._slow_ids()
        now = self._clock()
        for s in pool[:2]:
            if (
                s.node.node_id in slow
                and s.inflight == 0
                and now - s.last_chosen >= self._probation_s
            ):
                return s  # probe, so a slow node's latency estimate can recover
        fast = [s for s in pool if s.node.node_id not in slow]
        caps = self._caps()
        top = fast[:2]
        for s in top:
            if s.node.node_id == self._local_id and self._eligible(s, caps):
                return s
        eligible = [s for s in top if self._eligible(s, caps)]
        if len(eligible) == 2:
            return self._less_busy(eligible[0], eligible[1])
        if eligible:
            return eligible[0]
        for s in fast[2:]:
            if self._eligible(s, caps):
                return s
        for s in pool:
            if s.node.node_id in slow and self._eligible(s, caps):
                return s
        rest = fast or pool
        ranked = min(
            enumerate(rest), key=lambda t: (t[1].recent / t[1].node.weight, t[1].inflight, t[0])
        )
        return ranked[1]

    def _less_busy(self, first: _Stats, second: _Stats) -> _Stats:
        if first.inflight != second.inflight:
            return first if first.inflight < second.inflight else second
        a, b = first.ewma_s, second.ewma_s
        if a is not None and b is not None and b * self._tie_ratio < a:
            return second
        return first

    def _caps(self) -> tuple[float, float]:
        """(load_factor * (total + 1), serving weight): the cap of node i is that ratio * w_i."""
        slow = self._slow_ids()
        serving = 0.0
        for s in self._stats.values():
            if s.state is NodeState.HEALTHY and s.node.node_id not in slow:
                serving += s.node.weight
            elif s.state is NodeState.PROBATION:
                serving += s.node.weight * self._probation_share(s)
        if serving <= 0.0:
            serving = sum(s.node.weight for s in self._stats.values()) or 1.0
        return self._load_factor * (self._total + 1.0), serving

    def _eligible(self, s: _Stats, caps: tuple[float, float]) -> bool:
        if math.isinf(self._load_factor):
            return True
        scaled, serving = caps
        cap = max(1, math.ceil(scaled * s.node.weight / serving))
        return s.recent + 1.0 <= cap

    def _count_choice(self, s: _Stats) -> None:
        decay = self._decay
        for other in self._stats.values():
            other.recent *= decay
        self._total = self._total * decay + 1.0
        s.recent += 1.0
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
        for s in self._stats.values():
            if s.state is NodeState.DEAD and now >= s.dead_until:
                s.state = NodeState.PROBATION
                s.probation_successes = 0
                # The first choice it would win goes to it: a prompt probe.
                s.credit = 1.0 - self._probation_share(s)
                self._slow = None
                log.info("worker %s on probation", s.node.node_id)

    def _mark_dead(self, s: _Stats, reason: str, refused: bool = False) -> None:
        if s.state is NodeState.PROBATION:
            s.backoff_s = min(s.backoff_s * 2.0, self._max_probation_s)
        s.state = NodeState.DEAD
        s.died_refusing = refused
        s.dead_until = self._clock() + s.backoff_s
        s.consecutive_failures = 0
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
            self._slow = None
            if s.state is NodeState.PROBATION:
                s.probation_successes += 1
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

    def _slow_ids(self) -> frozenset[str]:
        if self._slow is None:
            self._slow = self._compute_slow()
        return self._slow

    def _compute_slow(self) -> frozenset[str]:
        measured = [
            (s.ewma_s, s.node.node_id)
            for s in self._stats.values()
            if s.state is not NodeState.DEAD and s.ewma_s is not None
        ]
        if len(measured) < 2:
            return frozenset()
        values = sorted(v for v, _ in measured)
        slow = set()
        for s in self._stats.values():
            if s.state is NodeState.DEAD or s.ewma_s is None or s.samples < _SLOW_MIN_SAMPLES:
                continue
            others = list(values)
            others.remove(s.ewma_s)
            median = statistics.median(others)
            if s.ewma_s > self._slow_factor * median and s.ewma_s - median > self._slow_min_s:
                slow.add(s.node.node_id)
        if slow:
            log.debug("slow workers: %s", sorted(slow))
        return frozenset(slow)

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
            slow = self._slow_ids()
            out = []
            for node in self._nodes:
                s = self._stats[node.node_id]
                state = s.state.value
                if s.state is NodeState.HEALTHY and node.node_id in slow:
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
