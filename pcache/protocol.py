"""The worker's HTTP protocol, shared by the worker, its peers and the client.

Every request carries ``Authorization: Bearer <token>`` (the cluster's shared token); only
``/healthz`` is open. Errors travel as ``{"error": "...", "kind": "..."}`` with a status code
from one table (:data:`STATUS_BY_KIND`), and :func:`error_from_response` turns them back into the
same exception classes on the other side, so a missing object is a ``FileNotFoundError`` to a
client whether it came from the backing store, a peer or the local worker.

Routes (``{ns}`` is a namespace from the worker's ``backends``, ``{key}`` an object key)::

    GET  /healthz                         liveness, no token
    GET  /v1/info                         node id, block size, namespaces, cluster members
    GET  /v1/stat/{ns}/{key}              object metadata (metadata cache)
    POST /v1/stats/{ns}                   {keys, full}: several stats at once (stat-ahead)
    GET  /v1/list/{ns}?prefix=&delimiter=[&limit=&after=]  a whole listing, or one page of it
    GET  /v1/block/{ns}/{key}?version=&index=&size=[&peer=1][&cached_only=1]
    POST /v1/prefetch                     {ns, key, version, size, indexes}: load into the cache
    POST /v1/shm/read                     {ns, key, version, size, offset, length, segment, segment_offset}
    POST /v1/shm/release                  {segment}
    POST /v1/touch                        {blocks: [[ns, key, version, index, bytes]]}: hits a
                                          client on this node read from the cache files
    POST /v1/write/{ns}/{key}             open a write session -> {session}
    PUT  /v1/session/{id}?offset=N        body: bytes at offset
    POST /v1/session/{id}/shm             {offset, length, segment, segment_offset}
    POST /v1/session/{id}/commit          {durable, size, metadata, close, timeout, progress,
                                          source} -> stat
    DELETE /v1/session/{id}               abort
    POST /v1/flush/{ns}/{key}             wait until remote-durable
    PUT  /v1/object/{ns}/{key}?durable=   body: a small object, X-Pcache-Metadata: {json};
                                          staged + journalled (+ uploaded when remote) -> stat
    DELETE /v1/object/{ns}/{key}?durable= journal a delete (remote: wait for the store)
    POST /v1/session/{id}/reserve         {size, progress}: capacity for a direct writer
                                          -> {reserved}
    POST /v1/session/{id}/uploaded        {beyond, wait}: the prefix its early upload holds
                                          (waits up to ``wait`` s to pass ``beyond``) -> {uploaded}
    POST /v1/session/{id}/truncate        {size}
    POST /v1/rename                       {ns, old, new, durable, noreplace}
    POST /v1/meta/{ns}/{key}              {metadata, durable}: replace user metadata
    GET  /v1/uploads                      this node's write-back records
    POST /v1/uploads/{retry|discard}      {ns, key}
    POST /v1/invalidate                   {ns, path, cluster, landed: {owner, version}}
    POST /v1/announce                     {owner, entries: [{ns, key, version, info|null}]}:
                                          peers' pending write-back versions (pcache.announce)
    GET  /v1/announcements                the same body, of every change journalled here (asked
                                          by a peer when it starts)
    GET  /v1/status                       disks, counters, write-back backlog, peers
    GET  /metrics                         Prometheus
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass
from typing import Any

from objstore.base import ObjectInfo
from objstore.errors import (
    AccessDenied,
    EndpointUnreachable,
    InsufficientStorage,
    InvalidKey,
    NameTooLong,
    ObjectNotFound,
    PreconditionFailed,
    StorageError,
    TransientError,
)

log = logging.getLogger(__name__)

TOKEN_HEADER = "Authorization"
SOURCE_HEADER = "X-Pcache-Source"
VERSION_HEADER = "X-Pcache-Version"
METADATA_HEADER = "X-Pcache-Metadata"  # user metadata of a PUT object, as a JSON object

# error kind -> HTTP status; the client maps statuses back through ERROR_BY_KIND
STATUS_BY_KIND: dict[str, int] = {
    "not_found": 404,
    "bad_request": 400,
    "unauthorized": 401,
    "access_denied": 403,
    "stale": 409,
    "no_space": 507,
    "session_gone": 410,
    "upload_failed": 424,
    "name_too_long": 414,
    "exists": 412,
    "unavailable": 503,
    "bad_gateway": 502,
    "timeout": 504,
    "internal": 500,
}


class PcacheError(StorageError):
    """An error reported by a worker that maps to no more specific class."""


class Unauthorized(AccessDenied):
    """The worker refused the token (missing or wrong)."""


class StaleVersion(PreconditionFailed):
    """The object changed since its version was looked up; look it up again."""


class WriteError(StorageError):
    """A write session that cannot continue (closed, aborted, unknown to the worker, or its
    name removed while open)."""


class AlreadyExists(StorageError, FileExistsError):
    """The target exists (a rename that must not replace)."""


class UploadFailed(StorageError):
    """The store refused an upload for good; the data is kept until retried or discarded."""


ERROR_BY_KIND: dict[str, type[StorageError]] = {
    "not_found": ObjectNotFound,
    "bad_request": InvalidKey,
    "unauthorized": Unauthorized,
    "access_denied": AccessDenied,
    "stale": StaleVersion,
    "no_space": InsufficientStorage,
    "session_gone": WriteError,
    "upload_failed": UploadFailed,
    "name_too_long": NameTooLong,
    "exists": AlreadyExists,
    "unavailable": TransientError,
    "bad_gateway": EndpointUnreachable,
    "timeout": TransientError,
    "internal": PcacheError,
}


def kind_of(exc: BaseException) -> str:
    """The error kind a worker reports for an exception."""
    if isinstance(exc, Unauthorized):
        return "unauthorized"
    if isinstance(exc, PreconditionFailed):
        return "stale"
    if isinstance(exc, WriteError):
        return "session_gone"
    if isinstance(exc, UploadFailed):
        return "upload_failed"
    if isinstance(exc, NameTooLong):
        return "name_too_long"
    if isinstance(exc, FileExistsError):
        return "exists"
    if isinstance(exc, FileNotFoundError | KeyError):
        return "not_found"
    if isinstance(exc, PermissionError):
        return "access_denied"
    if isinstance(exc, InvalidKey | ValueError):
        return "bad_request"
    if isinstance(exc, OSError) and exc.errno == errno.ENOSPC:
        return "no_space"
    if isinstance(exc, EndpointUnreachable):
        return "bad_gateway"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, TransientError):
        return "unavailable"
    return "internal"


def error_body(exc: BaseException) -> tuple[int, dict[str, str]]:
    kind = kind_of(exc)
    message = str(exc) if not isinstance(exc, KeyError) else f"unknown name {exc.args[0]!r}"
    return STATUS_BY_KIND[kind], {"error": message or type(exc).__name__, "kind": kind}


def error_from_response(status: int, body: Any, url: str = "") -> StorageError:
    """The exception a worker's error response stands for."""
    kind = body.get("kind") if isinstance(body, dict) else None
    message = body.get("error") if isinstance(body, dict) else None
    if kind not in ERROR_BY_KIND:
        kind = next((k for k, s in STATUS_BY_KIND.items() if s == status), "internal")
    cls = ERROR_BY_KIND[kind]
    return cls(message or f"worker answered HTTP {status}", url=url)


