"""The servers' event loop choice: uvloop where installed, the standard loop on request."""

from __future__ import annotations

import asyncio
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest

from citadel import eventloop
from citadel.errors import ConfigError

POLICIES = Path(__file__).resolve().parents[2] / "policies"
HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None


async def _which() -> str:
    await asyncio.sleep(0)
    return eventloop.running_loop_name()


def test_asyncio_is_the_standard_loop() -> None:
    assert eventloop.loop_factory("asyncio") is None
    assert eventloop.run(_which(), event_loop="asyncio") == "asyncio"


@pytest.mark.skipif(not HAS_UVLOOP, reason="uvloop is not installed on this platform")
@pytest.mark.parametrize("choice", ["auto", "uvloop"])
def test_auto_and_uvloop_run_on_uvloop(choice: str) -> None:
    assert eventloop.run(_which(), event_loop=choice) == "uvloop"


@pytest.mark.parametrize("choice", ["uv", "", "trio", "AUTO"])
def test_unknown_loop_is_refused_before_running(choice: str) -> None:
    coro = _which()
    with pytest.raises(ConfigError, match="event loop"):
        eventloop.run(coro, event_loop=choice)
    assert coro.cr_frame is None  # closed, never started


def test_cli_refuses_unknown_loop_without_listening() -> None:
    # A subprocess, not CliRunner: ``serve`` configures process-wide logging on its stdout.
    result = subprocess.run(
        [sys.executable, "-m", "citadel.cli", "authz", "serve", "--policy-dir", str(POLICIES),
         "--listen", "127.0.0.1:0", "--admin-listen", "127.0.0.1:0", "--event-loop", "trio"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert result.returncode == 2
    assert "event loop 'trio'" in result.stderr
    assert "authz serving" not in result.stdout + result.stderr


def test_stop_signals_sets_the_event_and_restores_default_handling() -> None:
    import os
    import signal

    async def main() -> bool:
        async with eventloop.stop_signals() as stop:
            os.kill(os.getpid(), signal.SIGTERM)
            await asyncio.wait_for(stop.wait(), timeout=5)
            inside = stop.is_set()
        return inside and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL

    assert eventloop.run(main(), event_loop="asyncio")
