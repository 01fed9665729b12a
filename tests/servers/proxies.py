"""Loopback network proxies that make a local test bed behave like a remote one.

Responsibility: give tests, benchmarks and demos two in-process proxies that sit
between a client and a local server on 127.0.0.1:

* ``DelayProxy`` -- a TCP proxy adding cross-region round-trip latency (and an
  optional per-connection bandwidth cap) without ``netem``.  Latency is added by
  timestamping chunks and releasing them from a per-direction queue, so it does
  not throttle throughput the way a ``sleep`` in the read loop would.
* ``FaultProxy`` -- an HTTP reverse proxy that forwards requests byte-for-byte
  (signed S3/OSS requests stay valid) and can inject error responses or
  connection resets for the next N requests.

Both run in a background thread with their own asyncio event loop, bind to an
ephemeral port (``port=0``) so parallel runs never collide, and only listen on
loopback addresses.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
import socket
import struct
import threading
from collections import deque
from typing import Any, Self

import aiohttp
import yarl
from aiohttp import web
from multidict import CIMultiDict

log = logging.getLogger(__name__)

_LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
_CHUNK = 64 * 1024
# Upper bound of bytes sitting in one direction's delay queue; reading pauses
# above it so a fast sender cannot make the proxy buffer a whole transfer.
_MAX_QUEUED_BYTES = 64 * 1024 * 1024
# Token-bucket burst; small so a rate limit is visible even on short transfers.
_RATE_BURST = 16 * 1024
_EOF = object()  # queue sentinel: peer half-closed, forward write_eof
_RESET = object()  # queue sentinel: peer reset, abort the other side too


class _ThreadedServer:
    """Runs an asyncio server in a daemon thread with a private event loop.

    Subclasses implement ``_astart`` (returns the bound port) and ``_astop``;
    both execute on the background loop.
    """

    def __init__(self, host: str, port: int) -> None:
        if host not in _LOOPBACK_HOSTS:
            raise ValueError(f"test proxies only listen on loopback, not {host!r}")
        self.host = host
        self.port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def endpoint(self) -> str:
        return f"http://{self.address}"

    async def _astart(self) -> int:
        raise NotImplementedError

    async def _astop(self) -> None:
        raise NotImplementedError

    def start(self) -> Self:
        if self._loop is not None:
            raise RuntimeError(f"{type(self).__name__} already started")
        loop = asyncio.new_event_loop()
        thread = threading.Thread(
            target=self._run_loop, args=(loop,), name=type(self).__name__, daemon=True
        )
        thread.start()
        self._loop, self._thread = loop, thread
        try:
            self.port = asyncio.run_coroutine_threadsafe(self._astart(), loop).result(30)
        except BaseException:
            with contextlib.suppress(Exception):
                self.stop()  # release whatever _astart managed to create
            raise
        log.debug("%s listening on %s", type(self).__name__, self.address)
        return self

    def stop(self) -> None:
        if self._loop is None:
            return
        try:
            asyncio.run_coroutine_threadsafe(self._astop(), self._loop).result(30)
        finally:
            self._shutdown_loop()

    def _shutdown_loop(self) -> None:
        loop, thread = self._loop, self._thread
        self._loop = self._thread = None
        if loop is not None and thread is not None:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(30)

    @staticmethod
    def _run_loop(loop: asyncio.AbstractEventLoop) -> None:
        asyncio.set_event_loop(loop)
        try:
            loop.run_forever()
            # Cancel stragglers so the loop closes without "task destroyed" noise.
            pending = asyncio.all_tasks(loop)
            for task in pending:
                task.cancel()
            loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            loop.run_until_complete(loop.shutdown_asyncgens())
        finally:
            loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _reset(transport: asyncio.WriteTransport) -> None:
    """Close with RST (SO_LINGER 0) so a peer reset propagates as a reset, not EOF."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


class _TokenBucket:
    """Deficit token bucket: returns how long to wait before sending n bytes."""

    def __init__(self, rate: float, now: float) -> None:
        self.rate = rate
        self.tokens = float(_RATE_BURST)
        self.last = now

    def reserve(self, n: int, now: float) -> float:
        self.tokens = min(float(_RATE_BURST), self.tokens + (now - self.last) * self.rate)
        self.last = now
        self.tokens -= n
        return max(0.0, -self.tokens / self.rate)


