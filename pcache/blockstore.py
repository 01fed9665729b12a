"""The node cache's block store: fixed-size blocks of objects on the node's cache disks.

A block is one file, ``<dir>/blocks/<hh>/<sha1hex>.blk``, named by the SHA-1 of the block's index
key only (so no key, however hostile, reaches a path), holding a :data:`HEADER_SIZE` header
(magic, format, the block's identity, data length, CRC32C, a CRC of the header) and the data,
which therefore stays page aligned. Blocks are striped over the cache directories by weighted
rendezvous hashing (weight = capacity). An LMDB index (:mod:`pcache.blockindex`) maps each block
to its directory, length and CRC; eviction is S3-FIFO per directory (:mod:`pcache.eviction`).

Capacity is a hard cap per directory: ``used + reserved <= capacity`` at every instant, where used
is the on-disk size (header + data) of indexed blocks and reserved is space promised to
downloads and write-back staging files (:meth:`BlockStore.reserve`) before they write a byte.

Faults: a write failing with ENOSPC/EDQUOT lowers the directory's effective capacity to what it
already holds; any other write error (EIO, EROFS, ...) takes the directory out of service (its
blocks are ignored, the reason is recorded). The failing operation retries on another directory.
Reads verify everything (header identity, length, CRC32C of the data); a bad block is dropped
and counted, never served.

Crash semantics. Index commits are not fsynced (``sync=False``; :meth:`BlockStore.close` and
:meth:`BlockStore.sync` flush). A put renames the finished file into place, then commits its
index entry; a drop or eviction deletes the entry, then unlinks the file. Hence:

* a process crash loses nothing committed; half-written ``tmp/`` files are removed at open;
* after an OS crash an entry may lack its file, or point at a torn file (``durable=False``
  puts are not fsynced): reads detect it, drop the entry and return a miss;
* a file may lack its entry (an orphan): it is not counted against the capacity and is never
  served; it is overwritten if the block is cached again (the path is deterministic) and removed
  at open when ``scan_orphans=True`` (a directory walk, so off by default) or when the index had
  to be reset.

Each cache directory holds ``blocks/`` (256 fan-out subdirectories), ``tmp/`` (files being
written; emptied at open), ``staging/`` (created for write-back staging files, which the store
never touches: their owner reserves their space with :meth:`BlockStore.reserve`) and
``.pcache-dir-id``, the directory's identity in index entries: a disk replaced by an empty one
gets a new id, so stale entries can never point into it.

Opening reads the index in one cursor pass (no block file is touched) and puts every block in
the main queue. Entries whose directory is not configured, or is unhealthy, are ignored (kept in
the index, so they come back with their directory).

Thread-safety: every public method may be called from any thread. One lock guards the in-memory
state and the index writes; file reads, writes and CRCs run outside it.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import math
import os
import shutil
import threading
import uuid
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import cast

import lmdb

from objstore import checksum
from pcache.blockfile import (
    HEADER_SIZE,
    CorruptBlock,
    HeaderCache,
    chunk_crcs,
    chunk_size,
    footprint,
    fsync_dir,
    pack_header,
    read_block,
    read_range,
    unlink_quietly,
    write_block_file,
)
from pcache.blockindex import (
    BlockId,
    BlockIndex,
    IndexEntry,
    key_index_prefix,
    object_index_prefix,
)
from pcache.eviction import S3FIFO, GhostQueue, Node

__all__ = [
    "HEADER_SIZE",
    "AccountingError",
    "BlockId",
    "BlockStore",
    "CacheDir",
    "DiskStatus",
    "NoSpace",
    "Reservation",
    "footprint",
]

log = logging.getLogger(__name__)

_DIR_ID_FILE = ".pcache-dir-id"


@dataclass(frozen=True)
class CacheDir:
    """A cache directory (one per NVMe disk).

    Attributes:
        path: the directory; created if missing.
        capacity: bytes it may hold (block files including headers, plus reservations).
    """

    path: Path
    capacity: int


@dataclass(frozen=True)
class DiskStatus:
    """One directory's state, as :meth:`BlockStore.disks` reports it.

    ``effective_capacity`` is below ``capacity`` after the filesystem reported ENOSPC.
    ``dirty`` is the part of ``reserved`` held by pinned (write-back) reservations.
    """

    path: Path
    capacity: int
    effective_capacity: int
    used: int
    reserved: int
    dirty: int
    blocks: int
    healthy: bool
    reason: str | None


class NoSpace(OSError):
    """No healthy cache directory has (or can make by eviction) the room asked for."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.ENOSPC, message)


