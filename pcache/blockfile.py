"""The on-disk format of one cached block: a fixed header, then the data.

A block file is :data:`HEADER_SIZE` bytes of header (so the data stays page aligned) followed by
the data. The header holds a magic, the format version, flags (0), the block number, the data
length, the CRC32C of the data, the block's identity (its index key, at most 511 bytes), the
CRC32C of each chunk of the data (4 KiB chunks, or larger so that at most 768 fit: 8 KiB for
4 MiB blocks; the table starts at byte 1024) and a CRC32C of the header itself. :func:`read_block` checks all of it and the
data's CRC against what the index says, so a file that is short, long, torn, bit-flipped or
another block's never passes; :func:`read_range` reads and verifies only the chunks a partial
read covers (a random 4 KiB read costs one chunk, not the whole block). Files of an older format
fail the check: they are dropped and fetched again.

Files are written to a temp path (:func:`write_block_file`), then renamed into place by the
block store. Stateless and thread-safe.
"""

from __future__ import annotations

import logging
import os
import struct
import threading
from pathlib import Path

from objstore import checksum

log = logging.getLogger(__name__)

#: Bytes of the header before the data in every block file.
HEADER_SIZE = 4096
#: The largest identity (index key) a header holds.
MAX_IDENTITY = 511
_MAGIC = b"PCBLK\x00\r\n"
_FORMAT = 2
# magic, format, flags, index, length, crc, header crc, id len, chunk size, chunks
_HDR = struct.Struct("<8sHHQQIIHII")
_HCRC_OFFSET = 32
_TABLE_OFFSET = 1024
_MAX_CHUNKS = (HEADER_SIZE - _TABLE_OFFSET) // 4
_MIN_CHUNK = 4 * 1024
# the native CRC32C itself: a large read checks many chunks, and the registry lookup of
# checksum.compute would cost as much as hashing a chunk
_crc32c = checksum.get_algorithm("crc32c").native_calc


