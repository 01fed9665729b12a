"""``--engine ray`` on a real local Ray cluster (``ray start --head`` plus a second node, one CPU
each): the same result and verification as the local engine, listing pages and transfer batches
on the cluster's workers, the cluster-wide rate limit, a worker killed mid-job, and a resume of
a killed driver from the journal."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from objstore import Config, open_store
from tests.conftest import unique_bucket
from tests.servers.s3_process import free_port, write_config
from tests.servers.sync_service import profiles

pytestmark = pytest.mark.timeout(240)
REPO = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))
ENV = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pytest.importorskip("ray")
    if not Path(RAY).exists():
        pytest.skip("no ray command")
    port = free_port()
    temp = tmp_path_factory.mktemp("ray")
    subprocess.run([RAY, "stop", "--force"], env=ENV, capture_output=True)
    head = subprocess.run(
        [RAY, "start", "--head", "--port", str(port), "--num-cpus", "1", "--include-dashboard",
         "false", "--disable-usage-stats", "--temp-dir", str(temp)],
        env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert head.returncode == 0, head.stderr
    address = f"127.0.0.1:{port}"
    worker = subprocess.run(
        [RAY, "start", "--address", address, "--num-cpus", "1", "--disable-usage-stats"],
        env=ENV, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert worker.returncode == 0, worker.stderr
    try:
        yield address
    finally:
        subprocess.run([RAY, "stop", "--force"], env=ENV, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)


@pytest.fixture
def regions(rclone_s3, s3_proxy, tmp_path: Path) -> tuple[Path, str, Any]:
    """A source bucket and a config whose ``far`` profile reaches the same server through a
    proxy, so copies stream through the job instead of being server-side copies."""
    config = write_config(tmp_path / "objstore.toml", **profiles(rclone_s3, s3_proxy))
    src = unique_bucket("rys")
    rclone_s3.create_bucket(src)
    store = open_store(f"s3://s3@{src}/", Config.load(config))
    return config, src, store


def new_bucket(rclone_s3: Any) -> str:
    name = unique_bucket("ryd")
    rclone_s3.create_bucket(name)
    return name


def sync(config: Path, src: str, dst: str, *extra: str, check: bool = True) -> dict[str, Any]:
    done = subprocess.run(
        [sys.executable, "-m", "babel_sync.cli", "sync", f"s3://s3@{src}/", f"s3://far@{dst}/",
         "--json", "--config", str(config), *extra],
        cwd=REPO, env=ENV, capture_output=True, text=True, timeout=200,
    )  # fmt: skip
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout)


def fill(store: Any, count: int, size: int, big: int = 0) -> None:
    for i in range(count):
        store.put(f"d/{i:03d}.bin", os.urandom(size))
    if big:
        store.put("big.bin", os.urandom(big))


def keys(rclone_s3: Any, bucket: str) -> dict[str, int]:
    store = open_store(
        f"s3://s3@{bucket}/", Config.from_mapping({"profiles": {"s3": rclone_s3.profile()}}, env={})
    )
    return {o.key: o.size for o in store.iter_list()}


def test_ray_engine_matches_the_local_engine(ray_cluster, regions, rclone_s3, tmp_path) -> None:
    config, src, store = regions
    fill(store, 150, 8000, big=24 * 2**20)
    local_dst, ray_dst = new_bucket(rclone_s3), new_bucket(rclone_s3)
    local = sync(config, src, local_dst, "--part-size", "8MiB", "--journal", str(tmp_path / "jl"))
    remote = sync(config, src, ray_dst, "--part-size", "8MiB", "--journal", str(tmp_path / "jr"),
                  "--engine", "ray", "--ray-address", ray_cluster, "--bwlimit", "200M")  # fmt: skip
    for name in ("copied", "copied_bytes", "verified", "mismatches", "failed", "src_listed"):
        assert remote["counters"][name] == local["counters"][name], name
    assert remote["counters"]["copied"] == 151 and remote["counters"]["verified"] == 151
    assert remote["verification"]["sampled"] == local["verification"]["sampled"] >= 1
    engine = remote["engine"]
    assert engine["name"] == "ray" and engine["cluster_cpus"] == 2
    assert engine["listing_tasks"] >= 1
    assert len(engine["objects_by_worker"]) >= 2  # batches ran in more than one worker
    assert sum(engine["objects_by_worker"].values()) == 151
    assert engine["rate_limited_bytes"] == remote["counters"]["bytes_moved"]  # the cluster's bucket
    assert keys(rclone_s3, ray_dst) == keys(rclone_s3, local_dst) == keys(rclone_s3, src)


def _ray_task_pids() -> list[int]:
    out = subprocess.run(["pgrep", "-f", "ray::run_batch"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split()]


def test_a_worker_killed_mid_job_is_retried(ray_cluster, regions, rclone_s3, tmp_path) -> None:
    config, src, store = regions
    fill(store, 120, 32 * 1024)
    dst = new_bucket(rclone_s3)
    proc = subprocess.Popen(
        [sys.executable, "-m", "babel_sync.cli", "sync", f"s3://s3@{src}/", f"s3://far@{dst}/",
         "--json", "--config", str(config), "--journal", str(tmp_path / "j"), "--engine", "ray",
         "--ray-address", ray_cluster, "--bwlimit", "1M"],
        cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not _ray_task_pids():
        assert time.monotonic() < deadline and proc.poll() is None, "no Ray task ever ran"
        time.sleep(0.05)
    time.sleep(0.5)
    victims = _ray_task_pids()
    assert victims
    os.kill(victims[0], signal.SIGKILL)  # a worker dies in the middle of its batch
    out, err = proc.communicate(timeout=200)
    assert proc.returncode == 0 and out.strip(), (proc.returncode, out[-2000:], err[-3000:])
    assert out.lstrip().startswith("{"), out[:1000]
    report = json.loads(out)
    assert report["counters"]["failed"] == 0 and report["counters"]["mismatches"] == 0
    assert report["counters"]["verified"] == 120
    assert keys(rclone_s3, dst) == keys(rclone_s3, src)


def journalled_done(journal: Path) -> int:
    """Objects a running job's journal marks done (read-only, beside the writer)."""
    import lmdb

    from babel_sync.journal import ObjectState

    if not (journal / "data.mdb").exists():
        return 0
    env = lmdb.open(str(journal), max_dbs=8, readonly=True)
    try:
        try:
            db = env.open_db(b"objects", create=False)
        except lmdb.NotFoundError:
            return 0
        with env.begin(db=db) as txn:
            return sum(ObjectState.decode(v).status == "done" for _, v in txn.cursor())
    finally:
        env.close()


