"""Saving and loading checkpoints: the calls a training loop makes.

:func:`save` is ``dcp.save`` with the :class:`~ckpt.storage.Writer` and a placement planner.
:func:`async_save` returns as soon as this rank has copied the items it will write (only those:
placement is decided first, over a dedicated gloo group, by the same code the planners use) and
writes them in a background thread while training goes on. :func:`load` is ``dcp.load`` with the
:class:`~ckpt.storage.Reader` (each replicated item read once per node). :func:`latest` finds the
newest complete checkpoint under a root (``ROOT/step-00000100/``, complete once its ``.metadata``
exists).
"""

from __future__ import annotations

import copy
import logging
import re
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import DefaultSavePlanner
from torch.distributed.checkpoint._nested_dict import flatten_state_dict
from torch.distributed.checkpoint.api import CheckpointException

from .backend import open_backend
from .placement import Item, Placement, place
from .planner import BYTES_ITEM_SIZE, MegatronDefaultPlanner, make_planner, write_item_bytes
from .storage import METADATA, CheckpointError, CheckpointNotFound, Reader, Writer
from .topology import discover

log = logging.getLogger(__name__)

STEP_DIR = re.compile(r"^step-(\d+)$")
DEFAULT_STAGING_CAP = 64 * 2**30


def step_url(root: str, step: int) -> str:
    return f"{root.rstrip('/')}/step-{step:08d}/"


@dataclass
class SaveResult:
    url: str
    seconds: float
    bytes_written: int  # by this rank
    placement: Placement | None = None  # on the coordinator (synchronous saves) / every rank


def save(
    state_dict: dict[str, Any],
    url: str,
    *,
    planner: str = "node-aware",
    group: Any = None,
    config: Any = None,
    **writer_options: Any,
) -> SaveResult:
    """Save ``state_dict`` to ``url`` (collective over ``group``); ``planner`` is
    ``node-aware``, ``megatron`` or ``torch``."""
    started = time.perf_counter()
    kwargs = {"group": group} if planner != "torch" else {}
    save_planner = make_planner(planner, **kwargs)
    writer = Writer(url, config=config, **writer_options)
    try:
        dcp.save(state_dict, storage_writer=writer, planner=save_planner, process_group=group)
    except CheckpointException as exc:
        raise _first_error(exc) from None
    finally:
        writer.close()
    return SaveResult(
        url,
        time.perf_counter() - started,
        writer.bytes_written,
        getattr(save_planner, "last_placement", None),
    )


class SaveHandle:
    """A save running in the background: :meth:`result` waits for it (and raises its error)."""

    def __init__(self, future: Future[SaveResult], staged_bytes: int) -> None:
        self._future = future
        self.staged_bytes = staged_bytes

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> SaveResult:
        return self._future.result(timeout)


