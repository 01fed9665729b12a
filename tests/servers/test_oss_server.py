"""The OSS test server, driven by the real ``oss2`` SDK so that its wire format is oss2's.

oss2 signs every request, checks ``x-oss-hash-crc64ecma`` on uploads and parses the result XML, so
each passing call here is also a check on the server's signature verification, CRCs and XML.
"""

from __future__ import annotations

import hashlib
import random
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import crcmod
import oss2
import pytest
from oss2.models import PartInfo

from tests.servers.oss_server import MIN_PART_SIZE, OSSServer

pytestmark = [pytest.mark.timeout(60), pytest.mark.integration]

# CRC-64/ECMA-182 as Aliyun defines it, computed independently of the server (which uses anycrc).
_CRC64 = crcmod.Crc(0x142F0E1EBA9EA3693, initCrc=0, rev=True, xorOut=0xFFFFFFFFFFFFFFFF)


def crc64(data: bytes) -> int:
    return int(_CRC64.new(data).crcValue)


def md5_hex(data: bytes) -> str:
    return hashlib.md5(data).hexdigest().upper()


def payload(size: int, seed: int = 0) -> bytes:
    return random.Random(seed).randbytes(size)


def drained(result: Any) -> Any:
    """Read the XML body that oss2 leaves unread after copy_object and complete_multipart_upload.

    Unread, it keeps the connection out of the pool until garbage collection (a ResourceWarning).
    """
    result.resp.read()
    return result


@pytest.fixture(scope="module")
def server() -> Iterator[OSSServer]:
    with OSSServer() as srv:
        yield srv


# One connection pool for every Bucket here, closed at the end: a pool per Bucket would leave its
# sockets to the garbage collector (a ResourceWarning).
_SESSION = oss2.Session()


@pytest.fixture(scope="module", autouse=True)
def _close_session() -> Iterator[None]:
    yield
    _SESSION.session.close()


def make_bucket(server: OSSServer, name: str = "", auth: object | None = None) -> oss2.Bucket:
    auth = auth or oss2.Auth(server.access_key_id, server.access_key_secret)
    name = name or f"test-{uuid.uuid4().hex[:12]}"
    return oss2.Bucket(auth, server.endpoint, name, session=_SESSION, connect_timeout=5)


@pytest.fixture
def bucket(server: OSSServer) -> oss2.Bucket:
    b = make_bucket(server)
    server.create_bucket(b.bucket_name)
    return b


def test_crc_reference_and_server_agree(bucket: oss2.Bucket) -> None:
    assert crc64(b"123456789") == 0x995DC9BBDF1939FA  # the catalogue check value
    assert bucket.put_object("check", b"123456789").crc == 0x995DC9BBDF1939FA
    assert bucket.put_object("empty", b"").crc == 0


def test_put_get_head_roundtrip(bucket: oss2.Bucket, tmp_path: Path) -> None:
    data, key = payload(300_000), "dir/object.bin"
    before = time.time()
    headers = {"Content-Type": "application/x-test", "x-oss-meta-owner": "alice"}
    put = bucket.put_object(key, data, headers=headers)
    assert put.etag == md5_hex(data)
    assert put.crc == crc64(data)

    got = bucket.get_object(key)
    assert got.read() == data
    assert got.status == 200
    assert got.server_crc == crc64(data)
    assert got.content_type == "application/x-test"
    assert got.headers["x-oss-meta-owner"] == "alice"

    head = bucket.head_object(key)
    assert head.content_length == len(data)
    assert head.etag == md5_hex(data)
    assert head.object_type == "Normal"
    assert head.server_crc == crc64(data)
    assert head.headers["x-oss-meta-owner"] == "alice"
    assert before - 2 <= head.last_modified <= time.time() + 2

    # get_object_to_file makes oss2 compare its own CRC of the download with the server's header.
    bucket.get_object_to_file(key, str(tmp_path / "out"))
    assert (tmp_path / "out").read_bytes() == data


