"""Every `citadel` command line deploy/ contains — container args in the manifests and
command lines in the docs and comments — names a real sub-command, real flags, valid choice
values and every required flag, according to the CLI's own click command tree."""

from __future__ import annotations

import enum
import re
import shlex
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import typer.main

from citadel.cli import app
from tests.deploy.manifests import (
    DEPLOY,
    citadel_containers,
    example_files,
    kubernetes_files,
    load_docs,
)

ROOT = typer.main.get_command(app)


def _manifest_invocations() -> Iterator[tuple[str, list[str]]]:
    for path in [*kubernetes_files(), *example_files()]:
        for where, c in citadel_containers(load_docs(path)):
            yield f"{path.name}:{where}", list(c.get("args", []))


_FENCE = re.compile(r"^\s*(```|~~~)")
_PROMPT = re.compile(r"^\s*(?:#\s*|\$\s+)*")


def _doc_lines(path: Path) -> Iterator[tuple[int, str]]:
    """Lines that may hold a command: fenced code in Markdown, comments elsewhere."""
    in_code = False
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if path.suffix == ".md":
            if _FENCE.match(line):
                in_code = not in_code
            elif in_code:
                yield n, line
        elif line.lstrip().startswith("#"):
            yield n, line


def _doc_invocations() -> Iterator[tuple[str, list[str]]]:
    files = sorted(
        p
        for p in DEPLOY.rglob("*")
        if p.is_file() and (p.suffix in {".md", ".yaml", ".yml"} or p.name == "Containerfile")
    )
    for path in files:
        pending: tuple[int, str] | None = None
        for n, raw in _doc_lines(path):
            text = _PROMPT.sub("", raw, count=1).strip()
            if pending is None:
                # A command line, not prose that mentions citadel: a known sub-command
                # followed by flags (or a continuation).
                words = text.split()
                if not (
                    len(words) > 2
                    and words[0] == "citadel"
                    and words[1] in ROOT.commands
                    and ("--" in text or text.endswith("\\"))
                ):
                    continue
                pending = (n, "")
            start, acc = pending
            acc += " " + text.rstrip("\\").strip()
            if text.endswith("\\"):
                pending = (start, acc)
                continue
            pending = None
            words = shlex.split(acc, comments=False)
            yield f"{path.relative_to(DEPLOY)}:{start}", words[1:]


INVOCATIONS = dict([*_manifest_invocations(), *_doc_invocations()])


def _resolve(args: list[str]) -> tuple[Any, list[str], list[str]]:
    """(command, sub-command path, remaining args): descend while a word names a child."""
    node, path = ROOT, []
    rest = list(args)
    while rest and getattr(node, "commands", None) and rest[0] in node.commands:
        path.append(rest[0])
        node = node.commands[rest.pop(0)]
    return node, path, rest


def _options(node: Any) -> dict[str, Any]:
    return {
        name: p
        for p in node.params
        if p.param_type_name == "option"
        for name in [*p.opts, *p.secondary_opts]
    }


def _choices(opt: Any) -> set[str] | None:
    """The values a choice option accepts (click's Choice, or the Enum typer builds it from)."""
    choices = getattr(getattr(opt, "type", None), "choices", None)
    if choices is None:
        annotation = getattr(getattr(opt, "type_descriptor", None), "annotation", None)
        if isinstance(annotation, type) and issubclass(annotation, enum.Enum):
            choices = [m.value for m in annotation]
    return None if choices is None else {str(c) for c in choices}


def _is_placeholder(value: str) -> bool:
    """DIR, HOST:PORT, ec-p256|rsa-2048 in docs stand for a value; they are not one."""
    return "|" in value or (value.upper() == value and any(c.isalpha() for c in value))


def test_deploy_contains_citadel_command_lines() -> None:
    used = {tuple(_resolve(a)[1]) for a in INVOCATIONS.values()}
    assert {("ca", "serve"), ("authz", "serve"), ("agent",)} <= used


@pytest.mark.parametrize("args", INVOCATIONS.values(), ids=INVOCATIONS.keys())
def test_command_line_matches_the_cli(args: list[str]) -> None:
    node, path, rest = _resolve(args)
    assert path, f"{args[:1]} is not a citadel sub-command"
    if hasattr(node, "commands") and rest and not rest[0].startswith("-"):
        pytest.fail(
            f"`citadel {' '.join(path)}` has no sub-command {rest[0]!r}; "
            f"it has {sorted(node.commands)}"
        )
    options = _options(node)
    given: set[str] = set()
    i = 0
    while i < len(rest):
        word = rest[i]
        i += 1
        if not word.startswith("--"):
            continue
        flag, _, inline = word.partition("=")
        assert flag in options, (
            f"`citadel {' '.join(path)}` has no {flag}; it has {sorted(options)}"
        )
        opt = options[flag]
        given.add(opt.name)
        if opt.is_flag or opt.count:
            continue
        value = inline or (rest[i] if i < len(rest) else "")
        if not inline:
            i += 1
        choices = _choices(opt)
        if choices and not _is_placeholder(value):
            assert value in choices, f"{flag} {value!r} is not one of {sorted(choices)}"
    missing = [
        p.opts[0]
        for p in node.params
        if p.param_type_name == "option" and p.required and p.name not in given
    ]
    assert not missing, f"`citadel {' '.join(path)}` also requires {missing}"


_AGENT = ["agent", "--ca-address", "ca:15012", "--ca-root", "r.pem"]
_AGENT += ["--token-file", "t", "--out-dir", "o"]
BROKEN_LINES = {
    "misspelt-flag": ["agent", "--ca-adress", *_AGENT[2:]],
    "missing-required-flag": ["agent", *_AGENT[3:]],
    "value-not-a-choice": [*_AGENT, "--key-type", "ec-p521"],
    "unknown-sub-command": ["ca", "serv", "--listen", "0.0.0.0:15012"],
    "not-a-citadel-command": ["cas", "serve"],
}


@pytest.mark.parametrize("args", BROKEN_LINES.values(), ids=BROKEN_LINES.keys())
def test_a_wrong_command_line_fails_the_check(args: list[str]) -> None:
    with pytest.raises((AssertionError, pytest.fail.Exception)):
        test_command_line_matches_the_cli(args)


def test_the_correct_agent_line_passes_the_check() -> None:
    test_command_line_matches_the_cli(_AGENT)
