"""Overload protection for the CA: shed early and say when to come back.

A CA that queues every request in a renewal storm (every pod of a rollout at once, or
every sidecar after a CA restart — SPIRE servers fall over exactly so) answers all of them
late, after their deadlines, and does the work anyway. This module makes the CA refuse
the excess *fast* with ``RESOURCE_EXHAUSTED`` and a retry hint, so callers back off
(istio-agent and citadel's agent both honour it) and the CA keeps serving what it can.

Four independent limits, each cheap to check and bounded in memory:

- a concurrency cap (calls inside the servicer at once): bounds memory and the latency
  of what is admitted;
- a global token bucket checked *before* the token is verified: bounds the work an
  unauthenticated flood can cause;
- a per-identity token bucket keyed by the verified token subject, checked *after*
  verification (keyed on an unverified claim, a forger could drain a victim's bucket):
  one misbehaving workload cannot starve the rest. Many pods share one service account,
  so the default burst is generous enough for a rollout of a few hundred replicas;
- a deadline floor: a call that reaches the servicer with less than ``min_time_left`` of
  its deadline left (it waited in gRPC's own queue behind a storm) is shed before any
  work. Issuing it would sign a certificate the caller has already given up on; shedding
  it is audited and carries a retry hint like every other shed.

The per-identity table is an LRU of at most ``max_identities`` buckets; evicting one only
forgets a partly drained bucket, never grants more than ``burst`` at once.

When the concurrency cap sheds, the hint is not a fixed second: a fleet of 10,000 agents
told "1 s" comes back as one wave and is shed again, and refusing costs the CA nearly half
of what issuing does. ``DrainEstimate`` measures what the CA completes per second and how
many callers it turned away recently, and spreads each shed caller's hint uniformly over
the time the CA needs to drain them, so retries arrive about as fast as they can be served.
"""

from __future__ import annotations

import math
import random
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import Final

from citadel.errors import ConfigError, Overloaded

__all__ = [
    "DEFAULT_IDENTITY_BURST",
    "DEFAULT_IDENTITY_RATE",
    "DEFAULT_MAX_IN_FLIGHT",
    "DEFAULT_MIN_TIME_LEFT",
    "DEFAULT_RATE",
    "MAX_DRAIN_HINT",
    "DrainEstimate",
    "Limits",
    "RateLimiter",
    "TokenBucket",
]

#: Per process. Several times what one core can sign, so it only bounds floods.
DEFAULT_RATE: Final = 5000.0
#: Per service account: steady renewals of thousands of pods are far below this.
DEFAULT_IDENTITY_RATE: Final = 20.0
#: A rollout restarting a few hundred replicas of one account at once still fits.
DEFAULT_IDENTITY_BURST: Final = 400.0
#: Calls inside the servicer at once (waiting on TokenReview, signing, auditing).
DEFAULT_MAX_IN_FLIGHT: Final = 512
MAX_IDENTITIES: Final = 100_000
#: Seconds of deadline a call must still have when it reaches the servicer (0: no floor).
#: Well under any sane CSR timeout, well over what an issuance costs on a busy CA.
DEFAULT_MIN_TIME_LEFT: Final = 0.05
#: The longest retry hint a shed caller is given (seconds); agents cap what they obey too.
MAX_DRAIN_HINT: Final = 30


class TokenBucket:
    """``rate`` tokens per second up to ``burst``; not thread-safe (callers lock)."""

    __slots__ = ("burst", "last", "rate", "tokens")

    def __init__(self, rate: float, burst: float, now: float) -> None:
        self.rate, self.burst = rate, burst
        self.tokens, self.last = burst, now

    def take(self, now: float) -> float:
        """Take one token: 0.0 if granted, else seconds until one will be available."""
        if now > self.last:
            self.tokens = min(self.burst, self.tokens + (now - self.last) * self.rate)
            self.last = now
        if self.tokens >= 1.0:
            self.tokens -= 1.0
            return 0.0
        return (1.0 - self.tokens) / self.rate


@dataclass(frozen=True)
class Limits:
    """Operator settings; a rate of 0 disables that limit."""

    rate: float = DEFAULT_RATE
    #: Defaults to one second's worth of ``rate``.
    burst: float | None = None
    identity_rate: float = DEFAULT_IDENTITY_RATE
    identity_burst: float | None = None
    max_in_flight: int = DEFAULT_MAX_IN_FLIGHT
    max_identities: int = MAX_IDENTITIES
    #: Calls arriving with less of their deadline left are shed (calls without one never).
    min_time_left: float = DEFAULT_MIN_TIME_LEFT

    def __post_init__(self) -> None:
        for label, value in (
            ("--rate-limit", self.rate),
            ("--rate-limit-per-identity", self.identity_rate),
        ):
            if not math.isfinite(value) or value < 0:
                raise ConfigError(f"{label} must be a number of requests per second >= 0")
        for label, burst in (("burst", self.burst), ("per-identity burst", self.identity_burst)):
            if burst is not None and (not math.isfinite(burst) or burst < 1):
                raise ConfigError(f"rate-limit {label} must be at least 1")
        if self.max_in_flight < 1:
            raise ConfigError("--max-in-flight must be at least 1")
        if not math.isfinite(self.min_time_left) or self.min_time_left < 0:
            raise ConfigError("--min-time-left must be a number of seconds >= 0")
        if self.max_identities < 1:
            raise ConfigError("the per-identity table needs room for at least one identity")

    @property
    def effective_burst(self) -> float:
        return self.burst if self.burst is not None else max(1.0, self.rate)

    @property
    def effective_identity_burst(self) -> float:
        if self.identity_burst is not None:
            return self.identity_burst
        if self.identity_rate == DEFAULT_IDENTITY_RATE:
            return DEFAULT_IDENTITY_BURST
        return max(1.0, 20 * self.identity_rate)