def test_ranged_get(bucket: oss2.Bucket) -> None:
    data = payload(1000)
    bucket.put_object("r", data)
    standard = {"x-oss-range-behavior": "standard"}

    part = bucket.get_object("r", byte_range=(10, 19))
    assert (part.status, part.read(), part.content_range) == (206, data[10:20], "bytes 10-19/1000")
    assert part.server_crc == crc64(data)  # the whole object's CRC, as on OSS
    assert bucket.get_object("r", byte_range=(990, None)).read() == data[990:]
    assert bucket.get_object("r", byte_range=(None, 5)).read() == data[-5:]

    # Out-of-bounds ranges: OSS ignores them (200, whole object) unless asked for RFC behaviour.
    for byte_range in [(1000, None), (500, 2000), (1000, 2000)]:
        whole = bucket.get_object("r", byte_range=byte_range)
        assert (whole.status, whole.read()) == (200, data)
    clamped = bucket.get_object("r", byte_range=(500, 2000), headers=standard)
    assert (clamped.status, clamped.read()) == (206, data[500:])
    expect_error(416, "InvalidRange", bucket.get_object, "r", (1000, 2000), standard)


# About 250 keys: plain, nested, unicode, and characters that need URL encoding in XML.
LISTING_KEYS = (
    [f"dir/{i:03d}" for i in range(100)]
    + [f"dir/sub{i % 3}/{i}" for i in range(60)]
    + [f"日本/ファイル{i}" for i in range(30)]
    + [f"é/{i}" for i in range(30)]
    + [f"top-{i}" for i in range(20)]
    + ["a b+c%d&e=f?g#h", "with space/x", "~tilde", "emoji-😀", "slash-end/", "x//y"]
)
BYTE_ORDER = sorted(LISTING_KEYS, key=lambda k: k.encode())


@pytest.fixture(scope="module")
def listing_bucket(server: OSSServer) -> oss2.Bucket:
    b = make_bucket(server)
    server.create_bucket(b.bucket_name)
    for key in LISTING_KEYS:
        b.put_object(key, key.encode())
    return b


def list_all(bucket: oss2.Bucket, max_keys: int, **kwargs: str) -> tuple[list[str], list[str]]:
    """Page through ListObjectsV2 by hand, checking the page invariants on the way."""
    keys: list[str] = []
    prefixes: list[str] = []
    token = ""
    while True:
        page = bucket.list_objects_v2(continuation_token=token, max_keys=max_keys, **kwargs)
        assert len(page.object_list) + len(page.prefix_list) <= max_keys
        keys += [o.key for o in page.object_list]
        prefixes += page.prefix_list
        if not page.is_truncated:
            return keys, prefixes
        assert len(page.object_list) + len(page.prefix_list) == max_keys
        token = page.next_continuation_token


def test_list_v2_paginates_in_utf8_byte_order(listing_bucket: oss2.Bucket) -> None:
    keys, prefixes = list_all(listing_bucket, max_keys=37)
    assert keys == BYTE_ORDER
    assert prefixes == []
    assert [o.key for o in oss2.ObjectIteratorV2(listing_bucket)] == BYTE_ORDER
    page = listing_bucket.list_objects_v2(max_keys=1)
    assert page.object_list[0].size == len(BYTE_ORDER[0].encode())
    assert page.object_list[0].etag == md5_hex(BYTE_ORDER[0].encode())


def test_list_v2_delimiter_rolls_up_prefixes_across_pages(listing_bucket: oss2.Bucket) -> None:
    # Tiny pages make page boundaries fall inside a common prefix; it must not repeat.
    keys, prefixes = list_all(listing_bucket, max_keys=2, delimiter="/")
    assert keys == [k for k in BYTE_ORDER if "/" not in k]
    expected = sorted({k.split("/")[0] + "/" for k in LISTING_KEYS if "/" in k}, key=str.encode)
    assert prefixes == expected

    keys, prefixes = list_all(listing_bucket, max_keys=1000, prefix="dir/", delimiter="/")
    assert keys == [f"dir/{i:03d}" for i in range(100)]
    assert prefixes == ["dir/sub0/", "dir/sub1/", "dir/sub2/"]


