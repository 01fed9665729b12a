"""The client's read path: blocks from the worker selection picks, this node's cache files,
shared memory with the local worker, and the backing store when no worker answers.

A block is read (:meth:`BlockReads.read_block`) from the local cache files when this process can
open them (:mod:`pcache.localcache`: no worker at all), else from the worker the selection
picks for it, then the other candidates, then any worker held dead (a restart), then the store
itself. Large reads with the local worker go through two shared-memory segments per thread
(:mod:`pcache.shm`): the worker fills one while the client copies the other out. A read whose
object changed under it (:class:`~pcache.protocol.StaleVersion`) looks the object up again,
once. Counts of where blocks came from are kept in :attr:`BlockReads.sources`.

Thread-safe: the client's threads share one reader (each thread has its own segments).
"""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

import lmdb

from objstore.base import ObjectInfo
from objstore.errors import ObjectNotFound, StorageError

from . import shm
from .blockindex import BlockId
from .localcache import LocalCacheReader
from .protocol import SOURCE_HEADER, StaleVersion, block_key, is_pending, split_path
from .transport import WorkerHTTP, WorkerUnavailable

if TYPE_CHECKING:
    from .client import PcacheClient

log = logging.getLogger(__name__)

HITS_REPORT_S = 2.0  # how often hits read straight from the cache files are reported


