"""Tests of bench/sim/listing_sim.py and its model: the key space's arithmetic, the simulated store's pages,
the virtual clock and rate limit on cases small enough to work out by hand, and tiny runs of the
real lister on it."""

from __future__ import annotations

import bisect
import json
import random
import threading
from pathlib import Path
from typing import Any

import pytest

from babel_sync.listing import MemoryListingState
from bench.sim.listing_model import (
    Coverage,
    Field,
    KeySpace,
    Segment,
    Server,
    SimStore,
    VirtualClock,
    VirtualCondition,
)
from bench.sim.listing_sim import SimConfig, dataset, main, run_lister, run_serial
from tests.servers.static_s3 import Bucket

pytestmark = pytest.mark.timeout(120)


def small_space() -> KeySpace:
    """Subtrees, a flat prefix, a lone key and a deeper tree; '-' < '/' < '0' in key order."""
    return KeySpace([
        Segment(["a/", Field(2, 12), "/", Field(1, 7), ".x"], 1),
        Segment(["b-", Field(3, 40)], 2),
        Segment(["top"], 3),
        Segment(["c/d/", Field(2, 5, 10), "/e/", Field(1, 3)], 4),
    ])  # fmt: skip


# -- the key space -----------------------------------------------------------------------------


def test_segment_keys_by_hand() -> None:
    seg = Segment(["a/", Field(2, 3, 5), "/x-", Field(1, 4), ".bin"], 7)
    assert seg.total == 12 and seg.length == len("a/05/x-0.bin")
    assert seg.key(0) == "a/05/x-0.bin" and seg.key(5) == "a/06/x-1.bin"
    assert seg.last == "a/07/x-3.bin"
    assert seg.keys(2, 7) == ["a/05/x-2.bin", "a/05/x-3.bin", "a/06/x-0.bin", "a/06/x-1.bin",
                              "a/06/x-2.bin"]  # fmt: skip
    objects = seg.objects(3, 5)
    assert [(o.key, o.size, o.etag) for o in objects] == [
        ("a/05/x-3.bin", 7, "9b2cf535f27731c974343645a3985328"),
        ("a/06/x-0.bin", 7, "9b2cf535f27731c974343645a3985328"),
    ]
    assert all(o.checksum is None and o.metadata == {} for o in objects)
    assert [seg.index_of(k) for k in seg.keys(0, 12)] == list(range(12))
    for wrong in [
        "a/08/x-0.bin",
        "a/05/x-4.bin",
        "a/05/y-0.bin",
        "a/5/x-0.bin",
        "a/\u0660\u0665/x-0.bin",
    ]:
        assert seg.index_of(wrong) is None
    assert seg.slash_after(0) == 1 and seg.slash_after(2) == 4 and seg.slash_after(5) == -1
    with pytest.raises(ValueError):
        Segment(["x", Field(1, 11)], 1)  # 11 values do not fit one digit


def test_lower_bound_agrees_with_bisect() -> None:
    space = small_space()
    keys = space.all_keys()
    assert keys == sorted(keys) and len(set(keys)) == len(keys) == space.total == 12 * 7 + 40 + 16
    rng = random.Random(7)
    odd = "\0 -./09:az\u00e9\U0001f600\U0010ffff"
    probes = ["", "a", "a/", "a/11/6.x", "a/11/6.xx", "b-039", "c/d/10/e/", "top", "topz", "zz"]
    for _ in range(3000):
        k = rng.choice(keys)
        cut = rng.randint(0, len(k))
        probes += [k, k[:cut], k[:cut] + rng.choice(odd), k[:cut] + rng.choice(odd) + k[cut:]]
    for p in probes:
        assert space.rank(p) == bisect.bisect_left(keys, p), p
        assert space.rank_after(p) == bisect.bisect_right(keys, p), p
    for i, k in enumerate(keys):
        assert space.key(i) == k and space.index_of(k) == i
    assert space.prefix_bounds("a/") == (0, 84) and space.prefix_bounds("") == (0, space.total)
    assert space.prefix_bounds("b-01") == (84 + 10, 84 + 20)


def test_segments_must_not_interleave() -> None:
    with pytest.raises(ValueError, match="interleave"):
        KeySpace([Segment(["k", Field(1, 5)], 1), Segment(["k3x"], 1)])


