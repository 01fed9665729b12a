"""A read-only, listing-only S3-protocol server over a fixed in-memory key list (benchmarks).

``rclone serve s3`` spends CPU in proportion to a directory's size on every list page (about
0.8 s per page of a 100,000-key directory), so on a small machine it, not latency, bounds every
lister run against it. This server answers ListObjectsV2 (and V1, which rclone's "Other"
provider uses) from a sorted key list with :mod:`bisect` and pre-rendered per-key XML fragments:
a page costs well under a millisecond, so what a benchmark measures is the client.

**It does not check signatures or credentials** (any Authorization is accepted) and it serves no
object data: every key is a zero-length object (``HEAD``/``GET`` of a key answer its size, ETag
and time, an empty body), enough for a file system to list and stat a tree over it. It exists
for listing and metadata benchmarks only, never as a conformance target.

Supported: ``GET /`` (ListBuckets), ``HEAD /bucket``, ``GET /bucket?location``,
``GET /bucket?list-type=2`` with ``prefix``, ``delimiter``, ``start-after``,
``continuation-token``, ``max-keys`` (at most 1,000), ``encoding-type=url``, and
``GET /bucket`` (ListObjects V1) with ``prefix``, ``delimiter``, ``marker``, ``max-keys``,
``encoding-type``; ``HEAD``/``GET /bucket/key``. Keys compare as Python strings, i.e. by code point, which is UTF-8 byte order.
Anything else answers 501 NotImplemented. Run it in a thread (``start()``/``stop()`` or a
``with`` block) or in a process of its own (``python -m tests.servers.static_s3``) so its work
does not share the client's GIL.
"""

from __future__ import annotations

import argparse
import base64
import bisect
import logging
import sys
import threading
import time
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Self
from urllib.parse import parse_qsl, quote, unquote, urlsplit
from xml.sax.saxutils import escape

log = logging.getLogger(__name__)

_XMLNS = "http://s3.amazonaws.com/doc/2006-03-01/"
_STAMP = "2026-01-01T00:00:00.000Z"
_ETAG = "&quot;d41d8cd98f00b204e9800998ecf8427e&quot;"
_MAX_KEYS = 1000


def _url(text: str) -> str:
    return quote(text, safe="/")


def _successor(prefix: str) -> str:
    """The least string above every string that starts with ``prefix`` (non-empty)."""
    return prefix[:-1] + chr(ord(prefix[-1]) + 1)


class Bucket:
    """A sorted key list with each key's ``<Contents>`` element pre-rendered, plain and encoded."""

    def __init__(self, name: str, keys: Iterable[str], size: int = 0) -> None:
        self.name = name
        self.keys = sorted(set(keys))
        tail = f"</Key><LastModified>{_STAMP}</LastModified><ETag>{_ETAG}</ETag><Size>{size}</Size><StorageClass>STANDARD</StorageClass></Contents>"  # fmt: skip
        self.plain = [f"<Contents><Key>{escape(k)}{tail}" for k in self.keys]
        self.encoded = [f"<Contents><Key>{_url(k)}{tail}" for k in self.keys]

    def page(
        self, prefix: str, delimiter: str, after: str, start: str | None, max_keys: int
    ) -> tuple[list[str], list[str], str | None, str]:
        """(content indices as fragments, common prefixes, next position, last entry returned).

        Entries are the keys ``> after`` (or ``>= start``, a position a token saved) under
        ``prefix``; a key with ``delimiter`` past the prefix rolls up into its common prefix.
        """
        keys = self.keys
        lo = bisect.bisect_left(keys, prefix)
        if start is not None:
            lo = max(lo, bisect.bisect_left(keys, start))
        elif after:
            lo = max(lo, bisect.bisect_right(keys, after))
        hi = bisect.bisect_left(keys, _successor(prefix)) if prefix else len(keys)
        if not delimiter:
            stop = min(hi, lo + max_keys)
            last = keys[stop - 1] if stop > lo else ""
            return list(range(lo, stop)), [], keys[stop] if stop < hi else None, last  # type: ignore[return-value]
        indices: list[int] = []
        prefixes: list[str] = []
        n = len(prefix)
        pos = lo
        last = ""
        while pos < hi and len(indices) + len(prefixes) < max_keys:
            key = keys[pos]
            cut = key.find(delimiter, n)
            if cut < 0:
                indices.append(pos)
                last = key
                pos += 1
            else:
                common = key[: cut + len(delimiter)]
                if start is not None or common > after:  # a marker may name a common prefix
                    prefixes.append(common)
                    last = common
                pos = bisect.bisect_left(keys, _successor(common), pos)
        return indices, prefixes, keys[pos] if pos < hi else None, last  # type: ignore[return-value]


