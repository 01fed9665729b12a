"""The job journal: one LMDB environment per sync job, the single source of truth for resume.

Named databases inside the environment:

- ``src`` / ``dst``: the listing manifests, key -> (size, mtime, etag), sorted by key bytes (the
  order object stores list in), so the plan is a streaming merge-join with bounded memory however
  many keys there are.
- ``listing``: cursors of unfinished listing ranges, so a resumed listing continues where it was.
- ``objects``: per-object transfer state: done (with its CRC), or an open multipart upload with
  the parts completed so far.
- ``meta``: job identity and phase markers (``src_listed``, ``dst_listed``, ``complete``).

LMDB commits are atomic, so a ``kill -9`` between any two statements leaves the journal
consistent; commits are flushed to disk every second rather than one fsync each (a killed process
loses nothing; an OS crash at most the last second of work, which a rerun redoes). Writes go one transaction per
listing page (:class:`ManifestWriter`), committed before the lister saves its cursor.
"""

from __future__ import annotations

import hashlib
import json
import logging
import struct
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import lmdb

from objstore import ObjectInfo

log = logging.getLogger(__name__)

_MAP_SIZE = 1 << 40  # address space only: LMDB files grow as they fill (sparse)
_ENTRY = struct.Struct("<Qd")


def job_id(*parts: str) -> str:
    """A stable id for a job from what defines it (URLs, filters, mode)."""
    return hashlib.sha256("\0".join(parts).encode()).hexdigest()[:16]


def encode_entry(info: ObjectInfo) -> bytes:
    return _ENTRY.pack(info.size, info.mtime) + info.etag.encode()


def decode_entry(key: bytes, value: bytes) -> ObjectInfo:
    size, mtime = _ENTRY.unpack_from(value)
    return ObjectInfo(key.decode(), size, mtime, value[_ENTRY.size :].decode())


@dataclass
class ObjectState:
    """What the journal knows about one object's transfer.

    Attributes:
        status: ``uploading`` (multipart in progress), ``copied`` (all bytes at the destination,
            not yet verified) or ``done`` (copied and verified).
        crc: CRC-64/NVME of the content, once known.
        upload_id: the open multipart upload, while uploading.
        part_size: the part size that upload uses (a resume must keep it).
        parts: completed parts: number -> (etag, size, crc64nvme).
        src_etag: the source version being copied; a changed source restarts the object.
    """

    status: str
    crc: int | None = None
    upload_id: str = ""
    part_size: int = 0
    parts: dict[int, tuple[str, int, int]] = field(default_factory=dict)
    src_etag: str = ""

    def encode(self) -> bytes:
        record = {
            "s": self.status,
            "c": self.crc,
            "u": self.upload_id,
            "ps": self.part_size,
            "p": {str(n): list(v) for n, v in self.parts.items()},
            "e": self.src_etag,
        }
        return json.dumps(record, separators=(",", ":")).encode()

    @classmethod
    def decode(cls, raw: bytes) -> ObjectState:
        r = json.loads(raw)
        parts = {int(n): (v[0], int(v[1]), int(v[2])) for n, v in r.get("p", {}).items()}
        return cls(r["s"], r.get("c"), r.get("u", ""), r.get("ps", 0), parts, r.get("e", ""))


