"""Prometheus metrics of one decision service instance, in its own registry.

The per-Check figures (decisions by outcome and code, decision latency) are plain ints and
a float bumped by the event loop, the one thread that records decisions, and turned into
metric families at scrape time: prometheus_client's own Counter and Histogram take a lock
per increment and walk the buckets in Python, a few per cent of a Check's CPU (profiled).
Policy revision, reload counts and load times are read from the ``PolicyState`` at scrape
time too, so a reload costs nothing here and the figures can never drift from the state.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from authz.state import PolicyState

__all__ = ["AuthzMetrics"]

LATENCY_BUCKETS = (
    0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25,
)  # fmt: skip


class _PolicyCollector(Collector):
    def __init__(self, state: PolicyState) -> None:
        self._state = state

    def collect(self) -> Iterator[Any]:
        s = self._state
        info = InfoMetricFamily(
            "citadel_authz_policy", "The policy revision serving decisions now."
        )
        info.add_metric([], {"revision": s.revision, "engine": str(s.engine.kind)})
        yield info
        loaded = GaugeMetricFamily(
            "citadel_authz_policy_loaded_timestamp_seconds",
            "When the serving revision was loaded (Unix time).",
        )
        loaded.add_metric([], s.loaded_at)
        yield loaded
        reloads = CounterMetricFamily(
            "citadel_authz_policy_reloads",
            "Policy reloads since start, by outcome (a failed one leaves the last good serving).",
            labels=["outcome"],
        )
        reloads.add_metric(["ok"], s.reloads_ok)
        reloads.add_metric(["failed"], s.reloads_failed)
        yield reloads
        err = GaugeMetricFamily(
            "citadel_authz_policy_last_load_failed",
            "1 if the most recent load attempt was refused, else 0.",
        )
        err.add_metric([], 0.0 if not s.history or s.history[-1].ok else 1.0)
        yield err


class _DecisionCollector(Collector):
    def __init__(self, metrics: AuthzMetrics) -> None:
        self._m = metrics

    def collect(self) -> Iterator[Any]:
        m = self._m
        decisions = CounterMetricFamily(
            "citadel_authz_decisions",
            "Decisions by outcome (allow/deny) and code (why).",
            labels=["outcome", "code"],
        )
        for (outcome, code), n in sorted(m._counts.items()):
            decisions.add_metric([outcome, code], n)
        yield decisions
        buckets, total = [], 0
        for bound, n in zip((*LATENCY_BUCKETS, float("inf")), list(m._buckets), strict=True):
            total += n
            buckets.append((floatToGoString(bound), total))
        yield HistogramMetricFamily(
            "citadel_authz_decision_seconds",
            "Time from receiving a Check to its decision being on record.",
            buckets=buckets,
            sum_value=m._sum,
        )


class AuthzMetrics:
    """Decision counters and latency, plus policy state, in ``registry``."""

    def __init__(self, *, state: PolicyState, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.audit_failures = Counter(
            "citadel_authz_audit_failures",
            "Decisions denied because their audit record could not be written.",
            registry=self.registry,
        )
        self._counts: dict[tuple[str, str], int] = {}
        self._buckets = [0] * (len(LATENCY_BUCKETS) + 1)  # the last: above every bound
        self._sum = 0.0
        self.registry.register(_PolicyCollector(state))
        self.registry.register(_DecisionCollector(self))

    def count(self, outcome: str, code: str, seconds: float) -> None:
        """One decision (called on the event loop that records decisions)."""
        key = (outcome, code)
        counts = self._counts
        counts[key] = counts.get(key, 0) + 1
        self._buckets[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self._sum += seconds

    def decisions(self, outcome: str, code: str) -> int:
        """Decisions counted so far with this outcome and code."""
        return self._counts.get((outcome, code), 0)
