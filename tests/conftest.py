"""Fixtures shared by every test package. Servers bind loopback only."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
from pathlib import Path

import pytest

from citadel.audit import verify_files


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def port() -> int:
    return free_port()


def assert_workers_drain_on_sigterm(proc: subprocess.Popen, audit: Path, *, workers: int) -> None:
    """SIGTERM to a ``--workers`` supervisor: exit 0, one verifying chain per worker in the
    shared audit file, and no torn or interleaved line."""
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    report = verify_files([audit])
    assert report.ok, report.problem
    assert len(report.streams) == workers
    for raw in audit.read_bytes().splitlines():
        json.loads(raw)  # no line was torn or interleaved
