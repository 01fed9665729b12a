"""Placement on synthetic Megatron plans (the seed's layouts), and the planners on real DCP plans."""

from __future__ import annotations

import pytest
import torch
from torch.distributed.checkpoint import DefaultSavePlanner

from ckpt.placement import Item, lower_bound, place
from ckpt.planner import MegatronDefaultPlanner, NodeAwareSavePlanner, make_planner, plan_items
from ckpt.topology import Topology

MiB = 2**20


def megatron_items(
    world: int, tp: int, ep: int, per_node: int = 8, layers: int = 4
) -> tuple[list[Item], list[str]]:
    """A Megatron MoE rank layout (pp=1): ranks are tp-major; the data-parallel group of a tp
    rank holds replicas of its dense shard; experts are split over ep ranks and replicated over
    the expert-data-parallel group (world / (tp * ep) replicas)."""
    nodes = [f"n{r // per_node}" for r in range(world)]
    dp = world // tp
    items: list[Item] = []
    for t in range(tp):
        dp_group = tuple(t + tp * d for d in range(dp))
        for layer in range(layers):
            for name, size in (("attn", 24 * MiB), ("shared_expert", 16 * MiB), ("norm", MiB // 8)):
                for state in ("w", "exp_avg", "exp_avg_sq"):
                    items.append(Item(f"l{layer}.{name}.{state}.tp{t}", size // tp, dp_group))
    edp = world // (tp * ep)
    for t in range(tp):
        for e in range(ep):
            group = tuple(t + tp * (e + ep * k) for k in range(edp))
            for layer in range(layers):
                for state in ("w", "exp_avg", "exp_avg_sq"):
                    items.append(Item(f"l{layer}.experts{e}.{state}.tp{t}", 12 * MiB // tp, group))
    return items, nodes


@pytest.mark.parametrize(
    ("world", "tp", "ep", "layers"),
    [(128, 1, 8, 4), (128, 2, 8, 4), (64, 1, 8, 4), (128, 1, 8, 24)],
)
def test_node_aware_is_near_the_lower_bound_and_beats_megatron(world, tp, ep, layers) -> None:
    items, nodes = megatron_items(world, tp, ep, layers=layers)
    aware = place(items, nodes, "node_aware")
    megatron = place(items, nodes, "lowest_rank")
    total = sum(it.size for it in items)
    assert sum(aware.node_bytes.values()) == total == sum(megatron.node_bytes.values())
    assert set(aware.writer) == {it.key for it in items}
    for it in items:  # every item written by one of its holders
        assert aware.writer[it.key] in it.holders
        assert megatron.writer[it.key] == min(it.holders)
    # greedy largest-first: within one item of the bound; within 5% once items are many
    assert aware.max_node_bytes <= aware.lower_bound + max(it.size for it in items)
    if len(items) > 40 * len(set(nodes)):
        assert aware.max_node_bytes <= 1.05 * aware.lower_bound
    assert megatron.max_node_bytes >= 2 * aware.max_node_bytes  # rank 0s crowd one node


def test_placement_is_deterministic_and_ties_do_not_pick_the_lowest_rank() -> None:
    # identical replicated items over identical ranks: a pure tie every time
    items = [Item(f"x{i}", MiB, (0, 1, 2, 3)) for i in range(64)]
    nodes = ["a", "a", "b", "b"]
    first = place(items, nodes)
    assert first.writer == place(list(reversed(items)), nodes).writer
    assert first.node_bytes == {"a": 32 * MiB, "b": 32 * MiB}
    assert first.rank_bytes == [16 * MiB] * 4
    # the first tie (all loads zero) does not default to rank 0 for every such item
    firsts = {
        place([Item(f"only{i}", MiB, (0, 1, 2, 3))], nodes).writer[f"only{i}"] for i in range(16)
    }
    assert len(firsts) > 1


def test_fixed_bytes_are_charged_before_replicated_ones() -> None:
    # node a already carries a big unique item: the replicated ones go to node b
    items = [Item("big", 10 * MiB, (0,)), Item("r1", 2 * MiB, (0, 2)), Item("r2", 2 * MiB, (1, 3))]
    placement = place(items, ["a", "a", "b", "b"])
    assert placement.writer["r1"] == 2 and placement.writer["r2"] == 3
    assert placement.lower_bound == 10 * MiB == placement.max_node_bytes


def test_lower_bound_by_hand() -> None:
    nodes = ["a", "b"]
    assert lower_bound([Item("u", 6, (0,)), Item("r", 4, (0, 1))], nodes) == 6  # fixed on a
    assert lower_bound([Item("r1", 5, (0, 1)), Item("r2", 5, (0, 1))], nodes) == 5  # the mean
    assert lower_bound([Item("u", 3, (1,)), Item("r", 9, (0, 1))], nodes) == 9  # r alone on a


def test_bad_input_is_refused() -> None:
    with pytest.raises(ValueError, match="no holder"):
        place([Item("x", 1, ())], ["a"])
    with pytest.raises(ValueError, match="outside"):
        place([Item("x", 1, (3,))], ["a"])
    with pytest.raises(ValueError, match="unknown placement policy"):
        place([], ["a"], "random")
    with pytest.raises(ValueError, match="unknown planner"):
        make_planner("fastest")


def local_plans(world: int) -> list:
    plans = []
    for rank in range(world):
        sd = {
            "dense": torch.zeros(256, 256),
            "bias": torch.zeros(16),
            f"expert{rank}": torch.zeros(64, 64),
        }
        planner = DefaultSavePlanner()
        planner.set_up_planner(sd, is_coordinator=rank == 0)
        plans.append(planner.create_local_plan())
    return plans


@pytest.mark.parametrize("cls", [NodeAwareSavePlanner, MegatronDefaultPlanner])
def test_planners_dedup_real_dcp_plans(cls) -> None:
    plans = local_plans(4)
    topology = Topology.from_nodes(["a", "a", "b", "b"])
    planner = cls(topology=topology)
    planner.set_up_planner({}, is_coordinator=True)
    deduped = planner._dedup_save_plans(plans)
    written = [wi.index.fqn for plan in deduped for wi in plan.items]
    assert sorted(written) == sorted(["dense", "bias", "expert0", "expert1", "expert2", "expert3"])
    dense_writer = next(
        r for r, plan in enumerate(deduped) for wi in plan.items if wi.index.fqn == "dense"
    )
    if cls is MegatronDefaultPlanner:
        assert dense_writer == 0
    items = {it.key.fqn: it for it in plan_items(plans)}
    assert items["dense"].size == 256 * 256 * 4 and items["dense"].holders == (0, 1, 2, 3)
    assert planner.last_placement is not None
