"""`citadel agent ...`: the sidecar agent (one command; options only).

Init containers run ``citadel agent --once`` on every pod start, so the agent's runtime
(gRPC, the SDS server, structlog) is imported inside the command, not with the CLI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from citadel.agent.keys import KeyType
from citadel.commands.options import EventLoop

app = typer.Typer(
    invoke_without_command=True,
    no_args_is_help=False,
    help="Sidecar agent: fetch, renew, serve over SDS.",
)


@app.callback()
def agent(
    ca_address: Annotated[str, typer.Option(help="CA gRPC address, HOST:PORT.")],
    ca_root: Annotated[Path, typer.Option(help="PEM root(s) to verify the CA's TLS with.")],
    token_file: Annotated[
        Path, typer.Option(help="Service-account token file (re-read on every request).")
    ],
    out_dir: Annotated[Path, typer.Option(help="Where svid.pem, svid-key.pem, bundle.pem go.")],
    once: Annotated[bool, typer.Option(help="Fetch once, write the files, exit.")] = False,
    sds_socket: Annotated[
        Path | None, typer.Option(help="Serve Envoy SDS on this Unix socket.")
    ] = None,
    key_type: Annotated[KeyType, typer.Option(help="Workload key algorithm.")] = KeyType.EC_P256,
    ttl: Annotated[
        str | None, typer.Option(help="Requested certificate lifetime (e.g. 1h); CA default.")
    ] = None,
    trust_domain: Annotated[
        str, typer.Option(help="Trust domain of the expected SPIFFE ID.")
    ] = "cluster.local",
    admin_listen: Annotated[
        str | None, typer.Option(help="HOST:PORT for /healthz and /readyz.")
    ] = None,
    ca_server_name: Annotated[
        str | None, typer.Option(help="TLS name to expect on the CA's certificate.")
    ] = None,
    max_attempts: Annotated[int, typer.Option(help="--once: attempts before giving up.")] = 10,
    max_retry_time: Annotated[
        str, typer.Option(help="--once: time budget for retries (e.g. 60s).")
    ] = "60s",
    bundle_poll: Annotated[
        str | None, typer.Option(help="Trust bundle poll period; default: the CA's hint.")
    ] = None,
    log_level: Annotated[str, typer.Option(help="debug, info, warning, error.")] = "info",
    event_loop: EventLoop = "auto",
) -> None:
    """Get a workload certificate from the CA; keep it renewed; serve it to Envoy."""
    from citadel import eventloop
    from citadel.agent.agent import AgentConfig
    from citadel.agent.health import parse_listen
    from citadel.agent.run import run_agent, run_once
    from citadel.durations import parse_duration
    from citadel.errors import CitadelError
    from citadel.logs import configure_logging
    from citadel.spiffe import TrustDomain

    configure_logging(level=log_level)
    try:
        config = AgentConfig(
            ca_address=ca_address,
            ca_root=ca_root,
            token_file=token_file,
            out_dir=out_dir,
            trust_domain=TrustDomain(trust_domain),
            key_type=key_type,
            ttl_seconds=int(parse_duration(ttl).total_seconds()) if ttl else None,
            ca_server_name=ca_server_name,
            max_attempts=max_attempts,
            max_retry_seconds=parse_duration(max_retry_time).total_seconds(),
            bundle_poll_seconds=parse_duration(bundle_poll).total_seconds()
            if bundle_poll
            else None,
        )
        admin = parse_listen(admin_listen) if admin_listen else None
    except (ValueError, CitadelError) as exc:
        typer.echo(f"citadel agent: {getattr(exc, 'message', exc)}", err=True)
        raise typer.Exit(2) from None
    try:
        if once:
            code = eventloop.run(run_once(config), event_loop=event_loop)
        else:
            code = eventloop.run(
                run_agent(config, sds_socket=sds_socket, admin=admin), event_loop=event_loop
            )
    except CitadelError as exc:
        typer.echo(f"citadel agent: {exc.message}", err=True)
        raise typer.Exit(1) from None
    raise typer.Exit(code)
