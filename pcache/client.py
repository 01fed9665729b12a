"""The Python client of the node cache: what checkpoints, data loaders and the mount use.

Paths are ``NAMESPACE/KEY`` (``pcache://datasets/tokens/shard-0001.bin``): the namespace is one
of the workers' ``backends``. The client talks to its local worker for metadata and writes, and
picks the worker for each block itself (:class:`~pcache.selection.WorkerSelector`: hash-ring
order, two choices by load, bounded load, dead workers skipped and readmitted gradually). When no
worker answers, it reads the backing store directly with its own credentials, so a dead worker
never turns into a failed read.

Large reads and writes with the local worker go through shared memory (:mod:`pcache.shm`): the
worker copies cache blocks straight into the client's segment, and the client copies out once.

Thread-safe: one client is shared by the threads of a process (each thread gets its own segment).
"""

from __future__ import annotations

import io
import json
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any
from urllib.parse import quote, urlsplit

import lmdb
import urllib3

from objstore import Config, open_store
from objstore.base import ObjectInfo, Store
from objstore.errors import EndpointUnreachable, ObjectNotFound, StorageError
from objstore.streams import SeekableReader
from objstore.url import check_key

from . import shm
from .blockindex import BlockId
from .config import CONFIG_ENV, SECTION, ClientConfig
from .localcache import LocalCacheReader
from .protocol import (
    SOURCE_HEADER,
    TOKEN_HEADER,
    StaleVersion,
    block_key,
    error_from_response,
    info_from_json,
)
from .selection import DEFAULT_LOAD_FACTOR, Node, WorkerSelector

log = logging.getLogger(__name__)

SHM_CHUNK = 32 << 20
INFO_TTL_S = 10.0
INFO_RETRY_S = 5.0  # after the local worker failed to answer /v1/info
HITS_REPORT_S = 2.0  # how often hits read straight from the cache files are reported
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


class WorkerUnavailable(EndpointUnreachable):
    """No worker answered (connection refused, timeout)."""


def split_path(path: str) -> tuple[str, str]:
    """``pcache://ns/key`` or ``ns/key`` -> (namespace, key); the key may be empty."""
    if path.startswith("pcache://"):
        path = path[len("pcache://") :]
    path = path.lstrip("/")
    namespace, _, key = path.partition("/")
    if not namespace:
        raise ValueError(f"no namespace in pcache path {path!r}")
    return namespace, key