class AccountingError(AssertionError):
    """The store's byte accounting broke an invariant (only raised by checks meant for tests)."""


class _Entry(Node):
    __slots__ = ("crc", "dir", "length", "seq")

    def __init__(self, key: bytes, dir_idx: int, length: int, crc: int, seq: int) -> None:
        super().__init__(key, footprint(length))
        self.dir = dir_idx
        self.length = length
        self.crc = crc
        self.seq = seq


class _Dir:
    """The mutable state of one cache directory (guarded by the store lock)."""

    def __init__(self, idx: int, conf: CacheDir, ghost: GhostQueue) -> None:
        self.idx = idx
        self.conf = conf
        self.path = Path(conf.path)
        self.id = b""
        self.healthy = True
        self.reason: str | None = None
        self.eff_cap = conf.capacity
        self.used = 0
        self.reserved = 0
        self.dirty = 0
        self.pinned_used = 0
        self.blocks = 0
        self.policy = S3FIFO(conf.capacity, ghost)

    @property
    def free(self) -> int:
        return self.eff_cap - self.used - self.reserved

    def block_path(self, key: bytes) -> Path:
        return block_file(self.path, key)


def block_file(directory: Path, key: bytes) -> Path:
    """Where the block with index key ``key`` lives in the cache directory ``directory``."""
    return directory / block_file_name(key)


def block_file_name(key: bytes) -> str:
    """The block file's path relative to its cache directory."""
    name = hashlib.sha1(key).hexdigest()
    return f"blocks/{name[:2]}/{name}.blk"


class Reservation:
    """Space promised in one cache directory, counted against its capacity until released.

    Puts given a reservation take their block's footprint from it (growing it when short), so
    one reservation may back several blocks; :meth:`release` returns what is left. Usable as a
    context manager that releases on exit. Thread-safe.
    """

    def __init__(self, store: BlockStore, d: _Dir, nbytes: int, pinned: bool) -> None:
        self._store = store
        self._d = d
        self._nbytes = nbytes
        self.pinned = pinned
        self._released = False

    @property
    def dir(self) -> CacheDir:
        return self._d.conf

    @property
    def nbytes(self) -> int:
        """Bytes still reserved."""
        return self._nbytes

    @property
    def released(self) -> bool:
        return self._released

    def grow(self, nbytes: int) -> None:
        """Reserve ``nbytes`` more in the same directory, evicting as needed.

        Raises:
            NoSpace: the directory cannot make the room (or is out of service).
            ValueError: the reservation was released, or the store closed.
        """
        if nbytes < 0:
            raise ValueError(f"cannot grow by {nbytes} bytes")
        with self._store._lock:
            self._store._check_open_locked()
            if self._released:
                raise ValueError("reservation already released")
            d = self._d
            if not d.healthy or not self._store._make_room_locked(d, nbytes):
                raise NoSpace(f"{d.path}: cannot reserve {nbytes} more bytes")
            self._add_locked(nbytes)

    def shrink(self, nbytes: int) -> None:
        """Return ``nbytes`` of the reservation (a staging file got smaller)."""
        with self._store._lock:
            self._shrink_locked(nbytes)

    def release(self) -> None:
        """Return the remaining bytes; idempotent."""
        with self._store._lock:
            self._shrink_locked(self._nbytes)
            self._released = True

    def _add_locked(self, nbytes: int) -> None:
        self._nbytes += nbytes
        self._d.reserved += nbytes
        if self.pinned:
            self._d.dirty += nbytes
        self._store._check_dir_locked(self._d)

    def _shrink_locked(self, nbytes: int) -> None:
        nbytes = min(nbytes, self._nbytes)
        self._nbytes -= nbytes
        self._d.reserved -= nbytes
        if self.pinned:
            self._d.dirty -= nbytes

    def _consume_locked(self, nbytes: int) -> None:
        """Turn ``nbytes`` of the reservation into used space (a block was indexed)."""
        if nbytes > self._nbytes:
            raise AccountingError(f"consuming {nbytes} of a {self._nbytes}-byte reservation")
        self._shrink_locked(nbytes)
        self._d.used += nbytes

    def __enter__(self) -> Reservation:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"Reservation({self._d.path}, nbytes={self._nbytes}, pinned={self.pinned})"


