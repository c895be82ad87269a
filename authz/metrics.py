"""Prometheus metrics of one decision service instance, in its own registry.

Counters on the hot path are pre-bound children (``labels()`` is a dict lookup plus a
lock; doing it once per outcome keeps it off every Check). Policy revision, reload counts
and load times are read from the ``PolicyState`` at scrape time by a collector, so a reload
costs nothing here and the figures can never drift from the state.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily
from prometheus_client.registry import Collector

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


class AuthzMetrics:
    """Decision counters and latency, plus policy state, in ``registry``."""

    def __init__(self, *, state: PolicyState, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        self.decisions = Counter(
            "citadel_authz_decisions",
            "Decisions by outcome (allow/deny) and code (why).",
            ["outcome", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "citadel_authz_decision_seconds",
            "Time from receiving a Check to its decision being on record.",
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.audit_failures = Counter(
            "citadel_authz_audit_failures",
            "Decisions denied because their audit record could not be written.",
            registry=self.registry,
        )
        self.registry.register(_PolicyCollector(state))
        self._children: dict[tuple[str, str], Any] = {}
        self._observe = self.latency.observe

    def count(self, outcome: str, code: str, seconds: float) -> None:
        key = (outcome, code)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = self.decisions.labels(outcome, code)
        child.inc()
        self._observe(seconds)
