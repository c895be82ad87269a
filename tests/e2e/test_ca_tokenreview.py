"""The real CA (`citadel ca serve --token-auth tokenreview`) against a test Kubernetes API.

The CA runs as a subprocess exactly as an operator starts it, reaches the test API server
through a kubeconfig and the official client, and is called over gRPC/TLS with Istio's own
stubs. The faults of issue 8 (API 5xx, throttled, dropped, slow, forbidden, unreachable)
must each end in UNAVAILABLE within a bounded time, nothing issued, an audit record written.
"""

from __future__ import annotations

import json
import secrets
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from citadel.ca._proto import ca_pb2, ca_pb2_grpc
from citadel.ca.tokenreview import TokenReviewAuthenticator
from tests.citadel.k8s_api import FakeKubeApi, Fault, Identity, running_k8s_api
from tests.conftest import free_port
from tests.e2e.conftest import make_ca_state, running_ca

TIMEOUT_S = 1.0  # --tokenreview-timeout given to the CA
BOUND_S = TIMEOUT_S + 4.0  # generous: loaded CI machines, but far below the client deadline
CLIENT_DEADLINE_S = 20.0
USED_TOKENS: list[str] = []


@dataclass
class CaProcess:
    proc: subprocess.Popen[bytes]
    state_dir: Path
    port: int
    audit_path: Path
    stderr_path: Path
    stdout_path: Path
    stub: ca_pb2_grpc.IstioCertificateServiceStub

    def audit(self) -> list[dict[str, Any]]:
        lines = self.audit_path.read_text().splitlines()
        return [
            r for r in (json.loads(x) for x in lines if x.strip()) if r.get("kind") == "ca.issuance"
        ]

    def granted(self) -> int:
        return sum(1 for r in self.audit() if r["outcome"] == "granted")


@pytest.fixture(scope="module")
def k8s(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeKubeApi]:
    with running_k8s_api(tmp_path_factory.mktemp("k8s-api")) as api:
        yield api


@pytest.fixture(autouse=True)
def _clean(k8s: FakeKubeApi) -> None:
    k8s.reset()


@pytest.fixture(scope="module")
def ca(tmp_path_factory: pytest.TempPathFactory, k8s: FakeKubeApi) -> Iterator[CaProcess]:
    state = make_ca_state(tmp_path_factory.mktemp("ca-state"))
    kubeconfig = k8s.kubeconfig(state / "kubeconfig")
    port = free_port()
    audit_path, stderr_path, stdout_path = (state / n for n in ("audit.log", "ca.err", "ca.out"))
    with stderr_path.open("wb") as err, stdout_path.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "citadel.cli", "ca", "serve",
                "--state-dir", str(state), "--listen", f"127.0.0.1:{port}",
                "--token-auth", "tokenreview", "--kubeconfig", str(kubeconfig),
                "--tokenreview-timeout", f"{TIMEOUT_S:g}s", "--audit-log", str(audit_path),
            ],
            stdout=out,
            stderr=err,
        )  # fmt: skip
    root = (state / "cacerts" / "root-cert.pem").read_bytes()
    channel = grpc.secure_channel(
        f"localhost:{port}", grpc.ssl_channel_credentials(root_certificates=root)
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            if proc.poll() is not None:
                pytest.fail(f"citadel ca serve exited {proc.returncode}: {stderr_path.read_text()}")
            try:
                grpc.channel_ready_future(channel).result(timeout=0.5)
                break
            except grpc.FutureTimeoutError:
                if time.monotonic() > deadline:
                    pytest.fail(f"CA did not come up: {stderr_path.read_text()}")
        yield CaProcess(
            proc,
            state,
            port,
            audit_path,
            stderr_path,
            stdout_path,
            ca_pb2_grpc.IstioCertificateServiceStub(channel),
        )
    finally:
        channel.close()
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def new_token() -> str:
    token = f"k8s-{secrets.token_urlsafe(32)}"
    USED_TOKENS.append(token)
    return token


def csr_pem() -> str:
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def create(
    stub: ca_pb2_grpc.IstioCertificateServiceStub, token: str, ttl: int = 3600
) -> ca_pb2.IstioCertificateResponse:
    return stub.CreateCertificate(
        ca_pb2.IstioCertificateRequest(csr=csr_pem(), validity_duration=ttl),
        metadata=[("authorization", f"Bearer {token}")],
        timeout=CLIENT_DEADLINE_S,
    )


def spiffe_ids(cert_pem: str) -> list[str]:
    leaf = x509.load_pem_x509_certificate(cert_pem.encode())
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(u) for u in san.get_values_for_type(x509.UniformResourceIdentifier)]