class BlockStore:
    """Blocks of objects cached on local disks, with a persistent index and a hard capacity.

    Args:
        dirs: the cache directories, one per disk.
        index_dir: where the LMDB index lives (best on a disk of its own or the first cache disk).
        block_size: the largest block; a block's data may be shorter (an object's last block).
        index_map_size: initial LMDB map size (sparse; grows on demand).
        scan_orphans: at open, walk the block directories and remove files the index does not
            know (see the module docstring).
        check_invariants: verify the byte accounting after every change (for tests).

    All methods are synchronous and thread-safe.
    """

    def __init__(
        self,
        dirs: Sequence[CacheDir],
        index_dir: Path,
        *,
        block_size: int = 4 << 20,
        index_map_size: int = 1 << 30,
        scan_orphans: bool = False,
        check_invariants: bool = False,
    ) -> None:
        if not dirs:
            raise ValueError("a block store needs at least one cache directory")
        if block_size <= 0:
            raise ValueError(f"block_size must be positive, not {block_size}")
        resolved = [Path(d.path).resolve() for d in dirs]
        if len(set(resolved)) != len(resolved):
            raise ValueError(f"a cache directory is listed twice: {[str(p) for p in resolved]}")
        self.block_size = block_size
        self._lock = threading.Lock()
        self._checks = check_invariants
        self._closed = False
        self._entries: dict[bytes, _Entry] = {}
        self._pins: dict[bytes, int] = {}
        self._stats = dict.fromkeys(
            ("hits", "misses", "inserts", "evictions", "corrupt", "disk_errors", "disk_full"), 0
        )
        total = sum(max(0, d.capacity) for d in dirs)
        self._ghost = GhostQueue(max(1024, total // footprint(block_size)))
        self._dirs = [_Dir(i, conf, self._ghost) for i, conf in enumerate(dirs)]
        for d in self._dirs:
            self._open_dir(d)
        seen: dict[bytes, _Dir] = {}
        for d in self._dirs:
            if d.healthy and d.id in seen:
                self._set_unhealthy(d, f"same directory as {seen[d.id].path} (same id file)")
            seen.setdefault(d.id, d)

        self._index = BlockIndex(Path(index_dir), block_size=block_size, map_size=index_map_size)
        self._headers = HeaderCache()  # chunk tables of block files, for partial reads
        self._seq = 0
        try:
            ignored = self._load()
        except lmdb.Error as exc:
            self._reset_loaded()
            self._index.reset(f"index unreadable while loading ({type(exc).__name__}: {exc})")
            ignored = 0
        if self._index.reset_reason is not None:
            scan_orphans = True
        with self._lock:
            for d in self._dirs:
                if d.used > d.eff_cap:
                    # The capacity shrank since the last run: evict down to it now.
                    self._evict_locked(d, d.used - d.eff_cap)
                self._check_dir_locked(d)
        if scan_orphans:
            self._remove_orphans()
        for d in self._dirs:
            self._warn_if_overcommitted(d)
        log.info(
            "block store open: %d blocks, %d bytes in %d dirs (%d unhealthy), %d entries ignored",
            len(self._entries),
            sum(d.used for d in self._dirs),
            len(self._dirs),
            sum(not d.healthy for d in self._dirs),
            ignored,
        )

    # --- opening ------------------------------------------------------------------------

    def _open_dir(self, d: _Dir) -> None:
        try:
            blocks = d.path / "blocks"
            blocks.mkdir(parents=True, exist_ok=True)
            for i in range(256):
                (blocks / f"{i:02x}").mkdir(exist_ok=True)
            tmp = d.path / "tmp"
            tmp.mkdir(exist_ok=True)
            (d.path / "staging").mkdir(exist_ok=True)
            d.id = self._dir_id(d.path)
            removed = 0
            with os.scandir(tmp) as it:
                for entry in it:
                    if entry.is_dir(follow_symlinks=False):
                        shutil.rmtree(entry.path)
                    else:
                        os.unlink(entry.path)
                    removed += 1
            if removed:
                log.info("%s: removed %d temp files left by a crash", d.path, removed)
            # A probe write: a read-only or failing disk is out of service from the start.
            probe = tmp / f"probe-{uuid.uuid4().hex}"
            fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                os.write(fd, b"probe")
            finally:
                os.close(fd)
                os.unlink(probe)
        except OSError as exc:
            self._set_unhealthy(d, f"cannot open: {exc}")

    @staticmethod
    def _dir_id(path: Path) -> bytes:
        id_file = path / _DIR_ID_FILE
        try:
            text = id_file.read_text().strip()
            if len(text) == 32:
                return bytes.fromhex(text)
        except (FileNotFoundError, ValueError):
            pass
        new = uuid.uuid4().bytes
        tmp = path / "tmp" / f"{_DIR_ID_FILE}.{uuid.uuid4().hex}"
        tmp.write_text(new.hex() + "\n")
        os.replace(tmp, id_file)
        return new

    def _load(self) -> int:
        by_id = {d.id: d for d in self._dirs if d.healthy}
        loaded: list[_Entry] = []
        ignored = 0
        max_seq = 0
        for key, entry in self._index.entries():
            d = by_id.get(entry.dir_id) if entry is not None else None
            if entry is None or d is None:
                ignored += 1
                continue
            loaded.append(_Entry(key, d.idx, entry.length, entry.crc, entry.seq))
            max_seq = max(max_seq, entry.seq)
        loaded.sort(key=lambda e: e.seq)
        with self._lock:
            for e in loaded:
                d = self._dirs[e.dir]
                d.policy.insert(e, to_main=True)
                d.used += e.size
                d.blocks += 1
                self._entries[e.key] = e
            self._seq = max_seq + 1
        return ignored

    def _reset_loaded(self) -> None:
        with self._lock:
            self._entries.clear()
            for d in self._dirs:
                d.used = d.blocks = 0
                d.policy = S3FIFO(d.eff_cap, self._ghost)

    def _remove_orphans(self) -> None:
        for d in self._dirs:
            if not d.healthy:
                continue
            with self._lock:
                known = {d.block_path(e.key).name for e in d.policy}
            removed = 0
            try:
                for sub in os.scandir(d.path / "blocks"):
                    if not sub.is_dir(follow_symlinks=False):
                        continue
                    for f in os.scandir(sub.path):
                        if f.name not in known:
                            os.unlink(f.path)
                            removed += 1
            except OSError as exc:
                log.warning("%s: orphan scan failed: %s", d.path, exc)
            if removed:
                log.info("%s: removed %d block files the index does not know", d.path, removed)

    def _warn_if_overcommitted(self, d: _Dir) -> None:
        if not d.healthy:
            return
        try:
            st = os.statvfs(d.path)
        except OSError:
            return
        real = d.used + st.f_bavail * st.f_frsize
        if real < d.eff_cap:
            log.warning(
                "%s: configured capacity %d exceeds what the filesystem can hold (~%d); "
                "writes will hit ENOSPC and lower it",
                d.path,
                d.eff_cap,
                real,
            )

    # --- reading ------------------------------------------------------------------------

    def contains(self, bid: BlockId) -> bool:
        """Whether the block is indexed on a healthy directory (no I/O, no verification)."""
        key = bid.index_key()
        with self._lock:
            self._check_open_locked()
            return key in self._entries

    def touch(self, bid: BlockId) -> bool:
        """Count a hit another process served from this store's files (see
        :mod:`pcache.localcache`), so eviction sees the block as used; False when not cached."""
        key = bid.index_key()
        with self._lock:
            self._check_open_locked()
            e = self._entries.get(key)
            if e is None:
                return False
            self._stats["hits"] += 1
            self._dirs[e.dir].policy.hit(e)
            return True

    def layout(self) -> dict[str, object]:
        """What a reader on this node needs to read the cache files itself: the index's path
        and each healthy directory's path by its id (hex)."""
        with self._lock:
            return {
                "index": str(self._index.path),
                "dirs": {d.id.hex(): str(d.path) for d in self._dirs if d.healthy and d.id},
            }

    def get(self, bid: BlockId) -> bytes | None:
        """The block's data, verified, or None on a miss (or a block found corrupt and dropped)."""
        result = self._read(bid, None, 0)
        assert result is None or isinstance(result, bytes)
        return result

    def read_into(
        self, bid: BlockId, buf: memoryview | bytearray, offset_in_block: int = 0
    ) -> int | None:
        """Copy ``data[offset_in_block:offset_in_block + len(buf)]`` of the block into ``buf``.

        When ``offset_in_block == 0`` and ``buf`` holds the whole block it is read straight into
        ``buf`` and verified whole; otherwise only the CRC chunks the range covers are. On None
        ``buf`` may hold partial or bad bytes and must not be used.

        Returns:
            The bytes copied (0 when the offset is at or past the block's end), or None on a miss
            or a corrupt block.
        """
        if offset_in_block < 0:
            raise ValueError(f"negative offset {offset_in_block}")
        view = memoryview(buf)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        if view.readonly:
            raise ValueError("read_into needs a writable buffer")
        result = self._read(bid, view, offset_in_block)
        assert result is None or isinstance(result, int)
        return result

    def _read(self, bid: BlockId, out: memoryview | None, offset: int) -> bytes | int | None:
        key = bid.index_key()
        with self._lock:
            self._check_open_locked()
            e = self._entries.get(key)
            if e is None:
                self._stats["misses"] += 1
                return None
            self._pin_locked(key)
            path = self._dirs[e.dir].block_path(key)
        error: str | None = None
        io_error = False
        result: bytes | int | None = None
        try:
            if out is not None and offset == 0 and len(out) >= e.length:
                read_block(path, key, bid.index, e.length, e.crc, out)
                result = e.length
            elif out is None:
                result = read_block(path, key, bid.index, e.length, e.crc, None)
            else:  # part of the block: only the chunks it covers are read and checked
                result = read_range(
                    path, key, bid.index, e.length, e.crc, offset, out, self._headers
                )
        except CorruptBlock as exc:
            error = str(exc)
        except FileNotFoundError:
            error = "file missing"
        except OSError as exc:
            error, io_error = f"read error: {exc}", True
        with self._lock:
            self._unpin_locked(key)
            current = self._entries.get(key) is e
            if error is None:
                self._stats["hits"] += 1
                if current:
                    self._dirs[e.dir].policy.hit(e)
                return result
            self._stats["misses"] += 1
            if not current or self._closed:
                # Dropped or evicted while we read: an ordinary miss, not corruption.
                return None
            self._stats["corrupt"] += 1
            if io_error:
                self._stats["disk_errors"] += 1
            log.warning("%s: dropping block %r: %s", path, bid, error)
            self._remove_locked([e], unlink=True)
            return None

    # --- writing ------------------------------------------------------------------------

    def put(
        self,
        bid: BlockId,
        data: bytes | bytearray | memoryview,
        *,
        reservation: Reservation | None = None,
        durable: bool = False,
    ) -> None:
        """Store a block; a no-op if it is already cached.

        Space comes from ``reservation`` when given (its directory is used; it grows if short,
        and what the block uses is taken out of it), else it is reserved here, evicting as
        needed. A write error on a directory marks it (full or unhealthy) and the put retries on
        another one.

        Args:
            bid: the block.
            data: its bytes, at most ``block_size``.
            reservation: space reserved beforehand (:meth:`reserve`); stays open for the rest.
            durable: fsync the file and its directory before indexing.

        Raises:
            NoSpace: no healthy directory can hold the block.
            ValueError: the data is larger than ``block_size``.
        """
        key = bid.index_key()
        view = memoryview(data)
        if view.format != "B" or view.ndim != 1:
            view = view.cast("B")
        length = len(view)
        if length > self.block_size:
            raise ValueError(f"block of {length} bytes exceeds block_size {self.block_size}")
        with self._lock:
            self._check_open_locked()
            if key in self._entries:
                return
        chunks = chunk_crcs(view)  # the whole block's CRC follows from its chunks'
        step = chunk_size(length)
        crc = checksum.combine_parts(
            "crc32c", [(c, min(step, length - i * step)) for i, c in enumerate(chunks)]
        )
        header = pack_header(key, bid.index, length, crc, chunks)
        size = footprint(length)
        tried: set[int] = set()
        while True:
            res = self._reservation_for_put(reservation, size, key, tried)
            d = res._d
            try:
                tmp = d.path / "tmp" / f"{uuid.uuid4().hex}.tmp"
                try:
                    write_block_file(tmp, header, view, durable)
                except OSError as exc:
                    with self._lock:
                        res._shrink_locked(size)
                        self._write_failed_locked(d, exc)
                    tried.add(d.idx)
                    continue
                if self._commit(d, res, key, length, crc, tmp, size):
                    if durable:
                        fsync_dir(d.block_path(key).parent)
                    return
                tried.add(d.idx)
            finally:
                res.release()

    def _reservation_for_put(
        self, given: Reservation | None, size: int, key: bytes, tried: set[int]
    ) -> Reservation:
        """A reservation of exactly ``size`` bytes for this put alone: carved out of ``given``
        (atomically, so one reservation may feed concurrent puts) or reserved afresh."""
        with self._lock:
            self._check_open_locked()
            if given is not None and not given._released and given._d.idx not in tried:
                d = given._d
                take = min(size, given._nbytes)
                if d.healthy and self._make_room_locked(d, size - take):
                    given._shrink_locked(take)
                    part = Reservation(self, d, 0, given.pinned)
                    part._add_locked(size)
                    return part
                tried.add(d.idx)
            return self._reserve_locked(size, key, tried, pinned=False)

    def _commit(
        self, d: _Dir, res: Reservation, key: bytes, length: int, crc: int, tmp: Path, size: int
    ) -> bool:
        """Rename the file into place and index it; False if the put must retry elsewhere."""
        final = d.block_path(key)
        with self._lock:
            if not d.healthy or self._closed or key in self._entries:
                res._shrink_locked(size)
                unlink_quietly(tmp)
                self._check_open_locked()
                return d.healthy
            try:
                os.rename(tmp, final)
            except OSError as exc:
                res._shrink_locked(size)
                unlink_quietly(tmp)
                self._write_failed_locked(d, exc)
                return False
            res._consume_locked(size)
            e = _Entry(key, d.idx, length, crc, self._seq)
            self._seq += 1
            d.policy.insert(e)
            d.blocks += 1
            self._entries[key] = e
            if key in self._pins:
                d.pinned_used += e.size
            try:
                self._index.put(key, IndexEntry(d.id, e.seq, length, crc))
            except lmdb.Error:
                self._remove_locked([e], unlink=True, index=False)
                raise
            self._stats["inserts"] += 1
            self._check_dir_locked(d)
            return True

    def _write_failed_locked(self, d: _Dir, exc: OSError) -> None:
        if not d.healthy:
            return
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            self._stats["disk_full"] += 1
            new_cap = min(d.eff_cap, d.used + d.reserved)
            log.warning(
                "%s: filesystem full (%s) at %d bytes used; effective capacity %d -> %d",
                d.path,
                exc,
                d.used,
                d.eff_cap,
                new_cap,
            )
            d.eff_cap = new_cap
            d.policy.capacity = new_cap
        else:
            self._stats["disk_errors"] += 1
            self._set_unhealthy(d, f"write failed: {exc}")

    def reserve(
        self,
        nbytes: int,
        *,
        pinned: bool = False,
        bid: BlockId | None = None,
        directory: Path | None = None,
    ) -> Reservation:
        """Reserve ``nbytes`` in one healthy directory before writing them (a download, a
        write-back staging file), evicting clean unpinned blocks if needed.

        Args:
            nbytes: bytes to reserve (use :func:`footprint` for a block).
            pinned: the bytes are dirty data (write-back); counted as such in the stats.
            bid: the block the space is for: the directory is then chosen as for a put of it.
            directory: reserve in this cache directory only (to account for a file already
                there, such as a staging file found at restart).

        Raises:
            NoSpace: no healthy directory (or ``directory`` is unhealthy) can make the room.
            FileNotFoundError: ``directory`` is not one of the store's cache directories.
        """
        if nbytes < 0:
            raise ValueError(f"cannot reserve {nbytes} bytes")
        key = bid.index_key() if bid is not None else None
        exclude: set[int] = set()
        if directory is not None:
            wanted = Path(directory).resolve()
            matches = [d.idx for d in self._dirs if d.path.resolve() == wanted]
            if not matches:
                raise FileNotFoundError(
                    errno.ENOENT, "not a cache directory of this store", str(directory)
                )
            exclude = {d.idx for d in self._dirs} - set(matches)
        with self._lock:
            self._check_open_locked()
            return self._reserve_locked(nbytes, key, exclude, pinned=pinned)

    def _reserve_locked(
        self, nbytes: int, key: bytes | None, exclude: set[int], *, pinned: bool
    ) -> Reservation:
        candidates = [d for d in self._dirs if d.healthy and d.idx not in exclude]
        if key is not None:
            candidates.sort(key=lambda d: _rendezvous_score(d, key), reverse=True)
        else:
            candidates.sort(key=lambda d: d.free, reverse=True)
        # Fill free space first (in hash order), evict only when every directory is full.
        chosen = next((d for d in candidates if d.free >= nbytes), None)
        if chosen is None:
            chosen = next((d for d in candidates if self._make_room_locked(d, nbytes)), None)
        if chosen is None:
            raise NoSpace(
                f"no healthy cache directory can hold {nbytes} bytes "
                f"({sum(d.healthy for d in self._dirs)}/{len(self._dirs)} healthy)"
            )
        res = Reservation(self, chosen, 0, pinned)
        res._add_locked(nbytes)
        return res

    def _make_room_locked(self, d: _Dir, nbytes: int) -> bool:
        need = nbytes - d.free
        if need <= 0:
            return True
        # Only unpinned blocks can go; reservations never do.
        if d.eff_cap - d.reserved - d.pinned_used < nbytes:
            return False
        self._evict_locked(d, need)
        return d.healthy and d.free >= nbytes

    def _evict_locked(self, d: _Dir, need: int) -> None:
        victims = cast(list[_Entry], d.policy.evict(need, self._pins.__contains__))
        if victims:
            self._stats["evictions"] += len(victims)
            self._remove_locked(victims, unlink=True, queued=False)

    def _remove_locked(
        self, entries: list[_Entry], *, unlink: bool, index: bool = True, queued: bool = True
    ) -> None:
        """Forget ``entries``: accounting, queues (unless the policy already dequeued them),
        index, files."""
        for e in entries:
            d = self._dirs[e.dir]
            del self._entries[e.key]
            if queued:
                d.policy.remove(e)
            d.used -= e.size
            d.blocks -= 1
            if e.key in self._pins:
                d.pinned_used -= e.size
        if index:
            self._index.delete(e.key for e in entries)
        if unlink:
            for e in entries:
                d = self._dirs[e.dir]
                try:
                    os.unlink(d.block_path(e.key))
                except FileNotFoundError:
                    pass
                except OSError as exc:
                    # The file stays while the accounting says it left: the disk is not trustworthy.
                    self._stats["disk_errors"] += 1
                    self._set_unhealthy(d, f"unlink failed: {exc}")

    def _set_unhealthy(self, d: _Dir, reason: str) -> None:
        """Take ``d`` out of service (lock held or still opening); its blocks are ignored."""
        if not d.healthy:
            return
        log.error("%s: taken out of service: %s", d.path, reason)
        d.healthy = False
        d.reason = reason
        for e in list(d.policy):
            self._entries.pop(e.key, None)
        d.policy = S3FIFO(d.eff_cap, self._ghost)
        d.used = d.blocks = d.pinned_used = 0

    # --- pins and drops -----------------------------------------------------------------

    @contextmanager
    def pinned(self, bid: BlockId) -> Iterator[None]:
        """Keep the block from eviction while in the block (it may be put during it, too)."""
        key = bid.index_key()
        with self._lock:
            self._check_open_locked()
            self._pin_locked(key)
        try:
            yield
        finally:
            with self._lock:
                self._unpin_locked(key)

    def _pin_locked(self, key: bytes) -> None:
        count = self._pins.get(key, 0)
        self._pins[key] = count + 1
        if count == 0 and (e := self._entries.get(key)) is not None:
            self._dirs[e.dir].pinned_used += e.size

    def _unpin_locked(self, key: bytes) -> None:
        count = self._pins[key] - 1
        if count:
            self._pins[key] = count
            return
        del self._pins[key]
        if (e := self._entries.get(key)) is not None:
            self._dirs[e.dir].pinned_used -= e.size

    def drop(self, bid: BlockId) -> bool:
        """Remove the block (pinned or not); return whether it was cached."""
        key = bid.index_key()
        with self._lock:
            self._check_open_locked()
            e = self._entries.get(key)
            if e is None:
                self._index.delete([key])  # an entry of an ignored directory, if any
                return False
            self._remove_locked([e], unlink=True)
            return True

    def drop_object(self, namespace: str, key: str, *, keep_version: str | None = None) -> int:
        """Remove every block of ``key`` (all versions, or all but ``keep_version``).

        Returns:
            The number of index entries removed (including those of ignored directories).
        """
        keep = None if keep_version is None else object_index_prefix(namespace, key, keep_version)
        return self._drop_prefix(object_index_prefix(namespace, key), keep)

    def drop_prefix(self, namespace: str, key_prefix: str) -> int:
        """Remove every block of every key of ``namespace`` starting with ``key_prefix``."""
        return self._drop_prefix(key_index_prefix(namespace, key_prefix), None)

    def _drop_prefix(self, prefix: bytes, keep: bytes | None) -> int:
        with self._lock:
            self._check_open_locked()
            keys = self._index.delete_prefix(prefix, keep_prefix=keep)
            found = [e for k in keys if (e := self._entries.get(k)) is not None]
            self._remove_locked(found, unlink=True, index=False)
            return len(keys)

    # --- status -------------------------------------------------------------------------

    def disks(self) -> list[DiskStatus]:
        with self._lock:
            return [
                DiskStatus(
                    path=d.path,
                    capacity=d.conf.capacity,
                    effective_capacity=d.eff_cap,
                    used=d.used,
                    reserved=d.reserved,
                    dirty=d.dirty,
                    blocks=d.blocks,
                    healthy=d.healthy,
                    reason=d.reason,
                )
                for d in self._dirs
            ]

    def stats(self) -> dict[str, int]:
        """Counters (hits, misses, inserts, evictions, corrupt, disk_errors, disk_full) and gauges
        (bytes_used, bytes_reserved, bytes_dirty, blocks, pinned, dirs_unhealthy)."""
        with self._lock:
            out = dict(self._stats)
            out["bytes_used"] = sum(d.used for d in self._dirs)
            out["bytes_reserved"] = sum(d.reserved for d in self._dirs)
            out["bytes_dirty"] = sum(d.dirty for d in self._dirs)
            out["blocks"] = len(self._entries)
            out["pinned"] = len(self._pins)
            out["dirs_unhealthy"] = sum(not d.healthy for d in self._dirs)
            return out

    def check_invariants(self) -> None:
        """Recount everything from the entries and compare with the running accounting.

        O(blocks); meant for tests. Raises:
            AccountingError: a mismatch.
        """
        with self._lock:
            total = 0
            for d in self._dirs:
                self._check_dir_locked(d, force=True)
                nodes = list(d.policy)
                if not d.healthy and nodes:
                    raise AccountingError(f"{d.path}: unhealthy but holds entries")
                used = sum(n.size for n in nodes)
                pinned = sum(n.size for n in nodes if n.key in self._pins)
                got = (d.used, d.blocks, d.pinned_used, d.policy.nbytes)
                want = (used, len(nodes), pinned, used)
                if got != want:
                    raise AccountingError(
                        f"{d.path}: (used, blocks, pinned, policy) {got} != {want}"
                    )
                for n in nodes:
                    if self._entries.get(n.key) is not n:
                        raise AccountingError(f"{d.path}: queue entry not in the entry map")
                total += len(nodes)
            if total != len(self._entries):
                raise AccountingError(f"{len(self._entries)} entries but {total} queued")

    def _check_dir_locked(self, d: _Dir, *, force: bool = False) -> None:
        if not (self._checks or force):
            return
        if d.used < 0 or d.reserved < 0 or d.dirty < 0 or d.dirty > d.reserved:
            raise AccountingError(f"{d.path}: negative or inconsistent counters {_describe(d)}")
        if d.healthy and d.used + d.reserved > d.eff_cap:
            raise AccountingError(f"{d.path}: used + reserved over capacity {_describe(d)}")
        if d.eff_cap > d.conf.capacity:
            raise AccountingError(f"{d.path}: effective capacity above configured {_describe(d)}")

    def _check_open_locked(self) -> None:
        if self._closed:
            raise ValueError("block store is closed")

    def sync(self) -> None:
        """Flush the index to disk (block files are flushed by ``durable`` puts only)."""
        with self._lock:
            self._check_open_locked()
            self._index.sync()

    def close(self) -> None:
        """Flush and close the index; idempotent. Outstanding reservations become no-ops."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            self._index.close()

    def __enter__(self) -> BlockStore:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


# --- helpers ------------------------------------------------------------------------------


def _describe(d: _Dir) -> str:
    return (
        f"(eff_cap={d.eff_cap}, used={d.used}, reserved={d.reserved}, dirty={d.dirty}, "
        f"pinned_used={d.pinned_used})"
    )


def _rendezvous_score(d: _Dir, key: bytes) -> float:
    # Weighted HRW (Schindelhauer/Resch "logarithmic method"): -w / ln(u), u uniform in (0, 1);
    # each directory wins a share of keys proportional to its weight.
    if d.conf.capacity <= 0:
        return 0.0
    h = int.from_bytes(hashlib.blake2b(key, digest_size=8, key=d.id).digest(), "big")
    u = (h + 0.5) / 2.0**64
    return -d.conf.capacity / math.log(u)
