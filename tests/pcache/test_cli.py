"""The ``pcache`` command line against real workers: status, warmup, invalidate, put/cat, ls,
and the exit codes scripts rely on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from objstore.cli import ExitCode
from objstore.errors import ConfigError
from pcache.config import WorkerConfig
from tests.pcache.conftest import MiB

pytestmark = pytest.mark.integration  # runs the CLI or servers as processes

ROOT = Path(__file__).resolve().parents[2]


def pcache(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pcache.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_help_lists_commands() -> None:
    result = pcache(dict(os.environ), "--help")
    assert result.returncode == 0
    for command in ("worker", "warmup", "invalidate", "status", "ls", "cat", "put"):
        assert command in result.stdout


def test_cli_against_two_workers(make_cluster, tmp_path: Path) -> None:
    cluster, store = make_cluster(2)
    for i in range(4):
        store.put(f"ds/part-{i}.bin", os.urandom(2 * MiB + i))
    env = cluster.env(cluster.nodes[0])
    warm = pcache(env, "warmup", "data/ds/", "--json")
    assert warm.returncode == 0, warm.stderr
    result = json.loads(warm.stdout)
    assert result["objects"] == 4 and result["blocks_by_source"] == {"backend": 11}

    status = pcache(env, "status", "--json")
    assert status.returncode == 0, status.stderr
    nodes = json.loads(status.stdout)["nodes"]
    assert [n["node_id"] for n in nodes] == ["node1", "node2"]
    assert sum(n["blocks"]["blocks"] for n in nodes) == 11
    table = pcache(env, "status")
    assert "node1" in table.stdout and "node2" in table.stdout

    listing = pcache(env, "ls", "data/ds/", "--json")
    assert [o["key"] for o in json.loads(listing.stdout)["objects"]] == [
        f"ds/part-{i}.bin" for i in range(4)
    ]

    inval = pcache(env, "invalidate", "data/ds/", "--json")
    assert inval.returncode == 0, inval.stderr
    dropped = json.loads(inval.stdout)
    assert dropped["blocks"] + sum(p["blocks"] for p in dropped["peers"]) == 11

    local = tmp_path / "in.bin"
    local.write_bytes(os.urandom(3 * MiB))
    put = pcache(env, "put", str(local), "data/up/in.bin")
    assert put.returncode == 0, put.stderr
    assert store.get("up/in.bin") == local.read_bytes()  # remote-durable by default
    cat = subprocess.run(
        [sys.executable, "-m", "pcache.cli", "cat", "data/up/in.bin"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        timeout=60,
    )
    assert cat.returncode == 0 and cat.stdout == local.read_bytes()


def test_exit_codes(make_cluster) -> None:
    cluster, _ = make_cluster(1)
    env = cluster.env()
    missing = pcache(env, "cat", "data/nope.bin")
    assert missing.returncode == ExitCode.NOT_FOUND
    assert "no such object" in missing.stderr and "Traceback" not in missing.stderr
    wrong = pcache({**env, "PCACHE_TOKEN": "s3cr3t-guess"}, "status")
    assert wrong.returncode == ExitCode.ACCESS and "token" in wrong.stderr
    assert "s3cr3t-guess" not in wrong.stderr and cluster.token not in wrong.stderr
    down = pcache({**env, "PCACHE_WORKER": "http://127.0.0.1:9"}, "status")
    assert down.returncode == ExitCode.UNREACHABLE and "unreachable" in down.stderr
    no_token = {k: v for k, v in env.items() if k not in ("PCACHE_TOKEN", "PCACHE_CONFIG")}
    usage = pcache(no_token, "status")
    assert usage.returncode == ExitCode.USAGE and "token" in usage.stderr


def test_worker_config_errors(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[pcache]\nnode_id = "n1"\ntoken = "t"\ncache_dirs = []\n')
    with pytest.raises(ConfigError, match="cache_dirs is empty"):
        WorkerConfig.load(bad, env={})
    bad.write_text('[pcache]\nnode_id = "n1"\ntoken = "t"\nbogus = 1\n')
    with pytest.raises(ConfigError, match="unknown key 'bogus'"):
        WorkerConfig.load(bad, env={})
    result = pcache({**os.environ, "PCACHE_CONFIG": str(bad)}, "worker")
    assert result.returncode == ExitCode.USAGE
    assert "unknown key 'bogus'" in result.stderr and "Traceback" not in result.stderr
    good = tmp_path / "good.toml"
    good.write_text(
        '[pcache]\nnode_id = "n1"\ncache_dirs = [{path = "/tmp/x", capacity = "1GiB"}]\n'
        'backends = {data = "s3://bucket/"}\n'
    )
    config = WorkerConfig.load(good, env={"PCACHE_TOKEN": "from-env"})
    assert config.token.reveal() == "from-env" and "from-env" not in repr(config)
    assert config.cache_dirs[0].capacity == 1 << 30
    # discovery through DNS (Kubernetes): the node id and the name come from the environment
    k8s = WorkerConfig.load(
        good,
        env={
            "PCACHE_TOKEN": "t",
            "PCACHE_NODE_ID": "gpu-node-17",
            "PCACHE_PEERS_DNS": "pcache-workers.pcache.svc",
            "PCACHE_ADVERTISE": "http://10.1.2.3:7070",
        },
    )
    assert (k8s.node_id, k8s.peers_dns, k8s.address) == (
        "gpu-node-17",
        "pcache-workers.pcache.svc",
        "http://10.1.2.3:7070",
    )
    for extra, message in (
        ('peers_dns = "w:99999"', "expected NAME or NAME:PORT"),
        ('peers_dns = "w"\nmembership_file = "/m.toml"', "exclude each other"),
        ("weight = 0", "weight must be > 0"),
        ("load_factor = 0.9", "load_factor must be >= 1"),
        ('weight = "x"', "weight must be a number"),
    ):
        bad.write_text(good.read_text() + extra + "\n")
        with pytest.raises(ConfigError, match=message):
            WorkerConfig.load(bad, env={"PCACHE_TOKEN": "t"})


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "config file not found"),
        (b"[pcache\n", "is not valid TOML"),
        (b"\xff\xfe[pcache]\n", "is not valid UTF-8"),
    ],
)
def test_unreadable_config_files_are_one_clear_error(tmp_path, content, message) -> None:
    from pcache.config import ClientConfig

    path = tmp_path / "pcache.toml"
    if content is not None:
        path.write_bytes(content)
    for load in (WorkerConfig.load, lambda p: ClientConfig.load(p, env={})):
        with pytest.raises(ConfigError, match=message):
            load(path)
