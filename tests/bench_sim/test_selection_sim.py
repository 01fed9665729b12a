"""Tests of bench/sim/selection_sim.py (and the helpers it shares in bench/sim/common.py): the
simulator's own arithmetic on cases small enough to work out by hand, the peers' structures, and
tiny runs of the real selectors through it."""

from __future__ import annotations

import argparse
import json
import math
import random
from collections import Counter
from pathlib import Path

import pytest

from bench.sim.common import ZipfSampler, format_table, percentile, write_json, zipf_cum_weights
from bench.sim.selection_sim import (
    FifoWorker,
    KetamaRing,
    Maglev,
    World,
    aggregate_tbs,
    assign_weights,
    build_parser,
    main,
    make_workers,
    max_over_mean,
    moved_share,
    next_prime,
    node_model,
    parse_mix,
    run,
)


def tiny_args(*extra: str) -> argparse.Namespace:
    return build_parser().parse_args(
        ["--keys", "200", "--min-requests", "300", "--requests-per-worker", "10", *extra]
    )


# -- common helpers --------------------------------------------------------------------------------


def test_zipf_weights_and_probabilities() -> None:
    assert zipf_cum_weights(3, 1.0) == pytest.approx([1.0, 1.5, 1.5 + 1 / 3])
    zipf = ZipfSampler(3, 1.0)
    assert [zipf.probability(r) for r in range(3)] == pytest.approx([6 / 11, 3 / 11, 2 / 11])
    draws = zipf.sample(random.Random(1), 22_000)
    assert set(draws) == {0, 1, 2}
    counts = Counter(draws)
    assert counts[0] / 22_000 == pytest.approx(6 / 11, abs=0.01)
    assert zipf.sample(random.Random(1), 50) == zipf.sample(random.Random(1), 50)
    with pytest.raises(ValueError):
        zipf_cum_weights(0, 1.0)


def test_percentile_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 50.0
    assert percentile(values, 0.99) == 99.0
    assert percentile(values, 1.0) == 100.0
    assert percentile(values, 0.0) == 1.0
    assert percentile([7.0], 0.99) == 7.0
    assert math.isnan(percentile([], 0.5))


def test_table_and_json(tmp_path: Path) -> None:
    table = format_table(["name", "x"], [["a", 1.5], ["long name", 10]])
    assert table.splitlines() == [
        "name         x",
        "---------  ---",
        "a          1.5",
        "long name   10",
    ]
    out = write_json(tmp_path / "deep" / "r.json", {"a": [1.0, math.inf], "b": math.nan})
    assert json.loads(out.read_text()) == {"a": [1.0, None], "b": None}


# -- the simulator's arithmetic --------------------------------------------------------------------


def test_weight_mix() -> None:
    mix = parse_mix("1:0.5,2:0.3,4:0.2")
    assert mix == [(1.0, 0.5), (2.0, 0.3), (4.0, 0.2)]
    assert Counter(assign_weights(10, mix, random.Random(0))) == {1.0: 5, 2.0: 3, 4.0: 2}
    # 1.5, 0.9, 0.6 -> floors 1, 0, 0; the two largest remainders (0.9, 0.6) get the rest.
    assert Counter(assign_weights(3, mix, random.Random(0))) == {1.0: 1, 2.0: 1, 4.0: 1}
    for bad in ("1:0.5,2:0.4", "0:1", "1:-0.5,2:1.5"):
        with pytest.raises(ValueError):
            parse_mix(bad)


def test_fifo_worker_queues() -> None:
    worker = FifoWorker()
    assert [worker.serve(0.0, 1.0) for _ in range(3)] == [1.0, 2.0, 3.0]
    assert worker.serve(2.5, 1.0) == 4.0  # waits for the third
    assert worker.serve(10.0, 0.5) == 10.5  # idle in between: starts on arrival


def test_max_over_mean_is_per_unit_of_capacity() -> None:
    assert max_over_mean([2, 4], [1.0, 2.0]) == 1.0  # 2 per unit each
    assert max_over_mean([3, 1], [1.0, 1.0]) == 1.5
    assert max_over_mean([4, 4, 0, 0], [1.0, 1.0, 1.0, 1.0]) == 2.0
    assert math.isnan(max_over_mean([0, 0], [1.0, 1.0]))


def test_moved_share_and_aggregate() -> None:
    assert moved_share(["a", "b", "c", "d"], ["a", "x", "c", "y"]) == 0.5
    assert aggregate_tbs(125, 8.0, 1.0) == 1.0  # 125 nodes x 8 GB/s
    assert aggregate_tbs(1250, 8.0, 1.25) == 8.0


