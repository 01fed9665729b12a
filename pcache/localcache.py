"""Reading the local worker's cache disks directly, from a client process on the same node.

A local cache hit through the worker costs a request (and, for shared memory, a copy); a client
on the worker's own node can instead look the block up in the worker's LMDB index (opened
read-only: LMDB serves any number of reader processes beside its one writer) and read the block
file itself, verified exactly as the worker would (header, size, CRC32C of the whole block or of
the chunks a partial read covers). Only hits are served here; a miss, a block evicted meanwhile,
a damaged file or an unreadable index is simply "not here", and the caller asks the worker,
which also repairs what is damaged. Nothing here ever writes to the cache.

Block files never change in place (a block's identity includes the object version, and files are
renamed into place whole), so a file found is either the right block or fails verification. The
most recently used block files stay open between reads (a random read then costs one ``pread``,
not a lookup, an ``open`` and a ``close``): up to :func:`open_files_limit` of them, a quarter of
the process's descriptor limit (raised to its hard limit by :func:`raise_open_files_limit`). A
file the worker evicts meanwhile still reads correctly; :meth:`LocalCacheReader.close_unlinked`,
which the client calls every few seconds, closes such files so their space is freed.

The worker learns about these hits through :meth:`LocalCacheReader.take_hits`, which the client
reports in batches (``POST /v1/touch``): eviction must see hot blocks as hot.
"""

from __future__ import annotations

import logging
import os
import resource
import threading
from collections.abc import Mapping

import lmdb

from .blockfile import CorruptBlock, HeaderCache, open_block, read_chunks
from .blockindex import BlockId, IndexEntry
from .blockstore import block_file_name

log = logging.getLogger(__name__)

MAX_PENDING_HITS = 100_000
_Ident = tuple[str, str, str, int]  # a BlockId's fields: hashed and compared in C
MAX_OPEN_FILES = 4096  # 16 GiB of 4 MiB blocks: hot sets larger than that pay an open per read
WANTED_FD_LIMIT = 65536


