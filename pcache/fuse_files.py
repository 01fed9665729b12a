"""Files open on a ``pcache mount``: the staging file every descriptor of one path shares.

A path opened for writing gets one :class:`OpenFile`: a write-back session on the node's worker
whose staging file (on a cache disk) the mount writes and reads itself, with ``pwrite``, ``pread``
and ``ftruncate``; the worker only reserves capacity for it ahead of the writes and journals it on
commit. Every descriptor of the path (several writers, ``O_APPEND``, readers, a shared writable
``mmap``) goes to the same file, so readers through the mount see a writer's bytes at once.

Small files (up to :data:`SMALL_FILE_MAX`) stay in the mount's memory until their first commit,
which sends them in one request (the worker stages, fsyncs and journals them as any other): a
create, a write and a close cost one worker round trip. A file that grows past the limit moves
into a staging file.

Opening an existing object without ``O_TRUNC`` copies it lazily, block by block (the worker's
block size): the staging file starts as holes, a block is copied in when first read or partly
written (a block written whole is not copied at all), and the blocks never touched go to the
worker with the commit as a :class:`~pcache.protocol.CopySource`: the upload makes the parts
that lie wholly in them inside the store (UploadPartCopy) and reads the rest from the store, so
appending to a large object neither copies nor sends what did not change. A pending object (not
in the store yet) is still copied whole when opened. Copies and the writes over holes happen
under the file's lock, so a copy never lands over newer bytes.

Large files are uploaded while they are written (:mod:`pcache.eager`): every reservation and
commit reports the file's *frontier* (the prefix written contiguously) and the ranges written
over below the frontier last reported, so the worker never completes an upload with a part older
than the commit. When the cache is full, the mount drops the parts already in the store from the
staging file (``released``, a prefix: punched holes) instead of failing with ``ENOSPC``; those
bytes are then only in the store's unfinished upload, so reading or writing them again through
this descriptor fails with ``EIO`` until the file is closed and uploaded (other readers wait for
the upload). The report is taken in the trio task, before the request: a write meanwhile counts
as written over. ``flush`` (each ``close(2)``) commits: the staging file is fsynced and journalled
(local-durable; ``--durability remote`` also waits for the store); ``fsync`` waits for the store.
The last release closes the session; what was committed stays journalled until uploaded.

Recovery: when the worker lost the session (it restarted), the next commit opens a new session,
copies this file's bytes into it from the descriptor the mount still holds, and commits that; a
write is never lost because the worker went away.

Threading: the attributes are touched only in the mount's trio task; the blocking calls (worker
requests, copies) run in worker threads through the operations' limiter, never two at once for
one file (:attr:`OpenFile.lock`).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import time
from dataclasses import dataclass, field

import trio

from objstore.base import ObjectInfo
from objstore.errors import InsufficientStorage

from .client import PcacheClient
from .config import Durability
from .files import PcacheReader
from .posix import Attrs, keep_foreign
from .protocol import CopySource, Progress, WriteError, split_path
from .session import STRICT_TIMEOUT_S, WriteSession

log = logging.getLogger(__name__)

COPY_CHUNK = 8 << 20
SMALL_FILE_MAX = 1 << 20  # files up to this size are kept in memory until committed
REPORT_EVERY = 8 << 20  # the worker hears of a sequential writer's progress this often
RELEASE_WAIT_S = 60.0  # a writer out of room waits this long for its parts to be uploaded
_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02


class StagingUnreachable(OSError):
    """The worker's staging file cannot be opened from here (the mount is not on its node)."""


