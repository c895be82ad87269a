"""Adversarial tables against the real CA over gRPC + TLS, one row per defect.

The unit tables already name every forged token (``tests/citadel/test_jwks.py``) and every
refused CSR (``tests/citadel/test_issuance.py``); here the *same rows* travel over the
wire to a real server, so what is proven is the whole path: metadata parsing, the
authenticator, CSR policy, the status a client sees, the audit record, and that the
server is still serving afterwards. Rows that only make sense on the wire (metadata
shapes, a valid token replayed with another account's CSR) are added here.

The token verifier's clock is pinned to the unit tables' instant (``T0``), which is what
lets their pre-minted tokens be reused unchanged; certificates use the real clock.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from cryptography import x509
from grpc_health.v1 import health_pb2, health_pb2_grpc

from citadel.ca._proto import ca_pb2
from citadel.ca.jwks import JwksAuthenticator
from citadel.dev import load_dev_issuer, mint_token
from tests.citadel.test_issuance import REFUSED as CSR_TABLE
from tests.citadel.test_issuance import make_csr
from tests.citadel.test_jwks import _FORGERY_IDS, T0, _forgeries
from tests.e2e.conftest import CAHandle, running_ca

WEB = "spiffe://cluster.local/ns/default/sa/web"


@pytest.fixture(scope="module")
def ca(ca_state: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[CAHandle]:
    issuer = load_dev_issuer(ca_state)
    auth = JwksAuthenticator(jwks_file=issuer.jwks_path, clock=lambda: T0)
    audit = tmp_path_factory.mktemp("adv") / "audit.log"
    with running_ca(ca_state, authenticator=auth, audit_path=audit) as handle:
        yield handle


@pytest.fixture(scope="module")
def channel(ca: CAHandle) -> Iterator[grpc.Channel]:
    ch = ca.channel()
    yield ch
    ch.close()


def _token(ca: CAHandle, namespace: str = "default", service_account: str = "web") -> str:
    return mint_token(
        ca.issuer, namespace=namespace, service_account=service_account, clock=lambda: T0
    )


def _attempt(
    ca: CAHandle, channel: grpc.Channel, csr: str, metadata: list[tuple[str, str]]
) -> tuple[grpc.RpcError, dict[str, Any]]:
    """One refused call: the error, and the one audit record it produced."""
    before = len(ca.audit_records())
    with pytest.raises(grpc.RpcError) as info:
        ca.stub(channel).CreateCertificate(
            ca_pb2.IstioCertificateRequest(csr=csr), metadata=metadata, timeout=10
        )
    records = ca.audit_records()
    assert len(records) == before + 1, "exactly one audit record per attempt"
    rec = records[-1]
    assert rec["outcome"] == "refused" and rec["serial"] is None
    assert isinstance(rec["reason"], str) and rec["reason"] not in ("", "internal")
    assert "Traceback" not in (info.value.details() or "")
    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=5)
    assert health.status == health_pb2.HealthCheckResponse.SERVING, "server still serving"
    return info.value, rec


def _good_csr() -> str:
    return make_csr().decode()


# ------------------------------------------------------------------ tokens


@pytest.fixture(scope="module")
def forgeries(ca: CAHandle) -> dict[str, tuple[str, str]]:
    table = {name: (tok, msg) for name, tok, msg in _forgeries(ca.issuer)}
    assert list(table) == _FORGERY_IDS
    return table


@pytest.mark.parametrize("name", _FORGERY_IDS)
def test_forged_token_refused_over_grpc(
    ca: CAHandle, channel: grpc.Channel, forgeries: dict[str, tuple[str, str]], name: str
) -> None:
    tok, fragment = forgeries[name]
    err, _rec = _attempt(ca, channel, _good_csr(), [("authorization", f"Bearer {tok}")])
    assert err.code() == grpc.StatusCode.UNAUTHENTICATED, err.details()
    assert fragment.strip("'") in err.details() or name in ("empty",)
    if len(tok) > 20:
        assert tok not in ca.audit_path.read_text() and tok not in err.details()


# Wire-only rows: metadata shapes and a genuine token used for someone else's identity.
WIRE_TOKEN_ROWS = [
    ("no-authorization-metadata", "missing", grpc.StatusCode.UNAUTHENTICATED, "missing"),
    ("basic-scheme", "basic", grpc.StatusCode.UNAUTHENTICATED, "Bearer"),
    ("bearer-without-token", "empty-bearer", grpc.StatusCode.UNAUTHENTICATED, "Bearer"),
    ("two-authorization-headers", "two", grpc.StatusCode.UNAUTHENTICATED, "exactly one"),
    (
        "token-replayed-for-other-sa-csr",
        "replay",
        grpc.StatusCode.PERMISSION_DENIED,
        "the token authenticates spiffe://cluster.local/ns/shop/sa/cart",
    ),
    (
        "token-replayed-for-other-namespace-csr",
        "replay-ns",
        grpc.StatusCode.PERMISSION_DENIED,
        "the token authenticates spiffe://cluster.local/ns/other/sa/web",
    ),
]


@pytest.mark.parametrize(
    ("kind", "status", "fragment"),
    [r[1:] for r in WIRE_TOKEN_ROWS],
    ids=[r[0] for r in WIRE_TOKEN_ROWS],
)
def test_wire_token_rows(
    ca: CAHandle, channel: grpc.Channel, kind: str, status: grpc.StatusCode, fragment: str
) -> None:
    csr = _good_csr()
    metadata: list[tuple[str, str]] = {
        "missing": [],
        "basic": [("authorization", "Basic dXNlcjpwYXNz")],
        "empty-bearer": [("authorization", "Bearer ")],
        "two": [("authorization", f"Bearer {_token(ca)}")] * 2,
    }.get(kind, [])
    if kind.startswith("replay"):
        # A genuine token of another account, sent with a CSR naming web's identity.
        owner = ("shop", "cart") if kind == "replay" else ("other", "web")
        metadata = [("authorization", f"Bearer {_token(ca, *owner)}")]
        csr = make_csr(sans=[x509.UniformResourceIdentifier(WEB)]).decode()
    err, rec = _attempt(ca, channel, csr, metadata)
    assert err.code() == status, err.details()
    assert fragment in err.details()
    if kind.startswith("replay"):
        assert rec["reason"] == "csr_identity_mismatch"
        assert rec["spiffe_id"] != WEB  # the audit names who really asked


# ------------------------------------------------------------------ CSRs


@pytest.mark.parametrize(
    ("csr", "error", "fragment"), [r[1:] for r in CSR_TABLE], ids=[r[0] for r in CSR_TABLE]
)
def test_refused_csr_over_grpc(
    ca: CAHandle, channel: grpc.Channel, csr: bytes, error: type, fragment: str
) -> None:
    err, rec = _attempt(ca, channel, csr.decode(), [("authorization", f"Bearer {_token(ca)}")])
    assert err.code() == grpc.StatusCode[error.status], err.details()
    assert fragment in err.details()
    assert rec["reason"] == _reason_of(error, err.details())
    assert rec["spiffe_id"] == WEB


def _reason_of(error: type, details: str) -> str:
    """The audit reason the issuer gives each refusal (what an operator greps for)."""
    if error.status == "PERMISSION_DENIED":
        return "csr_identity_mismatch"
    for marker, reason in (
        ("no CSR", "csr_missing"),
        ("bytes; at most", "csr_too_large"),
        ("signature does not verify", "csr_signature"),
        ("CA certificate", "csr_ca"),
        ("CSR key", "csr_key"),
        ("SAN", "csr_san"),
        ("once", "csr_san"),
    ):
        if marker in details:
            return reason
    return "csr_malformed"


BAD_TTL_ROWS = [("negative-ttl", -1), ("int64-min-ttl", -(2**63))]


@pytest.mark.parametrize("ttl", [r[1] for r in BAD_TTL_ROWS], ids=[r[0] for r in BAD_TTL_ROWS])
def test_bad_ttl_refused_over_grpc(ca: CAHandle, channel: grpc.Channel, ttl: int) -> None:
    before = len(ca.audit_records())
    with pytest.raises(grpc.RpcError) as info:
        ca.stub(channel).CreateCertificate(
            ca_pb2.IstioCertificateRequest(csr=_good_csr(), validity_duration=ttl),
            metadata=[("authorization", f"Bearer {_token(ca)}")],
            timeout=10,
        )
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    recs = ca.audit_records()
    assert len(recs) == before + 1 and recs[-1]["reason"] == "bad_ttl"


# ------------------------------------------------------------------ the tally

SURFACES = {
    "tokens": len(_FORGERY_IDS) + len(WIRE_TOKEN_ROWS),
    "csrs": len(CSR_TABLE) + len(BAD_TTL_ROWS),
}


def test_adversarial_case_counts(ca: CAHandle, channel: grpc.Channel) -> None:
    """The tally the closing note quotes; and the CA still issues after every refusal."""
    print(f"\nadversarial cases over gRPC: {SURFACES}")
    assert SURFACES["tokens"] >= 30 and SURFACES["csrs"] >= 22
    resp = ca.stub(channel).CreateCertificate(
        ca_pb2.IstioCertificateRequest(csr=_good_csr()),
        metadata=[("authorization", f"Bearer {_token(ca)}")],
        timeout=10,
    )
    assert len(resp.cert_chain) == 3
