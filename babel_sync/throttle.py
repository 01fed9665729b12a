"""Shared limits for a job's worker threads: a bandwidth token bucket and a memory budget.

Both are thread-safe and block the calling worker, which is what a thread-pool engine wants:
a worker waiting for tokens or buffer space simply does not issue its next request.
"""

from __future__ import annotations

import logging
import threading
import time

log = logging.getLogger(__name__)


class Bandwidth:
    """A token bucket of ``rate`` bytes per second (``None``: unlimited), shared by all workers.

    Bursts up to one second of traffic; a request larger than the bucket waits proportionally.
    """

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self._tokens = float(rate or 0)
        self._stamp = time.monotonic()
        self._lock = threading.Lock()

    def consume(self, nbytes: int) -> None:
        wait = self.reserve(nbytes)
        if wait > 0:
            time.sleep(wait)

    def reserve(self, nbytes: int) -> float:
        """Take ``nbytes`` from the bucket; returns how long the caller must wait first."""
        if not self.rate or nbytes <= 0:
            return 0.0
        with self._lock:
            now = time.monotonic()
            self._tokens = min(self.rate, self._tokens + (now - self._stamp) * self.rate)
            self._stamp = now
            self._tokens -= nbytes
            return -self._tokens / self.rate if self._tokens < 0 else 0.0


class MemoryBudget:
    """At most ``limit`` bytes of transfer buffers in flight across the job.

    A single request larger than the whole budget is admitted alone (it could never fit), so a
    misconfigured small budget slows the job down instead of deadlocking it.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._used = 0
        self._cond = threading.Condition()

    def acquire(self, nbytes: int) -> None:
        with self._cond:
            while self._used > 0 and self._used + nbytes > self.limit:
                self._cond.wait()
            self._used += nbytes

    def release(self, nbytes: int) -> None:
        with self._cond:
            self._used -= nbytes
            self._cond.notify_all()

    @property
    def used(self) -> int:
        return self._used


class Throughput:
    """EWMA of per-stream transfer rate (bytes/s), for sizing parts by measured bandwidth."""

    def __init__(self, alpha: float = 0.2) -> None:
        self._alpha = alpha
        self._rate: float | None = None
        self._lock = threading.Lock()

    def record(self, nbytes: int, seconds: float) -> None:
        if seconds <= 0 or nbytes <= 0:
            return
        sample = nbytes / seconds
        with self._lock:
            self._rate = (
                sample if self._rate is None else self._rate + self._alpha * (sample - self._rate)
            )

    @property
    def rate(self) -> float | None:
        return self._rate
