"""Shared by the bench tests: the bench scripts on the import path, a trivial servicer."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.append(str(Path(__file__).resolve().parents[2] / "bench"))

import loadgen


@pytest.fixture(scope="module")
def trivial(tmp_path_factory: pytest.TempPathFactory):
    port = loadgen.free_port()
    target = f"127.0.0.1:{port}"
    server = loadgen.ServerProcess(
        [
            sys.executable,
            str(Path(loadgen.__file__).with_name("trivial_authz.py")),
            "--listen",
            target,
        ],
        name="trivial",
        log_dir=tmp_path_factory.mktemp("trivial"),
    )
    try:
        payload = loadgen.check_payload(principal="", host="h", method="GET", path="/x")
        loadgen.wait_for_check(target, payload, timeout=20)
        yield target, payload
    finally:
        assert server.stop() == 0
