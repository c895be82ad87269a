"""Decision metrics as Prometheus reads them: counts by outcome and code, and a latency
histogram whose buckets follow Prometheus' ``le`` (less than or equal) rule."""

from __future__ import annotations

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from authz.engine import build_engine
from authz.metrics import LATENCY_BUCKETS, AuthzMetrics
from authz.policy import Policy
from authz.state import PolicyState
from tests.authz.test_reload import MODEL, SHOP


def _samples(metrics: AuthzMetrics) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    text = generate_latest(metrics.registry).decode()
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def test_counts_and_histogram_as_scraped() -> None:
    state = PolicyState(build_engine(Policy.from_texts(MODEL, SHOP)), source="test")
    m = AuthzMetrics(state=state)
    observed = [0.00002, LATENCY_BUCKETS[0], 0.0003, 0.0003, 0.02, 9.0]  # 9 s: above all
    for i, seconds in enumerate(observed):
        m.count("allow" if i % 2 else "deny", "allow" if i % 2 else "no_rule", seconds)
    got = _samples(m)
    assert got[("citadel_authz_decisions_total", (("code", "allow"), ("outcome", "allow")))] == 3
    assert got[("citadel_authz_decisions_total", (("code", "no_rule"), ("outcome", "deny")))] == 3
    assert m.decisions("allow", "allow") == 3 and m.decisions("deny", "x") == 0
    for bound in (*LATENCY_BUCKETS, float("inf")):
        le = "+Inf" if bound == float("inf") else repr(bound)
        key = ("citadel_authz_decision_seconds_bucket", (("le", le),))
        assert got[key] == sum(1 for s in observed if s <= bound), le
    assert got[("citadel_authz_decision_seconds_count", ())] == len(observed)
    assert abs(got[("citadel_authz_decision_seconds_sum", ())] - sum(observed)) < 1e-9