def test_a_killed_driver_resumes_from_its_journal(
    ray_cluster, regions, rclone_s3, tmp_path
) -> None:
    config, src, store = regions
    fill(store, 200, 16 * 1024)
    dst = new_bucket(rclone_s3)
    args = [sys.executable, "-m", "babel_sync.cli", "sync", f"s3://s3@{src}/", f"s3://far@{dst}/",
            "--json", "--config", str(config), "--journal", str(tmp_path / "j"), "--engine", "ray",
            "--ray-address", ray_cluster, "--bwlimit", "1M"]  # fmt: skip
    proc = subprocess.Popen(args, cwd=REPO, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 90
    # the batches (64 objects) run side by side, so objects at the destination do not mean a
    # finished batch: wait for what the driver has journalled as done
    while (done := journalled_done(tmp_path / "j")) < 64:
        assert time.monotonic() < deadline and proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    again = sync(config, src, dst, "--journal", str(tmp_path / "j"), "--engine", "ray",
                 "--ray-address", ray_cluster)  # fmt: skip
    counters = again["counters"]
    assert counters["skipped"] >= done and counters["copied"] + counters["skipped"] == 200
    assert counters["failed"] == 0 and counters["mismatches"] == 0
    assert keys(rclone_s3, dst) == keys(rclone_s3, src)
