"""Fixtures for sync tests: two S3 "regions" on the session's rclone server (one reached
directly, one through the fault proxy, so the engine cannot use server-side copy and must move
the bytes as it would between regions), an OSS region, and a config naming them all; for the service: buckets and a running service."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from objstore import Config, Store, open_store
from tests.conftest import unique_bucket
from tests.servers.s3_process import toml_value
from tests.servers.sync_service import Service, profiles

MiB = 1024 * 1024


@dataclass
class Regions:
    config: Config
    config_path: Path
    s3: object
    proxy: object
    oss: object

    def bucket(self, region: str) -> str:
        """A fresh bucket URL in ``region`` (``a``: S3 direct, ``b``: S3 via proxy, ``o``: OSS)."""
        name = unique_bucket()
        if region == "o":
            self.oss.create_bucket(name)  # type: ignore[attr-defined]
        else:
            self.s3.create_bucket(name)  # type: ignore[attr-defined]
        scheme = "oss" if region == "o" else "s3"
        return f"{scheme}://{region}@{name}/"

    def store(self, url: str) -> Store:
        return open_store(url, self.config)


@pytest.fixture(scope="module")
def regions(rclone_s3, s3_proxy, oss_server, tmp_path_factory: pytest.TempPathFactory) -> Regions:
    profiles = {
        "a": rclone_s3.profile(),
        "b": rclone_s3.profile(endpoint=s3_proxy.endpoint, max_attempts=10),
        "o": {
            "endpoint": oss_server.endpoint,
            "access_key_id": oss_server.access_key_id,
            "secret_access_key": oss_server.access_key_secret,
        },
    }
    lines = []
    for name, table in profiles.items():
        lines.append(f"[profiles.{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in table.items()]
    path = tmp_path_factory.mktemp("sync-config") / "objstore.toml"
    path.write_text("\n".join(lines) + "\n")
    return Regions(Config.load(path, env={}), path, rclone_s3, s3_proxy, oss_server)


@pytest.fixture
def dataset() -> Callable[[Store], dict[str, bytes]]:
    """Writes a small mixed dataset (many small objects, one multipart-sized) into a store."""

    def write(store: Store, big: int = 13 * MiB + 7) -> dict[str, bytes]:
        content = {f"tokens/shard-{i:03d}.bin": os.urandom(1000 + 37 * i) for i in range(40)}
        content["meta/index.json"] = b'{"shards": 40}'
        content["ckpt/step-1/model.bin"] = os.urandom(big)
        content["top-level.txt"] = b"hello"
        for key, data in content.items():
            store.put(key, data)
        return content

    return write


def read_all(store: Store) -> dict[str, bytes]:
    return {info.key: store.get(info.key) for info in store.iter_list()}


# -- babel-sync serve ----------------------------------------------------------------------------


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
