"""`citadel audit ...`: work with the tamper-evident audit trail."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console

from citadel.audit import verify_files

app = typer.Typer(no_args_is_help=True, help="Inspect and verify audit trails.")


@app.command("verify")
def verify(
    files: Annotated[list[Path], typer.Argument(help="Audit files, rotated ones oldest first.")],
) -> None:
    """Check every record's hash chain; exit 1 at the first altered, deleted, inserted or
    reordered record."""
    console = Console(stderr=True)
    for f in files:
        if not f.is_file():
            console.print(f"[red]error:[/] {f}: no such file")
            raise typer.Exit(2)
    report = verify_files(files)
    if report.ok:
        console.print(
            f"[green]ok[/]: {report.records} records in {len(report.streams)} stream(s), "
            "every chain intact"
        )
        return
    console.print(
        f"[red]TAMPERED[/]: {report.problem_file}:{report.problem_line}: {report.problem}"
    )
    raise typer.Exit(1)
