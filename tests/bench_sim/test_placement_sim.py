"""The placement simulator's own arithmetic, on cases small enough to work out by hand."""

from __future__ import annotations

import json

import pytest

from bench.sim import placement_sim as sim
from ckpt.planner import plan_items

# hidden 4, 2 query heads and 1 kv head of 2, 4 routed experts (top-1) of FFN 2, 1 shared, vocab 8
TINY = sim.MoEModel(
    "tiny", layers=2, hidden=4, heads=2, kv_heads=1, head_dim=2, experts=4, topk=1,
    shared_experts=1, expert_ffn=2, vocab=8,
)  # fmt: skip


# big enough for many items per node: 4 layers, 16 experts, 4 nodes of 8 at 32 ranks
SMALL = sim.MoEModel(
    "small", layers=4, hidden=64, heads=4, kv_heads=2, head_dim=16, experts=16, topk=2,
    shared_experts=1, expert_ffn=32, vocab=512,
)  # fmt: skip


def test_tiny_model_parameters_by_hand() -> None:
    # embedding 8*4 + output 8*4 + final norm 4 = 68
    # per layer: qkv norm 4, qkv (2 + 2*1)*2 x 4 = 32, proj 4 x 4 = 16, pre-MLP norm 4,
    #   router 4 x 4 = 16, shared fc1 (2*2) x 4 = 16, shared fc2 4 x 2 = 8: 96, x 2 layers = 192
    # routed experts: 4 x (fc1 (2*2) x 4 + fc2 4 x 2) = 96 per layer, x 2 = 192
    total, active = TINY.params()
    assert total == 68 + 192 + 192 == 452
    assert active == 452 - 192 + 192 // 4 == 308
    assert sim.BYTES_PER_PARAM == 2 + 4 + 4 + 4


def test_ling_models_match_the_paper_within_five_percent() -> None:
    lite, plus = sim.LING_LITE.params(), sim.LING_PLUS.params()
    assert abs(lite[0] / 16.8e9 - 1) < 0.01 and abs(lite[1] / 2.75e9 - 1) < 0.01
    assert abs(plus[0] / 290e9 - 1) < 0.05 and abs(plus[1] / 28.8e9 - 1) < 0.05


def test_stage_layers() -> None:
    assert sim.stage_layers(28, 1) == [range(28)]
    assert [len(r) for r in sim.stage_layers(88, 8)] == [11] * 8
    # 88 = 5 * 17 + 3: the three inner stages take one more, as first/last = 17 in Megatron
    assert [len(r) for r in sim.stage_layers(88, 5)] == [17, 18, 18, 18, 17]
    assert [len(r) for r in sim.stage_layers(5, 2)] == [2, 3]
    stages = sim.stage_layers(28, 8)
    assert [x for r in stages for x in r] == list(range(28))
    with pytest.raises(ValueError):
        sim.stage_layers(2, 3)


def test_megatron_rank_order_tp_ep_dp_pp() -> None:
    lay = sim.Layout("x", SMALL, tp=2, ep=2, pp=2, world=16)
    assert (lay.dp, lay.edp, lay.nodes) == (4, 2, 2)
    # tp fastest, then ep, then expert-dp, then pp: 1 + 2 * (1 + 2 * (1 + 2 * 1)) = 15
    assert lay.rank(1, 1, 1, 1) == 15
    assert lay.rank(0, 1, 0, 0) == 2 and lay.rank(0, 0, 1, 0) == 4 and lay.rank(0, 0, 0, 1) == 8
    assert [lay.rank(*lay.coords(r)) for r in range(16)] == list(range(16))
    assert lay.node_of_rank() == ["n0"] * 8 + ["n1"] * 8
    # plans: the dense shard of (t=0, p=0) is held by its data-parallel group 0, 2, 4, 6
    items = plan_items(sim.build_plans(lay))
    qkv = [it for it in items if it.key.fqn == "decoder.layers.self_attention.linear_qkv.weight"]
    assert {it.holders for it in qkv} == {
        (0, 2, 4, 6),
        (1, 3, 5, 7),
        (8, 10, 12, 14),
        (9, 11, 13, 15),
    }
    # the experts of ep rank 1, tp rank 0, stage 0 by its expert-data-parallel group 2, 6
    experts = [it for it in items if it.key.fqn.endswith("experts.linear_fc1.weight")]
    assert {it.holders for it in experts if it.key.offset[:3] == (0, 8, 0)} == {(2, 6)}
    # norms are replicated over tp as well
    norms = [it for it in items if it.key.fqn == "decoder.final_layernorm.weight"]
    assert [it.holders for it in norms] == [tuple(range(8, 16))]


def test_layout_presets_and_errors() -> None:
    lay = sim.parse_layout("plus-5000")
    assert (lay.tp, lay.ep, lay.pp, lay.dp, lay.edp, lay.nodes) == (1, 8, 5, 1000, 125, 625)
    assert sim.parse_layout("plus-512").dp == 32 and sim.parse_layout("lite-128").edp == 16
    assert sim.parse_layout("lite/tp2-ep4-pp2/64").dp == 16
    for bad in ("huge-9", "lite/tp1-ep8-pp1/100", "lite/tp3-ep8-pp1/96", "lite/tp1-ep128-pp1/128"):
        with pytest.raises(ValueError):
            sim.parse_layout(bad)


