"""HTTP to pcache workers: what every request of a client goes through.

One keep-alive pool of :mod:`objstore.http1` connections per worker address (thread-safe, no
retries of its own beyond a stale idle connection: the client decides where a failed request
goes next; a quarter of urllib3's CPU per request, which a mount pays on every lookup and
commit), the cluster token on every request, JSON bodies. A worker that cannot be reached
(refused, reset, timed out) is :class:`WorkerUnavailable`; a worker's error answer is the
protocol's exception for it (:func:`pcache.protocol.error_from_response`), so callers catch
declared types, never status codes or messages.
"""

from __future__ import annotations

import json
import threading
from typing import Any
from urllib.parse import urlencode

from objstore.errors import EndpointUnreachable
from objstore.http1 import ConnectionPool, NetworkError, Response

from .protocol import TOKEN_HEADER, error_from_response

CONNECT_TIMEOUT_S = 3.0
POOL_SIZE = 64  # idle connections kept per worker (a mount's reader threads, its uploads)


class WorkerUnavailable(EndpointUnreachable):
    """No worker answered (connection refused, timeout)."""


class WorkerHTTP:
    """Requests to any worker of the cluster, kept-alive connections per worker.

    Args:
        token: the cluster token (sent as ``Authorization: Bearer``; never logged).
        timeout: seconds a request waits for its answer unless it says otherwise.
    """

    def __init__(self, token: str, timeout: float) -> None:
        self.timeout = timeout
        self._headers = {TOKEN_HEADER: f"Bearer {token}"}
        self._pools: dict[str, ConnectionPool] = {}
        self._lock = threading.Lock()
        self._closed = False

    def __repr__(self) -> str:
        return f"WorkerHTTP(timeout={self.timeout})"

    @property
    def headers(self) -> dict[str, str]:
        """The headers every request carries (the token among them)."""
        return self._headers

    def _pool(self, base: str) -> ConnectionPool:
        pool = self._pools.get(base)
        if pool is None:
            with self._lock:
                pool = self._pools.get(base)
                if pool is None:
                    if self._closed:
                        raise WorkerUnavailable("the client is closed", url=base)
                    pool = ConnectionPool(
                        base,
                        maxsize=POOL_SIZE,
                        connect_timeout=CONNECT_TIMEOUT_S,
                        read_timeout=self.timeout,
                    )
                    self._pools[base] = pool
        return pool

    def request(
        self,
        method: str,
        base: str,
        path: str,
        *,
        fields: dict[str, str] | None = None,
        body: bytes | None = None,
        payload: Any = None,
        timeout: float | None = None,
        headers: dict[str, str] | None = None,
    ) -> Response:
        """``method base+path`` (``fields``: its query); ``payload`` is sent as JSON. The
        whole answer is read.

        Raises:
            WorkerUnavailable: the worker could not be reached or did not answer in time.
            StorageError: its error answer, as the protocol's exception for it.
        """
        url = base + path
        target = path + ("?" + urlencode(fields) if fields else "")
        sent = {**self._headers, **(headers or {})}
        if payload is not None:
            body = json.dumps(payload).encode()
            sent["Content-Type"] = "application/json"
        try:
            response = self._pool(base).request(
                method, target, sent, body, timeout=timeout or self.timeout
            )
        except NetworkError as exc:
            raise WorkerUnavailable(f"pcache worker {base} unreachable: {exc}", url=url) from exc
        if response.status >= 400:
            try:
                detail = json.loads(response.data)
            except ValueError:
                detail = None
            raise error_from_response(response.status, detail, url)
        return response

    def json(self, method: str, base: str, path: str, **kwargs: Any) -> Any:
        """:meth:`request`, its answer decoded from JSON."""
        return json.loads(self.request(method, base, path, **kwargs).data)

    def close(self) -> None:
        with self._lock:
            self._closed = True
            pools, self._pools = list(self._pools.values()), {}
        for pool in pools:
            pool.close()
