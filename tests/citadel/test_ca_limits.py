"""Token buckets and the limiter, on a fixed clock: what is shed, and the retry hint."""

from __future__ import annotations

import pytest

from citadel.ca.limits import (
    DEFAULT_IDENTITY_BURST,
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
    ],
    ids=["negative-rate", "nan-rate", "infinite-identity-rate", "burst-below-one",
         "identity-burst-zero", "no-in-flight"],
)  # fmt: skip
def test_bad_limits_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ConfigError):
        Limits(**kwargs)  # type: ignore[arg-type]
