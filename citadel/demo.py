"""`citadel demo`: play three sidecars and their Envoys against a running plane.

Nothing here is simulated. SVIDs come from the CA over TLS through the agent's own
verified client (the chain is checked against the trust bundle before it is shown);
decisions come from ``Authorization/Check`` over real gRPC with the caller's identity in
``attributes.source.principal``, exactly where Envoy puts the peer's URI SAN after mTLS.
Each decision is then found again twice: in the audit trail by its decision id (which
rule decided) and through the admin's ``/v1/explain`` (the same answer, recomputed).

The scenarios are the policy directory's own test cases whose caller is one of the demo's
workloads (or anonymous), plus a few path tricks. So the demo cannot drift from the
policy: change a rule and its tests, and the demo expects the new answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import httpx
from envoy.config.core.v3 import address_pb2
from envoy.service.auth.v3 import attribute_context_pb2, external_auth_pb2, external_auth_pb2_grpc
from google.rpc import code_pb2
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from authz.policytests import load_cases
from authz.service import DECISION_HEADER
from citadel.agent.agent import Agent, AgentConfig, GiveUp
from citadel.agent.verify import Svid
from citadel.audit import read_records, verify_files
from citadel.dev import DevIssuer, load_dev_issuer, mint_token
from citadel.embedded import (
    PlaneConfig,
    RunningPlane,
    UpInfo,
    bootstrap_state,
    default_policy_dir,
    find_running,
    start_plane,
)
from citadel.errors import CitadelError
from citadel.spiffe import TrustDomain

__all__ = [
    "EXTRA_SCENARIOS",
    "WORKLOADS",
    "Plane",
    "Scenario",
    "audit_step",
    "conclude",
    "obtain_svids",
    "plane_for",
    "run_demo",
    "run_tour",
    "scenarios_for",
    "svid_table",
]

#: (namespace, service account) of the workloads the demo plays; all named in policy.csv.
WORKLOADS: tuple[tuple[str, str], ...] = (
    ("shop", "frontend"),
    ("shop", "orders"),
    ("ops", "prometheus"),
)
CA_SERVER_NAME = "localhost"


@dataclass(frozen=True, slots=True)
class Scenario:
    name: str
    #: "ns/sa" of one of WORKLOADS, or None for a request without a client certificate.
    caller: str | None
    host: str
    method: str
    path: str
    expect: str  # "allow" | "deny"
    source: str


#: Requests the shipped tests do not spell out; tests/e2e/test_demo.py holds each one
#: against the shipped policy, so these cannot drift from it either.
EXTRA_SCENARIOS: tuple[Scenario, ...] = (
    Scenario(
        name="encoded dot-segments are resolved before the policy sees the path",
        caller="shop/frontend",
        host="orders.shop.svc.cluster.local",
        method="GET",
        path="/api/orders/%2E%2E/%2e%2e/admin/users",
        expect="deny",
        source="demo",
    ),
    Scenario(
        name="monitoring may not reach admin either",
        caller="ops/prometheus",
        host="orders.shop.svc.cluster.local",
        method="GET",
        path="/admin/metrics",
        expect="deny",
        source="demo",
    ),
)


def _caller_of(principal: str, trust_domain: str) -> str | bool | None:
    """A demo workload's ns/sa, None for anonymous, False for anyone else."""
    if not principal:
        return None
    for ns, sa in WORKLOADS:
        if principal == f"spiffe://{trust_domain}/ns/{ns}/sa/{sa}":
            return f"{ns}/{sa}"
    return False


def scenarios_for(policy_dir: Path, *, trust_domain: str) -> list[Scenario]:
    """The directory's policy test cases the demo's callers can play, then the extras."""
    out: list[Scenario] = []
    for case in load_cases(policy_dir):
        caller = _caller_of(case.principal, trust_domain)
        if caller is False:
            continue
        out.append(
            Scenario(
                name=case.name,
                caller=caller,  # type: ignore[arg-type]
                host=case.host,
                method=case.method,
                path=case.path,
                expect=case.expect,
                source=f"{case.file}:{case.line}",
            )
        )
    seen = {(s.caller, s.host, s.method, s.path) for s in out}
    out += [s for s in EXTRA_SCENARIOS if (s.caller, s.host, s.method, s.path) not in seen]
    return out


# ---------------------------------------------------------------- the plane to talk to


@dataclass
class Plane:
    info: UpInfo
    issuer: DevIssuer
    #: Set when the demo started the plane itself (and must stop it).
    own: RunningPlane | None = None


