"""Worker and client configuration: the ``[pcache]`` table of the project's TOML file.

One file serves a node: ``[profiles.*]`` (endpoints and credentials, see
:mod:`objstore.config`) and ``[pcache]``::

    [pcache]
    node_id = "node-1"                 # stable id: worker selection hashes it, never the address
    listen = "0.0.0.0:7070"            # address peers and clients reach
    advertise = "http://10.0.0.1:7070" # what peers are told (default: http://<listen>)
    token = "..."                      # shared by every node; $PCACHE_TOKEN overrides
    state_dir = "/var/lib/pcache"      # LMDB index and write-back journal
    block_size = "4MiB"
    peers = [{ id = "node-2", address = "http://10.0.0.2:7070", weight = 1.0 }]
    membership_file = ""               # or a file of [[nodes]] that may change at run time
    peers_dns = ""                     # or NAME[:PORT] resolving to every worker (k8s headless Service)
    weight = 1.0                       # this worker's share of blocks (its cache capacity)

    [[pcache.cache_dirs]]              # one per NVMe disk
    path = "/nvme0/pcache"
    capacity = "800GiB"

    [pcache.backends]                  # pcache://NAME/key reads NAME's store
    datasets = "s3://region-b@datasets"

Environment overrides: ``PCACHE_CONFIG`` (the file), ``PCACHE_NODE_ID``, ``PCACHE_LISTEN``,
``PCACHE_ADVERTISE``, ``PCACHE_PEERS_DNS``, ``PCACHE_TOKEN``, ``PCACHE_WORKER`` (the local worker a client talks to). Unknown keys are
rejected; the token is a :class:`~objstore.config.Secret`.
"""

from __future__ import annotations

import dataclasses
import enum
import logging
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from objstore.config import Config, Secret, read_toml
from objstore.errors import ConfigError

from .membership import parse_dns_target
from .selection import DEFAULT_LOAD_FACTOR

log = logging.getLogger(__name__)

CONFIG_ENV = "PCACHE_CONFIG"
SECTION = "pcache"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$")
_SIZE_RE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([KMGT]?)(i?B)?\s*$", re.IGNORECASE)


class Durability(enum.StrEnum):
    """When a write counts as done: ``local`` once fsynced on a cache disk and journalled (the
    upload follows in the background), ``remote`` once it is in the backing store."""

    LOCAL = "local"
    REMOTE = "remote"


def parse_size(value: Any, what: str) -> int:
    """``4194304``, ``"4MiB"``, ``"800GiB"``, ``"1.5G"``: bytes (K/M/G/T are binary)."""
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 0:
            raise ConfigError(f"{what} must be >= 0")
        return value
    match = _SIZE_RE.match(str(value)) if isinstance(value, str) else None
    if match is None:
        raise ConfigError(f"{what}: not a size: {value!r} (examples: 4194304, 4MiB, 800GiB)")
    unit = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}[match.group(2).lower()]
    return int(float(match.group(1)) * unit)


@dataclass(frozen=True)
class CacheDirConfig:
    """One cache directory (one NVMe disk) and the bytes it may hold.

    Attributes:
        path: the directory (created if missing); one per disk.
        capacity: bytes pcache may keep there (``"800GiB"``); eviction keeps it below.
    """

    path: Path
    capacity: int


@dataclass(frozen=True)
class PeerConfig:
    """A node of the cluster as the static peer list names it.

    Attributes:
        id: the node's ``node_id``.
        address: its URL, ``http://host:port``.
        weight: its share of blocks relative to the others (its cache capacity).
    """

    id: str
    address: str
    weight: float = 1.0


