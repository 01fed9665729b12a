"""A lean data path for S3 GET, HEAD, PUT and ListObjectsV2: a small HTTP/1.1 client and signer.

A boto3 call spends about 4 ms of CPU per small GET+PUT pair in event hooks, parameter
validation, user-agent building and response parsing; signing and sending the same request
directly costs a small fraction of that. For a sync of millions of small objects, or a listing of
millions of keys, that CPU is the bottleneck, so :class:`~objstore.s3.S3Store` sends its object
GETs, HEADs, PUTs and list pages through here and keeps boto3 for everything else (multipart
control, copy, errors of unusual shape).

- :class:`SigV4Signer` is AWS Signature Version 4 for S3 written out with ``hmac``/``hashlib``:
  the signing key is derived once per day, not per request. Its output equals botocore's
  ``S3SigV4Auth`` byte for byte on the requests this module sends (the tests compare them on
  fixed inputs).
- Requests go through one keep-alive pool of :mod:`objstore.http1` for the endpoint (a quarter
  of the CPU of urllib3 + http.client per request).
- :func:`parse_list_v2` reads ListObjectsV2 XML with regular expressions instead of a tree.

Only path-style addressing against an explicit endpoint uses this path; the error responses are
translated by the same table as boto3's (:mod:`objstore.httperrors`).
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import logging
import re
import time
from collections.abc import Mapping
from email.utils import parsedate_to_datetime
from typing import NamedTuple
from urllib.parse import quote, unquote_plus, urlsplit

from .config import Profile
from .http1 import ConnectionPool, Response

log = logging.getLogger(__name__)

_ERROR_CODE = re.compile(rb"<Code>([^<]*)</Code>")
_ERROR_MESSAGE = re.compile(rb"<Message>([^<]*)</Message>")

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
# Headers botocore leaves out of a signature (botocore.auth.SIGNED_HEADERS_BLACKLIST).
_UNSIGNED_HEADERS = frozenset(
    {
        "baggage", "connection", "expect", "keep-alive", "proxy-authenticate",
        "proxy-authorization", "te", "traceparent", "tracestate", "trailer",
        "transfer-encoding", "upgrade", "user-agent", "x-amzn-trace-id",
    }
)  # fmt: skip


class HTTPError(Exception):
    """A non-2xx S3 response: status, error code and message (translated by the caller)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message


class SigV4Signer:
    """AWS Signature Version 4 for S3 requests, with the signing key cached per day.

    Thread-safe: the cached date and key are replaced together, as one tuple.

    Args:
        access_key, secret_key, token: the credentials (``token`` for temporary ones).
        region: the signing region.
        service: the signing service name.
    """

    def __init__(
        self,
        access_key: str,
        secret_key: str,
        region: str,
        *,
        token: str | None = None,
        service: str = "s3",
    ) -> None:
        self.access_key = access_key
        self.region = region
        self.service = service
        self.token = token or None
        self._secret = f"AWS4{secret_key}".encode()
        self._tail = f"/{region}/{service}/aws4_request"
        # (second, amz_date, credential scope, signing key), replaced when the second changes
        self._cached: tuple[int, str, str, bytes] = (-1, "", "", b"")

    def _keys(self, now: float | None) -> tuple[int, str, str, bytes]:
        second = int(time.time() if now is None else now)
        cached = self._cached
        if second == cached[0]:
            return cached
        amz_date = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(second))
        day = amz_date[:8]
        if cached[1][:8] == day:
            key = cached[3]
        else:
            key = hmac.digest(self._secret, day.encode(), "sha256")
            for part in (self.region, self.service, "aws4_request"):
                key = hmac.digest(key, part.encode(), "sha256")
        result = (second, amz_date, day + self._tail, key)
        if now is None:
            self._cached = result  # one tuple: readers see an old or a new entry, never a mix
        return result

    def sign(
        self,
        method: str,
        host: str,
        path: str,
        query: str,
        headers: Mapping[str, str],
        payload_hash: str,
        *,
        now: float | None = None,
    ) -> dict[str, str]:
        """The headers to send: ``headers`` plus the date, payload hash, token and signature.

        Args:
            method: the HTTP method.
            host: the ``Host`` header value the HTTP client sends (``host[:port]``).
            path: the request path, already URI-encoded (S3 does not normalize it further).
            query: the canonical query string (``k=v`` pairs, encoded, sorted, joined by ``&``).
            headers: the request's own headers.
            payload_hash: hex SHA-256 of the body (``EMPTY_SHA256`` for none).
            now: seconds since the epoch to sign at (tests); default the clock.
        """
        _, amz_date, scope, key = self._keys(now)
        out = dict(headers)
        for name in [n for n in out if n.lower() in _SIGNING_OWNED]:
            del out[name]
        out["X-Amz-Date"] = amz_date
        if self.token:
            out["X-Amz-Security-Token"] = self.token
        out["X-Amz-Content-SHA256"] = payload_hash
        signed: dict[str, str] = {"host": host}
        for name, value in out.items():
            lname = name.lower()
            if lname not in _UNSIGNED_HEADERS:
                signed[lname] = " ".join(value.split())
        names = sorted(signed)
        signed_names = ";".join(names)
        canonical = "\n".join(
            (
                method,
                path,
                query,
                "".join(f"{n}:{signed[n]}\n" for n in names),
                signed_names,
                payload_hash,
            )
        )
        string_to_sign = (
            f"AWS4-HMAC-SHA256\n{amz_date}\n{scope}\n"
            f"{hashlib.sha256(canonical.encode()).hexdigest()}"
        )
        signature = hmac.digest(key, string_to_sign.encode(), "sha256").hex()
        out["Authorization"] = (
            f"AWS4-HMAC-SHA256 Credential={self.access_key}/{scope}, "
            f"SignedHeaders={signed_names}, Signature={signature}"
        )
        return out