def _token(position: str) -> str:
    return base64.urlsafe_b64encode(position.encode()).decode()


def _position(token: str) -> str:
    return base64.urlsafe_b64decode(token.encode()).decode()


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes
    server: _HTTPServer

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.log_requests:
            log.info("%s %s", self.command, self.path)

    def _send(self, status: int, body: bytes = b"", content_type: str = "application/xml") -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("x-amz-request-id", "static")
        self.end_headers()
        if body and self.command != "HEAD":
            self.wfile.write(body)

    def _error(self, status: int, code: str, message: str) -> None:
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
                f"<Message>{escape(message)}</Message></Error>").encode()  # fmt: skip
        self._send(status, body)

    def _drain(self) -> None:
        length = int(self.headers.get("Content-Length") or 0)
        if length:
            self.rfile.read(length)

    def _object(self, bucket: Bucket, key: str) -> None:
        """A key's zero-length object (HEAD or GET), or 404."""
        self.server.heads += 1
        at = bisect.bisect_left(bucket.keys, key)
        if at == len(bucket.keys) or bucket.keys[at] != key:
            if self.command == "HEAD":
                self._send(404)
            else:
                self._error(404, "NoSuchKey", f"no such key {key}")
            return
        self.send_response(200)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", "0")
        self.send_header("ETag", '"d41d8cd98f00b204e9800998ecf8427e"')  # of no bytes
        self.send_header("Last-Modified", "Thu, 01 Jan 2026 00:00:00 GMT")
        self.send_header("x-amz-request-id", "static")
        self.end_headers()

    def do_HEAD(self) -> None:
        self._drain()
        parts = urlsplit(self.path)
        name, _, key = unquote(parts.path).lstrip("/").partition("/")
        bucket = self.server.buckets.get(name)
        if bucket is None:
            self._send(404)
        elif key:
            self._object(bucket, key)
        else:
            self._send(200)

    def do_GET(self) -> None:
        self._drain()
        parts = urlsplit(self.path)
        name, _, key = unquote(parts.path).lstrip("/").partition("/")
        query = dict(parse_qsl(parts.query, keep_blank_values=True))
        if not name:
            self._list_buckets()
            return
        bucket = self.server.buckets.get(name)
        if bucket is None:
            self._error(404, "NoSuchBucket", f"bucket {name} does not exist")
        elif key:
            self._object(bucket, key)
        elif "location" in query:
            self._send(200, f'<?xml version="1.0" encoding="UTF-8"?>\n<LocationConstraint xmlns="{_XMLNS}"></LocationConstraint>'.encode())  # fmt: skip
        elif query.get("list-type") == "2":
            self._list(bucket, query, v2=True)
        elif not set(query) - {"prefix", "delimiter", "marker", "max-keys", "encoding-type"}:
            self._list(bucket, query, v2=False)
        else:
            self._error(501, "NotImplemented", f"unsupported request {self.path}")

    def do_PUT(self) -> None:
        self._drain()
        self._error(501, "NotImplemented", "read-only listing server")

    do_POST = do_DELETE = do_PUT

    def _list_buckets(self) -> None:
        items = "".join(f"<Bucket><Name>{escape(n)}</Name><CreationDate>{_STAMP}</CreationDate></Bucket>" for n in self.server.buckets)  # fmt: skip
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<ListAllMyBucketsResult xmlns="{_XMLNS}">'
                f"<Owner><ID>static</ID><DisplayName>static</DisplayName></Owner><Buckets>{items}"
                "</Buckets></ListAllMyBucketsResult>")  # fmt: skip
        self._send(200, body.encode())

    def _list(self, bucket: Bucket, query: dict[str, str], *, v2: bool) -> None:
        try:
            max_keys = min(_MAX_KEYS, max(0, int(query.get("max-keys", _MAX_KEYS))))
        except ValueError:
            self._error(400, "InvalidArgument", "max-keys must be an integer")
            return
        prefix = query.get("prefix", "")
        delimiter = query.get("delimiter", "")
        encoded = query.get("encoding-type", "").lower() == "url"
        start = None
        if v2:
            after = query.get("start-after", "")
            token = query.get("continuation-token")
            if token is not None:
                try:
                    start = _position(token)
                except (ValueError, UnicodeDecodeError):
                    self._error(400, "InvalidArgument", "bad continuation token")
                    return
        else:
            after = query.get("marker", "")
        indices, prefixes, nxt, last = (
            bucket.page(prefix, delimiter, after, start, max_keys)
            if max_keys
            else ([], [], None, "")
        )
        enc = _url if encoded else escape
        frags = bucket.encoded if encoded else bucket.plain
        out = [f'<?xml version="1.0" encoding="UTF-8"?>\n<ListBucketResult xmlns="{_XMLNS}">'
               f"<Name>{escape(bucket.name)}</Name><Prefix>{enc(prefix)}</Prefix>"
               f"<MaxKeys>{max_keys}</MaxKeys>"]  # fmt: skip
        if delimiter:
            out.append(f"<Delimiter>{enc(delimiter)}</Delimiter>")
        if encoded:
            out.append("<EncodingType>url</EncodingType>")
        truncated = nxt is not None
        out.append(f"<IsTruncated>{'true' if truncated else 'false'}</IsTruncated>")
        if v2:
            out.append(f"<KeyCount>{len(indices) + len(prefixes)}</KeyCount>")
            if "continuation-token" in query:
                out.append(f"<ContinuationToken>{escape(query['continuation-token'])}</ContinuationToken>")  # fmt: skip
            if after:
                out.append(f"<StartAfter>{enc(after)}</StartAfter>")
            if truncated:
                out.append(f"<NextContinuationToken>{_token(nxt)}</NextContinuationToken>")  # type: ignore[arg-type]
        else:
            out.append(f"<Marker>{enc(after)}</Marker>")
            if truncated and delimiter:
                out.append(f"<NextMarker>{enc(last)}</NextMarker>")
        out.extend(frags[i] for i in indices)
        out.extend(f"<CommonPrefixes><Prefix>{enc(p)}</Prefix></CommonPrefixes>" for p in prefixes)
        out.append("</ListBucketResult>")
        self.server.pages += 1
        self._send(200, "".join(out).encode())


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # 64 lister threads connect at once: a backlog of 5 drops SYNs
    buckets: dict[str, Bucket]
    log_requests: bool
    pages: int
    heads: int


