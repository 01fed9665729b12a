"""Bad input through a real CLI gives one clear line on stderr and a meaningful exit code:
unknown scheme, malformed URL, missing bucket, wrong credentials, unreachable endpoint (with a
timeout, not a hang), missing config file, unknown profile."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from objstore.cli import ExitCode
from tests.conftest import unique_bucket
from tests.servers.s3_process import write_config

pytestmark = [pytest.mark.timeout(120), pytest.mark.integration]


def babel_sync(
    *args: str, config: Path | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "OSS_", "OBJSTORE_"))}
    cmd = [sys.executable, "-m", "babel_sync.cli", *args]
    if config is not None:
        cmd += ["--config", str(config)]
    return subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=Path(__file__).parents[2]
    )


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("babel-sync: error: "), lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


@pytest.fixture
def silent_server() -> Iterator[int]:
    """A TCP server that accepts connections and never answers: a hung endpoint."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        sock.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(sock.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield sock.getsockname()[1]
    stop.set()
    thread.join()
    for conn in held:
        conn.close()
    sock.close()


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_unknown_scheme() -> None:
    result = babel_sync("ls", "foo://bucket/x")
    assert result.returncode == ExitCode.USAGE
    assert "unknown scheme 'foo'" in one_error_line(result)


@pytest.mark.parametrize("url", ["s3:bucket/x", "s3://", "s3://bad bucket/x", "s3://b/../x"])
def test_malformed_url(url: str) -> None:
    result = babel_sync("ls", url)
    assert result.returncode == ExitCode.USAGE
    assert "URL" in one_error_line(result) or "key" in result.stderr


def test_missing_config_file(tmp_path: Path) -> None:
    result = babel_sync("ls", "s3://bucket/", config=tmp_path / "nope.toml")
    assert result.returncode == ExitCode.USAGE
    assert "config file not found" in one_error_line(result)


def test_unknown_profile(tmp_path: Path, rclone_s3) -> None:
    config = write_config(tmp_path / "c.toml", good=rclone_s3.profile())
    result = babel_sync("ls", "s3://typo@bucket/", config=config)
    assert result.returncode == ExitCode.USAGE
    line = one_error_line(result)
    assert "unknown profile 'typo'" in line and "good" in line


def test_unknown_config_key(tmp_path: Path) -> None:
    config = write_config(tmp_path / "c.toml", p={"endpoint": "http://x", "secret_key": "s"})
    result = babel_sync("ls", "s3://p@bucket/", config=config)
    assert result.returncode == ExitCode.USAGE
    assert "unknown key 'secret_key'" in one_error_line(result)


def test_missing_bucket(tmp_path: Path, rclone_s3) -> None:
    config = write_config(tmp_path / "c.toml", a=rclone_s3.profile())
    result = babel_sync("ls", f"s3://a@{unique_bucket('nosuch')}/", config=config)
    assert result.returncode == ExitCode.NOT_FOUND
    assert "bucket does not exist" in one_error_line(result)


def test_missing_object(tmp_path: Path, rclone_s3) -> None:
    bucket = unique_bucket()
    rclone_s3.create_bucket(bucket)
    config = write_config(tmp_path / "c.toml", a=rclone_s3.profile())
    result = babel_sync("stat", f"s3://a@{bucket}/dir/missing.bin", config=config)
    assert result.returncode == ExitCode.NOT_FOUND
    assert "no such object: 'missing.bin'" in one_error_line(result)


def test_wrong_credentials(tmp_path: Path, rclone_s3) -> None:
    bucket = unique_bucket()
    rclone_s3.create_bucket(bucket)
    secret = "definitelyWrongSecret00000000000000000"
    config = write_config(tmp_path / "c.toml", a=rclone_s3.profile(secret_access_key=secret))
    result = babel_sync("ls", f"s3://a@{bucket}/", config=config)
    assert result.returncode == ExitCode.ACCESS
    line = one_error_line(result)
    assert "SignatureDoesNotMatch" in line and "check the access key" in line
    assert secret not in result.stderr + result.stdout


def test_wrong_credentials_oss(tmp_path: Path, oss_server) -> None:
    bucket = unique_bucket()
    oss_server.create_bucket(bucket)
    table = {
        "endpoint": oss_server.endpoint,
        "access_key_id": "LTAIunknownKeyId",
        "secret_access_key": "x" * 30,
    }
    config = write_config(tmp_path / "c.toml", o=table)
    result = babel_sync("ls", f"oss://o@{bucket}/", config=config)
    assert result.returncode == ExitCode.ACCESS
    assert "InvalidAccessKeyId" in one_error_line(result)


def test_unreachable_endpoint_refused(tmp_path: Path) -> None:
    table = {
        "endpoint": f"http://127.0.0.1:{closed_port()}",
        "access_key_id": "AKIAX" * 4,
        "secret_access_key": "s" * 40,
        "max_attempts": 2,
        "connect_timeout": 1.0,
    }
    config = write_config(tmp_path / "c.toml", dead=table)
    for url in ("s3://dead@bucket/", "oss://dead@bucket/"):
        result = babel_sync("ls", url, config=config, timeout=60)
        assert result.returncode == ExitCode.UNREACHABLE, result.stderr
        assert "cannot reach http://127.0.0.1:" in one_error_line(result)


def test_unreachable_endpoint_hung_times_out(tmp_path: Path, silent_server: int) -> None:
    table = {
        "endpoint": f"http://127.0.0.1:{silent_server}",
        "access_key_id": "AKIAX" * 4,
        "secret_access_key": "s" * 40,
        "max_attempts": 2,
        "connect_timeout": 1.0,
        "read_timeout": 1.0,
    }
    config = write_config(tmp_path / "c.toml", hung=table)
    for url in ("s3://hung@bucket/", "oss://hung@bucket/"):
        # The subprocess timeout is the "no hang" check: read timeouts must end the command.
        result = babel_sync("ls", url, config=config, timeout=45)
        assert result.returncode == ExitCode.UNREACHABLE, result.stderr
        line = one_error_line(result)
        assert "cannot reach" in line and "timed out" in line


def test_local_missing_dir() -> None:
    result = babel_sync("ls", "/nonexistent/objstore-test-dir")
    assert result.returncode == ExitCode.NOT_FOUND
    assert "directory does not exist" in one_error_line(result)


def test_help_and_ls_json(tmp_path: Path) -> None:
    for prog in ("babel_sync.cli", "pcache.cli", "ckpt.cli"):
        out = subprocess.run(
            [sys.executable, "-m", prog, "--help"], capture_output=True, text=True, check=True
        )
        assert "--config" in out.stdout
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f.bin").write_bytes(b"12345")
    result = babel_sync("ls", str(tmp_path), "-R", "--json")
    assert result.returncode == 0
    import json

    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [(r["key"], r["size"]) for r in records] == [("d/f.bin", 5)]
