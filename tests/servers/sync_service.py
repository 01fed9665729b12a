"""``babel-sync serve`` as a real process for tests: config file, start, kill, API calls."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from tests.servers.s3_process import free_port, toml_value, wait_for_port

REPO = Path(__file__).resolve().parents[2]
TOKEN = "test-service-token-0123456789"


class Service:
    """A ``babel-sync serve`` process on a free port with ``profiles`` for its jobs."""

    def __init__(
        self, tmp: Path, profiles: dict[str, dict[str, Any]], max_concurrent: int = 2
    ) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        tmp.mkdir(parents=True, exist_ok=True)
        self.config = tmp / "service.toml"
        lines = ["[service]", f'listen = "127.0.0.1:{self.port}"', f'token = "{TOKEN}"',
                 f'state_dir = "{tmp / "state"}"', f"max_concurrent = {max_concurrent}"]  # fmt: skip
        for name, profile in profiles.items():
            lines.append(f"[profiles.{name}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in profile.items()]
        self.config.write_text("\n".join(lines) + "\n")
        self.log = tmp / "service.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Service:
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "babel_sync.cli", "serve", "--config", str(self.config)],
                cwd=REPO, stdout=log, stderr=subprocess.STDOUT,
            )  # fmt: skip
        wait_for_port("127.0.0.1", self.port, 30, self.proc)
        return self

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def call(
        self, method: str, path: str, body: Any = None, token: str | None = TOKEN
    ) -> tuple[int, Any]:
        headers = {"Content-Type": "application/json"}
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        data = json.dumps(body).encode() if body is not None else None
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=30) as r:
                raw = r.read()
                return r.status, json.loads(raw) if raw[:1] in (b"{", b"[") else raw.decode()
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    def wait_copied(self, job_id: str, count: int, timeout: float = 30) -> None:
        """Until the running job has copied ``count`` objects."""
        deadline = time.monotonic() + timeout
        while self.call("GET", f"/api/v1/jobs/{job_id}")[1]["progress"].get("copied", 0) < count:
            if time.monotonic() > deadline:
                raise AssertionError(f"job {job_id} copied fewer than {count} in {timeout:.0f} s")
            time.sleep(0.1)

    def wait_state(
        self, job_id: str, states: tuple[str, ...], timeout: float = 90
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            _, job = self.call("GET", f"/api/v1/jobs/{job_id}")
            if job["state"] in states:
                return job
            if time.monotonic() > deadline:
                raise AssertionError(f"job stayed {job['state']}: {job}")
            time.sleep(0.1)


def profiles(rclone_s3: Any, s3_proxy: Any) -> dict[str, dict[str, Any]]:
    """``s3``, and ``far``: the same server through a proxy, so copies between them stream
    through the job (and its bandwidth limit) instead of being server-side copies."""
    return {"s3": rclone_s3.profile(), "far": rclone_s3.profile(endpoint=s3_proxy.endpoint)}


def fill(store: Any, count: int, size: int) -> None:
    for i in range(count):
        store.put(f"data/f-{i:04d}.bin", os.urandom(size))
