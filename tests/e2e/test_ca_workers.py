"""``citadel ca serve --workers 2``: two CA processes on one port, one audit file, clean stop."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from cryptography import x509

from citadel.audit import read_records
from citadel.ca._proto import ca_pb2, ca_pb2_grpc
from citadel.dev import load_dev_issuer, mint_token
from tests.conftest import assert_workers_drain_on_sigterm, free_port
from tests.e2e.conftest import make_ca_state
from tests.e2e.test_ca_grpc import csr_pem


def serve_argv(state: Path, port: int, audit: Path, workers: int = 2) -> list[str]:
    return [
        sys.executable, "-m", "citadel.cli", "ca", "serve",
        "--state-dir", str(state), "--listen", f"127.0.0.1:{port}",
        "--jwks-file", str(load_dev_issuer(state).jwks_path),
        "--audit-log", str(audit), "--log-level", "warning",
        "--workers", str(workers),
    ]  # fmt: skip


def headers(audit: Path) -> list[dict]:
    if not audit.exists():
        return []
    return [r for r in read_records([audit]) if r.get("kind") == "audit.header"]


@pytest.fixture(scope="module")
def state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ca_state(tmp_path_factory.mktemp("ca-workers"))


@pytest.fixture(scope="module")
def two_workers(state: Path):
    port, audit = free_port(), state / "audit.jsonl"
    proc = subprocess.Popen(
        serve_argv(state, port, audit), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    deadline = time.monotonic() + 30
    while len(headers(audit)) < 2:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"workers did not start: {proc.communicate()[1].decode()[-2000:]}")
        time.sleep(0.1)
    yield proc, port, audit
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_both_workers_issue_over_tls(state: Path, two_workers) -> None:
    _proc, port, audit = two_workers
    root = (state / "cacerts" / "root-cert.pem").read_bytes()
    creds = grpc.ssl_channel_credentials(root_certificates=root)
    token = mint_token(load_dev_issuer(state), namespace="default", service_account="web")
    csr, serials = csr_pem(), set()
    # Every channel is its own connection; the kernel spreads connections across workers.
    for _ in range(40):
        with grpc.secure_channel(
            f"localhost:{port}", creds, options=[("grpc.use_local_subchannel_pool", 1)]
        ) as ch:
            resp = ca_pb2_grpc.IstioCertificateServiceStub(ch).CreateCertificate(
                ca_pb2.IstioCertificateRequest(csr=csr),
                metadata=[("authorization", f"Bearer {token}")],
                timeout=10,
            )
            serials.add(x509.load_pem_x509_certificate(resp.cert_chain[0].encode()).serial_number)
    assert len(serials) == 40, "every issuance has its own serial across workers"
    time.sleep(0.2)
    records = list(read_records([audit]))
    pid_of = {r["stream"]: r["pid"] for r in records if r.get("kind") == "audit.header"}
    assert len(set(pid_of.values())) == 2, "each worker is its own process"
    issued = Counter(pid_of[r["stream"]] for r in records if r.get("kind") == "ca.issuance")
    assert sum(issued.values()) == 40, "exactly one audit record per issuance, none lost"
    assert len(issued) == 2, f"both workers issued: {dict(issued)}"


def test_sigterm_drains_every_worker_and_the_chains_verify(two_workers) -> None:
    proc, _port, audit = two_workers
    assert_workers_drain_on_sigterm(proc, audit, workers=2)


def test_a_port_already_taken_is_refused_before_any_worker_starts(
    state: Path, tmp_path: Path
) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        proc = subprocess.run(
            serve_argv(state, port, tmp_path / "audit.jsonl"),
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "200"},
        )
    assert proc.returncode != 0
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr
    assert "address already in use" in proc.stderr
    assert not (tmp_path / "audit.jsonl").exists()
