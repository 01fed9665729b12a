"""The data paths' HTTP/1.1 client against a scripted raw-socket server on 127.0.0.1.

The server reads real requests off the socket and answers with exactly the bytes a test gives it,
so framing (Content-Length, chunked, until close), keep-alive reuse, a server that closes an idle
connection, truncation, garbage and timeouts are all exercised on the wire.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import pytest

from objstore.http1 import ConnectionPool, NetworkError


@dataclass
class Seen:
    method: str
    target: str
    headers: dict[str, str]
    body: bytes
    connection: int  # which accepted connection carried it


Reply = tuple[bytes, bool]  # raw response bytes, close the connection after sending them


@dataclass
class ScriptedServer:
    answer: Callable[[Seen, int], Reply]  # (request, its index on the connection) -> reply
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0

    def __post_init__(self) -> None:
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.port = self.sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(
                target=self._handle, args=(conn, self.connections), daemon=True
            ).start()

    def _handle(self, conn: socket.socket, number: int) -> None:
        reader = conn.makefile("rb")
        try:
            for index in range(1000):
                line = reader.readline()
                if not line:
                    return
                method, target, _ = line.decode().split(" ", 2)
                headers = {}
                while (header := reader.readline()) not in (b"\r\n", b""):
                    name, _, value = header.decode().partition(":")
                    headers[name.strip().lower()] = value.strip()
                body = reader.read(int(headers.get("content-length", 0)))
                seen = Seen(method, target, headers, body, number)
                self.seen.append(seen)
                raw, close = self.answer(seen, index)
                if raw:
                    conn.sendall(raw)
                if close:
                    return
        finally:
            reader.close()
            conn.close()

    def close(self) -> None:
        self.sock.close()


@pytest.fixture
def serve() -> Iterator[Callable[[Callable[[Seen, int], Reply]], ScriptedServer]]:
    servers: list[ScriptedServer] = []

    def start(answer: Callable[[Seen, int], Reply]) -> ScriptedServer:
        servers.append(ScriptedServer(answer))
        return servers[-1]

    yield start
    for server in servers:
        server.close()


def ok(body: bytes, *headers: str) -> bytes:
    extra = "".join(f"{h}\r\n" for h in headers)
    return f"HTTP/1.1 200 OK\r\nContent-Length: {len(body)}\r\n{extra}\r\n".encode() + body


def test_keep_alive_reuses_one_connection_and_sends_what_it_was_given(serve) -> None:
    server = serve(lambda seen, i: (ok(seen.body or seen.target.encode(), 'ETag: "e1"'), False))
    pool = ConnectionPool(server.url)
    first = pool.request("GET", "/b/k?x=1", {"x-amz-date": "now"})
    assert first.status == 200 and first.data == b"/b/k?x=1"
    assert first.headers["etag"] == '"e1"' and first.header("ETag") == '"e1"'
    second = pool.request("PUT", "/b/k", {}, b"payload")
    assert second.data == b"payload"
    empty_put = pool.request("PUT", "/b/empty", {})
    assert empty_put.data == b"/b/empty"
    assert server.connections == 1
    assert [s.method for s in server.seen] == ["GET", "PUT", "PUT"]
    assert server.seen[0].headers["host"] == f"127.0.0.1:{server.port}"
    assert server.seen[0].headers["x-amz-date"] == "now"
    assert server.seen[1].headers["content-length"] == "7"
    assert server.seen[2].headers["content-length"] == "0"  # a PUT always says its length
    big = bytes(range(256)) * 4096  # 1 MiB: head and body sent separately
    assert pool.request("PUT", "/b/big", {}, big).data == big
    pool.close()


def test_chunked_body_with_trailers_and_duplicate_headers(serve) -> None:
    raw = (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Dup: 1\r\nx-dup: 2\r\n\r\n"
        b"5;ext=1\r\nhello\r\n7\r\n, world\r\n0\r\nX-Trailer: t\r\n\r\n"
    )
    server = serve(lambda seen, i: (raw, False))
    pool = ConnectionPool(server.url)
    response = pool.request("GET", "/x")
    assert response.data == b"hello, world" and response.headers["x-dup"] == "1, 2"
    assert pool.request("GET", "/x").data == b"hello, world"
    assert server.connections == 1


def test_body_until_close_and_connection_close_are_not_reused(serve) -> None:
    def answer(seen: Seen, i: int) -> Reply:
        if seen.target == "/eof":
            return b"HTTP/1.1 200 OK\r\n\r\nall of it", True
        return ok(b"x", "Connection: close"), True

    server = serve(answer)
    pool = ConnectionPool(server.url)
    assert pool.request("GET", "/eof").data == b"all of it"
    assert pool.request("GET", "/close").data == b"x"
    assert pool.request("GET", "/eof").data == b"all of it"
    assert server.connections == 3


def test_head_204_and_interim_100_have_no_body(serve) -> None:
    def answer(seen: Seen, i: int) -> Reply:
        if seen.method == "HEAD":
            return b"HTTP/1.1 200 OK\r\nContent-Length: 12345\r\n\r\n", False
        if seen.target == "/204":
            return b"HTTP/1.1 204 No Content\r\n\r\n", False
        return b"HTTP/1.1 100 Continue\r\n\r\n" + ok(b"after 100"), False

    server = serve(answer)
    pool = ConnectionPool(server.url)
    head = pool.request("HEAD", "/k")
    assert head.data == b"" and head.headers["content-length"] == "12345"
    assert pool.request("DELETE", "/204").status == 204
    assert pool.request("GET", "/k").data == b"after 100"
    assert server.connections == 1  # the framing never lost track of the stream


def test_error_statuses_are_returned_not_raised(serve) -> None:
    body = b"<Error><Code>NoSuchKey</Code></Error>"
    server = serve(lambda seen, i: (ok(body).replace(b"200 OK", b"404 Not Found"), False))
    response = ConnectionPool(server.url).request("GET", "/missing")
    assert response.status == 404 and response.reason == "Not Found" and response.data == body


def test_an_idle_connection_closed_by_the_server_is_retried_once(serve) -> None:
    # the server answers one request per connection, then closes: the pool's kept connection
    # is dead when the next request comes, and that request goes out again on a new one
    server = serve(lambda seen, i: (ok(seen.target.encode()), True))
    pool = ConnectionPool(server.url)
    assert pool.request("GET", "/1").data == b"/1"
    time.sleep(0.05)
    assert pool.request("PUT", "/2", {}, b"body").data == b"/2"
    assert server.connections == 2 and [s.target for s in server.seen] == ["/1", "/2"]


def test_a_response_cut_short_is_an_error_not_a_retry(serve) -> None:
    def answer(seen: Seen, i: int) -> Reply:
        if seen.target == "/truncated":
            return b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nonly this", True
        if seen.target == "/garbage":
            return b"SSH-2.0-OpenSSH\r\n\r\n", True
        if seen.target == "/cut-headers":
            return b"HTTP/1.1 200 OK\r\nContent-Len", True
        return b"", True  # closes without a byte

    server = serve(answer)
    pool = ConnectionPool(server.url)
    with pytest.raises(NetworkError, match="truncated: 9 of 100"):
        pool.request("GET", "/truncated")
    with pytest.raises(NetworkError, match=r"not an HTTP/1\.x response"):
        pool.request("GET", "/garbage")
    with pytest.raises(NetworkError, match="closed in the response headers"):
        pool.request("GET", "/cut-headers")
    with pytest.raises(NetworkError, match="closed the connection without a response"):
        pool.request("GET", "/nothing")  # a new connection: not stale, so not retried
    assert [s.target for s in server.seen] == ["/truncated", "/garbage", "/cut-headers", "/nothing"]


def test_refused_and_timed_out(serve) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    with pytest.raises(NetworkError, match="connection refused"):
        ConnectionPool(f"http://127.0.0.1:{port}", connect_timeout=2).request("GET", "/")

    server = serve(lambda seen, i: (b"", False))  # reads the request, never answers
    pool = ConnectionPool(server.url, read_timeout=0.3)
    started = time.monotonic()
    with pytest.raises(NetworkError, match="timed out"):
        pool.request("GET", "/slow")
    assert time.monotonic() - started < 5
    assert len(server.seen) == 1  # a timeout is not retried here


def test_a_request_can_wait_longer_or_shorter_than_the_pool(serve) -> None:
    delays = {"/late": 0.6, "/slow": 5.0}

    def answer(seen: Seen, i: int) -> Reply:
        time.sleep(delays.get(seen.target, 0.0))
        return ok(b"done"), False

    pool = ConnectionPool(serve(answer).url, read_timeout=0.3)
    assert pool.request("GET", "/late", timeout=3).data == b"done"  # longer than the pool's
    started = time.monotonic()
    with pytest.raises(NetworkError, match="timed out"):
        pool.request("GET", "/slow", timeout=0.2)
    assert time.monotonic() - started < 2
    with pytest.raises(NetworkError, match="timed out"):  # the pool's own timeout is back
        pool.request("GET", "/late")


def test_concurrent_requests_share_the_pool(serve) -> None:
    server = serve(lambda seen, i: (ok(seen.target.encode()), False))
    pool = ConnectionPool(server.url, maxsize=4)
    results: dict[int, bytes] = {}

    def worker(n: int) -> None:
        for j in range(20):
            results[n * 100 + j] = pool.request("GET", f"/{n}/{j}").data

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert results == {n * 100 + j: f"/{n}/{j}".encode() for n in range(8) for j in range(20)}
    assert server.connections <= 8 + 20  # reused, not one per request
    pool.close()
    with pytest.raises(NetworkError, match="closed"):
        pool.request("GET", "/after-close")


def test_bad_urls_and_headers_are_refused() -> None:
    with pytest.raises(ValueError, match="not an http"):
        ConnectionPool("ftp://host/")
    pool = ConnectionPool("http://127.0.0.1:9")
    with pytest.raises(ValueError, match="latin-1"):
        pool.request("GET", "/", {"x-amz-meta-name": "\u4e2d\u6587"})
    assert ConnectionPool("https://s3.example.com").host_header == "s3.example.com"
    assert ConnectionPool("http://[::1]:9000").host_header == "[::1]:9000"
