#!/usr/bin/env python3
"""Worker selection at 1,000 and 10,000 workers, by simulation: the real selector, simulated work.

Everything that decides where a block is read runs the project's own code: every simulated client
holds its own :class:`pcache.selection.WorkerSelector` (placement ring, bounded load, power of two
choices, health and slow detection) on a virtual clock (the selector's injectable ``clock``), and
asks it ``choose(key)`` per request, then wraps the simulated request in ``track(node)`` exactly
as :mod:`pcache.client` does. Nothing of the selection algorithm is reimplemented here. What is
simulated is the world around it:

- **Workers**: ``N`` workers with mixed capacities (``--weights``, default ``1:0.5,2:0.3,4:0.2``:
  half with one NVMe disk, 30% with two, 20% with four; the weight is the capacity). Each is a
  FIFO server whose service rate is proportional to its weight: a block takes on average
  ``--service-ms / weight`` (exponentially distributed; 1 ms is a 4 MiB block at 4 GB/s).
- **Clients**: ``--clients`` (16) clients, each co-located with a worker (its ``local_id``), as
  pcache runs a worker on every compute node. Each caps its own load on a worker over a window of
  ``8 N`` choices, which only binds as meant once a client has made about ``2 N`` choices: few
  clients making many requests each (``--requests-per-worker`` 32, so 2 N each at 10,000)
  stand closer to real clients, which make millions, than many clients making a few each.
  Below that (fewer requests, or more clients) each client may still put one request on every
  worker, so a light worker can get ``clients`` requests against a mean below that.
- **Load**: open-loop Poisson arrivals at ``--rho`` (default 0.7) of the cluster's total service
  rate, round-robin over the clients. Each request reads a block drawn from a Zipf(``--zipf-s``,
  default 1.1) popularity over ``--keys`` (default 1,000,000) blocks: the hottest block alone is
  about 12% of all reads.
- **Latency**: arrival to completion, queueing included, as the clients' EWMA latency sees it.

Reported, per worker count:

1. **Load balance**: requests served per unit of capacity, busiest worker over the mean (max/mean;
   target <= 1.1), over the requests after a warm-up (``--warmup``, the first 25% are not
   counted). Ours with the default cap (``load_factor`` 1.25), with a 1.1 cap and without a cap
   (``load_factor=inf``: placement plus power of two choices only), against two peers without
   load awareness implemented here as they are published: plain consistent hashing (``ring``:
   160 virtual nodes per unit of weight, md5, as libketama) and Maglev (lookup table of the next
   prime >= 100 entries per worker, the paper's rule, but at most 262,144 entries, 26 a worker
   at 10,000, to keep the run short; weighted by taking turns in proportion to weight). Without
   load awareness the hottest block (12% of reads) decides their max/mean: about
   ``0.12 * N * mean weight / its weight`` on the worker that holds it. The peers' max/mean is
   given for the same sampled requests and as the exact expected value. ``weighted random`` is a
   perfectly balanced random assignment of as many requests: the sampling-noise floor of a
   max/mean over a few dozen requests a worker (a Python run cannot afford thousands a worker at
   10,000 workers). Ours is below that floor because every client caps its own load on each
   worker at ``load_factor`` times its fair share, which caps their sum: in a long run its
   max/mean tends to ``load_factor`` (``--workers 1000 --requests-per-worker 1000`` measures
   it). ``top-2`` is the share of requests served by one of the block's
   first two candidates (what a worker's peer fetch asks, so cache affinity), ``hottest`` the
   number of workers that served the hottest block.
2. **Keys moved** when one worker leaves and when one joins: the share of ``--moved-keys`` uniform
   keys whose first candidate (``candidates(key, limit=1)[0]``) changes, against the share that
   must move (the leaver's keys, or the joiner's new share; ``1/N`` for equal weights; target
   <= 1.1x that). ``excess`` counts keys that moved without having to. At 10,000 workers a
   worker's share of 200,000 keys is about 20 keys, so the measured ratio has a sampling error
   (printed as +-, one standard error).
3. **Slow workers**: 5% of the workers (``--slow-fraction``) serve 10x slower. Share of requests
   they got against their share of capacity, and latency percentiles, with slow detection
   (defaults) and without it (``slow_factor=inf``, ``latency_tie_ratio=inf``). A client calls a
   worker slow after 5 latency samples from it; at ``rho`` 0.7 a worker 10x slower is overloaded
   and its first answers come after the simulated span has ended, so these runs use
   ``--slow-rho`` 0.05 (slow workers half busy) and 4 clients with 32 requests a worker
   (``--slow-clients``, ``--slow-requests-per-worker``): 8 a worker per client. An overloaded
   worker is the request timeout's business (failures make it dead), not modelled here.
4. **Lookup cost**: wall time of the real ``choose()`` (after a warm-up of ``2 N`` choices) and
   ``candidates(key, limit=2)``, median over ``--lookups`` Zipf keys (target: ``choose`` under
   20 us at 10,000 workers), the full ``candidates(key)`` list, and rebuilding the ring when a
   worker joins.
5. **Throughput model** for the seed's clusters (1,000 and 10,000 accelerators; ``--accelerators``)
   with ``--accel-per-node`` accelerators per node, each node a worker:
   ``per_node = min(NVMe, NIC_out, NIC_in / (2 - h))`` with ``NVMe = 1 / (h / (disks * read) +
   (1 - h) / (disks * write))`` (hits read the disks, misses are written to them) and a cache hit
   ratio ``h``; NIC_in carries the node's own reads plus its misses' fills. The busiest worker
   saturates first, so ``aggregate = nodes * per_node / (max/mean)``, with max/mean simulated at
   that node count (ours, default cap). Compared with the seed's 1 TB/s and 8 TB/s.

Usage: python bench/sim/selection_sim.py [--workers 1000,10000] [--json PATH] [--quick] [...]
(``--help`` lists every input with its default). Deterministic for a given ``--seed``. Prints the
tables; writes JSON to ``.artifacts/sim/selection.json`` unless ``--json`` says otherwise.
"""

