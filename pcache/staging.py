"""Staging files: the bytes of objects written on this node before they reach the store.

A :class:`StagedFile` is one file under ``<cache dir>/staging/`` plus the cache capacity reserved
for it (pinned: never evicted). It holds the whole content of one object being written: writes
land at any offset (holes read as zeros), it can be truncated and extended, and it is read back
by the node's readers while its upload is pending.

Two kinds of writers fill it:

* the worker itself, for clients that send their bytes over HTTP or shared memory
  (:meth:`StagedFile.write`, :meth:`StagedFile.truncate`);
* a client on the same node that opens :attr:`StagedFile.path` itself (the mount): it writes
  with ``pwrite``/``ftruncate`` directly and asks the worker for capacity ahead of its writes
  (:meth:`StagedFile.reserve`), so the cache's hard cap holds without a worker round trip per
  write.

``sync`` fsyncs the file (the "local-durable" half of a commit; the journal entry is the other).

While it is written, its whole parts go to the store early (:mod:`pcache.eager`): writes through
here move the *frontier* (the end of the prefix written contiguously from 0) themselves; a direct
writer reports it with every reservation and commit (:meth:`StagedFile.report`), together with
the ranges below the frontier it last reported that it wrote over since. A direct writer may drop
uploaded parts from the disk (``released``, a prefix); the reservation then covers only the rest.

Thread-safe: one lock per file orders writes, truncates, reports and the reservation (taken
before the eager upload's own lock).
"""

from __future__ import annotations

import logging
import os
import secrets
import threading
import time
from pathlib import Path

from .blockstore import NoSpace, Reservation
from .eager import EagerUpload
from .protocol import Progress, WriteError

log = logging.getLogger(__name__)

RESERVE_AHEAD = 64 << 20  # a direct writer asks for this much room beyond what it has written
RESERVE_AHEAD_MIN = 1 << 20  # ... or, when the cache is nearly full, as little as this


