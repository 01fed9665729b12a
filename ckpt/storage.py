"""``torch.distributed.checkpoint`` storage plugin over objstore URLs and pcache.

The files are DCP's own layout, so torch's stock ``FileSystemReader`` loads a checkpoint this
plugin wrote to a local directory, on any world size: ``__{rank}_0.distcp`` holds each item as
``torch.save`` bytes at the offset ``.metadata`` records (``_StorageInfo``), and ``.metadata`` is
the pickled :class:`~torch.distributed.checkpoint.metadata.Metadata`. Two additions ride in an
extra ``ckpt`` attribute of that Metadata (ignored by torch): the CRC32C of every item, checked
on load when asked, and the node and rank that wrote every file.

``.metadata`` is written last, by the coordinator, only after every rank's files are committed:
a save that dies halfway leaves files but no ``.metadata``, which :func:`is_complete` and the
loaders treat as no checkpoint.

Writer call order (DCP's): ``reset(checkpoint_id)`` -> ``set_up_storage_writer`` ->
``prepare_local_plan`` -> coordinator ``prepare_global_plan`` -> ``write_data`` -> coordinator
``finish``. Reader call order: ``reset`` -> ``read_metadata`` -> ``set_up_storage_reader`` ->
``prepare_local_plan`` -> coordinator ``prepare_global_plan`` -> ``read_data``.

Loading reads each item once per node: when several ranks of one node need the same stored item
(every data-parallel rank loads the dense weights), the coordinator names one of them to fetch it;
it publishes the bytes in ``/dev/shm`` and the others read them there.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import os
import pickle
import time
import uuid
import zlib
from pathlib import Path
from typing import Any, cast

import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.filesystem import _StorageInfo, _StoragePrefix
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from objstore import checksum

from .backend import Backend, is_supported_url, open_backend
from .topology import local_node_id

log = logging.getLogger(__name__)

METADATA = ".metadata"
SUFFIX = ".distcp"
FORMAT = 1
SHM_DIR = Path(os.environ.get("CKPT_SHM_DIR", "/dev/shm"))
SHARE_WAIT_S = 600.0

_crc32c = checksum.get_algorithm("crc32c").native_calc


class CheckpointError(Exception):
    """A checkpoint cannot be saved or loaded; the message says which and why."""


class CheckpointNotFound(CheckpointError):
    """No complete checkpoint (no ``.metadata``) at the URL."""


class CorruptCheckpoint(CheckpointError):
    """An item's bytes do not match the CRC32C recorded at save time."""


def crc32c(data: Any) -> int:
    return _crc32c(data, 0)