def chunk_size(length: int) -> int:
    """The CRC chunk of a block of ``length`` bytes: 64 KiB, or larger (4 KiB multiples) so that
    the table fits the header."""
    chunk = _MIN_CHUNK
    while -(-length // chunk) > _MAX_CHUNKS:
        chunk *= 2
    return chunk


def chunk_crcs(data: bytes | bytearray | memoryview) -> list[int]:
    view = memoryview(data).cast("B")
    chunk = chunk_size(len(view))
    return [checksum.compute("crc32c", view[at : at + chunk]) for at in range(0, len(view), chunk)]


class CorruptBlock(Exception):
    """A block file does not hold the block the index promises."""


def footprint(length: int) -> int:
    """Bytes a block of ``length`` data bytes occupies on disk (what puts reserve)."""
    return HEADER_SIZE + length


def read_block(
    path: str | os.PathLike[str],
    key: bytes,
    index: int,
    length: int,
    crc: int,
    out: memoryview | None,
) -> bytes:
    """Read and verify one block file; the data (or b"" when read into ``out``).

    ``out``, when given, receives the data in place (it must hold ``length`` bytes).

    Raises:
        CorruptBlock: the file is not exactly this block (size, header, CRC32C).
        OSError: the file cannot be opened or read (FileNotFoundError when it is gone).
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        if size != HEADER_SIZE + length:
            raise CorruptBlock(f"file is {size} bytes, expected {HEADER_SIZE + length}")
        header = os.pread(fd, HEADER_SIZE, 0)
        check_header(header, key, index, length, crc)
        if out is None:
            data = _pread_full(fd, length, HEADER_SIZE)
            got = checksum.compute("crc32c", data)
        else:
            target = out[:length]
            _preadv_full(fd, target, HEADER_SIZE)
            data = b""
            got = checksum.compute("crc32c", target)
        if got != crc:
            raise CorruptBlock(f"CRC32C {got:08x} != {crc:08x}")
        return data
    finally:
        os.close(fd)


def pack_header(
    key: bytes, index: int, length: int, crc: int, chunks: list[int] | None = None
) -> bytearray:
    """The header of a block (``key`` is its identity, at most :data:`MAX_IDENTITY` bytes;
    ``chunks`` the CRC32C of each :func:`chunk_size` piece of the data, see :func:`chunk_crcs`)."""
    if len(key) > MAX_IDENTITY:
        raise ValueError(f"block identity of {len(key)} bytes exceeds {MAX_IDENTITY}")
    chunk = chunk_size(length)
    chunks = chunks or []
    if len(chunks) != -(-length // chunk):
        raise ValueError(f"{len(chunks)} chunk CRCs for a block of {length} bytes")
    buf = bytearray(HEADER_SIZE)
    _HDR.pack_into(buf, 0, _MAGIC, _FORMAT, 0, index, length, crc, 0, len(key), chunk, len(chunks))
    buf[_HDR.size : _HDR.size + len(key)] = key
    end = _TABLE_OFFSET + 4 * len(chunks)
    struct.pack_into(f"<{len(chunks)}I", buf, _TABLE_OFFSET, *chunks)
    struct.pack_into("<I", buf, _HCRC_OFFSET, checksum.compute("crc32c", memoryview(buf)[:end]))
    return buf


def check_header(
    header: bytes, key: bytes, index: int, length: int, crc: int
) -> tuple[int, tuple[int, ...]]:
    """Verify a header against the index; returns the chunk size and the chunk CRCs."""
    if len(header) != HEADER_SIZE:
        raise CorruptBlock("short header")
    (magic, fmt, flags, h_index, h_length, h_crc, h_hcrc, id_len, chunk, nchunks) = (
        _HDR.unpack_from(header)
    )
    if magic != _MAGIC or fmt != _FORMAT or flags != 0 or id_len > MAX_IDENTITY:
        raise CorruptBlock("bad magic or format")
    if nchunks > _MAX_CHUNKS or chunk != chunk_size(h_length) or nchunks != -(-h_length // chunk):
        raise CorruptBlock("bad chunk table")
    end = _TABLE_OFFSET + 4 * nchunks
    raw = bytearray(header[:end])
    raw[_HCRC_OFFSET : _HCRC_OFFSET + 4] = b"\x00\x00\x00\x00"
    if checksum.compute("crc32c", raw) != h_hcrc:
        raise CorruptBlock("header CRC mismatch")
    if header[_HDR.size : _HDR.size + id_len] != key or h_index != index:
        raise CorruptBlock("header names another block")
    if h_length != length or h_crc != crc:
        raise CorruptBlock("header length/CRC differ from the index")
    return chunk, struct.unpack_from(f"<{nchunks}I", header, _TABLE_OFFSET)


class HeaderCache:
    """Chunk tables of recently read block files, so that random reads of a few KiB read the
    chunk, not the header as well. Entries are keyed by the file's identity (device, inode,
    size, ctime): a file replaced or rewritten is a new entry. Thread-safe."""

    def __init__(self, entries: int = 8192) -> None:
        self._entries = entries
        self._cache: dict[tuple[int, int, int, int], tuple[int, tuple[int, ...]]] = {}
        self._lock = threading.Lock()

    def get(self, ident: tuple[int, int, int, int]) -> tuple[int, tuple[int, ...]] | None:
        with self._lock:
            return self._cache.get(ident)

    def put(self, ident: tuple[int, int, int, int], table: tuple[int, tuple[int, ...]]) -> None:
        with self._lock:
            if len(self._cache) >= self._entries:
                self._cache.pop(next(iter(self._cache)))  # the oldest
            self._cache[ident] = table


def open_block(
    path: str | os.PathLike[str],
    key: bytes,
    index: int,
    length: int,
    crc: int,
    headers: HeaderCache | None = None,
) -> tuple[int, tuple[int, tuple[int, ...]]]:
    """Open one block file and check its size and header; returns the descriptor (the caller
    closes it) and the chunk table for :func:`read_chunks`. ``headers`` keeps verified chunk
    tables across calls.

    Raises:
        CorruptBlock: the size or the header is wrong.
        OSError: the file cannot be opened or read.
    """
    fd = os.open(path, os.O_RDONLY)
    try:
        st = os.fstat(fd)
        if st.st_size != HEADER_SIZE + length:
            raise CorruptBlock(f"file is {st.st_size} bytes, expected {HEADER_SIZE + length}")
        ident = (st.st_dev, st.st_ino, st.st_size, st.st_ctime_ns)
        table = headers.get(ident) if headers is not None else None
        if table is None:
            table = check_header(os.pread(fd, HEADER_SIZE, 0), key, index, length, crc)
            if headers is not None:
                headers.put(ident, table)
        return fd, table
    except BaseException:
        os.close(fd)
        raise


def read_chunks(
    fd: int,
    table: tuple[int, tuple[int, ...]],
    length: int,
    offset: int,
    out: memoryview,
    crc: int | None = None,
) -> int:
    """Copy ``data[offset:offset + len(out)]`` of an open block file into ``out``, reading and
    verifying only the chunks that range covers (the whole block, when read whole and ``crc``
    is given, by that one CRC); returns the bytes copied.

    Raises:
        CorruptBlock: a covered chunk's CRC32C is wrong, or the file is short.
        OSError: the file cannot be read.
    """
    chunk, crcs = table
    n = max(0, min(len(out), length - offset))
    if n == 0:
        return 0
    first, last = offset // chunk, (offset + n - 1) // chunk
    # whole chunks are read straight into ``out`` and verified there; others through a buffer
    in_place = offset % chunk == 0 and ((offset + n) % chunk == 0 or offset + n == length)
    start = first * chunk
    if in_place:
        view = out[:n]
        _preadv_full(fd, view, HEADER_SIZE + offset)
        if crc is not None and offset == 0 and n == length:
            if checksum.compute("crc32c", view) != crc:
                raise CorruptBlock("CRC32C of the block differs")
            return n
    else:
        data = _pread_full(fd, min(length, (last + 1) * chunk) - start, HEADER_SIZE + start)
        view = memoryview(data)
    for i in range(first, last + 1):
        if _crc32c(view[(i - first) * chunk : (i - first + 1) * chunk], 0) != crcs[i]:
            raise CorruptBlock(f"CRC32C of chunk {i} differs")
    if not in_place:
        out[:n] = view[offset - start : offset - start + n]
    return n


def read_range(
    path: str | os.PathLike[str],
    key: bytes,
    index: int,
    length: int,
    crc: int,
    offset: int,
    out: memoryview,
    headers: HeaderCache | None = None,
) -> int:
    """:func:`open_block` + :func:`read_chunks` + close: ``data[offset:offset + len(out)]`` of
    one block file into ``out``, verifying only the chunks that range covers."""
    fd, table = open_block(path, key, index, length, crc, headers)
    try:
        return read_chunks(fd, table, length, offset, out)
    finally:
        os.close(fd)


def write_block_file(path: Path, header: bytearray, data: memoryview, durable: bool) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    try:
        bufs = [memoryview(header), data]
        while bufs:
            n = os.writev(fd, bufs)
            while n and bufs:
                if n >= len(bufs[0]):
                    n -= len(bufs[0])
                    bufs.pop(0)
                else:
                    bufs[0] = bufs[0][n:]
                    n = 0
            bufs = [b for b in bufs if len(b)]
        if durable:
            os.fsync(fd)
    except BaseException:
        os.close(fd)
        unlink_quietly(path)
        raise
    os.close(fd)


def _pread_full(fd: int, length: int, offset: int) -> bytes:
    data = os.pread(fd, length, offset)
    if len(data) == length:
        return data
    parts = [data]
    got = len(data)
    while got < length:
        chunk = os.pread(fd, length - got, offset + got)
        if not chunk:
            raise CorruptBlock(f"short read: {got} of {length} bytes")
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _preadv_full(fd: int, target: memoryview, offset: int) -> None:
    got = 0
    while got < len(target):
        n = os.preadv(fd, [target[got:]], offset + got)
        if n <= 0:
            raise CorruptBlock(f"short read: {got} of {len(target)} bytes")
        got += n


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def unlink_quietly(path: Path) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass
