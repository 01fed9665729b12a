"""A minimal keep-alive HTTP/1.1 client for the object-store data paths.

Object-store traffic is many small requests with whole bodies in memory (a 16 KiB GET, a part of a
few MiB): urllib3 + http.client spend ~0.3 ms of CPU on each (header parsing through the email
package, response wrappers), more than the request itself costs on a fast network. This client does
only what those paths need, in about a quarter of the CPU:

- persistent connections in a thread-safe pool (idle ones reused LIFO; extra connections are made
  when all are busy and closed on return beyond ``maxsize``), ``TCP_NODELAY``, TLS for ``https``;
- requests with a complete ``bytes`` body (``Content-Length``), responses read whole: by
  ``Content-Length``, chunked, or until close; ``HEAD``/204/304 have no body;
- a request on a reused connection that finds it closed by the server before any response byte
  (an idle keep-alive timeout) is sent once more on a new connection; anything else is not retried
  here (the caller's retry policy decides);
- every failure below HTTP (refused, reset, timed out, truncated, malformed) is a
  :class:`NetworkError`; HTTP error statuses are returned, not raised.

Header names of a :class:`Response` are lower-case.
"""

from __future__ import annotations

import socket
import ssl
import threading
from dataclasses import dataclass, field
from typing import BinaryIO
from urllib.parse import urlsplit

MAX_LINE = 65536
MAX_HEADERS = 200


class NetworkError(OSError):
    """The request failed below HTTP: connect, send, receive, timeout, or a malformed reply."""


class _StaleConnection(Exception):
    """The server had closed a kept-alive connection before we used it again."""


@dataclass
class Response:
    status: int
    reason: str
    headers: dict[str, str] = field(default_factory=dict)  # lower-case names
    data: bytes = b""

    def header(self, name: str, default: str = "") -> str:
        return self.headers.get(name.lower(), default)


class _Connection:
    __slots__ = ("answered", "reader", "sock", "used")

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.reader: BinaryIO = sock.makefile("rb", buffering=MAX_LINE)  # type: ignore[assignment]
        self.used = 0  # requests completed on it
        self.answered = False  # the current request's response has begun

    def close(self) -> None:
        try:
            self.reader.close()
        finally:
            self.sock.close()


