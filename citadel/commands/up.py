"""`citadel up` and `citadel demo`: the embedded default and its guided tour.

citadel.embedded is light until a plane starts; logging and the consoles load inside the
commands, so building the CLI's command tree costs nothing here.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from citadel import eventloop
from citadel.commands.options import EventLoop
from citadel.embedded import (
    DEFAULT_ADMIN_LISTEN,
    DEFAULT_AUTHZ_LISTEN,
    DEFAULT_CA_LISTEN,
    PlaneConfig,
    RunningPlane,
    bootstrap_state,
    check_ports,
    default_policy_dir,
    find_running,
    start_plane,
)
from citadel.errors import CitadelError, PolicyError

if TYPE_CHECKING:
    from rich.console import Console

__all__ = ["demo", "up"]

StateDir = Annotated[
    Path, typer.Option("--state-dir", help="State directory (dev CA, dev token issuer, audit).")
]


def _resolve_policy_dir(err: Console, policy_dir: Path | None) -> Path:
    found = policy_dir or default_policy_dir()
    if found is None:
        err.print(
            "[red]error:[/] cannot find the shipped policies/ directory; "
            "pass --policy-dir DIR (a directory with model.conf and policy.csv)"
        )
        raise typer.Exit(2)
    return found


def _print_plane(out: Console, plane: RunningPlane, reused: bool) -> None:
    info = plane.info
    b = plane.bootstrap
    state = plane.state
    sd = plane.config.state_dir
    verb = "reusing" if reused else "created"
    out.print(
        f"[bold green]citadel is up[/] ({verb} the dev CA and token issuer in [bold]{sd}[/], "
        f"trust domain [bold]{info.trust_domain}[/])"
    )
    rows = [
        ("CA", info.ca, "istio.v1.auth.IstioCertificateService over TLS, plus the trust bundle"),
        ("", "", f"clients verify with {info.root_cert}"),
        ("ext_authz", info.authz, "envoy.service.auth.v3.Authorization/Check (gRPC)"),
        ("admin", f"http://{info.admin}", "/healthz /readyz /metrics /v1/policy /v1/explain"),
        (
            "policy",
            info.policy_dir,
            f"revision {state.revision[:12]} ({state.engine.kind} engine)"
            + (", hot reload on" if plane.watching else ""),
        ),
        ("audit", info.audit_log, "one hash-chained file, a stream per service"),
        ("tokens", info.jwks, f"JWKS of the dev token issuer (kid {b.issuer.kid[:12]}...)"),
    ]
    for name, where, what in rows:
        out.print(f"  [bold]{name:<10}[/] {where}  {what}", soft_wrap=True, highlight=False)
    out.print("[bold]try it[/] (in another terminal):")
    tries = [
        f"citadel demo --state-dir {sd}",
        f"citadel dev token --state-dir {sd} -n shop -s frontend > frontend.token",
        f"citadel agent --once --ca-address {info.ca} --ca-server-name localhost "
        f"--ca-root {info.root_cert} --token-file frontend.token --out-dir frontend-svid",
        f"curl -s http://{info.admin}/v1/policy",
        f"curl -s http://{info.admin}/v1/explain -H 'content-type: application/json' -d "
        '\'{"principal":"spiffe://cluster.local/ns/shop/sa/frontend",'
        '"host":"orders.shop.svc.cluster.local","method":"GET","path":"/api/orders"}\'',
        f"citadel audit verify {info.audit_log}",
    ]
    for line in tries:
        out.print(f"  [cyan]$[/] {line}", soft_wrap=True, highlight=False)
    out.print("Ctrl-C or SIGTERM drains in-flight requests and stops.")


async def _run_up(config: PlaneConfig, out: Console, err: Console) -> None:
    @contextlib.contextmanager
    def step(message: str) -> Iterator[None]:
        with err.status(f"[bold]{message}[/]..."):
            yield

    boot = bootstrap_state(config.state_dir, trust_domain=config.trust_domain, on_step=step)
    for created, what in ((boot.created_ca, "dev CA"), (boot.created_issuer, "dev token issuer")):
        verb = "[green]created[/]" if created else "[cyan]reusing[/]"
        out.print(f"{verb} {what} in {config.state_dir}")
    plane = await start_plane(config, boot)
    try:
        async with eventloop.stop_signals() as stop:
            _print_plane(out, plane, reused=not (boot.created_ca or boot.created_issuer))
            await stop.wait()
            out.print(f"stopping: draining in-flight requests (up to {config.grace:g}s)...")
    finally:
        await plane.stop()
    out.print(
        f"citadel stopped: {plane.ca.servicer.granted} certificate(s) issued, "
        f"{plane.authz.audit.records_written - 1} decision(s) recorded"
    )


def up(
    state_dir: StateDir = Path(".citadel"),
    policy_dir: Annotated[
        Path | None,
        typer.Option("--policy-dir", help="Policy directory (default: the shipped policies/)."),
    ] = None,
    ca_listen: Annotated[
        str, typer.Option("--ca-listen", help="CA gRPC (TLS) HOST:PORT.")
    ] = DEFAULT_CA_LISTEN,
    authz_listen: Annotated[
        str, typer.Option("--authz-listen", help="ext_authz gRPC HOST:PORT.")
    ] = DEFAULT_AUTHZ_LISTEN,
    admin_listen: Annotated[
        str, typer.Option("--admin-listen", help="Admin HTTP HOST:PORT.")
    ] = DEFAULT_ADMIN_LISTEN,
    audit_log: Annotated[
        Path | None, typer.Option("--audit-log", help="Audit file (default STATE/audit.log).")
    ] = None,
    trust_domain: Annotated[
        str, typer.Option("--trust-domain", help="Trust domain of the dev CA.")
    ] = "cluster.local",
    grace: Annotated[
        float, typer.Option("--grace", help="Seconds in-flight requests get on stop.")
    ] = 5.0,
    log_level: Annotated[str, typer.Option("--log-level", help="Operational log level.")] = (
        "warning"
    ),
    event_loop: EventLoop = "auto",
) -> None:
    """Run the whole plane on this machine: dev CA + ext_authz + admin, one process.

    The first run creates a dev CA and a dev token issuer in the state directory; later
    runs reuse them. Exits 0 after draining on Ctrl-C/SIGTERM, 2 on a taken port or an
    unusable policy.
    """

    from rich.console import Console

    from citadel.logs import configure_logging

    out, err = Console(), Console(stderr=True)
    configure_logging(level=log_level)
    policies = _resolve_policy_dir(err, policy_dir)
    running = find_running(state_dir)
    if running is not None:
        err.print(
            f"[red]error:[/] citadel up is already running for {state_dir} (pid {running.pid}, "
            f"CA {running.ca}); stop it first or pass another --state-dir"
        )
        raise typer.Exit(2)
    config = PlaneConfig(
        state_dir=state_dir,
        policy_dir=policies,
        ca_listen=ca_listen,
        authz_listen=authz_listen,
        admin_listen=admin_listen,
        audit_log=audit_log,
        trust_domain=trust_domain,
        grace=grace,
    )
    try:
        check_ports(
            [
                ("the CA", "--ca-listen", ca_listen),
                ("ext_authz", "--authz-listen", authz_listen),
                ("the admin app", "--admin-listen", admin_listen),
            ]
        )
        eventloop.run(_run_up(config, out, err), event_loop=event_loop)
    except PolicyError as exc:
        err.print(f"[red]error:[/] policy refused: {exc.message}")
        raise typer.Exit(2) from None
    except CitadelError as exc:
        err.print(f"[red]error:[/] {exc.message}")
        raise typer.Exit(2) from None
    except OSError as exc:
        err.print(f"[red]error:[/] {exc.filename or state_dir}: {exc.strerror}")
        raise typer.Exit(2) from None


def demo(
    state_dir: StateDir = Path(".citadel"),
    envoy: Annotated[
        bool, typer.Option("--envoy", help="Run the real thing: two Envoy sidecars, mTLS.")
    ] = False,
    tail: Annotated[int, typer.Option("--tail", help="Audit records to show.")] = 24,
    log_level: Annotated[str, typer.Option("--log-level", help="Operational log level.")] = (
        "error"
    ),
) -> None:
    """Show the plane working: SVIDs issued, Checks allowed and denied, the audit trail.

    Uses the `citadel up` running for --state-dir, or starts a private one in a temporary
    directory. Exits 0 only when every step behaved as the shipped policy says.
    """
    from rich.console import Console

    from citadel.logs import configure_logging

    configure_logging(level=log_level)
    out = Console()
    if not out.is_terminal:  # logs and CI: room for the tables instead of 80 columns
        out = Console(width=160)
    if envoy:
        from citadel.demo_envoy import run_envoy_demo

        raise typer.Exit(run_envoy_demo(state_dir=state_dir, console=out, tail=tail))
    from citadel.demo import run_demo

    raise typer.Exit(run_demo(state_dir=state_dir, console=out, tail=tail))