class Journal:
    """The LMDB journal of one job. Thread-safe (LMDB serialises writers itself).

    Args:
        directory: where the environment lives (created if missing).
        identity: what defines the job; a journal holding another job's data is refused.
    """

    def __init__(self, directory: str | Path, identity: dict[str, Any]) -> None:
        self.directory = Path(directory)
        self.directory.mkdir(parents=True, exist_ok=True)
        # No fsync per commit: a commit is in the page cache when it returns, which a killed
        # process cannot lose; only an OS crash can lose the last second, which a rerun redoes.
        # A flusher thread makes it durable every second, close() at the end.
        self.env = lmdb.open(
            str(self.directory), map_size=_MAP_SIZE, max_dbs=8, sync=False, metasync=False
        )
        self._closed = threading.Event()
        self._flusher = threading.Thread(target=self._flush_loop, name="journal-sync", daemon=True)
        self._flusher.start()
        self._dbs = {
            name: self.env.open_db(name.encode())
            for name in ("src", "dst", "listing", "objects", "meta")
        }
        self._lock = threading.Lock()
        self._multipart_noted = False
        existing = self.get_meta("identity")
        if existing is not None and existing != identity:
            raise ValueError(
                f"journal {self.directory} belongs to another job ({existing}); "
                "use another --journal directory"
            )
        if existing is None:
            self.set_meta("identity", identity)
            self.set_meta("created", time.time())

    def _flush_loop(self) -> None:
        while not self._closed.wait(1.0):
            self.env.sync(True)

    def sync(self) -> None:
        """Make every commit so far durable on disk."""
        self.env.sync(True)

    def close(self) -> None:
        if self._closed.is_set():
            return
        self._closed.set()
        self._flusher.join()
        self.env.sync(True)
        self.env.close()

    def __enter__(self) -> Journal:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- meta ----------------------------------------------------------------------------

    def get_meta(self, name: str) -> Any:
        with self.env.begin(db=self._dbs["meta"]) as txn:
            raw = txn.get(name.encode())
        return None if raw is None else json.loads(raw)

    def set_meta(self, name: str, value: Any) -> None:
        with self.env.begin(db=self._dbs["meta"], write=True) as txn:
            txn.put(name.encode(), json.dumps(value).encode())

    def note_multipart(self) -> None:
        """Record, before the first CreateMultipartUpload, that this job starts uploads: only
        then can a crash leave an upload the journal does not know (see the engine's orphan
        clean-up, which is skipped for jobs that never started one)."""
        if not self._multipart_noted:
            self.set_meta("multipart_started", True)
            self._multipart_noted = True

    @property
    def multipart_started(self) -> bool:
        return self._multipart_noted or bool(self.get_meta("multipart_started"))

    @property
    def complete(self) -> bool:
        return bool(self.get_meta("complete"))

    def reset(self) -> None:
        """Start the job over (its previous run completed): drop manifests and states."""
        with self.env.begin(write=True) as txn:
            for name in ("src", "dst", "listing", "objects"):
                txn.drop(self._dbs[name], delete=False)
            meta = self._dbs["meta"]
            for marker in ("src_listed", "dst_listed", "complete"):
                txn.delete(marker.encode(), db=meta)

    # -- manifests -----------------------------------------------------------------------

    def manifest_writer(self, side: str) -> ManifestWriter:
        return ManifestWriter(self, side)

    def clear_manifest(self, side: str) -> None:
        with self.env.begin(write=True) as txn:
            txn.drop(self._dbs[side], delete=False)

    def iter_manifest(self, side: str) -> Iterator[ObjectInfo]:
        """Every entry of a manifest in key order, read in chunks (no long-lived read txn)."""
        db = self._dbs[side]
        after: bytes | None = None
        while True:
            chunk: list[ObjectInfo] = []
            with self.env.begin(db=db) as txn:
                cursor = txn.cursor()
                found = cursor.set_range(after) if after is not None else cursor.first()
                if found and after is not None and cursor.key() == after:
                    found = cursor.next()
                while found and len(chunk) < 5000:
                    chunk.append(decode_entry(bytes(cursor.key()), bytes(cursor.value())))
                    found = cursor.next()
            if not chunk:
                return
            yield from chunk
            after = chunk[-1].key.encode()

    def manifest_stats(self, side: str) -> tuple[int, int]:
        """(objects, bytes) in a manifest."""
        count = total = 0
        for info in self.iter_manifest(side):
            count += 1
            total += info.size
        return count, total

    def has_key(self, side: str, key: str) -> bool:
        with self.env.begin(db=self._dbs[side]) as txn:
            return txn.get(key.encode()) is not None

    def put_entries(self, side: str, infos: list[ObjectInfo]) -> None:
        with self.env.begin(db=self._dbs[side], write=True) as txn:
            for info in infos:
                txn.put(info.key.encode(), encode_entry(info))

    # -- listing cursors (the lister's ListingState) -------------------------------------

    def listing_state(self, side: str) -> JournalListingState:
        return JournalListingState(self, side)

    # -- object states -------------------------------------------------------------------

    def get_object(self, key: str) -> ObjectState | None:
        with self.env.begin(db=self._dbs["objects"]) as txn:
            raw = txn.get(key.encode())
        return None if raw is None else ObjectState.decode(raw)

    def put_object(self, key: str, state: ObjectState) -> None:
        with self.env.begin(db=self._dbs["objects"], write=True) as txn:
            txn.put(key.encode(), state.encode())

    def record_part(self, key: str, part_number: int, etag: str, size: int, crc: int) -> None:
        """Add one completed part to an uploading object, atomically."""
        with self._lock, self.env.begin(db=self._dbs["objects"], write=True) as txn:
            raw = txn.get(key.encode())
            if raw is None:
                return
            state = ObjectState.decode(raw)
            state.parts[part_number] = (etag, size, crc)
            txn.put(key.encode(), state.encode())

    def open_uploads(self) -> dict[str, str]:
        """key -> upload id of every object with a multipart upload in progress."""
        found = {}
        with self.env.begin(db=self._dbs["objects"]) as txn:
            for k, v in txn.cursor():
                state = ObjectState.decode(bytes(v))
                if state.status == "uploading":
                    found[bytes(k).decode()] = state.upload_id
        return found