@dataclass
class OpenFile:
    """One path open for writing (and whoever reads it meanwhile) on this mount.

    Attributes:
        path: mount-relative path (changes on rename).
        client_path: ``NS/KEY`` (changes on rename).
        session: the worker's write session (None while the file is small and in ``buffer``).
        fd: the staging file, opened by the mount (-1 while buffered).
        buffer: the content of a small file not in a staging file yet.
        size: the file's size as the writers made it.
        reserved: capacity the worker holds for the staging file.
        attrs: mode, owner and times (committed as object metadata).
        foreign: other user metadata of the object, kept as it was.
        handles: descriptors (file handles) using this file.
        changes: bumped by every write, truncate or attribute change.
        committed_changes: ``changes`` as of the last successful commit.
        unlinked: the path was removed or renamed over: nothing more is committed.
        failed: the errno of a write that failed (no room): the file is never committed.
        frontier: ``[0, frontier)`` was written contiguously.
        reported: the frontier the worker was last told.
        overwritten: ranges below ``reported`` written over since (the next report's).
        released: the prefix dropped from the staging file (only in the store's parts).
        source: the object version the holes are copied from (opened without O_TRUNC).
        source_path: its ``NS/KEY`` (the name it was opened by).
        source_size: the holes hold its bytes below this offset (a truncate lowers it).
        absent: block indexes not copied yet (``block_size`` bytes each).
    """

    path: str
    client_path: str
    session: WriteSession | None
    fd: int
    size: int
    attrs: Attrs
    foreign: dict[str, str] = field(default_factory=dict)
    buffer: bytearray | None = None
    reserved: int = 0
    handles: int = 0
    changes: int = 0
    committed_changes: int = 0
    unlinked: bool = False
    failed: int = 0
    frontier: int = 0
    reported: int = 0
    overwritten: list[tuple[int, int]] = field(default_factory=list)
    released: int = 0
    source: ObjectInfo | None = None
    source_path: str = ""
    source_size: int = 0
    absent: set[int] = field(default_factory=set)
    block_size: int = 1 << 20
    lock: trio.Lock = field(default_factory=trio.Lock)

    @property
    def dirty(self) -> bool:
        return self.changes != self.committed_changes

    def touch(self) -> None:
        now = time.time_ns()
        self.attrs = Attrs(
            self.attrs.mode, self.attrs.uid, self.attrs.gid, now, now, self.attrs.atime_ns
        )
        self.changes += 1

    def metadata(self) -> dict[str, str]:
        return keep_foreign(self.foreign, self.attrs)

    # -- data (inline: the staging file is on a local disk) --------------------------------

    def needs_room(self, end: int) -> bool:
        """Whether growing to ``end`` needs the worker first (capacity, a staging file, or
        news of the writer's progress, so that its early upload keeps up)."""
        if self.buffer is not None:
            return end > SMALL_FILE_MAX
        return end > self.reserved or self.frontier - self.reported >= REPORT_EVERY

    def _check_kept(self, offset: int) -> None:
        if offset < self.released:
            raise OSError(
                errno.EIO,
                f"{self.path}: bytes before {self.released} were uploaded and dropped from the "
                "full cache; they can be read once the file is closed and uploaded",
            )

    def _wrote(self, start: int, end: int) -> None:
        if start < self.reported:
            self.overwritten.append((start, min(end, self.reported)))
        if start <= self.frontier and not self.absent:  # never early parts over holes
            self.frontier = max(self.frontier, end)

    # -- copy on write ---------------------------------------------------------------------

    def missing(self, offset: int, length: int) -> list[int]:
        """Blocks not copied yet that ``[offset, offset + length)`` touches."""
        end = min(offset + length, self.source_size)
        if not self.absent or offset >= end:
            return []
        first, last = offset // self.block_size, (end - 1) // self.block_size
        if last - first > len(self.absent):
            return sorted(i for i in self.absent if first <= i <= last)
        return [i for i in range(first, last + 1) if i in self.absent]

    def partly_written(self, offset: int, length: int) -> list[int]:
        """Blocks not copied yet that a write of ``[offset, offset + length)`` covers only in
        part: they are copied before it."""
        bs, end = self.block_size, offset + length
        return [
            i
            for i in self.missing(offset, length)
            if offset > i * bs or end < min((i + 1) * bs, self.source_size)
        ]

    def copied(self, indexes: list[int]) -> None:
        self.absent.difference_update(indexes)

    def copy_source(self) -> CopySource | None:
        """What the commit tells the worker about the holes left."""
        if not self.absent or self.source is None:
            return None
        ranges: list[tuple[int, int]] = []
        for i in sorted(self.absent):
            start, end = i * self.block_size, min((i + 1) * self.block_size, self.source_size)
            if start >= end:
                continue
            if ranges and ranges[-1][1] == start:
                ranges[-1] = (ranges[-1][0], end)
            else:
                ranges.append((start, end))
        if not ranges:
            return None
        return CopySource(split_path(self.source_path)[1], self.source.etag, tuple(ranges))

    def take_progress(self) -> Progress:
        """The report for the next request; from now on the worker counts as told (a request
        that fails gives it back: :meth:`restore_progress`)."""
        progress = Progress(self.frontier, tuple(self.overwritten), self.released)
        self.reported = self.frontier
        self.overwritten = []
        return progress

    def restore_progress(self, progress: Progress) -> None:
        self.overwritten[:0] = progress.dirty

    def release(self, upto: int) -> bool:
        """Drop ``[released, upto)`` (in the store's parts) from the staging file; False when
        nothing could be dropped (a write over it is not reported yet, or no hole punching)."""
        if upto <= self.released or self.fd < 0:
            return False
        if any(start < upto for start, _ in self.overwritten):
            return False  # reported first; the worker then counts those parts as not uploaded
        try:
            punch_hole(self.fd, self.released, upto - self.released)
        except OSError as exc:
            log.warning("%s: cannot drop uploaded bytes from the cache: %s", self.path, exc)
            return False
        self.released = upto
        return True

    def pwrite(self, offset: int, data: bytes) -> int:
        self._check_kept(offset)
        if self.buffer is not None:
            if offset > len(self.buffer):
                self.buffer.extend(bytes(offset - len(self.buffer)))
            self.buffer[offset : offset + len(data)] = data
            done = len(data)
        else:
            view = memoryview(data)
            done = 0
            while done < len(view):
                done += os.pwrite(self.fd, view[done:], offset + done)
        self.size = max(self.size, offset + done)
        if self.absent:  # the partly covered blocks were copied before (the caller's lock)
            self.copied(self.missing(offset, done))
        self._wrote(offset, offset + done)
        self.touch()
        return done

    def pread(self, offset: int, size: int) -> bytes:
        size = max(0, min(size, self.size - offset))
        if size:
            self._check_kept(offset)
        if self.buffer is not None:
            return bytes(self.buffer[offset : offset + size])
        return os.pread(self.fd, size, offset)

    def truncate(self, size: int) -> None:
        self._check_kept(size)
        if self.buffer is not None:
            if size < len(self.buffer):
                del self.buffer[size:]
            else:
                self.buffer.extend(bytes(size - len(self.buffer)))
        else:
            os.ftruncate(self.fd, size)
        self.size = size
        if size < self.source_size:  # what was cut off is not the source's any more
            self.source_size = size
            self.absent = {i for i in self.absent if i * self.block_size < size}
        if size < self.reported:
            self.overwritten.append((size, self.reported))
        self.frontier = min(self.frontier, size)
        self.touch()

    def close_fd(self) -> None:
        if self.fd < 0:
            return
        try:
            os.close(self.fd)
        except OSError:
            pass


