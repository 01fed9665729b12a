"""Session-wide real servers for the test suite: an S3 endpoint (rclone serve s3) behind an HTTP
fault-injecting proxy, and the OSS-protocol server. Each test gets fresh buckets on them."""

from __future__ import annotations

import itertools
import os
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.servers.moto_s3 import MotoS3Server  # noqa: E402
from tests.servers.oss_server import OSSServer  # noqa: E402
from tests.servers.proxies import FaultProxy  # noqa: E402
from tests.servers.rclone_s3 import RcloneS3Server  # noqa: E402

_bucket_ids = itertools.count()


def unique_bucket(prefix: str = "bkt") -> str:
    """A bucket name no other test in this run uses."""
    return f"{prefix}-{os.getpid()}-{next(_bucket_ids)}"


@pytest.fixture(scope="session")
def rclone_s3(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RcloneS3Server]:
    root = tmp_path_factory.mktemp("rclone-s3")
    with RcloneS3Server(root, log_file=root.parent / "rclone-s3.log") as server:
        yield server


@pytest.fixture(scope="session")
def s3_proxy(rclone_s3: RcloneS3Server) -> Iterator[FaultProxy]:
    """The S3 endpoint as clients see it: through a proxy that can inject faults."""
    with FaultProxy(rclone_s3.endpoint) as proxy:
        yield proxy


@pytest.fixture(scope="session")
def oss_server() -> Iterator[OSSServer]:
    with OSSServer() as server:
        yield server


@pytest.fixture(scope="session")
def moto_s3() -> Iterator[MotoS3Server]:
    with MotoS3Server() as server:
        yield server