class ConnectionPool:
    """Keep-alive connections to one ``http(s)://host[:port]`` origin. Thread-safe.

    Args:
        url: the origin (a path in it is ignored: requests carry their own targets).
        maxsize: idle connections kept for reuse.
        connect_timeout: seconds for the TCP (and TLS) connection.
        read_timeout: seconds any single receive may wait.
        ssl_context: for ``https`` (default: the system's verified default context).
    """

    def __init__(
        self,
        url: str,
        *,
        maxsize: int = 10,
        connect_timeout: float = 5.0,
        read_timeout: float = 60.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {url!r}")
        self.scheme = parts.scheme
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        default_port = self.port == (443 if parts.scheme == "https" else 80)
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if default_port else f"{host}:{self.port}"
        self.maxsize = maxsize
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._ssl = (
            (ssl_context or ssl.create_default_context()) if self.scheme == "https" else None
        )
        self._idle: list[_Connection] = []
        self._lock = threading.Lock()
        self._closed = False

    # -- connections ---------------------------------------------------------------------------

    def _connect(self) -> _Connection:
        try:
            sock = socket.create_connection((self.host, self.port), timeout=self.connect_timeout)
        except OSError as exc:
            raise NetworkError(f"cannot connect to {self.host_header}: {_reason(exc)}") from exc
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(sock, server_hostname=self.host)
            sock.settimeout(self.read_timeout)
        except OSError as exc:
            sock.close()
            raise NetworkError(f"cannot connect to {self.host_header}: {_reason(exc)}") from exc
        return _Connection(sock)

    def _checkout(self) -> _Connection:
        with self._lock:
            if self._closed:
                raise NetworkError("the connection pool is closed")
            if self._idle:
                return self._idle.pop()
        return self._connect()

    def _checkin(self, conn: _Connection) -> None:
        with self._lock:
            if not self._closed and len(self._idle) < self.maxsize:
                self._idle.append(conn)
                return
        conn.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn in idle:
            conn.close()

    # -- requests ------------------------------------------------------------------------------

    def request(
        self,
        method: str,
        target: str,
        headers: dict[str, str] | None = None,
        body: bytes | bytearray | memoryview | None = None,
        *,
        timeout: float | None = None,
    ) -> Response:
        """Send one request and read the whole response (see the module docstring);
        ``timeout``: this request's receive timeout instead of the pool's ``read_timeout``."""
        lines = [f"{method} {target} HTTP/1.1\r\nHost: {self.host_header}\r\n"]
        for name, value in (headers or {}).items():
            lines.append(f"{name}: {value}\r\n")
        if body is not None or method in ("PUT", "POST"):
            lines.append(f"Content-Length: {len(body) if body is not None else 0}\r\n")
        lines.append("\r\n")
        try:
            head = "".join(lines).encode("latin-1")
        except UnicodeEncodeError as exc:
            raise ValueError(f"a header is not latin-1: {exc}") from None
        for attempt in (1, 2):
            conn = self._checkout()
            conn.answered = False
            try:
                if timeout is not None:
                    conn.sock.settimeout(timeout)
                response, keep = self._exchange(conn, method, head, body)
                if timeout is not None:
                    conn.sock.settimeout(self.read_timeout)
            except (_StaleConnection, OSError, ValueError) as exc:
                conn.close()
                stale = (
                    conn.used > 0
                    and not conn.answered
                    and not isinstance(exc, NetworkError | TimeoutError)
                )
                if stale and attempt == 1:
                    continue  # the server closed it while idle: once more, on a new connection
                if isinstance(exc, NetworkError):
                    raise
                if isinstance(exc, _StaleConnection):
                    raise NetworkError(
                        f"{self.host_header} closed the connection without a response"
                    ) from exc
                raise NetworkError(f"{method} to {self.host_header}: {_reason(exc)}") from exc
            except BaseException:
                conn.close()
                raise
            conn.used += 1
            if keep:
                self._checkin(conn)
            else:
                conn.close()
            return response
        raise AssertionError("unreachable")

    def _exchange(
        self,
        conn: _Connection,
        method: str,
        head: bytes,
        body: bytes | bytearray | memoryview | None,
    ) -> tuple[Response, bool]:
        if body is not None and len(body) <= 65536:
            conn.sock.sendall(head + bytes(body))
        else:
            conn.sock.sendall(head)
            if body is not None:
                conn.sock.sendall(body)
        reader = conn.reader
        while True:
            line = reader.readline(MAX_LINE + 1)
            if not line:
                raise _StaleConnection()
            conn.answered = True
            version, status, reason = _status_line(line)
            headers = _read_headers(reader)
            if status >= 200 or status == 101:
                break  # 1xx interim responses (100 Continue) are skipped
        connection = headers.get("connection", "").lower()
        keep = (version == "HTTP/1.1" and connection != "close") or connection == "keep-alive"
        if method == "HEAD" or status in (204, 304):
            data = b""
        elif "chunked" in headers.get("transfer-encoding", "").lower():
            data = _read_chunked(reader)
        elif "content-length" in headers:
            try:
                length = int(headers["content-length"])
            except ValueError:
                raise NetworkError(f"bad Content-Length {headers['content-length']!r}") from None
            data = reader.read(length) if length else b""
            if len(data) != length:
                raise NetworkError(f"response truncated: {len(data)} of {length} bytes")
        else:
            data = reader.read()  # delimited by the end of the connection
            keep = False
        return Response(status, reason, headers, data), keep


def _status_line(line: bytes) -> tuple[str, int, str]:
    if len(line) > MAX_LINE:
        raise NetworkError("status line too long")
    parts = line.decode("latin-1").rstrip("\r\n").split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise NetworkError(f"not an HTTP/1.x response: {line[:80]!r}")
    return parts[0], int(parts[1]), parts[2] if len(parts) > 2 else ""


def _read_headers(reader: BinaryIO) -> dict[str, str]:
    headers: dict[str, str] = {}
    for _ in range(MAX_HEADERS + 1):
        line = reader.readline(MAX_LINE + 1)
        if line in (b"\r\n", b"\n"):
            return headers
        if len(line) > MAX_LINE:
            raise NetworkError("response header line too long")
        if not line.endswith(b"\n"):
            raise NetworkError("connection closed in the response headers")
        name, sep, value = line.decode("latin-1").partition(":")
        if not sep:
            raise NetworkError(f"malformed response header {line[:80]!r}")
        name, value = name.strip().lower(), value.strip()
        headers[name] = f"{headers[name]}, {value}" if name in headers else value
    raise NetworkError("too many response headers")


def _read_chunked(reader: BinaryIO) -> bytes:
    chunks: list[bytes] = []
    while True:
        line = reader.readline(MAX_LINE + 1)
        if not line:
            raise NetworkError("connection closed in a chunked body")
        try:
            size = int(line.split(b";", 1)[0].strip(), 16)
        except ValueError:
            raise NetworkError(f"bad chunk size {line[:40]!r}") from None
        if size == 0:
            _read_headers(reader)  # trailers, then the blank line
            return b"".join(chunks)
        chunk = reader.read(size)
        if len(chunk) != size or reader.read(2) != b"\r\n":
            raise NetworkError("chunked body truncated")
        chunks.append(chunk)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, socket.timeout | TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, socket.gaierror):
        return f"name resolution failed ({exc})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS error ({exc})"
    return str(exc) or type(exc).__name__
