"""An in-memory server that speaks the Aliyun OSS HTTP protocol, for tests, benchmarks and the demo.

This is a protocol-level test server, **not** a real OSS: there is no persistence, no ACLs, no
versioning, and only the operations our OSS backend uses are implemented. What it does implement
follows the wire format of the real service closely enough for the official ``oss2`` SDK to run
unmodified against it:

* V1 signatures (``Authorization: OSS <AccessKeyId>:<signature>``) are verified exactly as OSS
  computes them, so a client signing bug shows up here rather than in production;
* errors are OSS XML bodies (or the base64 ``x-oss-err`` header for HEAD), so ``oss2`` raises its
  real exception classes (``NoSuchKey``, ``SignatureDoesNotMatch``, ``ServerError`` for 5xx...);
* objects carry an ETag, ``x-oss-hash-crc64ecma`` (CRC-64/XZ, which ``oss2`` checks on every
  upload), Last-Modified, Content-Type and ``x-oss-meta-*`` user metadata.

``oss2`` addresses an IP endpoint path-style (``/bucket/key``)::

    with OSSServer() as server:
        server.create_bucket("demo")
        auth = oss2.Auth(server.access_key_id, server.access_key_secret)
        bucket = oss2.Bucket(auth, server.endpoint, "demo")
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import hmac
import logging
import re
import socket
import threading
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, replace
from email.utils import formatdate
from typing import Any
from urllib.parse import quote, unquote
from xml.etree import ElementTree as ET

import anycrc
from aiohttp import web

log = logging.getLogger(__name__)

# What Aliyun calls CRC-64/ECMA-182 is CRC-64/XZ: check("123456789") = 0x995DC9BBDF1939FA.
_CRC64 = anycrc.Model("CRC64-XZ")
MIN_PART_SIZE = 100 * 1024  # OSS rejects non-last parts below this with EntityTooSmall
MAX_BODY = 1 << 30  # aiohttp's default request limit (1 MiB) would reject ordinary part uploads
_OWNER_ID = "1234567890123456"

# Query parameters that go into the V1 string to sign (the list oss2 2.19 signs). All others
# (prefix, max-keys, list-type, encoding-type...) are left out of the signature.
_SUBRESOURCE_WORDS = """
    accessPoint accessPointPolicy acl append asyncFetch bucketArchiveDirectRead bucketInfo
    callback callback-var cname comp continuation-token cors delete encryption endTime group
    httpsConfig inventory inventoryId lifecycle link live location logging metaQuery objectInfo
    objectMeta partNumber policy position publicAccessBlock qos qosInfo qosRequester
    redundancyTransition referer regionList replication replicationLocation replicationProgress
    requesterQosInfo requestPayment resourceGroup resourcePool resourcePoolBuckets
    resourcePoolInfo response-cache-control response-content-disposition
    response-content-encoding response-content-language response-content-type response-expires
    restore security-token sequential startTime stat status style styleName symlink tagging
    transferAcceleration uploadId uploads versionId versioning versions vod website worm
    wormExtend wormId x-oss-ac-forward-allow x-oss-ac-source-ip x-oss-ac-subnet-mask
    x-oss-ac-vpc-id x-oss-access-point-name x-oss-async-process x-oss-process
    x-oss-redundancy-transition-taskid x-oss-request-payer x-oss-target-redundancy-type
    x-oss-traffic-limit x-oss-write-get-object-response
