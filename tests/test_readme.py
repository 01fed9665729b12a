"""The README's five-minute tour runs as written.

The tour's code blocks (each after a ``<!-- tour -->`` marker) run in one bash script, in order,
with ``set -euo pipefail``, in an empty directory, against two real S3 servers (``rclone serve
s3``, different credentials each). Only the ``<!-- tour:settings -->`` block, the reader's own
endpoints and credentials, is replaced: by the same variables pointing at the local servers.
"""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.servers.pcache_mount import force_unmount
from tests.servers.rclone_s3 import RcloneS3Server

pytestmark = pytest.mark.integration  # runs the CLI or servers as processes

REPO = Path(__file__).resolve().parents[1]
FENCE = re.compile(r"<!-- (tour(?::settings)?) -->\n```bash\n(.*?)```", re.DOTALL)


def tour_blocks() -> tuple[str, list[str]]:
    settings, blocks = "", []
    for kind, body in FENCE.findall((REPO / "README.md").read_text()):
        if kind == "tour:settings":
            settings = body
        else:
            blocks.append(body)
    return settings, blocks


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


@pytest.mark.timeout(480)
def test_readme_tour_runs_as_written(tmp_path: Path) -> None:
    if not os.path.exists("/dev/fuse"):
        pytest.skip("the tour mounts with FUSE: no /dev/fuse here")
    for port in (7070, 8470):  # the tour uses the services' default ports
        assert port_free(port), f"port {port} is taken: the README tour needs it"
    settings, blocks = tour_blocks()
    assert len(blocks) == 5, "the README's tour blocks were not found"
    variables = re.findall(r"^export (\w+)=", settings, re.MULTILINE)
    regions = {
        "REGION_A": RcloneS3Server(tmp_path / "region-a"),
        "REGION_B": RcloneS3Server(
            tmp_path / "region-b",
            access_key_id="AKIATOURREGIONB00001",
            secret_access_key="tourSecretKeyForTheReadmeRegionB00000002",
        ),
    }
    work = tmp_path / "tour"
    work.mkdir()
    try:
        ours = []
        for name, server in regions.items():
            server.start()
            for bucket in ("datasets", "checkpoints"):
                server.create_bucket(bucket)
            ours += [
                f"export OBJSTORE_PROFILE_{name}_ENDPOINT={server.endpoint}",
                f"export OBJSTORE_PROFILE_{name}_ACCESS_KEY_ID={server.access_key_id}",
                f"export OBJSTORE_PROFILE_{name}_SECRET_ACCESS_KEY={server.secret_access_key}",
            ]
        ours.append(f"export PATH={Path(sys.executable).parent}:$PATH")
        # the replacement sets exactly the variables the README asks the reader to set
        assert re.findall(r"^export (\w+)=", "\n".join(ours), re.MULTILINE) == variables
        script = work / "tour.sh"
        script.write_text("\n".join(["set -euo pipefail", *ours, *blocks]))
        env = {
            k: v for k, v in os.environ.items() if not k.startswith(("OBJSTORE", "PCACHE", "BABEL"))
        }
        env.update(HOME=str(tmp_path), OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
        tour = subprocess.Popen(
            ["bash", str(script)], cwd=work, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
        )  # fmt: skip
        try:
            output, _ = tour.communicate(timeout=420)
        finally:
            # a failed step leaves the background service and worker: same process group
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(tour.pid, sig)
                except ProcessLookupError:
                    break
                time.sleep(2)
            tour.wait()
        logs = "".join(
            f"\n--- {log.name} ---\n{log.read_text()[-3000:]}"
            for log in (work / "serve.log", work / "worker.log")
            if log.exists()
        )
        assert tour.returncode == 0, output + logs
        assert "8 shards" in output
        assert re.search(r"\bsucceeded\b", output), output
        assert "dashboard: http://127.0.0.1:8470/#token=" in output
        assert "shard-00000.bin" in output  # ls of the mount
        verified = re.findall(
            r"moe/step-00000004/: (\d+) items, [\d,]+ bytes checked, 0 bad", output
        )
        assert len(verified) == 2 and int(verified[0]) > 0, output  # region-b, then region-a
    finally:
        force_unmount(work / "mnt")
        for server in regions.values():
            server.stop()
