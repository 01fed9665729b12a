"""A second real S3 endpoint for tests: moto's server (``moto_server``), in memory.

rclone's S3 server leaves out a few S3 behaviours (``If-Match`` on GET, replacing an uploaded
part); moto implements them, so the conformance suite runs the S3 backend against both. moto does
not check signatures, so credential tests use rclone.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

from tests.servers.s3_process import S3ServerProcess

log = logging.getLogger(__name__)


class MotoS3Server(S3ServerProcess):
    """``moto_server`` on a free 127.0.0.1 port."""

    def __init__(self, port: int = 0) -> None:
        super().__init__(
            "AKIAMOTOTESTKEY00001", "motoSecretKeyIsNotChecked0000000000000000", port=port
        )

    def command(self) -> list[str]:
        binary = Path(sys.executable).with_name("moto_server")
        return [str(binary), "-H", "127.0.0.1", "-p", str(self.port)]

    def start(self) -> MotoS3Server:
        super().start()
        return self
