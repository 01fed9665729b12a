"""Fixtures of the babel-sync service tests: source and destination buckets, a running service."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from objstore import Config, open_store
from tests.conftest import unique_bucket
from tests.servers.sync_service import Service, profiles


@pytest.fixture
def buckets(rclone_s3) -> tuple[str, str, Any]:
    src, dst = unique_bucket("svs"), unique_bucket("svd")
    rclone_s3.create_bucket(src)
    rclone_s3.create_bucket(dst)
    store = open_store(
        f"s3://s3@{src}/", Config.from_mapping({"profiles": {"s3": rclone_s3.profile()}}, env={})
    )
    return src, dst, store


@pytest.fixture
def service(rclone_s3, s3_proxy, tmp_path: Path) -> Iterator[Service]:
    svc = Service(tmp_path, profiles(rclone_s3, s3_proxy)).start()
    try:
        yield svc
    finally:
        svc.stop()
