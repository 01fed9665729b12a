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
last OPEN_FILES block files stay open between reads (a random read then costs one ``pread``);
a file the worker evicts meanwhile still reads correctly, and its space is held only until it
leaves that small set.

The worker learns about these hits through :meth:`LocalCacheReader.take_hits`, which the client
reports in batches (``POST /v1/touch``): eviction must see hot blocks as hot.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping

import lmdb

from .blockfile import CorruptBlock, HeaderCache, open_block, read_chunks
from .blockindex import BlockId, IndexEntry
from .blockstore import block_file_name

log = logging.getLogger(__name__)

MAX_PENDING_HITS = 100_000
OPEN_FILES = 64


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

    def __init__(self, index: str | os.PathLike[str], dirs: Mapping[str, str]) -> None:
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
        self._hits: dict[tuple[str, str, str, int], int] = {}
        self._headers = HeaderCache()
        self._open: dict[bytes, _OpenBlock] = {}  # index key -> open file, oldest first
        self.stats = {"hits": 0, "misses": 0, "errors": 0}

    def close(self) -> None:
        with self._lock:
            files, self._open = list(self._open.values()), {}
        for f in files:
            self._retire(f)
        self._env.close()

    def _acquire(self, bid: BlockId) -> tuple[bytes, _OpenBlock] | None:
        key = bid.index_key()
        with self._lock:
            f = self._open.get(key)
            if f is not None:
                f.users += 1
                return key, f
        found = self._locate(bid)
        if found is None:
            return None
        path, key, entry = found
        fd, table = open_block(path, key, bid.index, entry.length, entry.crc, self._headers)
        f = _OpenBlock(fd, table, entry.length, entry.crc)
        f.users = 1
        with self._lock:
            old = self._open.pop(key, None)
            self._open[key] = f
            oldest = next(iter(self._open.values())) if len(self._open) > OPEN_FILES else None
            if oldest is not None:
                del self._open[next(iter(self._open))]
        for doomed in (old, oldest):
            if doomed is not None:
                self._retire(doomed)
        return key, f

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

    def _forget(self, key: bytes, f: _OpenBlock) -> None:
        """A file that failed a read: never used again (the worker repairs the block)."""
        with self._lock:
            if self._open.get(key) is f:
                del self._open[key]
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
        try:
            acquired = self._acquire(bid)
        except FileNotFoundError:  # evicted between the lookup and the open
            acquired = None
        except (CorruptBlock, OSError, lmdb.Error) as exc:
            log.info("local cache read of %s#%d failed (%s): asking the worker", bid.key,
                     bid.index, exc)  # fmt: skip
            self._count("errors")
            return None
        if acquired is None:
            self._count("misses")
            return None
        key, f = acquired
        try:
            n = read_chunks(f.fd, f.table, f.length, offset, out, f.crc)
        except (CorruptBlock, OSError) as exc:
            log.info("local cache read of %s#%d failed (%s): asking the worker", bid.key,
                     bid.index, exc)  # fmt: skip
            self._count("errors")
            self._release(f)
            self._forget(key, f)
            return None
        self._release(f)
        self._count("hits")
        with self._lock:
            if len(self._hits) < MAX_PENDING_HITS:
                ident = (bid.namespace, bid.key, bid.version, bid.index)
                self._hits[ident] = self._hits.get(ident, 0) + n
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
