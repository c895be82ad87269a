"""Token buckets and the limiter, on a fixed clock: what is shed, and the retry hint."""

from __future__ import annotations

import pytest

from citadel.ca.limits import (
    DEFAULT_IDENTITY_BURST,
    MAX_DRAIN_HINT,
    DrainEstimate,
    Limits,
    RateLimiter,
    TokenBucket,
)
from citadel.errors import ConfigError, Overloaded


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_bucket_burst_then_rate() -> None:
    b = TokenBucket(rate=10, burst=3, now=0.0)
    assert [b.take(0.0) for _ in range(3)] == [0.0, 0.0, 0.0]
    assert b.take(0.0) == pytest.approx(0.1)
    assert b.take(0.1) == 0.0  # one token refilled
    assert b.take(100.0) == 0.0 and b.tokens == pytest.approx(2.0)  # capped at burst


def test_global_limit_sheds_with_whole_second_hint() -> None:
    clock = Clock()
    lim = RateLimiter(Limits(rate=0.5, burst=1, identity_rate=0), clock=clock)
    lim.check_global()
    with pytest.raises(Overloaded) as info:
        lim.check_global()
    assert info.value.status == "RESOURCE_EXHAUSTED" and info.value.reason == "rate_limited"
    assert info.value.retry_after == 2.0 and "retry after 2 s" in info.value.message
    clock.now += 2
    lim.check_global()
    assert lim.shed_global == 1


def test_identity_limit_is_per_identity() -> None:
    clock = Clock()
    lim = RateLimiter(Limits(rate=0, identity_rate=1, identity_burst=2), clock=clock)
    lim.check_identity("a")
    lim.check_identity("a")
    with pytest.raises(Overloaded, match="retry after 1 s") as info:
        lim.check_identity("a")
    assert info.value.reason == "rate_limited_identity"
    lim.check_identity("b")  # someone else is unaffected
    clock.now += 1
    lim.check_identity("a")


def test_identity_table_is_bounded() -> None:
    lim = RateLimiter(Limits(rate=0, identity_rate=1, identity_burst=1, max_identities=3))
    for i in range(10):
        lim.check_identity(f"sa{i}")
    assert lim.tracked_identities() == 3


def test_zero_disables() -> None:
    lim = RateLimiter(Limits(rate=0, identity_rate=0))
    for _ in range(10_000):
        lim.check_global()
        lim.check_identity("a")


def test_defaults_fit_a_rollout() -> None:
    limits = Limits()
    assert limits.effective_identity_burst == DEFAULT_IDENTITY_BURST >= 200
    assert Limits(identity_rate=2).effective_identity_burst == 40
    assert Limits(rate=300).effective_burst == 300


@pytest.mark.parametrize(
    "kwargs",
    [
        {"rate": -1},
        {"rate": float("nan")},
        {"identity_rate": float("inf")},
        {"burst": 0.5},
        {"identity_burst": 0},
        {"max_in_flight": 0},
        {"min_time_left": -0.1},
        {"min_time_left": float("nan")},
    ],
    ids=["negative-rate", "nan-rate", "infinite-identity-rate", "burst-below-one",
         "identity-burst-zero", "no-in-flight", "negative-time-left", "nan-time-left"],
)  # fmt: skip
def test_bad_limits_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        Limits(**kwargs)  # type: ignore[arg-type]


def test_shed_hints_spread_over_the_drain_time() -> None:
    """A CA serving 100/s that turns away 1,000 callers tells them to come back over
    ~10 s, spread evenly, not all after 1 s (they would arrive as one wave again)."""
    import random

    clock = Clock()
    drain = DrainEstimate(clock=clock, rng=random.Random(1))
    for _ in range(100):  # one measured second: 100 completions
        drain.completed()
        clock.now += 0.0101
    drain.completed()
    assert drain.rate == pytest.approx(100, rel=0.02)
    hints = [drain.shed_hint(in_flight=0) for _ in range(1000)]
    assert all(h == int(h) and 1 <= h <= 10 for h in hints)
    late = hints[500:]  # by then the backlog says ~5-10 s
    assert max(late) == 10 and len(set(late)) >= 9
    assert sum(1 for h in late if h == 1) < 0.2 * len(late)
    # The next window still remembers who was turned away.
    clock.now += 1.0
    assert drain.drain_seconds(in_flight=0) >= 9


def test_shed_hint_is_bounded_and_starts_from_a_prior() -> None:
    import random

    clock = Clock()
    drain = DrainEstimate(clock=clock, rng=random.Random(2), initial_rate=100)
    assert drain.shed_hint(in_flight=50) == 1.0  # 51 callers at an assumed 100/s
    hints = [drain.shed_hint(in_flight=0) for _ in range(100_000)]
    assert max(hints) == MAX_DRAIN_HINT