class ManifestWriter:
    """Writes listing pages from many lister threads into a manifest, counting as it goes.

    ``add`` commits before it returns: the lister persists a range's cursor right after its
    ``on_objects`` callback, so an entry buffered here would be lost by a crash after the cursor
    moved past it. One LMDB transaction per page (up to 1000 keys) is cheap.
    """

    def __init__(self, journal: Journal, side: str) -> None:
        self._journal = journal
        self._side = side
        self._lock = threading.Lock()
        self.count = 0
        self.bytes = 0

    def add(self, infos: list[ObjectInfo]) -> None:
        if not infos:
            return
        self._journal.put_entries(self._side, infos)
        with self._lock:
            self.count += len(infos)
            self.bytes += sum(i.size for i in infos)

    def flush(self) -> None:
        """Nothing is buffered; kept so callers can mark the end of a listing explicitly."""


class JournalListingState:
    """Persists a parallel lister's range cursors in the journal (see babel_sync.listing)."""

    def __init__(self, journal: Journal, side: str) -> None:
        self._journal = journal
        self._prefix = f"{side}\0".encode()
        self._db = journal._dbs["listing"]

    def save(self, task_id: str, task: Any, cursor: str) -> None:
        record = {
            "prefix": task.prefix,
            "start_after": task.start_after,
            "end": task.end,
            "delimited": task.delimited,
            "cursor": cursor,
        }
        with self._journal.env.begin(db=self._db, write=True) as txn:
            txn.put(self._prefix + task_id.encode(), json.dumps(record).encode())

    def done(self, task_id: str) -> None:
        with self._journal.env.begin(db=self._db, write=True) as txn:
            txn.delete(self._prefix + task_id.encode())

    def pending(self) -> list[tuple[str, Any, str]]:
        from .listing import ListTask

        found = []
        with self._journal.env.begin(db=self._db) as txn:
            cursor = txn.cursor()
            if cursor.set_range(self._prefix):
                for k, v in cursor:
                    key = bytes(k)
                    if not key.startswith(self._prefix):
                        break
                    r = json.loads(bytes(v))
                    task = ListTask(r["prefix"], r["start_after"], r["end"], r["delimited"])
                    found.append((key[len(self._prefix) :].decode(), task, r["cursor"]))
        return found