def test_list_v2_prefix_and_start_after(listing_bucket: oss2.Bucket) -> None:
    keys, _ = list_all(listing_bucket, max_keys=7, prefix="日本/")
    assert keys == sorted((f"日本/ファイル{i}" for i in range(30)), key=str.encode)
    page = listing_bucket.list_objects_v2(prefix="dir/", start_after="dir/050", max_keys=5)
    assert [o.key for o in page.object_list] == [f"dir/{i:03d}" for i in range(51, 56)]
    assert page.is_truncated
    page = listing_bucket.list_objects_v2(start_after=BYTE_ORDER[-2])
    assert ([o.key for o in page.object_list], page.is_truncated) == ([BYTE_ORDER[-1]], False)


def test_list_v1_marker_pagination(listing_bucket: oss2.Bucket) -> None:
    assert [o.key for o in oss2.ObjectIterator(listing_bucket, max_keys=41)] == BYTE_ORDER
    found = [o.key for o in oss2.ObjectIterator(listing_bucket, delimiter="/", max_keys=2)]
    top_level = {k for k in LISTING_KEYS if "/" not in k} | {
        k.split("/")[0] + "/" for k in LISTING_KEYS if "/" in k
    }
    assert found == sorted(top_level, key=str.encode)


def upload_parts(
    bucket: oss2.Bucket, key: str, upload_id: str, chunks: list[bytes]
) -> list[PartInfo]:
    parts = []
    for number, chunk in enumerate(chunks, start=1):
        result = bucket.upload_part(key, upload_id, number, chunk)
        assert (result.etag, result.crc) == (md5_hex(chunk), crc64(chunk))
        parts.append(PartInfo(number, result.etag, size=len(chunk), part_crc=result.crc))
    return parts


def test_multipart_upload(bucket: oss2.Bucket) -> None:
    sizes = [MIN_PART_SIZE + 7, 2 * MIN_PART_SIZE, 1234]
    data = payload(sum(sizes), seed=1)
    chunks = [data[: sizes[0]], data[sizes[0] : sizes[0] + sizes[1]], data[-sizes[2] :]]
    key = "multi/対象.bin"
    upload_id = bucket.init_multipart_upload(key, headers={"x-oss-meta-kind": "mp"}).upload_id
    parts = upload_parts(bucket, key, upload_id, chunks)
    assert [u.upload_id for u in bucket.list_multipart_uploads(prefix="multi/").upload_list] == [
        upload_id
    ]
    assert [(p.part_number, p.size) for p in bucket.list_parts(key, upload_id).parts] == [
        (1, sizes[0]),
        (2, sizes[1]),
        (3, sizes[2]),
    ]

    # With part sizes and CRCs in the PartInfos, oss2 also checks the result CRC itself.
    result = drained(bucket.complete_multipart_upload(key, upload_id, parts))
    expected_etag = md5_hex(b"".join(bytes.fromhex(md5_hex(c)) for c in chunks)) + "-3"
    assert (result.crc, result.etag) == (crc64(data), expected_etag)

    head = bucket.head_object(key)
    assert (head.object_type, head.etag, head.content_length) == (
        "Multipart",
        expected_etag,
        len(data),
    )
    assert head.headers["x-oss-meta-kind"] == "mp"
    assert bucket.get_object(key).read() == data
    assert bucket.list_multipart_uploads(prefix="multi/").upload_list == []
    with pytest.raises(oss2.exceptions.NoSuchUpload):
        bucket.abort_multipart_upload(key, upload_id)


def test_large_multipart_upload(bucket: oss2.Bucket) -> None:
    part_size = 8 << 20
    data = payload(3 * part_size + 5, seed=2)
    chunks = [data[i : i + part_size] for i in range(0, len(data), part_size)]
    upload_id = bucket.init_multipart_upload("large").upload_id
    parts = upload_parts(bucket, "large", upload_id, chunks)
    assert drained(bucket.complete_multipart_upload("large", upload_id, parts)).crc == crc64(data)
    assert (
        bucket.get_object("large", byte_range=(part_size - 3, part_size + 2)).read()
        == data[part_size - 3 : part_size + 3]
    )
    assert bucket.get_object("large").read() == data
    assert bucket.head_object("large").content_length == len(data)  # HEAD: length, no body


