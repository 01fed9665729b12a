"""The deployment files: systemd units pass ``systemd-analyze verify``, example configs load."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from babel_sync.service.config import ServiceConfig
from objstore.config import Config

REPO = Path(__file__).resolve().parents[1]
UNITS = sorted((REPO / "deploy/systemd").iterdir())
BIN = str(Path(sys.executable).parent)


def test_systemd_units_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("no systemd-analyze (deploy/install-system-deps.sh installs systemd)")
    assert {u.name for u in UNITS} >= {
        "pcache-worker.service",
        "babel-sync.service",
        "mnt-datasets.mount",
    }
    copies = []
    for unit in UNITS:  # verified together: the mount unit requires the worker's
        text = re.sub(r"@[A-Z_]+_BIN@", BIN, unit.read_text())
        assert not re.search(r"@[A-Z_]+@", text), f"{unit.name}: a placeholder is left"
        (tmp_path / unit.name).write_text(text)
        copies.append(str(tmp_path / unit.name))
    done = subprocess.run([analyze, "verify", *copies], capture_output=True, text=True, timeout=60)
    problems = [line for line in (done.stdout + done.stderr).splitlines() if line.strip()]
    assert done.returncode == 0 and not problems, problems


def test_babel_sync_unit_is_hardened() -> None:
    unit = (REPO / "deploy/systemd/babel-sync.service").read_text()
    for option in ("NoNewPrivileges=yes", "ProtectSystem=strict", "DynamicUser=yes",
                   "StateDirectory=babel-sync", "CapabilityBoundingSet=\n"):  # fmt: skip
        assert option in unit, option
    assert "BABEL_SYNC_TOKEN" not in unit.split("[Service]", 1)[1].replace("# ", "")  # not in argv


def test_serve_example_config_loads() -> None:
    example = REPO / "deploy/babel-sync/serve.toml.example"
    config = ServiceConfig.load(str(example), env={"BABEL_SYNC_TOKEN": "t" * 24})
    assert config.listen == "127.0.0.1:8470" and config.max_concurrent == 2
    profiles = Config.load(example, env={}, sections=("service",))
    assert profiles.profile("region-a", "s3").endpoint == "https://s3.region-a.example.com"
    with pytest.raises(ValueError, match="token"):
        ServiceConfig.load(str(example), env={})  # no token anywhere: refused
