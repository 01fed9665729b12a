"""The sync engine end to end on real servers: S3<->S3 (bytes moved, not server-side), S3<->OSS,
local<->S3, with `rclone check` as an independent judge; reruns, changes, filters, deletes with
their guard, dry runs, 503 storms, corruption found by `check`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from babel_sync.engine import SyncJob, SyncOptions
from babel_sync.filters import KeyFilter
from babel_sync.transfer import TransferOptions
from objstore import open_store
from objstore.cli import CommandError, ExitCode
from tests.babel_sync.conftest import MiB, Regions, read_all
from tests.servers.rclone_s3 import rclone_binary

pytestmark = pytest.mark.timeout(300)

# Small thresholds so a 13 MiB object goes multipart in 5 MiB parts (3 parts).
SMALL_PARTS = TransferOptions(multipart_threshold=8 * MiB, part_size=5 * MiB)


def options(tmp_path: Path, **kwargs) -> SyncOptions:
    kwargs.setdefault("transfer", SMALL_PARTS)
    kwargs.setdefault("journal_dir", tmp_path / f"journal-{len(list(tmp_path.glob('journal-*')))}")
    kwargs.setdefault("sample_seed", 7)
    return SyncOptions(**kwargs)


def sync(regions: Regions, src: str, dst: str, opts: SyncOptions):
    return SyncJob(src, dst, opts, config=regions.config).run()


def rclone_check(
    regions: Regions, tmp_path: Path, src: str, dst: str
) -> subprocess.CompletedProcess[str]:
    """rclone's own verdict that two S3 (or local) trees hold the same data."""
    conf = tmp_path / "rclone.conf"
    sections = []
    for name in ("a", "b"):
        p = regions.config.profile(name, "s3")
        sections.append(
            f"[{name}]\ntype = s3\nprovider = Other\nendpoint = {p.endpoint}\n"
            f"access_key_id = {p.access_key_id}\nsecret_access_key = {p.secret_access_key.reveal()}\n"
        )
    conf.write_text("\n".join(sections))

    def remote(url: str) -> str:
        if url.startswith("s3://"):
            profile, rest = url[5:].split("@", 1)
            return f"{profile}:{rest}"
        return url

    return subprocess.run(
        [rclone_binary(), "--config", str(conf), "check", remote(src), remote(dst)],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_s3_to_s3_moves_bytes_and_rclone_agrees(regions: Regions, dataset, tmp_path: Path) -> None:
    src, dst = regions.bucket("a"), regions.bucket("b")
    content = dataset(regions.store(src))
    report = sync(regions, src, dst, options(tmp_path))
    assert report.exit_code == ExitCode.OK, report.to_json()
    c = report.counters
    assert c["copied"] == len(content) and c["failed"] == 0 and c["mismatches"] == 0
    assert c["bytes_moved"] == sum(len(v) for v in content.values())  # no server-side shortcut
    assert report.verification["sampled"] == 1  # the multipart checkpoint
    assert c["verified"] == len(content)
    assert read_all(regions.store(dst)) == content
    checked = rclone_check(regions, tmp_path, src, dst)
    assert checked.returncode == 0, checked.stderr
    info = regions.store(dst).stat("tokens/shard-000.bin")
    assert int(info.metadata["babel-crc64nvme"]) > 0  # our CRC stored for later runs and tools


def test_rerun_copies_nothing_and_changes_are_recopied(
    regions: Regions, dataset, tmp_path: Path
) -> None:
    src, dst = regions.bucket("a"), regions.bucket("b")
    content = dataset(regions.store(src))
    assert sync(regions, src, dst, options(tmp_path)).exit_code == ExitCode.OK
    again = sync(regions, src, dst, options(tmp_path))
    assert again.counters["copied"] == 0 and again.counters["bytes_moved"] == 0
    assert again.counters["skipped"] == len(content)
    regions.store(src).put("tokens/shard-005.bin", b"changed, different size")
    regions.store(src).put("new.bin", b"new")
    third = sync(regions, src, dst, options(tmp_path))
    assert third.counters["copied"] == 2
    assert regions.store(dst).get("tokens/shard-005.bin") == b"changed, different size"


@pytest.mark.parametrize(("a", "b"), [("a", "o"), ("o", "b")])
def test_s3_and_oss_both_ways(regions: Regions, dataset, tmp_path: Path, a: str, b: str) -> None:
    src, dst = regions.bucket(a), regions.bucket(b)
    content = dataset(regions.store(src))
    report = sync(regions, src, dst, options(tmp_path, verify="full"))
    assert report.exit_code == ExitCode.OK, report.to_json()
    assert report.verification["full"] == len(content)  # every object re-read and CRC-compared
    assert read_all(regions.store(dst)) == content
    # OSS reports CRC-64/XZ, S3 CRC-64/NVME: the second run must still find nothing to copy.
    again = sync(regions, src, dst, options(tmp_path))
    assert again.counters["copied"] == 0, again.to_json()


def test_local_to_s3_and_back(regions: Regions, dataset, tmp_path: Path) -> None:
    local = tmp_path / "local-src"
    local.mkdir()
    content = dataset(open_store(str(local)))
    dst = regions.bucket("b")
    assert sync(regions, str(local), dst, options(tmp_path)).exit_code == ExitCode.OK
    assert rclone_check(regions, tmp_path, str(local), dst).returncode == 0
    back = tmp_path / "local-back"
    assert sync(regions, dst, str(back), options(tmp_path)).exit_code == ExitCode.OK
    assert {
        str(p.relative_to(back)): p.read_bytes() for p in back.rglob("*") if p.is_file()
    } == content


def test_filters(regions: Regions, dataset, tmp_path: Path) -> None:
    src, dst = regions.bucket("a"), regions.bucket("b")
    dataset(regions.store(src))
    rules = KeyFilter.from_args(["tokens/**", "*.json"], ["tokens/shard-00*"])
    report = sync(regions, src, dst, options(tmp_path, key_filter=rules))
    keys = {i.key for i in regions.store(dst).iter_list()}
    assert (
        "meta/index.json" in keys
        and "top-level.txt" not in keys
        and "ckpt/step-1/model.bin" not in keys
    )
    assert "tokens/shard-003.bin" not in keys and "tokens/shard-013.bin" in keys
    assert report.counters["copied"] == len(keys) == 31


def test_delete_with_max_delete_guard(regions: Regions, dataset, tmp_path: Path) -> None:
    src, dst = regions.bucket("a"), regions.bucket("b")
    dataset(regions.store(src))
    store = regions.store(dst)
    for i in range(5):
        store.put(f"stale/{i}", b"old")
    with pytest.raises(CommandError) as refused:
        sync(regions, src, dst, options(tmp_path, delete=True, max_delete=4))
    assert "refusing to delete 5 objects" in str(refused.value)
    assert len([i for i in store.iter_list("stale/")]) == 5  # nothing deleted, nothing copied
    assert not store.exists("top-level.txt")
    copy_only = sync(regions, src, dst, options(tmp_path, mode="copy", delete=True))
    assert copy_only.counters["deleted"] == 0  # copy never deletes
    mirror = sync(regions, src, dst, options(tmp_path, delete=True, max_delete=5))
    assert mirror.counters["deleted"] == 5
    assert list(store.iter_list("stale/")) == []


def test_dry_run_writes_the_plan_and_changes_nothing(
    regions: Regions, dataset, tmp_path: Path
) -> None:
    src, dst = regions.bucket("a"), regions.bucket("b")
    content = dataset(regions.store(src))
    regions.store(dst).put("extra", b"x")
    cmd = [
        sys.executable,
        "-m",
        "babel_sync.cli",
        "sync",
        src,
        dst,
        "--dry-run",
        "--delete",
        "--config",
        str(regions.config_path),
        "--journal",
        str(tmp_path / "j"),
        "-q",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    planned = [json.loads(line) for line in done.stdout.splitlines()]
    assert {p["key"] for p in planned if p["action"] == "copy"} == set(content)
    assert [p["key"] for p in planned if p["action"] == "delete"] == ["extra"]
    assert all(p["reason"] for p in planned)
    assert [i.key for i in regions.store(dst).iter_list()] == ["extra"]


def test_503_storm_is_survived(regions: Regions, dataset, tmp_path: Path) -> None:
    src, dst = regions.bucket("a"), regions.bucket("b")  # b goes through the fault proxy
    content = dataset(regions.store(src))
    before = regions.proxy.faults_served
    regions.proxy.inject_storm(30, probability=0.5)
    try:
        report = sync(regions, src, dst, options(tmp_path))
    finally:
        regions.proxy.inject_storm(0)
    assert report.exit_code == ExitCode.OK, report.to_json()
    assert regions.proxy.faults_served - before >= 15  # the storm really hit the sync
    assert read_all(regions.store(dst)) == content


def test_check_finds_corruption(regions: Regions, dataset, tmp_path: Path) -> None:
    src, dst = regions.bucket("a"), regions.bucket("b")
    content = dataset(regions.store(src))
    assert sync(regions, src, dst, options(tmp_path)).exit_code == ExitCode.OK
    clean = sync(regions, src, dst, options(tmp_path, mode="check"))
    assert clean.exit_code == ExitCode.OK and clean.counters["verified"] == len(content)
    store = regions.store(dst)
    big = bytearray(content["ckpt/step-1/model.bin"])
    big[6 * MiB : 7 * MiB] = bytes(MiB)  # a zeroed range across the second part
    store.put("ckpt/step-1/model.bin", bytes(big))
    store.put("tokens/shard-001.bin", content["tokens/shard-001.bin"][:-10])  # truncated
    store.delete("meta/index.json")
    report = sync(regions, src, dst, options(tmp_path, mode="check", sample_blocks=32))
    assert report.exit_code == ExitCode.VERIFY
    bad = {m["key"]: m for m in report.mismatches}
    assert set(bad) == {"ckpt/step-1/model.bin", "tokens/shard-001.bin", "meta/index.json"}
    assert "missing" in bad["meta/index.json"]["reason"]


def test_cli_summary_and_exit_codes(regions: Regions, dataset, tmp_path: Path) -> None:
    src, dst = regions.bucket("a"), regions.bucket("b")
    dataset(regions.store(src))
    base = [sys.executable, "-m", "babel_sync.cli"]
    args = ["--config", str(regions.config_path), "--journal", str(tmp_path / "j")]
    done = subprocess.run(
        [*base, "sync", src, dst, "--json", *args], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    summary = json.loads(done.stdout)
    assert summary["exit_code"] == 0 and summary["counters"]["copied"] == 43
    assert summary["verification"]["detection_1pct"] == pytest.approx(1 - 0.99**16)
    missing = subprocess.run(
        [*base, "sync", src, "s3://b@no-such-bucket-x/", *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert missing.returncode == ExitCode.NOT_FOUND
    assert missing.stderr.strip().splitlines() == [missing.stderr.strip()]
    bad = subprocess.run(
        [*base, "sync", src, "s3:/x", *args], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == ExitCode.USAGE and "malformed URL" in bad.stderr
    os.environ.pop("NOPE", None)


def test_same_endpoint_copies_server_side(regions: Regions, dataset, tmp_path: Path) -> None:
    src, dst = regions.bucket("a"), regions.bucket("a")  # one endpoint, one account
    content = dataset(regions.store(src))
    report = sync(regions, src, dst, options(tmp_path))
    assert report.exit_code == ExitCode.OK, report.to_json()
    assert report.counters["server_side"] == len(content)
    assert report.counters["bytes_moved"] == 0  # nothing went through this machine
    assert read_all(regions.store(dst)) == content
