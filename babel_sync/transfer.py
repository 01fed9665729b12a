"""Copying one object from a source store to a destination store, verified while streaming.

Three paths, chosen per object:

- **server-side copy** when both stores live on one endpoint and account (no bytes move here);
- **single request** for objects up to the multipart threshold: one GET (which also returns the
  source's native CRC), one PUT carrying our CRC, which the destination service verifies;
- **multipart** above it: the object is cut into parts (size from object size, provider limits
  and measured throughput), each part a ranged GET pinned to the source ETag, then UploadPart.
  Parts run in a shared pool, so GETs of some parts overlap PUTs of others. Memory is bounded by
  the job's :class:`~babel_sync.throttle.MemoryBudget`: a 10 GB object never sits in memory.

Runtime verification: a CRC-64/NVME per part, combined into the whole-object CRC without a
re-read, compared with the source's native CRC when the source reports one in that algorithm
(CRC-64/XZ for OSS sources is computed alongside); each PUT/UploadPart is verified by the
destination service against the CRC we send or it returns. The CRC is stored in the journal and,
where known before the upload starts, in the destination's metadata (``babel-crc64nvme``).

Resume: an open multipart upload is kept in the journal with its completed parts; a rerun
reconciles them with the service's ListParts and uploads only what is missing.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Executor
from dataclasses import dataclass

from objstore import (
    ChecksumValue,
    ObjectInfo,
    PartInfo,
    StorageError,
    Store,
    UploadNotFound,
)
from objstore import checksum as crc

from .journal import Journal, ObjectState
from .plan import CRC_METADATA
from .throttle import Bandwidth, MemoryBudget, Throughput

log = logging.getLogger(__name__)

MiB = 1024 * 1024
CANONICAL = "crc64nvme"


class IntegrityError(StorageError):
    """Bytes read from the source do not match the CRC the source service reports."""


@dataclass(frozen=True)
class TransferOptions:
    """How objects are moved.

    Attributes:
        part_size: fixed part size, or ``None`` to choose per object (auto).
        multipart_threshold: objects larger than this go multipart.
        min_auto_part: smallest automatic part size.
        max_auto_part: largest automatic part size.
        part_seconds: automatic parts aim to take about this long at the measured rate.
    """

    part_size: int | None = None
    multipart_threshold: int = 64 * MiB
    min_auto_part: int = 8 * MiB
    max_auto_part: int = 512 * MiB
    part_seconds: float = 4.0


@dataclass(frozen=True)
class CopyResult:
    """What one copy did: bytes moved, the content CRC (if computed), part boundaries."""

    key: str
    size: int
    crc: int | None
    part_boundaries: tuple[int, ...]
    method: str  # "server-side", "single", "multipart"
    resumed_parts: int = 0

    @classmethod
    def from_state(cls, key: str, size: int, state: ObjectState) -> CopyResult:
        """The result of a copy an earlier run finished, rebuilt from its journal state."""
        if state.part_size:
            bounds = tuple(range(state.part_size, size, state.part_size))
            return cls(key, size, state.crc, bounds, "multipart")
        return cls(key, size, state.crc, (), "single")


def choose_part_size(size: int, dst: Store, options: TransferOptions, rate: float | None) -> int:
    """A part size within the destination's limits that keeps parts busy for a few seconds."""
    features = dst.features
    if options.part_size:
        wanted = options.part_size
    else:
        by_rate = int(rate * options.part_seconds) if rate else 16 * MiB
        wanted = min(max(by_rate, options.min_auto_part), options.max_auto_part)
        wanted = 1 << max(0, (wanted - 1).bit_length())  # a power of two: tidy boundaries
    floor = max(features.min_part_size, math.ceil(size / features.max_parts))
    return max(1, min(max(wanted, floor), features.max_part_size))


