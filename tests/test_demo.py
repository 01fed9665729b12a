"""`make demo` keeps working: run the demo script end to end and check what it reports."""

from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration  # runs the CLI or servers as processes

REPO = Path(__file__).resolve().parents[1]


def session_processes(sid: int) -> list[str]:
    """Command lines of the processes still in session ``sid``."""
    left = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
            fields = stat[stat.rindex(")") + 2 :].split()
            if int(fields[3]) == sid and fields[0] != "Z":  # field 6 of stat: the session
                left.append((proc / "cmdline").read_bytes().replace(b"\0", b" ").decode())
        except (OSError, ValueError):
            continue
    return left


@pytest.mark.timeout(300)
def test_demo_interrupted_mid_training_cleans_up() -> None:
    """Ctrl-C (SIGINT to the whole foreground process group, as a terminal sends it) while the
    trainer runs on the mount: exit 130, no process, mount or .demo/ left behind. The next
    test then runs the demo again, in a row."""
    demo = subprocess.Popen(
        [sys.executable, "deploy/demo.py", "--shards", "6", "--shard-tokens", "65536"],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    seen = []
    fuse = os.path.exists("/dev/fuse") and shutil.which("fusermount3")
    marker = "torchrun --nproc-per-node" if fuse else "pcache warmup"
    try:
        assert demo.stdout is not None
        for line in demo.stdout:
            seen.append(line)
            if marker in line:
                break
        assert any(marker in line for line in seen), "".join(seen)
        time.sleep(3)  # the trainer's ranks are up, reading through the mount
        os.killpg(demo.pid, signal.SIGINT)
        rest, _ = demo.communicate(timeout=120)
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
            demo.wait()
    output = "".join(seen) + rest
    assert demo.returncode == 130, output
    assert "interrupted: cleaning up" in output
    assert "Traceback" not in output, output
    deadline = time.monotonic() + 10
    while session_processes(demo.pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert session_processes(demo.pid) == []
    assert str(REPO / ".demo") not in Path("/proc/self/mountinfo").read_text()
    assert not (REPO / ".demo").exists()


@pytest.mark.timeout(300)
def test_demo_runs_end_to_end_and_cleans_up() -> None:
    done = subprocess.run(
        [sys.executable, "deploy/demo.py", "--shards", "6", "--shard-tokens", "65536"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "shard CRC-64/NVME confirmed by region-a" in done.stdout
    assert "6/6" in done.stdout
    assert "bucket does not exist: 'no-such-bucket'" in done.stdout
    assert "synced region-a -> region-b" in done.stdout and "8 objects" in done.stdout
    assert "started babel-sync serve: dashboard http://127.0.0.1:" in done.stdout
    assert re.search(r"sync job on babel-sync serve\s*│\s*\d{8}-\d{6}-", done.stdout)
    assert re.search(r"check region-a vs region-b\s*│\s*match", done.stdout)
    assert "pcache warmup of region-b (2 workers)" in done.stdout
    assert re.search(r"read through pcache \(identical to region-b\)\s*│\s*7/7", done.stdout)
    assert "backend" not in done.stdout.split("read through pcache")[1].split("\n")[0]
    if os.path.exists("/dev/fuse") and shutil.which("fusermount3"):
        assert re.search(r"read via pcache mount \(identical\)\s*│\s*7/7", done.stdout)
        assert "pcache stats" in done.stdout and "p99 ms" in done.stdout
        assert re.search(r"MoE trained through the mount \(2 nodes\)\s*│\s*4 steps", done.stdout)
        assert re.search(r"sim-node-0: [\d,]+, sim-node-1: [\d,]+", done.stdout)
        assert re.search(
            r"synced back to region-a\s*│\s*10 files, verified 10; ckpt verify: \d+ items, ok",
            done.stdout,
        )
    assert not (REPO / ".demo").exists()
