"""The one conformance suite every backend passes (as rclone's fstests and fsspec's abstract
suites do): local files, S3 on a real rclone server, OSS on the OSS-protocol server, and the
fsspec adapter on fsspec's memory filesystem."""

from __future__ import annotations

import hashlib
import os
import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import pytest

from objstore import (
    AccessDenied,
    BucketNotFound,
    InvalidCredentials,
    InvalidKey,
    NotSupported,
    ObjectNotFound,
    PreconditionFailed,
    Store,
    TransientError,
    UploadNotFound,
)
from objstore import checksum as crc
from objstore.retry import RetryPolicy
from tests.objstore.backends import (
    BackendCase,
    fsspec_memory_case,
    local_case,
    oss_case,
    s3_case,
    s3_moto_case,
)

pytestmark = pytest.mark.timeout(180)

BACKENDS = ["local", "s3", "s3-moto", "oss", "fsspec-memory"]


@pytest.fixture(scope="module", params=BACKENDS)
def case(request: pytest.FixtureRequest) -> BackendCase:
    name = request.param
    if name == "local":
        made = local_case()
    elif name == "s3":
        made = s3_case(request.getfixturevalue("rclone_s3"), request.getfixturevalue("s3_proxy"))
    elif name == "s3-moto":
        made = s3_moto_case(request.getfixturevalue("moto_s3"))
    elif name == "oss":
        made = oss_case(request.getfixturevalue("oss_server"))
    else:
        made = fsspec_memory_case()
    request.addfinalizer(made.cleanup)
    return made


@pytest.fixture
def store(case: BackendCase) -> Store:
    return case.make_store()


def require(case: BackendCase, behaviour: str) -> None:
    """Skip when this backend's test server (not the backend) lacks ``behaviour``."""
    if behaviour in case.server_gaps:
        pytest.skip(case.server_gaps[behaviour])


# Keys chosen to catch ordering bugs: '-' (0x2d) < '/' (0x2f) < '0' (0x30), multi-byte UTF-8.
TRICKY_KEYS = [
    "a-b",
    "a/b",
    "a/c/d",
    "a0",
    "b",
    "données/été.txt",
    "日本/語",
    "z\u00ff",
    "z\U0001f600",
]
LISTING_KEYS = 2_600


def _key(i: int) -> str:
    return f"dir{i % 7}/sub{i % 3}/obj-{i:05d}" if i % 2 else f"flat-{i:05d}"


@pytest.fixture(scope="module")
def listed(case: BackendCase) -> tuple[Store, list[str]]:
    """A bucket holding 2,600 small objects plus the tricky keys; shared by listing tests."""
    store = case.make_store()
    keys = [_key(i) for i in range(LISTING_KEYS)] + TRICKY_KEYS
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda k: store.put(k, k.encode()), keys))
    return store, sorted(keys, key=lambda k: k.encode())


def _all_keys(store: Store, prefix: str = "", **kwargs) -> list[str]:
    return [o.key for o in store.iter_list(prefix, **kwargs)]


# -- basic object operations -------------------------------------------------------------------


def test_put_get_stat_roundtrip(store: Store) -> None:
    data = os.urandom(100_003)
    written = store.put("x/data.bin", data)
    info = store.stat("x/data.bin")
    assert info.size == len(data) == written.size
    assert info.etag and info.etag == written.etag
    assert abs(info.mtime - written.mtime) < 120
    assert store.get("x/data.bin") == data
    if info.checksum is not None:  # a service-reported CRC must be the CRC of the content
        assert info.checksum.value == crc.compute(info.checksum.algorithm, data)


def test_native_checksum_reported_where_promised(case: BackendCase, store: Store) -> None:
    require(case, "stat_checksum")
    data = b"123456789" * 1000
    store.put("c", data)
    info = store.stat("c")
    algo = store.features.native_checksum
    if algo is None:
        assert info.checksum is None
    else:
        assert info.checksum is not None and info.checksum.algorithm == algo
        assert info.checksum.value == crc.compute(algo, data)


def test_overwrite_replaces_content(store: Store) -> None:
    store.put("k", b"first version")
    store.put("k", b"second")
    assert store.get("k") == b"second"
    assert store.stat("k").size == 6


def test_empty_object(store: Store) -> None:
    store.put("empty", b"")
    assert store.stat("empty").size == 0
    assert store.get("empty") == b""
    assert store.get_range("empty", 0, 10) == b""
    assert [o.key for o in store.iter_list()] == ["empty"]


