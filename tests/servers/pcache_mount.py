"""``pcache mount --foreground`` in a subprocess, for tests and benchmarks."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def force_unmount(mountpoint: Path) -> None:
    """Unmount ``mountpoint`` if anything is mounted there (lazily when busy)."""
    if not os.path.ismount(mountpoint):
        result = subprocess.run(["mount"], capture_output=True, text=True)
        if f" {mountpoint} " not in result.stdout:
            return
    for command in (["fusermount3", "-u", str(mountpoint)], ["umount", "-l", str(mountpoint)]):
        if subprocess.run(command, capture_output=True).returncode == 0:
            return


class PcacheMount:
    """A live mount of ``source`` through the worker at ``worker`` until :meth:`stop`.

    Args:
        worker: the local worker's URL.
        token: the cluster token (passed in the environment, never in argv).
        mountpoint: created when missing.
        source: ``NS[/PREFIX]``.
        extra: more ``pcache mount`` arguments (``--immutable``, ``--read-only``).
        env: more environment variables.
    """

    def __init__(
        self,
        worker: str,
        token: str,
        mountpoint: Path,
        *extra: str,
        source: str = "data",
        env: Mapping[str, str] | None = None,
        timeout: float = 20.0,
    ) -> None:
        mountpoint.mkdir(parents=True, exist_ok=True)
        self.path = mountpoint
        self.log = mountpoint.parent / f"{mountpoint.name}.log"
        command = [
            sys.executable, "-m", "pcache.cli", "mount", source, str(mountpoint),
            "--foreground", "--worker", worker, "--log-file", str(self.log), *extra,
        ]  # fmt: skip
        self.process = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, "PCACHE_TOKEN": token, "PYTHONPATH": str(ROOT), **(env or {})},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + timeout
        while not os.path.ismount(mountpoint):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.process.kill()
                out, _ = self.process.communicate()
                self.stop()
                raise RuntimeError(f"mount did not come up: {out.decode()}\n{self.logs()}")
            time.sleep(0.05)

    def logs(self) -> str:
        return self.log.read_text()[-4000:] if self.log.exists() else ""

    def stop(self) -> None:
        force_unmount(self.path)
        try:
            self.process.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        if self.process.stdout and not self.process.stdout.closed:
            self.process.stdout.close()

    def __enter__(self) -> PcacheMount:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