# Headers the signer sets itself: a caller's copy would be signed twice (botocore drops them).
_SIGNING_OWNED = frozenset(
    {"authorization", "x-amz-date", "x-amz-security-token", "x-amz-content-sha256"}
)


def canonical_query(query: Mapping[str, str]) -> str:
    """A query as SigV4 wants it, which is also a valid URL query: encoded, sorted pairs."""
    pairs = sorted((quote(k, safe="-_.~"), quote(v, safe="-_.~")) for k, v in query.items())
    return "&".join(f"{k}={v}" for k, v in pairs)


def host_header(endpoint: str) -> str:
    """The ``Host`` value an HTTP client sends for ``endpoint`` (lower case, no default port)."""
    parts = urlsplit(endpoint)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    default = {"http": 80, "https": 443}.get(parts.scheme)
    if parts.port is not None and parts.port != default:
        host = f"{host}:{parts.port}"
    return host


class S3DataPath:
    """Signed GET/HEAD/PUT requests to one bucket over one connection pool. Thread-safe."""

    def __init__(self, profile: Profile, bucket: str) -> None:
        self.endpoint = profile.endpoint.rstrip("/")
        self.bucket = bucket
        self.region = profile.region or "us-east-1"
        self.signer = SigV4Signer(
            profile.access_key_id,
            profile.secret_access_key.reveal(),
            self.region,
            token=profile.session_token.reveal() or None,
        )
        self.host = host_header(self.endpoint)
        self.unsigned_payload = self.endpoint.startswith("https://")
        parts = urlsplit(self.endpoint)
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self.base_path = f"{parts.path}/{quote(bucket, safe='~')}/"
        self.pool = ConnectionPool(
            self.endpoint,
            maxsize=profile.max_pool_connections,
            connect_timeout=profile.connect_timeout,
            read_timeout=profile.read_timeout,
        )

    def close(self) -> None:
        self.pool.close()

    def url(self, key: str, query: Mapping[str, str] | None = None) -> str:
        url = self.origin + self.base_path + quote(key, safe="/~")
        return f"{url}?{canonical_query(query)}" if query else url

    def request(
        self,
        method: str,
        key: str,
        headers: Mapping[str, str] | None = None,
        body: bytes | bytearray | memoryview = b"",
        query: Mapping[str, str] | None = None,
    ) -> Response:
        """Sign and send one request; returns a 2xx/206 response, raises HTTPError otherwise.

        Network failures propagate as :class:`~objstore.http1.NetworkError` for the caller to
        translate.
        """
        path = self.base_path + quote(key, safe="/~")
        qs = canonical_query(query) if query else ""
        if not body:
            payload = EMPTY_SHA256
        elif self.unsigned_payload:
            payload = "UNSIGNED-PAYLOAD"  # TLS protects the body (botocore does the same)
        else:
            payload = hashlib.sha256(body).hexdigest()
        signed = self.signer.sign(method, self.host, path, qs, headers or {}, payload)
        response = self.pool.request(
            method, f"{path}?{qs}" if qs else path, signed, body if body else None
        )
        if response.status >= 300:
            data = response.data or b""
            code = _ERROR_CODE.search(data)
            message = _ERROR_MESSAGE.search(data)
            raise HTTPError(
                response.status,
                code.group(1).decode() if code else "",
                message.group(1).decode() if message else "",
            )
        return response


# -- ListObjectsV2 ------------------------------------------------------------------------------


class ListV2(NamedTuple):
    """One ListObjectsV2 page as plain values (keys and prefixes decoded)."""

    contents: list[tuple[str, int, float, str]]  # (key, size, mtime, etag)
    prefixes: list[str]
    truncated: bool
    token: str | None


