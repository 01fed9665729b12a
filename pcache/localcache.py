"""Reading the local worker's cache disks directly, from a client process on the same node.

A local cache hit through the worker costs a request (and, for shared memory, a copy); a client
on the worker's own node can instead look the block up in the worker's LMDB index (opened
read-only: LMDB serves any number of reader processes beside its one writer) and read the block
file itself, verified exactly as the worker would (header, size, CRC32C of the whole block or of
the chunks a partial read covers). Only hits are served here; a miss, a block evicted meanwhile,
a damaged file or an unreadable index is simply "not here", and the caller asks the worker,
which also repairs what is damaged. Nothing here ever writes to the cache.

Block files never change in place (a block's identity includes the object version, and files are
renamed into place whole), so a file found is either the right block or fails verification.

The worker learns about these hits through :meth:`LocalCacheReader.take_hits`, which the client
reports in batches (``POST /v1/touch``): eviction must see hot blocks as hot.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping

import lmdb

from .blockfile import CorruptBlock, HeaderCache, read_block, read_range
from .blockindex import BlockId, IndexEntry
from .blockstore import block_file_name

log = logging.getLogger(__name__)

MAX_PENDING_HITS = 100_000


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
        self.stats = {"hits": 0, "misses": 0, "errors": 0}

    def close(self) -> None:
        self._env.close()

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
            found = self._locate(bid)
            if found is None:
                self._count("misses")
                return None
            path, key, entry = found
            if offset == 0 and len(out) >= entry.length:
                read_block(path, key, bid.index, entry.length, entry.crc, out)
                n = entry.length
            else:
                n = read_range(
                    path, key, bid.index, entry.length, entry.crc, offset, out, self._headers
                )
        except FileNotFoundError:  # evicted between the lookup and the read
            self._count("misses")
            return None
        except (CorruptBlock, OSError, lmdb.Error) as exc:
            log.info("local cache read of %s#%d failed (%s): asking the worker", bid.key,
                     bid.index, exc)  # fmt: skip
            self._count("errors")
            return None
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
