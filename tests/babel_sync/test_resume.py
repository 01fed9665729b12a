"""Crash safety: ``kill -9`` a real ``babel-sync sync`` process during listing, during a multipart
transfer and during verification, rerun the same command, and check that nothing is lost, done
work is not redone, and no multipart upload is left behind."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from babel_sync.journal import Journal
from objstore import Config, open_store
from tests.conftest import unique_bucket
from tests.servers.proxies import DelayProxy
from tests.servers.rclone_s3 import RcloneS3Server
from tests.servers.s3_process import write_config

pytestmark = [pytest.mark.timeout(300), pytest.mark.integration]
MiB = 1024 * 1024
REPO = Path(__file__).resolve().parents[2]


class Run:
    """A ``babel-sync`` process whose progress lines are watched from a thread."""

    def __init__(self, args: list[str]) -> None:
        cmd = [sys.executable, "-m", "babel_sync.cli", *args, "--stats-interval", "0.1"]
        self.proc = subprocess.Popen(
            cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append(line)

    def kill_when(self, condition: Callable[[], bool], timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError("finished before the kill point: " + "".join(self.lines[-5:]))
            if condition():
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
                return
            time.sleep(0.02)
        self.proc.kill()
        raise AssertionError("kill point never reached: " + "".join(self.lines[-5:]))


def finish(args: list[str]) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "babel_sync.cli", *args, "--json"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    return json.loads(done.stdout)


@pytest.fixture
def slow_s3(rclone_s3: RcloneS3Server) -> Iterator[DelayProxy]:
    """The session S3 server behind a thin link: 8 MiB/s per connection, 20 ms round trips."""
    _, port = rclone_s3.endpoint.rsplit(":", 1)
    with DelayProxy("127.0.0.1", int(port), 0.02, rate_bytes_per_s=8 * MiB) as proxy:
        yield proxy


def test_kill_during_multipart_transfer_resumes_parts(tmp_path: Path, rclone_s3, slow_s3) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(40 * MiB)
    (src / "ckpt.bin").write_bytes(data)
    bucket = unique_bucket()
    rclone_s3.create_bucket(bucket)
    config = write_config(tmp_path / "c.toml", slow=rclone_s3.profile(endpoint=slow_s3.endpoint))
    args = [
        "sync",
        str(src),
        f"s3://slow@{bucket}/",
        "--config",
        str(config),
        "--journal",
        str(tmp_path / "journal"),
        "--part-size",
        "5MiB",
        "--transfers",
        "2",
    ]
    client = rclone_s3.client()

    def uploads() -> list:
        try:
            return client.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
        except client.exceptions.NoSuchUpload:  # rclone's answer for "none yet"
            return []

    def parts_uploaded() -> int:
        found = uploads()
        if not found:
            return 0
        parts = client.list_parts(Bucket=bucket, Key="ckpt.bin", UploadId=found[0]["UploadId"])
        return len(parts.get("Parts", []))

    Run(args).kill_when(lambda: parts_uploaded() >= 3)
    done_before = parts_uploaded()
    summary = finish(args)
    resumed = summary["counters"]["resumed_parts"]
    # A part the server finished just before the kill may not be journaled yet: at most the
    # parts in flight (--transfers 2) are uploaded again, never the ones recorded.
    assert resumed >= done_before - 2 and resumed >= 1
    assert summary["counters"]["bytes_moved"] == len(data) - resumed * 5 * MiB
    assert open_store(f"s3://a@{bucket}/", _direct(rclone_s3)).get("ckpt.bin") == data
    assert uploads() == []  # no orphans


def test_kill_during_verification_verifies_without_recopying(
    tmp_path: Path, rclone_s3, slow_s3
) -> None:
    src = tmp_path / "src"
    src.mkdir()
    data = os.urandom(40 * MiB)
    (src / "big.bin").write_bytes(data)
    bucket = unique_bucket()
    rclone_s3.create_bucket(bucket)
    config = write_config(tmp_path / "c.toml", slow=rclone_s3.profile(endpoint=slow_s3.endpoint))
    journal = tmp_path / "journal"
    args = [
        "sync",
        str(src),
        f"s3://slow@{bucket}/",
        "--config",
        str(config),
        "--journal",
        str(journal),
        "--part-size",
        "8MiB",
        "--verify",
        "full",
    ]
    client = rclone_s3.client()

    def completed() -> bool:  # all bytes there: the process is now re-reading them
        return bool(client.list_objects_v2(Bucket=bucket).get("KeyCount"))

    Run(args).kill_when(completed)
    with Journal(journal, _identity(journal)) as j:
        state = j.get_object("big.bin")
    assert state is not None and state.status == "copied"  # copied, verification interrupted
    summary = finish(args)
    assert summary["counters"]["bytes_moved"] == 0  # not copied again...
    assert summary["verification"]["full"] == 1  # ...but verified
    assert summary["counters"]["verified"] == 1


def test_kill_during_listing_resumes_from_cursors(tmp_path: Path) -> None:
    root = tmp_path / "s3root"
    keys = [f"flat/key-{i:06d}" for i in range(2000)]
    for key in keys:
        path = root / "srcbkt" / key
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(key.encode())
    (root / "dstbkt").mkdir()
    with RcloneS3Server(root) as server:
        _, port = server.endpoint.rsplit(":", 1)
        with DelayProxy("127.0.0.1", int(port), 0.2) as slow:
            config = write_config(
                tmp_path / "c.toml",
                slow=server.profile(endpoint=slow.endpoint),
                fast=server.profile(),
            )
            journal = tmp_path / "journal"
            args = [
                "sync",
                "s3://slow@srcbkt/",
                "s3://fast@dstbkt/",
                "--config",
                str(config),
                "--journal",
                str(journal),
                "--list-workers",
                "2",
                "--transfers",
                "64",
            ]
            run = Run(args)
            run.kill_when(
                lambda: any(re.match(r"listing: listed [1-9]", line) for line in run.lines)
            )
            with Journal(journal, _identity(journal)) as j:
                assert not j.get_meta("src_listed")
                assert j.listing_state("src").pending()  # cursors survived the kill
            summary = finish(args)
        dst = open_store("s3://fast@dstbkt/", Config.load(config, env={}))
        assert sorted(i.key for i in dst.iter_list()) == keys
    assert summary["counters"]["failed"] == 0


def _direct(server: RcloneS3Server) -> Config:
    return Config.from_mapping({"profiles": {"a": server.profile()}}, env={})


def _identity(journal: Path) -> dict:
    """The identity stored in an existing journal (to reopen it as the same job)."""
    import lmdb

    env = lmdb.open(str(journal), max_dbs=8, readonly=True, lock=False)
    try:
        with env.begin(db=env.open_db(b"meta", create=False)) as txn:
            return json.loads(txn.get(b"identity"))
    finally:
        env.close()
