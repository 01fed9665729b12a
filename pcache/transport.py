"""HTTP to pcache workers: what every request of a client goes through.

One connection pool per client (thread-safe, no retries of its own: the client decides where a
failed request goes next), the cluster token on every request, JSON bodies. A worker that
cannot be reached (refused, reset, timed out) is :class:`WorkerUnavailable`; a worker's error
answer is the protocol's exception for it (:func:`pcache.protocol.error_from_response`), so
callers catch declared types, never status codes or messages.
"""

from __future__ import annotations

import json
from typing import Any

import urllib3

from objstore.errors import EndpointUnreachable

from .protocol import TOKEN_HEADER, error_from_response

CONNECT_TIMEOUT_S = 3.0


class WorkerUnavailable(EndpointUnreachable):
    """No worker answered (connection refused, timeout)."""


class WorkerHTTP:
    """Requests to any worker of the cluster with one pool of connections.

    Args:
        token: the cluster token (sent as ``Authorization: Bearer``; never logged).
        timeout: seconds a request waits for its answer unless it says otherwise.
    """

    def __init__(self, token: str, timeout: float) -> None:
        self.timeout = timeout
        self._pool = urllib3.PoolManager(
            maxsize=64,
            block=False,
            retries=False,
            timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=timeout),
            headers={TOKEN_HEADER: f"Bearer {token}"},
        )

    def __repr__(self) -> str:
        return f"WorkerHTTP(timeout={self.timeout})"

    @property
    def headers(self) -> dict[str, str]:
        """The headers every request carries (the token among them)."""
        return self._pool.headers  # type: ignore[return-value]

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
    ) -> urllib3.BaseHTTPResponse:
        """``method base+path``; ``payload`` is sent as JSON. The whole answer is read.

        Raises:
            WorkerUnavailable: the worker could not be reached or did not answer in time.
            StorageError: its error answer, as the protocol's exception for it.
        """
        url = base + path
        headers = dict(headers or {})
        if payload is not None:
            body = json.dumps(payload).encode()
            headers["Content-Type"] = "application/json"
        try:
            response = self._pool.request(
                method,
                url,
                fields=fields,
                body=body,
                headers={**self._pool.headers, **headers},
                timeout=urllib3.Timeout(connect=CONNECT_TIMEOUT_S, read=timeout or self.timeout),
                preload_content=True,
            )
        except urllib3.exceptions.HTTPError as exc:
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
        self._pool.clear()
