"""The benchmark listing server answers ListObjectsV2/V1 like S3 (checked with boto3 and ours)."""

from __future__ import annotations

import boto3
import pytest

from objstore import Config, open_store
from tests.servers.static_s3 import StaticS3Server

KEYS = sorted(
    [f"d{d}/k{k:03d}" for d in range(3) for k in range(7)]
    + [f"flat/{i:04d}" for i in range(2500)]
    + ["top.txt", "ü/é x+y&z<1>.bin", "ü/漢字/deep/file", "a b/c"]
)


@pytest.fixture(scope="module")
def server():
    with StaticS3Server({"bench": KEYS}) as s:
        yield s


def _walk(client, **kwargs) -> tuple[list[str], list[str]]:
    keys, prefixes = [], []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket="bench", **kwargs):
        keys += [o["Key"] for o in page.get("Contents", [])]
        prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
    return keys, prefixes


def test_boto3_paginator_flat_delimited_and_start_after(server) -> None:
    client = boto3.client(
        "s3", endpoint_url=server.endpoint, region_name="us-east-1",
        aws_access_key_id="x" * 16, aws_secret_access_key="y" * 16,
    )  # fmt: skip
    assert _walk(client) == (KEYS, [])
    assert _walk(client, PaginationConfig={"PageSize": 7}) == (KEYS, [])
    assert _walk(client, Delimiter="/") == (
        ["top.txt"],
        ["a b/", "d0/", "d1/", "d2/", "flat/", "ü/"],
    )
    assert _walk(client, Prefix="ü/", Delimiter="/") == (["ü/é x+y&z<1>.bin"], ["ü/漢字/"])
    assert _walk(client, StartAfter="flat/2497") == (
        ["flat/2498", "flat/2499", "top.txt", "ü/é x+y&z<1>.bin", "ü/漢字/deep/file"],
        [],
    )
    # ListObjects V1 with a delimiter: NextMarker names a common prefix, which is not repeated.
    keys, prefixes = [], []
    for page in client.get_paginator("list_objects").paginate(
        Bucket="bench", Delimiter="/", PaginationConfig={"PageSize": 2}
    ):
        keys += [o["Key"] for o in page.get("Contents", [])]
        prefixes += [p["Prefix"] for p in page.get("CommonPrefixes", [])]
    assert (keys, prefixes) == (["top.txt"], ["a b/", "d0/", "d1/", "d2/", "flat/", "ü/"])


def test_objstore_lean_listing(server) -> None:
    config = Config.from_mapping({"profiles": {"b": server.profile()}}, env={})
    with open_store("s3://b@bench/", config) as store:
        assert [o.key for o in store.iter_list()] == KEYS
        page = store.list_page("ü/", delimiter="/")
        assert [o.key for o in page.objects] == ["ü/é x+y&z<1>.bin"]
        assert page.prefixes == ["ü/漢字/"]
    with open_store("s3://b@bench/flat/", config) as store:
        page = store.list_page("", start_after="0100", limit=3)
        assert [o.key for o in page.objects] == ["0101", "0102", "0103"]
        assert page.token is not None


def test_keys_are_zero_length_objects(server) -> None:
    """HEAD and GET of a key answer an empty object (what a mount needs to stat a tree)."""
    config = Config.from_mapping({"profiles": {"b": server.profile()}}, env={})
    with open_store("s3://b@bench/", config) as store:
        before = server.heads
        info = store.stat("ü/é x+y&z<1>.bin")
        assert info.size == 0 and info.etag and store.get("top.txt") == b""
        with pytest.raises(FileNotFoundError):
            store.stat("flat/9999")
        assert server.heads - before == 3