def info_to_json(info: ObjectInfo, *, full: bool = True) -> dict[str, Any]:
    """An object's stat as the protocol sends it; ``full``: its user metadata is known (a
    HEAD or a local write), not just what a listing says."""
    data: dict[str, Any] = {
        "key": info.key,
        "size": info.size,
        "mtime": info.mtime,
        "etag": info.etag,
    }
    if info.metadata:
        data["metadata"] = info.metadata
    if full:
        data["full"] = True
    return data


def info_from_json(data: dict[str, Any]) -> ObjectInfo:
    metadata = data.get("metadata")
    if not metadata:  # most of a listing: the cheaper constructor
        return ObjectInfo.listed(
            data["key"], int(data["size"]), float(data["mtime"]), data.get("etag", "")
        )
    return ObjectInfo(
        data["key"],
        int(data["size"]),
        float(data["mtime"]),
        data.get("etag", ""),
        metadata=dict(metadata),
    )


PENDING_PREFIX = "wb-"  # versions of writes journalled on a worker and not yet in the store


def is_pending(version: str) -> bool:
    """Whether an object version names a write not yet in the store (a write-back record):
    only the worker that journalled it can serve its bytes."""
    return version.startswith(PENDING_PREFIX)


def pending_session(version: str) -> str:
    """The staging session a pending version belongs to."""
    return version[len(PENDING_PREFIX) :].partition(".")[0]


