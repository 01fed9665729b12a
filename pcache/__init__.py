"""pcache: the node cache (workers, worker selection, client, FUSE mount).

The public API, for programs that read and write through the cache::

    import pcache
    with pcache.PcacheClient(pcache.ClientConfig.load()) as client:
        data = client.read("datasets/tokens/shard-0001.bin")

The worker (``pcache worker``), the mount (``pcache mount``) and the fsspec filesystem
(``pcache://``, :mod:`pcache.fsspec_fs`) are started from their own modules.
"""

from __future__ import annotations

from .client import Listing, PcacheClient
from .config import ClientConfig, Durability, WorkerConfig
from .files import PcacheReader, PcacheWriter
from .protocol import StaleVersion, UploadFailed
from .reads import BlockReads
from .session import WriteSession
from .transport import WorkerUnavailable

__all__ = [
    "BlockReads",
    "ClientConfig",
    "Durability",
    "Listing",
    "PcacheClient",
    "PcacheReader",
    "PcacheWriter",
    "StaleVersion",
    "UploadFailed",
    "WorkerConfig",
    "WorkerUnavailable",
    "WriteSession",
]