class _Pipe:
    """One direction of a proxied connection: reader -> delay queue -> writer."""

    def __init__(
        self, proxy: DelayProxy, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.proxy = proxy
        self.reader = reader
        self.writer = writer
        self.queue: asyncio.Queue[tuple[float, Any]] = asyncio.Queue()
        self.queued_bytes = 0
        self.has_room = asyncio.Event()
        self.has_room.set()
        self.closed = False
        loop = asyncio.get_running_loop()
        rate = proxy.rate_bytes_per_s
        self.bucket = _TokenBucket(rate, loop.time()) if rate else None

    def _due(self) -> float:
        return asyncio.get_running_loop().time() + self.proxy.delay_s / 2

    async def pump_in(self) -> None:
        end: object = _EOF
        try:
            while not self.closed:
                chunk = await self.reader.read(_CHUNK)
                if not chunk:
                    break
                self.queue.put_nowait((self._due(), chunk))
                self.queued_bytes += len(chunk)
                while self.queued_bytes > _MAX_QUEUED_BYTES and not self.closed:
                    self.has_room.clear()
                    await self.has_room.wait()
        except (ConnectionError, OSError):
            end = _RESET
        finally:
            # Also reached on cancellation; the sentinel lets pump_out finish.
            self.queue.put_nowait((self._due(), end))

    async def pump_out(self, other: _Pipe) -> None:
        loop = asyncio.get_running_loop()
        transport = self.writer.transport
        try:
            while True:
                due, item = await self.queue.get()
                wait = due - loop.time()
                if wait > 0:
                    await asyncio.sleep(wait)
                if item is _EOF:
                    if not transport.is_closing() and self.writer.can_write_eof():
                        self.writer.write_eof()
                    return
                if item is _RESET:
                    _reset(transport)
                    return
                await self._send(item, loop)
                self.queued_bytes -= len(item)
                if self.queued_bytes <= _MAX_QUEUED_BYTES:
                    self.has_room.set()
        except (ConnectionError, OSError) as exc:
            # The receiving peer is gone: nothing queued can be delivered, so
            # tear down both sides and let the readers drain into sentinels.
            log.debug("DelayProxy write failed: %r", exc)
            for pipe in (self, other):
                pipe.closed = True
                pipe.has_room.set()
                pipe.writer.transport.abort()

    async def _send(self, data: bytes, loop: asyncio.AbstractEventLoop) -> None:
        if self.bucket is None:
            self.writer.write(data)
            await self.writer.drain()
        else:
            # Slice so the limit is smooth rather than one sleep per 64 KiB.
            for i in range(0, len(data), _RATE_BURST):
                piece = data[i : i + _RATE_BURST]
                wait = self.bucket.reserve(len(piece), loop.time())
                if wait > 0:
                    await asyncio.sleep(wait)
                self.writer.write(piece)
                await self.writer.drain()
        self.proxy.bytes_forwarded += len(data)


class DelayProxy(_ThreadedServer):
    """TCP proxy adding ``delay_s`` round-trip latency (half each way).

    Chunks are forwarded no earlier than arrival + ``delay_s / 2`` by a writer
    task per direction, so latency is added without capping bandwidth.
    ``rate_bytes_per_s`` optionally caps each direction of each connection.
    Changing ``delay_s`` at run time affects chunks read after the change.
    The TCP handshake itself is local and not delayed.
    """

    def __init__(
        self,
        upstream_host: str,
        upstream_port: int,
        delay_s: float,
        host: str = "127.0.0.1",
        port: int = 0,
        rate_bytes_per_s: float | None = None,
    ) -> None:
        super().__init__(host, port)
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.delay_s = delay_s
        if rate_bytes_per_s is not None and rate_bytes_per_s <= 0:
            raise ValueError("rate_bytes_per_s must be positive or None")
        self.rate_bytes_per_s = rate_bytes_per_s
        self.connections = 0
        self.bytes_forwarded = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def delay_s(self) -> float:
        return self._delay_s

    @delay_s.setter
    def delay_s(self, value: float) -> None:
        if value < 0:
            raise ValueError("delay_s must be >= 0")
        self._delay_s = float(value)  # a float store is atomic across threads

    async def _astart(self) -> int:
        self._server = await asyncio.start_server(self._handle, self.host, self.port)
        return int(self._server.sockets[0].getsockname()[1])

    async def _astop(self) -> None:
        if self._server is not None:
            self._server.close()
        # Server.close() leaves accepted connections open (Python < 3.12).
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    async def _handle(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.connections += 1
        writers = [client_writer]
        pumps: list[asyncio.Task[None]] = []
        try:
            up_reader, up_writer = await asyncio.open_connection(
                self.upstream_host, self.upstream_port
            )
            writers.append(up_writer)
            to_up = _Pipe(self, client_reader, up_writer)
            to_client = _Pipe(self, up_reader, client_writer)
            pumps = [
                asyncio.create_task(to_up.pump_in()),
                asyncio.create_task(to_client.pump_in()),
                asyncio.create_task(to_up.pump_out(to_client)),
                asyncio.create_task(to_client.pump_out(to_up)),
            ]
            await asyncio.gather(*pumps)
        except (ConnectionError, OSError) as exc:
            log.debug(
                "DelayProxy upstream %s:%s failed: %r", self.upstream_host, self.upstream_port, exc
            )
        except asyncio.CancelledError:
            pass  # stop(): end normally, else asyncio's stream callback logs it
        finally:
            # Close before any await, so a stop() arriving now cannot leak sockets.
            for writer in writers:
                if task.cancelling():  # stop(): don't wait on a graceful close
                    writer.transport.abort()
                else:
                    writer.close()
            for pump in pumps:
                pump.cancel()
            self._tasks.discard(task)
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.gather(*pumps, return_exceptions=True)


# RFC 9110 section 7.6.1 hop-by-hop headers; everything else passes verbatim.
_HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        # Not hop-by-hop by the RFC, but the proxy answers it itself (see _handle): forwarding
        # it would make the upstream wait for a 100 Continue the client never sees.
        "expect",
    }
)
_SLOWDOWN_BODY = (
    b"<Error><Code>SlowDown</Code><Message>Please reduce your request rate.</Message></Error>"
)


