"""Scale-out on Ray: a job's listing requests and transfers as Ray tasks across a Ray cluster.

``babel-sync sync SRC DST --engine ray --ray-address HOST:PORT`` keeps the journal and the
decisions on the driver (the process that runs the job) and sends the requests out. Listing: the
local engine's parallel lister (range splitting, work stealing, resumable cursors) runs
unchanged on the driver over :class:`RayListingStore`, whose every page request is a Ray task
(:func:`list_page`) on some worker of the cluster. Transfers go out in batches: each Ray task
opens the two stores and runs the local engine's own per-object code
(:meth:`SyncJob._do_item`: copy, verify, copy again on a mismatch) on its batch; there is no
second implementation of a copy. A task works against :class:`ItemJournal`, an in-memory slice
of the journal seeded with what the driver knows of its objects; it returns the states it ended
with, its counters, failures, mismatches and verification figures, and the driver writes the
states into the real journal, which stays the single source of truth: a rerun (or a retried
task) skips what the journal says is done, and a batch whose worker dies is retried by Ray.

A cluster-wide bandwidth limit is one :class:`RateLimiter` actor (a token bucket) that every
task's transfers draw from. Store profiles, credentials included, travel to the workers with the
tasks (inside the cluster only; they are never logged).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from .journal import Journal, ObjectState
from .plan import Action, PlanItem
from .progress import Counters
from .throttle import Bandwidth, MemoryBudget

if TYPE_CHECKING:
    from .engine import SyncJob

log = logging.getLogger(__name__)

BATCH_OBJECTS = 64
BATCH_BYTES = 256 * 1024 * 1024
TASK_TRANSFERS = 4  # objects (and parts) in flight inside one task
TASKS_PER_CPU = 4  # batches running at once per cluster CPU
IN_FLIGHT_PER_CPU = 2 * TASKS_PER_CPU  # batches submitted per cluster CPU


_stores: dict[tuple[str, bytes], Any] = {}


def _store(url: str, config: Any) -> Any:
    """An open store per (URL, config) in this worker process, reused across tasks."""
    import pickle

    from objstore import open_store
    from objstore.s3 import S3Store

    S3Store.lazy_client = True  # the lean data path serves transfers; boto3 only if needed

    key = (url, pickle.dumps(config))
    store = _stores.get(key)
    if store is None:
        store = _stores[key] = open_store(url, config)
    return store


def list_page(url: str, config: Any, prefix: str, kwargs: dict[str, Any]) -> Any:
    """One Ray task: one page of a listing (the lister's unit of work)."""
    return _store(url, config).list_page(prefix, **kwargs)


class RayListingStore:
    """A store whose ``list_page`` runs as a Ray task; everything else is the local store's."""

    def __init__(self, store: Any, url: str, config: Any, ray: Any) -> None:
        self._store, self._url, self._config = store, url, config
        self._ray = ray
        self._task = ray.remote(max_retries=3)(list_page)
        self.pages = 0

    def list_page(self, prefix: str = "", **kwargs: Any) -> Any:
        self.pages += 1
        return self._ray.get(self._task.remote(self._url, self._config, prefix, kwargs))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)


class ItemJournal:
    """The part of :class:`~babel_sync.journal.Journal` one object's copy uses, in memory.

    Seeded with the driver's states for the batch's keys; ``touched`` are the keys whose state
    the task changed, for the driver to write back.
    """

    def __init__(self, states: dict[str, ObjectState | None]) -> None:
        self._states = {k: v for k, v in states.items() if v is not None}
        self.touched: set[str] = set()
        self.multipart = False

    def get_object(self, key: str) -> ObjectState | None:
        state = self._states.get(key)
        return None if state is None else copy.deepcopy(state)

    def put_object(self, key: str, state: ObjectState) -> None:
        self._states[key] = copy.deepcopy(state)
        self.touched.add(key)

    def record_part(self, key: str, part_number: int, etag: str, size: int, crc: int) -> None:
        state = self._states.get(key)
        if state is not None:
            state.parts[part_number] = (etag, size, crc)
            self.touched.add(key)

    def note_multipart(self) -> None:
        self.multipart = True

    def changes(self) -> dict[str, ObjectState]:
        return {k: self._states[k] for k in self.touched if k in self._states}


class RateLimiter:
    """A cluster-wide token bucket (run as one Ray actor): ``acquire`` returns how long the
    caller must wait before sending ``nbytes``."""

    def __init__(self, rate: float) -> None:
        self.bucket = Bandwidth(rate)
        self.granted = 0

    def acquire(self, nbytes: int) -> float:
        self.granted += max(0, nbytes)
        return self.bucket.reserve(nbytes)

    def total(self) -> int:
        return self.granted


class _ClusterBandwidth(Bandwidth):
    """What a task's Transferer draws bandwidth from: the cluster's RateLimiter actor."""

    def __init__(self, limiter: Any) -> None:
        super().__init__(None)
        self.limiter = limiter

    def consume(self, nbytes: int) -> None:
        import ray

        if nbytes > 0:
            wait = ray.get(self.limiter.acquire.remote(nbytes))
            if wait > 0:
                time.sleep(wait)


@dataclass
class BatchResult:
    states: dict[str, ObjectState]
    counters: dict[str, int]
    failures: list[dict[str, str]]
    mismatches: list[dict[str, Any]]
    verify_stats: dict[str, int]
    multipart: bool
    node: str


COUNTED = ("copied", "copied_bytes", "bytes_moved", "skipped", "deleted", "failed", "verified",
           "mismatches", "resumed_parts", "server_side", "checked", "to_copy", "to_copy_bytes")  # fmt: skip