from __future__ import annotations

import argparse
import hashlib
import heapq
import math
import operator
import random
import statistics
import sys
import time
from array import array
from bisect import bisect_left
from collections.abc import Sequence
from dataclasses import dataclass, field
from itertools import repeat
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.sim.common import (  # noqa: E402
    ZipfSampler,
    format_table,
    percentile,
    write_json,
)
from pcache.selection import Node, WorkerSelector  # noqa: E402

DEFAULT_JSON = ROOT / ".artifacts" / "sim" / "selection.json"
SEED_CLAIMS_TBPS = {1000: 1.0, 10000: 8.0}  # the seed: 1 TB/s on 1,000, 8 TB/s on 10,000
TARGET_MAX_MEAN = 1.1
TARGET_MOVED = 1.1
TARGET_CHOOSE_US = 20.0


# -- workers ---------------------------------------------------------------------------------------


def parse_mix(text: str) -> list[tuple[float, float]]:
    """``"1:0.5,2:0.3,4:0.2"`` -> [(weight, fraction), ...]; fractions must sum to 1."""
    mix = []
    for part in text.split(","):
        weight, _, fraction = part.partition(":")
        mix.append((float(weight), float(fraction)))
    if not mix or any(w <= 0 or f < 0 for w, f in mix) or abs(sum(f for _, f in mix) - 1) > 1e-9:
        raise ValueError(f"weights must be weight:fraction pairs summing to 1, got {text!r}")
    return mix


def assign_weights(n: int, mix: Sequence[tuple[float, float]], rng: random.Random) -> list[float]:
    """``n`` weights in the mix's proportions (largest remainder), shuffled by ``rng``."""
    exact = [f * n for _, f in mix]
    counts = [math.floor(x) for x in exact]
    by_remainder = sorted(range(len(mix)), key=lambda i: (counts[i] - exact[i], i))
    for i in by_remainder[: n - sum(counts)]:
        counts[i] += 1
    weights = [w for (w, _), c in zip(mix, counts, strict=True) for _ in range(c)]
    rng.shuffle(weights)
    return weights


def make_workers(weights: Sequence[float], prefix: str = "w") -> list[Node]:
    return [
        Node(f"{prefix}{i:05d}", f"http://10.{i >> 16 & 255}.{i >> 8 & 255}.{i & 255}:7070", w)
        for i, w in enumerate(weights)
    ]


def block_name(rank: int) -> str:
    """The block key of popularity rank ``rank`` (a pcache-style namespace/key#index)."""
    return f"train/ds/shard-{rank // 16:06d}.tar#{rank % 16}"


# -- peers (no load awareness) ---------------------------------------------------------------------


class KetamaRing:
    """Plain consistent hashing as libketama does it: md5 of ``"{id}-{j}"`` gives four 32-bit
    points per digest, 160 points per unit of weight (``unit``: the cluster's initial mean
    weight, kept across joins and leaves so other workers' points stay), a key goes to the first
    point at or after md5(key)'s first 32 bits."""

    POINTS = 160

    def __init__(self, nodes: Sequence[Node], unit: float | None = None) -> None:
        self.unit = unit if unit is not None else statistics.fmean(n.weight for n in nodes)
        self.ids = [n.node_id for n in nodes]
        packed: list[int] = []
        for i, node in enumerate(nodes):
            packed.extend(self._points(node, i))
        packed.sort()
        self._set(packed)

    def _points(self, node: Node, i: int) -> list[int]:
        digests = max(1, round(self.POINTS * node.weight / self.unit / 4))
        out: list[int] = []
        for j in range(digests):
            d = hashlib.md5(f"{node.node_id}-{j}".encode()).digest()
            out.extend(int.from_bytes(d[4 * h : 4 * h + 4], "little") << 32 | i for h in range(4))
        return out

    def _set(self, packed: list[int]) -> None:
        self._packed = packed
        self.points = array("Q", map(operator.rshift, packed, repeat(32)))
        self.owners = array("I", map(operator.and_, packed, repeat(0xFFFFFFFF)))

    def owner(self, key: str) -> str:
        h = int.from_bytes(hashlib.md5(key.encode()).digest()[:4], "little")
        i = bisect_left(self.points, h)
        return self.ids[self.owners[i if i < len(self.points) else 0]]

    def without(self, node_id: str) -> KetamaRing:
        gone = self.ids.index(node_id)
        ring = object.__new__(KetamaRing)
        ring.unit, ring.ids = self.unit, self.ids
        ring._set([p for p in self._packed if p & 0xFFFFFFFF != gone])
        return ring

    def with_node(self, node: Node) -> KetamaRing:
        ring = object.__new__(KetamaRing)
        ring.unit, ring.ids = self.unit, [*self.ids, node.node_id]
        ring._set(sorted(self._packed + ring._points(node, len(self.ids))))
        return ring


