"""Placement on synthetic Megatron plans (the seed's layouts), and the planners on real DCP plans."""

from __future__ import annotations

import random
import zlib

import pytest
import torch
from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint.metadata import (
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import SavePlan, TensorWriteData, WriteItem, WriteItemType

from ckpt.placement import Item, lower_bound, place
from ckpt.planner import (
    MegatronDefaultPlanner,
    NodeAwareSavePlanner,
    apply_placement,
    index_plans,
    make_planner,
    plan_items,
    validate_global_plan,
    write_item_bytes,
)
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


def test_unequal_nodes_node_aware_balances_nodes_where_torch_balances_ranks() -> None:
    """The benchmark's second layout in miniature: 16 ranks on nodes of 6, 2, 4 and 4, EP 8
    (each expert on ranks r and r + 8), dense weights on every rank."""
    world, ep = 16, 8
    nodes = [n for n, count in (("a", 6), ("b", 2), ("c", 4), ("d", 4)) for _ in range(count)]
    plans = []
    for rank in range(world):
        sd = {f"dense{i}": torch.zeros(128, 128) for i in range(24)}
        sd.update({f"expert{rank % ep}.{i}": torch.zeros(128, 128) for i in range(6)})
        planner = DefaultSavePlanner()
        planner.set_up_planner(sd, is_coordinator=rank == 0)
        plans.append(planner.create_local_plan())

    def busiest(deduped: list[SavePlan]) -> int:
        per_node = dict.fromkeys(nodes, 0)
        for rank, plan in enumerate(deduped):
            per_node[nodes[rank]] += sum(write_item_bytes(wi) for wi in plan.items)
        assert sum(per_node.values()) == total
        return max(per_node.values())

    total = (24 + 6 * ep) * 128 * 128 * 4
    bound = total / 4
    aware = NodeAwareSavePlanner(topology=Topology.from_nodes(nodes))
    aware.set_up_planner({}, is_coordinator=True)
    torch_default = DefaultSavePlanner()
    torch_default.set_up_planner({}, is_coordinator=True)
    torch_plans, _ = torch_default.create_global_plan(plans)
    assert busiest(aware._dedup_save_plans(plans)) <= 1.05 * bound
    # torch gives every rank an equal share: the 6-rank node carries 6/16, 1.5x the bound
    assert busiest(torch_plans) >= 1.4 * bound


def shard(fqn: str, offsets, sizes, shape, dtype=torch.float32) -> WriteItem:
    """A DCP write item for one chunk of a global tensor, as DTensor / ShardedTensor make them."""
    return WriteItem(
        index=MetadataIndex(fqn, offsets),
        type=WriteItemType.SHARD,
        tensor_data=TensorWriteData(
            chunk=ChunkStorageMetadata(torch.Size(offsets), torch.Size(sizes)),
            properties=TensorProperties(dtype=dtype),
            size=torch.Size(shape),
        ),
    )


def test_an_items_size_is_its_chunks_not_the_whole_tensors() -> None:
    wi = shard("w", (1, 0), (1, 100), (4, 100), torch.bfloat16)
    assert wi.tensor_storage_size() == 4 * 100 * 2  # torch counts the whole tensor
    assert write_item_bytes(wi) == 100 * 2
    assert plan_items([SavePlan([wi])])[0].size == 200


def reference_place(items: list[Item], nodes: list[str]) -> dict:
    """The node-aware policy as its definition reads: fixed items first, then replicated ones
    largest first, each to the holder minimizing (node load, rank load, crc32 of key and rank)."""
    node_bytes = dict.fromkeys(nodes, 0)
    rank_bytes = [0] * len(nodes)
    writer = {}
    for it in items:
        if len(it.holders) == 1:
            writer[it.key] = it.holders[0]
            rank_bytes[it.holders[0]] += it.size
            node_bytes[nodes[it.holders[0]]] += it.size
    for it in sorted(
        (it for it in items if len(it.holders) > 1), key=lambda i: (-i.size, repr(i.key))
    ):
        r = min(
            it.holders,
            key=lambda r: (
                node_bytes[nodes[r]],
                rank_bytes[r],
                zlib.crc32(f"{it.key!r}|{r}".encode()),
            ),
        )
        writer[it.key] = r
        rank_bytes[r] += it.size
        node_bytes[nodes[r]] += it.size
    return writer


@pytest.mark.parametrize("seed", range(6))
def test_node_aware_placement_is_its_definition(seed: int) -> None:
    rng = random.Random(seed)
    world, per_node = 24, rng.choice([2, 3, 4])
    nodes = [f"n{r // per_node}" for r in range(world)]
    items = []
    for i in range(300):
        holders = tuple(sorted(rng.sample(range(world), rng.choice([1, 2, 3, 8, 24]))))
        items.append(
            Item(f"i{i}", rng.choice([MiB, MiB, 2 * MiB, rng.randrange(1, 5 * MiB)]), holders)
        )
    assert place(items, nodes, "node_aware").writer == reference_place(items, nodes)


def test_index_plans_groups_replicas_and_keeps_rank_order() -> None:
    a = [shard("a", (i, 0), (1, 8), (4, 8)) for i in range(4)]
    b = [shard("b", (i,), (1,), (3,)) for i in range(3)]
    # ranks 0, 2, 4 are replicas; 1 and 3 hold the same items as each other, 5 one of its own
    plans = [
        SavePlan(a[:2] + b),
        SavePlan(a[2:] + b),
        SavePlan(list(a[:2] + b)),
        SavePlan(a[2:] + b),
        SavePlan(a[:2] + b),
        SavePlan([*a[2:], b[0], shard("own", (0,), (5,), (5,))]),
    ]
    index = index_plans(plans)
    holders = {(it.key.fqn, tuple(it.key.offset)): it.holders for it in index.items}
    assert holders[("a", (0, 0))] == (0, 2, 4) and holders[("a", (3, 0))] == (1, 3, 5)
    assert holders[("b", (0,))] == (0, 1, 2, 3, 4, 5) and holders[("b", (2,))] == (0, 1, 2, 3, 4)
    assert holders[("own", (0,))] == (5,)
    assert [it.key.fqn for it in index.items] == ["a", "a", "b", "b", "b", "a", "a", "own"]
    placement = place(index.items, [f"n{r // 2}" for r in range(6)])
    kept = apply_placement(plans, placement, index)
    for rank, (plan, mine) in enumerate(zip(plans, kept, strict=True)):
        assert mine.items == [wi for wi in plan.items if placement.writer[wi.index] == rank]
    written = sorted((wi.index.fqn, tuple(wi.index.offset)) for p in kept for wi in p.items)
    assert written == sorted(holders)


def chunked(shape, boxes) -> TensorStorageMetadata:
    return TensorStorageMetadata(
        TensorProperties(dtype=torch.float32),
        torch.Size(shape),
        [ChunkStorageMetadata(torch.Size(o), torch.Size(s)) for o, s in boxes],
    )


@pytest.mark.parametrize(
    "boxes",
    [
        [((0, 0), (2, 4)), ((2, 0), (2, 4))],  # a grid, valid
        [((0, 0), (2, 4)), ((2, 0), (2, 4)), ((2, 0), (2, 4))],  # a chunk twice
        [((0, 0), (2, 4))],  # half missing
        [((0, 0), (2, 4)), ((2, 0), (3, 4))],  # out of bounds
        [((0, 0), (2, 4)), ((2, 0), (2, 2)), ((2, 2), (2, 2))],  # no grid (torch's check)
        [((0, 0), (3, 4)), ((2, 0), (2, 4))],  # no grid, overlapping
    ],
)
def test_plan_validation_finds_what_torchs_finds(boxes) -> None:
    from torch.distributed.checkpoint.default_planner import _validate_global_plan

    metadata = Metadata({"t": chunked((4, 4), boxes)})
    plans = [SavePlan([]), SavePlan([])]
    assert sorted(validate_global_plan(plans, metadata)) == sorted(
        _validate_global_plan(plans, metadata)
    )


@pytest.mark.parametrize("cls", [NodeAwareSavePlanner, MegatronDefaultPlanner])
def test_the_planners_validate_the_global_plan(cls) -> None:
    def plans(rows0: int) -> list[SavePlan]:  # rank 0 rows 0..rows0, rank 1 rows 2..4 of a 4x4
        return [
            SavePlan([shard("t", (0, 0), (rows0, 4), (4, 4))], planner_data={}),
            SavePlan([shard("t", (2, 0), (2, 4), (4, 4))], planner_data={}),
        ]

    planner = cls(topology=Topology.from_nodes(["a", "b"]))
    global_plan, metadata = planner.create_global_plan(plans(2))
    assert [len(p.items) for p in global_plan] == [1, 1]
    assert len(metadata.state_dict_metadata["t"].chunks) == 2
    with pytest.raises(ValueError, match="overlapping chunks"):
        cls(topology=Topology.from_nodes(["a", "b"])).create_global_plan(plans(3))