@pytest.mark.parametrize(
    ("start", "length"),
    [
        (0, 1),
        (0, 1000),
        (1, 998),
        (999, 1),
        (999, 50),
        (500, None),
        (0, None),
        (1000, 10),
        (5000, 1),
    ],
)
def test_ranged_reads_at_edges(store: Store, start: int, length: int | None) -> None:
    data = bytes(random.Random(7).randbytes(1000))
    store.put("r", data)
    end = None if length is None else start + length
    assert store.get_range("r", start, length) == data[start:end]


def test_memoryview_and_bytearray_bodies(store: Store) -> None:
    buf = bytearray(os.urandom(4096))
    store.put("mv", memoryview(buf)[100:200])
    store.put("ba", buf)
    assert store.get("mv") == bytes(buf[100:200])
    assert store.get("ba") == bytes(buf)


def test_unicode_keys(store: Store) -> None:
    keys = [
        "données/été.txt",
        "日本語/ファイル.bin",
        "emoji-\U0001f680",
        "space name/with+plus&amp",
    ]
    for k in keys:
        store.put(k, k.encode())
    for k in keys:
        assert store.get(k) == k.encode()
        assert store.stat(k).size == len(k.encode())
    assert _all_keys(store) == sorted(keys, key=lambda k: k.encode())


@pytest.mark.parametrize(
    "bad", ["../escape", "a/../../b", "/abs/key", "", "a/..", ".objstore-tmp-x"]
)
def test_unsafe_keys_rejected(store: Store, bad: str) -> None:
    with pytest.raises(InvalidKey):
        store.put(bad, b"x")
    with pytest.raises(InvalidKey):
        store.get(bad)


def test_metadata_roundtrip_or_refused(store: Store) -> None:
    if not store.features.user_metadata:
        with pytest.raises(NotSupported):
            store.put("m", b"x", metadata={"crc64": "123"})
        return
    store.put("m", b"x", metadata={"crc64": "123", "Source": "region-a"})
    assert store.stat("m").metadata == {"crc64": "123", "source": "region-a"}


def test_conditional_read(case: BackendCase, store: Store) -> None:
    require(case, "if_match")
    store.put("v", b"version one")
    etag = store.stat("v").etag
    assert store.get_range("v", 0, 7, if_match=etag) == b"version"
    store.put("v", b"version two!")
    if store.features.conditional_get:
        with pytest.raises(PreconditionFailed):
            store.get_range("v", 0, 7, if_match=etag)


def test_open_read_is_seekable(store: Store) -> None:
    data = os.urandom(300_000)
    store.put("f", data)
    with store.open_read("f", block_size=64 * 1024) as f:
        f.seek(123_456)
        assert f.read(10) == data[123_456:123_466]
        f.seek(-5, os.SEEK_END)
        assert f.read() == data[-5:]
        f.seek(0)
        assert f.read() == data


# -- listing -----------------------------------------------------------------------------------


def test_listing_order_and_pagination(listed: tuple[Store, list[str]]) -> None:
    store, expected = listed
    assert _all_keys(store) == expected  # 1000-key pages
    pages = list(store.iter_pages(limit=337))
    assert all(len(p.objects) <= 337 for p in pages)
    assert len(pages) >= len(expected) // 337
    assert [o.key for p in pages for o in p.objects] == expected
    assert pages[-1].token is None and all(p.token for p in pages[:-1])


def test_listing_with_prefix(listed: tuple[Store, list[str]]) -> None:
    store, expected = listed
    for prefix in ("dir3/", "dir3/sub1/", "flat-00", "a", "a/", "日本/", "nothing-here"):
        assert _all_keys(store, prefix) == [k for k in expected if k.startswith(prefix)], prefix


def test_start_after(listed: tuple[Store, list[str]]) -> None:
    store, expected = listed
    for after in ("", "a", "a-b", "a/", "dir2/sub0/obj-00500", "dir2/", "flat-01000", "zzzz", "z"):
        assert _all_keys(store, start_after=after) == [
            k for k in expected if k.encode() > after.encode()
        ], after
    assert _all_keys(store, "dir4/", start_after="dir4/sub1/") == [
        k for k in expected if k.startswith("dir4/") and k > "dir4/sub1/"
    ]


def test_delimiter_listing(listed: tuple[Store, list[str]]) -> None:
    store, expected = listed
    prefixes, objects = [], []
    for page in store.iter_pages(delimiter="/", limit=5):
        prefixes += page.prefixes
        objects += [o.key for o in page.objects]
    top_dirs = sorted({k.split("/")[0] + "/" for k in expected if "/" in k}, key=str.encode)
    assert prefixes == top_dirs
    assert objects == [k for k in expected if "/" not in k]
    sub = store.list_page("dir5/", delimiter="/")
    assert sub.prefixes == ["dir5/sub0/", "dir5/sub1/", "dir5/sub2/"] and sub.objects == []