@dataclass(frozen=True)
class WorkerConfig:
    """Everything one ``pcache worker`` needs.

    Attributes:
        node_id: stable node id (hash input for worker selection).
        listen: ``host:port`` to bind.
        advertise: the URL peers and clients use for this worker.
        token: the cluster's shared token; every request must carry it.
        state_dir: LMDB index and write-back journal.
        cache_dirs: cache directories with their capacities.
        backends: namespace name -> store URL.
        block_size: bytes per cached block.
        peers: the static peer list (this node may be in it; it is skipped).
        membership_file: a node list that may change at run time (overrides ``peers``).
        peers_dns: ``NAME[:PORT]`` whose addresses are the workers (a Kubernetes headless
            Service); each new address is asked its node id. Excludes ``membership_file``.
        peers_dns_interval: seconds between two lookups of ``peers_dns``.
        weight: this worker's share of blocks relative to the others (its cache capacity).
        load_factor: the bounded-load cap of worker selection, for this worker and the clients
            it serves: a worker takes at most this multiple of its weighted share of recent
            choices (>= 1). Lower balances tighter (1.1 keeps the busiest worker within about
            10% of the mean); higher keeps more blocks on their home workers (fewer copies of
            hot data across the cluster's caches).
        metadata_ttl: seconds a stat or listing is trusted.
        negative_ttl: seconds a "does not exist" is trusted; in a directory this worker is
            writing into, also a listing's silence about a name (bulk creates ask no store).
        immutable: the datasets never change: metadata never expires.
        serve_stale: seconds past its TTL cached metadata is still answered while the store
            cannot be reached (stale-if-error; 0: never).
        readahead_blocks: blocks fetched ahead on sequential reads.
        fetch_concurrency: parallel backend/peer fetches.
        upload_part_size: part size for write-back uploads.
        upload_concurrency: objects uploaded in parallel.
        upload_delay: seconds a committed write waits before its upload starts, so a quick
            rename, chmod or rewrite replaces it instead of uploading it twice (an ``fsync``
            starts it at once).
        request_timeout: seconds for one peer request.
        profiles: the objstore profiles of the same file.
    """

    node_id: str
    listen: str = "127.0.0.1:7070"
    advertise: str = ""
    token: Secret = field(default_factory=lambda: Secret(""))
    state_dir: Path = Path("/var/lib/pcache")
    cache_dirs: tuple[CacheDirConfig, ...] = ()
    backends: Mapping[str, str] = field(default_factory=dict)
    block_size: int = 4 << 20
    peers: tuple[PeerConfig, ...] = ()
    membership_file: Path | None = None
    peers_dns: str = ""
    peers_dns_interval: float = 10.0
    weight: float = 1.0
    load_factor: float = DEFAULT_LOAD_FACTOR
    metadata_ttl: float = 30.0
    negative_ttl: float = 5.0
    immutable: bool = False
    serve_stale: float = 3600.0
    readahead_blocks: int = 4
    fetch_concurrency: int = 32
    upload_part_size: int = 16 << 20
    upload_concurrency: int = 4
    upload_delay: float = 0.5
    request_timeout: float = 30.0
    profiles: Config = field(default_factory=Config, repr=False)

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.node_id):
            raise ConfigError(
                f"pcache.node_id {self.node_id!r}: use letters, digits, '.', '_' or '-'"
            )
        host, sep, port = self.listen.rpartition(":")
        if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
            raise ConfigError(f"pcache.listen {self.listen!r}: expected HOST:PORT")
        if not self.token:
            raise ConfigError("pcache.token is empty: set it in the config or $PCACHE_TOKEN")
        if not self.cache_dirs:
            raise ConfigError("pcache.cache_dirs is empty: name at least one cache directory")
        if len({d.path.resolve() for d in self.cache_dirs}) != len(self.cache_dirs):
            raise ConfigError("pcache.cache_dirs names the same directory twice")
        for name in self.backends:
            if not _NAME_RE.match(name):
                raise ConfigError(f"pcache.backends: bad namespace name {name!r}")
        if not self.backends:
            raise ConfigError("pcache.backends is empty: map a name to a store URL")
        if self.block_size < 64 << 10 or self.block_size & (self.block_size - 1):
            raise ConfigError("pcache.block_size must be a power of two >= 64KiB")
        if self.upload_part_size < 5 << 20:
            raise ConfigError("pcache.upload_part_size must be >= 5MiB (S3/OSS minimum)")
        if self.peers_dns and self.membership_file:
            raise ConfigError("pcache.peers_dns and pcache.membership_file exclude each other")
        if self.peers_dns:
            try:
                parse_dns_target(self.peers_dns, self.port)
            except ValueError as exc:
                raise ConfigError(f"pcache.{exc}") from None
        if not (math.isfinite(self.load_factor) and self.load_factor >= 1):
            raise ConfigError(f"pcache.load_factor must be >= 1, got {self.load_factor!r}")
        if not (math.isfinite(self.weight) and self.weight > 0):
            raise ConfigError(f"pcache.weight must be > 0, got {self.weight!r}")
        for name in (
            "metadata_ttl",
            "negative_ttl",
            "serve_stale",
            "request_timeout",
            "peers_dns_interval",
            "upload_delay",
        ):
            if not getattr(self, name) >= 0:
                raise ConfigError(f"pcache.{name} must be >= 0")
        for name in ("readahead_blocks",):
            if getattr(self, name) < 0:
                raise ConfigError(f"pcache.{name} must be >= 0")
        for name in ("fetch_concurrency", "upload_concurrency"):
            if getattr(self, name) < 1:
                raise ConfigError(f"pcache.{name} must be >= 1")

    @property
    def port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def address(self) -> str:
        """The URL clients and peers use to reach this worker."""
        return self.advertise or f"http://{self.listen}"

    @classmethod
    def load(
        cls, path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
    ) -> WorkerConfig:
        """Load from ``path``, else ``$PCACHE_CONFIG``, else ``$OBJSTORE_CONFIG``.

        Raises:
            ConfigError: missing file, invalid TOML, unknown keys, bad values.
        """
        env = dict(os.environ if env is None else env)
        chosen = path or env.get(CONFIG_ENV) or env.get("OBJSTORE_CONFIG")
        data: dict[str, Any] = {}
        source = "<environment>"
        if chosen:
            source = str(Path(chosen).expanduser())
            data = read_toml(chosen)
        profiles = Config.from_mapping(
            data, source=source, env=env, path=Path(chosen) if chosen else None, sections=[SECTION]
        )
        table = data.get(SECTION, {})
        if not isinstance(table, Mapping):
            raise ConfigError(f"{source}: [{SECTION}] must be a table")
        return cls.from_mapping(table, source=source, env=env, profiles=profiles)

    @classmethod
    def from_mapping(
        cls,
        table: Mapping[str, Any],
        *,
        source: str = "<config>",
        env: Mapping[str, str] | None = None,
        profiles: Config | None = None,
    ) -> WorkerConfig:
        """Validate a ``[pcache]`` table (plus environment overrides)."""
        env = dict(os.environ if env is None else env)
        fields = {f.name for f in dataclasses.fields(cls)} - {"profiles"}
        unknown = sorted(set(table) - fields)
        if unknown:
            raise ConfigError(
                f"{source}: [{SECTION}]: unknown key {unknown[0]!r} (valid: {', '.join(sorted(fields))})"
            )
        values: dict[str, Any] = dict(table)
        for key, var in (
            ("node_id", "PCACHE_NODE_ID"),
            ("listen", "PCACHE_LISTEN"),
            ("advertise", "PCACHE_ADVERTISE"),
            ("peers_dns", "PCACHE_PEERS_DNS"),
            ("token", "PCACHE_TOKEN"),
        ):
            if env.get(var):
                values[key] = env[var]
        if "node_id" not in values:
            raise ConfigError(f"{source}: [{SECTION}] node_id is required (or $PCACHE_NODE_ID)")
        try:
            return cls(**_coerce(values, source), profiles=profiles or Config(env=env))
        except TypeError as exc:
            raise ConfigError(f"{source}: [{SECTION}]: {exc}") from None


