"""The per-connection token bucket: a burst, then a steady rate, and an honest wait when refused."""

from __future__ import annotations

import pytest

from infinite_chat.ratelimit import TokenBucket


def bucket(rate: float = 5.0, burst: int = 10) -> TokenBucket:
    limiter = TokenBucket(rate, burst)
    limiter.stamp = 100.0  # a clock of the test's own
    return limiter


def test_a_full_burst_is_allowed_then_the_next_is_refused() -> None:
    limiter = bucket()
    assert [limiter.take(100.0) for _ in range(10)] == [0.0] * 10
    assert limiter.take(100.0) == pytest.approx(0.2)  # one token at 5 per second


def test_the_wait_shrinks_as_time_passes_and_a_refusal_takes_nothing() -> None:
    limiter = bucket()
    for _ in range(10):
        limiter.take(100.0)
    assert limiter.take(100.1) == pytest.approx(0.1)
    assert limiter.take(100.15) == pytest.approx(0.05)
    assert limiter.take(100.2) == 0.0  # the refusals did not use up the refilled token
    assert limiter.take(100.2) > 0


def test_the_steady_rate_is_allowed_forever() -> None:
    limiter = bucket()
    now = 100.0
    for _ in range(10):
        limiter.take(now)
    for _ in range(100):
        now += 0.2
        assert limiter.take(now) == 0.0


def test_an_idle_bucket_refills_only_up_to_the_burst() -> None:
    limiter = bucket(rate=5.0, burst=3)
    limiter.take(100.0)
    allowed = [limiter.take(1000.0) for _ in range(4)]
    assert allowed[:3] == [0.0, 0.0, 0.0]
    assert allowed[3] > 0


def test_it_runs_on_the_monotonic_clock_by_default() -> None:
    limiter = TokenBucket(1.0, 1)
    assert limiter.take() == 0.0
    assert 0.9 < limiter.take() <= 1.0
