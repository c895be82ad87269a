"""Replay: recorded decisions re-decided with a candidate; exactly the flips are reported."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import typer
from typer.testing import CliRunner

from authz.decisions import DecisionPipeline
from authz.lifecycle_commands import register
from authz.reload import initial_state, load_candidate
from authz.replay import replay_files
from citadel.audit import open_audit_log

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "policies"
FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"
ORDERS = "spiffe://cluster.local/ns/shop/sa/orders"
PROM = "spiffe://cluster.local/ns/ops/sa/prometheus"
O_HOST = "orders.shop.svc.cluster.local"
P_HOST = "payments.shop.svc.cluster.local"

# (principal, host, method, path, times)
TRAFFIC = [
    (FRONTEND, O_HOST, "GET", "/api/orders", 3),  # allow, unchanged
    (FRONTEND, O_HOST + ":8080", "POST", "/api/orders?x=1", 4),  # allow -> deny
    (ORDERS, P_HOST, "POST", "/api/charges", 2),  # allow, unchanged
    (PROM, O_HOST, "GET", "/status", 2),  # deny -> allow
    (PROM, P_HOST, "GET", "/status", 1),  # deny -> allow
    ("", O_HOST, "GET", "/healthz", 2),  # anonymous allow, unchanged
    (ORDERS, P_HOST, "GET", "/admin/x", 1),  # deny by rule, unchanged
    (FRONTEND, O_HOST, "GET", "/api%2Forders", 1),  # refused (ambiguous), unchanged
]


@pytest.fixture(scope="module")
def recorded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An audit log written by the real decision pipeline on the shipped policy."""
    path = tmp_path_factory.mktemp("replay") / "audit.jsonl"
    audit = open_audit_log(path, name="authz")
    pipeline = DecisionPipeline(state=initial_state(POLICIES), audit=audit)
    for principal, host, method, p, times in TRAFFIC:
        for _ in range(times):
            pipeline.decide(
                principal=principal, host=host, method=method, path=p,
                transport="test", started_ns=time.perf_counter_ns(),
            )  # fmt: skip
    audit.record("ca.issue", {"note": "records of other kinds are ignored"})
    audit.close()
    return path


@pytest.fixture(scope="module")
def candidate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("candidate")
    shutil.copy(POLICIES / "model.conf", d)
    text = (POLICIES / "policy.csv").read_text()
    text = text.replace("/api/orders, ^(GET|POST)$, allow", "/api/orders, ^GET$, allow")
    text += "\np, role:monitoring, *.shop.svc.cluster.local, /status, ^GET$, allow\n"
    (d / "policy.csv").write_text(text)
    return d


def test_replay_reports_exactly_the_flips(recorded: Path, candidate: Path) -> None:
    _, engine = load_candidate(candidate)
    report = replay_files(engine, [recorded])
    assert report.records == 16 and report.replayed == 16 and report.skipped == 0
    assert (report.allow_to_deny, report.deny_to_allow) == (4, 3)
    flips = {(c.direction, c.principal, c.host, c.method, c.path) for c in report.changes}
    assert flips == {
        ("allow->deny", FRONTEND, O_HOST, "POST", "/api/orders"),
        ("deny->allow", PROM, O_HOST, "GET", "/status"),
        ("deny->allow", PROM, P_HOST, "GET", "/status"),
    }
    groups = report.groups()
    assert [(g["direction"], g["principal"], g["count"]) for g in groups] == [
        ("allow->deny", FRONTEND, 4),
        ("deny->allow", PROM, 3),
    ]
    assert groups[0]["was_rule"].startswith("role:storefront, orders.shop.svc.cluster.local")
    assert groups[0]["now_rule"] == "(no rule: default deny)"
    assert groups[1]["now_rule"].startswith("role:monitoring, *.shop.svc.cluster.local, /status")
    assert all(c.decision_id for c in report.changes)


def test_replay_against_the_same_policy_changes_nothing(recorded: Path) -> None:
    _, engine = load_candidate(POLICIES)
    report = replay_files(engine, [recorded])
    assert report.replayed == 16 and report.changes == []


def test_replay_cli_table_and_json(recorded: Path, candidate: Path, tmp_path: Path) -> None:
    app = typer.Typer()
    register(app)
    runner = CliRunner()
    args = ["replay", "--candidate", str(candidate), "--audit-log", str(recorded)]
    table = runner.invoke(app, args, terminal_width=200)
    assert table.exit_code == 0, table.output
    assert "allow->deny" in table.output and "deny->allow" in table.output
    assert "16 decisions replayed (0 skipped): 7 would change" in table.output
    js = runner.invoke(app, [*args, "--audit-log", str(recorded), "--json"])
    assert js.exit_code == 0
    doc = json.loads(js.output)
    assert (doc["replayed"], doc["changed"], doc["unchanged"]) == (32, 14, 18)
    assert doc["groups"][0]["count"] == 8
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "model.conf").write_text("nonsense")
    (bad / "policy.csv").write_text("")
    refused = runner.invoke(app, ["replay", "--candidate", str(bad), "--audit-log", str(recorded)])
    assert refused.exit_code == 2 and "candidate policy is invalid" in refused.output
    missing = runner.invoke(
        app, ["replay", "--candidate", str(candidate), "--audit-log", str(tmp_path / "nope")]
    )
    assert missing.exit_code == 2