def raise_open_files_limit(wanted: int = WANTED_FD_LIMIT) -> int:
    """Raise this process's soft descriptor limit towards ``wanted`` (never above the hard
    limit, never lowering it); returns the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError):
            pass
    return soft


def open_files_limit() -> int:
    """How many block files a reader keeps open: a quarter of the soft descriptor limit, at
    least 16, at most MAX_OPEN_FILES."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return MAX_OPEN_FILES
    return max(16, min(MAX_OPEN_FILES, soft // 4))


class _OpenBlock:
    __slots__ = ("crc", "fd", "length", "retired", "table", "users")

    def __init__(self, fd: int, table: tuple[int, tuple[int, ...]], length: int, crc: int) -> None:
        self.fd = fd
        self.table = table
        self.length = length
        self.crc = crc
        self.users = 0  # reads using fd right now; it is closed only when none is
        self.retired = False


class LocalCacheReader:
    """Read-only view of one worker's block store. Thread-safe.

    Args:
        index: the worker's index directory (``BlockStore.layout()["index"]``).
        dirs: cache directory path by directory id (hex), from the same layout.

    Raises:
        OSError / lmdb.Error: the index cannot be opened (not this node, no permission).
    """

    def __init__(
        self,
        index: str | os.PathLike[str],
        dirs: Mapping[str, str],
        open_files: int | None = None,
    ) -> None:
        self._env = lmdb.open(
            str(index), readonly=True, lock=True, subdir=True, max_dbs=2, max_readers=512
        )
        try:
            self._blocks = self._env.open_db(b"blocks", create=False)
        except BaseException:
            self._env.close()
            raise
        self._dirs = {bytes.fromhex(k): v.rstrip("/") + "/" for k, v in dirs.items()}
        self._lock = threading.Lock()
        self._hits: dict[_Ident, int] = {}  # bytes read per block since take_hits
        self._headers = HeaderCache()
        self._open: dict[_Ident, _OpenBlock] = {}  # least recently used first
        self.open_files = open_files if open_files is not None else open_files_limit()
        self.stats = {"hits": 0, "misses": 0, "errors": 0}

    def close(self) -> None:
        with self._lock:
            files, self._open = list(self._open.values()), {}
        for f in files:
            self._retire(f)
        self._env.close()

    def _acquire(self, bid: BlockId, ident: _Ident) -> _OpenBlock | None:
        with self._lock:
            f = self._open.pop(ident, None)
            if f is not None:
                self._open[ident] = f  # most recently used last
                f.users += 1
                return f
        found = self._locate(bid)
        if found is None:
            return None
        path, key, entry = found
        fd, table = open_block(path, key, bid.index, entry.length, entry.crc, self._headers)
        f = _OpenBlock(fd, table, entry.length, entry.crc)
        f.users = 1
        with self._lock:
            old = self._open.pop(ident, None)
            self._open[ident] = f
            oldest = None
            if len(self._open) > self.open_files:
                oldest = self._open.pop(next(iter(self._open)))
        for doomed in (old, oldest):
            if doomed is not None:
                self._retire(doomed)
        return f

    def close_unlinked(self) -> int:
        """Close the open block files the worker has deleted since (evicted or replaced), so
        the disk space they hold is freed; returns how many."""
        with self._lock:
            files = list(self._open.items())
            for _, f in files:
                f.users += 1  # held open while fstat looks at it
        doomed = []
        for ident, f in files:
            try:
                if os.fstat(f.fd).st_nlink == 0:
                    doomed.append((ident, f))
            except OSError:
                doomed.append((ident, f))
            finally:
                self._release(f)
        for ident, f in doomed:
            self._forget(ident, f)
        return len(doomed)

    def _release(self, f: _OpenBlock) -> None:
        with self._lock:
            f.users -= 1
            close = f.retired and f.users == 0
        if close:
            os.close(f.fd)

    def _retire(self, f: _OpenBlock) -> None:
        with self._lock:
            if f.retired:
                return
            f.retired = True
            close = f.users == 0
        if close:
            os.close(f.fd)

    def _forget(self, ident: _Ident, f: _OpenBlock) -> None:
        """A file that failed a read or was deleted: never used again."""
        with self._lock:
            if self._open.get(ident) is f:
                del self._open[ident]
        self._retire(f)

    def _locate(self, bid: BlockId) -> tuple[str, bytes, IndexEntry] | None:
        key = bid.index_key()
        with self._env.begin(db=self._blocks, buffers=False) as txn:
            raw = txn.get(key)
        entry = IndexEntry.unpack(raw) if raw is not None else None
        directory = self._dirs.get(entry.dir_id) if entry is not None else None
        if entry is None or directory is None:
            return None
        return directory + block_file_name(key), key, entry

    def read_into(self, bid: BlockId, out: memoryview, offset: int = 0) -> int | None:
        """Copy ``data[offset:offset + len(out)]`` of the block into ``out``; None when the
        block is not (or no longer, or not verifiably) in the cache."""
        ident = (bid.namespace, bid.key, bid.version, bid.index)
        try:
            f = self._acquire(bid, ident)
        except FileNotFoundError:  # evicted between the lookup and the open
            f = None
        except (CorruptBlock, OSError, lmdb.Error) as exc:
            log.info("local cache read of %s#%d failed (%s): asking the worker", bid.key,
                     bid.index, exc)  # fmt: skip
            self._count("errors")
            return None
        if f is None:
            self._count("misses")
            return None
        try:
            n = read_chunks(f.fd, f.table, f.length, offset, out, f.crc)
        except (CorruptBlock, OSError) as exc:
            log.info("local cache read of %s#%d failed (%s): asking the worker", bid.key,
                     bid.index, exc)  # fmt: skip
            self._count("errors")
            self._release(f)
            self._forget(ident, f)
            return None
        with self._lock:
            f.users -= 1
            close = f.retired and f.users == 0
            self.stats["hits"] += 1
            if ident in self._hits or len(self._hits) < MAX_PENDING_HITS:
                self._hits[ident] = self._hits.get(ident, 0) + n
        if close:
            os.close(f.fd)
        return n

    def get(self, bid: BlockId, length: int) -> bytes | None:
        """The whole block (``length`` bytes) or None."""
        buf = bytearray(length)
        n = self.read_into(bid, memoryview(buf))
        return bytes(buf) if n == length else None

    def take_hits(self) -> list[tuple[str, str, str, int, int]]:
        """The blocks read here since the last call: (namespace, key, version, index, bytes)."""
        with self._lock:
            hits, self._hits = self._hits, {}
        return [(*ident, nbytes) for ident, nbytes in hits.items()]

    def _count(self, what: str) -> None:
        with self._lock:
            self.stats[what] += 1
