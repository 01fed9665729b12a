"""The worker's read path for one block: local cache, then a peer, then the backing store.

Concurrent misses of the same block share one fetch (:class:`BlockFetcher` keeps a future per
block in flight). A block fetched from a peer or the backing store is inserted into the local
cache; when the cache has no room (everything pinned, disks out of service) the block is still
served, just not kept. A block shorter than the object's size implies means the object changed
under us: :class:`~pcache.protocol.StaleVersion`, never a short read passed off as data.

Runs on the worker's event loop; disk and store calls go to threads.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

import aiohttp

from objstore.base import ObjectInfo, Store
from objstore.errors import PreconditionFailed

from .blockstore import BlockId, BlockStore, NoSpace
from .protocol import TOKEN_HEADER, StaleVersion, block_key, error_from_response
from .selection import Node, WorkerSelector

log = logging.getLogger(__name__)

TIERS = ("local", "peer", "backend")
PEER_STALL_S = 2.0


@dataclass
class FetchStats:
    """Counters the metrics endpoint exports."""

    hits: dict[str, int]
    bytes: dict[str, int]
    inflight: int = 0
    coalesced: int = 0
    peer_failures: int = 0
    uncached: int = 0

    @classmethod
    def new(cls) -> FetchStats:
        return cls({t: 0 for t in TIERS}, {t: 0 for t in TIERS})


class PeerClient:
    """Block requests to other workers, with the cluster token."""

    def __init__(self, token: str, timeout: float) -> None:
        self._headers = {TOKEN_HEADER: f"Bearer {token}"}
        self._timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=min(timeout, 3.0))
        # a cache probe is only worth it when quicker than the backing store: a peer that
        # stalls (hung, overloaded) is given up on after PEER_STALL_S without a byte
        self._probe_timeout = aiohttp.ClientTimeout(
            total=timeout, sock_connect=min(timeout, 3.0), sock_read=min(timeout, PEER_STALL_S)
        )
        self._session: aiohttp.ClientSession | None = None

    def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                headers=self._headers,
                timeout=self._timeout,
                connector=aiohttp.TCPConnector(limit=256, limit_per_host=64),
            )
        return self._session

    async def cached_block(
        self, node: Node, bid: BlockId, size: int, *, cached_only: bool
    ) -> bytes | None:
        """The block from ``node``'s cache (None: not cached there, when ``cached_only``)."""
        url = f"{node.address}/v1/block/{quote(bid.namespace)}/{quote(bid.key)}"
        params = {
            "version": bid.version,
            "index": str(bid.index),
            "size": str(size),
            "peer": "1",
        }
        timeout = self._timeout
        if cached_only:
            params["cached_only"] = "1"
            timeout = self._probe_timeout
        async with self._client().get(url, params=params, timeout=timeout) as response:
            if response.status == 200:
                return await response.read()
            if response.status == 404 and cached_only:
                return None
            try:
                body: Any = await response.json()
            except (aiohttp.ContentTypeError, ValueError):
                body = None
            raise error_from_response(response.status, body, url)

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


