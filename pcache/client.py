"""The Python client of the node cache: what checkpoints, data loaders and the mount use.

Paths are ``NAMESPACE/KEY`` (``pcache://datasets/tokens/shard-0001.bin``): the namespace is one
of the workers' ``backends``. The client talks to its local worker for metadata and writes, and
picks the worker for each block itself (:class:`~pcache.selection.WorkerSelector`: hash-ring
order, two choices by load, bounded load, dead workers skipped and readmitted gradually). When no
worker answers, it reads the backing store directly with its own credentials, so a dead worker
never turns into a failed read.

Large reads and writes with the local worker go through shared memory (:mod:`pcache.shm`): the
worker copies cache blocks straight into the client's segment, and the client copies out once.

This module is the client's cluster view (the local worker's ``/v1/info``, else the config's
own backends), its metadata requests with their failover (other workers, the store, what was
last known) and its write requests. The parts it is made of live beside it:
:mod:`pcache.transport` (HTTP to the workers), :mod:`pcache.reads` (the block read path,
``client.reads``), :mod:`pcache.session` (write-back sessions) and :mod:`pcache.files` (the
file objects, which use those public APIs).

Thread-safe: one client is shared by the threads of a process (each thread gets its own segment).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar, cast
from urllib.parse import quote, urlsplit

from objstore import Config, open_store
from objstore.base import ObjectInfo, Store
from objstore.errors import ConfigError, ObjectNotFound
from objstore.url import check_key

from . import shm
from .config import CONFIG_ENV, SECTION, ClientConfig, Durability
from .files import PcacheReader, PcacheWriter
from .lastknown import LastKnown
from .pages import PageAt, store_page
from .protocol import (
    METADATA_HEADER,
    Resolved,
    block_key,
    info_from_json,
    split_path,
)
from .reads import BlockReads
from .selection import DEFAULT_LOAD_FACTOR, Node, WorkerSelector
from .session import STRICT_TIMEOUT_S, WriteSession
from .transport import WorkerHTTP, WorkerUnavailable

log = logging.getLogger(__name__)
T = TypeVar("T")

INFO_TTL_S = 10.0
INFO_RETRY_S = 5.0  # after the local worker failed to answer /v1/info
LOCAL_HOSTS = {"127.0.0.1", "localhost", "::1", "[::1]"}


@dataclass(frozen=True)
class Listing:
    """A directory view: objects, sub-prefixes, and the keys whose user metadata is known."""

    objects: list[ObjectInfo]
    prefixes: list[str]
    full: set[str]


@dataclass
class _Page:
    listing: Listing
    token: str | None  # the ``after`` of the next page; None: the last


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
        self.http = WorkerHTTP(self.config.token.reveal(), self.config.timeout)
        self.readahead = readahead
        self.pool = ThreadPoolExecutor(threads, thread_name_prefix="pcache-client")
        self._lock = threading.Lock()
        self._info: dict[str, Any] | None = None
        self._info_at = 0.0
        self._offline_at = 0.0  # when no worker answered and the config's view was used
        self._selector: WorkerSelector | None = None
        # what workers (or the store) last said, for when neither answers
        self._known = LastKnown(self.config.last_known)
        self._local_id = ""
        self._stores: dict[str, Store] = {}
        host = urlsplit(self.config.worker).hostname or ""
        self.reads = BlockReads(
            self,
            self.http,
            self.pool,
            shared_memory=self.config.shm and host in LOCAL_HOSTS and shm.available(),
        )

    # -- requests to the workers ------------------------------------------------------------------------------

    def local_request(self, method: str, path: str, **kwargs: Any) -> Any:
        """A request to the local worker; its failures count in the selector's view of it, so
        a hung local worker is soon held dead and avoided (see :meth:`_local_dead`)."""
        selector, local_id = self._selector, self._local_id
        local = selector.node(local_id) if selector is not None else None
        if selector is None or local is None:
            response = self.http.request(method, self.config.worker, path, **kwargs)
        else:
            with selector.track(local, WorkerUnavailable):
                response = self.http.request(method, self.config.worker, path, **kwargs)
            if selector.is_dead(local_id):
                # it answers again (a restart): its journal is what this node's reads need
                # (pending writes), so it is asked first again from now on
                selector.revive(local_id)
        return json.loads(response.data)

    def local_dead(self) -> bool:
        selector = self._selector
        return selector is not None and selector.is_dead(self._local_id)

    def _metadata(self, path: str, **kwargs: Any) -> Any:
        """A metadata GET (stat, list): the local worker, else any other live worker (each
        answers for the whole cluster's backends). A local worker the selector holds dead is
        asked last, so a hung one costs one timeout, not one per call."""
        selector, local_id = self._selector, self._local_id
        local = selector.node(local_id) if selector is not None else None
        if selector is None or local is None:
            if self._offline():  # not each call waiting for a worker that was not there
                raise WorkerUnavailable(f"no pcache worker has answered yet ({self.config.worker})")
            return self.local_request("GET", path, **kwargs)
        # a few others in the key's order: any worker answers metadata, and the full order
        # costs milliseconds on a cluster of thousands
        others = [n for n in selector.candidates(path, limit=4) if n.node_id != local_id][:3]
        order = [*others, local] if selector.is_dead(local_id) else [local, *others]
        error: WorkerUnavailable | None = None
        for node in order:
            try:
                with selector.track(node, WorkerUnavailable):
                    response = self.http.request("GET", node.address, path, **kwargs)
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
        """The local worker's view: node id, block size, namespaces, members. Before any
        worker has answered, :meth:`offline_view` (when the config names backends)."""
        with self._lock:
            now = time.monotonic()
            fresh = self._info is not None and now - self._info_at < INFO_TTL_S
            if self._info is not None and self.local_dead():
                fresh = True  # no refresh from a worker the selector holds dead: keep the view
            if fresh and not refresh:
                assert self._info is not None
                return self._info
            if self._offline() and not refresh:
                return self.offline_view()  # asked moments ago: no worker yet
        try:
            info = self.local_request("GET", "/v1/info")
        except WorkerUnavailable:
            with self._lock:
                if self._info is not None:  # keep serving with the last view; the worker may
                    # be back, and is asked again in a while, not on every call meanwhile
                    self._info_at = time.monotonic() - INFO_TTL_S + INFO_RETRY_S
                    return self._info
                if not self.config.backends:
                    raise
                self._offline_at = time.monotonic()
            log.info("no worker reachable yet: reading the backends of the config directly")
            return self.offline_view()
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

    def offline_view(self) -> dict[str, Any]:
        """What the client knows of the cluster from its own config while no worker has ever
        answered: the backends and block size of its ``[pcache]`` table, no members. Reads
        then go to the stores themselves, writes fail (they need a worker)."""
        backends = dict(self.config.backends)
        return {
            "node_id": "",
            "offline": True,
            "block_size": self.config.block_size,
            "namespaces": sorted(backends),
            "backends": backends,
            "nodes": [],
        }

    @property
    def block_size(self) -> int:
        return int(self.info()["block_size"])

    @property
    def selector(self) -> WorkerSelector:
        self.info()
        if self._selector is None:
            raise WorkerUnavailable(f"no pcache worker has answered yet ({self.config.worker})")
        return self._selector

    def selector_or_none(self) -> WorkerSelector | None:
        """The worker selection, None while no worker has ever answered."""
        return self._selector

    def _offline(self) -> bool:
        """No worker ever answered, and the last try was moments ago (see :meth:`info`)."""
        return (
            self._info is None
            and self._offline_at > 0
            and time.monotonic() - self._offline_at < INFO_RETRY_S
        )

    def backend(self, namespace: str) -> Store:
        """The backing store itself: the last resort when no worker answers. Its URL is the
        workers' (when one ever answered), else the config's; its profiles the config file's."""
        with self._lock:
            store = self._stores.get(namespace)
        if store is None:
            urls = {**self.config.backends, **(self._info or {}).get("backends", {})}
            if namespace not in urls:
                raise WorkerUnavailable(
                    f"no worker reachable and no backend known for {namespace!r}"
                )
            # the node's config file holds the profiles next to [pcache]
            where = self.config.config_file or os.environ.get(CONFIG_ENV) or None
            config = Config.load(where, sections=[SECTION])
            store = open_store(urls[namespace], config)
            with self._lock:
                self._stores[namespace] = store
        return store

    def _from_store(
        self,
        namespace: str,
        unavailable: WorkerUnavailable,
        ask: Callable[[Store], T],
        known: Hashable | None = None,
        *,
        page: bool = False,
    ) -> T:
        """No worker answered a metadata request: ``ask`` the backing store itself (what it
        holds, without the writes pending on the workers); when it cannot answer either, what
        was last learned under ``known`` (see :mod:`pcache.lastknown`), else the workers'
        failure (``unavailable``), as before."""
        try:
            answer = ask(self.backend(namespace))
        except (OSError, ConfigError) as exc:  # unreachable too, no profile, refused...
            last = None if known is None else self._known.get(known, page=page)
            if last is not None:
                log.info("neither a worker nor the store answered: %s as last known", known)
                return cast(T, last)
            raise unavailable from exc
        log.info("no worker answered (%s): metadata of %s from the store", unavailable, namespace)
        return answer

    # -- metadata ------------------------------------------------------------------------------

    def stat(self, path: str, *, full: bool = False) -> ObjectInfo:
        """An object's metadata; ``full``: with its user metadata (a HEAD where the worker knows
        the object only from a listing)."""
        namespace, key = split_path(path)
        check_key(key)
        fields = {"full": "1"} if full else None
        known = ("stat", path, full)
        try:
            info = info_from_json(
                self._metadata(f"/v1/stat/{quote(namespace)}/{quote(key)}", fields=fields)
            )
        except WorkerUnavailable as unavailable:
            found = self._from_store(
                namespace, unavailable, lambda store: _stat_or_none(store, key), known
            )
            if found is None:  # a write pending on the worker may be there: cannot tell
                raise
            self._known.note(known, found)
            return found
        self._known.note(known, info)
        return info

    def stat_many(self, paths: list[str], *, full: bool = False) -> dict[str, ObjectInfo | None]:
        """:meth:`stat` of several paths of one namespace in one request to the local worker,
        which asks the store for them side by side (a mount's stat-ahead): None for a path
        that is not there. Best effort: a path the worker could not stat is left out, and
        with no worker to ask the answer is empty (each is then asked alone, with failover)."""
        if not paths:
            return {}
        namespace = split_path(paths[0])[0]
        keys = {}
        for path in paths:
            ns, key = split_path(path)
            if ns != namespace:
                raise ValueError(f"{path!r} is not in namespace {namespace!r}")
            keys[key] = path
        try:
            answer = self.local_request(
                "POST",
                f"/v1/stats/{quote(namespace)}",
                payload={"keys": list(keys), "full": full},
            )
        except WorkerUnavailable:
            return {}
        found: dict[str, ObjectInfo | None] = {}
        for key, data in answer["stats"].items():
            if key not in keys:
                continue
            path = keys[key]
            info = None if data is None else info_from_json(data)
            if info is not None:
                self._known.note(("stat", path, full), info)
            found[path] = info
        return found

    def resolve(
        self,
        path: str,
        *,
        file: bool = True,
        marker: bool = True,
        full: bool = False,
    ) -> Resolved:
        """What ``path`` names, in one request (see :class:`~pcache.protocol.Resolved`): the
        object (``file``), the directory marker (``marker``) and whether anything is under
        ``path/``; ``full``: the object with its user metadata."""
        namespace, key = split_path(path)
        check_key(key)
        fields = {
            "file": int(file),
            "marker": int(marker),
            "full": int(full),
        }
        known = ("resolve", path, file, marker, full)
        try:
            answer = self._metadata(
                f"/v1/resolve/{quote(namespace)}/{quote(key)}",
                fields={k: str(v) for k, v in fields.items()},
            )
        except WorkerUnavailable as unavailable:

            def ask(store: Store) -> Resolved:
                prefix = key + "/"
                page = store.list_page(prefix, delimiter="/", limit=2)
                has_marker = any(o.key == prefix for o in page.objects)
                return Resolved(
                    _stat_or_none(store, key) if file else None,
                    _stat_or_none(store, prefix) if marker and has_marker else None,
                    has_marker,
                    bool(page.prefixes) or any(o.key != prefix for o in page.objects),
                )

            resolved = self._from_store(namespace, unavailable, ask, known)
            if resolved.file is None and not resolved.directory:
                raise  # a write pending on the worker may be there: cannot tell
            self._known.note(known, resolved)
            return resolved
        resolved = Resolved.from_json(answer)
        if resolved.file is not None or resolved.directory:
            self._known.note(known, resolved)
        return resolved

    def ls(self, path: str, *, recursive: bool = False) -> tuple[list[ObjectInfo], list[str]]:
        """Objects and sub-prefixes directly under ``path`` (a directory view)."""
        listing = self.list_dir(path, recursive=recursive)
        return listing.objects, listing.prefixes

    def list_dir(self, path: str, *, recursive: bool = False) -> Listing:
        """:meth:`ls`, also saying which objects' user metadata the worker knew."""
        objects: list[ObjectInfo] = []
        prefixes: list[str] = []
        full: set[str] = set()
        for page in self.iter_dir(path, recursive=recursive):
            objects.extend(page.objects)
            prefixes.extend(page.prefixes)
            full |= page.full
        return Listing(objects, prefixes, full)

    def iter_dir(
        self, path: str, *, recursive: bool = False, limit: int = 1000
    ) -> Iterator[Listing]:
        """The listing of ``path`` page by page (at most ``limit`` names each, in order):
        memory bounded by one page at any directory size. Pages are fetched as they are
        consumed, so names added or removed meanwhile may or may not show (as with
        ``readdir``); :meth:`list_page` resumes anywhere."""
        token: str | None = ""
        while token is not None:
            listing, token = self.list_page(path, after=token, limit=limit, recursive=recursive)
            yield listing

    def list_page(
        self, path: str, *, after: str = "", limit: int = 1000, recursive: bool = False
    ) -> tuple[Listing, str | None]:
        """One page of :meth:`iter_dir` (``path`` is a directory; ``after``, a full key or
        prefix, is the previous page's token) and the next page's token (None: the last)."""
        namespace, prefix = split_path(path)
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        page = self._list_page(namespace, prefix, "" if recursive else "/", after, limit)
        return page.listing, page.token

    def _list_page(
        self, namespace: str, prefix: str, delimiter: str, after: str, limit: int
    ) -> _Page:
        fields = {"prefix": prefix, "delimiter": delimiter, "after": after, "limit": str(limit)}
        known = ("page", namespace, prefix, delimiter, after, limit)
        try:
            answer = self._metadata(f"/v1/list/{quote(namespace)}", fields=fields)
        except WorkerUnavailable as unavailable:

            def ask(store: Store) -> _Page:
                got = store_page(store, PageAt(prefix, delimiter, after, limit))
                return _Page(Listing(got.objects, got.prefixes, set()), got.token)

            page = self._from_store(namespace, unavailable, ask, known, page=True)
        else:
            objects = [info_from_json(o) for o in answer["objects"]]
            full = {o["key"] for o in answer["objects"] if o.get("full")}
            page = _Page(Listing(objects, answer["prefixes"], full), answer.get("token"))
        self._known.note(known, page, page=True)
        return page

    def invalidate(self, path: str, *, cluster: bool = True, blocks: bool = True) -> dict[str, Any]:
        """Forget cached metadata (and blocks) under ``path`` on this node and, by default, all."""
        namespace, prefix = split_path(path)
        return self.local_request(
            "POST",
            "/v1/invalidate",
            payload={"ns": namespace, "path": prefix, "cluster": cluster, "blocks": blocks},
        )

    def delete(self, path: str, *, durable: Durability = Durability.REMOTE) -> None:
        """Delete ``path``; ``durable="local"`` returns once the delete is journalled."""
        namespace, key = split_path(path)
        check_key(key)
        self.local_request(
            "DELETE",
            f"/v1/object/{quote(namespace)}/{quote(key)}?durable={Durability(durable).value}",
            timeout=STRICT_TIMEOUT_S + 5,
        )

    def rename(
        self,
        old: str,
        new: str,
        *,
        durable: Durability = Durability.REMOTE,
        noreplace: bool = False,
    ) -> bool:
        """Rename an object (same namespace); True when it was a pending write, re-keyed
        without an upload under the old name.

        Raises:
            FileExistsError: ``noreplace`` and ``new`` exists.
        """
        namespace, old_key = split_path(old)
        new_namespace, new_key = split_path(new)
        if namespace != new_namespace:
            raise ValueError("rename across namespaces")
        result = self.local_request(
            "POST",
            "/v1/rename",
            payload={
                "ns": namespace,
                "old": old_key,
                "new": new_key,
                "durable": Durability(durable).value,
                "noreplace": noreplace,
            },
            timeout=STRICT_TIMEOUT_S + 5,
        )
        return bool(result["pending"])

    def set_metadata(
        self, path: str, metadata: dict[str, str], *, durable: Durability = Durability.LOCAL
    ) -> ObjectInfo:
        """Replace the user metadata of an object (a pending write's, or one in the store)."""
        namespace, key = split_path(path)
        check_key(key)
        return info_from_json(
            self.local_request(
                "POST",
                f"/v1/meta/{quote(namespace)}/{quote(key)}",
                payload={"metadata": metadata, "durable": Durability(durable).value},
                timeout=STRICT_TIMEOUT_S + 5,
            )
        )

    def put_small(
        self,
        path: str,
        data: bytes,
        *,
        metadata: dict[str, str] | None = None,
        durable: Durability = Durability.LOCAL,
        timeout: float = STRICT_TIMEOUT_S,
    ) -> ObjectInfo:
        """Write a small object in one request (staged, fsynced and journalled by the worker;
        ``durable="remote"`` also waits for the store)."""
        namespace, key = split_path(path)
        check_key(key)
        query = f"?durable={Durability(durable).value}&timeout={timeout}"
        return info_from_json(
            self.local_request(
                "PUT",
                f"/v1/object/{quote(namespace)}/{quote(key)}{query}",
                body=data,
                headers={METADATA_HEADER: json.dumps(metadata or {})},
                timeout=timeout + 5,
            )
        )

    def open_session(self, path: str) -> WriteSession:
        """A write-back session on the local worker (see :class:`WriteSession`)."""
        namespace, key = split_path(path)
        check_key(key)
        opened = self.local_request("POST", f"/v1/write/{quote(namespace)}/{quote(key)}")
        return WriteSession(self, opened["session"], opened.get("path", ""))

    def uploads(self) -> dict[str, Any]:
        """The local worker's write-back records (pending, retrying, refused)."""
        result: dict[str, Any] = self.local_request("GET", "/v1/uploads")
        return result

    def upload_action(self, action: str, path: str) -> list[str]:
        """``retry`` or ``discard`` the failed upload of ``path`` (``NS`` alone: every failed
        one of the namespace); returns the keys acted on."""
        namespace, key = split_path(path)
        result = self.local_request(
            "POST", f"/v1/uploads/{action}", payload={"ns": namespace, "key": key}
        )
        return list(result[action])

    def status(self, address: str | None = None) -> dict[str, Any]:
        """A worker's status (the local one by default)."""
        return json.loads(
            self.http.request("GET", address or self.config.worker, "/v1/status").data
        )

    # -- reads (pcache.reads) ------------------------------------------------------------------

    def readinto(
        self,
        path: str,
        offset: int,
        buf: memoryview | bytearray,
        info: ObjectInfo | None = None,
        *,
        exact: bool = False,
    ) -> int:
        """Read up to ``len(buf)`` bytes of ``path`` at ``offset`` into ``buf`` (see
        :meth:`BlockReads.readinto`); returns bytes read."""
        return self.reads.readinto(path, offset, buf, info, exact=exact)

    def read(self, path: str, offset: int = 0, length: int | None = None) -> bytes:
        info = self.stat(path)
        end = info.size if length is None else min(info.size, offset + length)
        buf = bytearray(max(0, end - offset))
        n = self.readinto(path, offset, buf, info)
        return bytes(buf[:n])

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
        query = f"?timeout={timeout}" if timeout else ""
        return info_from_json(
            self.local_request(
                "POST",
                f"/v1/flush/{quote(namespace)}/{quote(key)}{query}",
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
                self.http.request(
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
            self.pool.submit(warm, address, namespace, info, indexes)
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
        self.reads.close()
        self.pool.shutdown(wait=False, cancel_futures=True)
        for store in self._stores.values():
            store.close()
        self.http.close()

    def __enter__(self) -> PcacheClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _stat_or_none(store: Store, key: str) -> ObjectInfo | None:
    try:
        return store.stat(key)
    except FileNotFoundError:
        return None