class StaticS3Server:
    """The listing server in a background thread on 127.0.0.1 (see the module docstring).

    Args:
        buckets: bucket name -> its keys.
        port: 0 for a free one.
        log_requests: log every request line at INFO (to see what a client sends).
    """

    access_key_id = "AKIASTATICLISTING001"
    secret_access_key = "static-listing-server-checks-no-signatures"

    def __init__(
        self, buckets: dict[str, Iterable[str]], *, port: int = 0, log_requests: bool = False
    ) -> None:
        self._server = _HTTPServer(("127.0.0.1", port), _Handler)
        self._server.buckets = {name: Bucket(name, keys) for name, keys in buckets.items()}
        self._server.log_requests = log_requests
        self._server.pages = 0
        self._server.heads = 0
        self.port = self._server.server_address[1]
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self._thread: threading.Thread | None = None

    @property
    def pages(self) -> int:
        """List pages served so far."""
        return self._server.pages

    @property
    def heads(self) -> int:
        """Object requests (HEAD or GET of a key) served so far."""
        return self._server.heads

    def profile(self, **overrides: Any) -> dict[str, Any]:
        """An objstore profile mapping for this server (path-style, any credentials work)."""
        return {
            "endpoint": self.endpoint,
            "access_key_id": self.access_key_id,
            "secret_access_key": self.secret_access_key,
            "region": "us-east-1",
            "addressing_style": "path",
            **overrides,
        }

    def start(self) -> Self:
        self._thread = threading.Thread(
            target=self._server.serve_forever, name="static-s3", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> int:
    """Serve keys read from a file (one a line) as one bucket until killed; print the port."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("bucket")
    parser.add_argument("keys_file", help="file of keys, one a line (UTF-8)")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--log-requests", action="store_true")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(message)s")
    with open(args.keys_file, encoding="utf-8") as f:
        keys = [line.rstrip("\n") for line in f if line.strip()]
    with StaticS3Server({args.bucket: keys}, port=args.port, log_requests=args.log_requests) as s:
        print(s.port, flush=True)
        while True:
            time.sleep(3600)


if __name__ == "__main__":
    sys.exit(main())
