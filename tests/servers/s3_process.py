"""What the S3 servers the tests run as subprocesses share: a free 127.0.0.1 port, start and
wait until it listens, stop, a plain boto3 client for set-up, bucket creation through the API,
and the ``[profiles.NAME]`` table that reaches the server."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


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


class S3ServerProcess:
    """Base of an S3 endpoint run as a subprocess; subclasses supply :meth:`command`.

    Attributes:
        endpoint: ``http://127.0.0.1:PORT``.
        access_key_id, secret_access_key: credentials for the server.
    """

    startup_timeout = 30.0

    def __init__(
        self,
        access_key_id: str,
        secret_access_key: str,
        *,
        port: int = 0,
        log_file: str | os.PathLike[str] | None = None,
    ) -> None:
        self.access_key_id = access_key_id
        self.secret_access_key = secret_access_key
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._log_file = log_file
        self._proc: subprocess.Popen[bytes] | None = None

    def command(self) -> list[str]:
        raise NotImplementedError

    def start(self) -> Any:
        out: Any = open(self._log_file, "ab") if self._log_file else subprocess.DEVNULL  # noqa: SIM115
        self._proc = subprocess.Popen(
            self.command(), stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL
        )
        try:
            wait_for_port("127.0.0.1", self.port, self.startup_timeout, self._proc)
        except BaseException:
            self.stop()
            raise
        log.info("%s listening on %s", type(self).__name__, self.endpoint)
        return self

    def stop(self) -> None:
        if self._proc is not None and self._proc.poll() is None:
            self._proc.terminate()
            try:
                self._proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self._proc.kill()
                self._proc.wait()
        self._proc = None

    def client(self) -> Any:
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
        under its root may stay invisible for minutes)."""
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

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def toml_value(value: object) -> str:
    """A TOML literal for a profile value (strings, numbers, booleans)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    return repr(value)


def write_config(path: Path, **profiles: dict[str, object]) -> Path:
    """An objstore config file (``$OBJSTORE_CONFIG``) with these ``[profiles.NAME]`` tables."""
    lines = []
    for name, table in profiles.items():
        lines.append(f"[profiles.{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    path.write_text("\n".join(lines) + "\n")
    return path
