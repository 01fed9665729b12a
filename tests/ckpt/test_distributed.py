"""Real multi-process saves and loads: ``torchrun`` process groups on gloo, an S3 server and
local directories; resharding, torch's stock reader, crashes and corruption."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

from ckpt.api import is_complete, load
from ckpt.storage import CheckpointNotFound, CorruptCheckpoint
from tests.ckpt import scenarios
from tests.conftest import unique_bucket
from tests.servers.s3_process import free_port, write_config

pytestmark = [pytest.mark.timeout(300), pytest.mark.integration]
REPO = Path(__file__).resolve().parents[2]


def torchrun(
    nproc: int, *args: str, per_node: int = 1, env: dict[str, str] | None = None
) -> tuple[int, list[dict[str, Any]], str]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "tests.ckpt.scenarios", *args,
    ]  # fmt: skip
    full_env = {**os.environ, "CKPT_TEST_RANKS_PER_NODE": str(per_node), "OMP_NUM_THREADS": "1"}
    full_env.update(env or {})
    done = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=240)
    results: list[dict[str, Any]] = []
    for line in done.stdout.splitlines():
        if line.startswith("RESULT "):
            results = json.loads(line[len("RESULT ") :])
    return done.returncode, results, done.stderr[-3000:]


def ckpt_cli(*args: str) -> tuple[int, str]:
    done = subprocess.run(
        [sys.executable, "-m", "ckpt.cli", *args], cwd=REPO, capture_output=True, text=True,
        timeout=120,
    )  # fmt: skip
    return done.returncode, done.stdout + done.stderr


@pytest.fixture
def s3_env(rclone_s3: Any, tmp_path: Path) -> tuple[str, dict[str, str]]:
    bucket = unique_bucket("ck")
    rclone_s3.create_bucket(bucket)
    config = write_config(tmp_path / "objstore.toml", s3=rclone_s3.profile())
    return f"s3://s3@{bucket}/run1/step-00000001/", {"OBJSTORE_CONFIG": str(config)}


def test_save_to_s3_then_load_on_same_and_other_world_sizes(s3_env) -> None:
    url, env = s3_env
    rc, saved, err = torchrun(4, "save", url, per_node=2, env=env)
    assert rc == 0, err
    assert all("error" not in r for r in saved), saved
    coordinator = saved[0]
    assert set(coordinator["node_bytes"]) == {"node0", "node1"}
    # every byte written once: dense items on one rank each, experts on their holders
    assert sum(r["bytes_written"] for r in saved) >= sum(coordinator["node_bytes"].values())
    rc, loaded, err = torchrun(4, "load", url, "--verify", per_node=2, env=env)
    assert rc == 0, err
    assert [r["wrong"] for r in loaded] == [[], [], [], []], loaded
    # the dense items both ranks of a node need are read once per node and shared
    assert sum(r["items_shared"] for r in loaded) >= 2 * (len(scenarios.DENSE) * 2)
    rc, resharded, err = torchrun(2, "load", url, per_node=1, env=env)
    assert rc == 0, err
    assert [r["wrong"] for r in resharded] == [[], []], resharded


def test_node_aware_spreads_replicated_items_over_nodes(tmp_path: Path) -> None:
    reports = {}
    for planner in ("node-aware", "megatron"):
        rc, saved, err = torchrun(
            4, "save", str(tmp_path / planner), "--planner", planner, per_node=2
        )
        assert rc == 0, err
        reports[planner] = saved[0]["node_bytes"]
    aware, megatron = reports["node-aware"], reports["megatron"]
    assert sum(aware.values()) == sum(megatron.values())
    # Megatron's rank 0 writes every dense item: node0 carries them all
    assert megatron["node0"] > megatron["node1"]
    assert max(aware.values()) < max(megatron.values())


def test_local_checkpoint_loads_with_torch_stock_reader_on_one_rank(tmp_path: Path) -> None:
    rc, _, err = torchrun(2, "save", str(tmp_path / "ck"))
    assert rc == 0, err
    assert sorted(p.name for p in (tmp_path / "ck").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp",
    ]  # fmt: skip
    target = scenarios.state_dict(0, 1, empty=True)  # one rank holds every expert now
    dcp.load(target, storage_reader=dcp.FileSystemReader(str(tmp_path / "ck")))
    assert scenarios.check(target, 0, 1) == []
    again = scenarios.state_dict(0, 1, empty=True)
    load(again, str(tmp_path / "ck"), verify=True)
    assert scenarios.check(again, 0, 1) == []
    rc, out = ckpt_cli("inspect", str(tmp_path / "ck"), "--json")
    assert rc == 0
    summary = json.loads(out)
    names = {i["name"] for i in summary["items"]}
    assert "model.experts.7.w" in names and "step" in names
    assert summary["crc_recorded"] and set(summary["nodes"]) == {"node0", "node1"}
    assert sum(n["bytes"] for n in summary["nodes"].values()) == summary["total_bytes"]
    rc, out = ckpt_cli("verify", str(tmp_path / "ck"))
    assert rc == 0 and " 0 bad" in out


def test_corrupt_item_is_detected_with_verify(tmp_path: Path) -> None:
    rc, _, err = torchrun(2, "save", str(tmp_path / "ck"))
    assert rc == 0, err
    victim = tmp_path / "ck" / "__1_0.distcp"
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    victim.write_bytes(bytes(raw))
    with pytest.raises(CorruptCheckpoint, match="CRC32C mismatch"):
        load(scenarios.state_dict(0, 1, empty=True), str(tmp_path / "ck"), verify=True)
    rc, out = ckpt_cli("verify", str(tmp_path / "ck"))
    assert rc == 6 and "CRC32C mismatch" in out and "1 bad" in out


def test_crash_before_metadata_leaves_no_checkpoint(tmp_path: Path) -> None:
    url = str(tmp_path / "ck")
    rc, _, _ = torchrun(2, "crash", url)
    assert rc != 0
    assert any(p.name.endswith(".distcp") for p in (tmp_path / "ck").iterdir())
    assert not is_complete(url)
    with pytest.raises(CheckpointNotFound, match="no complete checkpoint"):
        load(scenarios.state_dict(0, 1, empty=True), url)
    rc, _ = ckpt_cli("inspect", url)
    assert rc == 3


def test_async_save_writes_the_state_at_the_call(tmp_path: Path) -> None:
    url = str(tmp_path / "ck")
    rc, saved, err = torchrun(2, "save", url, "--async-save", per_node=1)
    assert rc == 0, err
    assert all("error" not in r for r in saved), saved
    # each rank staged only its share: together about one copy of the distinct items
    total = sum(r["staged_bytes"] for r in saved)
    assert total < 1.2 * sum(r["bytes_written"] for r in saved)
    target = scenarios.state_dict(0, 1, empty=True)
    load(target, url, verify=True)
    assert scenarios.check(target, 0, 1) == []  # not the +1000 made after the call


def test_missing_checkpoint_and_bad_url_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointNotFound, match="no complete checkpoint"):
        load({"w": torch.zeros(1)}, str(tmp_path / "nothing"))
    from objstore.errors import InvalidURL

    with pytest.raises(InvalidURL):
        load({"w": torch.zeros(1)}, "s3:/broken")