def open_staging(client: PcacheClient, client_path: str) -> tuple[WriteSession, int]:
    """A new write session and the mount's own descriptor of its staging file."""
    session = client.open_session(client_path)
    try:
        fd = os.open(session.path, os.O_RDWR)
    except OSError as exc:
        session.abort()
        raise StagingUnreachable(
            exc.errno or 5,
            f"cannot open the worker's staging file {session.path} ({exc.strerror}): a writable "
            "mount must run on the worker's node, with access to its cache directories",
        ) from None
    return session, fd


def copy_blocks(client: PcacheClient, file: OpenFile, indexes: list[int], fd: int = -1) -> None:
    """Copy blocks of the file's source into its staging file (worker thread, under the file's
    lock; the caller marks them copied). Raises ``StaleVersion`` when the source changed."""
    assert file.source is not None
    target = file.fd if fd < 0 else fd
    for index in indexes:
        start = index * file.block_size
        length = min(file.block_size, file.source_size - start)
        if length <= 0:
            continue
        buffer = bytearray(length)
        got = client.readinto(file.source_path, start, memoryview(buffer), file.source)
        if got != length:
            raise OSError(errno.EIO, f"{file.source_path}: short read of block {index}")
        os.pwrite(target, buffer, start)


def fill_from(client: PcacheClient, client_path: str, fd: int, info: ObjectInfo) -> int:
    """Copy the object's current content into a staging file (copy on open); returns its size.
    Raises ``StaleVersion`` when it changed meanwhile."""
    done = 0
    with PcacheReader(client, client_path) as reader:
        while chunk := reader.read(COPY_CHUNK):
            done += os.pwrite(fd, chunk, done)
    return done


