"""`citadel audit ...`: work with the tamper-evident audit trail."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519
from rich.console import Console

from citadel.audit import key_id, load_public_key, verify_files
from citadel.errors import ConfigError

app = typer.Typer(no_args_is_help=True, help="Inspect and verify audit trails.")


@app.command("verify")
def verify(
    files: Annotated[list[Path], typer.Argument(help="Audit files, rotated ones oldest first.")],
    public_key: Annotated[
        Path | None,
        typer.Option(
            help="PEM public key (or certificate) the checkpoints are signed with: every "
            "checkpoint must verify and closing records must be signed."
        ),
    ] = None,
    require_closed: Annotated[
        bool,
        typer.Option(
            help="Fail (exit 1) when a stream has no closing record: for archived logs, where "
            "a missing close means the tail was cut."
        ),
    ] = False,
) -> None:
    """Check every record's hash chain (and checkpoint signatures with --public-key); exit 1
    at the first altered, deleted, inserted, reordered or forged record."""
    console = Console(stderr=True, soft_wrap=True)
    for f in files:
        if not f.is_file():
            console.print(f"[red]error:[/] {f}: no such file")
            raise typer.Exit(2)
    key = None
    if public_key is not None:
        try:
            key = load_public_key(public_key)
        except ConfigError as exc:
            console.print(f"[red]error:[/] {exc.message}")
            raise typer.Exit(2) from None
    report = verify_files(files, public_key=key, require_closed=require_closed)
    if not report.ok:
        where = f"{report.problem_file}:{report.problem_line}: " if report.problem_line else ""
        console.print(f"[red]TAMPERED[/]: {where}{report.problem}")
        raise typer.Exit(1)
    for warning in report.warnings:
        console.print(f"[yellow]warning[/]: {warning}")
    signed = f", {report.checkpoints_verified} signed checkpoint(s) verified" if key else ""
    console.print(
        f"[green]ok[/]: {report.records} records in {len(report.streams)} stream(s), "
        f"every chain intact{signed}"
    )


@app.command("keygen")
def keygen(
    out: Annotated[Path, typer.Option(help="Private key file to write (mode 0600).")],
    key_type: Annotated[str, typer.Option(help="ed25519 or ec-p256.")] = "ed25519",
) -> None:
    """Create a checkpoint signing key (OUT) and its public key (OUT.pub) for verifiers."""
    console = Console(stderr=True, soft_wrap=True)
    if key_type == "ed25519":
        key: ed25519.Ed25519PrivateKey | ec.EllipticCurvePrivateKey = (
            ed25519.Ed25519PrivateKey.generate()
        )
    elif key_type == "ec-p256":
        key = ec.generate_private_key(ec.SECP256R1())
    else:
        console.print(f"[red]error:[/] --key-type must be ed25519 or ec-p256, not {key_type}")
        raise typer.Exit(2)
    pub_path = out.with_name(out.name + ".pub")
    if out.exists() or pub_path.exists():
        console.print(f"[red]error:[/] {out} or {pub_path} exists; refusing to overwrite")
        raise typer.Exit(2)
    pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as fh:
        fh.write(pem)
    pub_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    console.print(f"wrote {out} (0600) and {pub_path}; key_id {key_id(key.public_key())}")