def expect_error(
    status: int, code: str, call: Callable[..., object], *args: object
) -> oss2.exceptions.OssError:
    """Run ``call(*args)`` and check that oss2 raised a ServerError with this status and code."""
    with pytest.raises(oss2.exceptions.ServerError) as exc:
        call(*args)
    assert (exc.value.status, exc.value.code) == (status, code)
    return exc.value


def test_complete_rejects_invalid_parts(bucket: oss2.Bucket) -> None:
    upload_id = bucket.init_multipart_upload("k").upload_id
    parts = upload_parts(bucket, "k", upload_id, [b"tiny", b"last"])
    expect_error(400, "EntityTooSmall", bucket.complete_multipart_upload, "k", upload_id, parts)
    wrong_etag = [PartInfo(1, md5_hex(b"other"))]
    expect_error(400, "InvalidPart", bucket.complete_multipart_upload, "k", upload_id, wrong_etag)
    missing = [PartInfo(7, parts[0].etag)]
    expect_error(400, "InvalidPart", bucket.complete_multipart_upload, "k", upload_id, missing)
    expect_error(404, "NoSuchUpload", bucket.complete_multipart_upload, "other", upload_id, parts)
    # A tiny *last* part is fine: completing with just part 2 works.
    result = drained(bucket.complete_multipart_upload("k", upload_id, [PartInfo(2, parts[1].etag)]))
    assert result.crc == crc64(b"last")
    assert bucket.get_object("k").read() == b"last"
    with pytest.raises(oss2.exceptions.NoSuchUpload):
        bucket.upload_part("k", upload_id, 3, b"late")


def test_abort_multipart_upload(bucket: oss2.Bucket) -> None:
    upload_id = bucket.init_multipart_upload("aborted").upload_id
    upload_parts(bucket, "aborted", upload_id, [b"data"])
    bucket.abort_multipart_upload("aborted", upload_id)
    with pytest.raises(oss2.exceptions.NoSuchUpload):
        bucket.list_parts("aborted", upload_id)
    assert not bucket.object_exists("aborted")


def test_copy_object(server: OSSServer, bucket: oss2.Bucket) -> None:
    data = payload(5000, seed=3)
    bucket.put_object("源/src", data, headers={"x-oss-meta-a": "1", "Content-Type": "text/x-src"})
    copied = drained(bucket.copy_object(bucket.bucket_name, "源/src", "copy"))
    assert (copied.crc, copied.etag) == (crc64(data), md5_hex(data))
    head = bucket.head_object("copy")
    assert (head.headers["x-oss-meta-a"], head.content_type, head.server_crc) == (
        "1",
        "text/x-src",
        crc64(data),
    )
    assert bucket.get_object("copy").read() == data

    replace = {
        "x-oss-metadata-directive": "REPLACE",
        "x-oss-meta-b": "2",
        "Content-Type": "text/x-new",
    }
    drained(bucket.copy_object(bucket.bucket_name, "源/src", "replaced", headers=replace))
    head = bucket.head_object("replaced")
    assert "x-oss-meta-a" not in head.headers
    assert (head.headers["x-oss-meta-b"], head.content_type) == ("2", "text/x-new")

    other = make_bucket(server)
    server.create_bucket(other.bucket_name)
    assert drained(other.copy_object(bucket.bucket_name, "源/src", "x")).crc == crc64(data)
    assert other.get_object("x").read() == data
    with pytest.raises(oss2.exceptions.NoSuchKey):
        bucket.copy_object(bucket.bucket_name, "missing", "y")


def test_delete_object(bucket: oss2.Bucket) -> None:
    bucket.put_object("gone", b"x")
    assert bucket.delete_object("gone").status == 204
    with pytest.raises(oss2.exceptions.NoSuchKey):
        bucket.get_object("gone")
    assert not bucket.object_exists("gone")
    assert bucket.delete_object("never-existed").status == 204  # as on OSS
    for key in ["b1", "b2", "keep"]:
        bucket.put_object(key, key)
    assert sorted(bucket.batch_delete_objects(["b1", "b2", "b3"]).deleted_keys) == [
        "b1",
        "b2",
        "b3",
    ]
    assert [o.key for o in bucket.list_objects_v2().object_list] == ["keep"]