class AsyncSaver:
    """Background saves, one at a time. Every rank of the world must create one and call
    :meth:`save` at the same steps (the first call creates its gloo group: a collective).

    Args:
        planner: ``node-aware`` or ``megatron`` (who writes replicated items).
        staging_cap: the most bytes one rank may copy for one save; a larger share raises
            :class:`CheckpointError` before anything is copied.
    """

    def __init__(self, *, planner: str = "node-aware", staging_cap: int = DEFAULT_STAGING_CAP):
        self.policy = {"node-aware": "node_aware", "megatron": "lowest_rank"}.get(planner)
        if self.policy is None:
            raise ValueError(f"async saves place with node-aware or megatron, not {planner!r}")
        self.staging_cap = staging_cap
        self._group: Any = None
        self._pool = ThreadPoolExecutor(1, thread_name_prefix="ckpt-save")
        self._pending: SaveHandle | None = None
        self._lock = threading.Lock()

    def _ckpt_group(self) -> Any:
        if self._group is None and dist.is_available() and dist.is_initialized():
            self._group = dist.new_group(backend="gloo")  # the background save's own channel
        return self._group

    def save(self, state_dict: dict[str, Any], url: str, *, config: Any = None) -> SaveHandle:
        """Copy this rank's share of ``state_dict`` and write it in the background. Waits for
        the previous save first."""
        if self._pending is not None:
            self._pending.result()
        started = time.perf_counter()
        group = self._ckpt_group()
        flat, _ = flatten_state_dict(state_dict)
        planner = DefaultSavePlanner()
        planner.set_up_planner(flat, is_coordinator=False)
        local = planner.create_local_plan()
        mine = [(wi.index, write_item_bytes(wi)) for wi in local.items]
        if group is not None:
            gathered: list[Any] = [None] * dist.get_world_size(group)
            dist.all_gather_object(gathered, mine, group=group)
            rank = dist.get_rank(group)
        else:
            gathered, rank = [mine], 0
        holders: dict[Any, list[int]] = {}
        sizes: dict[Any, int] = {}
        for r, items in enumerate(gathered):
            for index, size in items:
                holders.setdefault(index, []).append(r)
                sizes[index] = size
        placement = place(
            [Item(i, sizes[i], tuple(h)) for i, h in holders.items()],
            discover(group).nodes,
            self.policy or "node_aware",
        )
        fqns = {index.fqn for index, _ in mine if placement.writer[index] == rank}
        share = sum(
            v.numel() * v.element_size() if isinstance(v, torch.Tensor) else BYTES_ITEM_SIZE
            for k, v in flat.items()
            if k in fqns
        )
        if share > self.staging_cap:
            raise CheckpointError(
                f"this rank's share of the checkpoint is {share / 2**30:.2f} GiB, over the "
                f"staging cap of {self.staging_cap / 2**30:.2f} GiB: raise the cap or save "
                "synchronously"
            )
        staged = {
            k: (
                v.detach().to("cpu", copy=True) if isinstance(v, torch.Tensor) else copy.deepcopy(v)
            )
            for k, v in flat.items()
            if k in fqns
        }
        staged_at = time.perf_counter()

        def run() -> SaveResult:
            writer = Writer(url, config=config)
            try:
                # every staged item has one holder, so this planner only keeps each where it is;
                # it is chosen for its plan validation (torch's is quadratic in a tensor's chunks)
                dcp.save(
                    staged,
                    storage_writer=writer,
                    planner=MegatronDefaultPlanner(group=group),
                    process_group=group,
                )
            finally:
                writer.close()
            return SaveResult(url, time.perf_counter() - started, writer.bytes_written, placement)

        handle = SaveHandle(self._pool.submit(run), share)
        log.info("staged %d bytes in %.3f s; writing in the background", share, staged_at - started)
        self._pending = handle
        return handle

    def wait(self) -> SaveResult | None:
        """Wait for the save in flight (if any)."""
        return self._pending.result() if self._pending is not None else None

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)


@dataclass
class LoadResult:
    url: str
    seconds: float
    bytes_read: int  # by this rank from storage
    items_shared: int  # items this rank got from another rank of its node


def load(
    state_dict: dict[str, Any],
    url: str,
    *,
    verify: bool = False,
    group: Any = None,
    config: Any = None,
) -> LoadResult:
    """Load ``url`` into ``state_dict`` in place (collective over ``group``; any world size).

    Raises:
        CheckpointNotFound: no complete checkpoint at ``url``.
        CorruptCheckpoint: ``verify`` and an item's CRC32C differs.
    """
    if not is_complete(url, config=config):
        raise CheckpointNotFound(
            f"no complete checkpoint at {url} (no {METADATA}: nothing saved there, or the save "
            "did not finish)"
        )
    started = time.perf_counter()
    reader = Reader(url, verify=verify, config=config)
    try:
        try:
            dcp.load(state_dict, storage_reader=reader, process_group=group)
        except CheckpointException as exc:
            raise _first_error(exc) from None
    finally:
        reader.close()  # every rank has read: DCP gathers after read_data
    return LoadResult(url, time.perf_counter() - started, reader.bytes_read, reader.items_shared)


def _first_error(exc: Any) -> BaseException:
    """DCP wraps each rank's failure; surface ours with its own message."""
    for failure in getattr(exc, "failures", {}).values():
        inner = failure[0] if isinstance(failure, tuple) else failure
        if isinstance(inner, CheckpointError):
            return inner
        if getattr(inner, "__cause__", None) is not None and isinstance(
            inner.__cause__, CheckpointError
        ):
            return inner.__cause__
    for rank, failure in sorted(getattr(exc, "failures", {}).items()):
        inner = failure[0] if isinstance(failure, tuple) else failure
        return CheckpointError(f"rank {rank}: {type(inner).__name__}: {inner}")
    return CheckpointError(str(exc) or repr(exc))


def is_complete(url: str, *, config: Any = None) -> bool:
    """Whether ``url`` holds a finished checkpoint (its ``.metadata`` exists)."""
    backend = open_backend(url, config=config)
    try:
        return backend.exists(METADATA)
    finally:
        backend.close()


def latest(root: str, *, config: Any = None) -> tuple[int, str] | None:
    """The newest complete checkpoint under ``root``: (step, url), or None."""
    backend = open_backend(root, config=config)
    try:
        steps = set()
        for name, _ in backend.list():
            parts = name.split("/")
            if len(parts) == 2 and parts[1] == METADATA and (m := STEP_DIR.match(parts[0])):
                steps.add(int(m.group(1)))
    finally:
        backend.close()
    if not steps:
        return None
    step = max(steps)
    return step, step_url(root, step)
