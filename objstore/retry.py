"""Retries with exponential backoff, jitter and a deadline, and an AIMD concurrency limiter.

Only :class:`~objstore.errors.TransientError` is retried; everything else (not found, access
denied, bad key) fails at once. A :class:`~objstore.errors.SlowDown` additionally tells an
attached :class:`AIMDLimiter` to halve the caller's concurrency, so a job running hundreds of
requests backs off as a whole instead of each request hammering a throttled service.
"""

from __future__ import annotations

import contextvars
import functools
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, TypeVar

from .errors import SlowDown, TransientError

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long to retry one operation.

    Attributes:
        max_attempts: total attempts including the first; 1 disables retries.
        base_delay: delay before the second attempt, in seconds; doubles each time.
        max_delay: cap on a single delay.
        deadline: give up once this many seconds have passed since the first attempt.
    """

    max_attempts: int = 5
    base_delay: float = 0.2
    max_delay: float = 10.0
    deadline: float = 60.0

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Full-jitter backoff before retry number ``attempt`` (1-based)."""
        cap = min(self.max_delay, self.base_delay * (2 ** (attempt - 1)))
        return (rng or random).uniform(cap / 2, cap)


class AIMDLimiter:
    """Additive-increase / multiplicative-decrease limit on concurrent requests.

    Thread-safe. Callers wrap each request in ``with limiter:``; a request blocks while the
    number in flight is at the limit. ``on_slowdown()`` halves the limit (not below
    ``minimum``), each success raises it by ``1/limit`` (so about +1 per round trip of the
    whole window), up to ``maximum``.
    """

    def __init__(self, initial: int = 16, minimum: int = 1, maximum: int = 256) -> None:
        if not 1 <= minimum <= initial <= maximum:
            raise ValueError("AIMDLimiter needs 1 <= minimum <= initial <= maximum")
        self.minimum = minimum
        self.maximum = maximum
        self._limit = float(initial)
        self._in_flight = 0
        self._cond = threading.Condition()
        self.slowdowns = 0

    @property
    def limit(self) -> int:
        return int(self._limit)

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def __enter__(self) -> AIMDLimiter:
        with self._cond:
            while self._in_flight >= int(self._limit):
                self._cond.wait()
            self._in_flight += 1
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        with self._cond:
            self._in_flight -= 1
            if exc_type is None:
                self._limit = min(float(self.maximum), self._limit + 1.0 / self._limit)
            self._cond.notify_all()

    def on_slowdown(self) -> None:
        with self._cond:
            self.slowdowns += 1
            self._limit = max(float(self.minimum), self._limit / 2)
            log.info("throttled by the service: concurrency limit now %d", int(self._limit))


_retries = 0
_retries_lock = threading.Lock()


def retry_count() -> int:
    """Requests this process has retried so far (for progress reports and metrics)."""
    return _retries


def call_with_retry(
    fn: Callable[[], T],
    policy: RetryPolicy,
    *,
    limiter: AIMDLimiter | None = None,
    describe: str = "",
    sleep: Callable[[float], None] = time.sleep,
) -> T:
    """Call ``fn`` until it succeeds, fails permanently, or the policy is exhausted.

    Args:
        fn: the operation; it must be safe to repeat (callers rewind streams themselves).
        policy: attempts, backoff and deadline.
        limiter: told about throttling so the caller's overall concurrency drops.
        describe: what is being done, for the log line of each retry.
        sleep: injectable for tests.

    Raises:
        The last TransientError once attempts or the deadline run out; any other error at once.
    """
    start = time.monotonic()
    attempt = 1
    while True:
        try:
            return fn()
        except TransientError as exc:
            if isinstance(exc, SlowDown) and limiter is not None:
                limiter.on_slowdown()
            elapsed = time.monotonic() - start
            if attempt >= policy.max_attempts:
                raise
            pause = policy.delay(attempt)
            if elapsed + pause > policy.deadline:
                raise
            # INFO, not WARNING: a retried request that then succeeds is routine, and a CLI must
            # print one line for a failure, not one per attempt (-v shows them).
            log.info(
                "%s failed (%s), retry %d/%d in %.2fs",
                describe or getattr(fn, "__name__", "request"),
                exc,
                attempt,
                policy.max_attempts - 1,
                pause,
            )
            global _retries
            with _retries_lock:
                _retries += 1
            sleep(pause)
            attempt += 1


_override: contextvars.ContextVar[RetryPolicy | None] = contextvars.ContextVar(
    "objstore_retry_policy", default=None
)


@contextmanager
def retry_policy(policy: RetryPolicy) -> Iterator[None]:
    """Within the block (this thread or task, and threads started with its context, as
    ``asyncio.to_thread`` does), store requests retry by ``policy`` instead of their store's:
    a caller with a fallback (a stale answer to give while the store is down) need not wait out
    the store's whole retry deadline."""
    token = _override.set(policy)
    try:
        yield
    finally:
        _override.reset(token)


def retrying(method: Callable[..., T]) -> Callable[..., T]:
    """Decorate a Store method so it retries transient errors with ``self.retry_policy`` (or
    the policy of an enclosing :func:`retry_policy` block).

    The wrapped method must be idempotent for its arguments; methods that take a stream
    must rewind it themselves at the start of each attempt.
    """

    @functools.wraps(method)
    def wrapper(self: Any, *args: Any, **kwargs: Any) -> T:
        return call_with_retry(
            lambda: method(self, *args, **kwargs),
            _override.get() or self.retry_policy,
            limiter=getattr(self, "limiter", None),
            describe=f"{method.__name__} {self.url}",
        )

    return wrapper
