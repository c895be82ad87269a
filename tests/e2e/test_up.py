"""`citadel up` as a real process on loopback: all three endpoints, SIGTERM, reuse, refusals."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from envoy.service.auth.v3 import external_auth_pb2_grpc
from google.rpc import code_pb2

from citadel.audit import read_records, verify_files
from citadel.ca._proto import ca_pb2, ca_pb2_grpc
from citadel.demo import check_request
from citadel.dev import load_dev_issuer, mint_token
from citadel.embedded import check_ports
from citadel.errors import ConfigError
from tests.conftest import free_port

FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"


@dataclass
class Up:
    proc: subprocess.Popen[str]
    state: Path
    ca: int
    authz: int
    admin: int

    def info(self) -> dict:
        return json.loads((self.state / "up.json").read_text())

    def stop(self, timeout: float = 15) -> tuple[int, str, str]:
        self.proc.send_signal(signal.SIGTERM)
        out, err = self.proc.communicate(timeout=timeout)
        return self.proc.returncode, out, err


def start_up(state: Path, *extra: str, ports: tuple[int, int, int] | None = None) -> Up:
    ca, authz, admin = ports or (free_port(), free_port(), free_port())
    argv = [
        sys.executable, "-m", "citadel.cli", "up", "--state-dir", str(state),
        "--ca-listen", f"127.0.0.1:{ca}", "--authz-listen", f"127.0.0.1:{authz}",
        "--admin-listen", f"127.0.0.1:{admin}", "--grace", "2", *extra,
    ]  # fmt: skip
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return Up(proc, state, ca, authz, admin)


def wait_ready(up: Up, timeout: float = 30) -> Up:
    """Until up.json names this process (it is written once all three listen)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if up.proc.poll() is not None:
            out, err = up.proc.communicate()
            raise AssertionError(f"citadel up exited {up.proc.returncode}:\n{out}\n{err}")
        try:
            if up.info()["pid"] == up.proc.pid:
                return up
        except (OSError, ValueError, KeyError):
            pass
        time.sleep(0.05)
    up.proc.kill()
    raise AssertionError(f"citadel up not ready after {timeout}s")


@pytest.fixture(scope="module")
def running(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Up]:
    up = wait_ready(start_up(tmp_path_factory.mktemp("up") / "state"))
    yield up
    if up.proc.poll() is None:
        up.proc.kill()
        up.proc.communicate()


def _csr(spiffe_id: str) -> bytes:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "demo")]))
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(spiffe_id)]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM)


def test_up_json_describes_the_running_plane(running: Up) -> None:
    info = running.info()
    assert info["ca"] == f"127.0.0.1:{running.ca}"
    assert info["authz"] == f"127.0.0.1:{running.authz}"
    assert info["admin"] == f"127.0.0.1:{running.admin}"
    assert info["audit_log"] == str((running.state / "audit.log").resolve())
    assert Path(info["root_cert"]).read_bytes().startswith(b"-----BEGIN CERTIFICATE-----")


def test_ca_issues_an_svid_for_a_dev_token_over_tls(running: Up) -> None:
    root = (running.state / "cacerts" / "root-cert.pem").read_bytes()
    token = mint_token(load_dev_issuer(running.state), namespace="shop", service_account="frontend")
    creds = grpc.ssl_channel_credentials(root_certificates=root)
    with grpc.secure_channel(
        f"127.0.0.1:{running.ca}", creds, options=[("grpc.ssl_target_name_override", "localhost")]
    ) as channel:
        reply = ca_pb2_grpc.IstioCertificateServiceStub(channel).CreateCertificate(
            ca_pb2.IstioCertificateRequest(csr=_csr(FRONTEND).decode(), validity_duration=600),
            metadata=(("authorization", f"Bearer {token}"),),
            timeout=10,
        )
    leaf = x509.load_pem_x509_certificate(reply.cert_chain[0].encode())
    uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert uris.get_values_for_type(x509.UniformResourceIdentifier) == [FRONTEND]
    assert reply.cert_chain[-1].encode().strip() == root.strip()


def test_ca_refuses_a_call_without_a_token(running: Up) -> None:
    root = (running.state / "cacerts" / "root-cert.pem").read_bytes()
    creds = grpc.ssl_channel_credentials(root_certificates=root)
    with (
        grpc.secure_channel(
            f"127.0.0.1:{running.ca}",
            creds,
            options=[("grpc.ssl_target_name_override", "localhost")],
        ) as channel,
        pytest.raises(grpc.RpcError) as info,
    ):
        ca_pb2_grpc.IstioCertificateServiceStub(channel).CreateCertificate(
            ca_pb2.IstioCertificateRequest(csr=_csr(FRONTEND).decode()), timeout=10
        )
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED


