"""`citadel dev ...`: a stand-in token issuer for laptops and tests (never production)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from citadel.ca.tokens import DEFAULT_AUDIENCE
from citadel.dev import init_dev_issuer, load_dev_issuer, mint_token
from citadel.durations import parse_duration
from citadel.errors import CitadelError

app = typer.Typer(
    no_args_is_help=True,
    help="Dev token issuer: mints tokens shaped like Kubernetes projected tokens.",
)

StateDir = Annotated[Path, typer.Option("--state-dir", help="State directory (holds dev-issuer/).")]


@app.command("issuer-init")
def issuer_init(state_dir: StateDir = Path(".citadel")) -> None:
    """Create (or reuse) DIR/dev-issuer/key.pem (RSA, 0600) and DIR/dev-issuer/jwks.json."""
    console = Console(stderr=True)
    try:
        issuer, created = init_dev_issuer(state_dir)
    except (CitadelError, OSError) as exc:
        console.print(f"[red]error:[/] {getattr(exc, 'message', exc)}")
        raise typer.Exit(1) from None
    verb = "created" if created else "reusing"
    console.print(f"[green]{verb}[/] dev token issuer (kid {issuer.kid})")
    console.print(f"  key:  {issuer.directory / 'key.pem'}")
    console.print(f"  JWKS: {issuer.jwks_path}")
    console.print(
        "  the CA accepts its tokens with: citadel ca serve --token-auth jwks "
        f"--jwks-file {issuer.jwks_path}"
    )


@app.command("token")
def token(
    namespace: Annotated[str, typer.Option("--namespace", "-n", help="Kubernetes namespace.")],
    service_account: Annotated[
        str, typer.Option("--service-account", "-s", help="Service account name.")
    ],
    state_dir: StateDir = Path(".citadel"),
    audience: Annotated[
        list[str] | None,
        typer.Option(
            "--audience", "-a", help=f"Audience (repeatable; default {DEFAULT_AUDIENCE})."
        ),
    ] = None,
    ttl: Annotated[str, typer.Option("--ttl", help="Lifetime, e.g. 10m, 1h.")] = "1h",
    pod_name: Annotated[str | None, typer.Option("--pod-name", help="Pod name claim.")] = None,
) -> None:
    """Print a JWT shaped exactly like a projected service-account token (stdout only)."""
    console = Console(stderr=True)
    try:
        lifetime = parse_duration(ttl)
    except ValueError as exc:
        console.print(f"[red]error:[/] --ttl: {exc}")
        raise typer.Exit(2) from None
    try:
        issuer = load_dev_issuer(state_dir)
        jwt = mint_token(
            issuer,
            namespace=namespace,
            service_account=service_account,
            audiences=tuple(audience or (DEFAULT_AUDIENCE,)),
            ttl=lifetime,
            pod_name=pod_name,
        )
    except CitadelError as exc:
        console.print(f"[red]error:[/] {exc.message}")
        raise typer.Exit(1) from None
    typer.echo(jwt)