def _coerce(values: dict[str, Any], source: str) -> dict[str, Any]:
    out = dict(values)
    where = f"{source}: [{SECTION}]"
    if "token" in out:
        if not isinstance(out["token"], str):
            raise ConfigError(f"{where} token must be a string")
        out["token"] = Secret(out["token"])
    for key in ("state_dir",):
        if key in out:
            out[key] = Path(str(out[key])).expanduser()
    if out.get("membership_file"):
        out["membership_file"] = Path(str(out["membership_file"])).expanduser()
    else:
        out["membership_file"] = None
    for key in ("block_size", "upload_part_size"):
        if key in out:
            out[key] = parse_size(out[key], f"{where} {key}")
    for key in ("metadata_ttl", "negative_ttl", "serve_stale", "request_timeout",
                "peers_dns_interval", "weight", "load_factor", "upload_delay"):  # fmt: skip
        if key in out:
            if isinstance(out[key], bool) or not isinstance(out[key], int | float):
                unit = "" if key in ("weight", "load_factor") else " of seconds"
                raise ConfigError(f"{where} {key} must be a number{unit}")
            out[key] = float(out[key])
    for key in ("readahead_blocks", "fetch_concurrency", "upload_concurrency"):
        if key in out and (isinstance(out[key], bool) or not isinstance(out[key], int)):
            raise ConfigError(f"{where} {key} must be a whole number")
    if "immutable" in out and not isinstance(out["immutable"], bool):
        raise ConfigError(f"{where} immutable must be true or false")
    dirs = []
    for i, entry in enumerate(out.get("cache_dirs", ())):
        if (
            not isinstance(entry, Mapping)
            or set(entry) - {"path", "capacity"}
            or "path" not in entry
        ):
            raise ConfigError(f"{where} cache_dirs[{i}] needs exactly path and capacity")
        capacity = parse_size(entry.get("capacity", 0), f"{where} cache_dirs[{i}].capacity")
        if capacity <= 0:
            raise ConfigError(f"{where} cache_dirs[{i}].capacity must be > 0")
        dirs.append(CacheDirConfig(Path(str(entry["path"])).expanduser(), capacity))
    out["cache_dirs"] = tuple(dirs)
    peers = []
    for i, entry in enumerate(out.get("peers", ())):
        if not isinstance(entry, Mapping) or set(entry) - {"id", "address", "weight"}:
            raise ConfigError(f"{where} peers[{i}] takes id, address and weight")
        try:
            peers.append(
                PeerConfig(str(entry["id"]), str(entry["address"]), float(entry.get("weight", 1.0)))
            )
        except KeyError as exc:
            raise ConfigError(f"{where} peers[{i}] is missing {exc.args[0]}") from None
    out["peers"] = tuple(peers)
    backends = out.get("backends", {})
    if not isinstance(backends, Mapping) or not all(isinstance(v, str) for v in backends.values()):
        raise ConfigError(f'{where} backends must be a table of name = "URL"')
    out["backends"] = dict(backends)
    return out