def test_dataset_scales_and_keeps_key_lengths() -> None:
    small, large = dataset(50_000), dataset(5_000_000)
    assert 4_900_000 < large.total < 5_100_000
    assert small.total < 150_000  # every field keeps at least one value: 64 shards of 1,000...
    assert [g.length for g in small.segments] == [g.length for g in large.segments]
    keys = small.all_keys()
    assert keys == sorted(keys) and len(set(keys)) == len(keys)


def _drain(store: SimStore, prefix: str, start_after: str, delimiter: str,
           limit: int) -> tuple[list[str], list[str]]:  # fmt: skip
    objects: list[str] = []
    prefixes: list[str] = []
    token = None
    while True:
        page = store.page(prefix, start_after=start_after, delimiter=delimiter, limit=limit,
                          token=token)  # fmt: skip
        assert len(page.objects) + len(page.prefixes) <= limit
        objects += [o.key for o in page.objects]
        prefixes += page.prefixes
        if page.token is None:
            return objects, prefixes
        token = page.token


def test_pages_match_a_sorted_key_list() -> None:
    """Every listing, followed page by page, equals the static S3 server's over the same keys."""
    space = small_space()
    keys = space.all_keys()
    model = Bucket("b", keys)
    store = SimStore(space, VirtualClock(), Server(0.0))
    rng = random.Random(3)
    prefixes = ["", "a/", "a/0", "a/05/", "b", "b-01", "c/", "c/d/", "c/d/13/", "t", "zz"]
    for _ in range(1500):
        prefix = rng.choice([*prefixes, rng.choice(keys)[: rng.randint(0, 6)]])
        start_after = rng.choice(["", rng.choice(keys), rng.choice(keys)[: rng.randint(0, 8)],
                                  "a/05/", "c/d/11/e/"])  # fmt: skip
        delimiter = rng.choice(["", "/"])
        limit = rng.choice([1, 2, 3, 7, 1000])
        expected: tuple[list[str], list[str]] = ([], [])
        start = None
        while True:
            # Its first element holds indices into keys, though annotated as strings.
            page: Any = model.page(prefix, delimiter, start_after, start, 1000)
            found, common, start, _ = page
            expected[0].extend(keys[i] for i in found)
            expected[1].extend(common)
            if start is None:
                break
        got = _drain(store, prefix, start_after, delimiter, limit)
        assert got == expected, (prefix, start_after, delimiter, limit)


# -- the clock and the server --------------------------------------------------------------------


def test_rate_limit_by_hand() -> None:
    strict = Server(latency=0.0, rate=10, burst=1)
    assert [strict.complete_at(0.0, 1) for _ in range(5)] == pytest.approx([0, 0.1, 0.2, 0.3, 0.4])
    assert strict.stats.throttled == 4 and strict.stats.throttled_s == pytest.approx(1.0)
    bursty = Server(latency=0.5, rate=10, burst=3)
    assert [bursty.complete_at(0.0, 1) for _ in range(5)] == pytest.approx([0.5, 0.5, 0.5, 0.6,
                                                                            0.7])  # fmt: skip
    # Idle for a while, the bucket is full again.
    assert [bursty.complete_at(10.0, 1) for _ in range(4)] == pytest.approx([10.5] * 3 + [10.6])
    parsing = Server(latency=1.0, cpu_per_entry=0.001)
    assert [parsing.complete_at(0.0, 1000) for _ in range(3)] == pytest.approx([2.0, 3.0, 4.0])


def test_threads_sleep_in_parallel_on_the_clock() -> None:
    clock = VirtualClock()
    woke: list[float] = []

    def sleeper(delay: float) -> None:
        for _ in range(2):
            clock.sleep_until(clock.now + delay)
        woke.append(clock.now)
        clock.exit()

    threads = [threading.Thread(target=sleeper, args=(d,)) for d in (1.0, 1.0, 1.5, 0.25)]
    clock.enter(len(threads))
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert sorted(woke) == [0.5, 2.0, 2.0, 3.0] and clock.now == 3.0