def test_missing_bucket(case: BackendCase) -> None:
    store = case.missing_bucket_store()
    with pytest.raises(BucketNotFound):
        store.list_page()
    with pytest.raises(FileNotFoundError):  # the builtin still matches
        store.stat("anything")
    with pytest.raises(BucketNotFound):
        store.check_root()


def test_missing_object(store: Store) -> None:
    for call in (
        lambda: store.stat("nope"),
        lambda: store.get("nope"),
        lambda: store.get_range("nope", 5, 5),
    ):
        with pytest.raises(ObjectNotFound) as info:
            call()
        assert isinstance(info.value, FileNotFoundError)
        assert "nope" in str(info.value)
    assert not store.exists("nope")


# -- multipart ---------------------------------------------------------------------------------


def test_multipart_64mib(store: Store) -> None:
    part = 24 * 1024 * 1024
    rng = random.Random(11)
    chunks = [rng.randbytes(part), rng.randbytes(part), rng.randbytes(17 * 1024 * 1024 + 3)]
    whole = b"".join(chunks)
    info = store.put_parts("big/ckpt.bin", chunks, metadata=None)
    assert info.size == len(whole) > 64 * 1024 * 1024
    stat = store.stat("big/ckpt.bin")
    assert stat.size == len(whole)
    for offset in (0, part - 1, part, 2 * part - 3, len(whole) - 10):
        assert store.get_range("big/ckpt.bin", offset, 20) == whole[offset : offset + 20]
    assert hashlib.sha256(store.get("big/ckpt.bin")).digest() == hashlib.sha256(whole).digest()
    if stat.checksum is not None:
        assert stat.checksum.value == crc.compute(stat.checksum.algorithm, whole)
    if info.checksum is not None:
        assert info.checksum.value == crc.compute(info.checksum.algorithm, whole)
    assert store.list_uploads() == []


def test_multipart_list_abort_and_errors(store: Store) -> None:
    upload_id = store.create_upload("pending/obj")
    part = store.upload_part("pending/obj", upload_id, 1, b"p" * store.features.min_part_size)
    assert [(u.key, u.upload_id) for u in store.list_uploads()] == [("pending/obj", upload_id)]
    assert [u.key for u in store.list_uploads("pending/")] == ["pending/obj"]
    assert store.list_uploads("other/") == []
    assert not store.exists("pending/obj")  # an upload is invisible until completed
    store.abort_upload("pending/obj", upload_id)
    assert store.list_uploads() == []
    store.abort_upload("pending/obj", upload_id)  # idempotent
    assert part.part_number == 1 and part.size == store.features.min_part_size


def test_aborted_upload_is_gone(case: BackendCase, store: Store) -> None:
    require(case, "aborted_upload")
    upload_id = store.create_upload("gone")
    store.abort_upload("gone", upload_id)
    with pytest.raises(UploadNotFound):
        store.upload_part("gone", upload_id, 1, b"late part")


def test_multipart_reupload_part_replaces_it(case: BackendCase, store: Store) -> None:
    require(case, "replace_part")
    size = store.features.min_part_size
    upload_id = store.create_upload("re")
    store.upload_part("re", upload_id, 1, b"a" * size)
    first = store.upload_part("re", upload_id, 1, b"b" * size)
    last = store.upload_part("re", upload_id, 2, b"tail")
    store.complete_upload("re", upload_id, [first, last])
    assert store.get("re") == b"b" * size + b"tail"


def test_upload_part_copy(case: BackendCase, store: Store) -> None:
    if not store.features.part_copy:
        with pytest.raises(NotSupported):
            store.upload_part_copy("x", "id", 1, "y", 0, 1, if_match="e")
        return
    require(case, "part_copy")
    size = store.features.min_part_size
    source = os.urandom(2 * size + 100)
    info = store.put("pc/source", source)
    upload_id = store.create_upload("pc/target")
    copied = store.upload_part_copy(
        "pc/target", upload_id, 1, "pc/source", size, size, if_match=info.etag
    )
    assert copied.size == size
    tail = store.upload_part("pc/target", upload_id, 2, b"new tail")
    store.complete_upload("pc/target", upload_id, [copied, tail])
    assert store.get("pc/target") == source[size : 2 * size] + b"new tail"