@contextlib.asynccontextmanager
async def plane_for(state_dir: Path, console: Console, work: Path) -> AsyncIterator[Plane]:
    """The ``up`` running for ``state_dir``, or a private one under ``work`` for the block."""
    info = find_running(state_dir)
    if info is not None:
        console.print(
            f"using the [bold]citadel up[/] running for {state_dir} "
            f"(pid {info.pid}: CA {info.ca}, ext_authz {info.authz}, admin {info.admin})"
        )
        yield Plane(info=info, issuer=load_dev_issuer(info.state_dir))
        return
    policies = default_policy_dir()
    if policies is None:
        raise CitadelError("cannot find the shipped policies/ directory")
    console.print(
        f"no [bold]citadel up[/] is running for {state_dir}; starting a private one "
        "on free loopback ports (it stops when the demo ends)"
    )
    with console.status("creating a throwaway dev CA and token issuer..."):
        boot = bootstrap_state(work / "state", trust_domain="cluster.local")
    running = await start_plane(
        PlaneConfig(
            state_dir=work / "state",
            policy_dir=policies,
            ca_listen="127.0.0.1:0",
            authz_listen="127.0.0.1:0",
            admin_listen="127.0.0.1:0",
            grace=1.0,
            watch_policies=False,
            publish=False,
        ),
        boot,
    )
    try:
        yield Plane(info=running.info, issuer=boot.issuer, own=running)
    finally:
        await running.stop(1.0)


# ---------------------------------------------------------------- step 1: SVIDs


async def obtain_svids(plane: Plane, work: Path) -> dict[str, Svid]:
    """One SVID per workload via the agent's verified client, as ``citadel agent --once``."""
    td = TrustDomain(plane.info.trust_domain)

    async def one(ns: str, sa: str) -> tuple[str, Svid]:
        token_file = work / f"{ns}-{sa}.token"
        token_file.touch(mode=0o600)
        token_file.write_text(mint_token(plane.issuer, namespace=ns, service_account=sa))
        agent = Agent(
            AgentConfig(
                ca_address=plane.info.ca,
                ca_root=Path(plane.info.root_cert),
                token_file=token_file,
                out_dir=work / "svids" / f"{ns}-{sa}",
                trust_domain=td,
                ca_server_name=CA_SERVER_NAME,
                max_attempts=3,
                max_retry_seconds=10.0,
            )
        )
        try:
            return f"{ns}/{sa}", await agent.fetch_once()
        finally:
            await agent.close()

    results = await asyncio.gather(*(one(ns, sa) for ns, sa in WORKLOADS))
    return dict(results)


# ---------------------------------------------------------------- step 2: decisions


@dataclass
class Result:
    scenario: Scenario
    principal: str
    decision: str = "error"
    code: str = ""
    decision_id: str = ""
    rule: list[str] | None = None
    reason: str | None = None
    explain: dict[str, Any] | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems


def check_request(
    *, principal: str, host: str, method: str, path: str, request_id: str
) -> external_auth_pb2.CheckRequest:
    """A CheckRequest shaped like the one Envoy's ext_authz filter sends after mTLS."""
    ctx = attribute_context_pb2.AttributeContext
    return external_auth_pb2.CheckRequest(
        attributes=ctx(
            source=ctx.Peer(
                address=address_pb2.Address(
                    socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=40000)
                ),
                principal=principal,
            ),
            destination=ctx.Peer(
                address=address_pb2.Address(
                    socket_address=address_pb2.SocketAddress(address="127.0.0.1", port_value=8443)
                )
            ),
            request=ctx.Request(
                http=ctx.HttpRequest(
                    id=request_id,
                    method=method,
                    host=host,
                    path=path,
                    scheme="https",
                    protocol="HTTP/1.1",
                    headers={
                        ":authority": host,
                        ":method": method,
                        ":path": path,
                        ":scheme": "https",
                        "x-request-id": request_id,
                    },
                )
            ),
        )
    )


def _decision_id(response: external_auth_pb2.CheckResponse) -> str:
    headers = (
        response.ok_response.headers
        if response.HasField("ok_response")
        else response.denied_response.headers
    )
    for h in headers:
        if h.header.key == DECISION_HEADER:
            return h.header.value
    return ""


