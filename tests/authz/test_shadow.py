"""Shadow mode: the candidate decides beside the enforced policy and never changes it."""

from __future__ import annotations

import shutil
import time
from pathlib import Path

import pytest

from authz.engine import Decision
from authz.reload import initial_state
from authz.shadow import SHADOW_KIND, ShadowEvaluator
from citadel.audit import AuditLog, open_audit_log, read_records, verify_files
from citadel.errors import PolicyError

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "policies"
FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"
PROM = "spiffe://cluster.local/ns/ops/sa/prometheus"
ORDERS_HOST = "orders.shop.svc.cluster.local"

REQUESTS = [
    (FRONTEND, ORDERS_HOST, "/api/orders", "GET"),  # allow in both
    (FRONTEND, ORDERS_HOST, "/api/orders", "POST"),  # allow -> candidate denies
    (PROM, ORDERS_HOST, "/status", "GET"),  # deny -> candidate allows
    (PROM, ORDERS_HOST, "/metrics", "GET"),  # allow in both
    ("anonymous", ORDERS_HOST, "/api/orders", "GET"),  # deny in both
]


def candidate_dir(tmp_path: Path, extra: str = "") -> Path:
    d = tmp_path / "candidate"
    d.mkdir(exist_ok=True)
    shutil.copy(POLICIES / "model.conf", d)
    text = (POLICIES / "policy.csv").read_text()
    text = text.replace("/api/orders, ^(GET|POST)$, allow", "/api/orders, ^GET$, allow")
    text += f"\np, role:monitoring, *.shop.svc.cluster.local, /status, ^GET$, allow\n{extra}"
    (d / "policy.csv").write_text(text)
    return d


def test_disagreements_counted_and_recorded(tmp_path: Path) -> None:
    enforced = initial_state(POLICIES)
    log_path = tmp_path / "audit.jsonl"
    audit = open_audit_log(log_path, name="authz")
    shadow = ShadowEvaluator.from_dir(candidate_dir(tmp_path), audit=audit)
    results = []
    for i, t in enumerate(REQUESTS):
        d = enforced.engine.decide(*t)
        results.append(shadow.compare(*t, d, decision_id=f"id{i}"))
    assert [r.agrees for r in results] == [True, False, False, True, True]
    assert [r.allowed for r in results] == [True, False, True, True, False]
    m = shadow.metrics()
    assert m["shadow_allowed"] == 3 and m["shadow_denied"] == 2
    assert m["shadow_would_deny"] == 1 and m["shadow_would_allow"] == 1
    assert m["shadow_errors"] == 0 and m["shadow_revision"] == shadow.state.revision
    audit.close()
    recs = [r for r in read_records([log_path]) if r["kind"] == SHADOW_KIND]
    assert [(r["decision_id"], r["outcome"], r["shadow_outcome"]) for r in recs] == [
        ("id1", "allow", "deny"),
        ("id2", "deny", "allow"),
    ]
    assert recs[0]["revision"] == enforced.revision
    assert recs[0]["shadow_revision"] == shadow.state.revision != enforced.revision
    assert recs[1]["shadow_rule"][0] == "role:monitoring"
    assert (recs[1]["sub"], recs[1]["obj"], recs[1]["act"]) == (PROM, "/status", "GET")
    assert verify_files([log_path]).ok


class _BrokenEngine:
    revision = "broken"
    kind = "broken"

    def decide(self, sub: str, dom: str, obj: str, act: str) -> Decision:
        raise RuntimeError("candidate engine bug")

    def roles_for(self, sub: str, dom: str) -> list[str]:
        return []


class _FailingSink:
    def __init__(self) -> None:
        self.fail = False

    def write(self, line: bytes) -> None:
        if self.fail:
            raise OSError("disk full")

    def close(self) -> None:
        pass


def test_shadow_failures_never_reach_the_enforced_path(tmp_path: Path) -> None:
    enforced = initial_state(POLICIES)
    sink = _FailingSink()
    audit = AuditLog(sink, name="authz")
    shadow = ShadowEvaluator.from_dir(candidate_dir(tmp_path), audit=audit)
    sink.fail = True
    t = REQUESTS[1]
    d = enforced.engine.decide(*t)
    r = shadow.compare(*t, d)  # disagreement whose audit record cannot be written
    assert r is not None and not r.agrees
    assert shadow.metrics()["shadow_audit_failures"] == 1
    shadow.state.engine = _BrokenEngine()
    assert shadow.compare(*t, d) is None
    assert shadow.metrics()["shadow_errors"] == 1
    assert d.allowed  # the enforced decision object is untouched


