"""File-like adapters over a Store: a seekable reader built on ranged GETs.

The reader pins the object's ETag on open and sends it as ``if_match`` on every range, so a
concurrent overwrite surfaces as :class:`~objstore.errors.PreconditionFailed` instead of a file
stitched together from two versions.
"""

from __future__ import annotations

import io
import logging
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .base import Store

log = logging.getLogger(__name__)


class SeekableReader(io.RawIOBase):
    """Position bookkeeping of a read-only raw stream of ``size`` bytes; subclasses implement
    ``readinto`` from ``self._pos``."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError("negative seek position")
        self._pos = base + offset
        return self._pos


class RangeReader(SeekableReader):
    """Read-only, seekable raw stream over one object; wrap in ``io.BufferedReader`` as needed."""

    def __init__(self, store: Store, key: str, *, block_size: int = 8 * 1024 * 1024) -> None:
        info = store.stat(key)
        super().__init__(info.size)
        self._store = store
        self._key = key
        self._etag = info.etag or None
        self._block_size = block_size

    def readinto(self, buffer: memoryview | bytearray) -> int:  # type: ignore[override]
        want = min(len(buffer), self.size - self._pos, self._block_size)
        if want <= 0:
            return 0
        data = self._store.get_range(self._key, self._pos, want, if_match=self._etag)
        n = len(data)
        memoryview(buffer)[:n] = data
        self._pos += n
        return n

    def readall(self) -> bytes:
        chunks = []
        while chunk := self.read(self._block_size):
            chunks.append(chunk)
        return b"".join(chunks)