def test_upload_part_copy_of_a_replaced_source_fails(case: BackendCase, store: Store) -> None:
    if not store.features.part_copy:
        pytest.skip(f"{case.name} has no server-side part copy")
    require(case, "part_copy")
    require(case, "part_copy_if_match")
    size = store.features.min_part_size
    store.put("pc/source", os.urandom(size))
    upload_id = store.create_upload("pc/stale")
    with pytest.raises(PreconditionFailed):
        store.upload_part_copy("pc/stale", upload_id, 1, "pc/source", 0, size, if_match="0" * 32)
    store.abort_upload("pc/stale", upload_id)


# -- copy and delete ---------------------------------------------------------------------------


def test_copy(store: Store) -> None:
    data = os.urandom(5000)
    store.put("src/a", data)
    info = store.copy("src/a", "dst/b")
    assert info.size == len(data)
    assert store.get("dst/b") == data
    assert store.get("src/a") == data
    with pytest.raises(ObjectNotFound):
        store.copy("src/missing", "dst/c")


def test_delete(store: Store) -> None:
    store.put("d/one", b"1")
    store.put("d/two", b"2")
    store.delete("d/one")
    assert not store.exists("d/one")
    assert _all_keys(store) == ["d/two"]
    store.delete("d/one")  # deleting a missing key is fine
    store.delete("d/two")
    assert _all_keys(store) == []
    assert store.list_page(delimiter="/").prefixes == []  # no empty "directories" left behind


# -- faults ------------------------------------------------------------------------------------


def test_wrong_credentials(case: BackendCase) -> None:
    require(case, "credentials")
    assert case.bad_credentials_store is not None
    store = case.bad_credentials_store()
    with pytest.raises(InvalidCredentials) as info:
        store.list_page()
    assert isinstance(info.value, AccessDenied) and isinstance(info.value, PermissionError)
    assert "wrongSecret" not in str(info.value)
    with pytest.raises(AccessDenied):
        store.put("k", b"x")


def test_retry_on_injected_503(case: BackendCase, store: Store) -> None:
    require(case, "transient")
    assert case.inject_transient is not None
    store.put("k", b"value")
    case.inject_transient(2)
    assert store.get("k") == b"value"  # two 503s absorbed by retries
    case.inject_transient(2)
    store.put("k2", b"value2")
    assert store.get("k2") == b"value2"
    # the service-side copy, too: the faults land on the copy request, after the source's HEAD
    stat, calls = store.stat, []

    def stat_then_fault(key: str) -> Any:
        info = stat(key)
        if not calls:
            case.inject_transient(2)
        calls.append(key)
        return info

    store.stat = stat_then_fault  # type: ignore[method-assign]
    assert store.copy_from(store, "k2", "k3") is not None
    assert store.get("k3") == b"value2"


def test_retries_exhausted_raise_transient(case: BackendCase, store: Store) -> None:
    require(case, "transient")
    assert case.inject_transient is not None
    store.retry_policy = RetryPolicy(max_attempts=3, base_delay=0.01, max_delay=0.02, deadline=5)
    store.put("k", b"value")
    case.inject_transient(3)
    with pytest.raises(TransientError):
        store.get("k")
    assert store.get("k") == b"value"  # the service is fine again afterwards


def test_list_parts_after_uploads(case: BackendCase, store: Store) -> None:
    size = store.features.min_part_size
    upload_id = store.create_upload("resume/me")
    first = store.upload_part("resume/me", upload_id, 1, b"1" * size)
    third = store.upload_part("resume/me", upload_id, 3, b"3" * size)
    listed = store.list_parts("resume/me", upload_id)
    assert [(p.part_number, p.etag, p.size) for p in listed] == [
        (1, first.etag, size),
        (3, third.etag, size),
    ]
    store.abort_upload("resume/me", upload_id)


def test_get_object_returns_data_and_info(store: Store) -> None:
    data = os.urandom(10_000)
    written = store.put("g", data)
    body, info = store.get_object("g")
    assert body == data
    assert info.size == len(data) and info.etag == written.etag
    if info.checksum is not None:
        assert info.checksum.value == crc.compute(info.checksum.algorithm, data)
    with pytest.raises(ObjectNotFound):
        store.get_object("missing")


def test_copy_from_another_bucket(case: BackendCase) -> None:
    src, dst = case.make_store(), case.make_store()
    src.put("a/b", b"payload")
    copied = dst.copy_from(src, "a/b", "c/d")
    if copied is None:  # this backend moves bytes through the client instead
        assert case.name == "fsspec-memory", case.name
        return
    assert copied.size == 7 and dst.get("c/d") == b"payload"