def copy_fd(source: int, target: int, size: int) -> None:
    offset = 0
    while offset < size:
        chunk = os.pread(source, min(COPY_CHUNK, size - offset), offset)
        if not chunk:
            break
        os.pwrite(target, chunk, offset)
        offset += len(chunk)
    os.ftruncate(target, size)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Free the disk blocks of ``[offset, offset + length)`` (reads as zeros, size kept)."""
    if _libc.fallocate(
        fd,
        _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE,
        ctypes.c_long(offset),
        ctypes.c_long(length),
    ):
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


_libc = ctypes.CDLL(None, use_errno=True)


def make_room(client: PcacheClient, file: OpenFile, end: int, progress: Progress) -> int:
    """Before the file grows to ``end`` (worker thread): a small file past the limit moves into
    a staging file; a staged one gets capacity for ``end``. Returns 0, or, when the cache is
    full but the file's first bytes are in the store, the offset up to which the caller should
    drop them (:meth:`OpenFile.release`) before asking again. ``InsufficientStorage`` if
    neither."""
    if file.buffer is not None:
        session, fd = open_staging(client, file.client_path)
        try:
            file.reserved = session.reserve(max(end, len(file.buffer)), progress)
            os.pwrite(fd, bytes(file.buffer), 0)
        except BaseException:
            os.close(fd)
            session.abort()
            raise
        file.session, file.fd, file.buffer = session, fd, None
        return 0
    assert file.session is not None
    try:
        file.reserved = file.session.reserve(end, progress)
    except InsufficientStorage:
        uploaded = file.session.uploaded(beyond=file.released, wait=RELEASE_WAIT_S)
        if uploaded <= file.released:
            raise
        return uploaded
    return 0


def commit(
    client: PcacheClient,
    file: OpenFile,
    durability: Durability,
    *,
    close: bool,
    timeout: float = STRICT_TIMEOUT_S,
    progress: Progress | None = None,
) -> ObjectInfo | None:
    """Commit the file's content and attributes (worker thread) with the writer's ``progress``
    (:meth:`OpenFile.take_progress`); returns what it became, or None when its name was removed
    meanwhile. A session the worker lost is rebuilt from our copy."""
    if file.unlinked:
        return None
    changes = file.changes
    if file.buffer is not None:  # a small file: staged, fsynced and journalled in one request
        info = client.put_small(
            file.client_path,
            bytes(file.buffer),
            metadata=file.metadata(),
            durable=durability,
            timeout=timeout,
        )
        file.committed_changes = changes
        return info
    assert file.session is not None
    try:
        info = file.session.commit(
            size=file.size,
            metadata=file.metadata(),
            durable=durability,
            close=close,
            timeout=timeout,
            progress=progress,
            source=file.copy_source(),
        )
    except WriteError:
        if file.unlinked:
            return None
        if file.released:
            raise  # the session's upload held the dropped bytes: nothing to write again from
        info = _recommit(client, file, durability, close, timeout)
    file.committed_changes = changes
    return info


def _recommit(
    client: PcacheClient, file: OpenFile, durability: Durability, close: bool, timeout: float
) -> ObjectInfo:
    """The worker no longer knows the session (restarted, or reaped): a new one, same bytes."""
    log.warning("write session of %s lost by the worker; writing it again", file.path)
    session, fd = open_staging(client, file.client_path)
    try:
        session.reserve(file.size)
        copy_fd(file.fd, fd, file.size)
        copy_blocks(client, file, sorted(file.absent), fd)  # the holes: the new one has none
    except BaseException:
        os.close(fd)
        session.abort()
        raise
    old_fd, file.fd, file.session = file.fd, fd, session
    if old_fd >= 0:
        os.close(old_fd)
    file.reserved = 0
    file.reported = 0  # the new session has been told nothing yet
    file.absent = set()
    return session.commit(
        size=file.size, metadata=file.metadata(), durable=durability, close=close, timeout=timeout
    )


def end_session(file: OpenFile) -> None:
    """The last descriptor is gone: close the session (what was committed stays) and the fd."""
    if file.session is None:
        return
    try:
        file.session.abort()
    except OSError as exc:  # the worker went away: it drops the session itself
        log.info("closing the write session of %s: %s", file.path, exc)
    file.close_fd()