def test_authenticated_caller_gets_its_svid(ca: CaProcess, k8s: FakeKubeApi):
    token = k8s.add(
        new_token(),
        Identity.service_account("shop", "checkout", pod_name="checkout-5c7", pod_uid="pu-1"),
    )
    resp = create(ca.stub, token)
    assert spiffe_ids(resp.cert_chain[0]) == ["spiffe://cluster.local/ns/shop/sa/checkout"]
    root = (ca.state_dir / "cacerts" / "root-cert.pem").read_text()
    assert x509.load_pem_x509_certificate(resp.cert_chain[-1].encode()) == (
        x509.load_pem_x509_certificate(root.encode())
    )
    assert k8s.count(token) == 1
    assert k8s.last_body is not None
    assert k8s.last_body["spec"]["audiences"] == ["istio-ca"]
    record = ca.audit()[-1]
    assert record["outcome"] == "granted"
    assert record["spiffe_id"] == "spiffe://cluster.local/ns/shop/sa/checkout"
    assert record["subject"] == "system:serviceaccount:shop:checkout"
    assert record["pod"] == "checkout-5c7"
    assert record["authenticator"] == "tokenreview"


@pytest.mark.parametrize(
    ("identity", "expect"),
    [
        pytest.param(None, "not authenticated", id="unknown-token"),
        pytest.param(
            Identity.service_account("shop", "web", audiences=["vault"]),
            "not authenticated",
            id="wrong-audience",
        ),
        pytest.param(
            Identity(username="jane", groups=("system:authenticated",)),
            "service account",
            id="not-a-service-account",
        ),
    ],
)
def test_refused_token_is_unauthenticated(
    ca: CaProcess, k8s: FakeKubeApi, identity: Identity | None, expect: str
):
    token = new_token()
    if identity is not None:
        k8s.add(token, identity)
    granted = ca.granted()
    with pytest.raises(grpc.RpcError) as info:
        create(ca.stub, token)
    assert info.value.code() == grpc.StatusCode.UNAUTHENTICATED
    assert expect in info.value.details()
    record = ca.audit()[-1]
    assert (record["outcome"], record["spiffe_id"]) == ("refused", None)
    assert ca.granted() == granted


@pytest.mark.parametrize(
    ("fault", "expect"),
    [
        pytest.param(Fault(status=500), "HTTP 500", id="api-500"),
        pytest.param(Fault(status=503), "HTTP 503", id="api-503"),
        pytest.param(Fault(status=429), "HTTP 429", id="api-429-throttled"),
        pytest.param(Fault(drop=True), "closed the connection", id="api-drops-connection"),
        pytest.param(Fault(delay=TIMEOUT_S + 5), "no answer within", id="api-slow-timeout"),
    ],
)
def test_api_fault_is_unavailable_nothing_issued(
    ca: CaProcess, k8s: FakeKubeApi, fault: Fault, expect: str
):
    token = k8s.add(new_token(), Identity.service_account("shop", "web"))
    granted = ca.granted()
    with k8s.fault(fault):
        started = time.monotonic()
        with pytest.raises(grpc.RpcError) as info:
            create(ca.stub, token)
        elapsed = time.monotonic() - started
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    details = info.value.details()
    assert details.startswith("Kubernetes API unreachable: ")
    assert details.endswith("nothing issued")
    assert expect in details
    assert elapsed < BOUND_S, f"UNAVAILABLE after {elapsed:.1f}s"
    record = ca.audit()[-1]
    assert record["outcome"] == "refused"
    assert record["reason"] == "kubernetes_unavailable"
    assert ca.granted() == granted
    # The failure was not cached: with the API back, the same token is served.
    assert spiffe_ids(create(ca.stub, token).cert_chain[0]) == [
        "spiffe://cluster.local/ns/shop/sa/web"
    ]