@pytest.mark.parametrize(
    "key", ["a b+c", "100%/x", "a%2Fb", "x//y/", "?#&=;", "ü/日本/😀", "~!*'()"]
)
def test_keys_needing_escapes_roundtrip(bucket: oss2.Bucket, key: str) -> None:
    bucket.put_object(key, key.encode())
    assert bucket.get_object(key).read() == key.encode()
    assert [o.key for o in bucket.list_objects_v2().object_list] == [key]
    assert bucket.head_object(key).content_length == len(key.encode())


def test_missing_key_and_bucket(server: OSSServer, bucket: oss2.Bucket) -> None:
    with pytest.raises(oss2.exceptions.NoSuchKey):
        bucket.get_object("nope")
    with pytest.raises(oss2.exceptions.NoSuchKey):
        bucket.head_object("nope")  # HEAD errors travel in the x-oss-err header
    nowhere = make_bucket(server, name="never-created")
    for call, args in [
        (nowhere.get_object, ("k",)),
        (nowhere.head_object, ("k",)),
        (nowhere.put_object, ("k", b"v")),
        (nowhere.list_objects_v2, ()),
        (nowhere.init_multipart_upload, ("k",)),
    ]:
        with pytest.raises(oss2.exceptions.NoSuchBucket):
            call(*args)


def test_authentication(server: OSSServer, bucket: oss2.Bucket) -> None:
    bucket.put_object("k", b"v")
    wrong_secret = make_bucket(
        server, bucket.bucket_name, oss2.Auth(server.access_key_id, "not-the-secret")
    )
    with pytest.raises(oss2.exceptions.SignatureDoesNotMatch) as exc:
        wrong_secret.get_object("k")
    assert exc.value.status == 403
    assert exc.value.details["StringToSign"].endswith(f"/{bucket.bucket_name}/k")

    wrong_id = make_bucket(
        server, bucket.bucket_name, oss2.Auth("LTAI5tSomeoneElse", server.access_key_secret)
    )
    expect_error(403, "InvalidAccessKeyId", wrong_id.put_object, "k", b"overwritten")

    anonymous = make_bucket(server, bucket.bucket_name, oss2.AnonymousAuth())
    with pytest.raises(oss2.exceptions.AccessDenied):
        anonymous.get_object("k")
    assert bucket.get_object("k").read() == b"v"  # none of the rejected requests took effect


def test_injected_errors(server: OSSServer, bucket: oss2.Bucket) -> None:
    bucket.put_object("k", b"v")
    before = server.request_count
    server.inject_errors(2)
    for _ in range(2):
        error = expect_error(503, "ServiceUnavailable", bucket.get_object, "k")
        assert type(error) is oss2.exceptions.ServerError  # oss2 does not retry a 503 by itself
    assert bucket.get_object("k").read() == b"v"
    assert server.request_count == before + 3

    server.inject_errors(1, status=500, code="InternalError")
    anonymous = make_bucket(server, bucket.bucket_name, oss2.AnonymousAuth())
    with pytest.raises(oss2.exceptions.AccessDenied):
        anonymous.get_object("k")  # unauthenticated requests do not consume injected errors
    expect_error(500, "InternalError", bucket.head_object, "k")
    assert bucket.head_object("k").content_length == 1


def test_servers_get_distinct_ports_and_stop() -> None:
    with OSSServer() as one, OSSServer() as two:
        assert one.endpoint != two.endpoint
        two.create_bucket("bkt")
        b = make_bucket(two, "bkt")
        b.put_object("k", b"v")
        with pytest.raises(oss2.exceptions.NoSuchBucket):
            make_bucket(one, "bkt").get_object("k")  # servers share no state
    with pytest.raises(oss2.exceptions.RequestError):
        b.get_object("k")
