"""``citadel authz test`` and ``citadel authz replay``: a policy change, before it enforces.

``test`` runs a directory's policy test cases (see ``authz.policytests``) and prints them
the way ``opa test`` does: failures first with the decision's explanation, then a summary.
Exit 0 when all pass, 1 on any failure, 2 when the policy or a test file is invalid.

``replay`` re-decides recorded ``authz.decision`` audit records with a candidate policy and
lists the requests whose outcome would change. Exit 0 whatever changes (they are
information), 2 when the candidate is invalid or a log cannot be read.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

# The policy machinery (casbin, the engine, the audit reader) and rich load inside the
# commands: every ``citadel`` invocation builds this command tree.
if TYPE_CHECKING:
    from rich.console import Console

    from authz.engine import Engine
    from authz.policytests import TestReport
    from authz.replay import ReplayReport
    from citadel.errors import PolicyError

__all__ = ["register", "replay_command", "test_command"]

_RULE = "-" * 80


def _where(exc: PolicyError) -> str:
    if exc.file and exc.line:
        return f"{exc.file}:{exc.line}: "
    return f"{exc.file}: " if exc.file else ""


def _invalid(console: Console, what: str, exc: PolicyError, as_json: bool) -> typer.Exit:
    from rich.markup import escape

    if as_json:
        typer.echo(
            json.dumps(
                {"error": exc.message, "file": exc.file, "line": exc.line, "what": what}, indent=2
            )
        )
    else:
        console.print(f"[red]error:[/] {what}: {escape(_where(exc) + exc.message)}")
    return typer.Exit(2)


def _engine(console: Console, policy_dir: Path, what: str, as_json: bool) -> Engine:
    """The directory's policy built (its own tests not run); exit 2 when it is invalid."""
    from authz.reload import load_candidate
    from citadel.errors import PolicyError

    try:
        _, engine = load_candidate(policy_dir, run_tests=False)
    except PolicyError as exc:
        raise _invalid(console, what, exc, as_json) from None
    return engine


def _print_tests(console: Console, report: TestReport, verbose: bool) -> None:
    from rich.markup import escape

    if report.failures:
        console.print("FAILURES")
        console.print(_RULE)
        for r in report.failures:
            c = r.case
            console.print(
                f"[bold]{escape(c.file)}:{c.line}[/] {escape(c.name)}: [red]FAIL[/] "
                f"({r.duration_s * 1000:.2f}ms)"
            )
            if c.description:
                console.print(f"  {escape(c.description)}")
            who = c.principal or "anonymous"
            console.print(f"  request:  {escape(f'{who} {c.method} {c.host}{c.path}')}")
            if r.tuple_:
                console.print(f"  tuple:    {escape(repr(r.tuple_))}")
            console.print(f"  expected: {c.expect}   got: [red]{r.got}[/]")
            console.print(f"  why:      {escape(r.explain())}")
            console.print()
    console.print("SUMMARY")
    console.print(_RULE)
    current = None
    for r in report.results:
        if not verbose and r.passed:
            continue
        if r.case.file != current:
            current = r.case.file
            console.print(f"{escape(current)}:")
        mark = "[green]PASS[/]" if r.passed else "[red]FAIL[/]"
        console.print(f"{escape(r.case.name)}: {mark} ({r.duration_s * 1000:.2f}ms)")
    console.print(_RULE)
    total = len(report.results)
    failed = len(report.failures)
    console.print(f"[green]PASS[/]: {total - failed}/{total}  (revision {report.revision})")
    if failed:
        console.print(f"[red]FAIL[/]: {failed}/{total}")


def test_command(
    policy_dir: Annotated[
        Path, typer.Option("--policy-dir", help="Directory with model.conf, policy.csv, tests/.")
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON report.")] = False,
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="List passing cases.")] = False,
) -> None:
    """Run the policy's test cases; exit 0 all pass, 1 any failure, 2 invalid policy."""
    from rich.console import Console

    from authz.policytests import load_cases, run_cases
    from citadel.errors import PolicyError

    console = Console()
    engine = _engine(console, policy_dir, "policy is invalid", as_json)
    try:
        cases = load_cases(policy_dir)
        report = run_cases(engine, cases)
    except PolicyError as exc:
        raise _invalid(console, "policy tests are invalid", exc, as_json) from None
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    elif not cases:
        Console(stderr=True).print(
            f"[yellow]warning:[/] no test cases in {policy_dir}/tests/*.yaml or *.test.yaml"
        )
    else:
        _print_tests(console, report, verbose)
    if not report.ok:
        raise typer.Exit(1)


def _print_replay(console: Console, report: ReplayReport) -> None:
    from rich.markup import escape
    from rich.table import Table

    if report.changes:
        table = Table(title=f"Changes under candidate revision {report.candidate_revision}")
        table.add_column("change")
        table.add_column("principal", overflow="fold")
        table.add_column("rule before", overflow="fold")
        table.add_column("rule with candidate", overflow="fold")
        table.add_column("requests", justify="right")
        table.add_column("examples", overflow="fold")
        for g in report.groups():
            colour = "red" if g["direction"] == "allow->deny" else "yellow"
            table.add_row(
                f"[{colour}]{g['direction']}[/]",
                escape(g["principal"]),
                escape(g["was_rule"]),
                escape(g["now_rule"]),
                str(g["count"]),
                escape("\n".join(g["examples"])),
            )
        console.print(table)
    console.print(
        f"{report.replayed} decisions replayed ({report.skipped} skipped): "
        f"{len(report.changes)} would change "
        f"([red]{report.allow_to_deny} allow->deny[/], "
        f"[yellow]{report.deny_to_allow} deny->allow[/]), "
        f"{report.replayed - len(report.changes)} unchanged"
    )


def replay_command(
    candidate: Annotated[
        Path, typer.Option("--candidate", help="Candidate policy directory to replay against.")
    ],
    audit_log: Annotated[
        list[Path],
        typer.Option("--audit-log", help="Audit log with authz.decision records (repeatable)."),
    ],
    as_json: Annotated[bool, typer.Option("--json", help="Print a JSON report.")] = False,
) -> None:
    """Re-decide recorded decisions with a candidate policy; list what would change."""
    from rich.console import Console
    from rich.markup import escape

    from authz.replay import replay_files

    console = Console()
    engine = _engine(console, candidate, "candidate policy is invalid", as_json)
    try:
        report = replay_files(engine, audit_log)
    except OSError as exc:
        console.print(f"[red]error:[/] cannot read audit log: {escape(str(exc))}")
        raise typer.Exit(2) from None
    if as_json:
        typer.echo(json.dumps(report.as_dict(), indent=2))
    else:
        _print_replay(console, report)


def register(app: typer.Typer) -> None:
    """Add ``test`` and ``replay`` to the ``citadel authz`` app."""
    app.command("test")(test_command)
    app.command("replay")(replay_command)