class BlockReads:
    """The read path of ``client`` (see the module docstring).

    Args:
        client: its cluster view, metadata and local worker.
        http: the client's connections to the workers.
        pool: the threads blocks are fetched on side by side.
        shared_memory: move large reads with the local worker through shared memory.
    """

    def __init__(
        self,
        client: PcacheClient,
        http: WorkerHTTP,
        pool: ThreadPoolExecutor,
        *,
        shared_memory: bool,
    ) -> None:
        self._client = client
        self._http = http
        self.pool = pool
        self.shared_memory = shared_memory
        self.sources: dict[str, int] = {}  # tier -> blocks read from it
        self._lock = threading.Lock()
        self._tls = threading.local()
        self._segments: list[shm.SharedBuffer] = []
        self._cache: LocalCacheReader | None = None
        self._cache_tried = False
        self._closed = threading.Event()

    def read_block(self, namespace: str, info: ObjectInfo, index: int) -> bytes:
        """One block, from the worker selection picks; other workers, then the store, on failure."""
        self._client.info()
        selector = self._client.selector_or_none()
        if selector is None:  # no worker ever answered: the config's backends
            return self._block_from_store(namespace, info, index)
        name = block_key(namespace, info.key, index)
        fields = {"version": info.version, "index": str(index), "size": str(info.size)}
        path = f"/v1/block/{quote(namespace)}/{quote(info.key)}"
        if is_pending(info.version):  # a pending write lives only on the local worker
            response = self._http.request("GET", self._client.config.worker, path, fields=fields)
            self._count(response.header(SOURCE_HEADER, "local"))
            return bytes(response.data)
        cache = self.local_cache()
        if cache is not None:  # a hit on this node's disks needs no worker at all
            bs = self._client.block_size
            length = min(bs, info.size - index * bs)
            data = cache.get(BlockId(namespace, info.key, info.version, index), length)
            if data is not None:
                self._count("local")
                return data
        tried: set[str] = set()
        while True:
            node = selector.choose(name)
            if node is None or node.node_id in tried:
                untried = selector.candidates(name, limit=len(tried) + 1)
                node = next((n for n in untried if n.node_id not in tried), None)
            if node is None:
                break
            tried.add(node.node_id)
            try:
                with selector.track(node, WorkerUnavailable):
                    response = self._http.request("GET", node.address, path, fields=fields)
            except WorkerUnavailable as exc:
                log.info("worker %s failed for %s#%d: %s", node.node_id, info.key, index, exc)
                continue
            self._count(response.header(SOURCE_HEADER, "?"))
            return bytes(response.data)
        for node in selector.last_resort(name):
            if node.node_id in tried:
                continue
            try:
                response = self._http.request("GET", node.address, path, fields=fields)
            except WorkerUnavailable:
                continue
            log.info("worker %s answers again", node.node_id)
            selector.revive(node.node_id)
            self._count(response.header(SOURCE_HEADER, "?"))
            return bytes(response.data)
        log.warning("no worker could serve %s#%d; reading the backing store", info.key, index)
        return self._block_from_store(namespace, info, index)

    def _block_from_store(self, namespace: str, info: ObjectInfo, index: int) -> bytes:
        bs = self._client.block_size
        data = self._client.backend(namespace).get_range(
            info.key, index * bs, min(bs, info.size - index * bs)
        )
        self._count("direct")
        return data

    def _count(self, source: str) -> None:
        with self._lock:
            self.sources[source] = self.sources.get(source, 0) + 1

    def readinto(
        self,
        path: str,
        offset: int,
        buf: memoryview | bytearray,
        info: ObjectInfo | None = None,
        *,
        exact: bool = False,
    ) -> int:
        """Read up to ``len(buf)`` bytes at ``offset`` into ``buf``; returns bytes read.

        Large reads from the local worker go through shared memory; ``exact`` sends small ones
        that way too (a random read of a few KiB then moves those bytes, not whole blocks).
        """
        namespace, _ = split_path(path)
        info = info or self._client.stat(path)
        view = memoryview(buf).cast("B")
        length = max(0, min(len(view), info.size - offset))
        if length == 0:
            return 0
        cache = self.local_cache()
        if cache is not None and not is_pending(info.version):
            done = self.read_local(cache, namespace, info, offset, view[:length])
            if done == length:
                return done
            if done:
                return done + self.readinto(path, offset + done, view[done:length], info)
        threshold = 1 if exact else self._client.config.shm_threshold
        for attempt in (1, 2):
            try:
                if self.shared_memory and length >= threshold and not self._client.local_dead():
                    try:
                        return self._read_shm(namespace, info, offset, view[:length])
                    except (WorkerUnavailable, shm.SegmentError, StorageError) as exc:
                        if isinstance(exc, StaleVersion | ObjectNotFound):
                            raise
                        log.info("shared-memory read failed (%s); using HTTP", exc)
                        if "segment" in str(exc):
                            self.shared_memory = False
                return self._read_blocks(namespace, info, offset, view[:length])
            except (StaleVersion, ObjectNotFound):
                # the object changed (or a write we saw pending was replaced) under the read:
                # look it up again once; a real "gone" shows up as the stat's own error
                if attempt == 2:
                    raise
                self._client.invalidate(path, cluster=False, blocks=False)
                info = self._client.stat(path)
                length = max(0, min(len(view), info.size - offset))
        raise AssertionError("unreachable")

    # -- the local cache disks (pcache.localcache) ----------------------------------------------

    def local_cache(self) -> LocalCacheReader | None:
        """The reader of the local worker's cache files, when this process can open them."""
        if self._cache_tried:
            return self._cache
        view = self._client.info()
        if view.get("offline"):
            return None  # tried again once a worker answers
        layout = view.get("local_cache")
        with self._lock:
            if self._cache_tried:
                return self._cache
            self._cache_tried = True
            if (
                not self._client.config.direct_reads
                or not layout
                or not os.path.isdir(layout["index"])
            ):
                return None
            try:
                self._cache = LocalCacheReader(layout["index"], layout["dirs"])
            except (OSError, lmdb.Error) as exc:
                log.info("cannot read the local cache files (%s): reading through the worker", exc)
                return None
        threading.Thread(target=self._report_hits, name="pcache-hits", daemon=True).start()
        return self._cache

    def read_local(
        self,
        cache: LocalCacheReader,
        namespace: str,
        info: ObjectInfo,
        offset: int,
        view: memoryview,
        block_size: int | None = None,
    ) -> int:
        """Copy what the local cache files hold, from ``offset`` on, until the first miss."""
        bs = block_size or self._client.block_size
        done = 0
        while done < len(view):
            index, at = divmod(offset + done, bs)
            want = min(len(view) - done, bs - at, info.size - (offset + done))
            n = cache.read_into(
                BlockId(namespace, info.key, info.version, index), view[done : done + want], at
            )
            if n is None or n <= 0:
                break
            self._count("local")
            done += n
        return done

    def _report_hits(self) -> None:
        """Tell the worker, every HITS_REPORT_S, which blocks were read from its files; close
        the files it has evicted meanwhile."""
        while not self._closed.wait(HITS_REPORT_S):
            self.report_hits()
            cache = self._cache
            if cache is not None:
                cache.close_unlinked()

    def report_hits(self) -> None:
        """Tell the local worker which blocks this process read from its cache files (also
        done every HITS_REPORT_S and on close), so its eviction and hit counts see them."""
        if self._cache is None:
            return
        hits = self._cache.take_hits()
        for at in range(0, len(hits), 5000):
            try:
                self._http.request(
                    "POST",
                    self._client.config.worker,
                    "/v1/touch",
                    payload={"blocks": hits[at : at + 5000]},
                )
            except StorageError as exc:
                log.debug("could not report cache hits: %s", exc)
                return

    def _read_blocks(self, namespace: str, info: ObjectInfo, offset: int, view: memoryview) -> int:
        bs = self._client.block_size
        first, last = offset // bs, (offset + len(view) - 1) // bs
        futures = {
            i: self.pool.submit(self.read_block, namespace, info, i) for i in range(first, last + 1)
        }
        for index, future in futures.items():
            data = future.result()
            start = max(offset, index * bs)
            end = min(offset + len(view), index * bs + len(data))
            view[start - offset : end - offset] = data[start - index * bs : end - index * bs]
        return len(view)

    def _segment_pair(self) -> tuple[shm.SharedBuffer, shm.SharedBuffer]:
        """This thread's two segments: one is filled by the worker while the other is copied."""
        pair = getattr(self._tls, "segments", None)
        if pair is None:
            pair = (shm.SharedBuffer(shm.SHM_CHUNK), shm.SharedBuffer(shm.SHM_CHUNK))
            self._tls.segments = pair
            with self._lock:
                self._segments.extend(pair)
        return pair

    def _read_shm(self, namespace: str, info: ObjectInfo, offset: int, view: memoryview) -> int:
        segments = self._segment_pair()
        chunks = [
            (at, min(shm.SHM_CHUNK, len(view) - at)) for at in range(0, len(view), shm.SHM_CHUNK)
        ]

        def fetch(i: int) -> dict[str, Any]:
            at, length = chunks[i]
            result: dict[str, Any] = self._client.local_request(
                "POST",
                "/v1/shm/read",
                payload={
                    "ns": namespace,
                    "key": info.key,
                    "version": info.version,
                    "size": info.size,
                    "offset": offset + at,
                    "length": length,
                    "segment": segments[i % 2].name,
                    "segment_offset": 0,
                },
            )
            return result

        pending = self.pool.submit(fetch, 0)
        for i, (at, length) in enumerate(chunks):
            result = pending.result()
            if i + 1 < len(chunks):  # the other segment was copied out last round: refill it
                pending = self.pool.submit(fetch, i + 1)
            got = int(result["length"])
            view[at : at + got] = segments[i % 2].view[:got]
            with self._lock:
                for source, count in result["sources"].items():
                    self.sources[source] = self.sources.get(source, 0) + count
            if got < length:
                if i + 1 < len(chunks):
                    pending.result()  # never leave a write into our segment running
                return at + got
        return len(view)

    def close(self) -> None:
        """Report the last cache hits, close the cache files and give the segments back."""
        self._closed.set()
        if self._cache is not None:
            self.report_hits()
            self._cache.close()
            self._cache = None
        release_segments(self._client, self._segments)
        self._segments.clear()


def release_segments(client: PcacheClient, segments: list[shm.SharedBuffer]) -> None:
    """Tell the local worker to let go of ``segments`` (best effort: a worker that is gone
    holds nothing), then close them."""
    for segment in segments:
        try:
            client.local_request("POST", "/v1/shm/release", payload={"segment": segment.name})
        except StorageError:
            pass
        segment.close()