class StagedFile:
    """One object's bytes on a cache disk, with the capacity reserved for them.

    Attributes:
        id: the session id clients name it by (random, never reused).
        namespace, key: the object it will become (``key`` changes on rename).
        path: the staging file.
        attached: a writer still has it open; commits may follow.
        detached: its name was unlinked or renamed over while open: later commits are dropped.
        frontier: the prefix ``[0, frontier)`` the writer has written contiguously.
        released: the prefix whose bytes were dropped from the disk (they are in the eager
            upload's parts).
        eager: the multipart upload filled while the file is written, if any.
    """

    def __init__(
        self,
        namespace: str,
        key: str,
        reservation: Reservation,
        *,
        session_id: str | None = None,
        path: Path | None = None,
    ) -> None:
        self.id = session_id or secrets.token_hex(8)
        self.namespace = namespace
        self.key = key
        self._reservation = reservation
        if path is None:
            directory = Path(reservation.dir.path) / "staging"
            directory.mkdir(parents=True, exist_ok=True)
            path = directory / self.id
            self._fd: int | None = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        else:
            self._fd = os.open(path, os.O_RDWR)
        self.path = path
        self.size = os.fstat(self._fd).st_size
        self.attached = True
        self.detached = False
        self.released = False
        self.frontier = 0
        self.released_bytes = 0
        self.eager: EagerUpload | None = None
        self._lock = threading.Lock()
        self.last_used = time.monotonic()

    @property
    def reserved(self) -> int:
        return self._reservation.nbytes

    def _fd_or_fail(self) -> int:
        if self._fd is None or self.released:
            raise WriteError(f"write session {self.id} is closed")
        return self._fd

    def _ensure_room(self, end: int) -> None:
        if end > self._reservation.nbytes:
            self._reservation.grow(end - self._reservation.nbytes)

    def write(self, offset: int, data: bytes | memoryview) -> int:
        """Write ``data`` at ``offset``; reserves capacity first (``NoSpace`` when full)."""
        if offset < 0:
            raise WriteError(f"negative write offset {offset}")
        with self._lock:
            fd = self._fd_or_fail()
            end = offset + len(data)
            self._ensure_room(end)
            if offset < self.released_bytes:
                raise WriteError(f"bytes at {offset} of {self.key!r} were already uploaded")
            view = memoryview(data)
            done = 0
            while done < len(view):
                done += os.pwrite(fd, view[done:], offset + done)
            self.size = max(self.size, end)
            self.last_used = time.monotonic()
            dirty = (offset, min(end, self.frontier))
            if offset <= self.frontier:
                self.frontier = max(self.frontier, end)
            self._reported_locked(self.frontier, [dirty])
            return done

    def truncate(self, size: int) -> None:
        """Cut or extend (with zeros) the file to ``size`` bytes."""
        if size < 0:
            raise WriteError(f"negative size {size}")
        with self._lock:
            fd = self._fd_or_fail()
            if size < self.released_bytes:
                raise WriteError(f"bytes at {size} of {self.key!r} were already uploaded")
            self._ensure_room(size - self.released_bytes)
            os.ftruncate(fd, size)
            self.size = size
            self.last_used = time.monotonic()
            self.frontier = min(self.frontier, size)
            if self.eager is not None:
                self.eager.truncated(size)

    def _reported_locked(self, frontier: int, dirty: list[tuple[int, int]]) -> None:
        if self.eager is not None:
            for start, end in dirty:
                self.eager.dirty(start, end)
            self.eager.advance(frontier)

    def report(self, progress: Progress) -> None:
        """A direct writer's progress: it wrote ``[0, frontier)``, wrote over ``dirty`` ranges
        since its last report, and dropped ``[0, released)`` from the disk."""
        frontier, dirty, released = progress.frontier, progress.dirty, progress.released
        with self._lock:
            self._fd_or_fail()
            self.last_used = time.monotonic()
            if released > self.released_bytes:
                uploaded = self.eager.uploaded_prefix() if self.eager is not None else 0
                if released > uploaded:
                    raise WriteError(
                        f"cannot release {released} bytes of {self.key!r}: {uploaded} uploaded"
                    )
                self.released_bytes = released
                if self.eager is not None:
                    self.eager.released = released
            for start, _ in dirty:
                if start < self.released_bytes:
                    raise WriteError(f"bytes at {start} of {self.key!r} were already uploaded")
            self.frontier = frontier
            self._reported_locked(frontier, list(dirty))

    def reserve(self, size: int) -> int:
        """For a direct writer about to grow the file to ``size``: hold capacity for it (plus
        :data:`RESERVE_AHEAD`, best effort) and return how much is held. Shrinks the hold when
        the file got smaller. Raises ``NoSpace`` when even ``size`` cannot be held. Bytes
        released from the disk do not count."""
        with self._lock:
            self._fd_or_fail()
            self.last_used = time.monotonic()
            size -= self.released_bytes
            held = self._reservation.nbytes
            if size > held:
                ahead = RESERVE_AHEAD
                while ahead >= RESERVE_AHEAD_MIN:  # the cache nearly full: less ahead
                    try:
                        self._reservation.grow(size + ahead - held)
                        break
                    except NoSpace:
                        ahead //= 4
                else:
                    self._reservation.grow(size - held)  # NoSpace again: the caller's ENOSPC
            elif size + 2 * RESERVE_AHEAD < held:
                self._reservation.shrink(held - size - RESERVE_AHEAD)
            return self._reservation.nbytes + self.released_bytes

    def read(self, offset: int, length: int) -> bytes:
        """Bytes at ``offset`` (short at the end of the file)."""
        with open(self.path, "rb") as file:
            return os.pread(file.fileno(), length, offset)

    def sync(self, size: int | None = None) -> int:
        """fsync the file; a direct writer passes the ``size`` it sees (its writes and
        truncates did not go through here). Returns the size."""
        with self._lock:
            fd = self._fd_or_fail()
            if size is not None:
                self.size = size
            elif self.size != os.fstat(fd).st_size:
                os.ftruncate(fd, self.size)
            os.fsync(fd)
            self.last_used = time.monotonic()
            return self.size

    def account_disk_usage(self) -> None:
        """Make the reservation cover the file as it is on the disk (a restart found it; the
        released prefix is a hole)."""
        with self._lock:
            stat = os.fstat(self._fd_or_fail())
            self.size = stat.st_size
            used = min(stat.st_size, stat.st_blocks * 512)
            if used > self._reservation.nbytes:
                self._reservation.grow(used - self._reservation.nbytes)

    def release(self) -> None:
        """Close and delete the file and return its capacity (idempotent)."""
        with self._lock:
            if self.released:
                return
            self.released = True
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None
            self._reservation.release()
            self.path.unlink(missing_ok=True)

    def __repr__(self) -> str:
        return f"StagedFile({self.id}, {self.namespace}/{self.key}, size={self.size})"
