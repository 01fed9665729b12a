"""`make demo` keeps working: run the demo script end to end and check what it reports."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


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