def next_prime(n: int) -> int:
    def prime(k: int) -> bool:
        return k >= 2 and all(k % d for d in range(2, math.isqrt(k) + 1))

    while not prime(n):
        n += 1
    return n


class Maglev:
    """Maglev hashing (Eisenbud et al., NSDI 2016): each backend walks its own permutation of a
    prime-sized table (offset and skip from two hashes of its id), taking turns to claim the next
    free entry; weights by turns in proportion to weight. A key reads entry ``hash(key) mod M``."""

    def __init__(self, nodes: Sequence[Node], size: int) -> None:
        self.size = size
        self.ids = [n.node_id for n in nodes]
        wmax = max(n.weight for n in nodes)
        turn = [n.weight / wmax for n in nodes]
        offsets, skips = [], []
        for node in nodes:
            d = hashlib.blake2b(node.node_id.encode(), digest_size=16, person=b"maglev").digest()
            offsets.append(int.from_bytes(d[:8], "big") % size)
            skips.append(int.from_bytes(d[8:], "big") % (size - 1) + 1)
        table = array("i", [-1]) * size
        nxt = [0] * len(nodes)
        credit = [0.0] * len(nodes)
        filled = 0
        while filled < size:
            for i in range(len(nodes)):
                c = credit[i] + turn[i]
                if c < 1.0:
                    credit[i] = c
                    continue
                credit[i] = c - 1.0
                off, sk, j = offsets[i], skips[i], nxt[i]
                slot = (off + j * sk) % size
                while table[slot] >= 0:
                    j += 1
                    slot = (off + j * sk) % size
                table[slot] = i
                nxt[i] = j + 1
                filled += 1
                if filled == size:
                    break
        self.table = table

    def owner(self, key: str) -> str:
        h = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "big")
        return self.ids[self.table[h % self.size]]


# -- the simulated world ---------------------------------------------------------------------------


class SimClock:
    """The virtual clock every selector reads."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t


class FifoWorker:
    """One worker: a FIFO server; a request starts when it arrives or the previous one ends."""

    __slots__ = ("free_at",)

    def __init__(self) -> None:
        self.free_at = 0.0

    def serve(self, arrival: float, service: float) -> float:
        """Completion time of a request arriving at ``arrival`` that needs ``service`` seconds."""
        start = arrival if arrival > self.free_at else self.free_at
        self.free_at = start + service
        return self.free_at


def max_over_mean(counts: Sequence[float], weights: Sequence[float]) -> float:
    """Busiest worker's requests per unit of capacity over the mean per unit of capacity."""
    total = sum(counts)
    if total <= 0:
        return math.nan
    per_unit = total / sum(weights)
    return max(c / w for c, w in zip(counts, weights, strict=True)) / per_unit


def moved_share(before: Sequence[str], after: Sequence[str]) -> float:
    return sum(1 for b, a in zip(before, after, strict=True) if b != a) / len(before)


