"""Write-back: objects written on this node, journalled, then uploaded in the background.

Call order for one write::

    staged = wb.open(namespace, key)               # a staging file (pcache.staging)
    staged.write(offset, data) / staged.truncate(n)  # or a local client writes staged.path itself
    record = wb.commit(staged, metadata=..., close=True)   # fsync + journal: local-durable
    wb.wait_durable(namespace, key)                # returns once it is in the backing store
    # or wb.abort(staged) instead of commit

Durability is explicit. ``commit`` returns once the staging file is fsynced and its journal
record (LMDB in ``state_dir``, synced) is written: from then on a crash or restart of the worker
loses nothing, because :meth:`WriteBack.start` re-queues every journalled record. A commit may
leave the file open (``close=False``: another descriptor still writes); the next commit replaces
the record. ``wait_durable`` (what ``fsync`` means) returns once the key has no pending record.

Records, one per key, the newest only (what the store must end with):

* an upload: the staging file's first ``size`` bytes, with user ``metadata``;
* a tombstone (``delete``): the key must be deleted (an unlink, or the old name of a rename).

A rename of a pending object re-keys its record in the journal (the old name gets a tombstone):
no byte is uploaded under the old name, and it costs one journal transaction. A rename of an
object already in the store costs the same (:meth:`WriteBack.move_stored`): the new name is a
``moved`` record, copied inside the store by the uploader while reads of it go to the old
object, whose tombstone waits until the copy has landed.

Large files are uploaded while they are written (:mod:`pcache.eager`): each staging file gets
an :class:`~pcache.eager.EagerUpload`, whose parts fill as the writer's frontier passes them; a
commit journals its upload id and clean parts with the record, and the upload completes what is
missing. A rename re-keys such a file too (its early parts are uploaded again under the new
name), except when the writer released uploaded bytes from the disk: then the upload completes
under the old name (``upload_key``) and is copied server-side to the new one, then deleted. After
a restart a record's journalled parts are reused; an upload the store no longer has is started
over, or, when released bytes went with it, is a permanent failure (reported, never silent).

Failures: an error :func:`objstore.errors.is_permanent` calls permanent (a key the store refuses,
access denied) is not retried: the record is kept with the error (journalled), waiters get
:class:`UploadFailed` at once, and :meth:`retry` or :meth:`discard` decide. A transient one is
retried with backoff; the record waits outside the upload slots meanwhile, so one failing object
never holds up the others.

Threads: ``uploads`` daemon threads take due keys from a queue; one key is never uploaded twice
at once, and an upload whose record was replaced meanwhile aborts at the next part and leaves no
trace (the newer record is uploaded next). :meth:`close` stops them without waiting for the
store: an interrupted upload is still journalled and resumes at the next start.

Lock order: ``WriteBack._cond`` may be held while taking a :class:`StagedFile`'s lock or the
block store's lock, never the other way round; the journal has its own lock, taken last.
``WriteBack._work`` (idle uploaders wait on it) is a second condition of ``_cond``'s lock, not a
lock of its own.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
import json
import logging
import os
import random
import secrets
import threading
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import lmdb

from objstore.base import ObjectInfo, PartInfo, Store
from objstore.errors import NotSupported, PreconditionFailed, UploadNotFound, is_permanent

from .blockstore import BlockStore
from .eager import EagerUpload, PartPool, Superseded
from .keyindex import PrefixIndex
from .protocol import PENDING_PREFIX, CopySource, Progress, UploadFailed, WriteError
from .staging import StagedFile

log = logging.getLogger(__name__)

__all__ = ["PendingObject", "StagedFile", "UploadFailed", "WriteBack", "WriteError"]

UPLOAD_RETRY_S = (1.0, 2.0, 5.0, 10.0, 30.0)
INLINE_MAX = 64 << 10  # objects up to this size are journalled with their bytes
INLINE_BUDGET = 256 << 20  # at most this many such bytes pending at once (else staging files)
_DATA_PREFIX = b"\x00data\x00"  # journal keys of inline bytes (record keys are 32-byte digests)
_EAGER_PREFIX = b"\x00eager\x00"  # journal keys of eager uploads (aborted when orphaned)
PART_THREADS = 4
GC_BATCH_S = 0.05  # finished records leave the journal in batches this far apart


@dataclass(frozen=True)
class PendingObject:
    """A journalled change of one key that the store does not have yet.

    Attributes:
        seq: commit order on this node (also makes each commit's version unique).
        session: the staged file holding the bytes ("" for a tombstone).
        namespace, key: where it goes.
        path: the staging file.
        size: bytes of the staging file that make the object.
        committed: wall-clock time of the commit (the object's mtime until uploaded).
        metadata: user metadata to store with it (POSIX attributes, pcache.posix).
        delete: a tombstone: the key is to be deleted.
        upload_id: the multipart upload holding parts of it (``parts``), if any.
        parts: its parts known clean at commit, ``[number, etag, size]`` each.
        released: the prefix of the staging file dropped from the disk (only in ``parts``).
        upload_key: the key the upload is under when it is not ``key`` (renamed meanwhile).
        source_key, source_etag, absent: the staging file's ``absent`` spans are still the
            bytes of that object version (opened without O_TRUNC, copied lazily: CopySource).
        error: the last upload failure, if any.
        permanent: that failure will not go away by retrying.
        inline: the bytes live in the journal itself (a small object: one fsync, no file).
        moved: the whole object is the stored ``source_key`` at ``source_etag`` (a rename of an
            object already in the store): no staging file; its upload is a copy inside the
            store, and the source's tombstone waits for it.
    """

    seq: int
    session: str
    namespace: str
    key: str
    path: str
    size: int
    committed: float
    metadata: dict[str, str] = field(default_factory=dict)
    delete: bool = False
    upload_id: str = ""
    parts: list[list[Any]] = field(default_factory=list)
    released: int = 0
    upload_key: str = ""
    source_key: str = ""
    source_etag: str = ""
    absent: list[list[int]] = field(default_factory=list)
    error: str = ""
    permanent: bool = False
    inline: bool = False
    moved: bool = False

    @property
    def version(self) -> str:
        return f"{PENDING_PREFIX}{self.session}.{self.seq}"

    def info(self) -> ObjectInfo:
        return ObjectInfo(
            self.key, self.size, self.committed, etag=self.version, metadata=dict(self.metadata)
        )

    def describe(self) -> dict[str, Any]:
        return {
            "ns": self.namespace,
            "key": self.key,
            "size": self.size,
            "delete": self.delete,
            "committed": self.committed,
            "error": self.error,
            "permanent": self.permanent,
        }


Ident = tuple[str, str]


class WriteBack:
    """Staging, journal and background upload of written objects.

    Args:
        blockstore: reserves (pinned) capacity on the cache disks for staging files.
        stores: namespace -> backing store.
        state_dir: where the journal lives.
        part_size: multipart part size; objects up to this size go in one PUT.
        concurrency: objects uploaded in parallel.
        upload_delay: seconds a commit waits before its upload starts, so what quickly follows
            (a rename, a chmod, another commit) replaces it instead of uploading twice; a
            ``wait_durable`` (fsync) starts it at once.
        on_uploaded: called with (record, info) once a record's upload is in the store, and
            with (record, None) once a tombstone's delete is.
    """

    def __init__(
        self,
        blockstore: BlockStore,
        stores: Mapping[str, Store],
        state_dir: Path,
        *,
        part_size: int = 16 << 20,
        concurrency: int = 4,
        upload_delay: float = 0.0,
        on_uploaded: Callable[[PendingObject, ObjectInfo | None], None] | None = None,
    ) -> None:
        self._blocks = blockstore
        self._stores = stores
        self.part_size = part_size
        self.upload_delay = upload_delay
        self._on_uploaded = on_uploaded or (lambda record, info: None)
        path = Path(state_dir) / "writeback"
        path.mkdir(parents=True, exist_ok=True)
        self._env = lmdb.open(str(path), map_size=4 << 30, subdir=True, metasync=True, sync=True)
        self._inline_bytes = 0
        self._journal_lock = threading.Lock()
        self._journal_closed = False
        # one lock, two conditions: _cond wakes who waits for a record to change (an fsync),
        # _work wakes one idle uploader per key that became due (not every uploader per change)
        lock = threading.RLock()
        self._cond = threading.Condition(lock)
        self._work = threading.Condition(lock)
        self._staged: dict[str, StagedFile] = {}  # session id -> file (open or referenced)
        self._records: dict[Ident, PendingObject] = {}
        self._keys = PrefixIndex()  # the keys of _records, for pending_under
        self._session_refs: Counter[str] = Counter()  # staging session -> records using it
        # the upload queue: every queued key is in _ready (due, or held by an upload of it in
        # flight) or in _waiting (a heap by due time: upload_delay, a retry's backoff), so
        # finding the next upload costs what is due, not what is pending (entries may repeat:
        # each is checked against _queued and _retry_at when it is taken)
        self._ready: deque[Ident] = deque()
        self._waiting: list[tuple[float, int, Ident]] = []
        self._waiting_seq = itertools.count()
        self._queued: set[Ident] = set()
        self._active: set[Ident] = set()
        self._retry_at: dict[Ident, float] = {}
        self._attempts: dict[Ident, int] = {}
        self._seq = int(time.time() * 1000)
        self._closing = False
        self._concurrency = concurrency
        self._threads: list[threading.Thread] = []
        self.uploaded = 0
        self.uploaded_bytes = 0
        self.copied_bytes = 0  # parts made inside the store from unchanged ranges
        self._no_part_copy: set[str] = set()  # namespaces whose server refused UploadPartCopy
        self.failed_permanently = 0
        # version of a pending write -> the object it became (readers opened before the upload)
        self._uploaded_as: OrderedDict[str, ObjectInfo] = OrderedDict()
        self._parts = PartPool(PART_THREADS)
        self._gc_cond = threading.Condition()  # the journal's batched removals (_forget_later)
        self._gc_records: list[PendingObject] = []
        self._gc_sessions: list[str] = []
        self._gc_stop = False
        self._maybe_borrowed = True  # a record may have an upload_key (see _next_locked)

    # -- lifecycle -----------------------------------------------------------------------------

    def start(self) -> int:
        """Re-queue every journalled record (after a restart) and start the uploaders;
        returns how many records were resumed."""
        records: list[PendingObject] = []
        stale_keys: list[bytes] = []
        with self._env.begin() as txn:
            for raw_key, raw in txn.cursor():
                if raw_key.startswith((_DATA_PREFIX, _EAGER_PREFIX)):
                    continue
                data = json.loads(raw)
                data.setdefault("metadata", {})
                known = {f for f in PendingObject.__dataclass_fields__}
                record = PendingObject(**{k: v for k, v in data.items() if k in known})
                records.append(record)
                if raw_key != self._journal_key(record):
                    stale_keys.append(raw_key)  # an older journal layout: re-keyed below
        newest: dict[Ident, PendingObject] = {}
        for record in sorted(records, key=lambda r: r.seq):
            newest[(record.namespace, record.key)] = record
        for record in newest.values():
            if record.inline:
                self._inline_bytes += record.size
            elif not record.delete and not record.moved and not self._adopt_staging(record):
                self._forget(record)
                continue
            with self._cond:
                self._seq = max(self._seq, record.seq + 1)
                self._set_record_locked((record.namespace, record.key), record)
        with self._journal_lock, self._env.begin(write=True) as txn:
            for raw_key in stale_keys:
                txn.delete(raw_key)
            live = {r.session for r in self._records.values() if r.inline}
            orphans = [
                k
                for k, _ in txn.cursor()
                if k.startswith(_DATA_PREFIX) and k[len(_DATA_PREFIX) :].decode() not in live
            ]
            for raw_key in orphans:
                txn.delete(raw_key)
            needed = {r.upload_id for r in self._records.values() if r.upload_id}
            eager = [(k, json.loads(v)) for k, v in txn.cursor() if k.startswith(_EAGER_PREFIX)]
            for raw_key, entry in eager:
                txn.delete(raw_key)
                if entry["upload_id"] not in needed and entry["ns"] in self._stores:
                    EagerUpload(
                        self._stores[entry["ns"]],
                        entry["key"],
                        "",
                        self.part_size,
                        None,
                        upload_id=entry["upload_id"],
                    ).abort()  # an upload of a write that was never committed
            for record in self._records.values():
                txn.put(self._journal_key(record), json.dumps(asdict(record)).encode())
        self._clean_orphan_staging({r.path for r in self._records.values()})
        with self._cond:
            resumed = len(self._records)
            for ident in self._records:
                self._queue_locked(ident)
        for i in range(self._concurrency):
            thread = threading.Thread(
                target=self._upload_loop, name=f"pcache-upload-{i}", daemon=True
            )
            thread.start()
            self._threads.append(thread)
        threading.Thread(target=self._gc_loop, name="pcache-journal-gc", daemon=True).start()
        if resumed:
            log.info("resuming %d pending write-back record(s)", resumed)
        return resumed

    def _adopt_staging(self, record: PendingObject) -> bool:
        """Take back the staging file of a journalled upload; False when it is lost."""
        path = Path(record.path)
        if not path.exists() or path.stat().st_size < record.size:
            # the journal is written only after the fsync of the staging file, so this means
            # the disk was lost: say so loudly, there is nothing left to upload
            log.error(
                "write-back of %s/%s lost: staging file %s is gone or short (disk failure?)",
                record.namespace,
                record.key,
                record.path,
            )
            return False
        if record.session in self._staged:
            return True
        try:
            reservation = self._blocks.reserve(0, pinned=True, directory=path.parent.parent)
            staged = StagedFile(
                record.namespace, record.key, reservation, session_id=record.session, path=path
            )
            staged.attached = False
            staged.account_disk_usage()
        except OSError as exc:
            log.warning("cannot account staging file %s: %s", record.path, exc)
            return True
        self._staged[record.session] = staged
        return True

    def _clean_orphan_staging(self, keep: set[str]) -> None:
        for disk in self._blocks.disks():
            staging = Path(disk.path) / "staging"
            if staging.is_dir():
                for file in staging.iterdir():
                    if str(file) not in keep:  # an uncommitted write from before a crash
                        file.unlink(missing_ok=True)

    def close(self, grace_s: float = 2.0) -> None:
        """Stop the uploaders (an upload in flight is abandoned after ``grace_s``: it is
        journalled and resumes at the next start) and close the journal."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
            self._work.notify_all()
        self._parts.close()
        deadline = time.monotonic() + grace_s
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._gc_cond:
            self._gc_stop = True
            self._gc_cond.notify_all()
        self._gc_flush()
        with self._journal_lock:
            self._journal_closed = True
            self._env.close()

    # -- sessions ------------------------------------------------------------------------------

    def open(self, namespace: str, key: str) -> StagedFile:
        """A new staging file for ``key``."""
        if namespace not in self._stores:
            raise WriteError(f"unknown namespace {namespace!r}")
        self._stores[namespace].check_key_length(key)
        reservation = self._blocks.reserve(0, pinned=True)
        staged = StagedFile(namespace, key, reservation)
        staged.eager = self._eager_for(staged)
        with self._cond:
            self._staged[staged.id] = staged
        return staged

    def _eager_for(self, staged: StagedFile) -> EagerUpload | None:
        """The upload a staging file's parts go to while it is written, where the store can
        set the object's metadata afterwards (it is fixed when the upload starts)."""
        store = self._stores[staged.namespace]
        if not store.features.replace_metadata:
            return None
        session = staged.id
        return EagerUpload(
            store,
            staged.key,
            str(staged.path),
            self.part_size,
            self._parts,
            on_created=lambda upload_id: self._journal_eager(session, staged, upload_id),
        )

    def _journal_eager(self, session: str, staged: StagedFile, upload_id: str) -> None:
        entry = {"ns": staged.namespace, "key": staged.key, "upload_id": upload_id}
        with self._journal_lock:
            if not self._journal_closed:
                with self._env.begin(write=True) as txn:
                    txn.put(_EAGER_PREFIX + session.encode(), json.dumps(entry).encode())

    def _release_staged(self, staged: StagedFile) -> None:
        """Delete a staging file nothing needs any more, and its unfinished upload."""
        staged.release()
        if staged.eager is not None:
            staged.eager.abort()
            with self._journal_lock:
                if not self._journal_closed:
                    with self._env.begin(write=True) as txn:
                        txn.delete(_EAGER_PREFIX + staged.id.encode())

    def session(self, session_id: str) -> StagedFile:
        with self._cond:
            staged = self._staged.get(session_id)
        if staged is None or not staged.attached or staged.released:
            raise WriteError(f"no open write session {session_id!r}")
        return staged

    def reap_idle(self, max_idle_s: float) -> int:
        """Close write sessions nobody touched for ``max_idle_s`` (a client that died
        mid-write): never-committed ones are discarded, committed ones keep their record."""
        now = time.monotonic()
        with self._cond:
            idle = [
                s for s in self._staged.values() if s.attached and now - s.last_used > max_idle_s
            ]
        for staged in idle:
            log.warning(
                "closing write of %s/%s: idle for %.0fs", staged.namespace, staged.key, max_idle_s
            )
            self.abort(staged)
        return len(idle)

    def abort(self, staged: StagedFile) -> None:
        """The writer is done without (another) commit: what was committed stays."""
        with self._cond:
            staged.attached = False
            referenced = self._referenced(staged.id)
            if not referenced:
                self._staged.pop(staged.id, None)
        if not referenced:
            self._release_staged(staged)

    def commit(
        self,
        staged: StagedFile,
        *,
        size: int | None = None,
        metadata: Mapping[str, str] | None = None,
        close: bool = True,
        progress: Progress | None = None,
        source: CopySource | None = None,
    ) -> PendingObject:
        """Make the file's content local-durable and queue its upload.

        Args:
            size: the size a direct writer sees (default: what went through ``write``).
            metadata: user metadata for the object (replaces the previous commit's).
            close: the writer is done; otherwise later commits may follow.
            progress: a direct writer's last report (:meth:`StagedFile.report`).
            source: the object whose bytes the file's holes still are.

        Raises:
            WriteError: the session is closed, or its name was unlinked meanwhile.
        """
        if staged.detached:
            raise WriteError(f"{staged.key!r} was removed while open: nothing to commit")
        if progress is not None:
            staged.report(progress)
        synced = staged.sync(size)
        eager = staged.eager
        upload_id, parts = eager.state() if eager is not None else ("", [])
        with self._cond:
            if not staged.attached or staged.released:
                raise WriteError(f"write session {staged.id} is closed")
            self._seq += 1
            record = PendingObject(
                self._seq,
                staged.id,
                staged.namespace,
                staged.key,
                str(staged.path),
                synced,
                time.time(),
                metadata=dict(metadata or {}),
                upload_id=upload_id,
                parts=[[p.part_number, p.etag, p.size] for p in parts],
                released=staged.released_bytes,
                upload_key=eager.key if eager is not None and eager.key != staged.key else "",
                source_key=source.key if source is not None else "",
                source_etag=source.etag if source is not None else "",
                absent=[list(r) for r in source.ranges] if source is not None else [],
            )
        self._journal([record])
        with self._cond:
            self._replace_locked(record)
            if close:
                staged.attached = False
        return record

    def commit_inline(
        self, namespace: str, key: str, data: bytes, metadata: Mapping[str, str] | None = None
    ) -> PendingObject | None:
        """A small object journalled with its bytes in one synced transaction (no staging file:
        one fsync); None when it is too large or the inline budget is spent (stage it instead)."""
        if namespace not in self._stores:
            raise WriteError(f"unknown namespace {namespace!r}")
        self._stores[namespace].check_key_length(key)
        with self._cond:
            if len(data) > INLINE_MAX or self._inline_bytes + len(data) > INLINE_BUDGET:
                return None
            self._inline_bytes += len(data)
            self._seq += 1
            record = PendingObject(
                self._seq,
                secrets.token_hex(8),
                namespace,
                key,
                "",
                len(data),
                time.time(),
                metadata=dict(metadata or {}),
                inline=True,
            )
        try:
            with self._journal_lock:
                if self._journal_closed:
                    raise WriteError("the worker is stopping")
                with self._env.begin(write=True) as txn:
                    txn.put(_DATA_PREFIX + record.session.encode(), data)
                    txn.put(self._journal_key(record), json.dumps(asdict(record)).encode())
        except BaseException:
            with self._cond:
                self._inline_bytes -= len(data)
            raise
        with self._cond:
            self._replace_locked(record)
        return record

    def _inline_data(self, record: PendingObject) -> bytes:
        with self._env.begin() as txn:
            data = txn.get(_DATA_PREFIX + record.session.encode())
        if data is None:
            raise FileNotFoundError(f"the journalled bytes of {record.key!r} are gone")
        return bytes(data)

    # -- namespace operations ----------------------------------------------------------------

    def delete(self, namespace: str, key: str) -> PendingObject:
        """Journal a tombstone for ``key`` (an unlink): the store delete follows in the
        background; any pending upload of the key is dropped, open writers are detached."""
        with self._cond:
            self._seq += 1
            tomb = PendingObject(self._seq, "", namespace, key, "", 0, time.time(), delete=True)
        self._journal([tomb])
        with self._cond:
            self._detach_writers_locked(namespace, key)
            self._replace_locked(tomb)
        return tomb

    def rename(self, namespace: str, old: str, new: str) -> bool:
        """Re-key a pending object from ``old`` to ``new`` (``old`` gets a tombstone), and open
        writers of ``old`` with it. False when ``old`` has nothing pending here (the caller
        then copies in the store)."""
        self._stores[namespace].check_key_length(new)
        with self._cond:
            record = self._records.get((namespace, old))
            writers = [
                s
                for s in self._staged.values()
                if s.attached and (s.namespace, s.key) == (namespace, old)
            ]
            if (record is None or record.delete) and not writers:
                return False
            self._seq += 2
            moved = None
            if record is not None and not record.delete:
                moved = replace(
                    record, key=new, seq=self._seq - 1, error="", permanent=False, upload_key=""
                )
                if record.released:  # its first bytes are only in the upload under the old key
                    moved = replace(moved, upload_key=record.upload_key or old)
                elif record.upload_id:
                    moved = replace(moved, upload_id="", parts=[])
            tomb = PendingObject(self._seq, "", namespace, old, "", 0, time.time(), delete=True)
            staged = [self._staged.get(record.session)] if record is not None else []
            rekeyed = {s.id: s for s in [*writers, *staged] if s is not None}
        self._journal([r for r in (moved, tomb) if r is not None])
        for file in rekeyed.values():
            self._rekey_eager(file, new)
        with self._cond:
            self._detach_writers_locked(namespace, new)
            for writer in writers:
                writer.key = new
            if moved is not None:
                self._replace_locked(moved)
            self._replace_locked(tomb)
        return True

    def move_stored(self, namespace: str, old: str, new: str, info: ObjectInfo) -> PendingObject:
        """Journal a rename of ``old`` as it is in the store (``info``, with its user metadata):
        ``new`` becomes a pending copy of that version (``moved``: made inside the store when
        uploaded, read from ``old`` meanwhile), ``old`` a tombstone that waits for it. Costs one
        journal transaction whatever the size, like the rename of a pending object."""
        self._stores[namespace].check_key_length(new)
        with self._cond:
            self._seq += 2
            moved = PendingObject(
                self._seq - 1,
                secrets.token_hex(8),
                namespace,
                new,
                "",
                info.size,
                info.mtime,
                metadata=dict(info.metadata),
                source_key=old,
                source_etag=info.etag,
                absent=[[0, info.size]] if info.size else [],
                moved=True,
            )
            tomb = PendingObject(self._seq, "", namespace, old, "", 0, time.time(), delete=True)
        self._journal([moved, tomb])
        with self._cond:
            self._detach_writers_locked(namespace, new)
            self._replace_locked(moved)
            self._replace_locked(tomb)
        return moved

    def _rekey_eager(self, staged: StagedFile, new: str) -> None:
        """A renamed file's early parts were for its old name: start its upload again under the
        new one, unless released bytes keep it under the old name (see the module docstring)."""
        eager = staged.eager
        if eager is None or not eager.is_open or staged.released_bytes:
            return
        eager.abort()
        staged.key = new
        staged.eager = self._eager_for(staged)
        if staged.eager is not None:
            staged.eager.advance(staged.frontier)

    def set_metadata(self, namespace: str, key: str, metadata: Mapping[str, str]) -> bool:
        """New user metadata for a pending upload of ``key`` (chmod before the upload);
        False when nothing is pending (the caller then changes the stored object)."""
        with self._cond:
            record = self._records.get((namespace, key))
            if record is None or record.delete:
                return False
            self._seq += 1
            updated = replace(record, seq=self._seq, metadata=dict(metadata))
        self._journal([updated])
        with self._cond:
            self._replace_locked(updated)
        return True

    def retry(self, namespace: str, key: str) -> bool:
        """Try a failed upload again now; False when the key has no record."""
        with self._cond:
            record = self._records.get((namespace, key))
            if record is None:
                return False
            self._set_record_locked((namespace, key), replace(record, error="", permanent=False))
            self._attempts.pop((namespace, key), None)
            self._queue_locked((namespace, key))
            self._due_now_locked((namespace, key))
        return True

    def discard(self, namespace: str, key: str) -> PendingObject | None:
        """Drop the pending record of ``key`` (its bytes are lost); returns it."""
        with self._cond:
            record = self._set_record_locked((namespace, key), None)
            self._retry_at.pop((namespace, key), None)
            self._attempts.pop((namespace, key), None)
        if record is not None:
            self._forget(record)
            if record.inline:
                self._forget_later(None, record.session)
            self._release_if_unreferenced(record.session)
            with self._cond:
                self._cond.notify_all()
            log.warning("discarded the pending write of %s/%s", namespace, key)
        return record

    # -- queries -------------------------------------------------------------------------------

    def pending(self, namespace: str, key: str) -> PendingObject | None:
        """The newest journalled change of ``key`` not yet in the store (may be a tombstone)."""
        with self._cond:
            return self._records.get((namespace, key))

    def pending_under(self, namespace: str, prefix: str) -> list[PendingObject]:
        with self._cond:
            return [self._records[(namespace, key)] for key in self._keys.under(namespace, prefix)]

    def records(self) -> list[PendingObject]:
        with self._cond:
            return sorted(self._records.values(), key=lambda r: r.seq)

    def read(self, record: PendingObject, offset: int, length: int) -> bytes:
        if record.inline:
            return self._inline_data(record)[offset : offset + length]
        return self._reader(record)(offset, min(length, max(0, record.size - offset)))

    def _reader(self, record: PendingObject) -> Callable[[int, int], bytes]:
        """Reads of the object ``record`` makes: its staging file, with the spans still in its
        copy source read from the store (PreconditionFailed when that version is gone)."""
        store = self._stores[record.namespace]

        def read(offset: int, length: int) -> bytes:
            local = b""
            if record.path:  # else every byte is in the source (a moved object)
                with open(record.path, "rb") as file:
                    local = os.pread(file.fileno(), length, offset)
            if not any(a < offset + length and offset < b for a, b in record.absent):
                return local  # the common case: no copy of the bytes
            data = bytearray(local)
            data.extend(bytes(length - len(data)))  # a hole at the end reads as zeros
            for start, end in record.absent:
                lo, hi = max(start, offset), min(end, offset + length)
                if lo < hi:
                    got = store.get_range(
                        record.source_key, lo, hi - lo, if_match=record.source_etag
                    )
                    if len(got) != hi - lo:
                        raise PreconditionFailed(f"{record.source_key!r} is shorter than it was")
                    data[lo - offset : hi - offset] = got
            return bytes(data)

        return read

    def _copier(
        self, record: PendingObject
    ) -> Callable[[str, int, int, int], PartInfo | None] | None:
        """Parts wholly in the copy source, made inside the store (UploadPartCopy)."""
        store = self._stores[record.namespace]
        if not record.absent or not store.features.part_copy:
            return None
        if record.namespace in self._no_part_copy:
            return None
        key = record.upload_key or record.key

        def copy(upload_id: str, number: int, start: int, length: int) -> PartInfo | None:
            if not any(a <= start and start + length <= b for a, b in record.absent):
                return None
            try:
                part = store.upload_part_copy(
                    key,
                    upload_id,
                    number,
                    record.source_key,
                    start,
                    length,
                    if_match=record.source_etag,
                )
            except NotSupported as exc:  # this server cannot after all: bytes go through us
                if record.namespace not in self._no_part_copy:
                    log.info("%s: no server-side part copy (%s)", record.namespace, exc)
                    self._no_part_copy.add(record.namespace)
                return None
            with self._cond:
                self.copied_bytes += length
            return part

        return copy

    def uploaded_as(self, version: str) -> ObjectInfo | None:
        """What a pending write (by its ``wb-`` version) became once uploaded, if known."""
        with self._cond:
            return self._uploaded_as.get(version)

    def staged_file(self, session_id: str) -> StagedFile | None:
        with self._cond:
            return self._staged.get(session_id)

    def backlog(self) -> dict[str, Any]:
        with self._cond:
            records = list(self._records.values())
            return {
                "objects": len(records),
                "bytes": sum(r.size for r in records),
                "open_sessions": sum(s.attached for s in self._staged.values()),
                "failed": sum(1 for r in records if r.error),
                "failed_permanently": sum(1 for r in records if r.permanent),
                "copied_bytes": self.copied_bytes,
                "failures": {f"{r.namespace}/{r.key}": r.error for r in records if r.error},
            }

    def wait_durable(self, namespace: str, key: str, timeout: float | None = None) -> bool:
        """Block until ``key`` has no pending record; False on timeout.

        Raises:
            UploadFailed: the store refused the upload for good (the data is kept).
            WriteError: the worker is stopping.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        ident = (namespace, key)
        with self._cond:
            record = self._records.get(ident)
            if record is not None and not record.permanent and ident in self._retry_at:
                # someone waits for it: no more delay (upload_delay, or a transient failure's
                # backoff: an fsync after an outage retries now, not when the backoff ends)
                self._due_now_locked(ident)
            while True:
                record = self._records.get(ident)
                if record is None:
                    return True
                if record.permanent:
                    raise UploadFailed(
                        f"the store refused {key!r}: {record.error} (kept on this node: "
                        "`pcache uploads retry` or `pcache uploads discard`)"
                    )
                if self._closing:
                    raise WriteError("the worker is stopping; the write resumes when it restarts")
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining if remaining is not None else 1.0)

    # -- internals -----------------------------------------------------------------------------

    @staticmethod
    def _journal_key(record: PendingObject) -> bytes:
        # LMDB keys are at most 511 bytes, object keys up to 1,024: a digest names the record
        name = f"{record.namespace}\x00{record.key}".encode("utf-8", "surrogateescape")
        return hashlib.sha256(name).digest()

    def _journal(self, records: Iterable[PendingObject]) -> None:
        with self._journal_lock:
            if self._journal_closed:
                raise WriteError("the worker is stopping")
            with self._env.begin(write=True) as txn:
                for record in records:
                    txn.put(self._journal_key(record), json.dumps(asdict(record)).encode())

    def _journal_update(self, record: PendingObject) -> None:
        """Rewrite ``record``'s journal entry (a failure, an upload id) unless a newer record
        of its key replaced it meanwhile."""
        with self._journal_lock:
            if self._journal_closed:
                return
            with self._env.begin(write=True) as txn:
                raw = txn.get(self._journal_key(record))
                if raw is not None and json.loads(raw)["seq"] == record.seq:
                    txn.put(self._journal_key(record), json.dumps(asdict(record)).encode())

    def _forget(self, record: PendingObject) -> None:
        """Remove ``record`` from the journal unless a newer record of its key replaced it."""
        with self._journal_lock:
            if self._journal_closed:
                return
            with self._env.begin(write=True) as txn:
                raw = txn.get(self._journal_key(record))
                if raw is not None and json.loads(raw)["seq"] == record.seq:
                    txn.delete(self._journal_key(record))

    def _referenced(self, session: str) -> bool:
        return self._session_refs.get(session, 0) > 0

    def _set_record_locked(
        self, ident: Ident, record: PendingObject | None
    ) -> PendingObject | None:
        """The one place a key's pending record changes (None: it has none now), keeping the
        indexes of the records in step: keys by prefix, and how many records use each staging
        session. Returns the record it replaced."""
        old = self._records.pop(ident, None) if record is None else self._records.get(ident)
        if record is None:
            self._keys.discard(*ident)
        else:
            self._records[ident] = record
            self._keys.add(*ident)
            if record.session:
                self._session_refs[record.session] += 1
        if old is not None and old.session:
            self._session_refs[old.session] -= 1
            if self._session_refs[old.session] <= 0:
                del self._session_refs[old.session]
        return old

    def _release_if_unreferenced(self, session: str) -> None:
        if not session:
            return
        with self._cond:
            staged = self._staged.get(session)
            if staged is None or staged.attached or self._referenced(session):
                return
            self._staged.pop(session, None)
        self._release_staged(staged)

    def _forget_later(self, record: PendingObject | None, session: str = "") -> None:
        """Queue ``record``'s removal from the journal (and an inline ``session``'s bytes, once
        no record needs them). Done in batches by one thread: a finished upload needs no fsync
        of its own, and a crash before the batch only uploads it again (the same bytes)."""
        with self._gc_cond:
            if record is not None:
                self._gc_records.append(record)
                if record.inline:
                    self._gc_sessions.append(record.session)
            if session:
                self._gc_sessions.append(session)
            self._gc_cond.notify()

    def _gc_loop(self) -> None:
        while True:
            with self._gc_cond:
                while not (self._gc_records or self._gc_sessions or self._gc_stop):
                    self._gc_cond.wait()
                if self._gc_stop:
                    return
            time.sleep(GC_BATCH_S)  # uploads finishing meanwhile join the batch
            self._gc_flush()

    def _gc_flush(self) -> None:
        with self._gc_cond:
            records, sessions = self._gc_records, self._gc_sessions
            self._gc_records, self._gc_sessions = [], []
        if not records and not sessions:
            return
        with self._cond:
            dead = [s for s in set(sessions) if not self._referenced(s)]
        freed = 0
        with self._journal_lock:
            if self._journal_closed:
                return
            with self._env.begin(write=True) as txn:
                for record in records:
                    raw = txn.get(self._journal_key(record))
                    if raw is not None and json.loads(raw)["seq"] == record.seq:
                        txn.delete(self._journal_key(record))
                for session in dead:
                    data = txn.pop(_DATA_PREFIX + session.encode())
                    freed += len(data) if data is not None else 0
        if freed:
            with self._cond:
                self._inline_bytes -= freed

    def _replace_locked(self, record: PendingObject) -> None:
        ident = (record.namespace, record.key)
        old = self._records.get(ident)
        self._set_record_locked(ident, record)
        self._maybe_borrowed = self._maybe_borrowed or bool(record.upload_key or record.source_key)
        self._attempts.pop(ident, None)
        if self.upload_delay > 0:
            self._retry_at[ident] = time.monotonic() + self.upload_delay
        else:
            self._retry_at.pop(ident, None)
        self._queue_locked(ident)
        if old is not None and old.inline and old.session != record.session:
            self._forget_later(None, old.session)
        if old is not None and old.session and old.session != record.session:
            staged = self._staged.get(old.session)
            if staged is not None and not staged.attached and not self._referenced(old.session):
                self._staged.pop(old.session, None)
                threading.Thread(target=self._release_staged, args=(staged,), daemon=True).start()
        self._cond.notify_all()

    def _detach_writers_locked(self, namespace: str, key: str) -> None:
        for staged in self._staged.values():
            if staged.attached and (staged.namespace, staged.key) == (namespace, key):
                staged.detached = True

    def _queue_locked(self, ident: Ident) -> None:
        """Queue ``ident`` for upload when its due time comes (placed again when it is queued
        already: a new record may have a new due time)."""
        self._queued.add(ident)
        self._place_locked(ident, time.monotonic())
        self._work.notify()

    def _place_locked(self, ident: Ident, now: float) -> None:
        """Put a queued key where it waits: _ready when due, else _waiting by its due time."""
        due = self._retry_at.get(ident, 0.0)
        if due > now:
            heapq.heappush(self._waiting, (due, next(self._waiting_seq), ident))
        else:
            self._ready.append(ident)

    def _due_now_locked(self, ident: Ident) -> None:
        """``ident`` is to be uploaded without waiting any longer (an fsync, a retry)."""
        self._retry_at.pop(ident, None)
        if ident in self._queued:
            self._ready.append(ident)  # its _waiting entry, if any, is skipped when it comes up
            self._work.notify()

    def _next_locked(self) -> Ident | None:
        """A key that is due and not being uploaded, or None."""
        now = time.monotonic()
        # a key that a renamed file's upload still completes under waits for it to be copied
        borrowed: set[Ident] = set()
        if self._maybe_borrowed:
            borrowed = {
                (r.namespace, k)
                for r in self._records.values()
                for k in (r.upload_key, r.source_key)
                if k and k != r.key
            }
            self._maybe_borrowed = bool(borrowed)
        while self._waiting and self._waiting[0][0] <= now:  # due now: to _ready
            ident = heapq.heappop(self._waiting)[2]
            if ident in self._queued:
                self._ready.append(ident)
        held: list[Ident] = []
        found = None
        while self._ready:
            ident = self._ready.popleft()
            if ident not in self._queued:
                continue  # taken already (a repeated entry)
            if ident not in self._records:
                self._queued.discard(ident)
                continue
            if self._retry_at.get(ident, 0.0) > now:  # delayed again since it was placed
                self._place_locked(ident, now)
                continue
            if ident in self._active or ident in borrowed:
                held.append(ident)
                continue
            self._queued.discard(ident)
            found = ident
            break
        self._ready.extend(held)
        return found

    def _next_due_locked(self) -> float | None:
        """When the earliest waiting key is due (None: none waits)."""
        while self._waiting and self._waiting[0][2] not in self._queued:
            heapq.heappop(self._waiting)  # taken or dropped since
        return self._waiting[0][0] if self._waiting else None

    def _upload_loop(self) -> None:
        while True:
            with self._cond:
                ident = None
                while not self._closing:
                    ident = self._next_locked()
                    if ident is not None:
                        break
                    due = self._next_due_locked()
                    wait = 1.0 if due is None else max(0.05, due - time.monotonic())
                    self._work.wait(min(wait, 1.0))
                if self._closing or ident is None:
                    return
                record = self._records[ident]
                self._active.add(ident)
                if self._ready:  # more is due: the next idle uploader takes it
                    self._work.notify()
            try:
                self._upload_one(ident, record)
            except Exception:  # the loop must survive anything
                log.exception("uploader failed on %s/%s", *ident)
            finally:
                with self._cond:
                    self._active.discard(ident)
                    if self._records.get(ident, record).seq != record.seq:
                        self._queue_locked(ident)  # replaced while uploading: the newer one next
                    elif self._maybe_borrowed or self._ready:  # a key it held back may be free
                        self._work.notify()

    def _current(self, ident: Ident, record: PendingObject) -> bool:
        with self._cond:
            return self._is_current_locked(ident, record) and not self._closing

    def _is_current_locked(self, ident: Ident, record: PendingObject) -> bool:
        current = self._records.get(ident)
        return current is not None and current.seq == record.seq

    def _upload_one(self, ident: Ident, record: PendingObject) -> None:
        store = self._stores[record.namespace]
        try:
            info = None if record.delete else self._upload(store, ident, record)
            if record.delete:
                store.delete(record.key)
        except Superseded:
            return
        except Exception as exc:
            self._failed(ident, record, exc)
            return
        self._finish(record, info)

    def _failed(self, ident: Ident, record: PendingObject, exc: BaseException) -> None:
        permanent = is_permanent(exc)
        with self._cond:
            if self._closing or not self._is_current_locked(ident, record):
                return
            attempt = self._attempts.get(ident, 0) + 1
            self._attempts[ident] = attempt
            failed = replace(record, error=str(exc) or type(exc).__name__, permanent=permanent)
            self._set_record_locked(ident, failed)
            if not permanent:
                delay = UPLOAD_RETRY_S[min(attempt - 1, len(UPLOAD_RETRY_S) - 1)]
                self._retry_at[ident] = time.monotonic() + delay * random.uniform(0.8, 1.2)
                self._queue_locked(ident)
            else:
                self.failed_permanently += 1
            self._cond.notify_all()
        self._journal_update(failed)
        what = "delete" if record.delete else "upload"
        if permanent:
            log.error(
                "%s of %s/%s refused by the store, not retried (kept; `pcache uploads retry` "
                "or `discard`): %s",
                what,
                *ident,
                exc,
            )
        else:
            log.warning(
                "%s of %s/%s failed (attempt %d, retrying in about %.0fs): %s",
                what,
                *ident,
                attempt,
                UPLOAD_RETRY_S[min(attempt - 1, len(UPLOAD_RETRY_S) - 1)],
                exc,
            )

    def _upload(self, store: Store, ident: Ident, record: PendingObject) -> ObjectInfo:
        try:
            return self._upload_record(store, ident, record)
        except PreconditionFailed as exc:
            if not record.source_key:
                raise
            landed = self._landed(store, record)
            if landed is not None:  # completed before a crash; the source is what it replaced
                return landed
            how = "renamed" if record.moved else "opened"
            raise PreconditionFailed(
                f"{record.key!r} was {how} from {record.source_key!r}, which changed in the store "
                f"before the upload: its unchanged bytes are gone ({exc})"
            ) from exc

    @staticmethod
    def _copy_moved(store: Store, record: PendingObject) -> ObjectInfo:
        """A renamed stored object: copied inside the store, from the version it was renamed
        at (PreconditionFailed when that version is gone)."""
        try:
            source = store.stat(record.source_key)
        except FileNotFoundError as exc:
            raise PreconditionFailed(f"{record.source_key!r} is gone") from exc
        if source.etag != record.source_etag:
            raise PreconditionFailed(f"{record.source_key!r} was replaced")
        info = store.copy(record.source_key, record.key)
        if record.metadata != source.metadata and store.features.replace_metadata:
            info = store.replace_metadata(record.key, dict(record.metadata))
        return replace(info, metadata=dict(record.metadata))

    @staticmethod
    def _landed(store: Store, record: PendingObject) -> ObjectInfo | None:
        """The stored object, when it is this record's (same size and POSIX metadata: times
        in nanoseconds make that a fingerprint)."""
        try:
            info = store.stat(record.key)
        except FileNotFoundError:
            return None
        if record.metadata and info.size == record.size and info.metadata == record.metadata:
            return info
        return None

    def _upload_record(self, store: Store, ident: Ident, record: PendingObject) -> ObjectInfo:
        if record.moved:
            return self._copy_moved(store, record)
        if record.inline:
            info = store.put(
                record.key, self._inline_data(record), metadata=record.metadata or None
            )
            return replace(info, metadata=dict(record.metadata))
        single = record.size <= self.part_size or record.size < store.features.min_part_size
        if single and not record.released:
            data = self._reader(record)(0, record.size)
            info = store.put(record.key, data, metadata=record.metadata or None)
            return (
                info
                if info.metadata == record.metadata
                else replace(info, metadata=dict(record.metadata))
            )
        eager = self._eager_of(store, record)

        def finish(upload: EagerUpload) -> ObjectInfo:
            return upload.finish(
                record.size,
                record.metadata,
                lambda: self._current(ident, record),
                threads=PART_THREADS,
                read=self._reader(record) if record.absent else None,
                copy=self._copier(record),
            )

        try:
            info = finish(eager)
        except UploadNotFound as exc:
            if record.released:  # permanent: the released bytes went with the upload
                raise _lost(record, exc) from exc
            log.info("upload of %s/%s lost by the store: starting it again", *ident)
            info = finish(self._eager_of(store, record, fresh=True))
        if record.upload_key and record.upload_key != record.key:
            # renamed after bytes were released: completed under the old name, moved now
            store.copy(record.upload_key, record.key)
            if store.features.replace_metadata and record.metadata:
                info = store.replace_metadata(record.key, dict(record.metadata))
            else:
                info = store.stat(record.key)
            store.delete(record.upload_key)
            info = replace(info, metadata=dict(record.metadata))
        return info

    def _eager_of(self, store: Store, record: PendingObject, *, fresh: bool = False) -> EagerUpload:
        """The multipart upload to complete ``record`` with: its staging file's (filled while
        it was written), the journalled one after a restart, or (``fresh``) a new one."""
        with self._cond:
            staged = self._staged.get(record.session)
        key = record.upload_key or record.key
        eager = staged.eager if staged is not None else None
        if not fresh and eager is not None and eager.key == key and eager.is_open:
            return eager
        if not fresh and eager is None and record.upload_id:  # journalled before a restart
            parts = [PartInfo(int(n), str(etag), int(size)) for n, etag, size in record.parts]
            eager = EagerUpload(
                store,
                key,
                record.path,
                parts[0].size if parts else self.part_size,
                None,
                upload_id=record.upload_id,
                parts=parts,
                released=record.released,
            )
        elif record.released:
            raise _lost(record, "its upload was completed or aborted meanwhile")
        else:
            if eager is not None:
                eager.abort()
            part_size = max(self.part_size, -(-record.size // store.features.max_parts))
            eager = EagerUpload(store, key, record.path, part_size, None)
        if staged is not None:
            staged.eager = eager
        return eager

    def _finish(self, record: PendingObject, info: ObjectInfo | None) -> None:
        """Drop a record whose change is in the store.

        ``on_uploaded`` (the worker refreshes its metadata cache) runs before the record leaves
        the pending set: a listing or stat meanwhile sees either the pending record or the new
        state, never neither (see ``Worker.listing``)."""
        ident = (record.namespace, record.key)
        with self._cond:
            if self._closing:
                return  # stopped meanwhile: the record stays journalled, redone at start
            if not self._is_current_locked(ident, record):
                return  # replaced while uploading: the newer record decides
        try:
            self._on_uploaded(record, info)
        except Exception:  # never keep a finished record because a callback failed
            log.exception("on_uploaded for %s/%s failed", record.namespace, record.key)
        with self._cond:
            if self._closing or not self._is_current_locked(ident, record):
                return
            self._set_record_locked(ident, None)
            self._attempts.pop(ident, None)
            self._retry_at.pop(ident, None)
            if info is not None:
                self.uploaded += 1
                self.uploaded_bytes += record.size
                self._uploaded_as[record.version] = info
                while len(self._uploaded_as) > 10_000:
                    self._uploaded_as.popitem(last=False)
        self._forget_later(record)
        self._release_if_unreferenced(record.session)
        if info is not None:
            log.info("uploaded %s/%s (%d bytes)", record.namespace, record.key, record.size)
        with self._cond:
            self._cond.notify_all()


def _lost(record: PendingObject, cause: object) -> UploadNotFound:
    return UploadNotFound(
        f"the first {record.released} bytes of {record.key!r} were dropped from the cache once "
        f"uploaded, and the store no longer has that upload ({cause})"
    )