@dataclass(frozen=True)
class Progress:
    """A direct writer's report on its staging file (``progress`` in reserve and commit).

    Attributes:
        frontier: it has written ``[0, frontier)`` contiguously.
        dirty: ranges ``[start, end)`` below its previous report's frontier written over since.
        released: the prefix it dropped from the disk (the early upload holds those bytes).
    """

    frontier: int
    dirty: tuple[tuple[int, int], ...] = ()
    released: int = 0

    def to_json(self) -> dict[str, Any]:
        return {
            "frontier": self.frontier,
            "dirty": [list(r) for r in self.dirty],
            "released": self.released,
        }

    @classmethod
    def from_json(cls, value: Any) -> Progress | None:
        """Parse a request's ``progress`` (None when absent); ``ValueError`` when malformed."""
        if value is None:
            return None
        if not isinstance(value, dict):
            raise ValueError("progress must be an object")
        try:
            frontier = int(value["frontier"])
            released = int(value.get("released", 0))
            dirty = tuple((int(a), int(b)) for a, b in value.get("dirty", ()))
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed progress: {exc}") from None
        if frontier < 0 or released < 0 or any(a < 0 or b < a for a, b in dirty):
            raise ValueError("progress offsets must be ordered and non-negative")
        return cls(frontier, dirty, released)


@dataclass(frozen=True)
class CopySource:
    """Where a staging file's holes come from (``source`` in commit): a file opened for writing
    without ``O_TRUNC`` copies the object it was opened from block by block, when first read or
    partly written; the ``ranges`` still untouched are that object's bytes, reused at upload
    (UploadPartCopy where the store can, else read from it).

    Attributes:
        key: the object (in the same namespace) at the version ``etag``.
        ranges: ``[start, end)`` spans of the staging file that are its bytes, not yet copied.
    """

    key: str
    etag: str
    ranges: tuple[tuple[int, int], ...]

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "etag": self.etag, "ranges": [list(r) for r in self.ranges]}

    @classmethod
    def from_json(cls, value: Any) -> CopySource | None:
        """Parse a request's ``source`` (None when absent); ``ValueError`` when malformed."""
        if value is None:
            return None
        try:
            key, etag = str(value["key"]), str(value["etag"])
            ranges = tuple((int(a), int(b)) for a, b in value["ranges"])
        except (KeyError, TypeError, ValueError) as exc:
            raise ValueError(f"malformed source: {exc}") from None
        if not key or not etag or any(a < 0 or b <= a for a, b in ranges):
            raise ValueError("a source needs a key, an etag and ordered ranges")
        return cls(key, etag, ranges)


@dataclass(frozen=True)
class Resolved:
    """What a path names, in one answer (``GET /v1/resolve``): the lookup of a name a mount
    has not seen costs one request to the worker and, in the store, a HEAD beside a LIST of at
    most two keys (never the whole directory).

    Attributes:
        file: the object ``KEY`` (a file or a symlink); None when there is none or it was not
            asked for.
        marker: the directory marker ``KEY/`` with its user metadata; None when there is none
            or it was not asked for.
        has_marker: whether the marker ``KEY/`` exists.
        children: whether anything but the marker is under ``KEY/``, as this node sees it.
    """

    file: ObjectInfo | None
    marker: ObjectInfo | None
    has_marker: bool
    children: bool

    @property
    def directory(self) -> bool:
        return self.has_marker or self.children

    def to_json(self) -> dict[str, Any]:
        return {
            "file": None if self.file is None else info_to_json(self.file),
            "marker": None if self.marker is None else info_to_json(self.marker),
            "has_marker": self.has_marker,
            "children": self.children,
        }

    @classmethod
    def from_json(cls, value: Any) -> Resolved:
        """Parse an answer; ``ValueError`` when malformed."""
        try:
            file, marker = value["file"], value["marker"]
            return cls(
                None if file is None else info_from_json(file),
                None if marker is None else info_from_json(marker),
                bool(value["has_marker"]),
                bool(value["children"]),
            )
        except (KeyError, TypeError) as exc:
            raise ValueError(f"malformed resolve answer: {exc}") from None


def block_key(namespace: str, key: str, index: int) -> str:
    """The name worker selection hashes for one block (stable across versions)."""
    return f"{namespace}/{key}#{index}"


def split_path(path: str) -> tuple[str, str]:
    """``pcache://ns/key`` or ``ns/key`` -> (namespace, key); the key may be empty."""
    if path.startswith("pcache://"):
        path = path[len("pcache://") :]
    path = path.lstrip("/")
    namespace, _, key = path.partition("/")
    if not namespace:
        raise ValueError(f"no namespace in pcache path {path!r}")
    return namespace, key