def run_batch(
    source: str,
    destination: str,
    options: Any,
    config: Any,
    seed: int,
    items: list[PlanItem],
    states: dict[str, ObjectState | None],
    limiter: Any = None,
) -> BatchResult:
    """One Ray task: the local engine's per-object code over ``items``."""
    from .engine import SyncJob
    from .transfer import Transferer

    task_options = replace(options, transfers=min(options.transfers, TASK_TRANSFERS),
                           sample_seed=seed, journal_dir=None)  # fmt: skip
    counters = Counters()
    stores = (_store(source, config), _store(destination, config))
    job = SyncJob(
        source, destination, task_options, config=config, counters=counters, stores=stores
    )
    journal = ItemJournal(states)
    bandwidth = _ClusterBandwidth(limiter) if limiter is not None else Bandwidth(None)
    with ThreadPoolExecutor(TASK_TRANSFERS, thread_name_prefix="part") as parts, \
            ThreadPoolExecutor(TASK_TRANSFERS, thread_name_prefix="object") as objects:  # fmt: skip
        transferer = Transferer(
            job.src, job.dst, journal,  # type: ignore[arg-type]  # the slice it uses
            part_pool=parts, options=task_options.transfer, bandwidth=bandwidth,
            budget=MemoryBudget(task_options.max_memory // 4),
            on_bytes=lambda n: counters.add(bytes_moved=n),
        )  # fmt: skip
        list(objects.map(lambda it: job._do_item(transferer, journal, it), items))  # type: ignore[arg-type]
    snap = counters.snapshot()
    return BatchResult(
        journal.changes(),
        {k: int(snap[k]) for k in COUNTED},
        job._failures,
        job._mismatches,
        job._verify_stats,
        journal.multipart,
        os.uname().nodename + f"/{os.getpid()}",
    )


def batches(items: Iterator[PlanItem]) -> Iterator[list[PlanItem]]:
    batch: list[PlanItem] = []
    size = 0
    for item in items:
        if item.action is Action.SKIP:
            continue
        batch.append(item)
        size += item.src.size if item.src is not None else 0
        if len(batch) >= BATCH_OBJECTS or size >= BATCH_BYTES:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


class RayExecutor:
    """Runs a :class:`SyncJob`'s planned items as Ray tasks; merges what they return."""

    def __init__(self, job: SyncJob, address: str) -> None:
        import ray

        self.job = job
        if not ray.is_initialized():
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
        self.ray = ray
        self.address = address
        self.listers: list[RayListingStore] = []
        # transfers wait on the network, not a CPU: TASKS_PER_CPU batches share one
        self.task = ray.remote(num_cpus=1 / TASKS_PER_CPU, max_retries=3, retry_exceptions=False)(
            run_batch
        )
        rate = job.options.bwlimit
        self.limiter: Any = ray.remote(RateLimiter).remote(rate) if rate else None
        self.nodes: dict[str, int] = {}

    def listing_store(self, side: str) -> RayListingStore:
        job = self.job
        if side == "src":
            store = RayListingStore(job.src, job.source, job.config, self.ray)
        else:
            store = RayListingStore(job.dst, job.destination, job.config, self.ray)
        self.listers.append(store)
        return store

    def describe(self) -> dict[str, Any]:
        return {"name": "ray", "address": self.address,
                "cluster_cpus": int(self.ray.cluster_resources().get("CPU", 0)),
                "listing_tasks": sum(s.pages for s in self.listers),
                "rate_limited_bytes": (
                    int(self.ray.get(self.limiter.total.remote())) if self.limiter else None
                ),
                "objects_by_worker": dict(sorted(self.nodes.items()))}  # fmt: skip

    def run(self, journal: Journal, items: Callable[[], Iterator[PlanItem]]) -> None:
        ray, job = self.ray, self.job
        cpus = int(ray.cluster_resources().get("CPU", 1))
        window = max(2, cpus * IN_FLIGHT_PER_CPU)
        pending: dict[Any, list[PlanItem]] = {}
        config = job.config
        for batch in batches(items()):
            if any(it.src is not None and it.src.size > job.options.transfer.multipart_threshold
                   for it in batch):  # fmt: skip
                journal.note_multipart()  # before any task can begin an upload
            states = {it.key: journal.get_object(it.key) for it in batch}
            ref = self.task.remote(job.source, job.destination, job.options, config,
                                   job._seed, batch, states, self.limiter)  # fmt: skip
            pending[ref] = batch
            while len(pending) >= window:
                self._collect(journal, pending, wait_for=1)
        while pending:
            self._collect(journal, pending, wait_for=1)

    def _collect(self, journal: Journal, pending: dict[Any, list[PlanItem]], wait_for: int) -> None:
        ready, _ = self.ray.wait(list(pending), num_returns=wait_for)
        for ref in ready:
            batch = pending.pop(ref)
            try:
                result: BatchResult = self.ray.get(ref)
            except Exception as exc:  # the batch could not run (retries used up)
                for item in batch:
                    self.job._fail(item.key, f"ray task failed: {exc}")
                continue
            for key, state in result.states.items():
                journal.put_object(key, state)
            self.job.counters.add(**{k: v for k, v in result.counters.items() if v})
            with self.job._lock:
                self.job._failures.extend(result.failures)
                self.job._mismatches.extend(result.mismatches)
                for k, v in result.verify_stats.items():
                    self.job._verify_stats[k] = self.job._verify_stats.get(k, 0) + v
            self.nodes[result.node] = self.nodes.get(result.node, 0) + len(batch)
