"""File objects over the node cache: a seekable reader pinned to one version, a writer into a
write-back session. Both use only the public API of :class:`~pcache.client.PcacheClient`
(block reads, shared memory, the local worker's requests)."""

from __future__ import annotations

import io
import logging
from concurrent.futures import Future
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from objstore.base import ObjectInfo
from objstore.streams import SeekableReader
from objstore.url import check_key

from . import shm
from .protocol import info_from_json, is_pending, split_path
from .reads import release_segments

if TYPE_CHECKING:
    from .client import PcacheClient

log = logging.getLogger(__name__)


class PcacheReader(SeekableReader):
    """A seekable read-only file over one object, pinned to the version it opened.

    Sequential reads (each starting where the last one ended) hold the current block and fetch
    the following ones ahead, in parallel; a read elsewhere, when the local worker's cache is
    reachable (its files, or shared memory), moves only the bytes asked for: random access never
    pays for whole blocks.
    """

    def __init__(self, client: PcacheClient, path: str) -> None:
        info = client.stat(path)
        super().__init__(info.size)
        self._client = client
        self.path = path
        self.namespace, self.key = split_path(path)
        self.info = info
        self._bs = client.block_size
        self._ahead: dict[int, Future[bytes]] = {}
        self._last_index = -1  # a read of block 0 counts as sequential: start readahead at once
        self._current: tuple[int, bytes] | None = None  # the block sequential reads are in
        self._last_end = 0  # where the last read ended: a read starting there is sequential

    def readinto(self, buf: Any) -> int:
        return self.readinto_at(self._pos, buf)

    def read_at(self, offset: int, size: int) -> bytes:
        """``size`` bytes at ``offset`` (short at the end), whatever the position; the position
        ends after them. Callers serialise it with :meth:`read`, not with :meth:`read_cached`."""
        buf = bytearray(max(0, min(size, self.size - offset)))
        view, done = memoryview(buf), 0
        while done < len(buf):
            n = self.readinto_at(offset + done, view[done:])
            if n <= 0:
                break
            done += n
        return bytes(buf[:done])

    def readinto_at(self, pos: int, buf: Any) -> int:
        """Read into ``buf`` from ``pos``; the position ends after what was read. ``pos`` is
        a parameter, not read back from the position: read_cached (unlocked, other threads)
        moves that hint meanwhile."""
        view = memoryview(buf).cast("B")
        want = max(0, min(len(view), self.size - pos))
        if want == 0:
            return 0
        exact_ok = self._client.reads.shared_memory or self._client.reads.local_cache() is not None
        if want >= self._client.config.shm_threshold and exact_ok:
            n = self._client.readinto(self.path, pos, view[:want], self.info)
            self._pos = pos + n
            self._last_end = self._pos
            return n
        done = 0
        sequential = pos == self._last_end or not exact_ok
        while done < want:
            index = (pos + done) // self._bs
            if self._current is not None and self._current[0] == index:
                block = self._current[1]
            elif sequential:
                block = self._block(index)
                self._current = (index, block)
            else:  # a random read: only its bytes, and the next read decides again
                self._last_index = index
                n = self._client.readinto(
                    self.path, pos + done, view[done:want], self.info, exact=True
                )
                done += n
                break
            start = pos + done - index * self._bs
            n = min(want - done, len(block) - start)
            if n <= 0:
                break
            view[done : done + n] = block[start : start + n]
            done += n
        self._pos = pos + done
        self._last_end = self._pos
        return done

    def read_cached(self, offset: int, size: int) -> bytes | None:
        """The bytes at ``offset`` when this node has them without asking a worker (the block
        in hand, or the local cache files); None, with nothing read and the position unchanged,
        otherwise. Only local disk I/O: callers may run it where a network wait would hurt.
        Thread-safe: the position it moves is only the hint that tells sequential reads."""
        size = max(0, min(size, self.size - offset))
        if size == 0:
            return b""
        index, at = divmod(offset, self._bs)
        current = self._current
        if current is not None and current[0] == index and at + size <= len(current[1]):
            data = current[1][at : at + size]
        else:
            cache = self._client.reads.local_cache()
            if cache is None or is_pending(self.info.version):
                return None
            buf = bytearray(size)
            view = memoryview(buf)
            direct = self._client.reads.read_local(
                cache, self.namespace, self.info, offset, view, self._bs
            )
            if direct != size:
                return None
            data = bytes(buf)
        self._pos = offset + size
        self._last_end = self._pos
        return data

    def _block(self, index: int) -> bytes:
        future = self._ahead.pop(index, None)
        if future is None:
            future = self._client.pool.submit(
                self._client.reads.read_block, self.namespace, self.info, index
            )
        if index in (self._last_index, self._last_index + 1):  # sequential: keep blocks coming
            nblocks = -(-self.size // self._bs)
            for ahead in range(index + 1, min(nblocks, index + 1 + self._client.readahead)):
                if ahead not in self._ahead:
                    self._ahead[ahead] = self._client.pool.submit(
                        self._client.reads.read_block, self.namespace, self.info, ahead
                    )
        self._last_index = index
        for stale in [i for i in self._ahead if i < index]:
            self._ahead.pop(stale).cancel()
        return future.result()

    def close(self) -> None:
        for future in self._ahead.values():
            future.cancel()
        self._ahead.clear()
        self._current = None
        super().close()


class PcacheWriter(io.RawIOBase):
    """A write-only file: data goes to the local worker's staging file (write-back).

    ``close()`` commits: local-durable by default (``durable="remote"`` waits for the upload);
    :meth:`commit` with ``durable="remote"`` is what ``fsync`` means. An exception inside a
    ``with`` block aborts the write instead of committing a partial object.
    """

    def __init__(self, client: PcacheClient, path: str, *, durable: str = "local") -> None:
        super().__init__()
        self._client = client
        self.path = path
        self.namespace, self.key = split_path(path)
        check_key(self.key)
        self.durable = durable
        self._session = client.local_request(
            "POST", f"/v1/write/{quote(self.namespace)}/{quote(self.key)}"
        )["session"]
        self._sent = 0  # bytes handed to the worker (or in flight to it)
        self._shm = client.reads.shared_memory
        # shared memory: two segments of our own; one fills while the worker writes the other
        self._segs: list[shm.SharedBuffer] = []
        self._fill = 0
        self._inflight: list[Future[Any] | None] = [None, None]
        self._current = 0
        self._buffer = bytearray()  # HTTP mode
        self.result: ObjectInfo | None = None

    def writable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._sent + self._fill + len(self._buffer)

    def write(self, data: Any) -> int:
        if self.closed:
            raise ValueError("write to a closed file")
        view = memoryview(data).cast("B")
        if self._shm and not self._segs and len(view) >= self._client.config.shm_threshold:
            self._segs = [shm.SharedBuffer(shm.SHM_CHUNK), shm.SharedBuffer(shm.SHM_CHUNK)]
            if self._buffer:  # small writes so far: they go first, into the segment
                buffered, self._buffer = self._buffer, bytearray()
                self._fill_segments(memoryview(buffered))
        if not self._segs:
            self._buffer += view
            if len(self._buffer) >= shm.SHM_CHUNK:
                self._put_buffer()
            return len(view)
        self._fill_segments(view)
        return len(view)

    def _fill_segments(self, view: memoryview) -> None:
        done = 0
        while done < len(view):
            segment = self._segs[self._current]
            n = min(len(view) - done, segment.size - self._fill)
            segment.view[self._fill : self._fill + n] = view[done : done + n]
            self._fill += n
            done += n
            if self._fill == segment.size:
                self._ship()

    def _ship(self) -> None:
        """Hand the current segment to the worker in the background and switch segments."""
        if not self._fill:
            return
        index, length, offset = self._current, self._fill, self._sent
        segment = self._segs[index]
        self._inflight[index] = self._client.pool.submit(
            self._client.local_request,
            "POST",
            f"/v1/session/{self._session}/shm",
            payload={
                "offset": offset,
                "length": length,
                "segment": segment.name,
                "segment_offset": 0,
            },
        )
        self._sent += length
        self._fill = 0
        self._current = 1 - index
        self._wait(self._current)  # the segment we fill next must be free

    def _wait(self, index: int) -> None:
        future, self._inflight[index] = self._inflight[index], None
        if future is not None:
            future.result()

    def _put_buffer(self) -> None:
        if not self._buffer:
            return
        self._client.local_request(
            "PUT", f"/v1/session/{self._session}?offset={self._sent}", body=bytes(self._buffer)
        )
        self._sent += len(self._buffer)
        self._buffer = bytearray()

    def _send(self) -> None:
        if self._segs:
            self._ship()
            self._wait(0)
            self._wait(1)
        self._put_buffer()

    def _release_segments(self) -> None:
        for future in self._inflight:
            if future is not None:
                future.cancel()
        release_segments(self._client, self._segs)
        self._segs = []

    def flush(self) -> None:
        pass  # data reaches the worker in chunks and at commit; durability is commit()'s job

    def commit(self, durable: str | None = None) -> ObjectInfo:
        """Send what is buffered and make the object durable (``local`` or ``remote``)."""
        self._send()
        self.result = info_from_json(
            self._client.local_request(
                "POST",
                f"/v1/session/{self._session}/commit",
                payload={"durable": durable or self.durable},
                timeout=3600,
            )
        )
        return self.result

    def abort(self) -> None:
        try:
            for index in (0, 1):
                try:
                    self._wait(index)
                except Exception:  # aborting anyway
                    pass
            self._client.local_request("DELETE", f"/v1/session/{self._session}")
        finally:
            self._release_segments()
            super().close()

    def close(self) -> None:
        if self.closed:
            return
        try:
            self.commit()
        finally:
            self._release_segments()
            super().close()

    def __exit__(self, exc_type: Any, *rest: Any) -> None:
        if exc_type is not None and not self.closed:
            self.abort()
            return
        self.close()