class BlockFetcher:
    """Reads blocks for the worker: local cache, owner peer, backing store; coalesced.

    Args:
        blocks: the local block store.
        stores: namespace -> backing store.
        selector: the cluster view (candidates per block).
        node_id: this worker's id (never asked as a peer).
        peers: the peer client.
    """

    def __init__(
        self,
        blocks: BlockStore,
        stores: Mapping[str, Store],
        selector: WorkerSelector,
        node_id: str,
        peers: PeerClient,
        *,
        fetch_concurrency: int = 32,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.blocks = blocks
        self.stores = stores
        self.selector = selector
        self.node_id = node_id
        self.peers = peers
        self.block_size = blocks.block_size
        self.stats = FetchStats.new()
        self._inflight: dict[BlockId, asyncio.Future[tuple[bytes, str]]] = {}
        self._limit = asyncio.Semaphore(fetch_concurrency)
        self._clock = clock
        self.latency: dict[str, float] = {t: 0.0 for t in TIERS}

    def block_id(self, namespace: str, info: ObjectInfo, index: int) -> BlockId:
        return BlockId(namespace, info.key, info.version, index)

    def block_length(self, info: ObjectInfo, index: int) -> int:
        """Bytes in block ``index`` of the object (an empty object has one empty block)."""
        start = index * self.block_size
        if index < 0 or (start >= info.size and index > 0):
            raise ValueError(f"block {index} is past the end of {info.key!r} ({info.size} bytes)")
        return min(self.block_size, info.size - start)

    async def get(
        self, namespace: str, info: ObjectInfo, index: int, *, ask_peers: bool = True
    ) -> tuple[bytes, str]:
        """The block's bytes and where they came from (``local``, ``peer``, ``backend``)."""
        bid = self.block_id(namespace, info, index)
        length = self.block_length(info, index)
        data = await asyncio.to_thread(self.blocks.get, bid)
        if data is not None and len(data) == length:
            self.count("local", len(data))
            return data, "local"
        pending = self._inflight.get(bid)
        if pending is not None:
            self.stats.coalesced += 1
            return await asyncio.shield(pending)
        future: asyncio.Future[tuple[bytes, str]] = asyncio.get_running_loop().create_future()
        self._inflight[bid] = future
        self.stats.inflight += 1
        try:
            result = await self._fetch(namespace, info, bid, length, ask_peers)
            future.set_result(result)
            return result
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when nobody waits
            raise
        finally:
            self.stats.inflight -= 1
            del self._inflight[bid]

    async def cached(self, namespace: str, info: ObjectInfo, index: int) -> bytes | None:
        """The block if this worker has it (for peers asking ``cached_only``)."""
        data = await asyncio.to_thread(self.blocks.get, self.block_id(namespace, info, index))
        if data is not None:
            self.count("local", len(data))
        return data

    async def _fetch(
        self, namespace: str, info: ObjectInfo, bid: BlockId, length: int, ask_peers: bool
    ) -> tuple[bytes, str]:
        async with self._limit:
            data = await self._from_peers(bid, info, length) if ask_peers else None
            source = "peer"
            if data is None:
                data = await self._from_backend(namespace, info, bid, length)
                source = "backend"
            self.count(source, len(data))
        try:
            await asyncio.to_thread(self.blocks.put, bid, data)
        except NoSpace as exc:
            self.stats.uncached += 1
            log.debug("block served without caching: %s", exc)
        except OSError as exc:
            self.stats.uncached += 1
            log.warning("could not cache block %s#%d: %s", bid.key, bid.index, exc)
        return data, source

    async def _from_peers(self, bid: BlockId, info: ObjectInfo, length: int) -> bytes | None:
        """Ask the block's top candidates (other than us) whether they have it cached."""
        for node in self.selector.candidates(block_key(bid.namespace, bid.key, bid.index), limit=2):
            if node.node_id == self.node_id:
                continue
            started = self._clock()
            try:
                data = await self.peers.cached_block(node, bid, info.size, cached_only=True)
            except (TimeoutError, aiohttp.ClientError, OSError) as exc:
                self.stats.peer_failures += 1
                self.selector.record_failure(node.node_id)
                log.info("peer %s failed for %s#%d: %s", node.node_id, bid.key, bid.index, exc)
                continue
            self.selector.record_success(node.node_id, self._clock() - started)
            if data is not None and len(data) == length:
                return data
        return None

    async def _from_backend(
        self, namespace: str, info: ObjectInfo, bid: BlockId, length: int
    ) -> bytes:
        store = self.stores[namespace]
        if_match = info.etag if info.etag and store.features.conditional_get else None
        started = self._clock()
        try:
            data = await asyncio.to_thread(
                store.get_range, info.key, bid.index * self.block_size, length, if_match=if_match
            )
        except PreconditionFailed as exc:
            raise StaleVersion(f"{info.key!r} changed while being read", url=exc.url) from exc
        self.latency["backend"] = self._clock() - started
        if len(data) != length:
            raise StaleVersion(
                f"{info.key!r} changed while being read (block {bid.index}: "
                f"{len(data)} bytes, expected {length})"
            )
        return data

    def count(self, tier: str, nbytes: int) -> None:
        """Count a block served from ``tier`` (also for reads the worker serves itself)."""
        self.stats.hits[tier] += 1
        self.stats.bytes[tier] += nbytes