def test_invalid_shadow_policy_refused_at_start(tmp_path: Path) -> None:
    d = candidate_dir(tmp_path, extra="p, too, few\n")
    with pytest.raises(PolicyError, match=r"^shadow policy: no valid policy in .*policy.csv:31:"):
        ShadowEvaluator.from_dir(d)


def test_shadow_policy_hot_reloads(tmp_path: Path) -> None:
    d = candidate_dir(tmp_path)
    shadow = ShadowEvaluator.from_dir(d, debounce=0.05, poll_interval=1.0)
    before = shadow.state.revision
    shadow.start()
    try:
        with open(d / "policy.csv", "a") as fh:
            fh.write(f"p, role:monitoring, {ORDERS_HOST}, /api/orders, ^GET$, allow\n")
        deadline = time.monotonic() + 3
        while shadow.state.revision == before and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        shadow.stop()
    assert shadow.state.revision != before
    enforced = initial_state(POLICIES)
    t = (PROM, ORDERS_HOST, "/api/orders", "GET")
    r = shadow.compare(*t, enforced.engine.decide(*t))
    assert r is not None and r.allowed and not r.agrees


def test_shadow_through_the_server(start_server, tmp_path: Path) -> None:
    """--shadow-policy-dir: Envoy gets the enforced answers; the log and /metrics the diff."""
    import grpc
    import httpx
    from envoy.service.auth.v3 import attribute_context_pb2 as ac
    from envoy.service.auth.v3 import external_auth_pb2 as ea
    from envoy.service.auth.v3 import external_auth_pb2_grpc as eag
    from google.rpc import code_pb2

    srv = start_server(POLICIES, shadow_policy_dir=candidate_dir(tmp_path))
    got = []
    with grpc.insecure_channel(srv.grpc_target) as ch:
        stub = eag.AuthorizationStub(ch)
        for sub, dom, obj, act in REQUESTS:
            req = ea.CheckRequest(
                attributes=ac.AttributeContext(
                    source=ac.AttributeContext.Peer(principal="" if sub == "anonymous" else sub),
                    request=ac.AttributeContext.Request(
                        http=ac.AttributeContext.HttpRequest(method=act, host=dom, path=obj)
                    ),
                )
            )
            got.append(stub.Check(req, timeout=5).status.code == code_pb2.OK)
    assert got == [True, True, False, True, False]  # the enforced (shipped) policy's answers
    recs = list(read_records([srv.audit_path]))
    decisions = {r["decision_id"]: r for r in recs if r["kind"] == "authz.decision"}
    shadows = [r for r in recs if r["kind"] == SHADOW_KIND]
    assert len(decisions) == 5 and len(shadows) == 2
    for s in shadows:
        d = decisions[s["decision_id"]]
        assert d["outcome"] == s["outcome"] != s["shadow_outcome"]
        assert d["revision"] == s["revision"] != s["shadow_revision"]
    assert verify_files([srv.audit_path]).ok
    text = httpx.get(f"{srv.admin_url}/metrics").text
    assert "citadel_authz_shadow_allowed_total 3.0" in text
    assert "citadel_authz_shadow_denied_total 2.0" in text
    assert 'citadel_authz_shadow_disagreements_total{shadow="would_allow"} 1.0' in text
    assert 'citadel_authz_shadow_disagreements_total{shadow="would_deny"} 1.0' in text


def test_serve_refuses_an_invalid_shadow_policy(tmp_path: Path) -> None:
    import subprocess
    import sys

    bad = candidate_dir(tmp_path, extra="p, too, few\n")
    proc = subprocess.run(
        [sys.executable, "-m", "citadel.cli", "authz", "serve", "--policy-dir", str(POLICIES),
         "--shadow-policy-dir", str(bad), "--listen", "127.0.0.1:0",
         "--admin-listen", "127.0.0.1:0", "--audit-log", str(tmp_path / "a.log")],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    out = " ".join((proc.stdout + proc.stderr).split())
    assert "shadow policy: no valid policy in" in out and "policy.csv:31:" in out
    assert str(POLICIES) not in out  # the enforced directory is not blamed
