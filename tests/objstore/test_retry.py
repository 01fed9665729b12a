"""Retries (backoff, jitter, deadline), the AIMD concurrency limiter and the ``retrying``
decorator. No test sleeps for real except where threads must overlap, and then briefly."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
import types

import pytest

import objstore.retry as retry_mod
from objstore.errors import (
    AccessDenied,
    EndpointUnreachable,
    InvalidKey,
    ObjectNotFound,
    SlowDown,
    TransientError,
)
from objstore.retry import AIMDLimiter, RetryPolicy, call_with_retry, retry_policy, retrying

pytestmark = pytest.mark.timeout(60)


class Flaky:
    """A callable that raises the given errors in turn, then returns ``result``."""

    def __init__(self, errors: list[BaseException], result: object = "ok") -> None:
        self.errors = list(errors)
        self.result = result
        self.calls = 0

    def __call__(self) -> object:
        self.calls += 1
        if self.errors:
            raise self.errors.pop(0)
        return self.result


class FixedDelay(RetryPolicy):
    """A policy whose backoff is a constant, for exact deadline arithmetic."""

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        return 3.0


class FakeClock:
    """Stands in for ``time`` inside objstore.retry: sleeping advances the clock."""

    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def monotonic(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeClock:
    fake = FakeClock()
    monkeypatch.setattr(
        retry_mod, "time", types.SimpleNamespace(monotonic=fake.monotonic, sleep=fake.sleep)
    )
    return fake


# -- call_with_retry ----------------------------------------------------------------------------


@pytest.mark.parametrize("failures", [0, 1, 4])
def test_succeeds_after_transient_failures(failures: int) -> None:
    errors: list[BaseException] = [TransientError(f"boom {i}") for i in range(failures)]
    fn = Flaky(errors, result=42)
    slept: list[float] = []
    policy = RetryPolicy(max_attempts=5, base_delay=0.1, max_delay=10.0, deadline=1000.0)
    before = retry_mod.retry_count()
    assert call_with_retry(fn, policy, sleep=slept.append) == 42
    assert fn.calls == failures + 1
    assert len(slept) == failures
    assert retry_mod.retry_count() - before == failures  # counted for progress and metrics
    assert all(d > 0 for d in slept)


def test_retries_every_transient_subclass() -> None:
    fn = Flaky([EndpointUnreachable("refused"), SlowDown("slow"), TransientError("503")])
    slept: list[float] = []
    assert call_with_retry(fn, RetryPolicy(max_attempts=4), sleep=slept.append) == "ok"
    assert fn.calls == 4
    assert len(slept) == 3


@pytest.mark.parametrize(
    "error",
    [
        ObjectNotFound("no such key"),
        AccessDenied("denied"),
        InvalidKey("bad key"),
        ValueError("bad argument"),
        FileNotFoundError("plain builtin"),
    ],
)
def test_permanent_errors_raise_at_once(error: BaseException) -> None:
    fn = Flaky([error, TransientError("never reached")])
    slept: list[float] = []
    with pytest.raises(type(error)) as info:
        call_with_retry(fn, RetryPolicy(max_attempts=5), sleep=slept.append)
    assert info.value is error
    assert fn.calls == 1
    assert slept == []


def test_permanent_error_after_transient_ones_stops_retrying() -> None:
    denied = AccessDenied("denied")
    fn = Flaky([TransientError("a"), denied, TransientError("b")])
    slept: list[float] = []
    with pytest.raises(AccessDenied) as info:
        call_with_retry(fn, RetryPolicy(max_attempts=5), sleep=slept.append)
    assert info.value is denied
    assert fn.calls == 2
    assert len(slept) == 1


@pytest.mark.parametrize("max_attempts", [1, 2, 5])
def test_gives_up_after_max_attempts_with_the_last_error(max_attempts: int) -> None:
    errors: list[BaseException] = [TransientError(f"attempt {i}") for i in range(10)]
    expected_last = errors[max_attempts - 1]
    fn = Flaky(errors)
    slept: list[float] = []
    policy = RetryPolicy(max_attempts=max_attempts, base_delay=0.01, deadline=1000.0)
    with pytest.raises(TransientError) as info:
        call_with_retry(fn, policy, sleep=slept.append)
    assert info.value is expected_last
    assert fn.calls == max_attempts
    assert len(slept) == max_attempts - 1


def test_deadline_stops_retries_before_crossing_it(clock: FakeClock) -> None:
    # Attempts at t=0, 3, 6, 9; after the failure at t=9 a 3 s pause would end at 12 > 10.
    fn = Flaky([TransientError(f"e{i}") for i in range(100)])
    policy = FixedDelay(max_attempts=100, deadline=10.0)
    with pytest.raises(TransientError) as info:
        call_with_retry(fn, policy, sleep=clock.sleep)
    assert fn.calls == 4
    assert clock.sleeps == [3.0, 3.0, 3.0]
    assert str(info.value) == "e3"  # the last error, raised without a pointless final sleep


def test_deadline_counts_time_spent_in_calls(clock: FakeClock) -> None:
    def slow_failure() -> None:
        clock.now += 5.0  # each attempt itself takes 5 s
        raise TransientError("timeout")

    policy = FixedDelay(max_attempts=100, deadline=10.0)
    with pytest.raises(TransientError):
        call_with_retry(slow_failure, policy, sleep=clock.sleep)
    # t=5 fail, pause 3 -> t=8 < 10; t=13 fail, 13 + 3 > 10: stop.
    assert clock.sleeps == [3.0]


def test_pause_longer_than_deadline_means_no_retry() -> None:
    fn = Flaky([TransientError("once"), TransientError("twice")])
    slept: list[float] = []
    # The first pause is at least base_delay / 2 = 0.5 s, past the 0.4 s deadline.
    policy = RetryPolicy(max_attempts=10, base_delay=1.0, deadline=0.4)
    with pytest.raises(TransientError, match="once"):
        call_with_retry(fn, policy, sleep=slept.append)
    assert fn.calls == 1
    assert slept == []


def test_backoff_delays_in_call_with_retry_grow_within_bounds() -> None:
    policy = RetryPolicy(max_attempts=9, base_delay=0.1, max_delay=2.0, deadline=1e9)
    fn = Flaky([TransientError(str(i)) for i in range(20)])
    slept: list[float] = []
    with pytest.raises(TransientError):
        call_with_retry(fn, policy, sleep=slept.append)
    assert len(slept) == 8
    for attempt, pause in enumerate(slept, start=1):
        cap = min(policy.max_delay, policy.base_delay * 2 ** (attempt - 1))
        assert cap / 2 <= pause <= cap <= policy.max_delay
    assert slept[-1] > slept[0] * 4  # the backoff is exponential, not constant


def test_policy_delay_bounds_and_growth() -> None:
    policy = RetryPolicy(base_delay=0.2, max_delay=10.0)
    rng = random.Random(1234)
    for attempt in range(1, 40):
        cap = min(policy.max_delay, policy.base_delay * 2 ** (attempt - 1))
        samples = [policy.delay(attempt, rng) for _ in range(50)]
        assert all(cap / 2 <= d <= cap for d in samples), attempt
        assert max(samples) <= policy.max_delay
        assert len(set(samples)) > 1  # jittered
    # Equal jitter: the smallest delay of attempt n+1 is the largest of attempt n, until capped.
    for attempt in range(1, 6):
        assert policy.delay(attempt + 1, rng) >= policy.delay(attempt, rng)
    assert policy.delay(1, rng) <= 0.2
    assert policy.delay(30, rng) >= 5.0


def test_default_delay_uses_module_random(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(retry_mod.random, "uniform", lambda lo, hi: hi)
    assert RetryPolicy(base_delay=0.5, max_delay=3.0).delay(3) == 2.0
    assert RetryPolicy(base_delay=0.5, max_delay=3.0).delay(4) == 3.0


def test_slowdown_tells_the_limiter() -> None:
    limiter = AIMDLimiter(initial=16, minimum=1, maximum=64)
    fn = Flaky([SlowDown("slow 1"), TransientError("503"), SlowDown("slow 2")], result="done")
    slept: list[float] = []
    assert call_with_retry(fn, RetryPolicy(max_attempts=5), limiter=limiter, sleep=slept.append)
    assert limiter.slowdowns == 2  # the plain TransientError did not count
    assert limiter.limit == 4


def test_slowdown_on_the_last_attempt_still_lowers_the_limit() -> None:
    limiter = AIMDLimiter(initial=8)
    with pytest.raises(SlowDown):
        call_with_retry(
            Flaky([SlowDown("x")]),
            RetryPolicy(max_attempts=1),
            limiter=limiter,
            sleep=lambda s: None,
        )
    assert limiter.slowdowns == 1
    assert limiter.limit == 4


def test_slowdown_without_limiter_is_just_retried() -> None:
    fn = Flaky([SlowDown("slow")])
    assert call_with_retry(fn, RetryPolicy(), sleep=lambda s: None) == "ok"
    assert fn.calls == 2


def test_each_retry_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger="objstore.retry")
    fn = Flaky([TransientError("flaky-503"), TransientError("flaky-503")])
    call_with_retry(fn, RetryPolicy(max_attempts=3), describe="stat s3://b/k", sleep=lambda s: None)
    messages = [r.getMessage() for r in caplog.records if r.name == "objstore.retry"]
    assert len(messages) == 2  # no limiter: only the two retry lines
    assert all("stat s3://b/k" in m and "flaky-503" in m for m in messages)
    assert "retry 1/2" in messages[0] and "retry 2/2" in messages[1]


# -- AIMDLimiter --------------------------------------------------------------------------------


def test_limiter_halves_on_slowdown_not_below_minimum() -> None:
    limiter = AIMDLimiter(initial=16, minimum=3, maximum=64)
    seen = []
    for _ in range(5):
        limiter.on_slowdown()
        seen.append(limiter.limit)
    assert seen == [8, 4, 3, 3, 3]
    assert limiter.slowdowns == 5


def test_limiter_grows_about_one_per_window_of_successes() -> None:
    limiter = AIMDLimiter(initial=4, minimum=1, maximum=100)
    for _ in range(4):
        with limiter:
            pass
    assert limiter.limit in (4, 5)  # +1/limit per success: about +1 after `limit` successes
    for _ in range(4 + 5 + 6 + 7):
        with limiter:
            pass
    assert 7 <= limiter.limit <= 9
    # Growth is additive, not multiplicative: 200 more successes add far less than 200 / 8.
    for _ in range(200):
        with limiter:
            pass
    assert 15 <= limiter.limit <= 25
    assert limiter.in_flight == 0


def test_limiter_failures_do_not_grow_it() -> None:
    limiter = AIMDLimiter(initial=4, minimum=1, maximum=100)
    for _ in range(50):
        with pytest.raises(TransientError), limiter:
            raise TransientError("x")
    assert limiter.limit == 4
    assert limiter.in_flight == 0  # released even though the body raised


def test_limiter_never_exceeds_maximum() -> None:
    limiter = AIMDLimiter(initial=6, minimum=1, maximum=7)
    for _ in range(500):
        with limiter:
            assert limiter.in_flight == 1
    assert limiter.limit == 7
    assert limiter.in_flight == 0


def test_limiter_recovers_after_slowdown() -> None:
    limiter = AIMDLimiter(initial=32, minimum=1, maximum=32)
    for _ in range(4):
        limiter.on_slowdown()
    assert limiter.limit == 2
    for _ in range(20):
        with limiter:
            pass
    assert 4 <= limiter.limit <= 8


@pytest.mark.parametrize(
    ("initial", "minimum", "maximum"),
    [(1, 0, 4), (0, 0, 4), (2, 3, 4), (5, 1, 4), (4, 5, 4), (-1, 1, 4)],
)
def test_limiter_constructor_validation(initial: int, minimum: int, maximum: int) -> None:
    with pytest.raises(ValueError, match="minimum <= initial <= maximum"):
        AIMDLimiter(initial=initial, minimum=minimum, maximum=maximum)


def test_limiter_constructor_accepts_edges() -> None:
    assert AIMDLimiter(initial=1, minimum=1, maximum=1).limit == 1
    assert AIMDLimiter().limit == 16


def test_limiter_bounds_concurrency_across_threads() -> None:
    limiter = AIMDLimiter(initial=3, minimum=1, maximum=3)
    lock = threading.Lock()
    inside = 0
    peak = 0
    over_limit: list[int] = []
    start = threading.Barrier(8)
    errors: list[BaseException] = []

    def worker() -> None:
        nonlocal inside, peak
        try:
            start.wait(timeout=10)
            for _ in range(15):
                with limiter:
                    with lock:
                        inside += 1
                        peak = max(peak, inside)
                        if limiter.in_flight > 3:
                            over_limit.append(limiter.in_flight)
                    threading.Event().wait(0.002)  # hold the slot so threads overlap
                    with lock:
                        inside -= 1
        except BaseException as exc:  # surface failures from the thread
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a thread hung in the limiter"
    assert errors == []
    assert peak <= 3
    assert over_limit == []
    assert peak >= 2  # the threads did overlap, so the bound was actually exercised
    assert limiter.in_flight == 0
    assert inside == 0


def test_limiter_blocks_at_the_limit_until_a_slot_frees() -> None:
    limiter = AIMDLimiter(initial=1, minimum=1, maximum=1)
    entered = threading.Event()

    def second() -> None:
        with limiter:
            entered.set()

    with limiter:
        thread = threading.Thread(target=second)
        thread.start()
        assert not entered.wait(0.2)  # held out while the only slot is taken
        assert limiter.in_flight == 1
    assert entered.wait(10)  # let in once it is released
    thread.join(10)
    assert limiter.in_flight == 0


# -- the retrying decorator ---------------------------------------------------------------------


class FakeStore:
    def __init__(self, errors: list[BaseException], limiter: AIMDLimiter | None = None) -> None:
        self.retry_policy = RetryPolicy(max_attempts=4, base_delay=0.001, max_delay=0.002)
        self.url = "s3://bkt/pre/"
        self.limiter = limiter
        self.errors = list(errors)
        self.calls: list[tuple[str, int]] = []

    @retrying
    def stat(self, key: str, *, size: int = 0) -> str:
        """Look a key up."""
        self.calls.append((key, size))
        if self.errors:
            raise self.errors.pop(0)
        return f"{key}:{size}"


class NoLimiterStore:
    retry_policy = RetryPolicy(max_attempts=2, base_delay=0.001, max_delay=0.001)
    url = "file:///x"

    def __init__(self) -> None:
        self.calls = 0

    @retrying
    def op(self) -> int:
        self.calls += 1
        if self.calls == 1:
            raise SlowDown("slow")
        return self.calls


def test_retrying_decorator_retries_with_the_instance_policy(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="objstore.retry")
    limiter = AIMDLimiter(initial=8)
    store = FakeStore([TransientError("t1"), SlowDown("s1")], limiter=limiter)
    assert store.stat("k", size=3) == "k:3"
    assert store.calls == [("k", 3)] * 3  # arguments passed unchanged on every attempt
    assert limiter.slowdowns == 1 and limiter.limit == 4
    retries = [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert len(retries) == 2
    assert all(m.startswith("stat s3://bkt/pre/ failed") for m in retries)  # method and URL


def test_retrying_decorator_gives_up_and_passes_permanent_errors() -> None:
    store = FakeStore([TransientError(str(i)) for i in range(10)])
    with pytest.raises(TransientError, match=r"^3$"):
        store.stat("k")
    assert len(store.calls) == 4  # the instance's max_attempts

    missing = ObjectNotFound("gone")
    store = FakeStore([missing])
    with pytest.raises(ObjectNotFound) as info:
        store.stat("k")
    assert info.value is missing
    assert len(store.calls) == 1


def test_retrying_decorator_keeps_metadata_and_works_without_limiter() -> None:
    assert FakeStore.stat.__name__ == "stat"
    assert FakeStore.stat.__doc__ == "Look a key up."
    assert FakeStore.stat.__wrapped__ is not None  # type: ignore[attr-defined]
    store = NoLimiterStore()
    assert store.op() == 2


def test_retrying_reads_the_policy_at_call_time() -> None:
    store = FakeStore([TransientError("a"), TransientError("b")])
    store.retry_policy = RetryPolicy(max_attempts=1)
    with pytest.raises(TransientError, match="a"):
        store.stat("k")
    assert len(store.calls) == 1


def test_a_retry_policy_block_overrides_the_store_policy() -> None:
    store = FakeStore([TransientError(str(i)) for i in range(10)])
    with (
        retry_policy(RetryPolicy(max_attempts=2, base_delay=0.001)),
        pytest.raises(TransientError, match=r"^1$"),
    ):
        store.stat("k")
    assert len(store.calls) == 2  # the block's two attempts, not the store's four
    with pytest.raises(TransientError, match=r"^5$"):
        store.stat("k")  # outside it: the store's four attempts again
    assert len(store.calls) == 6


def test_a_retry_policy_block_reaches_to_thread_not_other_threads() -> None:
    async def main() -> tuple[FakeStore, FakeStore]:
        inside = FakeStore([TransientError("a"), TransientError("b")])
        plain = FakeStore([TransientError("a")])
        with retry_policy(RetryPolicy(max_attempts=1)):
            with pytest.raises(TransientError):
                await asyncio.to_thread(inside.stat, "k")
            thread = threading.Thread(target=plain.stat, args=("k",))  # no context of ours
            thread.start()
            thread.join()
        return inside, plain

    inside, plain = asyncio.run(main())
    assert len(inside.calls) == 1 and len(plain.calls) == 2