class Transferer:
    """Copies objects between two stores; one per job, shared by its worker threads."""

    def __init__(
        self,
        src: Store,
        dst: Store,
        journal: Journal,
        *,
        part_pool: Executor,
        options: TransferOptions | None = None,
        bandwidth: Bandwidth | None = None,
        budget: MemoryBudget | None = None,
        on_bytes: Callable[[int], None] = lambda n: None,
    ) -> None:
        self.src = src
        self.dst = dst
        self.journal = journal
        self.part_pool = part_pool
        self.options = options or TransferOptions()
        self.bandwidth = bandwidth or Bandwidth(None)
        self.budget = budget or MemoryBudget(1 << 30)
        self.throughput = Throughput()
        self.on_bytes = on_bytes
        self._metadata_ok = dst.features.user_metadata

    # -- entry point -----------------------------------------------------------------------

    def copy(self, key: str, listed: ObjectInfo, *, verified: bool = False) -> CopyResult:
        """Copy ``key`` (as listed at the source) to the same key at the destination.

        The journal records the object as ``copied``, or straight away as ``done`` when
        ``verified`` says no verification follows (one journal write instead of two).
        """
        status = "done" if verified else "copied"
        copied = self.dst.copy_from(self.src, key, key)
        if copied is not None:  # no bytes moved through this machine
            self.journal.put_object(key, ObjectState(status, src_etag=listed.etag))
            return CopyResult(key, copied.size, None, (), "server-side")
        if listed.size <= self.options.multipart_threshold:
            return self._copy_single(key, listed, status)
        return self._copy_multipart(key, listed, status)

    # -- single request --------------------------------------------------------------------

    def _copy_single(self, key: str, listed: ObjectInfo, status: str) -> CopyResult:
        self.budget.acquire(listed.size)
        try:
            data, info = self.src.get_object(key, if_match=listed.etag or None)
            self.bandwidth.consume(len(data))
            value = crc.compute(CANONICAL, data)
            if info.checksum is not None:
                native = (
                    value
                    if info.checksum.algorithm == CANONICAL
                    else crc.compute(info.checksum.algorithm, data)
                )
                if native != info.checksum.value:
                    raise IntegrityError(
                        f"read of {key!r} does not match the source's {info.checksum.algorithm} "
                        f"({native:016x} != {info.checksum.value:016x})",
                        url=self.src.url.child(key),
                    )
            self.dst.put(key, data, metadata=self._metadata(info, value))
        finally:
            self.budget.release(listed.size)
        self.journal.put_object(key, ObjectState(status, crc=value, src_etag=info.etag))
        self.on_bytes(len(data))
        return CopyResult(key, len(data), value, (), "single")

    def _metadata(self, src_info: ObjectInfo, value: int | None) -> dict[str, str] | None:
        if not self._metadata_ok:
            return None
        metadata = {k: v for k, v in src_info.metadata.items() if k != CRC_METADATA}
        if value is not None:
            metadata[CRC_METADATA] = str(value)
        return metadata

    # -- multipart -------------------------------------------------------------------------

    def _copy_multipart(self, key: str, listed: ObjectInfo, status: str) -> CopyResult:
        info = self.src.stat(key)
        state = self._resumable_state(key, info)
        resumed = len(state.parts) if state else 0
        if state is None:
            part_size = choose_part_size(info.size, self.dst, self.options, self.throughput.rate)
            known = (
                info.checksum.value
                if info.checksum and info.checksum.algorithm == CANONICAL
                else None
            )
            self.journal.note_multipart()
            upload_id = self.dst.create_upload(key, metadata=self._metadata(info, known))
            state = ObjectState(
                "uploading", upload_id=upload_id, part_size=part_size, src_etag=info.etag
            )
            self.journal.put_object(key, state)
        part_size = state.part_size
        count = max(1, math.ceil(info.size / part_size))
        native_algo = info.checksum.algorithm if info.checksum else None
        futures = {
            number: self.part_pool.submit(
                self._copy_part, key, info, state.upload_id, number, part_size, native_algo
            )
            for number in range(1, count + 1)
            if number not in state.parts
        }
        results: dict[int, tuple[PartInfo, int, int | None]] = {}
        for number, future in futures.items():
            results[number] = future.result()  # re-raises the part's error
        parts: list[PartInfo] = []
        crcs: list[tuple[int, int]] = []
        native_parts: list[tuple[int, int]] | None = (
            [] if native_algo and native_algo != CANONICAL else None
        )
        for number in range(1, count + 1):
            if number in results:
                part, part_crc, native_crc = results[number]
                if native_parts is not None and native_crc is not None:
                    native_parts.append((native_crc, part.size))
            else:
                etag, size, part_crc = state.parts[number]
                part = PartInfo(number, etag, size, ChecksumValue(CANONICAL, part_crc))
                native_parts = None  # restored parts carry only CRC-64/NVME
            parts.append(part)
            crcs.append((part_crc, part.size))
        whole = crc.combine_parts(CANONICAL, crcs)
        self._check_native(key, info, whole, native_parts)
        self.dst.complete_upload(key, state.upload_id, parts)
        self.journal.put_object(
            key, ObjectState(status, crc=whole, part_size=part_size, src_etag=info.etag)
        )
        boundaries = tuple(n * part_size for n in range(1, count))
        return CopyResult(key, info.size, whole, boundaries, "multipart", resumed)

    def _resumable_state(self, key: str, info: ObjectInfo) -> ObjectState | None:
        """The journal's open upload for ``key``, reconciled with the service's parts."""
        state = self.journal.get_object(key)
        if state is None or state.status != "uploading":
            return None
        if state.src_etag != info.etag:
            log.info("%s changed at the source since its upload began: starting over", key)
            self.dst.abort_upload(key, state.upload_id)
            return None
        try:
            on_server = {p.part_number: p for p in self.dst.list_parts(key, state.upload_id)}
        except UploadNotFound:
            return None
        kept = {
            n: v
            for n, v in state.parts.items()
            if n in on_server and on_server[n].etag == v[0] and on_server[n].size == v[1]
        }
        state.parts = kept
        self.journal.put_object(key, state)
        log.info("%s: resuming upload with %d parts already on the server", key, len(kept))
        return state

    def _copy_part(
        self,
        key: str,
        info: ObjectInfo,
        upload_id: str,
        number: int,
        part_size: int,
        native_algo: str | None,
    ) -> tuple[PartInfo, int, int | None]:
        start = (number - 1) * part_size
        length = min(part_size, info.size - start)
        self.budget.acquire(length)
        try:
            began = time.perf_counter()
            data = self.src.get_range(key, start, length, if_match=info.etag or None)
            if len(data) != length:
                raise IntegrityError(
                    f"short read of {key!r} part {number}: {len(data)} of {length} bytes"
                )
            self.bandwidth.consume(length)
            value = crc.compute(CANONICAL, data)
            native = (
                crc.compute(native_algo, data) if native_algo and native_algo != CANONICAL else None
            )
            part = self.dst.upload_part(key, upload_id, number, data)
            self.throughput.record(length, time.perf_counter() - began)
        finally:
            self.budget.release(length)
        self.journal.record_part(key, number, part.etag, part.size, value)
        self.on_bytes(length)
        return part, value, native

    def _check_native(
        self, key: str, info: ObjectInfo, whole: int, native_parts: list[tuple[int, int]] | None
    ) -> None:
        if info.checksum is None:
            return
        if info.checksum.algorithm == CANONICAL:
            ours = whole
        elif native_parts is not None:
            ours = crc.combine_parts(info.checksum.algorithm, native_parts)
        else:
            return
        if ours != info.checksum.value:
            raise IntegrityError(
                f"bytes read of {key!r} do not match the source's {info.checksum.algorithm} "
                f"({ours:016x} != {info.checksum.value:016x})",
                url=self.src.url.child(key),
            )
