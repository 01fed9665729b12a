"""``pcache worker``: the node's cache daemon (aiohttp).

It owns the node's cache disks (:mod:`pcache.blockstore`), answers clients and peers with the
protocol of :mod:`pcache.protocol`, reads misses through :mod:`pcache.fetch`, stages writes in
:mod:`pcache.writeback`, caches metadata in :mod:`pcache.metacache`, and exports Prometheus
metrics (:mod:`pcache.metrics`). Every long-lived part starts and stops in the app's
``cleanup_ctx``; one middleware checks the token and turns every exception into a JSON error.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import hmac
import json
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

from objstore import open_store
from objstore.base import ListPage, ObjectInfo, Store
from objstore.errors import ObjectNotFound, StorageError, TransientError
from objstore.retry import RetryPolicy, retry_policy
from objstore.url import check_key, check_prefix

from . import collector
from . import metrics as metrics_mod
from .announce import Announced, Announcement
from .blockindex import BlockId
from .blockstore import BlockStore, CacheDir
from .config import Durability, WorkerConfig
from .fetch import BlockFetcher, PeerClient
from .membership import DnsMembership, Membership, parse_dns_target
from .metacache import MISSING, PROBE, MetadataCache, Missing
from .metastore import MetadataStore
from .pages import LIST_PAGE_MAX, PageAt, listed_name, names_after, store_page
from .protocol import (
    METADATA_HEADER,
    SOURCE_HEADER,
    TOKEN_HEADER,
    VERSION_HEADER,
    CopySource,
    Progress,
    Resolved,
    StaleVersion,
    Unauthorized,
    error_body,
    info_from_json,
    info_to_json,
    is_pending,
    pending_session,
)
from .selection import Node, WorkerSelector
from .shm import SegmentMap
from .writeback import PendingObject, WriteBack

log = logging.getLogger(__name__)

T = TypeVar("T")
S = TypeVar("S")
FETCH_ATTEMPTS = 3  # metadata fetches overtaken by an upload or invalidation are retried
# with a stale answer at hand, the store is asked briefly, not for its whole retry deadline, and
# after a failure not again for DOWN_RECHECK_S (stale answers go out at once meanwhile)
STALE_FALLBACK_RETRY = RetryPolicy(max_attempts=2, base_delay=0.1, max_delay=0.2, deadline=2.0)
DOWN_RECHECK_S = 5.0
CACHE_UPLOADED_MAX = 64 << 20  # uploaded objects up to this size stay in the cache as blocks
ANNOUNCE_TIMEOUT_S = 2.0  # a peer slower than this to take an announcement is skipped
RECOVER_PARALLEL = 64  # peers asked at once for their pending changes when a worker starts
STORE_WAIT_S = 60.0  # a read of bytes only in an unfinished upload waits this long for it
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
STAT_MANY_MAX = 1000  # keys in one /v1/stats request
LIST_FOR_NAMES = 1000  # a directory written here is listed for its new names up to this size
LIST_WAIT_S = 0.05  # how long a lookup waits for that listing before asking for its name
STAT_AHEAD_PARALLEL = 32  # of them asked of the store side by side
PAGES_AHEAD = 2  # store pages of a long listing fetched ahead of its reader
PAGES_AHEAD_MAX = 64  # such fetches in flight at once (all readers)
OPEN_PATHS = frozenset({"/healthz"})
MAX_BODY = 64 << 20
STOP_TIMEOUT_S = 10.0


class Worker:
    """The state behind one worker's HTTP app; created and closed by :func:`create_app`."""

    def __init__(self, config: WorkerConfig) -> None:
        self.config = config
        self.started = time.time()
        self.stores: dict[str, Store] = {
            name: open_store(url, config.profiles) for name, url in config.backends.items()
        }
        config.state_dir.mkdir(parents=True, exist_ok=True)
        self.blocks = BlockStore(
            [CacheDir(d.path, d.capacity) for d in config.cache_dirs],
            config.state_dir / "index",
            block_size=config.block_size,
        )
        self.meta = MetadataCache(
            config.metadata_ttl,
            config.negative_ttl,
            immutable=config.immutable,
            serve_stale=config.serve_stale,
        )
        # what the last run knew (stats, listings, fetch times): cached trees answer at once
        self.metastore = MetadataStore(config.state_dir / "metadata")
        loaded = self.meta.load(self.metastore)
        if loaded:
            log.info("metadata cache: %d entries from the last run", loaded)
        # namespace -> until when its store is held unreachable (metadata answered stale)
        self._down_until: dict[str, float] = {}
        self._stale_said: set[str] = set()  # namespaces whose outage was logged
        self.membership: Membership
        if config.peers_dns:
            host, port = parse_dns_target(config.peers_dns, config.port)
            scheme = urlsplit(config.address).scheme or "http"
            self.membership = DnsMembership(
                host, port, scheme=scheme, interval_s=config.peers_dns_interval
            )
        elif config.membership_file:
            self.membership = Membership.from_file(config.membership_file)
        else:
            self.membership = Membership(
                [Node(p.id, p.address, p.weight) for p in config.peers]
                or [Node(config.node_id, config.address, config.weight)]
            )
        nodes = self._nodes_with_self(self.membership.nodes())
        self.selector = WorkerSelector(
            nodes, local_id=config.node_id, load_factor=config.load_factor
        )
        self.peers = PeerClient(config.token.reveal(), config.request_timeout)
        self.fetcher = BlockFetcher(
            self.blocks,
            self.stores,
            self.selector,
            config.node_id,
            self.peers,
            fetch_concurrency=config.fetch_concurrency,
        )
        self.writeback = WriteBack(
            self.blocks,
            self.stores,
            config.state_dir,
            part_size=config.upload_part_size,
            concurrency=config.upload_concurrency,
            upload_delay=config.upload_delay,
            on_uploaded=self._uploaded,
        )
        # pending write-back versions the other nodes announced (close-to-open across nodes)
        self.announced = Announced()
        self.segments = SegmentMap()
        self.metrics = metrics_mod.WorkerMetrics(self)
        self._sequential: dict[tuple[str, str], int] = {}
        self._background: set[asyncio.Task[Any]] = set()
        # directory listings fetched for the new names asked in them (see _list_written_directory)
        self._listing_names: dict[tuple[str, str], asyncio.Task[None]] = {}
        # store pages of long listings being fetched ahead of their reader (list_page)
        self._pages_ahead: dict[tuple[str, PageAt], asyncio.Task[ListPage]] = {}
        self.loop: asyncio.AbstractEventLoop | None = None  # set once serving

    def _nodes_with_self(self, nodes: list[Node]) -> list[Node]:
        if any(n.node_id == self.config.node_id for n in nodes):
            return nodes
        return [*nodes, Node(self.config.node_id, self.config.address, self.config.weight)]

    def members(self) -> list[Node]:
        """Every node of the cluster (this one included), whatever their health."""
        return self._nodes_with_self(self.membership.nodes())

    def refresh_membership(self) -> None:
        self.selector.set_nodes(self.members())

    async def discover(self) -> None:
        """With ``peers_dns``: look the workers up when due (``refresh_membership`` uses them)."""
        if isinstance(self.membership, DnsMembership):
            await self.membership.refresh(self._identify)

    async def _identify(self, address: str) -> tuple[str, float]:
        async with self.peers._client().get(f"{address}/v1/info") as response:
            if response.status != 200:
                raise RuntimeError(f"HTTP {response.status} from /v1/info")
            body = await response.json()
        return str(body["node_id"]), float(body.get("weight", 1.0))

    def _uploaded(self, record: PendingObject, info: ObjectInfo | None) -> None:
        """A write-back record reached the store (upload thread): what it became is what this
        node knows, and the other nodes forget what they knew of the key (its announcement
        ends: the invalidation names the version that landed)."""
        namespace, key = record.namespace, record.key
        self.meta.landed(namespace, key, info)
        self.blocks.drop_object(namespace, key, keep_version=None if info is None else info.version)
        if info is not None:
            self._cache_uploaded(record, info)
        if self.loop is not None and len(self.members()) > 1:
            body = {
                "ns": namespace,
                "path": key,
                "cluster": False,
                "blocks": False,
                "landed": {"owner": self.config.node_id, "version": record.version},
            }
            asyncio.run_coroutine_threadsafe(self.invalidate_peers(body), self.loop)

    def _cache_uploaded(self, record: PendingObject, info: ObjectInfo) -> None:
        """The bytes just uploaded become cache blocks of the version that landed, so the next
        read is a local hit, not a fetch. Best effort: objects over :data:`CACHE_UPLOADED_MAX`
        (a checkpoint is seldom read back on the node that wrote it), and those not wholly
        on this disk (dropped early, copied lazily, moved) are left to be fetched."""
        if (
            record.delete
            or record.moved
            or record.released
            or record.absent
            or record.size != info.size
            or not 0 < info.size <= CACHE_UPLOADED_MAX
        ):
            return
        size = self.blocks.block_size
        try:
            for index in range(-(-info.size // size)):
                data = self.writeback.read(record, index * size, size)
                self.blocks.put(BlockId(record.namespace, record.key, info.version, index), data)
        except OSError as exc:  # no room, a disk error: it is fetched when read
            log.info("uploaded %s/%s not kept in the cache: %s", record.namespace, record.key, exc)

    async def announce(self, records: list[PendingObject]) -> None:
        """Tell every other live node of changes journalled here, before the commit returns:
        a stat, listing or read there sees them at once (reads of them come here). A peer that
        does not answer within ANNOUNCE_TIMEOUT_S is reported to the selector and skipped;
        it sees the change once it is uploaded."""
        peers = self._other_nodes()
        if not peers or not records:
            return
        body = self.announcement(records)
        timeout = aiohttp.ClientTimeout(total=ANNOUNCE_TIMEOUT_S)

        async def one(node: Node) -> None:
            try:
                async with self.peers._client().post(
                    f"{node.address}/v1/announce", json=body, timeout=timeout
                ) as response:
                    if response.status != 200:
                        raise RuntimeError(f"HTTP {response.status}")
            except Exception as exc:
                self.selector.record_failure(node.node_id)
                log.warning(
                    "could not announce %d change(s) to %s: %s", len(records), node.node_id, exc
                )

        await asyncio.gather(*(one(n) for n in peers))

    def _other_nodes(self) -> list[Node]:
        return [n for n in self.selector.candidates("") if n.node_id != self.config.node_id]

    def announcement(self, records: list[PendingObject]) -> dict[str, Any]:
        """The body of ``POST /v1/announce`` (and of ``GET /v1/announcements``) for
        ``records`` journalled here."""
        return {
            "owner": self.config.node_id,
            "entries": [
                {
                    "ns": r.namespace,
                    "key": r.key,
                    "version": r.version,
                    "info": None if r.delete else info_to_json(r.info()),
                }
                for r in records
            ],
        }

    def note_announced(self, body: dict[str, Any]) -> int:
        """Take another node's announcement (see :meth:`announcement`); the entries noted
        (a version known to have landed already is not)."""
        owner = str(body["owner"])
        noted = 0
        for entry in body.get("entries", []):
            namespace, key = entry["ns"], check_key(entry["key"])
            self.store(namespace)
            info = None if entry.get("info") is None else info_from_json(entry["info"])
            if self.announced.note(namespace, key, owner, str(entry["version"]), info):
                self.meta.invalidate_key(namespace, key)
                noted += 1
        return noted

    async def recover_announcements(self) -> int:
        """Ask every other node for what is journalled there, as at start: announcements live
        in memory, and a restarted worker would otherwise show the store's version of another
        node's pending file until its upload lands. A node that does not answer within
        ANNOUNCE_TIMEOUT_S is skipped (what it holds shows once uploaded)."""
        timeout = aiohttp.ClientTimeout(total=ANNOUNCE_TIMEOUT_S)
        gate = asyncio.Semaphore(RECOVER_PARALLEL)

        async def one(node: Node) -> int:
            try:
                async with (
                    gate,
                    self.peers._client().get(
                        f"{node.address}/v1/announcements", timeout=timeout
                    ) as response,
                ):
                    if response.status != 200:
                        raise RuntimeError(f"HTTP {response.status}")
                    body = await response.json()
                return self.note_announced(body)
            except Exception as exc:
                log.info("could not ask %s for its pending changes: %s", node.node_id, exc)
                return 0

        return sum(await asyncio.gather(*(one(n) for n in self._other_nodes())))

    def _announcement(self, namespace: str, key: str) -> Announcement | None:
        """The live announcement of ``key`` by a node not dead in this node's view (a dead
        writer's pending version cannot be read: the store's is shown until it is back)."""
        entry = self.announced.get(namespace, key)
        if entry is None or self.selector.is_dead(entry.owner):
            return None
        return entry

    async def invalidate_peers(self, body: dict[str, Any]) -> list[dict[str, Any]]:
        """POST ``body`` to every other node's ``/v1/invalidate``; a dead peer is reported, not
        raised."""
        peers = []
        for node in self.selector.candidates(""):
            if node.node_id == self.config.node_id:
                continue
            try:
                async with self.peers._client().post(
                    f"{node.address}/v1/invalidate", json=body
                ) as response:
                    peers.append(await response.json())
            except Exception as exc:  # one dead peer must not fail the whole invalidation
                peers.append({"node_id": node.node_id, "error": str(exc)})
        return peers

    def store(self, namespace: str) -> Store:
        try:
            return self.stores[namespace]
        except KeyError:
            raise ObjectNotFound(
                f"unknown namespace {namespace!r} (this worker serves: "
                f"{', '.join(sorted(self.stores))})"
            ) from None

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
        await asyncio.to_thread(self.writeback.close)
        await asyncio.to_thread(self.save_metadata)
        self.metastore.close()
        await self.peers.close()
        self.segments.close()
        self.blocks.close()
        for store in self.stores.values():
            store.close()

    # -- metadata ------------------------------------------------------------------------------

    def _pending_stat(self, namespace: str, key: str, url: str) -> ObjectInfo | None:
        """A change of ``key`` journalled here and not yet in the store: it is what this node
        sees (a tombstone: the object is gone)."""
        pending = self.writeback.pending(namespace, key)
        if pending is not None:
            if pending.delete:
                raise ObjectNotFound(f"no such object: {key!r}", url=url)
            return pending.info()
        announced = self._announcement(namespace, key)
        if announced is None:
            return None
        if announced.info is None:  # deleted on its owner, not yet in the store
            raise ObjectNotFound(f"no such object: {key!r}", url=url)
        return announced.info

    async def stat(self, namespace: str, key: str, *, full: bool = False) -> ObjectInfo:
        """Current metadata: a pending write-back wins, then the cache, then the store.
        ``full``: with the object's user metadata (a listing's entry is not enough)."""
        store = self.store(namespace)
        check_key(key)
        url = str(store.url.child(key))
        pending = self._pending_stat(namespace, key, url)
        if pending is not None:
            return pending
        cached = self.meta.get_stat(namespace, key, full=full)
        if isinstance(cached, Missing):
            raise ObjectNotFound(f"no such object: {key!r}", url=str(store.url.child(key)))
        if cached is not None:
            return cached
        await self._list_written_directory(namespace, key)
        if self.meta.absent(namespace, key):  # its directory's fresh listing does not show it
            raise ObjectNotFound(f"no such object: {key!r}", url=url)
        stale = self.meta.stale_stat(namespace, key)
        if stale is None and self.meta.stale_absent(namespace, key):
            stale = MISSING  # its directory's listing did not show it (a new name)
        for _ in range(FETCH_ATTEMPTS):
            # an upload finishing (or an invalidation) during the fetch may make its answer
            # stale: then it is neither cached nor trusted, and asked again
            generation = self.meta.generation
            try:
                info: ObjectInfo | Missing = await self._ask_store(
                    namespace, functools.partial(store.stat, key), fallback=stale is not None
                )
            except ObjectNotFound:
                info = MISSING
            except TransientError as exc:
                if stale is None:
                    raise
                info = self._stale(namespace, stale, exc)
                break
            pending = self._pending_stat(namespace, key, url)
            if pending is not None:
                return pending
            if self.meta.put_stat(namespace, key, info, generation):
                break
        if isinstance(info, Missing):
            raise ObjectNotFound(f"no such object: {key!r}", url=str(store.url.child(key)))
        return info

    async def _list_written_directory(self, namespace: str, key: str) -> None:
        """A name not known here, in a directory this node writes into: the directory is
        listed (again, or first: one page of up to :data:`LIST_FOR_NAMES` entries) instead of
        asking the store for this name, and the next new names, the target of a rename among
        them, are answered from it (see :meth:`MetadataCache.to_refresh`). The listing is waited
        for :data:`LIST_WAIT_S` at most, by the first name that asks for it (a store slow to
        list: names are asked for themselves meanwhile; the listing is cached when it comes)."""
        if self.writeback.pending(namespace, key) is not None:
            return
        parent = self.meta.to_refresh(namespace, key)
        first = parent is None
        if first:
            parent = self.meta.to_list(namespace, key)
        if parent is None:
            return
        ident = (namespace, parent)
        if ident in self._listing_names:
            return  # under way, and waited for once already: asked for itself meanwhile
        task = asyncio.create_task(self._list_for_names(namespace, parent, first=first))
        self._listing_names[ident] = task
        self._background.add(task)
        task.add_done_callback(self._background.discard)
        task.add_done_callback(lambda _: self._listing_names.pop(ident, None))
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(asyncio.shield(task), LIST_WAIT_S)

    async def _list_for_names(self, namespace: str, parent: str, *, first: bool) -> None:
        """The listing :meth:`_list_written_directory` waits for; never raises."""
        try:
            if not first:
                await self.listing(namespace, parent, "/", refresh=True)
                return
            generation = self.meta.generation
            page = await self._ask_store(
                namespace,
                functools.partial(
                    self.store(namespace).list_page, parent, delimiter="/", limit=LIST_FOR_NAMES
                ),
                fallback=True,
            )
        except TransientError:
            return  # the names are asked for themselves, which fails or answers stale as it may
        except StorageError:  # not allowed to list (GetObject without ListBucket), no bucket
            self.meta.too_long_to_list(namespace, parent)
            return
        if page.token is None:
            self.meta.put_listing(namespace, parent, page, "/", generation)
        else:
            self.meta.too_long_to_list(namespace, parent)

    async def stat_many(
        self, namespace: str, keys: list[str], *, full: bool = False
    ) -> dict[str, ObjectInfo | None]:
        """:meth:`stat` of several keys at once, up to :data:`STAT_AHEAD_PARALLEL` of them
        asking the store side by side (a mount's stat-ahead of a directory it lists): None for
        a key that is not there; a key whose stat failed is left out (the caller asks it
        alone, with that error)."""
        if len(keys) > STAT_MANY_MAX:
            raise ValueError(f"at most {STAT_MANY_MAX} keys in one stat request")
        self.store(namespace)  # an unknown namespace fails the request, not each key
        for key in keys:
            check_key(key)
        gate = asyncio.Semaphore(STAT_AHEAD_PARALLEL)
        answers: dict[str, ObjectInfo | None] = {}

        async def one(key: str) -> None:
            async with gate:
                try:
                    answers[key] = await self.stat(namespace, key, full=full)
                except ObjectNotFound:
                    answers[key] = None
                except OSError as exc:  # the caller asks this one again, alone
                    log.debug("stat-ahead of %s failed: %s", key, exc)

        await asyncio.gather(*(one(key) for key in dict.fromkeys(keys)))
        return answers

    async def listing(
        self, namespace: str, prefix: str, delimiter: str, *, refresh: bool = False
    ) -> ListPage:
        """``prefix``'s listing as this node sees it (see :meth:`_overlay`); ``refresh``: from
        the store even when cached."""
        store = self.store(namespace)
        check_prefix(prefix)
        page = None if refresh else self.meta.get_listing(namespace, prefix, delimiter)
        stale = None if page is not None else self.meta.stale_listing(namespace, prefix, delimiter)
        for _ in range(FETCH_ATTEMPTS if page is None else 0):
            # as in stat: a listing that an upload (or invalidation) overtook is fetched again
            generation = self.meta.generation
            objects: list[ObjectInfo] = []
            prefixes: list[str] = []
            try:
                parts = await self._ask_store(
                    namespace,
                    lambda: list(store.iter_pages(prefix, delimiter=delimiter)),
                    fallback=stale is not None,
                )
            except TransientError as exc:
                if stale is None or refresh:
                    raise
                page = self._stale(namespace, stale, exc)
                break
            for part in parts:
                objects.extend(part.objects)
                prefixes.extend(part.prefixes)
            cached = self.meta.put_listing(
                namespace, prefix, ListPage(objects, prefixes, None), delimiter, generation
            )
            if cached is not None:
                page = cached
                for info in page.objects:
                    self.meta.put_stat(namespace, info.key, info, generation, listed=True)
                break
            page = ListPage(objects, prefixes, None)
        assert page is not None
        return await self._overlay(namespace, prefix, delimiter, page)

    async def list_page(
        self,
        namespace: str,
        prefix: str,
        delimiter: str,
        *,
        after: str = "",
        limit: int = LIST_PAGE_MAX,
    ) -> ListPage:
        """One page of ``prefix``'s listing as this node sees it: at most ``limit`` names
        (object keys and sub-prefixes, in order) greater than ``after``; ``token`` is the
        ``after`` of the next page, None at the end. A directory whose whole listing is one
        store page is cached as today; a longer one is paged through the store, never held
        here whole: its pages are cached one by one, up to ``metacache.PAGES_MAX`` of them
        (bounded memory at any size), and answered past their TTL while the store is down."""
        store = self.store(namespace)
        check_prefix(prefix)
        limit = max(1, min(limit, LIST_PAGE_MAX))
        at = PageAt(prefix, delimiter, after, limit)
        cached = self.meta.get_listing(namespace, prefix, delimiter)
        if cached is not None:
            page = names_after(cached, after, limit)
        elif (hit := self.meta.get_page(namespace, at)) is not None:
            page = hit
        elif (ahead := await self._page_fetched_ahead(namespace, at)) is not None:
            page = ahead
        else:
            generation = self.meta.generation
            stale = self.meta.stale_listing(namespace, prefix, delimiter)
            stale_page = (
                None if stale is not None else self.meta.get_page(namespace, at, stale=True)
            )
            try:
                page = await self._ask_store(
                    namespace,
                    functools.partial(store_page, store, at),
                    fallback=stale is not None or stale_page is not None,
                )
            except TransientError as exc:
                if stale is not None:
                    page = names_after(self._stale(namespace, stale, exc), after, limit)
                elif stale_page is not None:
                    page = self._stale(namespace, stale_page, exc)
                else:
                    raise
            else:
                if not after and page.token is None:  # the whole listing: cached, as listing()
                    whole = self.meta.put_listing(namespace, prefix, page, delimiter, generation)
                    if whole is not None:
                        page = whole
                        for info in page.objects:
                            self.meta.put_stat(namespace, info.key, info, generation, listed=True)
                else:  # a page of a longer listing: cached as a page
                    self.meta.put_page(namespace, at, page, generation)
        if page.token is not None and cached is None:  # a long listing, read page by page
            self._fetch_page_ahead(namespace, PageAt(prefix, delimiter, page.token, limit))
        return await self._overlay(namespace, prefix, delimiter, page, after=after, upto=page.token)

    def _fetch_page_ahead(self, namespace: str, at: PageAt, depth: int = PAGES_AHEAD) -> None:
        """Start fetching the store page ``at`` (the one after a page just answered), and once
        it lands the ``depth - 1`` after it, while the reader takes in this one: a long listing
        read page by page then waits for the store once, not once a page (the store's pages
        come one after another: each one's start is the last name of the one before). At most
        one fetch per page in flight; each is cached when it lands."""
        ident = (namespace, at)
        if ident in self._pages_ahead or self.meta.has_page(namespace, at):
            return
        if len(self._pages_ahead) >= PAGES_AHEAD_MAX:
            return
        if self._down_until.get(namespace, 0.0) > time.monotonic():
            return  # the store failed moments ago: the reader gets stale pages, no fetch
        store = self.store(namespace)

        async def fetch() -> ListPage:
            generation = self.meta.generation
            # a hint: asked briefly (a reader waiting on it falls back to stale pages or its
            # own request within seconds, not after the store's whole retry deadline)
            page = await self._ask_store(
                namespace, functools.partial(store_page, store, at), fallback=True
            )
            self.meta.put_page(namespace, at, page, generation)
            if depth > 1 and page.token is not None:
                self._fetch_page_ahead(namespace, at._replace(after=page.token), depth - 1)
            return page

        task = asyncio.create_task(fetch())
        self._pages_ahead[ident] = task
        task.add_done_callback(lambda _: self._pages_ahead.pop(ident, None))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _page_fetched_ahead(self, namespace: str, at: PageAt) -> ListPage | None:
        """The page ``at`` from its fetch ahead, when one is in flight (waited for) and did not
        fail (a failure: the caller asks the store itself and reports its own error)."""
        task = self._pages_ahead.get((namespace, at))
        if task is None:
            return None
        try:
            return await asyncio.shield(task)
        except Exception as exc:
            log.debug("page fetched ahead failed (%s); asking the store again", exc)
            return None

    async def _overlay(
        self,
        namespace: str,
        prefix: str,
        delimiter: str,
        page: ListPage,
        *,
        after: str = "",
        upto: str | None = None,
    ) -> ListPage:
        """``page`` of the store's listing of ``prefix`` with the changes not yet uploaded,
        announced by other nodes or journalled here (those win): what this node sees. A page
        of a longer listing (names after ``after``, up to ``upto``) gets the changes in its
        range only."""
        changes: dict[str, ObjectInfo | None] = {
            key: a.info
            for key, a in self.announced.under(namespace, prefix).items()
            if not self.selector.is_dead(a.owner)
        }
        for p in self.writeback.pending_under(namespace, prefix):
            changes[p.key] = None if p.delete else p.info()
        if after or upto is not None:
            changes = {
                key: info
                for key, info in changes.items()
                if after < (name := listed_name(prefix, delimiter, key))
                and (upto is None or name <= upto)
            }
        if not changes:
            return page
        extra = {key: info for key, info in changes.items() if info is not None}
        gone = {key for key, info in changes.items() if info is None}
        objects = [o for o in page.objects if o.key not in extra and o.key not in gone]
        prefixes = list(page.prefixes)
        if gone:  # a prefix whose every object is deleted here is gone too
            prefixes = [p for p in prefixes if not await self._prefix_emptied(namespace, p, gone)]
        for key, info in extra.items():
            rest = key[len(prefix) :]
            if delimiter and delimiter in rest:
                sub = prefix + rest.split(delimiter, 1)[0] + delimiter
                if sub not in prefixes:
                    prefixes.append(sub)
            else:
                objects.append(info)
        return ListPage(sorted(objects, key=lambda o: o.key), sorted(prefixes), page.token)

    async def _ask_store(self, namespace: str, fetch: Callable[[], T], *, fallback: bool) -> T:
        """``fetch()`` (a metadata request to the store) on a thread. With ``fallback`` (a stale
        answer at hand): not tried while the store is held unreachable, and retried for
        seconds, not the store's whole deadline. A transient failure holds the store
        unreachable for :data:`DOWN_RECHECK_S`; a success ends that."""
        if fallback and self._down_until.get(namespace, 0.0) > time.monotonic():
            raise TransientError(f"the store of {namespace!r} failed moments ago")

        def call() -> T:
            if not fallback:
                return fetch()
            with retry_policy(STALE_FALLBACK_RETRY):
                return fetch()

        try:
            result = await asyncio.to_thread(call)
        except TransientError:
            self._down_until[namespace] = time.monotonic() + DOWN_RECHECK_S
            raise
        if self._down_until.pop(namespace, None) is not None:
            self._stale_said.discard(namespace)
            log.warning("the store of %r answers again", namespace)
        return result

    def _stale(self, namespace: str, value: S, exc: TransientError) -> S:
        """Answer with ``value``, past its TTL: the store cannot be reached (counted, and said
        once per outage)."""
        if namespace not in self._stale_said:
            self._stale_said.add(namespace)
            log.warning(
                "the store of %r is unreachable (%s): answering from cached metadata up to %.0f s "
                "past its TTL",
                namespace,
                exc,
                self.config.serve_stale,
            )
        self.meta.served_stale()
        return value

    def store_down(self) -> list[str]:
        """Namespaces whose store failed in the last :data:`DOWN_RECHECK_S`."""
        now = time.monotonic()
        return sorted(ns for ns, until in self._down_until.items() if until > now)

    async def probe(self, namespace: str, prefix: str) -> ListPage:
        """The start of ``prefix``'s listing (delimiter ``/``), enough to tell whether its
        marker is there and whether anything else is: the cached listing when there is one,
        else one store page of at most two keys (cached as the listing when it is the whole of
        it, else as a probe). Only when changes journalled here hide every key of a longer page
        is it listed whole."""
        store = self.store(namespace)
        check_prefix(prefix)
        page = self.meta.get_listing(namespace, prefix, "/") or self.meta.get_listing(
            namespace, prefix, PROBE
        )
        if page is None and self.meta.absent(namespace, prefix):
            page = ListPage([], [], None)  # its parent's fresh listing shows nothing under it
        if page is None:
            generation = self.meta.generation
            stale = self.meta.stale_listing(namespace, prefix, "/") or self.meta.stale_listing(
                namespace, prefix, PROBE
            )
            if stale is None and self.meta.stale_absent(namespace, prefix):
                stale = ListPage([], [], None)  # not in its parent's listing: nothing under it
            try:
                page = await self._ask_store(
                    namespace,
                    functools.partial(store.list_page, prefix, delimiter="/", limit=2),
                    fallback=stale is not None,
                )
            except TransientError as exc:
                if stale is None:
                    raise
                page = self._stale(namespace, stale, exc)
            else:  # the whole listing, or (a longer one's first page) a probe
                kind = "/" if page.token is None else PROBE
                page = self.meta.put_listing(namespace, prefix, page, kind, generation) or page
        seen = await self._overlay(namespace, prefix, "/", page)
        hidden = not seen.prefixes and all(o.key == prefix for o in seen.objects)
        if page.token is not None and hidden:  # what the page held is gone here: is there more?
            return await self.listing(namespace, prefix, "/")
        return seen

    async def resolve(
        self,
        namespace: str,
        key: str,
        *,
        file: bool = True,
        marker: bool = True,
        full: bool = False,
    ) -> Resolved:
        """What ``key`` names (see :class:`Resolved`): the object (``file``; with its user
        metadata when ``full``) and the probe of ``key/`` side by side, then the marker's
        user metadata when ``marker`` is asked and it exists."""
        check_key(key)
        prefix = key + "/"
        await self._list_written_directory(namespace, key)

        async def the_file() -> ObjectInfo | None:
            if not file:
                return None
            try:
                return await self.stat(namespace, key, full=full)
            except ObjectNotFound:
                return None

        found, page = await asyncio.gather(the_file(), self.probe(namespace, prefix))
        has_marker = any(o.key == prefix for o in page.objects)
        children = bool(page.prefixes) or any(o.key != prefix for o in page.objects)
        marker_info = None
        if marker and has_marker:
            try:
                marker_info = await self.stat(namespace, prefix, full=True)
            except ObjectNotFound:  # removed meanwhile
                has_marker = False
        return Resolved(found, marker_info, has_marker, children)

    async def _prefix_emptied(self, namespace: str, prefix: str, gone: set[str]) -> bool:
        """Whether only deleted keys are under ``prefix`` (an ``rmdir`` not yet in the store):
        from the cached recursive listing, else one page of the store's (no more keys than
        are deleted under it, plus one, are needed to tell)."""
        deleted = sum(1 for k in gone if k.startswith(prefix))
        if not deleted:
            return False
        page = self.meta.get_listing(namespace, prefix, "")
        if page is None:
            page = await asyncio.to_thread(
                functools.partial(self.store(namespace).list_page, prefix, limit=deleted + 1)
            )
        return all(o.key in gone for o in page.objects) and not page.prefixes and not page.token

    def full_listing_entry(self, namespace: str, info: ObjectInfo) -> tuple[ObjectInfo, bool]:
        """A listed object with its user metadata when a stat of the same version is cached."""
        if info.metadata or is_pending(info.version):
            return info, True
        full = self.meta.full_stat(namespace, info.key)
        if full is not None and full.version == info.version:
            return full, True
        return info, False

    # -- data ----------------------------------------------------------------------------------

    async def read_block(
        self, namespace: str, info: ObjectInfo, index: int, *, ask_peers: bool = True
    ) -> tuple[bytes, str]:
        if is_pending(info.version):
            pending = self.writeback.pending(namespace, info.key)
            if (
                pending is not None
                and not pending.delete
                and pending.session == pending_session(info.version)
            ):  # the same staging file (a later commit of it is what a reader sees now)
                start = index * self.blocks.block_size
                length = min(self.blocks.block_size, pending.size - start)
                if start < pending.released:  # dropped from the disk: in the store once done
                    await _wait_remote(self, namespace, info.key, STORE_WAIT_S)
                else:
                    try:
                        data = await asyncio.to_thread(self.writeback.read, pending, start, length)
                        return data, "local"
                    except FileNotFoundError:
                        pass  # uploaded (and its staging file removed) since we looked
            announced = self._announcement(namespace, info.key)
            if pending is None and announced is not None and announced.version == info.version:
                return await self._from_owner(namespace, info, index, announced.owner)
            # uploaded while a reader held it open: the same bytes now live in the store
            uploaded = self.writeback.uploaded_as(info.version)
            if uploaded is None:
                raise StaleVersion(f"{info.key!r} was replaced since it was opened")
            info = ObjectInfo(info.key, info.size, 0.0, etag=uploaded.etag)
        return await self.fetcher.get(namespace, info, index, ask_peers=ask_peers)

    async def _from_owner(
        self, namespace: str, info: ObjectInfo, index: int, owner: str
    ) -> tuple[bytes, str]:
        """A block of a version another node announced: only that node has its bytes (it
        reads its staging file, or the store once the upload landed)."""
        node = self.selector.node(owner)
        if node is None:
            self.announced.landed(namespace, info.key, owner, info.version)
            raise StaleVersion(f"{info.key!r}: its writer {owner!r} left the cluster")
        bid = self.fetcher.block_id(namespace, info, index)
        try:
            data = await self.peers.cached_block(node, bid, info.size, cached_only=False)
        except (TimeoutError, aiohttp.ClientConnectionError) as exc:  # its answers propagate
            self.selector.record_failure(owner)
            raise OSError(
                errno.EIO, f"{info.key!r} is being uploaded by {owner!r}, unreachable: {exc}"
            ) from None
        assert data is not None
        self.fetcher.count("peer", len(data))
        return data, "peer"

    def readahead(self, namespace: str, info: ObjectInfo, last_index: int) -> None:
        """Load the blocks after ``last_index`` in the background on sequential access."""
        ident = (namespace, info.key)
        previous = self._sequential.get(ident)
        self._sequential[ident] = last_index
        if len(self._sequential) > 10_000:
            self._sequential.clear()
        if previous is None or last_index <= previous or not self.config.readahead_blocks:
            return
        nblocks = -(-info.size // self.blocks.block_size)
        for index in range(
            last_index + 1, min(nblocks, last_index + 1 + self.config.readahead_blocks)
        ):
            task = asyncio.create_task(self._prefetch_quietly(namespace, info, index))
            self._background.add(task)
            task.add_done_callback(self._background.discard)

    def save_metadata(self) -> None:
        """What the metadata cache learned since the last save, to disk (see metastore)."""
        try:
            self.meta.save(self.metastore)
        except Exception as exc:  # a cache: never fails the worker
            log.warning("could not save the metadata cache: %s", exc)

    def in_background(self, what: str, func: Callable[[], Any]) -> None:
        """``func()`` on a thread, not waited for (cancelled at close; a failure is logged)."""

        async def run() -> None:
            try:
                await asyncio.to_thread(func)
            except Exception as exc:
                log.warning("%s failed: %s", what, exc)

        task = asyncio.create_task(run())
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _prefetch_quietly(self, namespace: str, info: ObjectInfo, index: int) -> None:
        try:
            await self.read_block(namespace, info, index)
        except Exception as exc:  # readahead is a hint; the real read reports errors
            log.debug("readahead of %s#%d failed: %s", info.key, index, exc)


# -- HTTP layer ------------------------------------------------------------------------------

WORKER: web.AppKey[Worker] = web.AppKey("worker", Worker)


@web.middleware
async def guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one place for authentication and error mapping."""
    try:
        if request.path not in OPEN_PATHS:
            expected = request.app[WORKER].config.token.reveal()
            given = request.headers.get(TOKEN_HEADER, "")
            if not hmac.compare_digest(given.encode(), f"Bearer {expected}".encode()):
                raise Unauthorized("missing or wrong pcache token")
        return await handler(request)
    except web.HTTPException:
        raise
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        status, body = error_body(exc)
        if status >= 500 and status != 507:
            log.warning("%s %s failed: %s", request.method, request.path, exc)
        return web.json_response(body, status=status)


def _key(request: web.Request) -> tuple[Worker, str, str]:
    worker = request.app[WORKER]
    return worker, request.match_info["ns"], check_key(request.match_info["key"])


def _float(request: web.Request, name: str) -> float | None:
    value = request.query.get(name)
    if not value:
        return None
    try:
        return float(value)
    except ValueError:
        raise ValueError(f"query parameter {name!r} must be a number") from None


def _int(request: web.Request, name: str, default: int | None = None) -> int:
    value = request.query.get(name)
    if value is None:
        if default is None:
            raise ValueError(f"missing query parameter {name!r}")
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"query parameter {name!r} must be an integer") from None


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"ok": True, "node_id": request.app[WORKER].config.node_id})


async def info(request: web.Request) -> web.Response:
    worker = request.app[WORKER]
    worker.refresh_membership()
    return web.json_response(
        {
            "node_id": worker.config.node_id,
            "address": worker.config.address,
            "weight": worker.config.weight,
            "load_factor": worker.config.load_factor,
            "block_size": worker.blocks.block_size,
            "namespaces": sorted(worker.stores),
            "backends": {name: str(store.url) for name, store in worker.stores.items()},
            "directory_markers": {
                name: store.directory_markers for name, store in worker.stores.items()
            },
            "max_metadata_bytes": {
                name: store.features.max_metadata_bytes for name, store in worker.stores.items()
            },
            "nodes": [
                {"id": n.node_id, "address": n.address, "weight": n.weight}
                # every member, dead or alive in this worker's view: clients judge health
                # themselves (a peer down here may be back by the time the client asks it)
                for n in worker.members()
            ],
            "immutable": worker.config.immutable,
            "metadata_ttl": worker.config.metadata_ttl,
            # for clients on this node: read cache hits from the disks (pcache.localcache)
            "local_cache": worker.blocks.layout(),
        }
    )


async def touch(request: web.Request) -> web.Response:
    """Hits a client on this node served itself from the cache files (pcache.localcache):
    counted, and shown to eviction, as if the worker had served them."""
    worker = request.app[WORKER]
    body = await request.json()
    found = 0
    for namespace, key, version, index, nbytes in body["blocks"]:
        if worker.blocks.touch(BlockId(namespace, check_key(key), version, int(index))):
            worker.fetcher.count("local", int(nbytes))
            found += 1
    return web.json_response({"touched": found})


async def stat(request: web.Request) -> web.Response:
    worker, namespace, key = _key(request)
    full = request.query.get("full") == "1"
    info = await worker.stat(namespace, key, full=full)
    return web.json_response(info_to_json(info, full=full or bool(info.metadata)))


async def stat_many(request: web.Request) -> web.Response:
    """``{"keys": [...], "full": bool}`` -> ``{"stats": {key: stat or null}}`` (null: not
    there; a key whose stat failed is absent)."""
    worker = request.app[WORKER]
    namespace = request.match_info["ns"]
    body = await request.json()
    keys = body.get("keys") if isinstance(body, dict) else None
    if not isinstance(keys, list) or not all(isinstance(k, str) for k in keys):
        raise ValueError("expected {'keys': [key, ...]}")
    full = body.get("full") is True
    answers = await worker.stat_many(namespace, keys, full=full)
    stats = {
        key: None if info is None else info_to_json(info, full=full or bool(info.metadata))
        for key, info in answers.items()
    }
    return web.json_response({"stats": stats})


async def resolve(request: web.Request) -> web.Response:
    worker, namespace, key = _key(request)
    query = request.query
    answer = await worker.resolve(
        namespace,
        key,
        file=query.get("file", "1") == "1",
        marker=query.get("marker", "1") == "1",
        full=query.get("full") == "1",
    )
    return web.json_response(answer.to_json())


async def listing(request: web.Request) -> web.Response:
    """``?prefix=&delimiter=``: the whole listing; with ``limit=`` (at most 1,000) one page of
    names after ``after=``, and ``token``, the ``after`` of the next page (null at the end)."""
    worker = request.app[WORKER]
    namespace = request.match_info["ns"]
    prefix = request.query.get("prefix", "")
    delimiter = request.query.get("delimiter", "")
    paged = "limit" in request.query
    if paged:
        page = await worker.list_page(
            namespace,
            prefix,
            delimiter,
            after=request.query.get("after", ""),
            limit=_int(request, "limit"),
        )
    else:
        page = await worker.listing(namespace, prefix, delimiter)
    objects = []
    for listed in page.objects:
        info, full = worker.full_listing_entry(namespace, listed)
        objects.append(info_to_json(info, full=full))
    body: dict[str, Any] = {"objects": objects, "prefixes": page.prefixes}
    if paged:
        body["token"] = page.token
    return web.json_response(body)


def _info_from_query(request: web.Request, key: str) -> ObjectInfo:
    version = request.query.get("version", "")
    if not version:
        raise ValueError("missing query parameter 'version'")
    return ObjectInfo(key, _int(request, "size"), 0.0, etag=version)


async def block(request: web.Request) -> web.Response:
    worker, namespace, key = _key(request)
    worker.store(namespace)
    info = _info_from_query(request, key)
    index = _int(request, "index")
    from_peer = request.query.get("peer") == "1"
    if request.query.get("cached_only") == "1":
        data = await worker.fetcher.cached(namespace, info, index)
        if data is None:
            raise ObjectNotFound(f"block {index} of {key!r} is not cached here")
        source = "local"
    else:
        # a peer's request is answered from here (cache or backend), never forwarded again
        # no readahead here: clients spread a file's blocks over the workers and read ahead
        # themselves; the worker reads ahead for shared-memory reads, where it is the only reader
        data, source = await worker.read_block(namespace, info, index, ask_peers=not from_peer)
    worker.metrics.served(from_peer, len(data))
    return web.Response(
        body=data,
        content_type="application/octet-stream",
        headers={SOURCE_HEADER: source, VERSION_HEADER: info.version},
    )


def _object_in(worker: Any, body: dict[str, Any]) -> tuple[str, ObjectInfo]:
    """The namespace (checked to exist) and pinned object version a JSON request names."""
    namespace = body["ns"]
    worker.store(namespace)
    return namespace, ObjectInfo(
        check_key(body["key"]), int(body["size"]), 0.0, etag=body["version"]
    )


async def prefetch(request: web.Request) -> web.Response:
    worker = request.app[WORKER]
    body = await request.json()
    namespace, info = _object_in(worker, body)
    sources: dict[str, int] = {}

    async def one(index: int) -> None:
        _, source = await worker.read_block(namespace, info, int(index))
        sources[source] = sources.get(source, 0) + 1

    await asyncio.gather(*(one(i) for i in body["indexes"]))
    return web.json_response({"blocks": len(body["indexes"]), "sources": sources})


async def shm_read(request: web.Request) -> web.Response:
    """Copy a byte range of an object into a client's shared-memory segment."""
    worker = request.app[WORKER]
    body = await request.json()
    namespace, info = _object_in(worker, body)
    offset, length = int(body["offset"]), int(body["length"])
    length = max(0, min(length, info.size - offset))
    target = worker.segments.view(body["segment"], int(body["segment_offset"]), length)
    bs = worker.blocks.block_size
    first, last = offset // bs, (offset + length - 1) // bs if length else offset // bs - 1
    sources: dict[str, int] = {}

    async def one(index: int) -> None:
        start = max(offset, index * bs)
        end = min(offset + length, (index + 1) * bs)
        dest = target[start - offset : end - offset]
        copied = None
        if not is_pending(info.version):  # pending writes are read by read_block
            copied = await asyncio.to_thread(
                worker.blocks.read_into,
                worker.fetcher.block_id(namespace, info, index),
                dest,
                start - index * bs,
            )
        if copied == len(dest):
            source = "local"
            worker.fetcher.count("local", len(dest))
        else:
            data, source = await worker.read_block(namespace, info, index)
            dest[:] = data[start - index * bs : end - index * bs]
        sources[source] = sources.get(source, 0) + 1

    try:
        await asyncio.gather(*(one(i) for i in range(first, last + 1)))
    finally:
        target.release()
    if length:
        worker.readahead(namespace, info, last)
    return web.json_response({"length": length, "sources": sources})


async def shm_release(request: web.Request) -> web.Response:
    body = await request.json()
    request.app[WORKER].segments.forget(str(body["segment"]))
    return web.json_response({"ok": True})


def _durability(value: Any) -> Durability:
    try:
        return Durability(value or Durability.LOCAL)
    except ValueError:
        raise ValueError(
            f"durable must be one of {', '.join(d.value for d in Durability)}, not {value!r}"
        ) from None


async def _wait_remote(worker: Worker, namespace: str, key: str, timeout: float | None) -> None:
    """Wait until ``key`` is in the store (or the store refused it, or ``timeout`` passed)."""
    done = await asyncio.to_thread(worker.writeback.wait_durable, namespace, key, timeout)
    if not done:
        raise TimeoutError(f"{key!r} is not in the store yet (upload still running or retrying)")


async def write_open(request: web.Request) -> web.Response:
    """A new staging file; ``path`` lets a client on this node write it itself."""
    worker, namespace, key = _key(request)
    worker.store(namespace)
    staged = await asyncio.to_thread(worker.writeback.open, namespace, key)
    return web.json_response({"session": staged.id, "path": str(staged.path)})


async def session_write(request: web.Request) -> web.Response:
    worker = request.app[WORKER]
    session = worker.writeback.session(request.match_info["id"])
    offset = _int(request, "offset")
    data = await request.read()
    await asyncio.to_thread(session.write, offset, data)
    return web.json_response({"written": len(data)})


async def session_shm(request: web.Request) -> web.Response:
    worker = request.app[WORKER]
    session = worker.writeback.session(request.match_info["id"])
    body = await request.json()
    view = worker.segments.view(body["segment"], int(body["segment_offset"]), int(body["length"]))
    try:
        await asyncio.to_thread(session.write, int(body["offset"]), view)
    finally:
        view.release()
    return web.json_response({"written": int(body["length"])})


async def session_reserve(request: web.Request) -> web.Response:
    """A direct writer about to grow its staging file: capacity first (507 when full)."""
    worker = request.app[WORKER]
    session = worker.writeback.session(request.match_info["id"])
    body = await request.json()
    progress = Progress.from_json(body.get("progress"))
    if progress is not None:
        await asyncio.to_thread(session.report, progress)
    held = await asyncio.to_thread(session.reserve, int(body["size"]))
    return web.json_response({"reserved": held})


async def session_uploaded(request: web.Request) -> web.Response:
    """How much of a direct writer's file its early upload holds (what it may drop from the
    disk when the cache is full): waits up to ``wait`` seconds for it to pass ``beyond``."""
    worker = request.app[WORKER]
    session = worker.writeback.session(request.match_info["id"])
    body = await request.json()
    eager = session.eager
    if eager is None:
        return web.json_response({"uploaded": 0})
    wait = min(float(body.get("wait", 0.0)), 60.0)
    uploaded = await asyncio.to_thread(eager.wait_uploaded, int(body.get("beyond", 0)), wait)
    return web.json_response({"uploaded": uploaded})


async def session_truncate(request: web.Request) -> web.Response:
    worker = request.app[WORKER]
    session = worker.writeback.session(request.match_info["id"])
    body = await request.json()
    await asyncio.to_thread(session.truncate, int(body["size"]))
    return web.json_response({"size": session.size})


async def session_commit(request: web.Request) -> web.Response:
    """fsync + journal (local-durable); ``durable: remote`` also waits for the store."""
    worker = request.app[WORKER]
    session = worker.writeback.session(request.match_info["id"])
    body = await request.json() if request.can_read_body else {}
    durable = _durability(body.get("durable"))
    size = body.get("size")
    metadata = body.get("metadata") or {}
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ValueError("metadata must be an object of strings")
    record = await asyncio.to_thread(
        functools.partial(
            worker.writeback.commit,
            session,
            size=None if size is None else int(size),
            metadata=metadata,
            close=bool(body.get("close", True)),
            progress=Progress.from_json(body.get("progress")),
            source=CopySource.from_json(body.get("source")),
        )
    )
    worker.meta.forget_stat(record.namespace, record.key)
    if durable is Durability.REMOTE:
        await _wait_remote(worker, record.namespace, record.key, body.get("timeout"))
        return web.json_response(info_to_json(await worker.stat(record.namespace, record.key)))
    await worker.announce([record])
    return web.json_response(info_to_json(record.info()))


async def session_abort(request: web.Request) -> web.Response:
    worker = request.app[WORKER]
    session = worker.writeback.session(request.match_info["id"])
    await asyncio.to_thread(worker.writeback.abort, session)
    return web.json_response({"aborted": session.id})


async def flush(request: web.Request) -> web.Response:
    worker, namespace, key = _key(request)
    timeout = float(request.query.get("timeout", "0")) or None
    await _wait_remote(worker, namespace, key, timeout)
    return web.json_response(info_to_json(await worker.stat(namespace, key)))


def _metadata_of(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError("metadata must be an object of strings")
    return value


async def put_object(request: web.Request) -> web.Response:
    """A small object in one request: staged, fsynced and journalled (``durable=remote``: and
    in the store)."""
    worker, namespace, key = _key(request)
    worker.store(namespace)
    durable = _durability(request.query.get("durable"))
    try:
        metadata = _metadata_of(json.loads(request.headers.get(METADATA_HEADER) or "{}"))
    except json.JSONDecodeError:
        raise ValueError(f"{METADATA_HEADER} must be a JSON object") from None
    data = await request.read()

    def stage() -> Any:
        record = worker.writeback.commit_inline(namespace, key, data, metadata)
        if record is not None:
            return record
        staged = worker.writeback.open(namespace, key)
        try:
            if data:
                staged.write(0, data)
            return worker.writeback.commit(staged, metadata=metadata)
        except BaseException:
            worker.writeback.abort(staged)
            raise

    record = await asyncio.to_thread(stage)
    worker.meta.forget_stat(namespace, key)
    if durable is Durability.REMOTE:
        await _wait_remote(worker, namespace, key, _float(request, "timeout"))
        return web.json_response(info_to_json(await worker.stat(namespace, key)))
    await worker.announce([record])
    return web.json_response(info_to_json(record.info()))


async def delete_object(request: web.Request) -> web.Response:
    """Journal the delete (gone for this node at once); ``durable=remote`` (the default for
    API clients) waits until the store has it too."""
    worker, namespace, key = _key(request)
    worker.store(namespace)
    durable = _durability(request.query.get("durable", Durability.REMOTE))
    tomb = await asyncio.to_thread(worker.writeback.delete, namespace, key)
    worker.meta.forget_stat(namespace, key)
    await asyncio.to_thread(worker.blocks.drop_object, namespace, key)
    if durable is Durability.REMOTE:
        await _wait_remote(worker, namespace, key, _float(request, "timeout"))
    else:
        await worker.announce([tomb])
    return web.json_response({"deleted": key})


async def rename_object(request: web.Request) -> web.Response:
    """``{ns, old, new, durable, noreplace}``: a pending object is re-keyed in the journal (no
    upload under the old name); one already in the store is journalled as a copy to make there
    (then the old name is deleted): either way one journal transaction, whatever the size."""
    worker = request.app[WORKER]
    body = await request.json()
    namespace = body["ns"]
    store = worker.store(namespace)
    old, new = check_key(body["old"]), check_key(body["new"])
    durable = _durability(body.get("durable"))
    if body.get("noreplace"):
        try:
            await worker.stat(namespace, new)
        except FileNotFoundError:
            pass
        else:
            raise FileExistsError(errno.EEXIST, f"{new!r} exists")
    pending = await asyncio.to_thread(worker.writeback.rename, namespace, old, new)
    if not pending:  # in the store: journalled as a copy made there later, at any size
        await worker.stat(namespace, old)  # ObjectNotFound when there is nothing, here or there
        # the stored version with its metadata, as the store reports it (the copy checks
        # the ETag; an upload's answer may spell a multipart ETag otherwise)
        info = await asyncio.to_thread(store.stat, old)
        await asyncio.to_thread(worker.writeback.move_stored, namespace, old, new, info)
        log.debug("renamed %s -> %s, to be copied in the store (%d bytes)", old, new, info.size)
    for key in (old, new):  # journalled here: laid over the cached listings, which stay
        worker.meta.forget_stat(namespace, key)
    # the old name's blocks are of its version: no later object there reads them (space only)
    worker.in_background(
        f"dropping the cached blocks of {old!r}",
        functools.partial(worker.blocks.drop_object, namespace, old),
    )
    if durable is Durability.REMOTE:
        await _wait_remote(worker, namespace, old, body.get("timeout"))
        await _wait_remote(worker, namespace, new, body.get("timeout"))
    else:
        await worker.announce(_current(worker, namespace, old, new))
    return web.json_response({"renamed": old, "to": new, "pending": pending})


def _current(worker: Worker, namespace: str, *keys: str) -> list[PendingObject]:
    """The pending records of ``keys`` journalled here (to announce)."""
    records = (worker.writeback.pending(namespace, key) for key in keys)
    return [r for r in records if r is not None]


async def set_metadata(request: web.Request) -> web.Response:
    """``{metadata, durable}``: new user metadata (chmod, chown, utimes) for a pending write
    (its record) or an object in the store (replaced in place)."""
    worker, namespace, key = _key(request)
    store = worker.store(namespace)
    body = await request.json()
    metadata = body.get("metadata")
    if not isinstance(metadata, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in metadata.items()
    ):
        raise ValueError("metadata must be an object of strings")
    if await asyncio.to_thread(worker.writeback.set_metadata, namespace, key, metadata):
        worker.meta.forget_stat(namespace, key)
        if _durability(body.get("durable")) is Durability.REMOTE:
            await _wait_remote(worker, namespace, key, body.get("timeout"))
        else:
            await worker.announce(_current(worker, namespace, key))
        return web.json_response(info_to_json(await worker.stat(namespace, key)))
    info = await asyncio.to_thread(store.replace_metadata, key, metadata)
    worker.meta.invalidate_key(namespace, key)
    worker.meta.put_stat(namespace, key, info)
    await worker.invalidate_peers({"ns": namespace, "path": key, "blocks": False})
    return web.json_response(info_to_json(info))


async def uploads(request: web.Request) -> web.Response:
    """The write-back records of this node: pending, retrying and refused ones."""
    worker = request.app[WORKER]
    records = worker.writeback.records()
    return web.json_response(
        {"node_id": worker.config.node_id, "records": [r.describe() for r in records]}
    )


async def uploads_action(request: web.Request) -> web.Response:
    """``POST /v1/uploads/{retry|discard}`` with ``{ns, key}`` (``key`` omitted: all failed)."""
    worker = request.app[WORKER]
    action = request.match_info["action"]
    body = await request.json()
    namespace = body["ns"]
    worker.store(namespace)
    keys = (
        [body["key"]]
        if body.get("key")
        else [r.key for r in worker.writeback.records() if r.namespace == namespace and r.error]
    )
    done = []
    for key in keys:
        if action == "retry":
            ok = worker.writeback.retry(namespace, key)
        elif action == "discard":
            ok = await asyncio.to_thread(worker.writeback.discard, namespace, key) is not None
            worker.meta.invalidate_key(namespace, key)
        else:
            raise ObjectNotFound(f"no upload action {action!r} (retry, discard)")
        if ok:
            done.append(key)
    if body.get("key") and not done:
        raise ObjectNotFound(f"nothing pending for {body['key']!r}")
    return web.json_response({action: done})


async def announce(request: web.Request) -> web.Response:
    """``{owner, entries: [{ns, key, version, info}]}``: changes journalled on ``owner`` (an
    ``info`` of null: deleted there), seen here until they land (see ``pcache.announce``)."""
    worker = request.app[WORKER]
    noted = worker.note_announced(await request.json())
    return web.json_response({"node_id": worker.config.node_id, "noted": noted})


async def announcements(request: web.Request) -> web.Response:
    """Every change journalled here, as :func:`announce` bodies carry them: what a restarted
    peer asks for (see :meth:`Worker.recover_announcements`)."""
    worker = request.app[WORKER]
    return web.json_response(worker.announcement(worker.writeback.records()))


async def invalidate(request: web.Request) -> web.Response:
    worker = request.app[WORKER]
    body = await request.json()
    namespace, path = body["ns"], body.get("path", "")
    worker.store(namespace)
    check_prefix(path)
    landed = body.get("landed")
    if landed:  # an upload reached the store: its announcement ends, a newer one stays
        worker.announced.landed(namespace, path, str(landed["owner"]), str(landed["version"]))
    else:
        worker.announced.forget_prefix(namespace, path)
    entries = worker.meta.invalidate(namespace, path)
    blocks = 0
    if body.get("blocks", True):
        blocks = await asyncio.to_thread(worker.blocks.drop_prefix, namespace, path)
    result: dict[str, Any] = {
        "node_id": worker.config.node_id,
        "metadata_entries": entries,
        "blocks": blocks,
    }
    if body.get("cluster"):
        result["peers"] = await worker.invalidate_peers({**body, "cluster": False})
    return web.json_response(result)


async def status(request: web.Request) -> web.Response:
    worker = request.app[WORKER]
    worker.refresh_membership()
    return web.json_response(worker.metrics.status(), dumps=lambda o: json.dumps(o, default=str))


async def metrics_endpoint(request: web.Request) -> web.Response:
    body, content_type = request.app[WORKER].metrics.render()
    response = web.Response(body=body)
    response.headers["Content-Type"] = content_type
    return response


SESSION_IDLE_S = 3600.0


async def _housekeeping(worker: Worker) -> None:
    """Once a second: pick up membership changes; now and then, reap abandoned writes."""
    ticks = 0
    while True:
        await asyncio.sleep(1.0)
        ticks += 1
        try:
            await worker.discover()
            worker.refresh_membership()
            await asyncio.to_thread(worker.save_metadata)
            if ticks % 60 == 0:
                await asyncio.to_thread(worker.writeback.reap_idle, SESSION_IDLE_S)
        except Exception as exc:  # housekeeping must never die
            log.warning("housekeeping failed: %s", exc)


def create_app(config: WorkerConfig) -> web.Application:
    """The worker's aiohttp application; its state opens and closes with the app."""
    app = web.Application(middlewares=[guard], client_max_size=MAX_BODY)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        # disk and store calls run in threads; the default pool (cores + 4) would starve fetches
        asyncio.get_running_loop().set_default_executor(
            ThreadPoolExecutor(max(64, 2 * config.fetch_concurrency), "pcache-io")
        )
        worker = await asyncio.to_thread(Worker, config)
        worker.loop = asyncio.get_running_loop()
        app[WORKER] = worker
        resumed = await asyncio.to_thread(worker.writeback.start)
        log.info(
            "worker %s serving %s on %s (%d pending upload(s) resumed)",
            config.node_id,
            ", ".join(sorted(worker.stores)),
            config.listen,
            resumed,
        )
        recovered = await worker.recover_announcements()
        if recovered:
            log.info("%d change(s) pending on other nodes", recovered)
        housekeeping = asyncio.create_task(_housekeeping(worker))
        try:
            yield
        finally:
            housekeeping.cancel()
            await asyncio.gather(housekeeping, return_exceptions=True)
            await worker.close()

    app.cleanup_ctx.append(lifecycle)
    key = "{key:.+}"
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/v1/info", info)
    app.router.add_get(f"/v1/stat/{{ns}}/{key}", stat)
    app.router.add_get("/v1/list/{ns}", listing)
    app.router.add_post("/v1/stats/{ns}", stat_many)
    app.router.add_get(f"/v1/resolve/{{ns}}/{key}", resolve)
    app.router.add_get(f"/v1/block/{{ns}}/{key}", block)
    app.router.add_post("/v1/prefetch", prefetch)
    app.router.add_post("/v1/shm/read", shm_read)
    app.router.add_post("/v1/shm/release", shm_release)
    app.router.add_post("/v1/touch", touch)
    app.router.add_post(f"/v1/write/{{ns}}/{key}", write_open)
    app.router.add_put("/v1/session/{id}", session_write)
    app.router.add_post("/v1/session/{id}/shm", session_shm)
    app.router.add_post("/v1/session/{id}/commit", session_commit)
    app.router.add_post("/v1/session/{id}/reserve", session_reserve)
    app.router.add_post("/v1/session/{id}/uploaded", session_uploaded)
    app.router.add_post("/v1/session/{id}/truncate", session_truncate)
    app.router.add_post("/v1/rename", rename_object)
    app.router.add_post(f"/v1/meta/{{ns}}/{key}", set_metadata)
    app.router.add_get("/v1/uploads", uploads)
    app.router.add_post("/v1/uploads/{action}", uploads_action)
    app.router.add_delete("/v1/session/{id}", session_abort)
    app.router.add_post(f"/v1/flush/{{ns}}/{key}", flush)
    app.router.add_delete(f"/v1/object/{{ns}}/{key}", delete_object)
    app.router.add_put(f"/v1/object/{{ns}}/{key}", put_object)
    app.router.add_post("/v1/invalidate", invalidate)
    app.router.add_post("/v1/announce", announce)
    app.router.add_get("/v1/announcements", announcements)
    app.router.add_get("/v1/status", status)
    app.router.add_get("/metrics", metrics_endpoint)
    return app


def run_worker(config: WorkerConfig) -> None:
    """Serve until SIGTERM/SIGINT; the app's cleanup closes everything in order."""
    host, _, port = config.listen.rpartition(":")
    # the event loop answers clients while upload threads move bytes: a shorter GIL switch
    # interval keeps a rename or a stat from waiting behind them (5 ms per switch by default)
    sys.setswitchinterval(0.0005)
    collector.tune()  # a listing allocates per entry while the metadata cache stays
    app = create_app(config)

    async def main() -> None:
        runner = web.AppRunner(app, access_log=None, handle_signals=False)
        await runner.setup()
        site = web.TCPSite(runner, host.strip("[]"), int(port), reuse_address=True)
        await site.start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        collector.freeze_startup_heap()  # the metadata loaded at start, the imports
        print(f"pcache worker {config.node_id} listening on {config.listen}", flush=True)
        await stop.wait()
        log.info("worker %s stopping", config.node_id)
        try:
            await asyncio.wait_for(runner.cleanup(), STOP_TIMEOUT_S)
        except TimeoutError:
            log.warning(
                "worker %s: cleanup took over %.0fs; exiting anyway", config.node_id, STOP_TIMEOUT_S
            )

    loop = asyncio.new_event_loop()
    try:
        loop.run_until_complete(main())
    finally:
        loop.close()
    # Threads still blocked on the store (a request retrying against a store that is down) must
    # not hold the exit: everything that matters is journalled and closed by now.
    logging.shutdown()
    os._exit(0)