def test_condition_waits_in_virtual_time() -> None:
    clock = VirtualClock()
    cond = VirtualCondition(clock)
    seen: dict[str, tuple[bool, float]] = {}

    def waiter(name: str, timeout: float) -> None:
        with cond:
            seen[name] = (cond.wait(timeout), clock.now)
        clock.exit()

    def notifier() -> None:
        clock.sleep_until(3.0)
        with cond:
            cond.notify()
        clock.exit()

    threads = [threading.Thread(target=waiter, args=("times out", 0.5)),
               threading.Thread(target=waiter, args=("notified", 10.0)),
               threading.Thread(target=notifier)]  # fmt: skip
    clock.enter(len(threads))
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen == {"times out": (False, 0.5), "notified": (True, 3.0)}


# -- listings on the clock ------------------------------------------------------------------------


def test_serial_time_is_requests_times_latency() -> None:
    space = KeySpace([Segment(["k", Field(2, 10)], 5)])
    r = run_serial(space, SimConfig(latency_s=0.25, rate=0, page_size=3))
    assert (r.requests, r.simulated_s, r.complete) == (4, 1.0, True)
    slow = run_serial(space, SimConfig(latency_s=0.25, rate=2, burst=1, page_size=3))
    assert slow.simulated_s == pytest.approx(0.25 + 3 * 0.5)  # the rate limit binds: 2 a second


def test_fanout_only_by_hand() -> None:
    """Root listing (1 request, 2 prefixes) at t=1, then a/ and b/ side by side, 2 pages each."""
    space = KeySpace([Segment(["a/", Field(1, 10)], 1), Segment(["b/", Field(1, 10)], 1)])
    cfg = SimConfig(latency_s=1.0, rate=0, workers=4, page_size=5, fanout_depth=1)
    r = run_lister(space, cfg, split_ranges=False)
    assert (r.simulated_s, r.requests, r.tasks, r.splits, r.steals) == (3.0, 5, 3, 0, 0)
    assert r.complete and not r.errors
    ranges = run_lister(space, cfg)
    assert ranges.complete and ranges.simulated_s <= 3.0


def test_coverage_catches_gaps_and_duplicates() -> None:
    space = KeySpace([Segment(["k", Field(2, 10)], 1)])
    pages = [space.objects(0, 4), space.objects(4, 7), space.objects(7, 10)]
    whole = Coverage(space)
    for page in reversed(pages):
        whole(page)
    assert whole.complete and whole.runs == 1
    gap = Coverage(space)
    gap(pages[0])
    gap(pages[2])
    assert not gap.complete and gap.runs == 2
    twice = Coverage(space)
    for page in [*pages, pages[1]]:
        twice(page)
    assert not twice.complete and twice.runs == 2 and twice.objects == 13
    again = Coverage(space)
    for page in [pages[0], pages[0], pages[1], pages[2]]:
        again(page)
    assert not again.complete and again.errors  # the same start twice: reported at once
    scattered = Coverage(space)
    scattered([*space.objects(0, 2), *space.objects(5, 6)])
    scattered(space.objects(2, 5))
    scattered(space.objects(6, 10))
    assert scattered.complete


@pytest.mark.parametrize("split_ranges", [False, True])
def test_real_lister_lists_a_small_dataset_exactly(split_ranges: bool) -> None:
    space = dataset(40_000)
    cfg = SimConfig(latency_s=0.03, rate=2000, burst=200, workers=16)
    r = run_lister(space, cfg, split_ranges=split_ranges)
    assert r.complete, r.errors
    serial = run_serial(space, cfg)
    assert serial.complete and serial.simulated_s == pytest.approx(serial.requests * 0.03)
    assert r.simulated_s < serial.simulated_s / (8 if split_ranges else 2)


def test_resumable_state_is_left_empty() -> None:
    state = MemoryListingState()
    r = run_lister(dataset(20_000), SimConfig(workers=8), state=state)
    assert r.complete and state.pending() == []


@pytest.mark.integration  # starts a process
def test_main_writes_a_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "listing.json"
    main(["--keys", "60000", "--manifest-keys", "20000", "--workers", "16", "--json", str(out)])
    printed = capsys.readouterr().out
    assert "ranges + stealing vs serial" in printed and "extrapolated" in printed
    data = json.loads(out.read_text())
    assert data["summary"]["all_complete"]
    names = [r["name"] for r in data["results"]]
    assert names == ["serial", "fan-out only", "ranges + stealing"]
    assert data["results"][0]["computed"]  # a tenth of the keys, scaled by requests
    assert data["manifest"]["bytes_per_key"] > 33 and data["manifest"]["complete"]