class _ItemSink:
    """Where an item is serialized: straight into the file's stream, counting its bytes and
    CRC32C on the way (no copy of the item is kept)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.length = 0
        self.crc = 0

    def begin(self) -> None:
        self.length, self.crc = 0, 0

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        self._stream.write(view)
        self.crc = _crc32c(view, self.crc)
        self.length += len(view)
        return len(view)

    def flush(self) -> None:
        pass


def write_item(sink: _ItemSink, data: Any, item_type: WriteItemType) -> None:
    """An item's bytes exactly as torch's ``FileSystemWriter`` stores them."""
    if item_type == WriteItemType.BYTE_IO:
        if not isinstance(data, io.BytesIO):
            raise CheckpointError("a BYTE_IO item must resolve to io.BytesIO")
        sink.write(data.getbuffer())
        return
    tensor = cast(torch.Tensor, data).detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size():
        tensor = tensor.clone()  # torch.save writes a view's whole storage
    torch.save(tensor, cast(Any, sink))  # a write-only file: all torch.save needs


def _metadata_extra(metadata: Metadata) -> dict[str, Any]:
    return cast(dict[str, Any], getattr(metadata, "ckpt", None) or {})


def read_metadata(backend: Backend) -> Metadata:
    """The checkpoint's Metadata.

    Raises:
        CheckpointNotFound: no ``.metadata`` (nothing saved, or a save that did not finish).
        CheckpointError: ``.metadata`` is unreadable.
    """
    try:
        raw = backend.read(METADATA)
    except FileNotFoundError:
        raise CheckpointNotFound(
            f"no complete checkpoint at {backend.url} (no {METADATA}: nothing saved there, "
            "or the save did not finish)"
        ) from None
    try:
        return cast(Metadata, pickle.loads(raw))
    except Exception as exc:
        raise CheckpointError(f"{backend.url}: unreadable {METADATA}: {exc}") from None


class _OnBackend:
    """The checkpoint URL and its backend, opened on first use (Writer and Reader share it)."""

    url: str | None
    _backend: Backend | None

    def _set_target(
        self, url: Any, backend: Backend | None, config: Any, options: dict[str, Any]
    ) -> None:
        self.url = str(url) if url is not None else None
        self._backend, self._config, self._options = backend, config, options

    @property
    def backend(self) -> Backend:
        if self._backend is None:
            if self.url is None:
                raise CheckpointError(
                    f"no checkpoint URL: pass one to {type(self).__name__} or checkpoint_id"
                )
            self._backend = open_backend(self.url, config=self._config, **self._options)
        return self._backend

    def _retarget(self, checkpoint_id: Any) -> None:
        if checkpoint_id is not None and str(checkpoint_id) != self.url:
            self._close_backend()
            self.url = str(checkpoint_id)

    def _close_backend(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None


class Writer(_OnBackend, StorageWriter):
    """Writes a DCP checkpoint to ``url`` (any objstore URL, or ``pcache://NS/PREFIX``).

    Each rank writes one file of the items its planner gave it, streamed: items are serialized
    one at a time and uploaded in parts as they fill, so a rank's memory holds at most one item
    plus two parts, whatever its share. Thread-safe only as DCP uses it (one save at a time).

    Args:
        url: the checkpoint directory; DCP's ``checkpoint_id`` overrides it.
        backend: an open :class:`~ckpt.backend.Backend` to use instead of opening ``url``.
        config: objstore ``Config`` for the URL's profile (default: the environment's).
        **backend_options: ``part_size`` (objstore) or ``durable`` (pcache).
    """

    def __init__(
        self,
        url: str | os.PathLike[str] | None = None,
        *,
        backend: Backend | None = None,
        config: Any = None,
        **backend_options: Any,
    ) -> None:
        super().__init__()
        self._set_target(url, backend, config, backend_options)
        self.save_id = uuid.uuid4().hex
        self.is_coordinator = False
        self.rank = 0
        self.nodes: list[str] = []
        self.bytes_written = 0

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self._retarget(checkpoint_id)
        self.save_id = uuid.uuid4().hex

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank") or 0)

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        # the node travels with the plan, so the coordinator can record who wrote what
        return dataclasses.replace(plan, storage_data=local_node_id())

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        self.nodes = [str(p.storage_data) for p in plans]
        return [
            dataclasses.replace(p, storage_data=_StoragePrefix(f"__{i}_"))
            for i, p in enumerate(plans)
        ]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        results: list[WriteResult] = []
        if plan.items:
            name = f"{cast(_StoragePrefix, plan.storage_data).prefix}0{SUFFIX}"
            stream = self.backend.open_write(name)
            sink = _ItemSink(stream)
            offset = 0
            try:
                # small items first, as torch does: a reader of them touches the file's start
                items = sorted(plan.items, key=lambda wi: wi.tensor_storage_size() or 0)
                for item in items:
                    sink.begin()
                    write_item(sink, planner.resolve_data(item), item.type)
                    info = _StorageInfo(name, offset, sink.length)
                    results.append(WriteResult(item.index, sink.length, (info, sink.crc)))
                    offset += sink.length
            except BaseException:
                stream.abort()
                raise
            stream.commit()
            self.bytes_written = offset
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        storage: dict[MetadataIndex, _StorageInfo] = {}
        crcs: dict[MetadataIndex, int] = {}
        files: dict[str, dict[str, Any]] = {}
        for rank, rank_results in enumerate(results):
            for wr in rank_results:
                info, crc = wr.storage_data
                storage[wr.index] = info
                crcs[wr.index] = crc
                entry = files.setdefault(
                    info.relative_path,
                    {"rank": rank, "node": self.nodes[rank] if rank < len(self.nodes) else "?",
                     "bytes": 0, "items": 0},
                )  # fmt: skip
                entry["bytes"] += wr.size_in_bytes
                entry["items"] += 1
        metadata.storage_data = storage
        metadata.storage_meta = self.storage_meta()
        metadata.ckpt = {  # type: ignore[attr-defined]  # an extra attribute torch ignores
            "format": FORMAT,
            "crc32c": crcs,
            "files": files,
            "nodes": list(self.nodes),
            "saved_at": time.time(),
            "save_id": self.save_id,
        }
        self.backend.put(METADATA, pickle.dumps(metadata))  # last: the commit marker

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.url, save_id=self.save_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return is_supported_url(str(checkpoint_id))

    def close(self) -> None:
        self._close_backend()


class Reader(_OnBackend, StorageReader):
    """Reads a DCP checkpoint from ``url`` (any objstore URL, or ``pcache://NS/PREFIX``).

    Args:
        url: the checkpoint directory; DCP's ``checkpoint_id`` overrides it.
        verify: check every item's CRC32C before using it (:class:`CorruptCheckpoint` if wrong).
        share_per_node: read an item several ranks of a node need once, and share it through
            ``/dev/shm`` (default on).
        backend, config: as for :class:`Writer`.
    """

    def __init__(
        self,
        url: str | os.PathLike[str] | None = None,
        *,
        verify: bool = False,
        share_per_node: bool = True,
        backend: Backend | None = None,
        config: Any = None,
        **backend_options: Any,
    ) -> None:
        super().__init__()
        self._set_target(url, backend, config, backend_options)
        self.verify = verify
        self.share_per_node = share_per_node
        self.metadata: Metadata | None = None
        self.rank = 0
        self._published: list[Path] = []
        self.bytes_read = 0
        self.items_shared = 0

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self.release_shared()
        self._retarget(checkpoint_id)
        self.metadata = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_metadata(self.backend)
        if metadata.storage_meta is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = uuid.uuid4().hex
        self.metadata = metadata
        return metadata

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        self.metadata = metadata
        self.rank = int(kwargs.get("rank") or 0)
        if metadata.storage_data is None:
            raise CheckpointError(f"{self.url}: {METADATA} lists no stored items")

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return dataclasses.replace(plan, storage_data=local_node_id())

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """Name, for every stored item several ranks of one node read, the rank that fetches it
        (spreading the fetching over the node's ranks by bytes)."""
        nodes = [str(p.storage_data) for p in plans]
        tag = uuid.uuid4().hex[:16]
        shares: list[dict[MetadataIndex, tuple[int, str]]] = [{} for _ in plans]
        if self.share_per_node:
            storage = cast(dict[MetadataIndex, _StorageInfo], self.metadata.storage_data)  # type: ignore[union-attr]
            readers: dict[tuple[str, MetadataIndex], list[int]] = {}
            for rank, plan in enumerate(plans):
                for index in {ri.storage_index for ri in plan.items}:
                    readers.setdefault((nodes[rank], index), []).append(rank)
            fetched = [0] * len(plans)
            shared = sorted(
                ((key, ranks) for key, ranks in readers.items() if len(ranks) > 1),
                key=lambda kv: (-storage[kv[0][1]].length, repr(kv[0][1])),
            )
            for number, ((node, index), ranks) in enumerate(shared):
                fetcher = min(
                    ranks, key=lambda r: (fetched[r], zlib.crc32(f"{index}|{r}".encode()))
                )
                fetched[fetcher] += storage[index].length
                # unique per node too: simulated nodes share one /dev/shm
                name = f"ckpt-{tag}-{zlib.crc32(node.encode()):08x}-{number}"
                for rank in ranks:
                    shares[rank][index] = (fetcher, name)
        return [dataclasses.replace(p, storage_data=s) for p, s in zip(plans, shares, strict=True)]

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        storage = cast(dict[MetadataIndex, _StorageInfo], self.metadata.storage_data)  # type: ignore[union-attr]
        crcs = _metadata_extra(self.metadata).get("crc32c", {}) if self.metadata else {}
        shares = cast(dict[MetadataIndex, tuple[int, str]], plan.storage_data or {})
        needed = list(dict.fromkeys(ri.storage_index for ri in plan.items))
        mine = [i for i in needed if i in shares and shares[i][0] == self.rank]
        direct = [i for i in needed if i not in shares]
        waited = [i for i in needed if i in shares and shares[i][0] != self.rank]
        data: dict[MetadataIndex, bytes] = {}
        # fetch what this rank fetches for its node first, so no rank waits on one that waits
        for index in mine:
            raw = self._fetch(storage[index], index, crcs)
            self._publish(shares[index][1], raw)
            data[index] = raw
        for index in direct:
            data[index] = self._fetch(storage[index], index, crcs)
        for index in waited:
            data[index] = self._wait_shared(shares[index][1], index)
            self.items_shared += 1
        for ri in plan.items:
            raw = data[ri.storage_index]
            if ri.type == LoadItemType.BYTE_IO:
                planner.load_bytes(ri, io.BytesIO(raw))
                continue
            tensor = torch.load(io.BytesIO(raw), map_location="cpu", weights_only=True)
            tensor = narrow_tensor_by_index(tensor, ri.storage_offsets, ri.lengths)
            target = planner.resolve_tensor(ri).detach()
            if target.size() != tensor.size():
                raise CheckpointError(
                    f"{ri.storage_index.fqn}: stored shape {tuple(tensor.size())} does not fit "
                    f"{tuple(target.size())}"
                )
            target.copy_(tensor)
            planner.commit_tensor(ri, target)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _fetch(self, info: _StorageInfo, index: MetadataIndex, crcs: dict[Any, int]) -> bytes:
        try:
            raw = self.backend.read_range(info.relative_path, info.offset, info.length)
        except FileNotFoundError as exc:
            raise CheckpointError(f"{self.url}: {exc} (the checkpoint is incomplete)") from None
        if len(raw) != info.length:
            raise CorruptCheckpoint(
                f"{self.url}/{info.relative_path}: {index.fqn} is cut short "
                f"({len(raw)} of {info.length} bytes)"
            )
        if self.verify:
            expected = crcs.get(index)
            if expected is None:
                raise CheckpointError(f"{self.url}: no CRC recorded for {index.fqn}")
            if crc32c(raw) != expected:
                raise CorruptCheckpoint(
                    f"{self.url}/{info.relative_path}: CRC32C mismatch in {index.fqn}"
                )
        self.bytes_read += len(raw)
        return raw

    def _publish(self, name: str, raw: bytes) -> None:
        path = SHM_DIR / name
        tmp = SHM_DIR / f".{name}.{os.getpid()}.tmp"
        tmp.write_bytes(raw)
        os.replace(tmp, path)
        self._published.append(path)

    def _wait_shared(self, name: str, index: MetadataIndex) -> bytes:
        path = SHM_DIR / name
        deadline = time.monotonic() + SHARE_WAIT_S
        delay = 0.001
        while True:
            try:
                return path.read_bytes()
            except FileNotFoundError:
                if time.monotonic() > deadline:
                    raise CheckpointError(
                        f"{index.fqn}: the rank that reads it for this node did not publish it "
                        f"within {SHARE_WAIT_S:.0f} s"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.05)

    def release_shared(self) -> None:
        """Remove the items this rank published for its node (after every rank has loaded)."""
        for path in self._published:
            try:
                path.unlink()
            except FileNotFoundError:
                pass
        self._published.clear()

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return is_supported_url(str(checkpoint_id))

    def close(self) -> None:
        self.release_shared()
        self._close_backend()