@dataclass
class RunResult:
    label: str
    max_mean: float
    top2_share: float
    hottest_workers: int
    p50_ms: float
    p99_ms: float
    counted: int
    slow_share: float = math.nan
    backing: int = 0
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class World:
    """One worker count: the workers, the popularity, and cached first candidates of keys."""

    def __init__(self, n: int, args: argparse.Namespace) -> None:
        self.args = args
        rng = random.Random(f"{args.seed}/weights/{n}")
        self.weights = assign_weights(n, parse_mix(args.weights), rng)
        self.workers = make_workers(self.weights)
        self.index = {w.node_id: i for i, w in enumerate(self.workers)}
        self.zipf = ZipfSampler(args.keys, args.zipf_s)
        self._ref = WorkerSelector(self.workers)
        self._top2: dict[int, tuple[int, ...]] = {}

    def top2(self, rank: int) -> tuple[int, ...]:
        """Indices of the block's first two candidates (no load, no health: the placement)."""
        got = self._top2.get(rank)
        if got is None:
            got = tuple(self.index[n.node_id] for n in self._ref.candidates(block_name(rank), 2))
            self._top2[rank] = got
        return got

    def local_ids(self, clients: int) -> list[str]:
        n = len(self.workers)
        return [self.workers[c * n // clients].node_id for c in range(clients)]


def run(
    world: World,
    label: str,
    *,
    clients: int,
    requests: int,
    load_factor: float = 1.25,
    health_aware: bool = True,
    slow: frozenset[int] = frozenset(),
    seed: str = "",
    rho: float | None = None,
) -> RunResult:
    """One discrete-event run of ``requests`` reads from ``clients`` real selectors."""
    args = world.args
    started = time.perf_counter()
    rng = random.Random(f"{args.seed}/run/{len(world.workers)}/{seed or label}")
    clock = SimClock()
    settings: dict[str, Any] = {"clock": clock, "load_factor": load_factor}
    if not health_aware:
        settings.update(slow_factor=math.inf, latency_tie_ratio=math.inf)
    selectors = [
        WorkerSelector(world.workers, local_id=local, **settings)
        for local in world.local_ids(clients)
    ]
    weights = world.weights
    service = [
        args.service_ms / 1000.0 / w * (args.slow_factor if i in slow else 1.0)
        for i, w in enumerate(weights)
    ]
    rate = (args.rho if rho is None else rho) * sum(weights) / (args.service_ms / 1000.0)
    servers = [FifoWorker() for _ in weights]
    index, top2 = world.index, world.top2
    ranks = world.zipf.sample(rng, requests)
    warm = int(requests * args.warmup)
    counts = [0] * len(weights)
    latencies = array("d")
    in_top2 = to_slow = backing = 0
    hottest: set[int] = set()
    pending: list[tuple[float, int, Any]] = []
    expo, push, pop = rng.expovariate, heapq.heappush, heapq.heappop
    t = 0.0
    for r, rank in enumerate(ranks):
        t += expo(rate)
        while pending and pending[0][0] <= t:
            clock.t, _, ctx = pop(pending)
            ctx.__exit__(None, None, None)
        clock.t = t
        selector = selectors[r % clients]
        node = selector.choose(block_name(rank))
        if node is None:  # no worker can serve: the backing store would
            backing += 1
            continue
        i = index[node.node_id]
        ctx = selector.track(node)
        ctx.__enter__()
        done = servers[i].serve(t, expo(1.0 / service[i]))
        push(pending, (done, r, ctx))
        if r >= warm:
            counts[i] += 1
            latencies.append(done - t)
            if i in top2(rank):
                in_top2 += 1
            if i in slow:
                to_slow += 1
            if rank == 0:
                hottest.add(i)
    while pending:
        clock.t, _, ctx = pop(pending)
        ctx.__exit__(None, None, None)
    counted = len(latencies)
    ordered = sorted(latencies)
    return RunResult(
        label=label,
        max_mean=max_over_mean(counts, weights),
        top2_share=in_top2 / counted if counted else math.nan,
        hottest_workers=len(hottest),
        p50_ms=percentile(ordered, 0.50) * 1000.0,
        p99_ms=percentile(ordered, 0.99) * 1000.0,
        counted=counted,
        slow_share=to_slow / counted if counted and slow else math.nan,
        backing=backing,
        wall_s=time.perf_counter() - started,
    )


def sampled_peer(world: World, owner: Any, requests: int, seed: str) -> float:
    """Max/mean of a static key -> worker map over the same sampled requests as ``run``."""
    rng = random.Random(f"{world.args.seed}/run/{len(world.workers)}/{seed}")
    ranks = world.zipf.sample(rng, requests)[int(requests * world.args.warmup) :]
    memo: dict[int, int] = {}
    counts = [0] * len(world.workers)
    for rank in ranks:
        i = memo.get(rank)
        if i is None:
            i = memo[rank] = world.index[owner(block_name(rank))]
        counts[i] += 1
    return max_over_mean(counts, world.weights)


def expected_peer(world: World, owner: Any, uniform_shares: Sequence[float]) -> float:
    """Exact expected max/mean of a static map: the ``--exact-keys`` hottest blocks by their
    owner, the rest of the probability mass (the tail) by the map's share of uniform keys."""
    zipf = world.zipf
    head = min(world.args.exact_keys, zipf.n)
    load = [0.0] * len(world.workers)
    for rank in range(head):
        load[world.index[owner(block_name(rank))]] += zipf.probability(rank)
    tail = 1.0 - zipf.cum[head - 1] / zipf.total
    for i, share in enumerate(uniform_shares):
        load[i] += tail * share
    return max_over_mean(load, world.weights)


def weighted_random(world: World, requests: int) -> float:
    """Max/mean when each counted request goes to a worker at random in proportion to weight."""
    rng = random.Random(f"{world.args.seed}/random/{len(world.workers)}")
    counted = requests - int(requests * world.args.warmup)
    picks = rng.choices(range(len(world.weights)), weights=world.weights, k=counted)
    counts = [0] * len(world.weights)
    for i in picks:
        counts[i] += 1
    return max_over_mean(counts, world.weights)


# -- sections --------------------------------------------------------------------------------------


def requests_for(n: int, args: argparse.Namespace, per_worker: float | None = None) -> int:
    per = args.requests_per_worker if per_worker is None else per_worker
    return max(args.min_requests, round(per * n))


def balance(world: World, peers: dict[str, Any], uniform: dict[str, list[float]]) -> list[dict]:
    args = world.args
    n = len(world.workers)
    requests = requests_for(n, args)
    rows: list[dict[str, Any]] = []
    for label, factor in (
        ("ours (load_factor 1.25, default)", 1.25),
        ("ours (load_factor 1.1)", 1.1),
        ("ours, no cap (load_factor inf)", math.inf),
    ):
        res = run(
            world,
            label,
            clients=args.clients,
            requests=requests,
            load_factor=factor,
            seed="balance",
        )
        rows.append({"scheme": label, "load_factor": factor, **_result(res)})
    for name, peer in peers.items():
        rows.append(
            {
                "scheme": f"{name} (no load awareness)",
                "max_mean": sampled_peer(world, peer.owner, requests, "balance"),
                "expected_max_mean": expected_peer(world, peer.owner, uniform[name]),
            }
        )
    rows.append(
        {"scheme": "weighted random (noise floor)", "max_mean": weighted_random(world, requests)}
    )
    first = world._ref

    def ours_first(key: str) -> str:
        return first.candidates(key, 1)[0].node_id

    rows[2]["expected_max_mean_first_choice"] = expected_peer(world, ours_first, uniform["ours"])
    for row in rows:
        row["requests"] = requests
        row["clients"] = args.clients
    return rows


def _result(res: RunResult) -> dict[str, Any]:
    return {
        "max_mean": res.max_mean,
        "top2_share": res.top2_share,
        "hottest_workers": res.hottest_workers,
        "p50_ms": res.p50_ms,
        "p99_ms": res.p99_ms,
        "counted": res.counted,
        "backing": res.backing,
        "wall_s": res.wall_s,
    }


def keys_moved(world: World, peers: dict[str, Any]) -> tuple[list[dict], dict[str, list[float]]]:
    """First-candidate changes on one leave and one join; also each map's uniform-key shares."""
    args = world.args
    rng = random.Random(f"{args.seed}/moved/{len(world.workers)}")
    keys = [f"obj/{rng.getrandbits(48):012x}" for _ in range(args.moved_keys)]
    workers = world.workers
    leaver = workers[rng.randrange(len(workers))]
    joiner = Node("joiner", "http://10.255.255.254:7070", rng.choice(world.weights))
    total_w = sum(world.weights)
    selector = WorkerSelector(workers)

    def ours(sel: WorkerSelector) -> list[str]:
        return [sel.candidates(k, 1)[0].node_id for k in keys]

    maps: dict[str, tuple[list[str], list[str], list[str]]] = {}
    base = ours(selector)
    selector.set_nodes([w for w in workers if w is not leaver])
    left = ours(selector)
    started = time.perf_counter()
    selector.set_nodes([*workers, joiner])
    rebuild_s = time.perf_counter() - started
    maps["ours"] = (base, left, ours(selector))
    for name, peer in peers.items():
        changed: tuple[Any, Any]
        if isinstance(peer, KetamaRing):
            changed = peer.without(leaver.node_id), peer.with_node(joiner)
        else:
            changed = (
                Maglev([w for w in workers if w is not leaver], peer.size),
                Maglev([*workers, joiner], peer.size),
            )
        base_p, left_p, join_p = ([m.owner(k) for k in keys] for m in (peer, *changed))
        maps[name] = (base_p, left_p, join_p)
    rows = []
    shares: dict[str, list[float]] = {}
    for name, (before, after_leave, after_join) in maps.items():
        count = {w.node_id: 0 for w in workers}
        for b in before:
            count[b] += 1
        shares[name] = [count[w.node_id] / len(keys) for w in workers]
        for event, after, must, ideal in (
            (
                "leave",
                after_leave,
                before.count(leaver.node_id) / len(keys),
                leaver.weight / total_w,
            ),
            (
                "join",
                after_join,
                after_join.count("joiner") / len(keys),
                joiner.weight / (total_w + joiner.weight),
            ),
        ):
            moved = moved_share(before, after)
            rows.append(
                {
                    "scheme": name,
                    "event": event,
                    "worker_weight": (leaver if event == "leave" else joiner).weight,
                    "moved": moved,
                    "must_move": must,
                    "excess": moved - must,
                    "ideal": ideal,
                    "moved_over_ideal": moved / ideal,
                    "stderr_over_ideal": math.sqrt(ideal * (1 - ideal) / len(keys)) / ideal,
                    "one_over_n": 1.0 / len(workers),
                    "keys": len(keys),
                }
            )
    rows.append({"scheme": "ours", "event": "ring rebuild on join", "seconds": rebuild_s})
    return rows, shares


def slow_workers(world: World) -> list[dict]:
    args = world.args
    n = len(world.workers)
    rng = random.Random(f"{args.seed}/slow/{n}")
    slow = frozenset(rng.sample(range(n), max(1, round(args.slow_fraction * n))))
    weights = world.weights
    nominal = sum(weights[i] for i in slow) / sum(weights)
    capacity = sum(weights[i] / args.slow_factor for i in slow)
    capacity /= capacity + sum(w for i, w in enumerate(weights) if i not in slow)
    requests = requests_for(n, args, args.slow_requests_per_worker)
    clients = args.slow_clients
    rows = []
    for label, aware in (("ours (slow detection)", True), ("ours, no slow detection", False)):
        res = run(
            world,
            label,
            clients=clients,
            requests=requests,
            health_aware=aware,
            slow=slow,
            seed="slow",
            rho=args.slow_rho,
        )
        rows.append(
            {
                "scheme": label,
                "slow_workers": len(slow),
                "slow_share": res.slow_share,
                "nominal_share": nominal,
                "capacity_share": capacity,
                "requests": requests,
                "clients": clients,
                "requests_per_client_per_worker": requests / clients / n,
                **_result(res),
            }
        )
    return rows


def lookup_cost(world: World) -> dict[str, Any]:
    args = world.args
    n = len(world.workers)
    rng = random.Random(f"{args.seed}/lookup/{n}")
    selector = WorkerSelector(world.workers, local_id=world.workers[0].node_id)
    for rank in world.zipf.sample(rng, 2 * n):
        selector.choose(block_name(rank))
    names = [block_name(r) for r in world.zipf.sample(rng, args.lookups)]
    clock = time.perf_counter_ns

    def timed(call: Any, keys: Sequence[str]) -> list[float]:
        out = []
        for k in keys:
            t0 = clock()
            call(k)
            out.append((clock() - t0) / 1000.0)
        return sorted(out)

    choose = timed(selector.choose, names)
    cand2 = timed(lambda k: selector.candidates(k, 2), names)
    full = timed(selector.candidates, names[:20])
    return {
        "workers": n,
        "choose_median_us": statistics.median(choose),
        "choose_p99_us": percentile(choose, 0.99),
        "candidates2_median_us": statistics.median(cand2),
        "candidates_full_median_ms": statistics.median(full) / 1000.0,
        "lookups": len(names),
    }


def node_model(args: argparse.Namespace) -> dict[str, float]:
    """Per-node bandwidths (GB/s) of the throughput model; see the module docstring."""
    h = args.hit_ratio
    read = args.disks * args.nvme_read_gbs
    write = args.disks * args.nvme_write_gbs
    nvme = 1.0 / (h / read + (1.0 - h) / write)
    nic = args.nic_gbit / 8.0 * args.nic_efficiency
    nic_in = nic / (2.0 - h)
    return {"nvme": nvme, "nic_out": nic, "nic_in": nic_in, "per_node": min(nvme, nic, nic_in)}


def aggregate_tbs(nodes: int, per_node_gbs: float, max_mean: float) -> float:
    """Aggregate TB/s when the busiest of ``nodes`` workers, at ``max_mean`` times the mean load,
    saturates at ``per_node_gbs``: ``nodes * per_node / (max/mean)``."""
    return nodes * per_node_gbs / max_mean / 1000.0


def throughput(args: argparse.Namespace) -> list[dict]:
    model = node_model(args)
    rows = []
    for accelerators in args.accelerators:
        nodes = math.ceil(accelerators / args.accel_per_node)
        world = World(nodes, args)
        res = run(
            world,
            "ours",
            clients=min(args.clients, nodes),
            requests=requests_for(nodes, args),
            seed="throughput",
        )
        ideal = aggregate_tbs(nodes, model["per_node"], 1.0)
        aggregate = aggregate_tbs(nodes, model["per_node"], res.max_mean)
        claim = SEED_CLAIMS_TBPS.get(accelerators)
        rows.append(
            {
                "accelerators": accelerators,
                "nodes": nodes,
                "per_node_gbs": model["per_node"],
                "max_mean": res.max_mean,
                "ideal_tbs": ideal,
                "aggregate_tbs": aggregate,
                "seed_tbs": claim,
                "seed_per_node_gbs": None if claim is None else claim * 1000.0 / nodes,
                "model_over_seed": None if claim is None else aggregate / claim,
                **{f"{k}_gbs": v for k, v in model.items() if k != "per_node"},
            }
        )
    return rows


# -- output ----------------------------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def _f(x: Any, digits: int = 3) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return f"{x:.{digits}f}"


def print_report(result: dict[str, Any]) -> None:
    args = result["inputs"]
    print(
        f"Worker selection at scale: Zipf s={args['zipf_s']} over {args['keys']:,} blocks "
        f"(the hottest is {result['hottest_share']:.1%} of reads), weights {args['weights']}, "
        f"service {args['service_ms']} ms per block at weight 1"
    )
    for n, section in result["workers"].items():
        print(f"\n== {int(n):,} workers ==")
        _print_balance(section["balance"], args)
        _print_moved(section["keys_moved"], int(n))
        _print_slow(section["slow"], args)
        lk = section["lookup"]
        ok = lk["choose_median_us"] < TARGET_CHOOSE_US
        print(
            f"\nLookup cost, real code, wall time over {lk['lookups']:,} keys: choose() median "
            f"{lk['choose_median_us']:.1f} us (p99 {lk['choose_p99_us']:.1f}), "
            f"candidates(key, 2) {lk['candidates2_median_us']:.1f} us, full candidates(key) "
            f"{lk['candidates_full_median_ms']:.1f} ms. Target choose < {TARGET_CHOOSE_US:g} us: "
            f"{verdict(ok)}"
        )
    _print_throughput(result)


def _print_balance(balance: list[dict[str, Any]], args: dict[str, Any]) -> None:
    rows = []
    for r in balance:
        mark = "-" if "random" in r["scheme"] else verdict(r["max_mean"] <= TARGET_MAX_MEAN)
        rows.append(
            [
                r["scheme"],
                _f(r["max_mean"]),
                _f(r.get("expected_max_mean")),
                _f(r.get("top2_share")),
                r.get("hottest_workers", "-"),
                _f(r.get("p50_ms"), 2),
                _f(r.get("p99_ms"), 2),
                mark,
            ]
        )
    first = balance[0]
    print(
        f"Load balance: {first['requests']:,} requests from {first['clients']} clients at "
        f"rho {args['rho']}, first {args['warmup']:.0%} not counted; max/mean of requests per "
        f"unit of capacity (target <= {TARGET_MAX_MEAN})"
    )
    header = ["scheme", "max/mean", "expected", "top-2", "hottest", "p50 ms", "p99 ms", "target"]
    print(format_table(header, rows))
    uncapped = next(r for r in balance if r.get("load_factor") == math.inf)
    print(
        "(expected: exact, no sampling; ours with its first candidate only would be "
        f"{_f(uncapped.get('expected_max_mean_first_choice'))}. A sampled max/mean includes "
        "noise: see weighted random; ours tends to its load_factor in a long run.)"
    )


def _print_moved(moved: list[dict[str, Any]], n: int) -> None:
    rows = []
    for r in moved:
        if "moved" not in r:
            continue
        rows.append(
            [
                r["scheme"],
                r["event"],
                _f(r["worker_weight"], 1),
                f"{r['moved']:.5%}",
                f"{r['ideal']:.5%}",
                f"{r['moved_over_ideal']:.2f} +-{r['stderr_over_ideal']:.2f}",
                f"{r['excess']:.5%}",
                _f(r["moved"] * n, 2),
                verdict(r["moved_over_ideal"] <= TARGET_MOVED),
            ]
        )
    keys = moved[0]["keys"]
    print(
        f"\nKeys moved: share of {keys:,} keys whose first candidate changes when one worker "
        "leaves or joins; ideal = that worker's weight share (1/N at equal weights)"
    )
    header = ["scheme", "event", "weight", "moved", "ideal", "moved/ideal", "excess", "moved*N"]
    print(format_table([*header, f"<= {TARGET_MOVED}x"], rows))
    rebuild = next(r for r in moved if "seconds" in r)
    print(f"(ours: ring rebuilt by set_nodes() on the join in {rebuild['seconds']:.2f} s)")


def _print_slow(slow: list[dict[str, Any]], args: dict[str, Any]) -> None:
    rows = []
    for r in slow:
        rows.append(
            [
                r["scheme"],
                r["slow_workers"],
                f"{r['slow_share']:.2%}",
                f"{r['nominal_share']:.2%}",
                f"{r['capacity_share']:.2%}",
                _f(r["p50_ms"], 2),
                _f(r["p99_ms"], 2),
                _f(r["requests_per_client_per_worker"], 1),
            ]
        )
    first = slow[0]
    print(
        f"\nSlow workers: {args['slow_fraction']:.0%} serve {args['slow_factor']:g}x slower; "
        f"{first['requests']:,} requests from {first['clients']} clients at rho "
        f"{args['slow_rho']}; share of requests they got vs their share of weight and capacity"
    )
    header = ["scheme", "slow", "to slow", "weight", "capacity", "p50 ms", "p99 ms"]
    print(format_table([*header, "req/client/worker"], rows))


def _print_throughput(result: dict[str, Any]) -> None:
    model = result["throughput_inputs"]
    print(
        "\nThroughput model: per_node = min(NVMe, NIC_out, NIC_in / (2 - h)), "
        "NVMe = 1 / (h / (disks * read) + (1 - h) / (disks * write)); "
        "aggregate = nodes * per_node / (max/mean)"
    )
    print(
        f"inputs: {model['accel_per_node']} accelerators a node, {model['disks']} NVMe x "
        f"{model['nvme_read_gbs']} GB/s read, {model['nvme_write_gbs']} GB/s write; NIC "
        f"{model['nic_gbit']:g} Gbit/s x {model['nic_efficiency']}; hit ratio h = "
        f"{model['hit_ratio']}; max/mean simulated at each node count (ours, default cap)"
    )
    rows = []
    for r in result["throughput"]:
        rows.append(
            [
                f"{r['accelerators']:,}",
                r["nodes"],
                _f(r["nvme_gbs"], 1),
                _f(r["nic_out_gbs"], 1),
                _f(r["nic_in_gbs"], 1),
                _f(r["per_node_gbs"], 1),
                _f(r["max_mean"]),
                _f(r["ideal_tbs"], 2),
                _f(r["aggregate_tbs"], 2),
                _f(r["seed_tbs"], 1),
                _f(r["seed_per_node_gbs"], 1),
                _f(r["model_over_seed"], 2),
            ]
        )
    header = ["accelerators", "nodes", "NVMe GB/s", "NIC out", "NIC in", "per node"]
    header += ["max/mean", "ideal TB/s", "model TB/s", "seed TB/s", "seed GB/s/node", "model/seed"]
    print(format_table(header, rows))


# -- main ------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workers", default="1000,10000", help="worker counts (default 1000,10000)")
    p.add_argument("--json", type=Path, default=DEFAULT_JSON, help="where to write the results")
    p.add_argument("--quick", action="store_true", help="small runs (seconds), for tests")
    p.add_argument("--seed", default="1", help="seed of every random choice (default 1)")
    p.add_argument("--weights", default="1:0.5,2:0.3,4:0.2", help="weight:fraction mix")
    p.add_argument("--keys", type=int, default=1_000_000, help="blocks (default 1,000,000)")
    p.add_argument("--zipf-s", type=float, default=1.1, help="Zipf exponent (default 1.1)")
    p.add_argument("--clients", type=int, default=16, help="clients (default 16)")
    p.add_argument("--slow-clients", type=int, default=4, help="clients, slow runs (default 4)")
    p.add_argument(
        "--requests-per-worker", type=float, default=32.0, help="requests per run per worker (32)"
    )
    p.add_argument(
        "--slow-requests-per-worker", type=float, default=32.0, help="the same, slow runs (32)"
    )
    p.add_argument(
        "--min-requests", type=int, default=80_000, help="requests per run, at least (80,000)"
    )
    p.add_argument("--warmup", type=float, default=0.25, help="share of requests not counted")
    p.add_argument("--rho", type=float, default=0.7, help="offered load / total service rate")
    p.add_argument("--service-ms", type=float, default=1.0, help="mean service, unit weight")
    p.add_argument("--slow-fraction", type=float, default=0.05, help="share of slow workers")
    p.add_argument("--slow-factor", type=float, default=10.0, help="how much slower they are")
    p.add_argument("--slow-rho", type=float, default=0.05, help="offered load, slow runs (0.05)")
    p.add_argument("--moved-keys", type=int, default=200_000, help="keys for the moved count")
    p.add_argument("--exact-keys", type=int, default=100_000, help="hottest blocks scored exactly")
    p.add_argument("--lookups", type=int, default=20_000, help="timed lookups")
    p.add_argument("--maglev-per-worker", type=int, default=100, help="Maglev entries per worker")
    p.add_argument("--maglev-max", type=int, default=262_144, help="Maglev entries, at most")
    p.add_argument(
        "--accelerators", default="1000,10000", help="cluster sizes of the throughput model"
    )
    p.add_argument("--accel-per-node", type=int, default=8, help="accelerators per node (8)")
    p.add_argument("--disks", type=int, default=4, help="NVMe disks per node (4)")
    p.add_argument("--nvme-read-gbs", type=float, default=3.5, help="GB/s read per disk (3.5)")
    p.add_argument("--nvme-write-gbs", type=float, default=2.0, help="GB/s write per disk (2.0)")
    p.add_argument("--nic-gbit", type=float, default=200.0, help="NIC Gbit/s per node (200)")
    p.add_argument("--nic-efficiency", type=float, default=0.9, help="usable NIC share (0.9)")
    p.add_argument("--hit-ratio", type=float, default=0.95, help="cache hit ratio (0.95)")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    counts = [int(x) for x in str(args.workers).split(",") if x]
    args.accelerators = [int(x) for x in str(args.accelerators).split(",") if x]
    if args.quick:
        args.keys = min(args.keys, 20_000)
        args.requests_per_worker = min(args.requests_per_worker, 16.0)
        args.slow_requests_per_worker = min(args.slow_requests_per_worker, 16.0)
        args.min_requests = min(args.min_requests, 2_000)
        args.moved_keys = min(args.moved_keys, 5_000)
        args.exact_keys = min(args.exact_keys, 2_000)
        args.lookups = min(args.lookups, 500)
        args.clients = min(args.clients, 8)
        args.slow_clients = min(args.slow_clients, 4)
    started = time.perf_counter()
    inputs = {k: v for k, v in vars(args).items() if k != "json"}
    result: dict[str, Any] = {"inputs": {**inputs, "json": str(args.json)}, "workers": {}}
    for n in counts:
        timings: dict[str, float] = {}
        t0 = time.perf_counter()
        world = World(n, args)
        size = next_prime(min(args.maglev_per_worker * n, args.maglev_max))
        peers: dict[str, Any] = {
            "ring": KetamaRing(world.workers),
            "maglev": Maglev(world.workers, size),
        }
        timings["setup"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        moved, uniform = keys_moved(world, peers)
        timings["keys_moved"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        loads = balance(world, peers, uniform)
        timings["balance"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        slow = slow_workers(world)
        timings["slow"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        lookup = lookup_cost(world)
        timings["lookup"] = time.perf_counter() - t0
        result["workers"][str(n)] = {
            "balance": loads,
            "keys_moved": moved,
            "slow": slow,
            "lookup": lookup,
            "maglev_size": size,
            "section_wall_s": timings,
        }
    result["throughput_inputs"] = {
        k: getattr(args, k)
        for k in (
            "accel_per_node",
            "disks",
            "nvme_read_gbs",
            "nvme_write_gbs",
            "nic_gbit",
            "nic_efficiency",
            "hit_ratio",
        )
    }
    result["hottest_share"] = ZipfSampler(args.keys, args.zipf_s).probability(0)
    result["throughput"] = throughput(args)
    result["wall_s"] = time.perf_counter() - started
    print_report(result)
    path = write_json(args.json, result)
    print(f"\nwall time {result['wall_s']:.0f} s; JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