@dataclass(frozen=True)
class ClientConfig:
    """What a client needs: its local worker and the cluster token.

    The rest (the cluster's members, block size, namespaces) the client asks the worker for.
    Clients (the mount, the fsspec filesystem, ckpt's ``pcache://``) read these from the
    environment, or the worker's address and token from a ``[pcache]`` table.

    Attributes:
        worker: the local worker's URL. ``$PCACHE_WORKER``; else the file's ``advertise`` or
            ``listen``.
        token: the cluster token. ``$PCACHE_TOKEN``; else the file's ``token``.
        timeout: seconds for one request to a worker before trying the next one, then the
            backing store. ``$PCACHE_TIMEOUT``.
        shm: move large reads and writes through shared memory (/dev/shm) with a worker on the
            same node.
        shm_threshold: reads of at least this many bytes use shared memory.
        direct_reads: read local cache hits straight from the worker's cache files.
        last_known: seconds what a worker (or the store) last answered is used while neither
            a worker nor the store can be reached (stats, lookups, directory pages; a name
            never seen stays an error); 0: never.
        backends: namespace -> store URL, the file's ``[pcache.backends]``: what a client that
            has not reached a worker yet reads directly (with the file's profiles); once a
            worker answers, its own list is used.
        block_size: the file's ``block_size`` (the workers' block size), for those reads.
        config_file: the file these came from, whose ``[profiles.*]`` open the stores.
    """

    worker: str = "http://127.0.0.1:7070"
    token: Secret = field(default_factory=lambda: Secret(""))
    timeout: float = 30.0
    shm: bool = True
    shm_threshold: int = 1 << 20
    direct_reads: bool = True  # read local cache hits from the worker's files (same node)
    last_known: float = 3600.0  # seconds an answer is kept for when no worker nor the store can
    backends: Mapping[str, str] = field(default_factory=dict)
    block_size: int = 4 << 20
    config_file: Path | None = None

    @classmethod
    def load(
        cls, path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None
    ) -> ClientConfig:
        """From ``$PCACHE_WORKER`` + ``$PCACHE_TOKEN``, else the ``[pcache]`` table of a file
        (its ``advertise``/``listen`` and ``token``); ``$PCACHE_TIMEOUT`` (seconds) bounds each
        request to a worker."""
        env = dict(os.environ if env is None else env)
        worker = env.get("PCACHE_WORKER", "")
        token = env.get("PCACHE_TOKEN", "")
        chosen = path or env.get(CONFIG_ENV)
        extra: dict[str, Any] = {}
        if chosen:
            table = read_toml(chosen).get(SECTION, {})
            if not isinstance(table, Mapping):
                raise ConfigError(f"{chosen}: [{SECTION}] must be a table")
            if not worker:
                worker = table.get("advertise") or (
                    f"http://{table['listen']}" if table.get("listen") else ""
                )
            token = token or table.get("token", "")
            known = _coerce(
                {k: table[k] for k in ("backends", "block_size") if k in table}, str(chosen)
            )
            extra = {
                "backends": known["backends"],
                "block_size": known.get("block_size", cls.block_size),
                "config_file": Path(chosen).expanduser(),
            }
        if not token:
            raise ConfigError(
                "no pcache token: set $PCACHE_TOKEN or give --config with [pcache] token"
            )
        timeout = cls.timeout
        if env.get("PCACHE_TIMEOUT"):
            try:
                timeout = float(env["PCACHE_TIMEOUT"])
            except ValueError:
                raise ConfigError(
                    f"PCACHE_TIMEOUT must be seconds, not {env['PCACHE_TIMEOUT']!r}"
                ) from None
            if timeout <= 0:
                raise ConfigError("PCACHE_TIMEOUT must be > 0")
        return cls(worker=worker or cls.worker, token=Secret(token), timeout=timeout, **extra)
