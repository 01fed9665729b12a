"""The block store's persistent index: block ids, their keys, and the LMDB environment of entries.

:class:`BlockId` names a block; :meth:`BlockId.index_key` encodes it as
``namespace NUL key NUL version NUL %012d(index)``, each text field UTF-8 with NUL and 0x01
escaped (so the encoding is injective and has no NUL inside a field), object keys longer than 320
escaped bytes shortened to a prefix plus a digest (LMDB keys are at most 511 bytes).

Layout: a ``blocks`` database (index key -> packed :class:`IndexEntry`) and a ``meta`` database
(format version, block size). Keys are ``BlockId.index_key()`` bytes, which sort so that all the
blocks of one object, and all the objects under a key prefix, are contiguous: prefix deletes are
one cursor range.

Durability: the environment is opened with ``sync=False, metasync=False`` and without
``writemap``, so a commit is a write into the page cache. A process crash loses nothing; an OS
crash may lose the last commits but (on a filesystem that keeps write order) not the integrity of
the file. :meth:`BlockIndex.sync` flushes; ``close`` calls it. An environment that cannot be read
at all is discarded and recreated (:attr:`BlockIndex.reset_reason` says why): the cache then
starts empty, which is always safe.

Not thread-safe: the owner serializes every call (the block store holds its lock).
"""

from __future__ import annotations

import hashlib
import logging
import shutil
import struct
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import lmdb

log = logging.getLogger(__name__)

#: Bumped when the key or value layout changes; a mismatch clears the index.
INDEX_FORMAT = 1

_VALUE = struct.Struct("<B16sQQI")  # value version, dir id, seq, data length, crc32c
_VALUE_VERSION = 1
_T = TypeVar("_T")
_MAX_INDEX = 10**12
#: LMDB's key limit (MDB_MAXKEYSIZE of the default build).
MAX_INDEX_KEY = 511
# Escaped object keys longer than this are shortened to a prefix plus a digest (see _key_field),
# leaving the rest of MAX_INDEX_KEY for the namespace, the version and the block number.
_KEY_ROOM = 320
_KEY_CUT = _KEY_ROOM - 33


def _escape(text: str) -> bytes:
    # A prefix code without NUL, so NUL can separate the fields and "a" + NUL + "b\x00c" can never
    # equal "a\x00b" + NUL + "c"; prefix scans still work because escaping is per byte.
    raw = text.encode("utf-8", "surrogatepass")
    if b"\x00" in raw or b"\x01" in raw:
        raw = raw.replace(b"\x01", b"\x01\x02").replace(b"\x00", b"\x01\x01")
    return raw


def _key_field(key: str) -> bytes:
    raw = _escape(key)
    if len(raw) <= _KEY_ROOM:
        return raw
    # Longer than any unshortened field, so never equal to one; "\x01\x03" is no escape pair.
    return raw[:_KEY_CUT] + b"\x01\x03" + hashlib.sha256(raw).hexdigest()[:32].encode()


@dataclass(frozen=True)
class BlockId:
    """One block of one version of one object.

    Attributes:
        namespace: the backend name (bucket alias).
        key: the object key.
        version: the ETag, or ``"mtime:size"`` where there is none.
        index: the block number (its offset is ``index * block_size``).
    """

    namespace: str
    key: str
    version: str
    index: int

    def __post_init__(self) -> None:
        if not isinstance(self.index, int) or not 0 <= self.index < _MAX_INDEX:
            raise ValueError(f"block index must be an int in [0, {_MAX_INDEX}), not {self.index!r}")

    def index_key(self) -> bytes:
        """The LMDB key: namespace, key, version and index, each NUL-terminated and escaped.

        All blocks of (namespace, key) share the prefix :func:`object_index_prefix`, all objects
        under a key prefix share :func:`key_index_prefix`, and blocks of a version sort by index.
        Escaping keeps distinct ids distinct even when fields contain NUL; object keys escaping to
        more than 320 bytes are shortened to a prefix and a SHA-256 digest (LMDB keys are at
        most 511 bytes).

        Raises:
            ValueError: the namespace and version are too long to fit.
        """
        out = b"\x00".join(
            (
                _escape(self.namespace),
                _key_field(self.key),
                _escape(self.version),
                b"%012d" % self.index,
            )
        )
        if len(out) > MAX_INDEX_KEY:
            raise ValueError(f"namespace and version of {self!r} are too long for the index")
        return out


def object_index_prefix(namespace: str, key: str, version: str | None = None) -> bytes:
    """Index-key prefix of every block of ``key`` (of one ``version`` when given)."""
    prefix = _escape(namespace) + b"\x00" + _key_field(key) + b"\x00"
    return prefix if version is None else prefix + _escape(version) + b"\x00"


def key_index_prefix(namespace: str, prefix: str) -> bytes:
    """Index-key prefix of every block of every key starting with ``prefix``.

    A ``prefix`` escaping to more than 287 bytes is cut to that length (shortened keys keep only
    so much of the key), so it also matches keys that differ after that: a superset, harmless for
    invalidating a cache.
    """
    return _escape(namespace) + b"\x00" + _escape(prefix)[:_KEY_CUT]


