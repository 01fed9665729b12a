"""Shared-memory segments between a client and the worker on the same node.

Bulk data of large reads and writes does not travel through the HTTP socket: the client owns a
segment (a file in ``/dev/shm``, mapped into both processes), names it in a small control request,
and the worker reads cache blocks straight into it (or writes from it). One copy from the page
cache into shared memory replaces a copy into the worker, a socket send and a receive.

Client side: :class:`SharedBuffer` creates, maps and finally unlinks a segment. Worker side:
:class:`SegmentMap` opens segments by name (validated: a name can never point outside the shm
directory), keeps a bounded number mapped, and hands out bounds-checked views.
"""

from __future__ import annotations

import logging
import mmap
import os
import re
import secrets
import threading
from collections import OrderedDict
from pathlib import Path

log = logging.getLogger(__name__)

SHM_CHUNK = 32 << 20  # one segment of a reader or writer (two per thread: one fills, one drains)

SHM_DIR = Path(os.environ.get("PCACHE_SHM_DIR", "/dev/shm"))
_NAME_RE = re.compile(r"^pcache-[0-9A-Za-z_-]{1,80}$")


class SegmentError(ValueError):
    """A bad segment name, a segment that does not exist, or a range outside it."""


def available(directory: Path = SHM_DIR) -> bool:
    """Whether shared memory can be used here (the directory exists and is writable)."""
    return directory.is_dir() and os.access(directory, os.W_OK)


class SharedBuffer:
    """A client-owned shared-memory segment of ``size`` bytes.

    Not thread-safe: each thread of a client uses its own buffer.
    """

    def __init__(self, size: int, directory: Path = SHM_DIR) -> None:
        self.name = f"pcache-{os.getpid()}-{secrets.token_hex(8)}"
        self.size = size
        self._path = directory / self.name
        fd = os.open(self._path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.ftruncate(fd, size)
            self._mmap = mmap.mmap(fd, size)
        except BaseException:
            os.unlink(self._path)
            raise
        finally:
            os.close(fd)
        self.view = memoryview(self._mmap)

    def close(self) -> None:
        """Unmap and remove the segment."""
        if self._mmap.closed:
            return
        self.view.release()
        self._mmap.close()
        try:
            os.unlink(self._path)
        except FileNotFoundError:
            pass

    def __enter__(self) -> SharedBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown
            pass


class SegmentMap:
    """The worker's view of clients' segments: open by name, bounded LRU of mappings."""

    def __init__(self, directory: Path = SHM_DIR, max_open: int = 64) -> None:
        self._dir = directory
        self._max = max_open
        self._maps: OrderedDict[str, mmap.mmap] = OrderedDict()
        self._lock = threading.Lock()

    def view(self, name: str, offset: int, length: int) -> memoryview:
        """A writable view of ``length`` bytes at ``offset`` of segment ``name``.

        Raises:
            SegmentError: bad name, missing segment, or range outside it.
        """
        if not _NAME_RE.match(name):
            raise SegmentError(f"bad shared-memory segment name {name!r}")
        with self._lock:
            mapped = self._maps.get(name)
            if mapped is None:
                try:
                    fd = os.open(self._dir / name, os.O_RDWR | os.O_NOFOLLOW)
                except FileNotFoundError:
                    raise SegmentError(f"no shared-memory segment {name!r}") from None
                try:
                    size = os.fstat(fd).st_size
                    if size <= 0:
                        raise SegmentError(f"shared-memory segment {name!r} is empty")
                    mapped = mmap.mmap(fd, size)
                finally:
                    os.close(fd)
                self._maps[name] = mapped
                while len(self._maps) > self._max:
                    _, old = self._maps.popitem(last=False)
                    _close_quietly(old)
            self._maps.move_to_end(name)
        if offset < 0 or length < 0 or offset + length > len(mapped):
            raise SegmentError(
                f"range {offset}+{length} is outside segment {name!r} ({len(mapped)} bytes)"
            )
        return memoryview(mapped)[offset : offset + length]

    def forget(self, name: str) -> None:
        with self._lock:
            mapped = self._maps.pop(name, None)
        if mapped is not None:
            _close_quietly(mapped)

    def close(self) -> None:
        with self._lock:
            maps = list(self._maps.values())
            self._maps.clear()
        for mapped in maps:
            _close_quietly(mapped)


def _close_quietly(mapped: mmap.mmap) -> None:
    try:
        mapped.close()
    except BufferError:
        # a view is still exported (a request in flight); the mapping goes when it is released
        log.debug("segment still in use; unmapped when released")