async def run_checks(
    plane: Plane, scenarios: Sequence[Scenario], svids: dict[str, Svid]
) -> list[Result]:
    results: list[Result] = []
    async with (
        grpc.aio.insecure_channel(plane.info.authz) as channel,
        httpx.AsyncClient(base_url=plane.info.admin_url, timeout=10) as admin,
    ):
        stub = external_auth_pb2_grpc.AuthorizationStub(channel)
        for i, sc in enumerate(scenarios):
            principal = str(svids[sc.caller].spiffe_id) if sc.caller else ""
            result = Result(sc, principal)
            results.append(result)
            try:
                response = await stub.Check(
                    check_request(
                        principal=principal,
                        host=sc.host,
                        method=sc.method,
                        path=sc.path,
                        request_id=f"citadel-demo-{i}",
                    ),
                    timeout=5,
                )
            except grpc.aio.AioRpcError as exc:
                result.problems.append(f"Check failed: {exc.code().name}: {exc.details()}")
                continue
            result.decision = "allow" if response.status.code == code_pb2.OK else "deny"
            result.decision_id = _decision_id(response)
            if response.HasField("denied_response"):
                status = response.denied_response.status.code
                if status not in (400, 403):
                    result.problems.append(f"denial carried HTTP {status}, not 403/400")

        async def explain(result: Result) -> None:
            sc = result.scenario
            reply = await admin.post(
                "/v1/explain",
                json={"principal": result.principal, "host": sc.host, "method": sc.method,
                      "path": sc.path},
            )  # fmt: skip
            if reply.status_code == 200:
                result.explain = reply.json()
            else:
                result.problems.append(f"/v1/explain answered {reply.status_code}")

        # Concurrently: each HTTP round trip to the admin app is mostly waiting.
        await asyncio.gather(*(explain(r) for r in results if r.decision != "error"))
    return results


def reconcile(results: Sequence[Result], audit_path: Path) -> None:
    """Find each decision in the audit trail and hold it against expectation and explain."""
    by_id: dict[str, dict[str, Any]] = {}
    ids = {r.decision_id for r in results if r.decision_id}
    for rec in read_records([audit_path]):
        if rec.get("kind") == "authz.decision" and rec.get("decision_id") in ids:
            by_id[rec["decision_id"]] = rec
    for r in results:
        if r.decision == "error":
            continue
        if r.decision != r.scenario.expect:
            r.problems.append(f"expected {r.scenario.expect}, got {r.decision}")
        rec = by_id.get(r.decision_id)
        if rec is None:
            r.problems.append(f"decision {r.decision_id or '(no id)'} is not in the audit trail")
        else:
            r.code, r.rule, r.reason = rec.get("code", ""), rec.get("rule"), rec.get("reason")
            if rec.get("outcome") != r.decision:
                r.problems.append(f"audit says {rec.get('outcome')}, Check said {r.decision}")
        if r.explain is not None:
            if r.explain.get("decision") != r.decision:
                r.problems.append(f"/v1/explain says {r.explain.get('decision')}")
            elif rec is not None and r.explain.get("rule") != rec.get("rule"):
                r.problems.append("/v1/explain names another rule than the audit record")


# ---------------------------------------------------------------- printing


def _verdict(decision: str) -> str:
    return {"allow": "[bold green]ALLOW[/]", "deny": "[bold red]DENY[/]"}.get(
        decision, f"[bold yellow]{decision.upper()}[/]"
    )


def svid_table(svids: dict[str, Svid]) -> Table:
    table = Table(title="SVIDs issued by the CA (verified by the agent)", title_justify="left")
    table.add_column("workload")
    table.add_column("SPIFFE ID", no_wrap=True)
    table.add_column("serial", no_wrap=True)
    table.add_column("expires (UTC)", no_wrap=True)
    for name, svid in svids.items():
        serial = f"{svid.serial:x}"
        table.add_row(
            name,
            str(svid.spiffe_id),
            serial[:16] + ("..." if len(serial) > 16 else ""),
            f"{svid.not_after:%Y-%m-%d %H:%M:%S} ({svid.lifetime_seconds / 60:.0f} min)",
        )
    return table


def _why(r: Result) -> str:
    if r.rule:
        return ", ".join(r.rule)
    return r.reason or ""


def _decision_table(results: Sequence[Result]) -> Table:
    table = Table(
        title="Check decisions (ext_authz over gRPC, principal from the SVID)",
        title_justify="left",
    )
    table.add_column("caller")
    table.add_column("request", overflow="fold")
    table.add_column("expected")
    table.add_column("decision")
    table.add_column("rule / reason", overflow="fold")
    table.add_column("", no_wrap=True)
    for r in results:
        sc = r.scenario
        table.add_row(
            sc.caller or "[dim]anonymous[/]",
            escape(f"{sc.method} {sc.host}{sc.path}"),
            sc.expect,
            _verdict(r.decision),
            escape(_why(r)),
            "[green]ok[/]" if r.ok else "[red]DIFF[/]",
        )
    return table


def _summary(rec: dict[str, Any]) -> str:
    kind = rec.get("kind")
    if kind == "audit.header":
        return f"stream opened by {rec.get('name')} (pid {rec.get('pid')})"
    if kind == "ca.issuance":
        if rec.get("outcome") == "granted":
            return (
                f"granted {rec.get('spiffe_id')} serial {str(rec.get('serial'))[:16]} "
                f"ttl {rec.get('granted_ttl')}s"
            )
        return f"refused {rec.get('spiffe_id') or rec.get('subject')}: {rec.get('reason')}"
    if kind == "authz.decision":
        path = rec.get("path") or rec.get("raw_path")
        why = ", ".join(rec["rule"]) if rec.get("rule") else rec.get("reason") or ""
        return (
            f"{str(rec.get('outcome')).upper()} {rec.get('principal')} {rec.get('method')} "
            f"{rec.get('host')}{path} [{rec.get('code')}] {why}"
        )
    return ", ".join(f"{k}={v}" for k, v in rec.items() if k not in ("prev", "hash", "stream"))


