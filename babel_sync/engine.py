"""A sync job from start to end: list both sides, plan, transfer, verify, clean up.

Phases and what survives a crash (everything lives in the job's LMDB journal):

1. **list** source and destination in parallel (:mod:`babel_sync.listing`) into sorted manifests;
   unfinished listing ranges keep their cursors, finished sides are marked and not re-listed.
2. **plan** by merge-joining the manifests (:mod:`babel_sync.plan`); ``--dry-run`` stops here and
   writes the plan as JSON lines; ``--delete`` is refused beyond ``--max-delete``.
3. **transfer** with a pool of object workers and a pool of part workers
   (:mod:`babel_sync.transfer`); objects the journal marks done for the same source version are
   not copied again, open multipart uploads resume from their completed parts.
4. **verify** what was copied (:mod:`babel_sync.verify`): sampled for multipart objects (small
   objects are fully checked by the runtime CRC), or full; a mismatch is retried once from the
   source, then reported.
5. **clean up** multipart uploads this job left behind, and mark the journal complete (the next
   run of the same command is a fresh sync that skips what is already there).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from objstore import (
    BucketNotFound,
    ChecksumValue,
    Config,
    ObjectInfo,
    ObjectNotFound,
    StorageError,
    Store,
    open_store,
)
from objstore.cli import CommandError, ExitCode

from . import verify
from .filters import KeyFilter
from .journal import Journal
from .listing import ParallelLister
from .plan import Action, PlanItem, plan, resolve_check
from .progress import Counters
from .throttle import Bandwidth, MemoryBudget
from .transfer import CopyResult, IntegrityError, Transferer, TransferOptions

log = logging.getLogger(__name__)

VERIFY_MODES = ("none", "runtime", "sample", "full")


@dataclass(frozen=True)
class SyncOptions:
    """What a job does; mirrors the CLI options.

    Attributes:
        mode: ``sync`` (mirror), ``copy`` (never delete) or ``check`` (compare only).
        delete: delete destination keys missing at the source (``sync`` only).
        max_delete: refuse to delete more than this many objects (``None``: no limit).
        key_filter: include/exclude rules, applied to both sides.
        dry_run: plan only, write the plan as JSON lines.
        transfers: objects copied at once (and parts in flight).
        list_workers: parallel listing workers per side.
        transfer: part sizing.
        bwlimit: bytes per second across the job, or ``None``.
        verify: ``none``, ``runtime``, ``sample`` (runtime + sampled) or ``full``.
        sample_blocks: random blocks per object in sampled verification.
        sample_seed: RNG seed for sampling (``None``: random, reported).
        compare: ``checksum`` (the full ladder) or ``size``.
        max_memory: transfer buffers in flight across the job.
        journal_dir: where the job's journal lives (default: under ~/.cache/babel-sync).
        engine: ``local`` (threads in this process) or ``ray`` (transfers as Ray tasks on the
            cluster at ``ray_address``; see :mod:`babel_sync.ray_engine`).
    """

    mode: str = "sync"
    delete: bool = False
    max_delete: int | None = None
    key_filter: KeyFilter = field(default_factory=KeyFilter)
    dry_run: bool = False
    transfers: int = 16
    list_workers: int = 64
    transfer: TransferOptions = field(default_factory=TransferOptions)
    bwlimit: float | None = None
    verify: str = "sample"
    sample_blocks: int = 16
    sample_seed: int | None = None
    compare: str = "checksum"
    max_memory: int = 1 << 30
    journal_dir: Path | None = None
    engine: str = "local"
    ray_address: str | None = None


@dataclass
class SyncReport:
    """The outcome, as the CLI prints it (``--json``) and maps to an exit code."""

    source: str
    destination: str
    counters: dict[str, Any]
    failures: list[dict[str, str]] = field(default_factory=list)
    mismatches: list[dict[str, Any]] = field(default_factory=list)
    verification: dict[str, Any] = field(default_factory=dict)
    journal: str = ""
    seconds: float = 0.0
    engine: dict[str, Any] = field(default_factory=lambda: {"name": "local"})

    @property
    def exit_code(self) -> ExitCode:
        if self.mismatches:
            return ExitCode.VERIFY
        if self.failures:
            return ExitCode.FAILED
        return ExitCode.OK

    def to_json(self) -> dict[str, Any]:
        counters = {k: v for k, v in self.counters.items() if k != "started"}
        return {
            "source": self.source,
            "destination": self.destination,
            "counters": counters,
            "failures": self.failures,
            "mismatches": self.mismatches,
            "verification": self.verification,
            "journal": self.journal,
            "seconds": round(self.seconds, 3),
            "exit_code": int(self.exit_code),
            "engine": self.engine,
        }


def default_journal_dir(identity: dict[str, Any]) -> Path:
    base = Path(os.environ.get("BABEL_SYNC_HOME", Path.home() / ".cache" / "babel-sync"))
    digest = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:16]
    return base / "jobs" / digest


class SyncJob:
    """One run of ``sync``/``copy``/``check`` between two store URLs."""

    def __init__(
        self,
        source: str,
        destination: str,
        options: SyncOptions,
        *,
        config: Config | None = None,
        counters: Counters | None = None,
        plan_out: TextIO | None = None,
        stores: tuple[Store, Store] | None = None,
    ) -> None:
        if options.verify not in VERIFY_MODES:
            raise CommandError(f"--verify must be one of {', '.join(VERIFY_MODES)}", ExitCode.USAGE)
        if options.engine not in ("local", "ray"):
            raise CommandError("--engine must be local or ray", ExitCode.USAGE)
        self.options = options
        self.source, self.destination, self.config = source, destination, config
        self._ray: Any = None  # the RayExecutor of an --engine ray job
        # ``stores``: already open ones (a Ray worker reuses its stores across tasks)
        self.src: Store = stores[0] if stores else open_store(source, config)
        self.dst: Store = stores[1] if stores else open_store(destination, config)
        self.counters = counters or Counters()
        self.plan_out = plan_out
        self.identity = {
            "source": str(self.src.url),
            "destination": str(self.dst.url),
            "mode": options.mode,
            "filters": options.key_filter.describe(),
            "compare": options.compare,
        }
        self.journal_dir = options.journal_dir or default_journal_dir(self.identity)
        self._failures: list[dict[str, str]] = []
        self._mismatches: list[dict[str, Any]] = []
        self._verify_stats = {"sampled": 0, "full": 0, "bytes_read": 0, "retried": 0}
        self._lock = threading.Lock()
        self._seed = (
            options.sample_seed
            if options.sample_seed is not None
            else int.from_bytes(os.urandom(4), "big")
        )

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> SyncReport:
        started = time.monotonic()
        if self.options.engine == "ray" and self._ray is None:
            from .ray_engine import RayExecutor

            self._ray = RayExecutor(self, self.options.ray_address or "auto")
        self.src.check_root()
        dst_exists = self._destination_exists()
        with Journal(self.journal_dir, self.identity) as journal:
            if journal.complete:
                journal.reset()
            self._list(journal, "src", self.src)
            if dst_exists:
                self._list(journal, "dst", self.dst)
            else:
                journal.set_meta("dst_listed", True)
            items = self._planned(journal)
            if self.options.dry_run:
                self._write_plan(items)
            elif self.options.mode == "check":
                self._check(journal, items)
            else:
                self._execute(journal, items)
                self._clean_orphans(journal)
            if not self.options.dry_run and not self._failures:
                journal.set_meta("complete", True)
        self.counters.phase = "done"
        return SyncReport(
            str(self.src.url),
            str(self.dst.url),
            self.counters.snapshot(),
            self._failures,
            self._mismatches,
            {
                **self._verify_stats,
                "mode": self.options.verify,
                "seed": self._seed,
                "sample_blocks": self.options.sample_blocks,
                "detection_1pct": verify.detection_probability(0.01, self.options.sample_blocks),
                "detection_10pct": verify.detection_probability(0.10, self.options.sample_blocks),
            },
            str(self.journal_dir),
            time.monotonic() - started,
            self._ray.describe() if self._ray is not None else {"name": "local"},
        )

    def _destination_exists(self) -> bool:
        try:
            self.dst.check_root()
        except BucketNotFound:
            if self.dst.url.scheme == "file" and self.options.mode != "check":
                return False  # a local destination directory is created on the first write
            raise
        return True

    # -- listing ---------------------------------------------------------------------------

    def _list(self, journal: Journal, side: str, store: Store) -> None:
        if journal.get_meta(f"{side}_listed"):
            return
        self.counters.phase = "listing"
        state = journal.listing_state(side)
        if not state.pending():
            journal.clear_manifest(side)
        writer = journal.manifest_writer(side)
        counter = "src_listed" if side == "src" else "dst_listed"
        accept = self.options.key_filter

        def on_objects(infos: list[ObjectInfo]) -> None:
            kept = [i for i in infos if accept(i.key)] if accept else infos
            writer.add(kept)
            if side == "src":
                self.counters.add(src_listed=len(kept), src_listed_bytes=sum(i.size for i in kept))
            else:
                self.counters.add(dst_listed=len(kept))

        if self._ray is not None:  # every page request a Ray task; the scheduler stays here
            store = self._ray.listing_store(side)  # type: ignore[assignment]
        lister = ParallelLister(
            store, workers=self.options.list_workers, on_objects=on_objects, state=state
        )
        lister.run("")
        writer.flush()
        journal.set_meta(f"{side}_listed", True)
        log.info("listed %s: %d objects", counter, writer.count)

    # -- plan --------------------------------------------------------------------------------

    def _planned(self, journal: Journal) -> Callable[[], Iterator[PlanItem]]:
        delete = self.options.mode == "sync" and self.options.delete

        def items() -> Iterator[PlanItem]:
            return plan(
                journal.iter_manifest("src"),
                journal.iter_manifest("dst"),
                delete=delete,
                mode=self.options.compare,
            )

        # One cheap pass over the local manifests: totals for progress and ETA, and the
        # --max-delete guard, before anything is changed.
        deletes = 0
        for item in items():
            self._count_planned(item)
            deletes += item.action is Action.DELETE
        limit = self.options.max_delete
        if delete and limit is not None and deletes > limit:
            raise CommandError(
                f"refusing to delete {deletes} objects at the destination (--max-delete {limit}); "
                "check the URLs and filters, or raise the limit",
                ExitCode.FAILED,
            )
        return items

    def _write_plan(self, items: Callable[[], Iterator[PlanItem]]) -> None:
        self.counters.phase = "dry-run"
        out = self.plan_out
        for item in items():
            if item.action is not Action.SKIP and out is not None:
                out.write(json.dumps(item.to_json()) + "\n")

    def _count_planned(self, item: PlanItem) -> None:
        if item.action in (Action.COPY, Action.CHECK) and item.src is not None:
            self.counters.add(to_copy=1, to_copy_bytes=item.src.size)
        elif item.action is Action.SKIP:
            self.counters.add(skipped=1)

    # -- transfer ----------------------------------------------------------------------------

    def _execute(self, journal: Journal, items: Callable[[], Iterator[PlanItem]]) -> None:
        self.counters.phase = "transferring"
        opts = self.options
        if self._ray is not None:
            self._ray.run(journal, items)
            return
        with (
            ThreadPoolExecutor(opts.transfers, thread_name_prefix="part") as part_pool,
            ThreadPoolExecutor(opts.transfers, thread_name_prefix="object") as object_pool,
        ):
            transferer = Transferer(
                self.src,
                self.dst,
                journal,
                part_pool=part_pool,
                options=opts.transfer,
                bandwidth=Bandwidth(opts.bwlimit),
                budget=MemoryBudget(opts.max_memory),
                on_bytes=lambda n: self.counters.add(bytes_moved=n),
            )
            window = threading.BoundedSemaphore(opts.transfers * 4)
            pending: list[Future[None]] = []
            for item in items():
                if item.action is Action.SKIP:
                    continue
                window.acquire()
                future = object_pool.submit(self._do_item, transferer, journal, item)
                future.add_done_callback(lambda _f: window.release())
                pending.append(future)
                if len(pending) > 10_000:
                    pending = [f for f in pending if not f.done()]
            for future in pending:
                future.result()

    def _do_item(self, transferer: Transferer, journal: Journal, item: PlanItem) -> None:
        try:
            if item.action is Action.DELETE:
                self.dst.delete(item.key)
                self.counters.add(deleted=1)
                return
            assert item.src is not None
            if item.action is Action.CHECK:
                needed, _reason = resolve_check(self.src.stat(item.key), self.dst.stat(item.key))
                self.counters.add(checked=1)
                if not needed:
                    self.counters.add(skipped=1, to_copy=-1, to_copy_bytes=-item.src.size)
                    return
            state = journal.get_object(item.key)
            previous = None
            if state is not None and state.src_etag == item.src.etag:
                if state.status == "done":  # an earlier, interrupted run of this job copied it
                    self.counters.add(skipped=1, to_copy=-1, to_copy_bytes=-item.src.size)
                    return
                if state.status == "copied":  # copied, but the run died before verifying it
                    previous = CopyResult.from_state(item.key, item.src.size, state)
            result = self._copy_verified(transferer, journal, item, previous)
            self.counters.add(
                copied=1,
                copied_bytes=result.size,
                resumed_parts=result.resumed_parts,
                server_side=int(result.method == "server-side"),
            )
        except ObjectNotFound as exc:
            if (
                item.action is not Action.DELETE
                and item.src is not None
                and exc.url.endswith(item.key)
            ):
                self._fail(item.key, f"vanished from the source during the sync: {exc}")
            else:
                self._fail(item.key, str(exc))
        except (StorageError, OSError, ValueError) as exc:
            self._fail(item.key, str(exc))

    def _copy_verified(
        self, transferer: Transferer, journal: Journal, item: PlanItem, previous: CopyResult | None
    ) -> CopyResult:
        """Copy (unless ``previous`` already did), verify, mark done in the journal.

        On an integrity error or a verification mismatch the object is copied once more from
        the source; a second mismatch is reported with the key and offsets.
        """
        assert item.src is not None
        result = previous
        for attempt in (1, 2):
            if result is None:
                try:
                    result = transferer.copy(
                        item.key, item.src, verified=not self._post_verifies(item.src.size)
                    )
                except IntegrityError as exc:
                    if attempt == 2:
                        raise
                    log.warning("%s: %s; reading it again from the source", item.key, exc)
                    continue
            outcome = self._verify(result)
            if outcome is None or outcome.ok:
                if outcome is not None:  # verified after the copy: now it is done
                    state = journal.get_object(item.key)
                    if state is not None:
                        state.status = "done"
                        journal.put_object(item.key, state)
                return result
            if attempt == 1:
                reason = outcome.mismatches[0].reason if outcome.mismatches else "mismatch"
                log.warning(
                    "%s: verification failed (%s); copying it again from the source",
                    item.key,
                    reason,
                )
                with self._lock:
                    self._verify_stats["retried"] += 1
                result = None
                continue
            self.counters.add(mismatches=1)
            with self._lock:
                self._mismatches.append(outcome.to_json())
        assert result is not None
        return result

    def _post_verifies(self, size: int) -> bool:
        """Whether an object of ``size`` gets a verification pass after its copy.

        Single-request copies had every byte CRC-checked on the way (or never left the
        service); sampling is for the structure of multipart objects.
        """
        mode = self.options.verify
        return mode == "full" or (
            mode == "sample" and size > self.options.transfer.multipart_threshold
        )

    def _verify(self, result: CopyResult) -> verify.VerifyResult | None:
        mode = self.options.verify
        if mode == "none":
            return None
        if not self._post_verifies(result.size):
            self.counters.add(verified=1)
            return None
        if mode == "full":
            expected = ChecksumValue("crc64nvme", result.crc) if result.crc is not None else None
            outcome = verify.verify_full(
                self.src, result.key, self.dst, result.key, expected=expected
            )
            kind = "full"
        else:
            outcome = verify.verify_sampled(
                self.src,
                result.key,
                self.dst,
                result.key,
                part_boundaries=result.part_boundaries,
                samples=self.options.sample_blocks,
                seed=self._seed,
            )
            kind = "sampled"
        with self._lock:
            self._verify_stats[kind] += 1
            self._verify_stats["bytes_read"] += outcome.bytes_read
        if outcome.ok:
            self.counters.add(verified=1)
        return outcome

    def _fail(self, key: str, message: str) -> None:
        log.warning("%s: %s", key, message)
        self.counters.add(failed=1)
        with self._lock:
            self._failures.append({"key": key, "error": message})

    # -- check -------------------------------------------------------------------------------

    def _check(self, journal: Journal, items: Callable[[], Iterator[PlanItem]]) -> None:
        """Compare only: report differences as mismatches; verify objects present on both."""
        self.counters.phase = "checking"

        def one(item: PlanItem) -> None:
            try:
                if item.action is Action.COPY and item.dst is None:
                    self._mismatch(item.key, "missing at destination")
                    return
                if item.action is Action.DELETE:
                    self._mismatch(item.key, "only at destination")
                    return
                assert item.src is not None
                if item.src.size != (item.dst.size if item.dst else -1):
                    self._mismatch(item.key, "size differs")
                    return
                if self.options.verify == "full":
                    outcome = verify.verify_full(self.src, item.key, self.dst, item.key)
                else:
                    outcome = verify.verify_sampled(
                        self.src,
                        item.key,
                        self.dst,
                        item.key,
                        samples=self.options.sample_blocks,
                        seed=self._seed,
                    )
                with self._lock:
                    self._verify_stats["full" if self.options.verify == "full" else "sampled"] += 1
                    self._verify_stats["bytes_read"] += outcome.bytes_read
                if outcome.ok:
                    self.counters.add(verified=1)
                else:
                    self.counters.add(mismatches=1)
                    with self._lock:
                        self._mismatches.append(outcome.to_json())
            except (StorageError, OSError) as exc:
                self._fail(item.key, str(exc))

        with ThreadPoolExecutor(self.options.transfers) as pool:
            list(pool.map(one, items()))

    def _mismatch(self, key: str, reason: str) -> None:
        self.counters.add(mismatches=1)
        with self._lock:
            self._mismatches.append({"key": key, "ok": False, "reason": reason})

    # -- clean-up ----------------------------------------------------------------------------

    def _clean_orphans(self, journal: Journal) -> None:
        """Abort multipart uploads this job started and no longer needs.

        An upload is this job's when the journal records it, or when it targets a key this job
        writes and began after the job did (a crash between CreateMultipartUpload and the
        journal write leaves such an upload). After a clean run none is needed; after failures
        the journal's open uploads are kept so the next run resumes them.
        """
        if not journal.multipart_started:
            return  # no upload was ever begun by this job: nothing can be orphaned
        created = float(journal.get_meta("created") or 0) - 60  # allow for clock skew
        active = journal.open_uploads()
        try:
            uploads = self.dst.list_uploads("")
        except StorageError as exc:
            log.info("cannot list uploads at the destination: %s", exc)
            return
        for upload in uploads:
            ours = upload.key in active or (
                upload.initiated >= created and journal.has_key("src", upload.key)
            )
            keep = bool(self._failures) and active.get(upload.key) == upload.upload_id
            if ours and not keep:
                log.info("aborting orphaned upload %s of %s", upload.upload_id, upload.key)
                self.dst.abort_upload(upload.key, upload.upload_id)
