"""The admin HTTP app and Envoy's HTTP ext_authz variant over real HTTP, and the check CLI."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest
from typer.testing import CliRunner

from authz.commands import app as authz_cli
from citadel.audit import read_records
from tests.authz.conftest import (
    FRONTEND,
    ORDERS_HOST,
    PAYMENTS_HOST,
    POLICIES,
    PROMETHEUS,
    ServerThread,
    policy_copy,
)


@pytest.fixture(scope="module")
def http(server: ServerThread) -> httpx.Client:
    with httpx.Client(base_url=server.admin_url, timeout=10) as c:
        yield c


def audit_by_id(server: ServerThread) -> dict[str, dict]:
    return {r["decision_id"]: r for r in read_records([server.audit_path])
            if r.get("kind") == "authz.decision"}  # fmt: skip


def test_health_and_readiness(http: httpx.Client, server: ServerThread) -> None:
    assert http.get("/healthz").json() == {"status": "ok"}
    r = http.get("/readyz")
    assert r.status_code == 200 and r.json()["revision"] == server.running.state.revision


def test_policy_status(http: httpx.Client, server: ServerThread) -> None:
    body = http.get("/v1/policy").json()
    assert body["revision"] == server.running.state.revision
    assert body["rule_counts"] == {"p": 10, "g": 6}
    assert body["engine"] in ("compiled", "casbin")
    assert body["last_error"] is None and body["history"][0]["ok"] is True
    assert body["loaded_at"].endswith("Z")


def test_explain(http: httpx.Client) -> None:
    r = http.post("/v1/explain", json={"principal": FRONTEND, "host": ORDERS_HOST + ":443",
                                       "method": "get", "path": "/api/orders/9?x=1"})  # fmt: skip
    body = r.json()
    assert r.status_code == 200 and body["decision"] == "allow"
    assert body["rule"][0] == "role:storefront"
    assert body["roles"] == ["role:storefront"]
    assert body["tuple"] == {"sub": FRONTEND, "dom": ORDERS_HOST, "obj": "/api/orders/9",
                             "act": "GET"}  # fmt: skip
    deny = http.post("/v1/explain", json={"principal": PROMETHEUS, "host": "x",
                                          "method": "GET", "path": "/admin/a"}).json()  # fmt: skip
    assert deny["decision"] == "deny" and deny["code"] == "deny_rule"
    assert deny["rule"][-1] == "deny" and deny["roles"] == ["role:monitoring"]
    amb = http.post("/v1/explain", json={"host": "x", "method": "GET", "path": "/a%2fb"}).json()
    assert amb["decision"] == "deny" and amb["code"] == "path_encoded_slash"
    assert amb["tuple"] is None


@pytest.mark.parametrize(
    "payload",
    [{"host": "x", "method": "GET"}, {"host": 1, "method": "GET", "path": "/"}, "not json",
     {"host": "x", "method": "GET", "path": "/" + "a" * 20000}],
    ids=["missing_path", "host_not_string", "body_not_json", "path_over_limit"],
)  # fmt: skip
def test_explain_bad_input_is_problem_json(http: httpx.Client, payload) -> None:
    if isinstance(payload, str):
        r = http.post("/v1/explain", content=payload,
                      headers={"content-type": "application/json"})  # fmt: skip
    else:
        r = http.post("/v1/explain", json=payload)
    assert r.status_code == 422
    assert r.headers["content-type"] == "application/problem+json"
    body = r.json()
    assert body["status"] == 422 and body["title"] and body["detail"]


def test_unknown_route_is_problem_json(http: httpx.Client) -> None:
    r = http.get("/v1/nope")
    assert r.status_code == 404 and r.headers["content-type"] == "application/problem+json"


def test_openapi_docs(http: httpx.Client) -> None:
    spec = http.get("/openapi.json").json()
    assert {"/healthz", "/readyz", "/metrics", "/v1/policy", "/v1/explain"} <= set(spec["paths"])
    assert http.get("/docs").status_code == 200


def test_metrics_count_decisions(http: httpx.Client) -> None:
    http.get("/ext_authz/healthz", headers={"host": "a"})
    http.get("/ext_authz/admin", headers={"host": "a"})
    text = http.get("/metrics").text
    assert 'citadel_authz_decisions_total{code="allow",outcome="allow"}' in text
    assert 'citadel_authz_decisions_total{code="no_rule",outcome="deny"}' in text
    assert "citadel_authz_decision_seconds_bucket" in text
    assert "citadel_authz_policy_info{" in text
    assert 'citadel_authz_policy_reloads_total{outcome="failed"}' in text


def test_reload_endpoint_keeps_last_good(start_server, tmp_path: Path) -> None:
    pdir = policy_copy(tmp_path)
    srv = start_server(pdir)
    before = srv.running.state.revision
    with httpx.Client(base_url=srv.admin_url) as c:
        (pdir / "policy.csv").write_text("p, role:x, *, /a, GET\n")  # wrong arity
        r = c.post("/v1/reload")
        assert r.status_code == 422 and r.headers["content-type"] == "application/problem+json"
        status = c.get("/v1/policy").json()
        assert status["revision"] == before and status["last_error"]["line"] == 1
        (pdir / "policy.csv").write_text("p, anonymous, *, /a, ^GET$, allow\n")
        r = c.post("/v1/reload")
        assert r.status_code == 200 and r.json()["ok"] is True
        assert c.get("/v1/policy").json()["rule_counts"] == {"p": 1}
        assert c.get("/ext_authz/a", headers={"host": "h"}).status_code == 200


# ---------------------------------------------------------------- HTTP ext_authz variant


@pytest.mark.parametrize(
    ("method", "path", "host", "status"),
    [
        ("GET", "/healthz", "orders.shop.svc.cluster.local", 200),
        ("HEAD", "/healthz", "x:8080", 403),
        ("POST", "/healthz", "x", 403),
        ("GET", "/api/orders", ORDERS_HOST, 403),
        ("GET", "/healthz?probe=1", "x", 200),
        ("GET", "/a/../healthz", "x", 200),
        ("GET", "/healthz%2F..", "x", 403),
        ("GET", "/x%00", "x", 403),
        ("GET", "/x%5c", "x", 403),
    ],
    ids=["anonymous_health", "head_not_granted", "post_not_granted", "anonymous_api",
         "query_ignored", "dot_segments", "encoded_slash", "encoded_nul", "encoded_backslash"],
)  # fmt: skip
def test_http_variant(http, server, method, path, host, status) -> None:
    r = http.request(method, "/ext_authz" + path, headers={"host": host, "x-request-id": "h-1"})
    assert r.status_code == status
    did = r.headers["x-citadel-decision-id"]
    rec = audit_by_id(server)[did]
    assert rec["transport"] == "http" and rec["outcome"] == ("allow" if status == 200 else "deny")
    assert rec["request_id"] == "h-1"
    if status == 403 and method != "HEAD":
        assert r.headers["content-type"] == "application/json"
        assert r.json()["decision_id"] == did


def test_http_variant_ignores_xfcc_unless_trusted(http) -> None:
    xfcc = {"host": ORDERS_HOST, "x-forwarded-client-cert": f"Hash=ab;URI={FRONTEND}"}
    assert http.get("/ext_authz/api/orders", headers=xfcc).status_code == 403


def test_http_variant_with_trusted_xfcc(start_server) -> None:
    srv = start_server(trust_xfcc=True, http_prefix="/authz/")
    with httpx.Client(base_url=srv.admin_url) as c:
        ok = {"host": ORDERS_HOST, "x-forwarded-client-cert": f"Hash=ab;URI={FRONTEND}"}
        assert c.get("/authz/api/orders", headers=ok).status_code == 200
        pay = {"host": PAYMENTS_HOST, "x-forwarded-client-cert": f"Hash=ab;URI={FRONTEND}"}
        assert c.post("/authz/api/charges", headers=pay).status_code == 403
        two = {"host": ORDERS_HOST,
               "x-forwarded-client-cert": f"URI={FRONTEND};URI=spiffe://x/y"}  # fmt: skip
        assert c.get("/authz/api/orders", headers=two).status_code == 403
        assert c.get("/authz/api/orders", headers={"host": ORDERS_HOST}).status_code == 403
        assert c.get("/healthz").status_code == 200  # the admin app is still there


def test_http_listen_serves_the_variant_and_no_admin_endpoint(start_server) -> None:
    """The port sidecars reach (``--http-listen``) decides and audits like the admin port's
    variant, and nothing else: no reload, explain, policy, metrics or health there."""
    srv = start_server(trust_xfcc=True, http_listen="127.0.0.1:0")
    xfcc = {"x-forwarded-client-cert": f"Hash=ab;URI={FRONTEND}"}
    with httpx.Client(base_url=f"http://127.0.0.1:{srv.running.http_port}", timeout=10) as c:
        ok = c.get("/ext_authz/api/orders", headers={"host": ORDERS_HOST, **xfcc})
        assert ok.status_code == 200
        denied = c.post("/ext_authz/api/charges", headers={"host": PAYMENTS_HOST, **xfcc})
        assert denied.status_code == 403
        for method, path in [("POST", "/v1/reload"), ("GET", "/v1/policy"), ("GET", "/metrics"),
                             ("POST", "/v1/explain"), ("GET", "/healthz"), ("GET", "/docs"),
                             ("GET", "/ext_authzz/api/orders")]:  # fmt: skip
            r = c.request(method, path, headers={"host": ORDERS_HOST})
            assert r.status_code == 404, (method, path)
            assert r.headers["content-type"] == "application/problem+json"
            assert r.json()["status"] == 404
    records = {r["decision_id"]: r for r in read_records([srv.audit_path])
               if r.get("kind") == "authz.decision"}  # fmt: skip
    assert records[ok.headers["x-citadel-decision-id"]]["principal"] == FRONTEND
    assert records[denied.headers["x-citadel-decision-id"]]["outcome"] == "deny"
    with httpx.Client(base_url=srv.admin_url, timeout=10) as admin:
        assert admin.get("/v1/policy").status_code == 200  # the admin port keeps them


# ---------------------------------------------------------------- citadel authz check


def run_check(*args: str) -> tuple[int, str]:
    res = CliRunner().invoke(authz_cli, ["check", "--policy-dir", str(POLICIES), *args])
    return res.exit_code, res.output


def test_cli_check_allow_and_deny() -> None:
    code, out = run_check("--principal", FRONTEND, "--host", ORDERS_HOST, "--method", "get",
                          "--path", "/api/orders/3")  # fmt: skip
    assert code == 0 and "ALLOW" in out and "role:storefront" in out and "/api/orders/3" in out
    code, out = run_check("--principal", FRONTEND, "--host", ORDERS_HOST, "--path", "/admin/x")
    assert code == 1 and "DENY" in out and "denied by rule" in out
    code, out = run_check("--host", ORDERS_HOST, "--path", "/api/orders")
    assert code == 1 and "no rule allowed" in out


def test_cli_check_json_and_ambiguous_path() -> None:
    code, out = run_check("--host", "h", "--path", "/a%2Fb", "--json")
    assert code == 1 and json.loads(out)["code"] == "path_encoded_slash"


def test_cli_check_bad_input_and_bad_policy(tmp_path: Path) -> None:
    assert run_check("--host", "h", "--method", "G T")[0] == 2
    bad = policy_copy(tmp_path, "p, role:x, *, /a, GET, maybe\n")
    res = CliRunner().invoke(authz_cli, ["check", "--policy-dir", str(bad), "--path", "/a"])
    assert res.exit_code == 2 and "effect must be" in res.output