class PcacheClient:
    """Client of the node's cache workers.

    Args:
        config: worker address and token; defaults to :meth:`ClientConfig.load`.
        readahead: blocks fetched ahead by readers on sequential access.
        threads: parallel block fetches per client.
    """

    def __init__(
        self, config: ClientConfig | None = None, *, readahead: int = 4, threads: int = 16
    ) -> None:
        self.config = config or ClientConfig.load()
        self._token = self.config.token.reveal()
        self._http = urllib3.PoolManager(
            maxsize=64,
            block=False,
            retries=False,
            timeout=urllib3.Timeout(connect=3.0, read=self.config.timeout),
            headers={TOKEN_HEADER: f"Bearer {self._token}"},
        )
        self.readahead = readahead
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="pcache-client")
        self._lock = threading.Lock()
        self._info: dict[str, Any] | None = None
        self._info_at = 0.0
        self._selector: WorkerSelector | None = None
        self._local_id = ""
        self._stores: dict[str, Store] = {}
        self._tls = threading.local()
        host = urlsplit(self.config.worker).hostname or ""
        self._shm_ok = self.config.shm and host in LOCAL_HOSTS and shm.available()
        self._segments: list[shm.SharedBuffer] = []
        self.sources: dict[str, int] = {}
        self._cache: LocalCacheReader | None = None
        self._cache_tried = False
        self._closed = threading.Event()

    # -- HTTP ----------------------------------------------------------------------------------

    def _request(
        self,
        method: str,
        base: str,
        path: str,
        *,
        fields: dict[str, str] | None = None,
        body: bytes | None = None,
        payload: Any = None,
        timeout: float | None = None,
    ) -> urllib3.BaseHTTPResponse:
        url = base + path
        headers = {}
        if payload is not None:
            body = json.dumps(payload).encode()
            headers["Content-Type"] = "application/json"
        try:
            response = self._http.request(
                method,
                url,
                fields=fields,
                body=body,
                headers={**self._http.headers, **headers},
                timeout=urllib3.Timeout(connect=3.0, read=timeout or self.config.timeout),
                preload_content=True,
            )
        except urllib3.exceptions.HTTPError as exc:
            raise WorkerUnavailable(f"pcache worker {base} unreachable: {exc}", url=url) from exc
        if response.status >= 400:
            try:
                detail = json.loads(response.data)
            except ValueError:
                detail = None
            raise error_from_response(response.status, detail, url)
        return response

    def _local(self, method: str, path: str, **kwargs: Any) -> Any:
        """A request to the local worker; its failures count in the selector's view of it, so
        a hung local worker is soon held dead and avoided (see :meth:`_local_dead`)."""
        selector, local_id = self._selector, self._local_id
        local = selector.node(local_id) if selector is not None else None
        if selector is None or local is None:
            response = self._request(method, self.config.worker, path, **kwargs)
        else:
            with selector.track(local, WorkerUnavailable):
                response = self._request(method, self.config.worker, path, **kwargs)
        return json.loads(response.data)

    def _local_dead(self) -> bool:
        selector = self._selector
        return selector is not None and selector.is_dead(self._local_id)

    def _metadata(self, path: str, **kwargs: Any) -> Any:
        """A metadata GET (stat, list): the local worker, else any other live worker (each
        answers for the whole cluster's backends). A local worker the selector holds dead is
        asked last, so a hung one costs one timeout, not one per call."""
        selector, local_id = self._selector, self._local_id
        local = selector.node(local_id) if selector is not None else None
        if selector is None or local is None:
            return self._local("GET", path, **kwargs)
        # a few others in the key's order: any worker answers metadata, and the full order
        # costs milliseconds on a cluster of thousands
        others = [n for n in selector.candidates(path, limit=4) if n.node_id != local_id][:3]
        order = [*others, local] if selector.is_dead(local_id) else [local, *others]
        error: WorkerUnavailable | None = None
        for node in order:
            try:
                with selector.track(node, WorkerUnavailable):
                    response = self._request("GET", node.address, path, **kwargs)
            except WorkerUnavailable as exc:
                if error is None:
                    error = exc
                log.info("worker %s failed for %s: %s", node.node_id, path, exc)
                continue
            return json.loads(response.data)
        assert error is not None
        raise error

    # -- cluster view --------------------------------------------------------------------------

    def info(self, *, refresh: bool = False) -> dict[str, Any]:
        """The local worker's view: node id, block size, namespaces, members."""
        with self._lock:
            fresh = self._info is not None and time.monotonic() - self._info_at < INFO_TTL_S
            if self._info is not None and self._local_dead():
                fresh = True  # no refresh from a worker the selector holds dead: keep the view
            if fresh and not refresh:
                assert self._info is not None
                return self._info
        try:
            info = self._local("GET", "/v1/info")
        except WorkerUnavailable:
            if self._info is not None:  # keep serving with the last view; the worker may be back
                with self._lock:  # and ask again in a while, not on every call meanwhile
                    self._info_at = time.monotonic() - INFO_TTL_S + INFO_RETRY_S
                return self._info
            raise
        nodes = [Node(n["id"], n["address"], float(n["weight"])) for n in info["nodes"]]
        with self._lock:
            self._info, self._info_at = info, time.monotonic()
            self._local_id = info["node_id"]
            if self._selector is None:
                self._selector = WorkerSelector(
                    nodes,
                    local_id=self._local_id,
                    load_factor=float(info.get("load_factor", DEFAULT_LOAD_FACTOR)),
                )
            else:
                self._selector.set_nodes(nodes)
        return info

    @property
    def block_size(self) -> int:
        return int(self.info()["block_size"])

    @property
    def selector(self) -> WorkerSelector:
        self.info()
        assert self._selector is not None
        return self._selector

    def _backend(self, namespace: str) -> Store:
        """The backing store itself: the last resort when no worker answers."""
        with self._lock:
            store = self._stores.get(namespace)
        if store is None:
            urls = (self._info or {}).get("backends", {})
            if namespace not in urls:
                raise WorkerUnavailable(
                    f"no worker reachable and no backend known for {namespace!r}"
                )
            # the node's config file holds the profiles next to [pcache]
            config = Config.load(os.environ.get(CONFIG_ENV) or None, sections=[SECTION])
            store = open_store(urls[namespace], config)
            with self._lock:
                self._stores[namespace] = store
        return store

    # -- metadata ------------------------------------------------------------------------------

    def stat(self, path: str) -> ObjectInfo:
        namespace, key = split_path(path)
        check_key(key)
        return info_from_json(self._metadata(f"/v1/stat/{quote(namespace)}/{quote(key)}"))

    def ls(self, path: str, *, recursive: bool = False) -> tuple[list[ObjectInfo], list[str]]:
        """Objects and sub-prefixes directly under ``path`` (a directory view)."""
        namespace, prefix = split_path(path)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        listing = self._metadata(
            f"/v1/list/{quote(namespace)}",
            fields={"prefix": prefix, "delimiter": "" if recursive else "/"},
        )
        return [info_from_json(o) for o in listing["objects"]], listing["prefixes"]

    def invalidate(self, path: str, *, cluster: bool = True, blocks: bool = True) -> dict[str, Any]:
        """Forget cached metadata (and blocks) under ``path`` on this node and, by default, all."""
        namespace, prefix = split_path(path)
        return self._local(
            "POST",
            "/v1/invalidate",
            payload={"ns": namespace, "path": prefix, "cluster": cluster, "blocks": blocks},
        )

    def delete(self, path: str) -> None:
        namespace, key = split_path(path)
        check_key(key)
        self._local("DELETE", f"/v1/object/{quote(namespace)}/{quote(key)}")

    def status(self, address: str | None = None) -> dict[str, Any]:
        """A worker's status (the local one by default)."""
        return json.loads(self._request("GET", address or self.config.worker, "/v1/status").data)

    # -- reads ---------------------------------------------------------------------------------

    def read_block(self, namespace: str, info: ObjectInfo, index: int) -> bytes:
        """One block, from the worker selection picks; other workers, then the store, on failure."""
        selector = self.selector
        name = block_key(namespace, info.key, index)
        fields = {"version": info.version, "index": str(index), "size": str(info.size)}
        path = f"/v1/block/{quote(namespace)}/{quote(info.key)}"
        if info.version.startswith("wb-"):  # a pending write lives only on the local worker
            response = self._request("GET", self.config.worker, path, fields=fields)
            self._count(response.headers.get(SOURCE_HEADER, "local"))
            return bytes(response.data)
        cache = self._local_cache()
        if cache is not None:  # a hit on this node's disks needs no worker at all
            bs = self.block_size
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
                    response = self._request("GET", node.address, path, fields=fields)
            except WorkerUnavailable as exc:
                log.info("worker %s failed for %s#%d: %s", node.node_id, info.key, index, exc)
                continue
            self._count(response.headers.get(SOURCE_HEADER, "?"))
            return bytes(response.data)
        for node in selector.last_resort(name):
            if node.node_id in tried:
                continue
            try:
                response = self._request("GET", node.address, path, fields=fields)
            except WorkerUnavailable:
                continue
            log.info("worker %s answers again", node.node_id)
            selector.revive(node.node_id)
            self._count(response.headers.get(SOURCE_HEADER, "?"))
            return bytes(response.data)
        log.warning("no worker could serve %s#%d; reading the backing store", info.key, index)
        bs = self.block_size
        data = self._backend(namespace).get_range(
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
        info = info or self.stat(path)
        view = memoryview(buf).cast("B")
        length = max(0, min(len(view), info.size - offset))
        if length == 0:
            return 0
        cache = self._local_cache()
        if cache is not None and not info.version.startswith("wb-"):
            done = self._read_direct(cache, namespace, info, offset, view[:length])
            if done == length:
                return done
            if done:
                return done + self.readinto(path, offset + done, view[done:length], info)
        threshold = 1 if exact else self.config.shm_threshold
        for attempt in (1, 2):
            try:
                if self._shm_ok and length >= threshold and not self._local_dead():
                    try:
                        return self._read_shm(namespace, info, offset, view[:length])
                    except (WorkerUnavailable, shm.SegmentError, StorageError) as exc:
                        if isinstance(exc, StaleVersion | ObjectNotFound):
                            raise
                        log.info("shared-memory read failed (%s); using HTTP", exc)
                        if "segment" in str(exc):
                            self._shm_ok = False
                return self._read_blocks(namespace, info, offset, view[:length])
            except (StaleVersion, ObjectNotFound):
                # the object changed (or a write we saw pending was replaced) under the read:
                # look it up again once; a real "gone" shows up as the stat's own error
                if attempt == 2:
                    raise
                self.invalidate(path, cluster=False, blocks=False)
                info = self.stat(path)
                length = max(0, min(len(view), info.size - offset))
        raise AssertionError("unreachable")

    # -- the local cache disks (pcache.localcache) ----------------------------------------------

    def _local_cache(self) -> LocalCacheReader | None:
        """The reader of the local worker's cache files, when this process can open them."""
        if self._cache_tried:
            return self._cache
        layout = self.info().get("local_cache")
        with self._lock:
            if self._cache_tried:
                return self._cache
            self._cache_tried = True
            if not self.config.direct_reads or not layout or not os.path.isdir(layout["index"]):
                return None
            try:
                self._cache = LocalCacheReader(layout["index"], layout["dirs"])
            except (OSError, lmdb.Error) as exc:
                log.info("cannot read the local cache files (%s): reading through the worker", exc)
                return None
        threading.Thread(target=self._report_hits, name="pcache-hits", daemon=True).start()
        return self._cache

    def _read_direct(
        self,
        cache: LocalCacheReader,
        namespace: str,
        info: ObjectInfo,
        offset: int,
        view: memoryview,
        block_size: int | None = None,
    ) -> int:
        """Copy what the local cache files hold, from ``offset`` on, until the first miss."""
        bs = block_size or self.block_size
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
                self._request(
                    "POST",
                    self.config.worker,
                    "/v1/touch",
                    payload={"blocks": hits[at : at + 5000]},
                )
            except StorageError as exc:
                log.debug("could not report cache hits: %s", exc)
                return

    def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        info = self.stat(path)
        end = info.size if length is None else min(info.size, offset + length)
        buf = bytearray(max(0, end - offset))
        n = self.readinto(path, offset, buf, info)
        return bytes(buf[:n])

    def _read_blocks(self, namespace: str, info: ObjectInfo, offset: int, view: memoryview) -> int:
        bs = self.block_size
        first, last = offset // bs, (offset + len(view) - 1) // bs
        futures = {
            i: self._pool.submit(self.read_block, namespace, info, i)
            for i in range(first, last + 1)
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
            pair = (shm.SharedBuffer(SHM_CHUNK), shm.SharedBuffer(SHM_CHUNK))
            self._tls.segments = pair
            with self._lock:
                self._segments.extend(pair)
        return pair

    def _read_shm(self, namespace: str, info: ObjectInfo, offset: int, view: memoryview) -> int:
        segments = self._segment_pair()
        chunks = [(at, min(SHM_CHUNK, len(view) - at)) for at in range(0, len(view), SHM_CHUNK)]

        def fetch(i: int) -> dict[str, Any]:
            at, length = chunks[i]
            result: dict[str, Any] = self._local(
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

        pending = self._pool.submit(fetch, 0)
        for i, (at, length) in enumerate(chunks):
            result = pending.result()
            if i + 1 < len(chunks):  # the other segment was copied out last round: refill it
                pending = self._pool.submit(fetch, i + 1)
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

    def open(self, path: str, mode: str = "rb") -> PcacheReader | PcacheWriter:
        if mode in ("rb", "r"):
            return PcacheReader(self, path)
        if mode in ("wb", "w"):
            return PcacheWriter(self, path)
        raise ValueError(f"unsupported mode {mode!r} (use 'rb' or 'wb')")

    # -- writes --------------------------------------------------------------------------------

    def put(self, path: str, data: bytes | memoryview, *, durable: str = "local") -> ObjectInfo:
        with PcacheWriter(self, path, durable=durable) as writer:
            writer.write(data)
        assert writer.result is not None
        return writer.result

    def flush(self, path: str, timeout: float | None = None) -> ObjectInfo:
        """Wait until ``path`` is durable in the backing store."""
        namespace, key = split_path(path)
        check_key(key)
        fields = {"timeout": str(timeout)} if timeout else None
        return info_from_json(
            self._local(
                "POST",
                f"/v1/flush/{quote(namespace)}/{quote(key)}",
                fields=fields,
                timeout=(timeout or 3600) + 5,
            )
        )

    # -- warmup --------------------------------------------------------------------------------

    def warmup(
        self, path: str, *, on_progress: Callable[[int, int], None] | None = None
    ) -> dict[str, Any]:
        """Load every object under ``path`` into the cluster's cache, each block on the worker
        selection would pick for it; returns counts by source tier."""
        objects = self._warm_targets(path)
        bs = self.block_size
        batches: dict[str, list[tuple[str, ObjectInfo, list[int]]]] = {}
        total_bytes = 0
        for namespace, info in objects:
            total_bytes += info.size
            per_node: dict[str, list[int]] = {}
            for index in range(max(1, -(-info.size // bs))):
                node = self.selector.candidates(block_key(namespace, info.key, index), limit=1)[0]
                per_node.setdefault(node.address, []).append(index)
            for address, indexes in per_node.items():
                batches.setdefault(address, []).append((namespace, info, indexes))
        done_bytes = 0
        sources: dict[str, int] = {}
        lock = threading.Lock()

        def warm(address: str, namespace: str, info: ObjectInfo, indexes: list[int]) -> None:
            nonlocal done_bytes
            result = json.loads(
                self._request(
                    "POST",
                    address,
                    "/v1/prefetch",
                    payload={
                        "ns": namespace,
                        "key": info.key,
                        "version": info.version,
                        "size": info.size,
                        "indexes": indexes,
                    },
                    timeout=600,
                ).data
            )
            with lock:
                for source, count in result["sources"].items():
                    sources[source] = sources.get(source, 0) + count
                done_bytes += sum(min(bs, info.size - i * bs) for i in indexes)
                if on_progress:
                    on_progress(done_bytes, total_bytes)

        futures = [
            self._pool.submit(warm, address, namespace, info, indexes)
            for address, items in batches.items()
            for namespace, info, indexes in items
        ]
        for future in futures:
            future.result()
        return {"objects": len(objects), "bytes": total_bytes, "blocks_by_source": sources}

    def _warm_targets(self, path: str) -> list[tuple[str, ObjectInfo]]:
        namespace, key = split_path(path)
        if key and not key.endswith("/"):
            try:
                return [(namespace, self.stat(path))]
            except FileNotFoundError:
                pass
        objects, _ = self.ls(path, recursive=True)
        if not objects:
            raise ObjectNotFound(f"nothing to warm up under {path!r}")
        return [(namespace, o) for o in objects]

    def close(self) -> None:
        self._closed.set()
        if self._cache is not None:
            self.report_hits()
            self._cache.close()
            self._cache = None
        self._pool.shutdown(wait=False, cancel_futures=True)
        for segment in self._segments:
            try:
                self._local("POST", "/v1/shm/release", payload={"segment": segment.name})
            except StorageError:
                pass
            segment.close()
        self._segments.clear()
        for store in self._stores.values():
            store.close()
        self._http.clear()

    def __enter__(self) -> PcacheClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


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
        view = memoryview(buf).cast("B")
        want = max(0, min(len(view), self.size - self._pos))
        if want == 0:
            return 0
        exact_ok = self._client._shm_ok or self._client._local_cache() is not None
        if want >= self._client.config.shm_threshold and exact_ok:
            n = self._client.readinto(self.path, self._pos, view[:want], self.info)
            self._pos += n
            self._last_end = self._pos
            return n
        done = 0
        sequential = self._pos == self._last_end or not exact_ok
        while done < want:
            index = (self._pos + done) // self._bs
            if self._current is not None and self._current[0] == index:
                block = self._current[1]
            elif sequential:
                block = self._block(index)
                self._current = (index, block)
            else:  # a random read: only its bytes, and the next read decides again
                self._last_index = index
                n = self._client.readinto(
                    self.path, self._pos + done, view[done:want], self.info, exact=True
                )
                done += n
                break
            start = self._pos + done - index * self._bs
            n = min(want - done, len(block) - start)
            if n <= 0:
                break
            view[done : done + n] = block[start : start + n]
            done += n
        self._pos += done
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
            cache = self._client._local_cache()
            if cache is None or self.info.version.startswith("wb-"):
                return None
            buf = bytearray(size)
            view = memoryview(buf)
            direct = self._client._read_direct(
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
            future = self._client._pool.submit(
                self._client.read_block, self.namespace, self.info, index
            )
        if index in (self._last_index, self._last_index + 1):  # sequential: keep blocks coming
            nblocks = -(-self.size // self._bs)
            for ahead in range(index + 1, min(nblocks, index + 1 + self._client.readahead)):
                if ahead not in self._ahead:
                    self._ahead[ahead] = self._client._pool.submit(
                        self._client.read_block, self.namespace, self.info, ahead
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
        self._session = client._local(
            "POST", f"/v1/write/{quote(self.namespace)}/{quote(self.key)}"
        )["session"]
        self._sent = 0  # bytes handed to the worker (or in flight to it)
        self._shm = client._shm_ok
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
            self._segs = [shm.SharedBuffer(SHM_CHUNK), shm.SharedBuffer(SHM_CHUNK)]
            if self._buffer:  # small writes so far: they go first, into the segment
                buffered, self._buffer = self._buffer, bytearray()
                self._fill_segments(memoryview(buffered))
        if not self._segs:
            self._buffer += view
            if len(self._buffer) >= SHM_CHUNK:
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
        self._inflight[index] = self._client._pool.submit(
            self._client._local,
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
        self._client._local(
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
        for segment in self._segs:
            try:
                self._client._local("POST", "/v1/shm/release", payload={"segment": segment.name})
            except StorageError:
                pass
            segment.close()
        self._segs = []

    def flush(self) -> None:
        pass  # data reaches the worker in chunks and at commit; durability is commit()'s job

    def commit(self, durable: str | None = None) -> ObjectInfo:
        """Send what is buffered and make the object durable (``local`` or ``remote``)."""
        self._send()
        self.result = info_from_json(
            self._client._local(
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
            self._client._local("DELETE", f"/v1/session/{self._session}")
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
