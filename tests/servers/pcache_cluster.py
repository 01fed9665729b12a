"""Real pcache workers as subprocesses, for tests, benchmarks and the demo.

:class:`PcacheCluster` writes one TOML config per node (the S3 profile, ``[pcache]`` with the
node id, port, token, cache directories, the static peer list) and starts ``pcache worker`` for
each. Workers can be killed (``kill -9``) and restarted with the same state to test recovery.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.servers.s3_process import free_port

log = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, Mapping):
        return "{ " + ", ".join(f"{k} = {_toml_value(v)}" for k, v in value.items()) + " }"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    return json.dumps(str(value))


@dataclass
class WorkerNode:
    node_id: str
    port: int
    root: Path
    config_path: Path
    host: str = "127.0.0.1"
    process: subprocess.Popen[bytes] | None = None
    netns: str | None = None
    log_path: Path = field(default_factory=Path)

    @property
    def address(self) -> str:
        return f"http://{self.host}:{self.port}"


class PcacheCluster:
    """N workers over one backing store.

    Args:
        root: scratch directory (configs, cache dirs, state, logs).
        profiles: objstore profiles (name -> table).
        backends: namespace -> store URL.
        nodes: how many workers.
        capacity: bytes per cache directory.
        dirs_per_node: cache directories per worker (one per "NVMe disk").
        extra: more ``[pcache]`` keys for every node.
        hosts: per-node host addresses (network namespaces); default 127.0.0.1.
        netns: per-node network namespace names to start the workers in.
        ports: per-node ports (default: a free port each).
        command_prefix: argv put before each worker's command (e.g. ``unshare``).
    """

    def __init__(
        self,
        root: Path,
        profiles: Mapping[str, Mapping[str, Any]],
        backends: Mapping[str, str],
        *,
        nodes: int = 1,
        capacity: int = 64 << 20,
        dirs_per_node: int = 1,
        extra: Mapping[str, Any] | None = None,
        hosts: Sequence[str] | None = None,
        netns: Sequence[str] | None = None,
        block_size: str = "1MiB",
        ports: Sequence[int] | None = None,
        command_prefix: Sequence[str] = (),
    ) -> None:
        self.command_prefix = list(command_prefix)
        self.root = root
        self.token = secrets.token_hex(16)
        self.profiles = profiles
        self.backends = dict(backends)
        self.nodes: list[WorkerNode] = []
        for i in range(nodes):
            node_root = root / f"node{i + 1}"
            node_root.mkdir(parents=True, exist_ok=True)
            node = WorkerNode(
                f"node{i + 1}",
                ports[i] if ports else free_port(),
                node_root,
                node_root / "pcache.toml",
                host=hosts[i] if hosts else "127.0.0.1",
                netns=netns[i] if netns else None,
                log_path=node_root / "worker.log",
            )
            self.nodes.append(node)
        for node in self.nodes:
            self._write_config(node, capacity, dirs_per_node, extra or {}, block_size)

    def _write_config(
        self,
        node: WorkerNode,
        capacity: int,
        dirs: int,
        extra: Mapping[str, Any],
        block_size: str,
    ) -> None:
        lines = []
        for name, table in self.profiles.items():
            lines.append(f"[profiles.{name}]")
            lines += [f"{k} = {_toml_value(v)}" for k, v in table.items()]
        peers = [{"id": n.node_id, "address": n.address, "weight": 1.0} for n in self.nodes]
        pcache = {
            "node_id": node.node_id,
            "listen": f"{node.host}:{node.port}",
            "token": self.token,
            "state_dir": str(node.root / "state"),
            "block_size": block_size,
            "peers": peers,
            "request_timeout": 10.0,
            **extra,
        }
        lines.append("[pcache]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in pcache.items()]
        for d in range(dirs):
            lines.append("[[pcache.cache_dirs]]")
            lines.append(f'path = "{node.root / f"disk{d}"}"')
            lines.append(f"capacity = {capacity}")
        lines.append("[pcache.backends]")
        lines += [f"{k} = {_toml_value(v)}" for k, v in self.backends.items()]
        node.config_path.write_text("\n".join(lines) + "\n")

    def env(self, node: WorkerNode | None = None) -> dict[str, str]:
        """Environment for a client on ``node`` (default: the first)."""
        node = node or self.nodes[0]
        return {
            **os.environ,
            "PCACHE_WORKER": node.address,
            "PCACHE_TOKEN": self.token,
            "PCACHE_CONFIG": str(node.config_path),
        }

    def start(self, node: WorkerNode | None = None, timeout: float = 30.0) -> None:
        targets = [node] if node else self.nodes
        for n in targets:
            cmd = [sys.executable, "-m", "pcache.cli", "worker", "--config", str(n.config_path)]
            cmd = [*self.command_prefix, *cmd]
            if n.netns:
                cmd = ["ip", "netns", "exec", n.netns, *cmd]
            log_file = n.log_path.open("ab")
            n.process = subprocess.Popen(
                cmd,
                cwd=ROOT,
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env={**os.environ, "PYTHONPATH": str(ROOT)},
            )
            log_file.close()
        for n in targets:
            self.wait_ready(n, timeout)

    def wait_ready(self, node: WorkerNode, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert node.process is not None
            if node.process.poll() is not None:
                raise RuntimeError(
                    f"worker {node.node_id} exited ({node.process.returncode}):\n"
                    + node.log_path.read_text()[-3000:]
                )
            try:
                request = urllib.request.Request(
                    node.address + "/v1/info", headers={"Authorization": f"Bearer {self.token}"}
                )
                with urllib.request.urlopen(request, timeout=2) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.1)
        raise TimeoutError(f"worker {node.node_id} not ready after {timeout}s")

    def kill(self, node: WorkerNode, sig: int = signal.SIGKILL) -> None:
        if node.process is not None and node.process.poll() is None:
            node.process.send_signal(sig)
            node.process.wait(timeout=30)
        node.process = None

    def stop(self) -> None:
        for node in self.nodes:
            if node.process is not None and node.process.poll() is None:
                node.process.terminate()
        for node in self.nodes:
            if node.process is not None:
                try:
                    node.process.wait(timeout=20)
                except subprocess.TimeoutExpired:
                    node.process.kill()
                    node.process.wait()
                node.process = None

    def __enter__(self) -> PcacheCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def logs(self) -> str:
        return "\n".join(
            f"--- {n.node_id} ---\n{n.log_path.read_text()[-4000:]}"
            for n in self.nodes
            if n.log_path.exists()
        )
