"""When to renew, and how long to wait after a failure.

Renewal happens at half the certificate's life, moved by a random jitter (±10 % of the
lifetime by default) so a fleet of pods started by one rollout does not hit the CA in the
same second every half-life. Failures back off exponentially with "equal jitter" (half the
delay fixed, half random): the delay never collapses to zero, yet retries spread out. A
server's retry hint (``retry-after`` on RESOURCE_EXHAUSTED) sets the earliest retry, with
jitter above it.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import datetime

__all__ = ["Backoff", "RenewalPolicy"]


@dataclass(frozen=True, slots=True)
class RenewalPolicy:
    """``fraction`` of the lifetime at which to renew, ± ``jitter`` (both fractions)."""

    fraction: float = 0.5
    jitter: float = 0.1
    #: Past this fraction of the lifetime a missing renewal is reported as "at risk".
    at_risk_fraction: float = 0.8

    def __post_init__(self) -> None:
        if not 0 < self.fraction < 1:
            raise ValueError("renewal fraction must be between 0 and 1")
        if not 0 <= self.jitter < min(self.fraction, 1 - self.fraction):
            raise ValueError("renewal jitter must keep the renewal time inside the lifetime")
        if not self.fraction + self.jitter <= self.at_risk_fraction <= 1:
            raise ValueError("at-risk fraction must be after the latest renewal time")

    def renew_at(
        self, not_before: datetime, not_after: datetime, *, rng: random.Random
    ) -> datetime:
        lifetime = not_after - not_before
        frac = self.fraction + rng.uniform(-self.jitter, self.jitter)
        return not_before + lifetime * frac

    def at_risk_at(self, not_before: datetime, not_after: datetime) -> datetime:
        return not_before + (not_after - not_before) * self.at_risk_fraction


@dataclass(slots=True)
class Backoff:
    """Exponential backoff with equal jitter; ``reset`` after a success."""

    initial: float = 0.5
    maximum: float = 30.0
    multiplier: float = 2.0
    rng: random.Random = field(default_factory=random.Random)
    attempt: int = 0
    #: A server's retry hint is the earliest time to come back; the wait is drawn from
    #: [hint, hint * (1 + hint_jitter)].
    hint_jitter: float = 0.5

    def next_delay(self, *, floor: float = 0.0) -> float:
        """The next wait in seconds; ``floor`` honours a server's retry hint.

        A hint is never followed to the millisecond: a CA sheds a whole wave of agents in
        the same second with the same whole-second ``retry-after``, and agents that all
        came back exactly then would arrive as the same wave, to be shed again.
        """
        cap = min(self.maximum, self.initial * self.multiplier**self.attempt)
        self.attempt += 1
        delay = cap / 2 + self.rng.uniform(0, cap / 2)
        hint = min(floor, self.maximum * 4)
        if hint > delay:
            delay = hint + self.rng.uniform(0, hint * self.hint_jitter)
        return delay

    def reset(self) -> None:
        self.attempt = 0
