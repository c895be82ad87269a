"""The ``citadel`` command: wires every sub-command; holds no logic."""

from __future__ import annotations

import typer

from authz.commands import app as authz_app
from citadel.commands.agent import app as agent_app
from citadel.commands.audit import app as audit_app
from citadel.commands.ca import app as ca_app
from citadel.commands.dev import app as dev_app
from citadel.commands.up import demo, up

app = typer.Typer(
    no_args_is_help=True,
    help="citadel: SPIFFE certificates for workloads and RBAC decisions for Envoy.",
    pretty_exceptions_enable=False,
)
app.add_typer(ca_app, name="ca", help="Certificate authority: init and serve.")
app.add_typer(authz_app, name="authz", help="ext_authz decision service.")
app.add_typer(agent_app, name="agent", help="Sidecar agent: fetch, renew, serve over SDS.")
app.add_typer(dev_app, name="dev", help="Dev token issuer (embedded default and tests only).")
app.add_typer(audit_app, name="audit", help="Tamper-evident audit trail.")
app.command("up")(up)
app.command("demo")(demo)


def main() -> None:
    app()


if __name__ == "__main__":
    main()
