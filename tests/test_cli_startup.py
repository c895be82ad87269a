"""The ``citadel`` command tree loads without the service stacks.

Every invocation (an agent init container, ``citadel dev token``, a test running the CLI)
builds the whole command tree; the servers, the policy engine and their frameworks load
inside the command that runs them. A module-level import of one of these in a command
module puts ~1 s back on every invocation, which this catches.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

HEAVY = (
    "fastapi",
    "starlette",
    "uvicorn",
    "prometheus_client",
    "casbin",
    "authz.server",
    "authz.engine",
    "authz.decisions",
    "authz.policytests",
    "authz.replay",
    "authz.workers",
    "citadel.agent.run",
)


def test_importing_the_cli_leaves_the_service_stacks_unloaded() -> None:
    probe = "import json, sys, citadel.cli; print(json.dumps(sorted(sys.modules)))"
    run = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=True
    )
    loaded = set(json.loads(run.stdout))
    assert "citadel.commands.agent" in loaded  # the probe really built the tree
    assert sorted(loaded.intersection(HEAVY)) == []


def test_the_cli_default_message_size_is_the_servers() -> None:
    from authz.commands import DEFAULT_MAX_MESSAGE_BYTES
    from authz.server import DEFAULT_MAX_MESSAGE_BYTES as SERVER_DEFAULT

    assert DEFAULT_MAX_MESSAGE_BYTES == SERVER_DEFAULT


@pytest.mark.parametrize("argv", [["authz", "check", "--help"], ["agent", "--help"]])
def test_help_still_lists_the_options(argv: list[str]) -> None:
    run = subprocess.run(
        [sys.executable, "-m", "citadel.cli", *argv], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert "--policy-dir" in run.stdout or "--ca-address" in run.stdout