"""
_SIGNED_SUBRESOURCES = frozenset(_SUBRESOURCE_WORDS.split())

# Error code -> (HTTP status, default message), as the real service returns them.
_ERRORS: dict[str, tuple[int, str]] = {
    "AccessDenied": (403, "AccessDenied: the request carries no Authorization header."),
    "InvalidAccessKeyId": (403, "The OSS Access Key Id you provided does not exist in our records."),
    "SignatureDoesNotMatch": (403, "The request signature we calculated does not match the signature you provided."),
    "NoSuchBucket": (404, "The specified bucket does not exist."),
    "NoSuchKey": (404, "The specified key does not exist."),
    "NoSuchUpload": (404, "The specified upload does not exist."),
    "InvalidArgument": (400, "Invalid argument."),
    "InvalidObjectName": (400, "The object name is too long."),
    "InvalidDigest": (400, "The Content-MD5 you specified was invalid."),
    "MalformedXML": (400, "The XML you provided was not well-formed."),
    "InvalidPart": (400, "One or more of the specified parts could not be found or the specified entity tag might not have matched the part's entity tag."),
    "InvalidPartOrder": (400, "The list of parts was not in ascending order."),
    "EntityTooSmall": (400, "Your proposed upload smaller than the minimum allowed size."),
    "FileAlreadyExists": (409, "The object you specified already exists and can not be overwritten."),
    "PreconditionFailed": (412, "At least one of the pre-conditions you specified did not hold."),
    "InvalidRange": (416, "The requested range cannot be satisfied."),
    "InternalError": (500, "We encountered an internal error. Please try again."),
    "NotImplemented": (501, "This operation is not implemented by the OSS test server."),
}  # fmt: skip


class OSSError(Exception):
    """An OSS error response; ``details`` become extra elements of the XML body."""

    def __init__(self, code: str, message: str = "", status: int = 0, **details: str) -> None:
        default_status, default_message = _ERRORS.get(code, (500, code))
        self.code, self.status = code, status or default_status
        self.message, self.details = message or default_message, details
        super().__init__(f"{self.status} {code}: {self.message}")


@dataclass
class _Object:
    data: bytes  # immutable, so a copy or a listing can share it
    etag: str  # unquoted upper-case hex, as OSS returns it
    crc: int
    content_type: str
    meta: dict[str, str]  # lower-case "x-oss-meta-*" header -> value
    last_modified: float
    object_type: str = "Normal"


@dataclass
class _Upload:
    key: str
    upload_id: str
    content_type: str
    meta: dict[str, str]
    initiated: float
    parts: dict[int, _Object] = field(default_factory=dict)  # a part is an object without meta


@dataclass
class _Bucket:
    name: str
    created: float
    objects: dict[str, _Object] = field(default_factory=dict)
    uploads: dict[str, _Upload] = field(default_factory=dict)


@dataclass
class _Call:
    """One authenticated request, as the operation handlers see it."""

    request: web.Request
    bucket: _Bucket
    key: str
    body: bytes

    def param(self, name: str, default: str = "") -> str:
        return self.request.query.get(name, default)

    def header(self, name: str, default: str = "") -> str:
        return self.request.headers.get(name, default)

    def encode(self, name: str) -> str:
        # With encoding-type=url (oss2's default) names in result XML are percent-encoded; oss2
        # decodes them with urllib's unquote, so "+" must become %2B and a space %20.
        return quote(name, safe="") if self.param("encoding-type") == "url" else name

    def encoding_type(self) -> tuple[str, str] | None:
        return ("EncodingType", "url") if self.param("encoding-type") == "url" else None


Handler = Callable[[_Call], Awaitable[web.Response]]


def _utf8(s: str) -> bytes:
    return s.encode("utf-8", "surrogateescape")


def _iso8601(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(ts))


def _node(tag: str, *children: ET.Element | tuple[str, Any] | None) -> ET.Element:
    """An XML element from child elements and ``(tag, text)`` pairs; None children are skipped."""
    el = ET.Element(tag)
    for child in children:
        if isinstance(child, tuple):
            ET.SubElement(el, child[0]).text = str(child[1])
        elif child is not None:
            el.append(child)
    return el


def _xml_response(root: ET.Element, headers: dict[str, str] | None = None) -> web.Response:
    body = ET.tostring(root, encoding="utf-8", xml_declaration=True)
    return web.Response(body=body, headers={"Content-Type": "application/xml", **(headers or {})})


def _digest(data: bytes) -> tuple[bytes, int]:
    return hashlib.md5(data).digest(), _CRC64.calc(data)


def _user_meta(request: web.Request) -> dict[str, str]:
    return {k.lower(): v for k, v in request.headers.items() if k.lower().startswith("x-oss-meta-")}


def _owner() -> ET.Element:
    return _node("Owner", ("ID", _OWNER_ID), ("DisplayName", _OWNER_ID))


def _parse_range(header: str, size: int, standard: bool) -> tuple[int, int] | None:
    """Resolve a Range header to inclusive ``(first, last)``, or None to send the whole object.

    Real OSS ignores a malformed or out-of-bounds range (200, whole object) unless the request
    opts into RFC behaviour with ``x-oss-range-behavior: standard``: then an end past the object
    is clamped and a start past it is 416. Only the first of several ranges is honoured.
    """
    m = re.fullmatch(r"bytes=(\d*)-(\d*)", header.split(",")[0].strip())
    if not m or m[1] == m[2] == "" or (m[1] and m[2] and int(m[2]) < int(m[1])):
        return None
    if m[1]:
        first, last = int(m[1]), int(m[2]) if m[2] else size - 1
    else:  # suffix range "bytes=-N": the last N bytes
        first, last = size - int(m[2]), size - 1
    if first >= size or last < 0 or (not m[1] and m[2] == "0"):
        if standard:
            raise OSSError("InvalidRange")
        return None
    if first < 0 or last >= size:
        if not standard:
            return None
        first, last = max(first, 0), min(last, size - 1)
    return first, last


def _encode_token(marker: str) -> str:
    # Opaque like the real service's tokens, so a client that passes one as start-after fails here.
    return base64.urlsafe_b64encode(_utf8(marker)).decode("ascii")


def _decode_token(token: str) -> str:
    try:
        return base64.urlsafe_b64decode(token.encode("ascii")).decode("utf-8")
    except (ValueError, binascii.Error) as e:
        raise OSSError("InvalidArgument", "The continuation token is not valid.") from e


def _position(upload: _Upload) -> tuple[bytes, str]:
    """Where an upload sorts in ListMultipartUploads: by key bytes, then upload id."""
    return _utf8(upload.key), upload.upload_id


def _parse_xml(body: bytes) -> ET.Element:
    try:
        return ET.fromstring(body)
    except ET.ParseError as e:
        raise OSSError("MalformedXML") from e


def _bounded_int(call: _Call, name: str, default: int, low: int = 1, high: int = 1000) -> int:
    value = call.param(name) or str(default)  # oss2 sends empty values for unset parameters
    if not value.isdigit() or not low <= int(value) <= high:
        raise OSSError("InvalidArgument", f"{name} must be an integer in [{low}, {high}].")
    return int(value)


class OSSServer:
    """An OSS-protocol server on a background thread; see the module docstring."""

    def __init__(
        self,
        access_key_id: str = "LTAI5tTestAccessKey01",
        access_key_secret: str = "testSecretKeyForOssServer000000",
        host: str = "127.0.0.1",
        port: int = 0,
    ) -> None:
        self.access_key_id = access_key_id
        self.access_key_secret = access_key_secret
        self.host, self.port = host, port
        self.endpoint = ""
        self.request_count = 0
        # The lock guards what the caller's thread touches as well: the bucket table, the error
        # queue and the counter. Objects and uploads are only touched on the server's loop.
        self._lock = threading.Lock()
        self._buckets: dict[str, _Bucket] = {}
        self._injected: deque[tuple[int, str]] = deque()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        # (method, object-level?, query parameter that selects it, handler); first match wins.
        self._routes: list[tuple[str, bool, str | None, Handler]] = [
            ("GET", False, "bucketInfo", self._get_bucket_info),
            ("GET", False, "uploads", self._list_uploads),
            ("GET", False, None, self._list_objects),
            ("POST", False, "delete", self._delete_objects),
            ("PUT", True, "uploadId", self._upload_part),
            ("PUT", True, None, self._put_object),
            ("GET", True, "uploadId", self._list_parts),
            ("GET", True, None, self._get_object),
            ("HEAD", True, None, self._get_object),
            ("DELETE", True, "uploadId", self._abort_upload),
            ("DELETE", True, None, self._delete_object),
            ("POST", True, "uploads", self._init_upload),
            ("POST", True, "uploadId", self._complete_upload),
        ]

    # -- public API ----------------------------------------------------------------------------

    def start(self) -> OSSServer:
        if self._thread is not None:
            raise RuntimeError("OSSServer already started")
        # Bind here rather than in the thread, so the real port is known when start() returns.
        sock = socket.create_server((self.host, self.port))
        self.port = sock.getsockname()[1]
        self.endpoint = f"http://{self.host}:{self.port}"
        self._loop = asyncio.new_event_loop()
        ready = threading.Event()
        failure: list[BaseException] = []
        args = (self._loop, sock, ready, failure)
        self._thread = threading.Thread(target=self._serve, args=args, daemon=True)
        self._thread.start()
        if not ready.wait(timeout=30) or failure:
            self.stop()
            raise RuntimeError("OSSServer failed to start") from (failure[0] if failure else None)
        log.info("OSS test server listening on %s", self.endpoint)
        return self

    def stop(self) -> None:
        if self._thread is None or self._loop is None:
            return
        if self._loop.is_running():
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=30)
        self._thread = None

    def __enter__(self) -> OSSServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def create_bucket(self, name: str) -> None:
        with self._lock:
            self._buckets.setdefault(name, _Bucket(name, time.time()))

    def inject_errors(
        self, count: int, status: int = 503, code: str = "ServiceUnavailable"
    ) -> None:
        """Make the next ``count`` correctly signed requests fail with ``status`` and ``code``."""
        with self._lock:
            self._injected.extend([(status, code)] * count)

    # -- plumbing ------------------------------------------------------------------------------

    def _serve(
        self,
        loop: asyncio.AbstractEventLoop,
        sock: socket.socket,
        ready: threading.Event,
        failure: list[BaseException],
    ) -> None:
        asyncio.set_event_loop(loop)
        app = web.Application(client_max_size=MAX_BODY)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        # A short shutdown timeout: tests stop servers while clients hold keep-alive connections.
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        try:
            loop.run_until_complete(runner.setup())
            loop.run_until_complete(web.SockSite(runner, sock).start())
        except BaseException as e:
            failure.append(e)
            sock.close()
            loop.close()
            ready.set()
            return
        ready.set()
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(runner.cleanup())
            loop.close()

    async def _handle(self, request: web.Request) -> web.Response:
        request_id = uuid.uuid4().hex[:24].upper()
        with self._lock:
            self.request_count += 1
        try:
            response = await self._dispatch(request)
        except OSSError as e:
            response = self._error_response(request, e, request_id)
        except Exception:
            log.exception("OSS test server failed on %s %s", request.method, request.path)
            response = self._error_response(request, OSSError("InternalError"), request_id)
        response.headers["x-oss-request-id"] = request_id
        response.headers["Server"] = "AliyunOSS"
        return response

    async def _dispatch(self, request: web.Request) -> web.Response:
        # Split the raw path ourselves: oss2 quotes keys with safe='' ("/" is sent as %2F), and
        # aiohttp's decoded path could no longer tell the bucket/key boundary.
        bucket_name, _, quoted_key = request.raw_path.partition("?")[0][1:].partition("/")
        bucket_name, key = unquote(bucket_name), unquote(quoted_key)
        self._authenticate(request, bucket_name, key)
        with self._lock:
            injected = self._injected.popleft() if self._injected else None
            bucket = self._buckets.get(bucket_name)
        if injected:
            raise OSSError(injected[1], "Injected by OSSServer.inject_errors", injected[0])
        if not bucket_name:
            raise OSSError("NotImplemented", "Service-level operations are not supported.")
        if request.method == "PUT" and not key:
            self.create_bucket(bucket_name)
            return web.Response()
        if bucket is None:
            raise OSSError("NoSuchBucket", BucketName=bucket_name)
        if len(_utf8(key)) > 1023:
            raise OSSError("InvalidObjectName")
        for method, object_level, selector, handler in self._routes:
            selected = selector is None or selector in request.query
            if method == request.method and object_level == bool(key) and selected:
                body = await request.read() if method in ("PUT", "POST") else b""
                return await handler(_Call(request, bucket, key, body))
        raise OSSError("NotImplemented", f"{request.method} {request.rel_url} is not supported.")

    def _authenticate(self, request: web.Request, bucket_name: str, key: str) -> None:
        scheme, _, credential = request.headers.get("Authorization", "").partition(" ")
        access_key_id, _, signature = credential.rpartition(":")
        if not scheme:
            raise OSSError("AccessDenied")
        if scheme != "OSS" or not access_key_id:
            raise OSSError("InvalidArgument", "Only V1 'OSS <id>:<signature>' auth is supported.")
        if access_key_id != self.access_key_id:
            raise OSSError("InvalidAccessKeyId", OSSAccessKeyId=access_key_id)
        to_sign = self._string_to_sign(request, bucket_name, key)
        mac = hmac.new(self.access_key_secret.encode(), _utf8(to_sign), hashlib.sha1)
        if not hmac.compare_digest(base64.b64encode(mac.digest()), _utf8(signature)):
            # Real OSS returns the string it signed too; it makes client bugs easy to find.
            raise OSSError("SignatureDoesNotMatch", StringToSign=to_sign)

    @staticmethod
    def _string_to_sign(request: web.Request, bucket_name: str, key: str) -> str:
        """The V1 string to sign, as in oss2's ``ProviderAuth.__get_bytes_to_sign``."""
        h = request.headers
        oss_headers = sorted((k.lower(), v) for k, v in h.items() if k.lower().startswith("x-oss-"))
        signed = sorted((k, v) for k, v in request.query.items() if k in _SIGNED_SUBRESOURCES)
        query = "&".join(f"{k}={v}" if v else k for k, v in signed)
        resource = f"/{bucket_name}/{key}" if bucket_name else "/"
        resource += f"?{query}" if query else ""
        date = h.get("x-oss-date") or h.get("Date") or ""
        canonical_headers = "".join(f"{k}:{v}\n" for k, v in oss_headers)
        content_md5, content_type = h.get("Content-MD5") or "", h.get("Content-Type") or ""
        fields = [request.method, content_md5, content_type, date, canonical_headers + resource]
        return "\n".join(fields)

    @staticmethod
    def _error_response(request: web.Request, error: OSSError, request_id: str) -> web.Response:
        root = _node(
            "Error",
            ("Code", error.code),
            ("Message", error.message),
            ("RequestId", request_id),
            ("HostId", request.host),
            *error.details.items(),
        )
        response = _xml_response(root)
        response.set_status(error.status)
        if request.method == "HEAD":
            # A HEAD response has no body, so OSS sends the error XML in this header instead.
            assert isinstance(response.body, bytes)
            response.headers["x-oss-err"] = base64.b64encode(response.body).decode()
        return response

    # -- objects -------------------------------------------------------------------------------

    @staticmethod
    def _find(bucket: _Bucket, key: str) -> _Object:
        obj = bucket.objects.get(key)
        if obj is None:
            raise OSSError("NoSuchKey", Key=key)
        return obj

    @staticmethod
    async def _new_object(call: _Call) -> _Object:
        """Hash an uploaded body into an object, off the event loop: 100 MiB takes a while."""
        md5, crc = await asyncio.get_running_loop().run_in_executor(None, _digest, call.body)
        content_md5 = call.header("Content-MD5")
        if content_md5 and content_md5 != base64.b64encode(md5).decode():
            raise OSSError("InvalidDigest")
        content_type = call.header("Content-Type", "application/octet-stream")
        meta = _user_meta(call.request)
        return _Object(call.body, md5.hex().upper(), crc, content_type, meta, time.time())

    @staticmethod
    def _stored(obj: _Object, *, copy: str = "") -> web.Response:
        """The reply to a request that stored ``obj``: its ETag and CRC (what oss2 checks);
        ``copy``: the result element of a copy (``CopyObjectResult``, ``CopyPartResult``)."""
        headers = {"ETag": f'"{obj.etag}"', "x-oss-hash-crc64ecma": str(obj.crc)}
        if not copy:
            return web.Response(headers=headers)
        result = _node(
            copy,
            ("ETag", f'"{obj.etag}"'),
            ("LastModified", _iso8601(obj.last_modified)),
        )
        return _xml_response(result, headers)

    async def _put_object(self, call: _Call) -> web.Response:
        if "x-oss-copy-source" in call.request.headers:
            return self._copy_object(call)
        obj = await self._new_object(call)
        # Checked after hashing: another request may have stored the key while this one waited.
        forbid_overwrite = call.header("x-oss-forbid-overwrite").lower() == "true"
        if forbid_overwrite and call.key in call.bucket.objects:
            raise OSSError("FileAlreadyExists")
        call.bucket.objects[call.key] = obj
        return self._stored(obj)

    def _copy_source(self, call: _Call) -> _Object:
        """The object ``x-oss-copy-source`` names, its ``-if-match`` condition checked."""
        source = call.header("x-oss-copy-source").partition("?")[0]  # drop any ?versionId=
        src_bucket_name, _, src_key = (unquote(s) for s in source.lstrip("/").partition("/"))
        with self._lock:
            src_bucket = self._buckets.get(src_bucket_name)
        if src_bucket is None:
            raise OSSError("NoSuchBucket", BucketName=src_bucket_name)
        obj = self._find(src_bucket, src_key)
        if_match = call.header("x-oss-copy-source-if-match")
        if if_match and if_match.strip('"').upper() != obj.etag:
            raise OSSError("PreconditionFailed")
        return obj

    def _copy_object(self, call: _Call) -> web.Response:
        obj = replace(self._copy_source(call), last_modified=time.time())
        if call.header("x-oss-metadata-directive", "COPY").upper() == "REPLACE":
            obj.content_type = call.header("Content-Type", "application/octet-stream")
            obj.meta = _user_meta(call.request)
        call.bucket.objects[call.key] = obj
        return self._stored(obj, copy="CopyObjectResult")

    async def _get_object(self, call: _Call) -> web.Response:
        obj = self._find(call.bucket, call.key)
        headers = {
            "Content-Type": obj.content_type,
            "ETag": f'"{obj.etag}"',
            "Last-Modified": formatdate(obj.last_modified, usegmt=True),
            "x-oss-object-type": obj.object_type,
            "x-oss-hash-crc64ecma": str(obj.crc),  # of the whole object, even for a range
            "x-oss-storage-class": "Standard",
            "Accept-Ranges": "bytes",
            **obj.meta,
        }
        if_match, if_none_match = call.header("If-Match"), call.header("If-None-Match")
        if if_match and if_match.strip('"').upper() != obj.etag:
            raise OSSError("PreconditionFailed")
        if if_none_match and if_none_match.strip('"').upper() == obj.etag:
            return web.Response(status=304, headers={"ETag": headers["ETag"]})
        standard = call.header("x-oss-range-behavior").lower() == "standard"
        byte_range = _parse_range(call.header("Range"), len(obj.data), standard)
        if byte_range is None:
            # HEAD passes the body too: aiohttp then sends its Content-Length and drops the body.
            return web.Response(body=obj.data, headers=headers)
        first, last = byte_range
        headers["Content-Range"] = f"bytes {first}-{last}/{len(obj.data)}"
        body = memoryview(obj.data)[first : last + 1]  # a view: no copy of a large object
        return web.Response(status=206, body=body, headers=headers)

    async def _delete_object(self, call: _Call) -> web.Response:
        call.bucket.objects.pop(call.key, None)  # deleting a missing key succeeds, as on OSS
        return web.Response(status=204)

    async def _delete_objects(self, call: _Call) -> web.Response:
        request = _parse_xml(call.body)
        keys = [node.text or "" for node in request.iterfind("Object/Key")]
        for key in keys:
            call.bucket.objects.pop(key, None)
        quiet = (request.findtext("Quiet") or "").lower() == "true"
        deleted = [] if quiet else [_node("Deleted", ("Key", call.encode(k))) for k in keys]
        return _xml_response(_node("DeleteResult", call.encoding_type(), *deleted))

    # -- listing -------------------------------------------------------------------------------

    @staticmethod
    def _scan(
        bucket: _Bucket, prefix: str, delimiter: str, marker: str, limit: int
    ) -> tuple[list[str], list[str], bool]:
        """Walk keys in UTF-8 byte order after ``marker``, rolling them up into common prefixes.

        Returns (keys, common prefixes, truncated). ``marker`` is a key or the common prefix that
        ended the previous page; the keys under that prefix are skipped along with it.
        """
        keys: list[str] = []
        prefixes: list[str] = []
        after = _utf8(marker)
        for key in sorted((k for k in bucket.objects if k.startswith(prefix)), key=_utf8):
            if _utf8(key) <= after:
                continue
            cut = key.find(delimiter, len(prefix)) if delimiter else -1
            common = key[: cut + len(delimiter)] if cut >= 0 else None
            if common is not None and common in (marker, prefixes[-1] if prefixes else None):
                continue
            if len(keys) + len(prefixes) >= limit:
                return keys, prefixes, True
            (keys if common is None else prefixes).append(common or key)
        return keys, prefixes, False

    async def _list_objects(self, call: _Call) -> web.Response:
        """ListObjectsV2 (``list-type=2``) or the original ListObjects (``marker``)."""
        v2, enc = call.param("list-type") == "2", call.encode
        prefix, delimiter, token = call.param("prefix"), call.param("delimiter"), ""
        limit = _bounded_int(call, "max-keys", 100)
        if v2:
            token = call.param("continuation-token")
            marker = _decode_token(token) if token else call.param("start-after")
        else:
            marker = call.param("marker")
        keys, prefixes, truncated = self._scan(call.bucket, prefix, delimiter, marker, limit)
        last = max(keys + prefixes, key=_utf8, default="")  # where the next page resumes
        with_owner = not v2 or call.param("fetch-owner") == "true"
        entries = [self._list_entry(call, key, with_owner) for key in keys]
        entries += [_node("CommonPrefixes", ("Prefix", enc(p))) for p in prefixes]
        if v2:
            start_after = call.param("start-after")
            fields = [
                ("ContinuationToken", enc(token)) if token else None,
                ("StartAfter", enc(start_after)) if start_after else None,
                ("NextContinuationToken", enc(_encode_token(last))) if truncated else None,
                ("KeyCount", len(keys) + len(prefixes)),
            ]
        else:
            fields = [("Marker", enc(marker)), ("NextMarker", enc(last)) if truncated else None]
        root = _node(
            "ListBucketResult",
            ("Name", call.bucket.name),
            ("Prefix", enc(prefix)),
            ("MaxKeys", limit),
            ("Delimiter", enc(delimiter)),
            call.encoding_type(),
            ("IsTruncated", str(truncated).lower()),
            *fields,
            *entries,
        )
        return _xml_response(root)

    @staticmethod
    def _list_entry(call: _Call, key: str, with_owner: bool) -> ET.Element:
        obj = call.bucket.objects[key]
        return _node(
            "Contents",
            ("Key", call.encode(key)),
            ("LastModified", _iso8601(obj.last_modified)),
            ("ETag", f'"{obj.etag}"'),
            ("Type", obj.object_type),
            ("Size", len(obj.data)),
            ("StorageClass", "Standard"),
            _owner() if with_owner else None,
        )

    async def _get_bucket_info(self, call: _Call) -> web.Response:
        host, acl = call.request.host, _node("AccessControlList", ("Grant", "private"))
        info = _node(
            "Bucket",
            ("Name", call.bucket.name),
            ("CreationDate", _iso8601(call.bucket.created)),
            ("StorageClass", "Standard"),
            ("ExtranetEndpoint", host),
            ("IntranetEndpoint", host),
            ("Location", "oss-test-local"),
            _owner(),
            acl,
        )
        return _xml_response(_node("BucketInfo", info))

    # -- multipart upload ----------------------------------------------------------------------

    @staticmethod
    def _upload(call: _Call) -> _Upload:
        upload_id = call.param("uploadId")
        upload = call.bucket.uploads.get(upload_id)
        if upload is None or upload.key != call.key:
            raise OSSError("NoSuchUpload", UploadId=upload_id)
        return upload

    async def _init_upload(self, call: _Call) -> web.Response:
        upload_id = uuid.uuid4().hex.upper()
        content_type = call.header("Content-Type", "application/octet-stream")
        meta = _user_meta(call.request)
        call.bucket.uploads[upload_id] = _Upload(
            call.key, upload_id, content_type, meta, time.time()
        )
        result = _node(
            "InitiateMultipartUploadResult",
            call.encoding_type(),
            ("Bucket", call.bucket.name),
            ("Key", call.encode(call.key)),
            ("UploadId", upload_id),
        )
        return _xml_response(result)

    async def _upload_part(self, call: _Call) -> web.Response:
        upload = self._upload(call)
        number = _bounded_int(call, "partNumber", 0, high=10000)
        if "x-oss-copy-source" in call.request.headers:  # UploadPartCopy
            source = self._copy_source(call)
            span = _parse_range(call.header("x-oss-copy-source-range"), len(source.data), True)
            data = source.data if span is None else source.data[span[0] : span[1] + 1]
            md5, crc = await asyncio.get_running_loop().run_in_executor(None, _digest, data)
            part = _Object(data, md5.hex().upper(), crc, source.content_type, {}, time.time())
            upload.parts[number] = part
            return self._stored(part, copy="CopyPartResult")
        part = upload.parts[number] = await self._new_object(call)
        return self._stored(part)

    def _completed_parts(self, call: _Call, upload: _Upload) -> list[_Object]:
        """The parts a CompleteMultipartUpload names, validated as OSS does."""
        if call.header("x-oss-complete-all").lower() == "yes":
            wanted = [(n, upload.parts[n].etag) for n in sorted(upload.parts)]
        else:
            nodes = _parse_xml(call.body).iterfind("Part")
            try:
                wanted = [
                    (int(p.findtext("PartNumber", "")), p.findtext("ETag", "")) for p in nodes
                ]
            except ValueError as e:
                raise OSSError("MalformedXML", "A PartNumber is not an integer.") from e
        numbers = [n for n, _ in wanted]
        if not wanted:
            raise OSSError("MalformedXML", "The request names no part.")
        if numbers != sorted(set(numbers)):
            raise OSSError("InvalidPartOrder")
        for number, etag in wanted:
            part = upload.parts.get(number)
            if part is None or part.etag != etag.strip('"').upper():
                raise OSSError("InvalidPart", PartNumber=str(number), ETag=etag)
        parts = [upload.parts[n] for n in numbers]
        for number, part in zip(numbers[:-1], parts[:-1], strict=True):
            if len(part.data) < MIN_PART_SIZE:
                raise OSSError("EntityTooSmall", PartNumber=str(number))
        return parts

    async def _complete_upload(self, call: _Call) -> web.Response:
        upload = self._upload(call)
        parts = self._completed_parts(call, upload)
        crc = 0
        for part in parts:  # combining the parts' CRCs saves re-reading the whole object
            crc = _CRC64.combine(crc, part.crc, len(part.data))
        md5s = b"".join(bytes.fromhex(p.etag) for p in parts)
        etag = f"{hashlib.md5(md5s).hexdigest().upper()}-{len(parts)}"  # OSS's multipart ETag
        data = b"".join(p.data for p in parts)
        obj = _Object(data, etag, crc, upload.content_type, upload.meta, time.time(), "Multipart")
        del call.bucket.uploads[upload.upload_id]  # frees the parts: one copy of the data remains
        call.bucket.objects[call.key] = obj
        result = _node(
            "CompleteMultipartUploadResult",
            call.encoding_type(),
            ("Location", f"{self.endpoint}/{call.bucket.name}/{quote(call.key)}"),
            ("Bucket", call.bucket.name),
            ("Key", call.encode(call.key)),
            ("ETag", f'"{etag}"'),
        )
        return _xml_response(result, {"ETag": f'"{etag}"', "x-oss-hash-crc64ecma": str(crc)})

    async def _abort_upload(self, call: _Call) -> web.Response:
        del call.bucket.uploads[self._upload(call).upload_id]
        return web.Response(status=204)

    async def _list_parts(self, call: _Call) -> web.Response:
        upload = self._upload(call)
        marker = _bounded_int(call, "part-number-marker", 0, low=0, high=10000)
        limit = _bounded_int(call, "max-parts", 1000)
        numbers = [n for n in sorted(upload.parts) if n > marker]
        page = [(n, upload.parts[n]) for n in numbers[:limit]]
        parts = [
            _node(
                "Part",
                ("PartNumber", n),
                ("LastModified", _iso8601(p.last_modified)),
                ("ETag", f'"{p.etag}"'),
                ("HashCrc64ecma", p.crc),
                ("Size", len(p.data)),
            )
            for n, p in page
        ]
        result = _node(
            "ListPartsResult",
            ("Bucket", call.bucket.name),
            ("Key", call.key),
            ("UploadId", upload.upload_id),
            ("PartNumberMarker", marker),
            ("NextPartNumberMarker", page[-1][0] if page else marker),
            ("MaxParts", limit),
            ("IsTruncated", str(len(numbers) > limit).lower()),
            *parts,
        )
        return _xml_response(result)

    async def _list_uploads(self, call: _Call) -> web.Response:
        prefix, key_marker = call.param("prefix"), call.param("key-marker")
        after = (_utf8(key_marker), call.param("upload-id-marker"))
        limit = _bounded_int(call, "max-uploads", 1000)
        uploads = call.bucket.uploads.values()
        pending = [u for u in uploads if u.key.startswith(prefix) and _position(u) > after]
        pending.sort(key=_position)
        page, truncated = pending[:limit], len(pending) > limit
        entries = [
            _node(
                "Upload",
                ("Key", call.encode(u.key)),
                ("UploadId", u.upload_id),
                ("Initiated", _iso8601(u.initiated)),
            )
            for u in page
        ]
        result = _node(
            "ListMultipartUploadsResult",
            call.encoding_type(),
            ("Bucket", call.bucket.name),
            ("Prefix", call.encode(prefix)),
            ("KeyMarker", call.encode(key_marker)),
            ("UploadIdMarker", call.param("upload-id-marker")),
            ("NextKeyMarker", call.encode(page[-1].key) if truncated else ""),
            ("NextUploadIdMarker", page[-1].upload_id if truncated else ""),
            ("MaxUploads", limit),
            ("IsTruncated", str(truncated).lower()),
            *entries,
        )
        return _xml_response(result)
