"""ckpt: torch.distributed.checkpoint storage plugin with node-aware write placement.

The public API, imported on first use (``import ckpt`` alone does not load torch)::

    import ckpt
    ckpt.save(state_dict, ckpt.step_url("s3://ckpt@runs/moe/", step))   # all ranks
    saver = ckpt.AsyncSaver(); handle = saver.save(state_dict, url)     # training goes on
    step, url = ckpt.latest("s3://ckpt@runs/moe/")
    ckpt.load(state_dict, url)

``ckpt.Writer`` / ``ckpt.Reader`` are the ``StorageWriter`` / ``StorageReader`` for
``torch.distributed.checkpoint`` itself, ``ckpt.make_planner`` its node-aware save planners.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "AsyncSaver": "ckpt.api",
    "LoadResult": "ckpt.api",
    "SaveHandle": "ckpt.api",
    "SaveResult": "ckpt.api",
    "is_complete": "ckpt.api",
    "latest": "ckpt.api",
    "load": "ckpt.api",
    "save": "ckpt.api",
    "step_url": "ckpt.api",
    "CheckpointError": "ckpt.storage",
    "CheckpointNotFound": "ckpt.storage",
    "CorruptCheckpoint": "ckpt.storage",
    "Reader": "ckpt.storage",
    "Writer": "ckpt.storage",
    "Backend": "ckpt.backend",
    "open_backend": "ckpt.backend",
    "NodeAwareSavePlanner": "ckpt.planner",
    "make_planner": "ckpt.planner",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ckpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