def test_node_model() -> None:
    disks = ["--disks", "4", "--nvme-read-gbs", "3", "--nvme-write-gbs", "2"]
    args = build_parser().parse_args(
        [*disks, "--nic-gbit", "100", "--nic-efficiency", "1", "--hit-ratio", "1"]
    )
    assert node_model(args) == pytest.approx(
        {"nvme": 12.0, "nic_out": 12.5, "nic_in": 12.5, "per_node": 12.0}
    )
    args.hit_ratio = 0.5  # half the bytes read from 12 GB/s, half written at 8 GB/s
    model = node_model(args)
    assert model["nvme"] == pytest.approx(1 / (0.5 / 12 + 0.5 / 8))  # 9.6
    assert model["nic_in"] == pytest.approx(12.5 / 1.5)  # own reads plus the misses' fills
    assert model["per_node"] == pytest.approx(12.5 / 1.5)


# -- the peers -------------------------------------------------------------------------------------


def test_maglev_table() -> None:
    assert next_prime(100) == 101 and next_prime(7) == 7
    one = Maglev(make_workers([1.0]), 7)
    assert list(one.table) == [0] * 7
    even = Maglev(make_workers([1.0, 1.0]), 101)
    assert sorted(Counter(even.table).values()) == [50, 51]  # turns alternate
    weighted = Maglev(make_workers([1.0, 3.0]), 401)
    counts = Counter(weighted.table)
    assert -1 not in counts
    assert counts[1] / counts[0] == pytest.approx(3.0, rel=0.02)
    assert weighted.owner("some/key") in {"w00000", "w00001"}


def test_ketama_points_and_minimal_moves() -> None:
    workers = make_workers([1.0, 1.0, 2.0])  # unit = the mean weight, 4/3
    ring = KetamaRing(workers)
    owners = Counter(ring.owners)
    assert owners[0] == 120 and owners[1] == 120 and owners[2] == 240  # 160 x weight / unit
    keys = [f"k{i}" for i in range(3000)]
    before = [ring.owner(k) for k in keys]
    left = [ring.without("w00001").owner(k) for k in keys]
    assert {b for b, a in zip(before, left, strict=True) if b != a} == {"w00001"}
    grown = ring.with_node(make_workers([1.0], prefix="new")[0])
    after = [grown.owner(k) for k in keys]
    assert {a for b, a in zip(before, after, strict=True) if b != a} == {"new00000"}


# -- tiny runs of the real selectors ---------------------------------------------------------------


def test_run_with_one_worker_is_exact() -> None:
    args = tiny_args("--warmup", "0")
    world = World(1, args)
    res = run(world, "one", clients=2, requests=300, seed="x")
    assert res.counted == 300 and res.backing == 0
    assert res.max_mean == 1.0
    assert res.top2_share == 1.0
    assert res.hottest_workers == 1
    assert 0 < res.p50_ms <= res.p99_ms


def test_run_counts_slow_share_and_is_deterministic() -> None:
    args = tiny_args()
    world = World(20, args)
    slow = frozenset({3, 7})
    first = run(world, "a", clients=3, requests=2000, slow=slow, seed="s")
    again = run(world, "a", clients=3, requests=2000, slow=slow, seed="s")
    assert first.counted == 2000 - 500  # the warm-up quarter is not counted
    assert 0.0 <= first.slow_share <= 1.0
    assert (first.max_mean, first.slow_share, first.p99_ms) == (
        again.max_mean,
        again.slow_share,
        again.p99_ms,
    )
    capped = run(world, "b", clients=3, requests=2000, seed="s")
    uncapped = run(world, "b", clients=3, requests=2000, load_factor=math.inf, seed="s")
    assert capped.max_mean < uncapped.max_mean  # the hottest of 200 blocks piles up uncapped


def test_main_quick_writes_json_and_tables(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "selection.json"
    assert main(["--workers", "40", "--quick", "--json", str(out), "--accelerators", "160"]) == 0
    text = capsys.readouterr().out
    for heading in ("Load balance", "Keys moved", "Slow workers", "Lookup cost", "Throughput"):
        assert heading in text
    data = json.loads(out.read_text())
    section = data["workers"]["40"]
    assert {r["scheme"] for r in section["balance"]} >= {
        "ours (load_factor 1.25, default)",
        "ring (no load awareness)",
        "maglev (no load awareness)",
    }
    ours_moves = [r for r in section["keys_moved"] if r["scheme"] == "ours" and "moved" in r]
    assert all(r["excess"] == 0 for r in ours_moves)  # only the changed worker's keys move
    assert data["throughput"][0]["nodes"] == 20
