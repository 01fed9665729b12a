"""A write-back session on the local worker: the writing API of the file objects.

The worker owns a staging file per session (see :mod:`pcache.writeback`); a client on the same
node may write that file itself and asks the worker for room before it grows it, others send
their bytes. A commit makes the content local-durable (journalled) and, when asked, waits until
it is in the store.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from objstore.base import ObjectInfo

from .config import Durability
from .protocol import CopySource, Progress, info_from_json

if TYPE_CHECKING:
    from .client import PcacheClient

STRICT_TIMEOUT_S = 120.0  # how long a remote-durable request waits for the store (transient errors)


class WriteSession:
    """One write-back session on the local worker: a staging file the worker owns.

    A client on the same node may write :attr:`path` itself (``pwrite``/``ftruncate``), asking
    :meth:`reserve` for capacity before it grows the file; others send bytes with
    :meth:`write`. :meth:`commit` makes the content local-durable (and, with
    ``durable="remote"``, waits for the store); ``close=False`` keeps the session for more
    writes. Thread-safe (each call is one request).
    """

    def __init__(self, client: PcacheClient, session_id: str, path: str) -> None:
        self.client = client
        self.id = session_id
        self.path = path

    def _call(self, method: str, action: str = "", **kwargs: Any) -> Any:
        suffix = f"/{action}" if action else ""
        return self.client.local_request(method, f"/v1/session/{self.id}{suffix}", **kwargs)

    def reserve(self, size: int, progress: Progress | None = None) -> int:
        """Hold cache capacity for the staging file to grow to ``size`` (reporting the writer's
        ``progress`` first); returns what is held. Raises ``InsufficientStorage`` (ENOSPC) when
        the cache cannot."""
        payload: dict[str, Any] = {"size": size}
        if progress is not None:
            payload["progress"] = progress.to_json()
        return int(self._call("POST", "reserve", payload=payload)["reserved"])

    def uploaded(self, beyond: int = 0, wait: float = 0.0) -> int:
        """The prefix of the staging file already in the store's parts (what the writer may
        drop from the disk); waits up to ``wait`` seconds for it to pass ``beyond``."""
        payload = {"beyond": beyond, "wait": wait}
        return int(self._call("POST", "uploaded", payload=payload, timeout=wait + 10)["uploaded"])

    def write(self, offset: int, data: bytes | bytearray | memoryview) -> None:
        self.client.local_request("PUT", f"/v1/session/{self.id}?offset={offset}", body=bytes(data))

    def truncate(self, size: int) -> None:
        self._call("POST", "truncate", payload={"size": size})

    def commit(
        self,
        *,
        size: int | None = None,
        metadata: dict[str, str] | None = None,
        durable: Durability = Durability.LOCAL,
        close: bool = True,
        timeout: float = STRICT_TIMEOUT_S,
        progress: Progress | None = None,
        source: CopySource | None = None,
    ) -> ObjectInfo:
        payload: dict[str, Any] = {
            "durable": Durability(durable).value,
            "close": close,
            "metadata": metadata or {},
            "timeout": timeout,
        }
        if size is not None:
            payload["size"] = size
        if progress is not None:
            payload["progress"] = progress.to_json()
        if source is not None:
            payload["source"] = source.to_json()
        return info_from_json(self._call("POST", "commit", payload=payload, timeout=timeout + 5))

    def abort(self) -> None:
        self._call("DELETE")