def test_every_parameter_byte_is_one_item_once() -> None:
    lay = sim.Layout("tiny", TINY, tp=1, ep=2, pp=2, world=8, per_node=2)
    items = plan_items(sim.build_plans(lay, "copies"))
    assert sum(it.size for it in items) == 452 * 14
    assert len({(it.key.fqn, it.key.offset) for it in items}) == len(items)


def test_megatron_default_writes_everything_on_node_zero_by_hand() -> None:
    # tp=1 ep=2 pp=1 on 4 ranks, 2 per node: dense items are held by 0-3 (rank 0 writes), the
    # experts of ep rank 0 by 0 and 2 (rank 0), of ep rank 1 by 1 and 3 (rank 1): node n0 only
    lay = sim.Layout("tiny", TINY, tp=1, ep=2, pp=1, world=4, per_node=2)
    result = sim.simulate(lay, sim.SaveModel(nic_gbit=8e-9, storage_gbs=1e9), plan_objects="copies")
    assert (result.total_bytes, result.lower_bound) == (6328, 3164)  # the mean of 2 nodes
    by = {r.planner: r for r in result.planners}
    assert by["megatron"].node_bytes == [6328, 0]
    assert by["megatron"].imbalance == 2.0 == by["megatron"].over_bound
    assert all(r.covered for r in result.planners)
    for r in result.planners:
        assert sum(r.node_bytes) == 6328 and r.max_node_bytes >= result.lower_bound
    # 1 byte/s per node: the save takes as long as the busiest node has bytes
    assert by["megatron"].save_seconds == pytest.approx(6328)
    assert by["megatron"].save_bound == "node"


def test_node_aware_meets_its_target_where_megatron_crowds_one_node() -> None:
    # tp=1 ep=8 pp=1 on 32 ranks: Megatron's writers (ranks 0-7) share node n0 of 4
    lay = sim.Layout("small", SMALL, tp=1, ep=8, pp=1, world=32)
    result = sim.simulate(lay, sim.SaveModel(), compare_validation=True)
    by = {r.planner: r for r in result.planners}
    assert by["megatron"].imbalance == pytest.approx(4.0)
    assert by["node-aware"].over_bound <= 1.05
    assert by["node-aware"].targets() == {"over_bound<=1.05": True, "plan<=10s": True}
    assert by["torch"].covered and by["torch"].targets() == {}
    # torch's plan validation and ckpt's, on the tensor with the most chunks (4 layers x 16)
    assert result.validation is not None and result.validation["chunks"] == 64
    assert result.validation["tensor"].endswith("experts.experts.linear_fc1.weight")


def test_save_model_by_hand() -> None:
    model = sim.SaveModel(nic_gbit=80, storage_gbs=100)  # 10 GB/s per node
    assert model.predict([10 * 10**9, 5 * 10**9]) == (pytest.approx(1.0), "node")
    slow_storage = sim.SaveModel(nic_gbit=80, storage_gbs=5)  # 15 GB at 5 GB/s
    assert slow_storage.predict([10 * 10**9, 5 * 10**9]) == (pytest.approx(3.0), "storage")
    assert model.node_seconds([]) == 0.0


def test_written_bytes_finds_missing_and_doubled_items() -> None:
    lay = sim.Layout("tiny", TINY, tp=1, ep=2, pp=1, world=4, per_node=2)
    plans = sim.build_plans(lay)
    items = plan_items(plans)
    # every rank writes its whole plan: replicated items are written more than once
    _, _, problem = sim.written_bytes(plans, lay.node_of_rank(), items)
    assert "written twice" in problem and problem.startswith("0 items unwritten")
    empty = [sim.SavePlan([]) for _ in plans]
    assert sim.written_bytes(empty, lay.node_of_rank(), items)[2].startswith(f"{len(items)} items")


def test_main_prints_tables_and_writes_json(tmp_path, capsys, monkeypatch) -> None:
    monkeypatch.setitem(sim.MODELS, "small", SMALL)
    out = tmp_path / "placement.json"
    assert sim.main(["--layouts", "small/tp1-ep8-pp2/64", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "node-aware" in printed and "megatron" in printed and "torch" in printed
    assert "plan validation" in printed  # torch's quadratic check, timed once
    data = json.loads(out.read_text())
    assert data["passed"] is True and data["bytes_per_param"] == 14
    (layout,) = data["layouts"]
    assert layout["world"] == 64 and layout["nodes"] == 8 and layout["stage_layers"] == [2, 2]
    assert layout["total_bytes"] == SMALL.params()[0] * 14
    for name in ("node-aware", "megatron", "torch"):
        entry = layout["planners"][name]
        assert sum(entry["node_bytes"]) == layout["total_bytes"] and entry["covered"]
    assert sim.main(["--layouts", "nope"]) == 2
