"""Fixtures for pcache tests: real workers (subprocesses) over a bucket of the session's real S3
server (rclone serve s3), and clients talking to them over HTTP and shared memory."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from objstore import Config, Store, open_store
from objstore.config import Secret
from pcache.client import PcacheClient
from pcache.config import ClientConfig
from tests.conftest import unique_bucket
from tests.servers.pcache_cluster import PcacheCluster

MiB = 1 << 20


class ClusterFactory:
    """Builds clusters over fresh buckets; stops them all at the end of the test."""

    def __init__(self, rclone_s3: Any, tmp_path: Path) -> None:
        self.s3 = rclone_s3
        self.tmp = tmp_path
        self.clusters: list[PcacheCluster] = []
        self.clients: list[PcacheClient] = []

    def __call__(
        self,
        nodes: int = 1,
        *,
        capacity: int = 64 * MiB,
        dirs_per_node: int = 1,
        profile: dict[str, Any] | None = None,
        start: bool = True,
        cluster_args: dict[str, Any] | None = None,
        **extra: Any,
    ) -> tuple[PcacheCluster, Store]:
        bucket = unique_bucket("pc")
        self.s3.create_bucket(bucket)
        profiles = {"s3": profile or self.s3.profile(max_attempts=3)}
        url = f"s3://s3@{bucket}/"
        cluster = PcacheCluster(
            self.tmp / f"cluster{len(self.clusters)}",
            profiles,
            {"data": url},
            nodes=nodes,
            capacity=capacity,
            dirs_per_node=dirs_per_node,
            extra=extra,
            **(cluster_args or {}),
        )
        self.clusters.append(cluster)
        if start:
            cluster.start()
        store = open_store(
            f"s3://s3@{bucket}/",
            Config.from_mapping({"profiles": {"s3": self.s3.profile()}}, env={}),
        )
        return cluster, store

    def client(self, cluster: PcacheCluster, node: int = 0, **kwargs: Any) -> PcacheClient:
        config = ClientConfig(
            worker=cluster.nodes[node].address, token=Secret(cluster.token), **kwargs
        )
        client = PcacheClient(config)
        self.clients.append(client)
        return client

    def close(self) -> None:
        for client in self.clients:
            try:
                client.close()
            except Exception:
                pass
        for cluster in self.clusters:
            cluster.stop()


@pytest.fixture
def make_cluster(rclone_s3: Any, tmp_path: Path) -> Iterator[ClusterFactory]:
    factory = ClusterFactory(rclone_s3, tmp_path)
    try:
        yield factory
    finally:
        factory.close()


@pytest.fixture
def payload() -> Callable[[int], bytes]:
    return lambda n: os.urandom(n)


def disk_usage(path: Path) -> int:
    """Bytes of all files under ``path`` (what the cache really occupies)."""
    total = 0
    for directory, _, files in os.walk(path):
        for name in files:
            try:
                total += os.stat(os.path.join(directory, name)).st_size
            except FileNotFoundError:  # evicted while we looked
                pass
    return total