@dataclass(frozen=True, slots=True)
class IndexEntry:
    """Where a block lives and how to check it.

    Attributes:
        dir_id: the 16-byte id of the cache directory holding the file (stable across config
            reorderings; a directory recreated empty gets a new id, orphaning its old entries).
        seq: insertion sequence number (restores the FIFO order after a restart).
        length: data bytes (without the file header).
        crc: CRC32C of the data.
    """

    dir_id: bytes
    seq: int
    length: int
    crc: int

    def pack(self) -> bytes:
        return _VALUE.pack(_VALUE_VERSION, self.dir_id, self.seq, self.length, self.crc)

    @classmethod
    def unpack(cls, raw: bytes) -> IndexEntry | None:
        """The entry, or None for a value this version cannot read."""
        if len(raw) != _VALUE.size or raw[0] != _VALUE_VERSION:
            return None
        _, dir_id, seq, length, crc = _VALUE.unpack(raw)
        return cls(dir_id, seq, length, crc)


class BlockIndex:
    """The LMDB index of one block store.

    Args:
        path: directory of the LMDB environment (created if missing).
        block_size: the store's block size; an index written with another size is cleared,
            because block numbers would map to other offsets.
        map_size: initial map size (a sparse file; doubled on demand when full).
    """

    def __init__(self, path: Path, *, block_size: int, map_size: int = 1 << 30) -> None:
        self.path = path
        self.block_size = block_size
        self.reset_reason: str | None = None
        self._map_size = map_size
        path.mkdir(parents=True, exist_ok=True)
        try:
            self._open()
            self._check_meta()
        except lmdb.Error as exc:
            self.reset(f"index unreadable ({type(exc).__name__}: {exc})")

    def _open(self) -> None:
        self._env = lmdb.open(
            str(self.path),
            map_size=self._map_size,
            subdir=True,
            max_dbs=2,
            sync=False,
            metasync=False,
            writemap=False,
            readahead=False,
            lock=True,
        )
        if self._env.max_key_size() < 511:
            raise RuntimeError(
                f"this LMDB build allows keys of {self._env.max_key_size()} bytes, not 511"
            )
        self._blocks = self._env.open_db(b"blocks")
        self._meta = self._env.open_db(b"meta")

    def _check_meta(self) -> None:
        want = {
            b"format": str(INDEX_FORMAT).encode(),
            b"block_size": str(self.block_size).encode(),
        }
        with self._env.begin(write=True) as txn:
            have = {k: txn.get(k, db=self._meta) for k in want}
            if have == want:
                return
            if any(v is not None for v in have.values()):
                self.reset_reason = (
                    f"index format/block size changed ({_show(have)} -> {_show(want)})"
                )
                log.warning("block index %s: %s; clearing it", self.path, self.reset_reason)
                txn.drop(self._blocks, delete=False)
            for k, v in want.items():
                txn.put(k, v, db=self._meta)

    def reset(self, reason: str) -> None:
        """Discard the whole environment and start an empty one (the index cannot be trusted)."""
        log.warning("block index %s: %s; starting with an empty index", self.path, reason)
        self.reset_reason = reason
        env = getattr(self, "_env", None)
        if env is not None:
            try:
                env.close()
            except lmdb.Error:
                pass
        shutil.rmtree(self.path, ignore_errors=True)
        self.path.mkdir(parents=True, exist_ok=True)
        self._open()
        self._check_meta()

    def entries(self) -> Iterator[tuple[bytes, IndexEntry | None]]:
        """Every (key, entry) in key order, in one read transaction; None for unreadable values.

        Raises:
            lmdb.Error: the file is corrupt (the caller then calls :meth:`reset`).
        """
        with self._env.begin(db=self._blocks, buffers=False) as txn:
            for key, raw in txn.cursor():
                yield bytes(key), IndexEntry.unpack(bytes(raw))

    def put(self, key: bytes, entry: IndexEntry) -> None:
        self._write(lambda txn: txn.put(key, entry.pack(), db=self._blocks))

    def delete(self, keys: Iterable[bytes]) -> None:
        """Delete ``keys`` (absent ones are ignored) in one transaction."""
        keys = list(keys)
        if keys:
            self._write(lambda txn: [txn.delete(k, db=self._blocks) for k in keys])

    def delete_prefix(self, prefix: bytes, *, keep_prefix: bytes | None = None) -> list[bytes]:
        """Delete every key starting with ``prefix`` except those starting with ``keep_prefix``.

        Returns:
            The deleted keys.
        """

        def run(txn: lmdb.Transaction) -> list[bytes]:
            deleted: list[bytes] = []
            cursor = txn.cursor(db=self._blocks)
            if not cursor.set_range(prefix):
                return deleted
            while True:
                key = bytes(cursor.key())
                if not key.startswith(prefix):
                    break
                if keep_prefix is not None and key.startswith(keep_prefix):
                    if not cursor.next():
                        break
                    continue
                deleted.append(key)
                # delete() moves the cursor to the next item; False means it was the last one.
                if not cursor.delete() or not cursor.key():
                    break
            return deleted

        return self._write(run)

    def _write(self, fn: Callable[[lmdb.Transaction], _T]) -> _T:
        for attempt in range(8):
            try:
                with self._env.begin(write=True) as txn:
                    return fn(txn)
            except lmdb.MapFullError:
                if attempt == 7:
                    raise
                # Safe here: the owner serializes calls, so no transaction is open.
                self._map_size *= 2
                log.info("block index %s: growing the map to %d bytes", self.path, self._map_size)
                self._env.set_mapsize(self._map_size)
        raise AssertionError("unreachable")

    def sync(self) -> None:
        """Flush committed transactions to disk."""
        self._env.sync(True)

    def close(self) -> None:
        try:
            self._env.sync(True)
        finally:
            self._env.close()


def _show(meta: Mapping[bytes, bytes | None]) -> str:
    return ", ".join(f"{k.decode()}={v.decode() if v else None}" for k, v in meta.items())
