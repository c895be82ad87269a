"""The CA's readiness probe, run for real: the exact script from ca-deployment.yaml, aimed at
a real `citadel ca serve` on loopback, passes while the CA serves and fails once it stops."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from citadel.ca.authority import cacerts_dir, init_authority
from citadel.dev import init_dev_issuer
from tests.conftest import free_port
from tests.deploy.manifests import one, pod_spec
from tests.e2e.conftest import ca_serve_cmd


def _probe_script(root_cert: Path, port: int) -> str:
    (c,) = pod_spec(one("Deployment", "citadel-ca"))["containers"]
    script = c["readinessProbe"]["exec"]["command"][2]
    state_dir = c["args"][c["args"].index("--state-dir") + 1]
    listen_port = c["args"][c["args"].index("--listen") + 1].rsplit(":", 1)[1]
    return script.replace(f"{state_dir}/root-cert.pem", str(root_cert)).replace(
        f"localhost:{listen_port}", f"localhost:{port}"
    )


def _run_probe(script: str) -> int:
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, timeout=30)
    return result.returncode


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    state = tmp_path_factory.mktemp("ca-probe")
    init_authority(cacerts_dir(state), trust_domain="cluster.local")
    init_dev_issuer(state)
    port = free_port()
    proc = subprocess.Popen(
        ca_serve_cmd(
            state, port, "--dns-name", "localhost", "--audit-log", str(state / "audit.log")
        ),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    script = _probe_script(cacerts_dir(state) / "root-cert.pem", port)
    try:
        yield proc, script
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)


def test_probe_passes_while_the_ca_serves_and_fails_once_it_stops(
    ca: tuple[subprocess.Popen[bytes], str],
) -> None:
    proc, script = ca
    deadline = time.monotonic() + 20
    while _run_probe(script) != 0:
        assert proc.poll() is None, "citadel ca serve exited"
        assert time.monotonic() < deadline, "the probe never passed"
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=15) == 0
    assert _run_probe(script) != 0