def _retry_after(wait: float) -> float:
    """Whole seconds, at least 1: what ``retry-after`` carries and clients parse."""
    return float(max(1, math.ceil(wait)))


class RateLimiter:
    """The global and per-identity buckets of one CA process. Thread-safe."""

    def __init__(self, limits: Limits, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.limits = limits
        self._clock = clock
        self._lock = threading.Lock()
        now = clock()
        self._global = (
            TokenBucket(limits.rate, limits.effective_burst, now) if limits.rate > 0 else None
        )
        self._identities: OrderedDict[str, TokenBucket] = OrderedDict()
        self.shed_global = 0
        self.shed_identity = 0

    def check_global(self) -> None:
        """Raise ``Overloaded`` when the whole CA is over its request rate."""
        if self._global is None:
            return
        with self._lock:
            wait = self._global.take(self._clock())
            if not wait:
                return
            self.shed_global += 1
        retry = _retry_after(wait)
        raise Overloaded(
            f"the CA is over its request rate limit ({self.limits.rate:g}/s); "
            f"retry after {retry:g} s",
            retry_after=retry,
            reason="rate_limited",
        )

    def check_identity(self, identity: str) -> None:
        """Raise ``Overloaded`` when one verified identity asks too often."""
        rate = self.limits.identity_rate
        if rate <= 0:
            return
        with self._lock:
            now = self._clock()
            bucket = self._identities.get(identity)
            if bucket is None:
                bucket = TokenBucket(rate, self.limits.effective_identity_burst, now)
                self._identities[identity] = bucket
                if len(self._identities) > self.limits.max_identities:
                    self._identities.popitem(last=False)
            else:
                self._identities.move_to_end(identity)
            wait = bucket.take(now)
            if not wait:
                return
            self.shed_identity += 1
        retry = _retry_after(wait)
        raise Overloaded(
            f"{identity} is requesting certificates faster than this CA allows per "
            f"identity ({rate:g}/s); retry after {retry:g} s",
            retry_after=retry,
            reason="rate_limited_identity",
        )

    def tracked_identities(self) -> int:
        with self._lock:
            return len(self._identities)


class DrainEstimate:
    """Completions per second and recent refusals: how long until a backlog is served.

    Counted in windows of ``window`` seconds; the completion rate is smoothed across
    windows (EWMA) so one slow second does not swing the hints. Not thread-safe: one per
    event loop (the servicer calls it from its loop only).
    """

    def __init__(
        self,
        *,
        clock: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        window: float = 1.0,
        max_hint: int = MAX_DRAIN_HINT,
        initial_rate: float = 100.0,
    ) -> None:
        """``initial_rate``: completions per second assumed until a window is measured
        (a CA hit by a storm right after start has no history)."""
        self._clock = clock
        self._rng = rng or random.Random()  # noqa: S311 (spreading retries, not secrets)
        self._window = window
        self._max_hint = max_hint
        self._start = clock()
        self._done = 0
        self._shed = 0
        self._recent_shed = 0.0
        self.rate = 0.0
        self._initial_rate = initial_rate

    def _roll(self, now: float) -> None:
        elapsed = now - self._start
        if elapsed < self._window:
            return
        rate = self._done / elapsed
        self.rate = rate if self.rate == 0 else 0.5 * self.rate + 0.5 * rate
        # Callers shed in the last window are (mostly) still waiting to come back.
        self._recent_shed = self._shed if elapsed < 2 * self._window else 0.0
        self._start, self._done, self._shed = now, 0, 0

    def completed(self) -> None:
        self._roll(self._clock())
        self._done += 1

    def drain_seconds(self, in_flight: int) -> float:
        """Seconds to serve what is inside plus the callers recently turned away."""
        backlog = in_flight + self._shed + self._recent_shed
        return backlog / max(self.rate or self._initial_rate, 1.0)

    def shed_hint(self, in_flight: int) -> float:
        """Whole seconds for one shed caller: uniform over [1, drain time], capped."""
        self._roll(self._clock())
        self._shed += 1
        horizon = max(1, min(self._max_hint, math.ceil(self.drain_seconds(in_flight))))
        return float(self._rng.randint(1, horizon))