def print_audit_tail(console: Console, audit_path: Path, n: int) -> None:
    records = list(read_records([audit_path]))
    console.print(f"[bold]audit trail[/] {audit_path}: last {min(n, len(records))} of "
                  f"{len(records)} records")  # fmt: skip
    for rec in records[-n:] if n > 0 else []:
        ts = str(rec.get("ts", ""))[11:23]
        console.print(
            f"  {rec.get('seq', ''):>4} {ts} {rec.get('kind')!s:<15} {escape(_summary(rec))}",
            soft_wrap=True,
            highlight=False,
        )


# ---------------------------------------------------------------- the whole tour


async def _demo(state_dir: Path, console: Console, tail: int, work: Path) -> int:
    failures: list[str] = []
    async with plane_for(state_dir, console, work) as plane:
        info = plane.info
        scenarios = scenarios_for(Path(info.policy_dir), trust_domain=info.trust_domain)
        if not scenarios:
            console.print(f"[red]error:[/] no policy test case in {info.policy_dir} names "
                          "a demo workload; nothing to show")  # fmt: skip
            return 1
        console.rule("[bold]1. workloads get their SVIDs")
        try:
            svids = await obtain_svids(plane, work)
        except (GiveUp, CitadelError) as exc:
            console.print(f"[red]error:[/] a workload got no certificate: {escape(exc.message)}")
            return 1
        console.print(svid_table(svids))
        for name, svid in svids.items():
            ns, sa = name.split("/")
            want = f"spiffe://{info.trust_domain}/ns/{ns}/sa/{sa}"
            if str(svid.spiffe_id) != want:
                failures.append(f"{name}: SVID names {svid.spiffe_id}, expected {want}")

        console.rule("[bold]2. Envoy asks ext_authz, the policy decides")
        results = await run_checks(plane, scenarios, svids)
        reconcile(results, Path(info.audit_log))
        console.print(_decision_table(results))
        allowed = sum(r.decision == "allow" for r in results)
        denied = sum(r.decision == "deny" for r in results)
        console.print(f"{len(results)} checks: {allowed} allowed, {denied} denied "
                      f"(policy revision {(results[0].explain or {}).get('revision', '?')[:12]}, "
                      f"scenarios from {info.policy_dir}/tests)")  # fmt: skip
        for r in results:
            failures += [f"{r.scenario.name}: {p}" for p in r.problems]

        audit_step(console, Path(info.audit_log), tail, failures)
    return conclude(
        console,
        failures,
        f"{len(svids)} SVIDs issued and verified, "
        f"{len(results)} decisions as the policy says, audit trail intact",
    )


def audit_step(console: Console, audit_path: Path, tail: int, failures: list[str]) -> None:
    """Step 3 of either tour: the trail's last records, then every hash chain verified."""
    console.rule("[bold]3. the audit trail")
    print_audit_tail(console, audit_path, tail)
    report = verify_files([audit_path])
    if report.ok:
        console.print(f"[green]audit verified[/]: {report.records} records in "
                      f"{len(report.streams)} stream(s), every hash chain intact")  # fmt: skip
    else:
        failures.append(
            f"audit verification failed at {report.problem_file}:{report.problem_line}: "
            f"{report.problem}"
        )


def conclude(console: Console, failures: Sequence[str], passed: str) -> int:
    """The verdict line and the exit code: 0 only when no step differed."""
    console.rule()
    if failures:
        console.print(f"[bold red]demo FAILED[/]: {len(failures)} step(s) differed:")
        for f in failures:
            console.print(f"  - {escape(f)}", highlight=False)
        return 1
    console.print(f"[bold green]demo passed[/]: {passed}")
    return 0


def run_tour(
    tour: Callable[[Path], Awaitable[int]], *, console: Console, prefix: str = "citadel-demo-"
) -> int:
    """Run ``tour(work)`` in a private temporary directory that is removed afterwards;
    a CitadelError is one clear line and exit code 2, never a stack trace."""
    work = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        return asyncio.run(tour(work))
    except CitadelError as exc:
        console.print(f"[red]error:[/] {escape(exc.message)}")
        return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)


def run_demo(*, state_dir: Path, console: Console, tail: int = 24) -> int:
    """Exit code: 0 only when every step behaved as the policy says."""
    return run_tour(lambda work: _demo(state_dir, console, tail, work), console=console)