def _end_to_end(headers: Any) -> CIMultiDict[str]:
    """Copy headers minus hop-by-hop ones (including those named in Connection)."""
    named = {t.strip().lower() for v in headers.getall("Connection", []) for t in v.split(",")}
    out: CIMultiDict[str] = CIMultiDict()
    for name, value in headers.items():
        if name.lower() not in _HOP_BY_HOP and name.lower() not in named:
            out.add(name, value)
    return out


class _VerbatimResponse(web.StreamResponse):
    """StreamResponse that does not invent a Content-Type the upstream omitted."""

    async def _prepare_headers(self) -> None:
        had_type = "Content-Type" in self.headers
        await super()._prepare_headers()
        if not had_type:
            self.headers.popall("Content-Type", None)


_UNAVAILABLE_BODY = (
    b"<Error><Code>ServiceUnavailable</Code><Message>the store is down</Message></Error>"
)


class FaultProxy(_ThreadedServer):
    """HTTP reverse proxy forwarding requests verbatim, with fault injection."""

    def __init__(self, upstream_url: str, host: str = "127.0.0.1", port: int = 0) -> None:
        super().__init__(host, port)
        self.upstream_url = upstream_url.rstrip("/")
        self.requests_seen = 0
        self.request_log: deque[str] = deque(maxlen=10_000)  # "METHOD /path?query", in order
        self.faults_served = 0
        # Pending faults in injection order; guarded because inject() is called
        # from the test thread while the loop thread pops.
        self._faults: deque[tuple[int, bytes, str] | None] = deque()
        self._lock = threading.Lock()
        # A storm: each request fails with this probability until the budget is used up.
        self._storm_left = 0
        self._storm_probability = 0.0
        self._storm_rng = random.Random(0)
        self._runner: web.ServerRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        # persistent refusals: (methods, path substring, status, body); and a store outage
        self._refusals: list[tuple[frozenset[str], str, int, bytes]] = []
        self._down = False

    def refuse(
        self,
        path_contains: str,
        status: int = 403,
        body: bytes = b"<Error><Code>AccessDenied</Code><Message>Access Denied</Message></Error>",
        methods: tuple[str, ...] = ("PUT", "POST"),
    ) -> None:
        """From now on answer ``methods`` requests whose path contains ``path_contains`` with
        ``status``/``body`` (a key the store refuses for good)."""
        with self._lock:
            self._refusals.append((frozenset(methods), path_contains, status, body))

    def allow(self, path_contains: str) -> None:
        """Lift the refusals of :meth:`refuse` for ``path_contains``."""
        with self._lock:
            self._refusals = [r for r in self._refusals if r[1] != path_contains]

    def outage(self, down: bool) -> None:
        """While ``down``, every request is answered 503 ServiceUnavailable (a store outage)."""
        with self._lock:
            self._down = down

    def inject(
        self,
        count: int,
        status: int = 503,
        body: bytes = _SLOWDOWN_BODY,
        content_type: str = "application/xml",
    ) -> None:
        """Answer the next ``count`` requests with ``status``/``body`` unforwarded."""
        with self._lock:
            self._faults.extend([(status, body, content_type)] * count)

    def inject_storm(self, count: int, probability: float = 0.3, seed: int = 0) -> None:
        """Fail each request with ``probability`` (503 SlowDown) until ``count`` have failed.

        Unlike :meth:`inject`, failures are interleaved with successes, as in a real throttling
        storm across many concurrent requests.
        """
        with self._lock:
            self._storm_left = count
            self._storm_probability = probability
            self._storm_rng = random.Random(seed)

    def inject_reset(self, count: int) -> None:
        """Close the connection of the next ``count`` requests without a response."""
        with self._lock:
            self._faults.extend([None] * count)

    async def _astart(self) -> int:
        self._session = aiohttp.ClientSession(
            auto_decompress=False,  # pass Content-Encoding'd bytes through untouched
            cookie_jar=aiohttp.DummyCookieJar(),  # never replay upstream cookies
            skip_auto_headers=("Accept", "Accept-Encoding", "User-Agent", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None, sock_connect=10),
        )
        self._runner = web.ServerRunner(web.Server(self._handle), shutdown_timeout=1.0)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        return int(self._runner.addresses[0][1])

    async def _astop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        self.requests_seen += 1
        self.request_log.append(f"{request.method} {request.path_qs}")
        if request.headers.get("Expect", "").lower() == "100-continue":
            # boto3 sends "Expect: 100-continue" on PUTs and waits up to 1 s for the interim
            # response; the low-level web.Server has no expect handler, so answer it here.
            assert request.writer is not None
            await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
        with self._lock:
            if (
                not self._faults
                and self._storm_left
                and self._storm_rng.random() < self._storm_probability
            ):
                self._storm_left -= 1
                self._faults.append((503, _SLOWDOWN_BODY, "application/xml"))
            refusal = next(
                (
                    (status, body, "application/xml")
                    for methods, needle, status, body in self._refusals
                    if request.method in methods and needle in request.path
                ),
                None,
            )
            if self._down:
                refusal = (503, _UNAVAILABLE_BODY, "application/xml")
            if refusal is not None:
                self._faults.appendleft(refusal)
            faulty = bool(self._faults)
            fault = self._faults.popleft() if faulty else None
        if not faulty:
            return await self._forward(request)
        if fault is None:
            self.faults_served += 1
            assert request.transport is not None
            request.transport.abort()
            # Nothing can be written any more; cancelling ends the handler
            # without aiohttp trying to send an error response.
            raise asyncio.CancelledError
        status, body, content_type = fault
        # Drain the body so the client sees a response, not a broken pipe.
        while await request.content.readany():
            pass
        self.faults_served += 1
        return web.Response(status=status, body=body, content_type=content_type)

    async def _forward(self, request: web.BaseRequest) -> web.StreamResponse:
        assert self._session is not None
        # raw_path is the request target exactly as received; encoded=True
        # stops yarl from re-quoting or normalising it (signatures cover it).
        url = yarl.URL(self.upstream_url + request.raw_path, encoded=True)
        data = request.content.iter_chunked(_CHUNK) if request.body_exists else None
        try:
            upstream = await self._session.request(
                request.method,
                url,
                headers=_end_to_end(request.headers),
                data=data,
                allow_redirects=False,
            )
        except aiohttp.ClientError as exc:
            log.warning("FaultProxy upstream %s failed: %r", url, exc)
            return web.Response(status=502, text=f"upstream error: {exc!r}")
        async with upstream:
            response = _VerbatimResponse(status=upstream.status, reason=upstream.reason)
            response.headers.extend(_end_to_end(upstream.headers))
            await response.prepare(request)
            try:
                async for chunk in upstream.content.iter_any():
                    await response.write(chunk)
                await response.write_eof()
            except (aiohttp.ClientError, ConnectionError) as exc:
                # Headers are already out: cut the client off so a broken
                # upstream shows as a truncated body, never a short clean one.
                log.debug("FaultProxy stream %s aborted: %r", url, exc)
                if request.transport is not None:
                    request.transport.abort()
        return response
