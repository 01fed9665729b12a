"""``pcache://`` through fsspec: the entry point, everyday calls, and fsspec's own abstract test
suites (copy, get, put, open, pipe) run against a real worker over the real S3 server."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import fsspec
import pytest
from fsspec.tests import abstract

from pcache.fsspec_fs import PcacheFileSystem
from tests.pcache.conftest import ClusterFactory

MiB = 1 << 20


@pytest.fixture(scope="module")
def pcache_env(
    rclone_s3: Any, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, str]]:
    factory = ClusterFactory(rclone_s3, tmp_path_factory.mktemp("fsspec-cluster"))
    try:
        cluster, _ = factory(1, metadata_ttl=0.0, negative_ttl=0.0)
        yield {"PCACHE_WORKER": cluster.nodes[0].address, "PCACHE_TOKEN": cluster.token}
    finally:
        factory.close()


@pytest.fixture
def pfs(pcache_env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> PcacheFileSystem:
    for key, value in pcache_env.items():
        monkeypatch.setenv(key, value)
    PcacheFileSystem.clear_instance_cache()
    return PcacheFileSystem(skip_instance_cache=True)


def test_entry_point_and_everyday_calls(pfs: PcacheFileSystem, monkeypatch) -> None:
    assert fsspec.get_filesystem_class("pcache") is PcacheFileSystem
    data = os.urandom(3 * MiB + 17)
    with fsspec.open("pcache://data/ep/a.bin", "wb") as f:
        f.write(data)
    with fsspec.open("pcache://data/ep/a.bin", "rb") as f:
        assert f.read() == data
        f.seek(MiB)
        assert f.read(10) == data[MiB : MiB + 10]
    pfs.pipe_file("data/ep/sub/b.txt", b"bee")
    assert pfs.cat_file("data/ep/sub/b.txt") == b"bee"
    assert pfs.cat_file("data/ep/a.bin", 5, 15) == data[5:15]
    assert pfs.ls("data/ep", detail=False) == ["data/ep/a.bin", "data/ep/sub"]
    assert pfs.info("data/ep/sub")["type"] == "directory"
    assert pfs.info("data/ep/a.bin")["size"] == len(data)
    assert pfs.isdir("data") and "data" in pfs.ls("", detail=False)
    pfs.rm("data/ep", recursive=True)
    assert not pfs.exists("data/ep/a.bin")
    with pytest.raises(FileNotFoundError):
        pfs.cat_file("data/ep/a.bin")


class PcacheFixtures(abstract.AbstractFixtures):  # type: ignore[misc]
    @pytest.fixture
    def fs(self, pfs: PcacheFileSystem) -> PcacheFileSystem:
        return pfs

    @pytest.fixture
    def fs_path(self) -> str:
        return "data/abstract"

    @pytest.fixture
    def fs_join(self) -> Any:
        def join(*parts: str) -> str:  # keeps a trailing "/": it means "into this directory"
            head = "/".join(p.strip("/") for p in parts[:-1] if p.strip("/"))
            if parts[0].startswith("/"):  # a local absolute path
                head = "/" + head
            return f"{head}/{parts[-1].lstrip('/')}" if head else parts[-1]

        return join

    @pytest.fixture
    def supports_empty_directories(self) -> bool:
        return False


class TestPcacheCopy(abstract.AbstractCopyTests, PcacheFixtures):  # type: ignore[misc]
    pass


class TestPcacheGet(abstract.AbstractGetTests, PcacheFixtures):  # type: ignore[misc]
    pass


class TestPcachePut(abstract.AbstractPutTests, PcacheFixtures):  # type: ignore[misc]
    pass


class TestPcacheOpen(abstract.AbstractOpenTests, PcacheFixtures):  # type: ignore[misc]
    pass


class TestPcachePipe(abstract.AbstractPipeTests, PcacheFixtures):  # type: ignore[misc]
    pass
