"""Cluster membership: the list of cache workers, from a static list or a file that may change.

A membership file is TOML or JSON with one entry per worker::

    [[nodes]]
    id = "node-a"
    address = "http://10.0.0.1:7070"
    weight = 2.0            # optional, default 1.0; proportional to cache capacity

or ``{"nodes": [{"id": "node-a", "address": "http://10.0.0.1:7070", "weight": 2.0}]}``.
`Membership.nodes()` picks up edits at run time with one ``stat`` per poll interval; a file
that stops parsing keeps the last good list, with one warning per bad version of the file.
Feed the result to `pcache.selection.WorkerSelector.set_nodes`.

`DnsMembership` finds the workers through one DNS name instead (a Kubernetes headless Service
answers with one address per worker pod) and asks each new address for its node id.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import threading
import time
import tomllib
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from pcache.selection import Node, check_unique_ids

__all__ = ["DnsMembership", "Membership", "load_nodes", "parse_dns_target", "parse_nodes"]

log = logging.getLogger(__name__)

_NODE_KEYS = frozenset({"id", "address", "weight"})


def parse_nodes(data: object, source: str = "membership") -> list[Node]:
    """Validate decoded membership data (``{"nodes": [...]}``) into nodes.

    Args:
        data: The decoded TOML or JSON document.
        source: Where it came from, for error messages.

    Returns:
        The nodes, in file order. An empty list is valid: no workers, read the backing store.

    Raises:
        ValueError: One line naming the source and the offending entry: unknown keys, a missing
            id or address, a duplicate id, a weight that is not > 0, or an address that is not
            ``http(s)://host:port``.
    """
    if not isinstance(data, dict):
        raise ValueError(f"{source}: expected a table with a 'nodes' list")
    unknown = sorted(set(data) - {"nodes"})
    if unknown:
        raise ValueError(f"{source}: unknown key(s) {', '.join(unknown)}")
    entries = data.get("nodes")
    if not isinstance(entries, list):
        raise ValueError(f"{source}: 'nodes' must be a list of tables")
    nodes = []
    for i, entry in enumerate(entries):
        where = f"{source}: nodes[{i}]"
        if not isinstance(entry, dict):
            raise ValueError(f"{where}: expected a table with id and address")
        extra = sorted(set(entry) - _NODE_KEYS)
        if extra:
            raise ValueError(f"{where}: unknown key(s) {', '.join(extra)}")
        node_id = entry.get("id")
        address = entry.get("address")
        if not isinstance(node_id, str) or not node_id:
            raise ValueError(f"{where}: 'id' must be a non-empty string")
        if not isinstance(address, str):
            raise ValueError(f"{where}: 'address' must be a string")
        weight: Any = entry.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, int | float):
            raise ValueError(f"{where}: 'weight' must be a number")
        if not (math.isfinite(weight) and weight > 0):
            raise ValueError(f"{where}: weight must be > 0, got {weight!r}")
        try:
            nodes.append(Node(node_id, address, float(weight)))
        except ValueError as exc:
            raise ValueError(f"{where}: {exc}") from None
    try:
        check_unique_ids(nodes)
    except ValueError as exc:
        raise ValueError(f"{source}: {exc}") from None
    return nodes


def _decode(text: str, path: Path) -> object:
    suffix = path.suffix.lower()
    if suffix == ".json":
        return json.loads(text)
    if suffix == ".toml":
        return tomllib.loads(text)
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return tomllib.loads(text)


def load_nodes(path: str | os.PathLike[str]) -> list[Node]:
    """Read and validate a membership file (JSON by ``.json``, TOML by ``.toml``, else either).

    Raises:
        OSError: The file cannot be read.
        ValueError: It does not parse or does not validate (one line, naming the file).
    """
    p = Path(path)
    text = p.read_text(encoding="utf-8")
    try:
        data = _decode(text, p)
    except (json.JSONDecodeError, tomllib.TOMLDecodeError) as exc:
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ValueError(f"{p}: not valid TOML or JSON: {first}") from None
    return parse_nodes(data, str(p))


class Membership:
    """The current worker list, static or read from a file that may change at run time.

    Thread-safety: `nodes` may be called from any thread; at most one caller re-reads the file.

    Args:
        nodes: A static node list (ignored when built with `from_file`).

    Raises:
        ValueError: Duplicate node ids.
    """

    def __init__(self, nodes: Sequence[Node] = ()) -> None:
        current = tuple(nodes)
        check_unique_ids(current)
        self._nodes = current
        self._path: Path | None = None
        self._poll_s = 0.0
        self._clock: Callable[[], float] = time.monotonic
        self._lock = threading.Lock()
        self._next_check = 0.0
        self._seen: tuple[int, ...] | None = None  # stat signature of the last file version read
        self._version = 0

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        *,
        poll_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> Membership:
        """Membership from a TOML or JSON file that is re-read when it changes.

        Args:
            path: The membership file. It must be valid now; later bad versions are skipped.
            poll_s: At most one ``stat`` of the file per this many seconds.
            clock: Monotonic clock in seconds; injectable for tests.

        Raises:
            OSError: The file cannot be read.
            ValueError: The file is invalid (one line).
        """
        self = cls()
        p = Path(path)
        self._path = p
        self._poll_s = poll_s
        self._clock = clock
        sig = _signature(os.stat(p))
        self._nodes = tuple(load_nodes(p))
        self._seen = sig
        self._next_check = clock() + poll_s
        return self

    @property
    def path(self) -> Path | None:
        """The membership file, or None for a static list."""
        return self._path

    @property
    def version(self) -> int:
        """Incremented each time `nodes` picks up a changed list; cheap change detection."""
        return self._version

    def nodes(self) -> list[Node]:
        """The current node list; re-reads the file if it changed since the last look.

        Never raises for a bad file: the last good list stays, and a warning is logged once per
        bad version of the file.
        """
        if self._path is not None:
            with self._lock:
                now = self._clock()
                if now >= self._next_check:
                    self._next_check = now + self._poll_s
                    self._poll(self._path)
        return list(self._nodes)

    def _poll(self, path: Path) -> None:
        try:
            sig = _signature(os.stat(path))
        except OSError as exc:
            if self._seen != ():
                self._seen = ()
                log.warning(
                    "membership file %s unreadable (%s); keeping the last good list", path, exc
                )
            return
        if sig == self._seen:
            return
        self._seen = sig
        try:
            nodes = tuple(load_nodes(path))
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            log.warning("%s; keeping the last good list of %d nodes", exc, len(self._nodes))
            return
        if nodes != self._nodes:
            old = {n.node_id for n in self._nodes}
            new = {n.node_id for n in nodes}
            log.info(
                "membership file %s changed: %d nodes (added %s, removed %s)",
                path,
                len(nodes),
                sorted(new - old),
                sorted(old - new),
            )
            self._nodes = nodes
            self._version += 1


def _signature(st: os.stat_result) -> tuple[int, ...]:
    # The inode catches an atomic rename; ctime catches a same-size rewrite within one mtime tick.
    return (st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


Identify = Callable[[str], Awaitable[tuple[str, float]]]
Resolve = Callable[[str, int], Awaitable[list[str]]]


async def resolve_addresses(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (A and AAAA), sorted, without duplicates."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return sorted({str(info[4][0]) for info in infos})


def parse_dns_target(target: str, default_port: int) -> tuple[str, int]:
    """``"NAME"`` or ``"NAME:PORT"`` -> (name, port).

    Raises:
        ValueError: empty name or a port that is not 1..65535.
    """
    host, sep, port = target.rpartition(":")
    if not sep:
        host, port = target, str(default_port)
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"peers_dns {target!r}: expected NAME or NAME:PORT")
    return host, int(port)


class DnsMembership(Membership):
    """Workers discovered through one DNS name, such as a Kubernetes headless Service.

    The name resolves to one address per worker pod. An address seen for the first time is asked
    who it is (``identify``: the worker's ``/v1/info``, which names its stable node id and
    weight), because selection hashes node ids, never addresses. Addresses that leave the DNS
    answer leave the list; one that cannot be identified yet is retried at the next refresh.
    A failed lookup keeps the last list (a DNS hiccup must not empty the cluster).

    Call order: construct, then ``await refresh()`` periodically from one task (the worker's
    housekeeping); ``nodes()`` and ``version`` may be read from any thread.

    Args:
        host: The DNS name.
        port: The workers' port.
        scheme: ``http`` or ``https``.
        interval_s: At most one lookup per this many seconds (``refresh(force=True)`` ignores it).
        resolve: Name -> addresses; injectable for tests.
        clock: Monotonic clock in seconds.
    """

    def __init__(
        self,
        host: str,
        port: int,
        *,
        scheme: str = "http",
        interval_s: float = 10.0,
        resolve: Resolve = resolve_addresses,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        self.host, self.port, self.scheme = host, port, scheme
        self._interval_s = interval_s
        self._resolve = resolve
        self._clock = clock
        self._identified: dict[str, Node] = {}  # address URL -> node
        self._failed_lookup = False

    def _url(self, address: str) -> str:
        host = f"[{address}]" if ":" in address else address
        return f"{self.scheme}://{host}:{self.port}"

    async def refresh(self, identify: Identify, *, force: bool = False) -> None:
        """Look the name up (if due) and identify new addresses; never raises."""
        now = self._clock()
        if not force and now < self._next_check:
            return
        self._next_check = now + self._interval_s
        try:
            addresses = await self._resolve(self.host, self.port)
        except OSError as exc:
            if not self._failed_lookup:
                log.warning(
                    "peers_dns %s: lookup failed (%s); keeping %d nodes",
                    self.host,
                    exc,
                    len(self._nodes),
                )
            self._failed_lookup = True
            return
        self._failed_lookup = False
        urls = [self._url(a) for a in addresses]
        known = {u: n for u, n in self._identified.items() if u in urls}

        async def ask(url: str) -> None:
            try:
                node_id, weight = await identify(url)
                known[url] = Node(node_id, url, weight)
            except Exception as exc:  # retried at the next refresh
                log.warning("peers_dns %s: %s did not identify itself: %s", self.host, url, exc)

        await asyncio.gather(*(ask(u) for u in urls if u not in known))
        self._identified = known
        by_id: dict[str, Node] = {}
        for url in urls:  # one node per id: a pod replaced in place keeps its id
            node = known.get(url)
            if node is not None:
                by_id[node.node_id] = node
        nodes = tuple(sorted(by_id.values(), key=lambda n: n.node_id))
        if nodes != self._nodes:
            old = {n.node_id for n in self._nodes}
            log.info(
                "peers_dns %s: %d nodes (added %s, removed %s)",
                self.host,
                len(nodes),
                sorted(set(by_id) - old),
                sorted(old - set(by_id)),
            )
            with self._lock:
                self._nodes = nodes
                self._version += 1
