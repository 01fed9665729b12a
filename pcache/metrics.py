"""The worker's Prometheus metrics and its ``/v1/status`` view.

Values are read from the live objects (block store, fetcher, write-back, selector) when scraped,
through one custom collector on a per-worker registry, so several workers can share a process
(tests) and no counter is maintained twice.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from .worker import Worker


class WorkerMetrics:
    """Scrape-time export of one worker's state."""

    def __init__(self, worker: Worker) -> None:
        self._worker = worker
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(_Collector(worker, self))
        self.requests_served = {"client": 0, "peer": 0}
        self.bytes_served = {"client": 0, "peer": 0}

    def served(self, from_peer: bool, nbytes: int) -> None:
        who = "peer" if from_peer else "client"
        self.requests_served[who] += 1
        self.bytes_served[who] += nbytes

    def render(self) -> tuple[bytes, str]:
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def status(self) -> dict[str, Any]:
        w = self._worker
        fetch = w.fetcher.stats
        total = sum(fetch.hits.values()) or 1
        return {
            "node_id": w.config.node_id,
            "address": w.config.address,
            "uptime_s": round(time.time() - w.started, 1),
            "block_size": w.blocks.block_size,
            "namespaces": {name: str(store.url) for name, store in w.stores.items()},
            "disks": [
                {
                    "path": str(d.path),
                    "capacity": d.capacity,
                    "used": d.used,
                    "reserved": d.reserved,
                    "blocks": d.blocks,
                    "healthy": d.healthy,
                    "reason": d.reason,
                }
                for d in w.blocks.disks()
            ],
            "blocks": w.blocks.stats(),
            "reads": {
                "by_tier": dict(fetch.hits),
                "bytes_by_tier": dict(fetch.bytes),
                "hit_ratio_local": round(fetch.hits["local"] / total, 4),
                "coalesced": fetch.coalesced,
                "inflight": fetch.inflight,
                "uncached": fetch.uncached,
                "peer_failures": fetch.peer_failures,
            },
            "served": {"requests": dict(self.requests_served), "bytes": dict(self.bytes_served)},
            "metadata": {
                **w.meta.sizes(),
                "hits": w.meta.hits,
                "misses": w.meta.misses,
                "stale_served": w.meta.stale_served,
                "store_down": w.store_down(),
            },
            "writeback": w.writeback.backlog(),
            "peers": w.selector.snapshot(),
        }


class _Collector:
    def __init__(self, worker: Worker, metrics: WorkerMetrics) -> None:
        self._w = worker
        self._m = metrics

    def collect(self) -> Iterator[Metric]:
        w = self._w
        fetch = w.fetcher.stats
        reads = CounterMetricFamily(
            "pcache_block_reads", "Blocks read, by the tier that had them", labels=["tier"]
        )
        read_bytes = CounterMetricFamily(
            "pcache_read_bytes", "Bytes read, by source tier", labels=["tier"]
        )
        for tier, count in fetch.hits.items():
            reads.add_metric([tier], count)
            read_bytes.add_metric([tier], fetch.bytes[tier])
        yield reads
        yield read_bytes
        served = CounterMetricFamily(
            "pcache_served_requests", "Block requests answered, by requester", labels=["requester"]
        )
        served_bytes = CounterMetricFamily(
            "pcache_served_bytes", "Bytes answered, by requester", labels=["requester"]
        )
        for who, count in self._m.requests_served.items():
            served.add_metric([who], count)
            served_bytes.add_metric([who], self._m.bytes_served[who])
        yield served
        yield served_bytes
        stats = w.blocks.stats()
        for name, help_text in (
            ("evictions", "Blocks evicted to make room"),
            ("corrupt", "Blocks dropped because their CRC32C or header did not match"),
            ("inserts", "Blocks inserted into the cache"),
            ("disk_errors", "I/O errors on cache disks"),
        ):
            yield CounterMetricFamily(f"pcache_cache_{name}", help_text, value=stats.get(name, 0))
        used = GaugeMetricFamily(
            "pcache_disk_used_bytes", "Bytes used per cache dir", labels=["dir"]
        )
        cap = GaugeMetricFamily(
            "pcache_disk_capacity_bytes", "Configured capacity per cache dir", labels=["dir"]
        )
        healthy = GaugeMetricFamily(
            "pcache_disk_healthy", "1 if the cache dir is in service", labels=["dir"]
        )
        for d in w.blocks.disks():
            used.add_metric([str(d.path)], d.used)
            cap.add_metric([str(d.path)], d.capacity)
            healthy.add_metric([str(d.path)], 1 if d.healthy else 0)
        yield used
        yield cap
        yield healthy
        yield GaugeMetricFamily(
            "pcache_cache_blocks", "Blocks in the cache", value=stats.get("blocks", 0)
        )
        yield GaugeMetricFamily(
            "pcache_fetch_inflight", "Block fetches in flight (queue depth)", value=fetch.inflight
        )
        yield CounterMetricFamily(
            "pcache_fetch_coalesced",
            "Reads that joined a fetch already in flight",
            value=fetch.coalesced,
        )
        backlog = w.writeback.backlog()
        yield GaugeMetricFamily(
            "pcache_upload_backlog_objects",
            "Written objects not yet uploaded",
            value=backlog["objects"],
        )
        yield GaugeMetricFamily(
            "pcache_upload_backlog_bytes", "Written bytes not yet uploaded", value=backlog["bytes"]
        )
        yield CounterMetricFamily(
            "pcache_uploaded_bytes",
            "Bytes uploaded by write-back",
            value=w.writeback.uploaded_bytes,
        )
        yield CounterMetricFamily(
            "pcache_upload_copied_bytes",
            "Bytes of uploads made inside the store from unchanged ranges (UploadPartCopy)",
            value=w.writeback.copied_bytes,
        )
        yield GaugeMetricFamily(
            "pcache_upload_failing_objects",
            "Write-back records whose last upload failed (retrying or refused)",
            value=backlog["failed"],
        )
        yield GaugeMetricFamily(
            "pcache_upload_refused_objects",
            "Write-back records the store refused for good (kept until retried or discarded)",
            value=backlog["failed_permanently"],
        )
        inflight = GaugeMetricFamily(
            "pcache_peer_inflight",
            "Requests in flight to each worker from this worker",
            labels=["node", "state"],
        )
        for peer in w.selector.snapshot():
            inflight.add_metric([peer["id"], peer["state"]], peer["inflight"])
        yield inflight
        yield CounterMetricFamily(
            "pcache_metadata_stale_answers",
            "Stats and listings answered past their TTL while the store could not be reached",
            value=w.meta.stale_served,
        )
        down = GaugeMetricFamily(
            "pcache_store_down",
            "1 while a namespace's store failed its last metadata request (held for seconds)",
            labels=["namespace"],
        )
        unreachable = set(w.store_down())
        for namespace in w.stores:
            down.add_metric([namespace], float(namespace in unreachable))
        yield down
        yield GaugeMetricFamily(
            "pcache_backend_latency_seconds",
            "Latency of the last backing-store block fetch",
            value=w.fetcher.latency["backend"],
        )
