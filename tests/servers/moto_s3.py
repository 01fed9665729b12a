"""A second real S3 endpoint for tests: moto's server (``moto_server``).

rclone's S3 server leaves out a few S3 behaviours (``If-Match`` on GET, replacing an uploaded
part); moto implements them, so the conformance suite runs the S3 backend against both. moto does
not check signatures, so credential tests use rclone.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

from tests.servers.rclone_s3 import free_port, wait_for_port

log = logging.getLogger(__name__)


class MotoS3Server:
    """``moto_server`` on a free 127.0.0.1 port, in memory.

    Attributes:
        endpoint: ``http://127.0.0.1:PORT`` once started.
    """

    access_key_id = "AKIAMOTOTESTKEY00001"
    secret_access_key = "motoSecretKeyIsNotChecked0000000000000000"

    def __init__(self, port: int = 0) -> None:
        self.port = port or free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30.0) -> MotoS3Server:
        binary = Path(sys.executable).with_name("moto_server")
        cmd = [str(binary), "-H", "127.0.0.1", "-p", str(self.port)]
        self._proc = subprocess.Popen(
            cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, stdin=subprocess.DEVNULL
        )
        try:
            wait_for_port("127.0.0.1", self.port, timeout, self._proc)
        except BaseException:
            self.stop()
            raise
        return self

    def client(self):
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint,
            region_name="us-east-1",
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
        )

    def create_bucket(self, name: str) -> None:
        client = self.client()
        try:
            client.create_bucket(Bucket=name)
        finally:
            client.close()

    def profile(self, **extra: object) -> dict[str, object]:
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

    def __enter__(self) -> MotoS3Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
