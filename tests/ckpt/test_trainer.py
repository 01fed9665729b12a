"""The bundled MoE trainer under real ``torchrun`` (4 ranks, 2 simulated nodes, EP=2): resume
equality, async saves, bad configuration."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

from objstore import open_store
from tests.servers.s3_process import free_port

pytestmark = [pytest.mark.timeout(300), pytest.mark.integration]
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    from ckpt.trainer.data import write_token_dataset

    root = tmp_path_factory.mktemp("tokens")
    write_token_dataset(open_store(str(root)), shards=3, tokens=20_000, seed=3)
    return str(root)


def train(*args: str, nproc: int = 4) -> tuple[int, dict[str, Any], str]:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(nproc),
        "--master-addr", "127.0.0.1", "--master-port", str(free_port()),
        "-m", "ckpt.trainer", "--ep", "2", "--simulate-nodes", "2", *args,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    summary: dict[str, Any] = {}
    for line in done.stdout.splitlines():
        if line.startswith("SUMMARY "):
            summary = json.loads(line[len("SUMMARY ") :])
    return done.returncode, summary, done.stderr[-3000:]


def full_state(checkpoint: Path, tmp: Path) -> dict[str, Any]:
    out = tmp / f"{checkpoint.parent.name}-{checkpoint.name}.pt"
    dcp_to_torch_save(str(checkpoint), str(out))
    return torch.load(out, weights_only=False)


def test_resume_continues_exactly(dataset: str, tmp_path: Path) -> None:
    straight, split = tmp_path / "straight", tmp_path / "split"
    rc, a, err = train(
        "--data", dataset, "--ckpt-root", str(straight), "--steps", "4", "--save-every", "2"
    )
    assert rc == 0, err
    assert a["resumed_from"] is None and len(a["losses"]) == 4
    assert [s["step"] for s in a["saves"]] == [2, 4]
    assert set(a["saves"][0]["node_bytes"]) == {"sim-node-0", "sim-node-1"}
    rc, _, err = train(
        "--data", dataset, "--ckpt-root", str(split), "--steps", "2", "--save-every", "2"
    )
    assert rc == 0, err
    rc, second, err = train(
        "--data", dataset, "--ckpt-root", str(split), "--steps", "4", "--save-every", "2"
    )
    assert rc == 0, err
    assert second["resumed_from"] == 2
    assert second["losses"] == a["losses"]  # the same curve, step for step
    assert second["param_digest"] == a["param_digest"]
    one = full_state(straight / "step-00000004", tmp_path)
    two = full_state(split / "step-00000004", tmp_path)
    assert one.keys() == two.keys()
    for group in ("model", "optim"):
        flat_one, flat_two = _flatten(one[group]), _flatten(two[group])
        assert flat_one.keys() == flat_two.keys()
        for key, tensor in flat_one.items():
            assert torch.equal(tensor, flat_two[key]), key
    # every expert of every layer is in the checkpoint once (EP=2 ranks held half each)
    experts = {
        k.split(".experts.")[1].split(".")[0] for k in _flatten(one["model"]) if ".experts." in k
    }
    assert experts == {str(e) for e in range(8)}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): tree}


def test_async_save_and_resume_from_it(dataset: str, tmp_path: Path) -> None:
    root = tmp_path / "async"
    rc, a, err = train(
        "--data",
        dataset,
        "--ckpt-root",
        str(root),
        "--steps",
        "3",
        "--save-every",
        "3",
        "--async-save",
    )
    assert rc == 0, err
    assert a["saves"][0]["step"] == 3 and (root / "step-00000003" / ".metadata").exists()
    rc, b, err = train(
        "--data", dataset, "--ckpt-root", str(root), "--steps", "3", "--save-every", "3"
    )
    assert rc == 0, err
    assert b["resumed_from"] == 3 and b["param_digest"] == a["param_digest"]


def test_ckpt_train_with_a_config_file(dataset: str, tmp_path: Path) -> None:
    config = tmp_path / "train.toml"
    config.write_text(
        f'[train]\ndata = "{dataset}"\nckpt_root = "{tmp_path / "ck"}"\nsteps = 2\n'
        f'save_every = 2\nreport = "{tmp_path / "report.json"}"\n'
        "[model]\nn_layers = 1\nn_experts = 4\ntop_k = 1\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "ckpt.cli", "train", "--config", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["world"] == 1 and report["steps"] == 2 and len(report["losses"]) == 2
    assert (tmp_path / "ck" / "step-00000002" / ".metadata").exists()


def test_bad_configuration_is_one_line(tmp_path: Path) -> None:
    config = tmp_path / "train.toml"
    config.write_text("[train]\nstepz = 3\n")
    done = subprocess.run(
        [sys.executable, "-m", "ckpt.cli", "train", "--config", str(config)],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2
    assert "unknown training options ['stepz']" in done.stderr
