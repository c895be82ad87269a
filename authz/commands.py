"""`citadel authz ...` commands: thin wrappers over authz.server and authz.decisions.

Every ``citadel`` invocation imports this module to build the command tree, so it holds
only the options: the server, engine and logging stacks (gRPC, FastAPI, uvicorn, casbin,
structlog) are imported inside the command that needs them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from authz.lifecycle_commands import register as register_lifecycle_commands
from citadel.commands.options import AuditSigningKey, EventLoop

if TYPE_CHECKING:
    from authz.server import AuthzConfig, RunningAuthz
    from citadel.errors import PolicyError

app = typer.Typer(no_args_is_help=True, help="The ext_authz decision service.")

#: authz.server.DEFAULT_MAX_MESSAGE_BYTES, spelt here so --help needs no server import
#: (tests/test_cli_startup.py holds the two equal).
DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024

PolicyDir = Annotated[
    Path,
    typer.Option("--policy-dir", help="Directory with model.conf and policy.csv."),
]


def policy_error_text(exc: PolicyError, policy_dir: Path) -> str:
    where = ""
    if exc.file:
        where = f"{policy_dir / exc.file}" + (f":{exc.line}" if exc.line else "") + ": "
    return f"{where}{exc.message}"


async def _serve(
    config: AuthzConfig, *, on_ready: Callable[[RunningAuthz], None] | None = None
) -> None:
    from authz.server import start_authz
    from citadel.eventloop import stop_signals
    from citadel.logs import get_logger

    running = await start_authz(config)
    async with stop_signals() as stop:  # absorbed while draining too
        if on_ready is not None:  # a --workers supervisor waits for this
            on_ready(running)
        await stop.wait()
        get_logger("authz").info("draining", grace_s=config.grace_s)
        await running.stop()


@app.command("serve")
def serve(
    policy_dir: PolicyDir,
    listen: Annotated[str, typer.Option(help="gRPC ext_authz listener HOST:PORT.")] = (
        "127.0.0.1:9191"
    ),
    admin_listen: Annotated[
        str, typer.Option(help="Admin HTTP listener HOST:PORT (health, metrics, explain).")
    ] = "127.0.0.1:9192",
    audit_log: Annotated[str, typer.Option(help="Audit file, or - for stdout.")] = "-",
    audit_signing_key: AuditSigningKey = None,
    tls_cert: Annotated[Path | None, typer.Option(help="Server certificate (PEM).")] = None,
    tls_key: Annotated[Path | None, typer.Option(help="Server key (PEM).")] = None,
    client_ca: Annotated[
        Path | None, typer.Option(help="Require client certificates signed by this CA (mTLS).")
    ] = None,
    trust_xfcc: Annotated[
        bool,
        typer.Option(help="HTTP variant: take the principal from x-forwarded-client-cert URI="),
    ] = False,
    http_prefix: Annotated[
        str, typer.Option(help="Path prefix of Envoy's HTTP ext_authz variant.")
    ] = "/ext_authz",
    http_listen: Annotated[
        str | None,
        typer.Option(
            help="Serve Envoy's HTTP ext_authz variant alone on this HOST:PORT (every worker), "
            "so sidecars need not reach the admin port."
        ),
    ] = None,
    max_message_bytes: Annotated[
        int, typer.Option(help="Largest CheckRequest accepted.")
    ] = DEFAULT_MAX_MESSAGE_BYTES,
    grace: Annotated[float, typer.Option(help="Seconds in-flight checks get on SIGTERM.")] = 10.0,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
    workers: Annotated[
        int,
        typer.Option(
            min=1,
            help="Processes sharing the gRPC port (SO_REUSEPORT), each with its own engine, "
            "reload watcher and audit stream; the admin app runs in worker 0.",
        ),
    ] = 1,
    shadow_policy_dir: Annotated[
        Path | None,
        typer.Option(
            help="A candidate policy decided beside every Check and never enforced; "
            "disagreements are counted and audited (authz.shadow). Hot-reloads too."
        ),
    ] = None,
    event_loop: EventLoop = "auto",
) -> None:
    """Serve envoy.service.auth.v3.Authorization/Check plus the admin HTTP app.

    Exits 2 without listening if the policy, TLS files, audit log or ports are unusable;
    exits 0 after draining on SIGTERM.
    """
    from rich.console import Console

    from authz.server import AuthzConfig
    from authz.workers import run_workers
    from citadel import eventloop
    from citadel.errors import ConfigError, PolicyError
    from citadel.logs import configure_logging

    configure_logging(level=log_level)
    config = AuthzConfig(
        policy_dir=policy_dir,
        listen=listen,
        admin_listen=admin_listen,
        audit_log=audit_log,
        audit_signing_key=audit_signing_key,
        tls_cert=tls_cert,
        tls_key=tls_key,
        client_ca=client_ca,
        trust_xfcc=trust_xfcc,
        http_prefix=http_prefix,
        http_listen=http_listen,
        max_message_bytes=max_message_bytes,
        grace_s=grace,
        shadow_policy_dir=shadow_policy_dir,
        event_loop=event_loop,
    )
    err = Console(stderr=True)
    try:
        if workers > 1:
            raise typer.Exit(run_workers(config, workers=workers, log_level=log_level))
        eventloop.run(_serve(config), event_loop=config.event_loop)
    except PolicyError as exc:
        err.print(f"[red]error:[/] policy refused: {policy_error_text(exc, policy_dir)}")
        raise typer.Exit(2) from None
    except ConfigError as exc:
        err.print(f"[red]error:[/] {exc.message}")
        raise typer.Exit(2) from None


@app.command("check")
def check(
    policy_dir: PolicyDir,
    principal: Annotated[
        str, typer.Option(help="Caller's SPIFFE ID as Envoy sends it; empty for anonymous.")
    ] = "",
    host: Annotated[str, typer.Option(help="Host (port and case are normalised).")] = "",
    method: Annotated[str, typer.Option(help="HTTP method.")] = "GET",
    path: Annotated[str, typer.Option(help="Raw request path, query allowed.")] = "/",
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead.")] = False,
) -> None:
    """Decide one request against a policy directory and say why.

    Exit 0 allow, 1 deny, 2 bad input or an invalid policy.
    """
    import json

    from rich.console import Console
    from rich.table import Table

    from authz.decisions import explain_request
    from authz.loading import load_engine
    from citadel.errors import PolicyError

    out, err = Console(), Console(stderr=True)
    try:
        engine = load_engine(policy_dir).engine
    except PolicyError as exc:
        err.print(f"[red]error:[/] policy refused: {policy_error_text(exc, policy_dir)}")
        raise typer.Exit(2) from None
    result = explain_request(engine, principal=principal, host=host, method=method, path=path)
    bad_input = result.tuple is None and result.code in ("method_invalid", "host_invalid")
    if as_json:
        out.print_json(json.dumps(result.as_dict()))
    else:
        verdict = "[bold green]ALLOW[/]" if result.allowed else "[bold red]DENY[/]"
        table = Table(show_header=False, box=None, padding=(0, 2))
        table.add_row("decision", verdict)
        if result.reason:
            table.add_row("why", result.reason)
        table.add_row("rule", ", ".join(result.rule) if result.rule else "(none matched)")
        if result.tuple is not None:
            t = result.tuple
            table.add_row("tuple", f"sub={t.sub}  dom={t.dom}  obj={t.obj}  act={t.act}")
            table.add_row("roles", ", ".join(result.roles) or "(none)")
        table.add_row("policy", f"{result.revision} ({result.engine} engine)")
        out.print(table)
    if bad_input:
        raise typer.Exit(2)
    raise typer.Exit(0 if result.allowed else 1)


# `citadel authz test` and `citadel authz replay` (authz/lifecycle_commands.py).
register_lifecycle_commands(app)