@pytest.mark.parametrize(
    ("principal", "path", "expected"),
    [
        (FRONTEND, "/api/orders", code_pb2.OK),
        ("", "/api/orders", code_pb2.PERMISSION_DENIED),
        (FRONTEND, "/admin/users", code_pb2.PERMISSION_DENIED),
    ],
    ids=["frontend-allowed", "anonymous-denied", "admin-deny-rule"],
)
def test_ext_authz_check_decides_by_the_shipped_policy(
    running: Up, principal: str, path: str, expected: int
) -> None:
    with grpc.insecure_channel(f"127.0.0.1:{running.authz}") as channel:
        reply = external_auth_pb2_grpc.AuthorizationStub(channel).Check(
            check_request(
                principal=principal,
                host="orders.shop.svc.cluster.local",
                method="GET",
                path=path,
                request_id="test-up",
            ),
            timeout=5,
        )
    assert reply.status.code == expected


def test_admin_answers_health_and_readiness(running: Up) -> None:
    base = f"http://127.0.0.1:{running.admin}"
    assert httpx.get(f"{base}/healthz", timeout=5).status_code == 200
    ready = httpx.get(f"{base}/readyz", timeout=5)
    assert ready.status_code == 200 and ready.json()["status"] == "ready"


def test_a_second_up_on_a_running_state_dir_is_refused(running: Up) -> None:
    second = start_up(running.state)
    _out, err = second.proc.communicate(timeout=20)
    assert second.proc.returncode == 2
    assert "already running" in err and str(running.proc.pid) in err


def test_sigterm_drains_and_exits_zero(running: Up) -> None:
    code, out, err = running.stop()
    assert code == 0, err
    assert "created dev CA" in out and "citadel stopped" in out
    assert not (running.state / "up.json").exists()
    audit = running.state / "audit.log"
    assert verify_files([audit]).ok
    kinds = [r["kind"] for r in read_records([audit])]
    assert "ca.issuance" in kinds and "authz.decision" in kinds
    names = {r.get("name") for r in read_records([audit]) if r["kind"] == "audit.header"}
    assert names == {"citadel-ca", "authz"}  # one file, one stream per service


def test_a_second_up_reuses_the_ca(running: Up) -> None:
    assert running.proc.poll() is not None  # stopped by the previous test
    root_before = (running.state / "cacerts" / "root-cert.pem").read_bytes()
    key_before = (running.state / "cacerts" / "ca-key.pem").read_bytes()
    again = wait_ready(start_up(running.state))
    try:
        assert Path(again.info()["root_cert"]).read_bytes() == root_before
    finally:
        code, out, err = again.stop()
    assert code == 0, err
    assert "reusing dev CA" in out and "reusing dev token issuer" in out
    assert (running.state / "cacerts" / "ca-key.pem").read_bytes() == key_before
    assert verify_files([running.state / "audit.log"]).ok


def test_a_taken_port_is_refused_before_anything_is_created(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        taken = holder.getsockname()[1]
        up = start_up(tmp_path / "state", ports=(free_port(), free_port(), taken))
        _out, err = up.proc.communicate(timeout=20)
    assert up.proc.returncode == 2
    assert f"port {taken} is already in use" in err and "--admin-listen" in err
    assert not (tmp_path / "state").exists()  # refused before any key was generated


@pytest.mark.parametrize(
    "which", [0, 1, 2], ids=["ca-port-taken", "authz-port-taken", "admin-port-taken"]
)
def test_check_ports_names_the_taken_port_and_its_flag(which: int) -> None:
    flags = ["--ca-listen", "--authz-listen", "--admin-listen"]
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        taken = holder.getsockname()[1]
        ports = [free_port(), free_port(), free_port()]
        ports[which] = taken
        with pytest.raises(ConfigError) as info:
            check_ports([(f"svc{i}", flags[i], f"127.0.0.1:{ports[i]}") for i in range(3)])
    assert f"port {taken} is already in use" in info.value.message
    assert flags[which] in info.value.message


def test_check_ports_refuses_one_port_for_two_services() -> None:
    port = free_port()
    with pytest.raises(ConfigError, match="given to both"):
        check_ports([("a", "--ca-listen", f"127.0.0.1:{port}"),
                     ("b", "--admin-listen", f"127.0.0.1:{port}")])  # fmt: skip


def test_a_policy_dir_without_a_policy_is_refused(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    up = start_up(tmp_path / "state", "--policy-dir", str(tmp_path / "empty"))
    _out, err = up.proc.communicate(timeout=20)
    assert up.proc.returncode == 2
    assert "policy refused" in err and str(tmp_path / "empty") in err
    assert os.listdir(tmp_path / "state")  # the CA was created; nothing listens
    assert not (tmp_path / "state" / "up.json").exists()