# The element order every server we know sends (AWS, rclone, moto, MinIO); pages in any other
# order, or with elements we do not expect inside these, take the per-field path.
_CONTENTS_FAST = re.compile(
    r"<Contents>\s*<Key>([^<]*)</Key>\s*<LastModified>([^<]*)</LastModified>\s*"
    r'<ETag>(?:&quot;|&#34;|")?([^<&"]*)(?:&quot;|&#34;|")?</ETag>\s*<Size>(\d+)</Size>'
)
_CONTENTS = re.compile(r"<Contents>(.*?)</Contents>", re.S)
_FIELD = {
    name: re.compile(rf"<{name}>([^<]*)</{name}>")
    for name in ("Key", "LastModified", "ETag", "Size")
}
_PREFIX = re.compile(r"<CommonPrefixes>\s*<Prefix>([^<]*)</Prefix>", re.S)
_ENTITY = re.compile(r"&(#[xX][0-9a-fA-F]+|#[0-9]+|amp|lt|gt|quot|apos);")
_NAMED = {"amp": "&", "lt": "<", "gt": ">", "quot": '"', "apos": "'"}


def _entity(match: re.Match[str]) -> str:
    ref = match.group(1)
    if ref[0] == "#":
        return chr(int(ref[2:], 16) if ref[1] in "xX" else int(ref[1:]))
    return _NAMED[ref]


def xml_text(raw: str) -> str:
    """XML character data with its entity and character references resolved."""
    return _ENTITY.sub(_entity, raw) if "&" in raw else raw


def _timestamp(stamp: str) -> float:
    if not stamp:
        return 0.0
    return datetime.datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


def parse_list_v2(data: bytes) -> ListV2:
    """A ListObjectsV2 response (requested with ``encoding-type=url``) as plain values.

    Regular expressions over the text cost a fraction of a tree parse per key. The result
    element's own fields (``IsTruncated``, ``NextContinuationToken``, ``EncodingType``) are read
    outside the Contents and CommonPrefixes elements, so a key cannot impersonate them (and a
    key cannot hold ``<`` unescaped).
    """
    xml = data.decode()
    head_end = xml.find("<Contents>")
    cp = xml.find("<CommonPrefixes>")
    if head_end < 0 or (0 <= cp < head_end):
        head_end = cp
    head = xml if head_end < 0 else xml[:head_end]
    tail_start = max(xml.rfind("</Contents>"), xml.rfind("</CommonPrefixes>"))
    tail = head + (xml[tail_start:] if tail_start >= 0 else "")

    def field(name: str) -> str | None:
        m = re.search(rf"<{name}>([^<]*)</{name}>", tail)
        return xml_text(m.group(1)) if m is not None else None

    encoded = (field("EncodingType") or "").lower() == "url"

    def decode(raw: str) -> str:
        text = xml_text(raw)
        return unquote_plus(text) if encoded and ("%" in text or "+" in text) else text

    stamps: dict[str, float] = {}  # a page's keys often share their timestamps
    contents: list[tuple[str, int, float, str]] = []
    count = xml.count("<Contents>")
    if count:
        fast = _CONTENTS_FAST.findall(xml)
        if len(fast) == count:
            # The ETag pattern takes only plain ETags (quotes stripped): one with any other
            # character reference makes the counts differ and the page take the path below.
            plain = not encoded and "&" in xml  # keys may hold references to resolve
            for key, stamp, etag, size in fast:
                mtime = stamps.get(stamp)
                if mtime is None:
                    mtime = stamps[stamp] = _timestamp(stamp)
                if plain:
                    key = xml_text(key)
                elif encoded and ("%" in key or "+" in key):
                    key = unquote_plus(key)
                contents.append((key, int(size), mtime, etag))
        else:
            for block in _CONTENTS.findall(xml):
                found = {name: rx.search(block) for name, rx in _FIELD.items()}
                text = {n: (m.group(1) if m is not None else "") for n, m in found.items()}
                contents.append(
                    (
                        decode(text["Key"]),
                        int(text["Size"] or 0),
                        _timestamp(text["LastModified"]),
                        xml_text(text["ETag"]).strip('"'),
                    )
                )
    prefixes = [decode(p) for p in _PREFIX.findall(xml)] if cp >= 0 else []
    return ListV2(
        contents,
        prefixes,
        (field("IsTruncated") or "").lower() == "true",
        field("NextContinuationToken"),
    )


def boto_fields(headers: Mapping[str, str]) -> dict[str, object]:
    """Response headers (lower-case names) in the shape boto3's HeadObject/GetObject/PutObject
    results have."""
    fields: dict[str, object] = {
        "ETag": headers.get("etag", ""),
        "Metadata": {k[11:]: v for k, v in headers.items() if k.startswith("x-amz-meta-")},
    }
    if "content-length" in headers:
        fields["ContentLength"] = int(headers["content-length"])
    if headers.get("last-modified"):
        fields["LastModified"] = parsedate_to_datetime(headers["last-modified"])
    if headers.get("x-amz-checksum-crc64nvme"):
        fields["ChecksumCRC64NVME"] = headers["x-amz-checksum-crc64nvme"]
        fields["ChecksumType"] = headers.get("x-amz-checksum-type", "FULL_OBJECT")
    return fields
