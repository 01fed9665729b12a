"""Write-back: writes land in staging files on the cache disks, then upload in the background.

Call order for one write::

    session = wb.open(namespace, key)          # a staging file, capacity reserved as it grows
    session.write(offset, data)                # any number, any offsets (sparse is fine)
    pending = wb.commit(session)               # fsync + journal: "local-durable", upload queued
    wb.wait_durable(namespace, key)            # returns once the object is in the backing store
    # or wb.abort(session) instead of commit

Durability is explicit. ``commit`` returns when the staging file is fsynced and the journal entry
(an LMDB record in ``state_dir``) is synced: from then on a crash or a restart of the worker loses
nothing, because :meth:`WriteBack.start` re-queues every journalled upload. ``wait_durable``
(what ``fsync``/``flush`` mean to a client) returns once the object is complete in the backing
store. Staging files are pinned: their bytes count against the cache capacity and are never
evicted. Until its upload completes, a pending object is what this worker serves for its key
(read-your-writes on the writing node).

Uploads of one key run in commit order (never two at once), so the store ends with the last
commit. Thread-safe; the uploader is a small thread pool started by :meth:`start` and stopped by
:meth:`close`.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lmdb

from objstore.base import ObjectInfo, PartInfo, Store

from .blockstore import BlockStore, Reservation

log = logging.getLogger(__name__)

UPLOAD_RETRY_S = (1.0, 2.0, 5.0, 10.0, 30.0)


class WriteError(OSError):
    """A write session that cannot continue (closed, aborted, unknown)."""


@dataclass(frozen=True)
class PendingObject:
    """A committed write that is local-durable and waiting for (or in) its upload."""

    seq: int
    session: str
    namespace: str
    key: str
    path: str
    size: int
    committed: float
    upload_id: str = ""

    @property
    def version(self) -> str:
        return f"wb-{self.session}"

    def info(self) -> ObjectInfo:
        return ObjectInfo(self.key, self.size, self.committed, etag=self.version)


class Session:
    """One open write: a staging file plus the capacity reserved for it."""

    def __init__(self, wb: WriteBack, namespace: str, key: str, reservation: Reservation) -> None:
        self.id = secrets.token_hex(8)
        self.namespace = namespace
        self.key = key
        self._reservation = reservation
        directory = Path(reservation.dir.path) / "staging"
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / self.id
        self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        self.size = 0
        self.closed = False
        self._lock = threading.Lock()
        self.last_used = time.monotonic()

    def _ensure_open(self) -> None:
        if self.closed:
            raise WriteError(f"write session {self.id} is closed")

    def write(self, offset: int, data: bytes | memoryview) -> int:
        """Write ``data`` at ``offset``; reserves capacity first (``NoSpace`` when full)."""
        if offset < 0:
            raise ValueError("negative write offset")
        with self._lock:
            self._ensure_open()
            end = offset + len(data)
            if end > self._reservation.nbytes:
                self._reservation.grow(end - self._reservation.nbytes)
            view = memoryview(data)
            done = 0
            while done < len(view):
                done += os.pwrite(self._fd, view[done:], offset + done)
            self.size = max(self.size, end)
            self.last_used = time.monotonic()
            return done

    def finish(self) -> None:
        """fsync and close the staging file (before it is journalled)."""
        with self._lock:
            self._ensure_open()
            os.ftruncate(self._fd, self.size)
            os.fsync(self._fd)
            os.close(self._fd)
            self.closed = True

    def discard(self) -> None:
        with self._lock:
            if not self.closed:
                os.close(self._fd)
                self.closed = True
            self._reservation.release()
            self.path.unlink(missing_ok=True)


class WriteBack:
    """Staging, journal and background upload of written objects.

    Args:
        blockstore: reserves (pinned) capacity on the cache disks for staging files.
        stores: namespace -> backing store.
        state_dir: where the journal lives.
        part_size: multipart part size; objects up to this size go in one PUT.
        concurrency: objects uploaded in parallel.
        on_uploaded: called with (namespace, key, info) once an object is durable remotely.
    """

    def __init__(
        self,
        blockstore: BlockStore,
        stores: Mapping[str, Store],
        state_dir: Path,
        *,
        part_size: int = 16 << 20,
        concurrency: int = 4,
        on_uploaded: Callable[[str, str, ObjectInfo], None] | None = None,
    ) -> None:
        self._blocks = blockstore
        self._stores = stores
        self.part_size = part_size
        self._on_uploaded = on_uploaded or (lambda ns, key, info: None)
        path = Path(state_dir) / "writeback"
        path.mkdir(parents=True, exist_ok=True)
        self._env = lmdb.open(str(path), map_size=1 << 30, subdir=True, metasync=True, sync=True)
        self._cond = threading.Condition()
        self._sessions: dict[str, Session] = {}
        self._pending: dict[tuple[str, str], list[PendingObject]] = {}
        self._reservations: dict[str, Reservation] = {}
        self._active: set[tuple[str, str]] = set()
        self._failures: dict[str, str] = {}
        self._seq = int(time.time() * 1000)
        self._closing = False
        self._pool = ThreadPoolExecutor(concurrency, thread_name_prefix="pcache-upload")
        self._concurrency = concurrency
        self.uploaded = 0
        self.uploaded_bytes = 0
        # version of a pending write -> the object it became (readers opened before the upload)
        self._uploaded_as: OrderedDict[str, ObjectInfo] = OrderedDict()

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> int:
        """Re-queue every journalled upload (after a restart); returns how many."""
        records: list[PendingObject] = []
        with self._env.begin() as txn:
            for _, raw in txn.cursor():
                records.append(PendingObject(**json.loads(raw)))
        resumed = 0
        for record in sorted(records, key=lambda r: r.seq):
            if not Path(record.path).exists() or Path(record.path).stat().st_size != record.size:
                # the journal is written only after the fsync of the staging file, so this
                # means the disk was lost: say so loudly, there is nothing left to upload
                log.error(
                    "write-back of %s/%s lost: staging file %s is gone or short (disk failure?)",
                    record.namespace,
                    record.key,
                    record.path,
                )
                self._forget(record)
                continue
            try:
                self._reservations[record.session] = self._blocks.reserve(
                    record.size, pinned=True, directory=Path(record.path).parent.parent
                )
            except OSError as exc:
                log.warning("cannot account staging file %s: %s", record.path, exc)
            with self._cond:
                self._seq = max(self._seq, record.seq + 1)
                self._pending.setdefault((record.namespace, record.key), []).append(record)
            resumed += 1
        self._clean_orphan_staging({r.path for r in records})
        self._kick()
        if resumed:
            log.info("resuming %d pending write-back upload(s)", resumed)
        return resumed

    def _clean_orphan_staging(self, keep: set[str]) -> None:
        for disk in self._blocks.disks():
            staging = Path(disk.path) / "staging"
            if staging.is_dir():
                for file in staging.iterdir():
                    if str(file) not in keep:  # an uncommitted write from before a crash
                        file.unlink(missing_ok=True)

    def close(self) -> None:
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        self._pool.shutdown(wait=True, cancel_futures=True)
        for session in list(self._sessions.values()):
            session.discard()
        self._env.close()

    # -- sessions ------------------------------------------------------------------------------

    def open(self, namespace: str, key: str) -> Session:
        if namespace not in self._stores:
            raise KeyError(namespace)
        reservation = self._blocks.reserve(0, pinned=True)
        session = Session(self, namespace, key, reservation)
        with self._cond:
            self._sessions[session.id] = session
        return session

    def reap_idle(self, max_idle_s: float) -> int:
        """Abort write sessions nobody touched for ``max_idle_s`` (a client that died mid-write);
        their staging files and reserved capacity are released."""
        now = time.monotonic()
        with self._cond:
            idle = [s for s in self._sessions.values() if now - s.last_used > max_idle_s]
        for session in idle:
            log.warning(
                "aborting write of %s/%s: idle for %.0fs",
                session.namespace,
                session.key,
                max_idle_s,
            )
            self.abort(session)
        return len(idle)

    def session(self, session_id: str) -> Session:
        with self._cond:
            session = self._sessions.get(session_id)
        if session is None:
            raise WriteError(f"no open write session {session_id!r}")
        return session

    def abort(self, session: Session) -> None:
        with self._cond:
            self._sessions.pop(session.id, None)
        session.discard()

    def commit(self, session: Session) -> PendingObject:
        """Make the write local-durable and queue its upload."""
        session.finish()
        with self._cond:
            self._sessions.pop(session.id, None)
            self._seq += 1
            record = PendingObject(
                self._seq,
                session.id,
                session.namespace,
                session.key,
                str(session.path),
                session.size,
                time.time(),
            )
            self._reservations[session.id] = session._reservation
        self._journal(record)
        with self._cond:
            self._pending.setdefault((record.namespace, record.key), []).append(record)
        self._kick()
        return record

    def _journal(self, record: PendingObject) -> None:
        with self._env.begin(write=True) as txn:
            txn.put(record.session.encode(), json.dumps(asdict(record)).encode())

    def _forget(self, record: PendingObject) -> None:
        with self._env.begin(write=True) as txn:
            txn.delete(record.session.encode())

    # -- queries -------------------------------------------------------------------------------

    def pending(self, namespace: str, key: str) -> PendingObject | None:
        """The newest committed, not yet uploaded write of ``key``."""
        with self._cond:
            records = self._pending.get((namespace, key))
            return records[-1] if records else None

    def pending_under(self, namespace: str, prefix: str) -> list[PendingObject]:
        with self._cond:
            return [
                records[-1]
                for (ns, key), records in self._pending.items()
                if ns == namespace and key.startswith(prefix) and records
            ]

    def read(self, record: PendingObject, offset: int, length: int) -> bytes:
        with open(record.path, "rb") as file:
            return os.pread(file.fileno(), length, offset)

    def uploaded_as(self, version: str) -> ObjectInfo | None:
        """What a pending write (by its ``wb-`` version) became once uploaded, if known."""
        with self._cond:
            return self._uploaded_as.get(version)

    def backlog(self) -> dict[str, Any]:
        with self._cond:
            records = [r for rs in self._pending.values() for r in rs]
            return {
                "objects": len(records),
                "bytes": sum(r.size for r in records),
                "open_sessions": len(self._sessions),
                "failures": dict(self._failures),
            }

    def wait_durable(self, namespace: str, key: str, timeout: float | None = None) -> bool:
        """Block until no committed write of ``key`` is waiting; False on timeout."""
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._pending.get((namespace, key)):
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining)
            return True

    # -- upload --------------------------------------------------------------------------------

    def _kick(self) -> None:
        """Start uploads for keys that have pending records and no upload running."""
        with self._cond:
            if self._closing:
                return
            for ident, records in self._pending.items():
                if records and ident not in self._active and len(self._active) < self._concurrency:
                    self._active.add(ident)
                    self._pool.submit(self._upload_key, ident)

    def _upload_key(self, ident: tuple[str, str]) -> None:
        attempt = 0
        while True:
            with self._cond:
                records = self._pending.get(ident)
                if not records or self._closing:
                    self._active.discard(ident)
                    if not records:
                        self._pending.pop(ident, None)
                    self._cond.notify_all()
                    break
                # only the newest commit matters to the store; older ones are superseded
                record = records[-1]
                superseded = records[:-1]
            for old in superseded:
                self._finish(old, None)
            try:
                info = self._upload(record)
            except Exception as exc:
                delay = UPLOAD_RETRY_S[min(attempt, len(UPLOAD_RETRY_S) - 1)]
                attempt += 1
                with self._cond:
                    self._failures[f"{ident[0]}/{ident[1]}"] = str(exc)
                log.warning(
                    "upload of %s/%s failed (attempt %d, retrying in %.0fs): %s",
                    ident[0],
                    ident[1],
                    attempt,
                    delay,
                    exc,
                )
                with self._cond:
                    self._cond.wait_for(lambda: self._closing, timeout=delay)
                continue
            attempt = 0
            with self._cond:
                self._failures.pop(f"{ident[0]}/{ident[1]}", None)
            self._finish(record, info)
        self._kick()

    def _upload(self, record: PendingObject) -> ObjectInfo:
        store = self._stores[record.namespace]
        with open(record.path, "rb") as file:
            fd = file.fileno()
            if record.size <= self.part_size or record.size < store.features.min_part_size:
                return store.put(record.key, os.pread(fd, record.size, 0))
            if record.upload_id:  # from before a restart: start over, cleanly
                try:
                    store.abort_upload(record.key, record.upload_id)
                except OSError as exc:
                    log.info("could not abort stale upload %s: %s", record.upload_id, exc)
            part_size = max(self.part_size, -(-record.size // store.features.max_parts))
            upload_id = store.create_upload(record.key)
            record = PendingObject(**{**asdict(record), "upload_id": upload_id})
            self._journal(record)
            offsets = range(0, record.size, part_size)
            try:
                with ThreadPoolExecutor(4, thread_name_prefix="pcache-part") as pool:
                    parts: list[PartInfo] = list(
                        pool.map(
                            lambda n_off: store.upload_part(
                                record.key,
                                upload_id,
                                n_off[0],
                                os.pread(fd, min(part_size, record.size - n_off[1]), n_off[1]),
                            ),
                            enumerate(offsets, start=1),
                        )
                    )
                return store.complete_upload(record.key, upload_id, parts)
            except BaseException:
                try:
                    store.abort_upload(record.key, upload_id)
                except OSError as exc:
                    log.info("could not abort upload %s: %s", upload_id, exc)
                raise

    def _finish(self, record: PendingObject, info: ObjectInfo | None) -> None:
        """Drop a record that is uploaded (``info``) or superseded (``None``).

        ``on_uploaded`` (the worker invalidates its metadata) runs before the record leaves the
        pending set: a listing or stat running meanwhile then sees either the pending record or
        the invalidation, never neither (see ``Worker.listing``)."""
        if info is not None:
            try:
                self._on_uploaded(record.namespace, record.key, info)
            except Exception:  # never keep a finished record because a callback failed
                log.exception("on_uploaded for %s/%s failed", record.namespace, record.key)
        self._forget(record)
        with self._cond:
            records = self._pending.get((record.namespace, record.key), [])
            if record in records:
                records.remove(record)
            if not records:
                self._pending.pop((record.namespace, record.key), None)
            reservation = self._reservations.pop(record.session, None)
            if info is not None:
                self.uploaded += 1
                self.uploaded_bytes += record.size
                self._uploaded_as[record.version] = info
                while len(self._uploaded_as) > 10_000:
                    self._uploaded_as.popitem(last=False)
        if reservation is not None:
            reservation.release()
        Path(record.path).unlink(missing_ok=True)
        if info is not None:
            log.info("uploaded %s/%s (%d bytes)", record.namespace, record.key, record.size)
        with self._cond:
            self._cond.notify_all()