def test_rbac_forbidden_tells_operator(ca: CaProcess, k8s: FakeKubeApi):
    token = k8s.add(new_token(), Identity.service_account("shop", "web"))
    forbidden = Fault(status=403, message="tokenreviews is forbidden")
    with k8s.fault(forbidden), pytest.raises(grpc.RpcError) as info:
        create(ca.stub, token)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "system:auth-delegator" in info.value.details()
    assert ca.audit()[-1]["reason"] == "kubernetes_forbidden"


def test_renewal_storm_costs_one_review_per_token(ca: CaProcess, k8s: FakeKubeApi):
    token = k8s.add(new_token(), Identity.service_account("shop", "cart"))
    request = ca_pb2.IstioCertificateRequest(csr=csr_pem(), validity_duration=600)
    meta = [("authorization", f"Bearer {token}")]
    with k8s.fault(Fault(delay=0.3)):  # slow enough that the calls overlap
        futures = [
            ca.stub.CreateCertificate.future(request, metadata=meta, timeout=CLIENT_DEADLINE_S)
            for _ in range(20)
        ]
        chains = [f.result().cert_chain for f in futures]
    serials = {x509.load_pem_x509_certificate(c[0].encode()).serial_number for c in chains}
    assert len(serials) == 20
    assert k8s.count(token) == 1
    create(ca.stub, token)  # a later renewal is served from the cache
    assert k8s.count(token) == 1


def test_api_unreachable_in_process_ca(tmp_path: Path, k8s: FakeKubeApi):
    """The same fault through the in-process server wiring, with the API port dead."""
    state = make_ca_state(tmp_path / "state")
    dead = k8s.kubeconfig(tmp_path / "dead-kubeconfig", port=free_port())
    auth = TokenReviewAuthenticator(kubeconfig=str(dead), timeout=TIMEOUT_S)
    try:
        with running_ca(state, authenticator=auth) as handle:
            started = time.monotonic()
            with pytest.raises(grpc.RpcError) as info:
                create(handle.stub(), new_token())
            elapsed = time.monotonic() - started
            records = handle.audit_records()
    finally:
        auth.close()
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "cannot connect to https://127.0.0.1:" in info.value.details()
    assert elapsed < BOUND_S
    assert [(r["outcome"], r["reason"]) for r in records] == [("refused", "kubernetes_unavailable")]


def test_no_token_in_any_output(ca: CaProcess, k8s: FakeKubeApi):
    """Every token this module sent - granted, refused, faulted - is absent from the CA's
    logs, stdout and audit trail, even when the backend echoes it in its errors."""
    echo = k8s.add(new_token(), Identity.service_account("shop", "web"))
    for fault in (
        Fault(review_error="bad token {token}"),
        Fault(status=500, message="boom {token}"),
        Fault(status=403, message="forbidden {token}"),
    ):
        with k8s.fault(fault), pytest.raises(grpc.RpcError) as info:
            create(ca.stub, echo)
        assert echo not in (info.value.details() or "")
    outputs = {
        p.name: p.read_text(errors="replace")
        for p in (ca.audit_path, ca.stderr_path, ca.stdout_path)
    }
    assert outputs[ca.audit_path.name].count("ca.issuance") >= 3
    for token in USED_TOKENS:
        for name, text in outputs.items():
            assert token not in text, f"a token leaked into {name}"
