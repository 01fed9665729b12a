"""Session-wide real servers for the test suite: an S3 endpoint (rclone serve s3) behind an HTTP
fault-injecting proxy, and the OSS-protocol server. Each test gets fresh buckets on them.

The suite's layers: a test that asks for none of the fixtures in :data:`SERVER_FIXTURES` and is
not marked ``integration`` is marked ``unit`` (``pytest -m unit``: the inner loop, no server),
every other test ``integration``.
A unit test is held to it: listening on a socket or starting a process fails it at once, so a
test that starts a server of its own cannot hide in the unit layer.
"""

from __future__ import annotations

import itertools
import multiprocessing
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from tests.servers.moto_s3 import MotoS3Server  # noqa: E402
from tests.servers.oss_server import OSSServer  # noqa: E402
from tests.servers.proxies import FaultProxy  # noqa: E402
from tests.servers.rclone_s3 import RcloneS3Server  # noqa: E402

_bucket_ids = itertools.count()

#: fixtures that start a server or a process, or build a large real tree (local_tree: 7,000
#: files): a test using any of them is not a unit test
SERVER_FIXTURES = frozenset(
    {
        "rclone_s3", "s3_proxy", "oss_server", "moto_s3",  # here
        "regions", "dataset", "buckets", "service", "browser", "ray_cluster", "slow_s3",
        "stores", "s3_tree", "local_tree",  # babel_sync
        "s3_env",  # ckpt
        "silent_server", "store", "case", "listed", "serve", "listener", "tiny_disk",  # objstore
        "make_cluster", "pcache_env", "pfs", "cluster2", "mounts", "bed", "outage", "env", "tmpfs",
        "server", "bucket", "listing_bucket", "upstream", "fault_proxy", "s3_endpoint",
    }
)  # fmt: skip


#: what ``ctypes.util.find_library`` runs (trio does at its import): not a server
_LIBRARY_PROBES = frozenset({"ldconfig", "gcc", "cc", "ld", "objdump"})


class UnitTestStartedServer(RuntimeError):
    """A test marked ``unit`` listened on a socket or started a process."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("integration") is not None:
            continue
        if SERVER_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
        else:
            item.add_marker(pytest.mark.unit)


@pytest.fixture(autouse=True)
def _unit_tests_start_nothing(request: pytest.FixtureRequest) -> Iterator[None]:
    if request.node.get_closest_marker("unit") is None:
        yield
        return

    def refuse(*args: object, **kwargs: object) -> None:
        raise UnitTestStartedServer(
            f"{request.node.nodeid} is a unit test: it may not listen or start processes "
            "(mark it integration, or use a fixture of SERVER_FIXTURES)"
        )

    popen_init = subprocess.Popen.__init__

    def popen(self: subprocess.Popen[Any], argv: Any, *args: Any, **kwargs: Any) -> None:
        program = argv[0] if isinstance(argv, list | tuple) and argv else argv
        if os.path.basename(str(program)) in _LIBRARY_PROBES:
            popen_init(self, argv, *args, **kwargs)  # ctypes.util.find_library, at an import
            return
        refuse()

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(socket.socket, "listen", refuse)
        patch.setattr(subprocess.Popen, "__init__", popen)
        patch.setattr(multiprocessing.process.BaseProcess, "start", refuse)
        yield


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
