"""The CA over real gRPC + TLS on loopback, with Istio's proto, judged by independent tools.

Certificates are checked by the ``spiffe`` package (X509Svid / X509Bundle), by
``openssl verify`` and by cryptography's Web PKI verifier, and against every MUST of the
SPIFFE X509-SVID standard. Refusals are checked for their status, their message and their
audit record, and the server must keep serving after each.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import grpc
import jwt
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from spiffe import TrustDomain as SpiffeTrustDomain
from spiffe import X509Bundle, X509Svid

from citadel.audit import AuditLog, verify_files
from citadel.ca._proto import ca_pb2
from citadel.ca.service import AccessLists
from citadel.spiffe import SpiffeId
from tests.conftest import free_port
from tests.e2e.conftest import CAHandle, ca_serve_cmd, running_ca

WEB = "spiffe://cluster.local/ns/default/sa/web"
P256 = ec.generate_private_key(ec.SECP256R1())


def csr_pem(
    key: Any = P256, *, sans: list[x509.GeneralName] | None = None, ca: bool = False
) -> str:
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if ca:
        b = b.add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
    algo = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return b.sign(key, algo).public_bytes(serialization.Encoding.PEM).decode()


def create(
    handle: CAHandle,
    csr: str,
    *,
    token: str | None = None,
    ttl: int = 0,
    metadata: list[tuple[str, str]] | None = None,
    channel: grpc.Channel | None = None,
) -> ca_pb2.IstioCertificateResponse:
    md = metadata if metadata is not None else [("authorization", f"Bearer {token}")]
    req = ca_pb2.IstioCertificateRequest(csr=csr, validity_duration=ttl)
    return handle.stub(channel).CreateCertificate(req, metadata=md, timeout=10)


def assert_serving(handle: CAHandle) -> None:
    health = health_pb2_grpc.HealthStub(handle.channel())
    resp = health.Check(health_pb2.HealthCheckRequest(service=""), timeout=5)
    assert resp.status == health_pb2.HealthCheckResponse.SERVING


@pytest.fixture(scope="module")
def channel(ca_server: CAHandle) -> Iterator[grpc.Channel]:
    ch = ca_server.channel()
    yield ch
    ch.close()


# ------------------------------------------------------------------ conformance


def assert_x509_svid(leaf: x509.Certificate, chain: list[x509.Certificate], spiffe_id: str) -> None:
    """Every MUST of the SPIFFE X509-SVID standard that applies to what we issue."""
    ext = leaf.extensions
    san = ext.get_extension_for_class(x509.SubjectAlternativeName)
    uris = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    assert uris == [spiffe_id], "exactly one URI SAN, the SPIFFE ID"
    sid = SpiffeId(uris[0])  # a valid SPIFFE ID ...
    assert sid.path, "... whose path is not empty on a leaf"
    if leaf.subject == x509.Name([]):
        assert san.critical, "an empty subject makes the SAN critical"
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.value.ca is False, "leaf: cA false"
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical, "keyUsage critical"
    assert ku.value.digital_signature, "keyUsage digitalSignature"
    assert not ku.value.key_cert_sign and not ku.value.crl_sign, "no keyCertSign/cRLSign"
    eku = set(ext.get_extension_for_class(x509.ExtendedKeyUsage).value)
    assert {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH} <= eku
    ext.get_extension_for_class(x509.SubjectKeyIdentifier)
    ext.get_extension_for_class(x509.AuthorityKeyIdentifier)
    assert leaf.serial_number.bit_length() > 64
    for ca in chain[1:]:
        cbc = ca.extensions.get_extension_for_class(x509.BasicConstraints)
        cku = ca.extensions.get_extension_for_class(x509.KeyUsage)
        assert cbc.value.ca and cku.critical and cku.value.key_cert_sign, "signing certs are CAs"
        for uri in ca.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.UniformResourceIdentifier):
            assert SpiffeId(uri).path == "", "a signing certificate's SPIFFE ID has no path"


def openssl_verify(tmp: Path, root: str, intermediates: list[str], leaf: str) -> None:
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("openssl not installed")
    (tmp / "root.pem").write_text(root)
    (tmp / "untrusted.pem").write_text("".join(intermediates))
    (tmp / "leaf.pem").write_text(leaf)
    out = subprocess.run(
        [
            openssl,
            "verify",
            "-purpose",
            "sslclient",
            "-x509_strict",
            "-CAfile",
            str(tmp / "root.pem"),
            "-untrusted",
            str(tmp / "untrusted.pem"),
            str(tmp / "leaf.pem"),
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode == 0 and out.stdout.strip().endswith("OK"), out.stdout + out.stderr


@pytest.mark.parametrize(
    "key",
    [
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP384R1()),
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
    ],
    ids=["ec-p256", "ec-p384", "rsa-2048"],
)
def test_issued_svid_is_valid_everywhere(
    ca_server: CAHandle, channel: grpc.Channel, tmp_path: Path, key: Any
) -> None:
    before = datetime.now(UTC)
    resp = create(
        ca_server,
        csr_pem(key, sans=[x509.UniformResourceIdentifier(WEB)]),
        token=ca_server.token(pod_name="web-7d9"),
        ttl=1800,
        channel=channel,
    )
    pems = list(resp.cert_chain)
    assert len(pems) == 3, "leaf, intermediate, root"
    certs = [x509.load_pem_x509_certificate(p.encode()) for p in pems]
    leaf = certs[0]
    assert pems[-1].encode() == ca_server.root_path.read_bytes(), "root last"
    assert leaf.public_key() == key.public_key()
    assert_x509_svid(leaf, certs, WEB)
    assert before - timedelta(minutes=2) < leaf.not_valid_before_utc <= before
    lifetime = leaf.not_valid_after_utc - before
    assert timedelta(minutes=29) < lifetime <= timedelta(minutes=30, seconds=5)

    # The independent spiffe package: SVID (leaf + intermediates) and the bundle.
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    svid = X509Svid.parse("".join(pems[:-1]).encode(), key_pem)
    assert str(svid.spiffe_id) == WEB
    assert svid.leaf == leaf
    bundle = X509Bundle.parse(SpiffeTrustDomain("cluster.local"), pems[-1].encode())
    assert certs[-1] in bundle.x509_authorities

    # openssl, strict, as a TLS client certificate.
    openssl_verify(tmp_path, pems[-1], pems[1:-1], pems[0])

    # cryptography's Web PKI verifier, as client and as server certificate by URI.
    store = verification.Store([certs[-1]])
    verified = (
        verification.PolicyBuilder().store(store).build_client_verifier().verify(leaf, certs[1:-1])
    )
    assert [s.value for s in verified.subjects] == [WEB]

    # Audited as granted, with everything but the token.
    rec = ca_server.audit_records()[-1]
    assert rec["outcome"] == "granted" and rec["spiffe_id"] == WEB
    assert rec["serial"] == format(leaf.serial_number, "x")
    assert rec["pod"] == "web-7d9" and rec["requested_ttl"] == 1800
    assert rec["granted_ttl"] == 1800 and rec["subject"] == "system:serviceaccount:default:web"
    assert rec["peer"].startswith("ipv4:127.0.0.1:") or rec["peer"].startswith("ipv6:")
    assert "eyJ" not in ca_server.audit_path.read_text()  # no JWT anywhere


@pytest.mark.parametrize("self_check", ["issuer", "full"])
def test_every_self_check_mode_serves_the_same_svids(
    ca_state: Path, tmp_path: Path, self_check: str
) -> None:
    with running_ca(ca_state, self_check=self_check, audit_path=tmp_path / "audit.log") as h:
        pems = list(create(h, csr_pem(), token=h.token()).cert_chain)
    certs = [x509.load_pem_x509_certificate(p.encode()) for p in pems]
    assert_x509_svid(certs[0], certs, WEB)
    openssl_verify(tmp_path, pems[-1], pems[1:-1], pems[0])


def test_ttl_default_and_clamp(ca_server: CAHandle, channel: grpc.Channel) -> None:
    tok = ca_server.token()
    for requested, expected in ((0, 3600), (90 * 86400, 86400)):
        leaf = x509.load_pem_x509_certificate(
            create(ca_server, csr_pem(), token=tok, ttl=requested, channel=channel)
            .cert_chain[0]
            .encode()
        )
        life = leaf.not_valid_after_utc - leaf.not_valid_before_utc
        assert life == timedelta(seconds=expected + 30)  # + NotBefore backdate


def test_identity_from_token_not_csr(ca_server: CAHandle, channel: grpc.Channel) -> None:
    resp = create(ca_server, csr_pem(), token=ca_server.token("shop", "cart"), channel=channel)
    leaf = x509.load_pem_x509_certificate(resp.cert_chain[0].encode())
    uris = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert list(uris) == [x509.UniformResourceIdentifier("spiffe://cluster.local/ns/shop/sa/cart")]


def test_health_and_reflection(ca_server: CAHandle) -> None:
    assert_serving(ca_server)
    health = health_pb2_grpc.HealthStub(ca_server.channel())
    named = health.Check(
        health_pb2.HealthCheckRequest(service="istio.v1.auth.IstioCertificateService")
    )
    assert named.status == health_pb2.HealthCheckResponse.SERVING
    refl = reflection_pb2_grpc.ServerReflectionStub(ca_server.channel())
    (answer,) = list(
        refl.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
    )
    names = {s.name for s in answer.list_services_response.service}
    assert {"istio.v1.auth.IstioCertificateService", "grpc.health.v1.Health"} <= names


def test_tls_verifies_with_root_only(ca_server: CAHandle) -> None:
    """A client trusting some other root must fail the handshake."""
    other = ec.generate_private_key(ec.SECP256R1())
    now = datetime.now(UTC)
    fake_root = (
        x509.CertificateBuilder()
        .subject_name(x509.Name.from_rfc4514_string("CN=other"))
        .issuer_name(x509.Name.from_rfc4514_string("CN=other"))
        .public_key(other.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(other, hashes.SHA256())
    )
    creds = grpc.ssl_channel_credentials(
        root_certificates=fake_root.public_bytes(serialization.Encoding.PEM)
    )
    with grpc.secure_channel(ca_server.target, creds) as ch, pytest.raises(grpc.RpcError) as info:
        create(ca_server, csr_pem(), token=ca_server.token(), channel=ch)
    assert info.value.code() == grpc.StatusCode.UNAVAILABLE
    # ... and the serving certificate also names 127.0.0.1.
    ok = grpc.ssl_channel_credentials(root_certificates=ca_server.root_pem)
    with grpc.secure_channel(f"127.0.0.1:{ca_server.port}", ok) as ch:
        assert create(ca_server, csr_pem(), token=ca_server.token(), channel=ch).cert_chain


# ------------------------------------------------------------------ refusals


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _refusals(h: CAHandle) -> list[tuple[str, dict[str, Any], grpc.StatusCode, str, str]]:
    """(id, request kwargs, status, message fragment, audit reason)."""
    other_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    good = h.token()
    claims = jwt.decode(good, options={"verify_signature": False})
    none_alg = (
        _b64(b'{"alg":"none","typ":"JWT"}') + "." + _b64(jwt.api_jws.json.dumps(claims).encode())
    ) + "."
    good_csr = csr_pem()
    der = bytearray(
        x509.load_pem_x509_csr(good_csr.encode()).public_bytes(serialization.Encoding.DER)
    )
    der[-3] ^= 1
    bad_sig_csr = (
        "-----BEGIN CERTIFICATE REQUEST-----\n"
        + base64.encodebytes(bytes(der)).decode()
        + "-----END CERTIFICATE REQUEST-----\n"
    )
    unauth, perm, inval = (
        grpc.StatusCode.UNAUTHENTICATED,
        grpc.StatusCode.PERMISSION_DENIED,
        grpc.StatusCode.INVALID_ARGUMENT,
    )
    uri = x509.UniformResourceIdentifier
    return [
        ("no-authorization", {"metadata": []}, unauth, "missing credentials", "no_token"),
        (
            "basic-auth-scheme",
            {"metadata": [("authorization", "Basic dXNlcjpwYXNz")]},
            unauth,
            "Bearer",
            "no_token",
        ),
        ("garbage-token", {"token": "not.a.jwt"}, unauth, "well-formed JWT", "unauthenticated"),
        ("alg-none", {"token": none_alg}, unauth, "'none' is not accepted", "bad_algorithm"),
        (
            "foreign-signing-key",
            {
                "token": jwt.encode(
                    claims, other_key, algorithm="RS256", headers={"kid": h.issuer.kid}
                )
            },
            unauth,
            "signature does not verify",
            "bad_signature",
        ),
        (
            "expired-token",
            {"token": h.token(clock=lambda: time.time() - 7200)},
            unauth,
            "expired",
            "token_expired",
        ),
        (
            "wrong-audience",
            {"token": h.token(audiences=["vault"])},
            unauth,
            "audience",
            "bad_audience",
        ),
        (
            "untrusted-issuer",
            {"token": h.token(issuer_url="https://evil.example")},
            unauth,
            "not trusted",
            "bad_issuer",
        ),
        (
            "legacy-token-no-exp",
            {"token": h.token(extra_claims={"exp": None})},
            unauth,
            "no expiry",
            "legacy_token",
        ),
        ("oversized-token", {"token": "x" * 20000}, unauth, "larger than", "unauthenticated"),
        (
            "csr-for-other-identity",
            {"csr": csr_pem(sans=[uri("spiffe://cluster.local/ns/kube-system/sa/admin")])},
            perm,
            "kube-system",
            "csr_identity_mismatch",
        ),
        (
            "csr-dns-san",
            {"csr": csr_pem(sans=[uri(WEB), x509.DNSName("evil.example")])},
            inval,
            "DNS",
            "csr_san",
        ),
        ("csr-ca-request", {"csr": csr_pem(ca=True)}, inval, "CA certificate", "csr_ca"),
        ("csr-bad-signature", {"csr": bad_sig_csr}, inval, "signature", "csr_signature"),
        (
            "csr-trailing-data",
            {"csr": good_csr + "tail"},
            inval,
            "nothing before or after",
            "csr_malformed",
        ),
        ("csr-empty", {"csr": ""}, inval, "no CSR", "csr_missing"),
        (
            "csr-ed25519-key",
            {"csr": csr_pem(ed25519.Ed25519PrivateKey.generate())},
            inval,
            "P-256",
            "csr_key",
        ),
        ("negative-ttl", {"ttl": -1}, inval, "validity_duration", "bad_ttl"),
    ]


REFUSAL_IDS = [
    "no-authorization",
    "basic-auth-scheme",
    "garbage-token",
    "alg-none",
    "foreign-signing-key",
    "expired-token",
    "wrong-audience",
    "untrusted-issuer",
    "legacy-token-no-exp",
    "oversized-token",
    "csr-for-other-identity",
    "csr-dns-san",
    "csr-ca-request",
    "csr-bad-signature",
    "csr-trailing-data",
    "csr-empty",
    "csr-ed25519-key",
    "negative-ttl",
]


@pytest.fixture(scope="module")
def refusals(ca_server: CAHandle) -> dict[str, tuple[dict[str, Any], grpc.StatusCode, str, str]]:
    table = {r[0]: r[1:] for r in _refusals(ca_server)}
    assert list(table) == REFUSAL_IDS
    return table


@pytest.mark.parametrize("case", REFUSAL_IDS)
def test_refused_with_status_message_and_audit(
    ca_server: CAHandle,
    channel: grpc.Channel,
    refusals: dict[str, tuple[dict[str, Any], grpc.StatusCode, str, str]],
    case: str,
) -> None:
    kwargs, status, fragment, reason = refusals[case]
    kwargs = dict(kwargs)
    csr = kwargs.pop("csr", csr_pem())
    if "metadata" not in kwargs:
        kwargs.setdefault("token", ca_server.token())
    n_before = len(ca_server.audit_records())
    with pytest.raises(grpc.RpcError) as info:
        create(ca_server, csr, channel=channel, **kwargs)
    err = info.value
    assert err.code() == status, err.details()
    assert fragment in err.details()
    assert "Traceback" not in err.details()
    records = ca_server.audit_records()
    assert len(records) == n_before + 1, "exactly one audit record per attempt"
    rec = records[-1]
    assert rec["outcome"] == "refused" and rec["reason"] == reason
    assert rec["serial"] is None
    token = kwargs.get("token")
    if token and len(token) > 20:
        assert token not in ca_server.audit_path.read_text()
    assert_serving(ca_server)


def test_oversized_message_refused_by_transport(ca_server: CAHandle, channel: grpc.Channel) -> None:
    """Past the 64 KiB limit gRPC itself refuses before our code runs (nothing to audit)."""
    with pytest.raises(grpc.RpcError) as info:
        create(ca_server, "A" * 70_000, token=ca_server.token(), channel=channel)
    assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert_serving(ca_server)
    assert create(ca_server, csr_pem(), token=ca_server.token(), channel=channel).cert_chain


# ------------------------------------------------------------------ concurrency


def test_parallel_issuance_all_valid_unique_serials(ca_server: CAHandle) -> None:
    n = 96
    keys = [ec.generate_private_key(ec.SECP256R1()) for _ in range(8)]
    csrs = [csr_pem(k) for k in keys]
    tokens = [ca_server.token("ns" + str(i % 4), "sa" + str(i % 3)) for i in range(12)]
    channels = [ca_server.channel() for _ in range(4)]

    def one(i: int) -> list[str]:
        return list(
            create(
                ca_server,
                csrs[i % len(csrs)],
                token=tokens[i % len(tokens)],
                channel=channels[i % len(channels)],
            ).cert_chain
        )

    with ThreadPoolExecutor(max_workers=32) as pool:
        chains = list(pool.map(one, range(n)))
    for ch in channels:
        ch.close()
    root = x509.load_pem_x509_certificate(chains[0][-1].encode())
    store = verification.Store([root])
    serials = set()
    for i, chain in enumerate(chains):
        leaf, *rest = (x509.load_pem_x509_certificate(p.encode()) for p in chain)
        verifier = verification.PolicyBuilder().store(store).build_client_verifier()
        verified = verifier.verify(leaf, rest[:-1])
        ns, sa = "ns" + str(i % 12 % 4), "sa" + str(i % 12 % 3)
        assert [s.value for s in verified.subjects] == [f"spiffe://cluster.local/ns/{ns}/sa/{sa}"]
        serials.add(leaf.serial_number)
    assert len(serials) == n


# ------------------------------------------------------------------ configured servers


def test_namespace_and_service_account_lists(tmp_path: Path, ca_state: Path) -> None:
    access = AccessLists.build(
        allow_namespaces={"default", "shop"},
        deny_namespaces={"shop"},
        deny_service_accounts={"default/legacy"},
    )
    with running_ca(ca_state, access=access, audit_path=tmp_path / "audit.log") as h:
        assert create(h, csr_pem(), token=h.token("default", "web")).cert_chain
        for ns, sa, fragment in (
            ("shop", "cart", "denied"),
            ("default", "legacy", "denied"),
            ("kube-system", "admin", "not in this CA's allowed namespaces"),
        ):
            with pytest.raises(grpc.RpcError) as info:
                create(h, csr_pem(), token=h.token(ns, sa))
            assert info.value.code() == grpc.StatusCode.PERMISSION_DENIED
            assert fragment in info.value.details()
            rec = h.audit_records()[-1]
            assert rec["outcome"] == "refused" and rec["spiffe_id"].endswith(f"/ns/{ns}/sa/{sa}")


class _Disk:
    """An audit sink whose disk can fill up."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.full = False

    def write(self, line: bytes) -> None:
        if self.full:
            raise OSError(28, "No space left on device")
        self.lines.append(line)

    def close(self) -> None:
        pass


def test_audit_failure_fails_closed(tmp_path: Path, ca_state: Path) -> None:
    disk = _Disk()
    with running_ca(ca_state, audit=AuditLog(disk, name="ca")) as h:
        assert create(h, csr_pem(), token=h.token()).cert_chain
        disk.full = True
        with pytest.raises(grpc.RpcError) as info:
            create(h, csr_pem(), token=h.token())
        assert info.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "audit" in info.value.details()
        disk.full = False
        assert create(h, csr_pem(), token=h.token()).cert_chain  # recovers
        granted = [line for line in disk.lines if b'"outcome":"granted"' in line]
        assert len(granted) == 2  # the unaudited issuance was never handed out


class _SlowAuthenticator:
    """A token backend that takes its time (a slow Kubernetes API, say)."""

    name = "slow"

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.started = threading.Event()

    async def authenticate(self, token: str) -> Any:
        self.started.set()
        await asyncio.sleep(0.8)
        return await self.inner.authenticate(token)


def test_graceful_stop_drains_in_flight_calls(ca_state: Path, tmp_path: Path) -> None:
    from citadel.ca.jwks import JwksAuthenticator

    slow = _SlowAuthenticator(JwksAuthenticator(jwks_file=ca_state / "dev-issuer" / "jwks.json"))
    with running_ca(ca_state, authenticator=slow, audit_path=tmp_path / "audit.log") as h:
        with ThreadPoolExecutor(1) as pool:
            pending = pool.submit(create, h, csr_pem(), token=h.token())
            assert slow.started.wait(5)
            h.loop.run(h.running.stop(grace=5.0))  # while the call is in flight
            assert pending.result(timeout=10).cert_chain  # ... it still completes
        with pytest.raises(grpc.RpcError):
            create(h, csr_pem(), token=h.token())  # and nothing new is accepted


def _served_certificate(port: int) -> x509.Certificate:
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # only reading what is served; the clock is faked
    ctx.set_alpn_protocols(["h2"])
    with (
        socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
        ctx.wrap_socket(raw, server_hostname="localhost") as tls,
    ):
        der = tls.getpeercert(binary_form=True)
    assert der
    return x509.load_der_x509_certificate(der)


def test_serving_certificate_renews_before_expiry(ca_state: Path, tmp_path: Path) -> None:
    now = [time.time()]
    with running_ca(
        ca_state,
        clock=lambda: now[0],
        serving_cert_ttl=timedelta(hours=3),
        audit_path=tmp_path / "audit.log",
    ) as h:
        first = _served_certificate(h.port)
        assert _served_certificate(h.port).serial_number == first.serial_number
        now[0] += 2.5 * 3600  # past two thirds of the lifetime
        second = _served_certificate(h.port)
        assert second.serial_number != first.serial_number
        assert second.not_valid_after_utc > first.not_valid_after_utc
        second.verify_directly_issued_by(h.running.authority.signing_cert)
        assert h.running.serving is not None and h.running.serving.renewals == 1


def test_port_in_use_is_refused(ca_server: CAHandle, ca_state: Path) -> None:
    from citadel.errors import ConfigError

    with (
        pytest.raises(ConfigError, match="in use"),
        running_ca(ca_state, listen=f"127.0.0.1:{ca_server.port}"),
    ):
        pass


# ------------------------------------------------------------------ the real CLI


def _citadel(*args: str, **kw: Any) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "citadel.cli", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        **kw,
    )


def test_cli_init_token_serve(tmp_path: Path) -> None:
    state = tmp_path / "state"
    r = _citadel("ca", "init", "--state-dir", str(state), "--trust-domain", "cluster.local")
    assert r.returncode == 0, r.stderr
    r = _citadel("dev", "issuer-init", "--state-dir", str(state))
    assert r.returncode == 0, r.stderr
    r = _citadel(
        "dev",
        "token",
        "--state-dir",
        str(state),
        "--namespace",
        "default",
        "--service-account",
        "web",
    )
    assert r.returncode == 0, r.stderr
    token = r.stdout.strip()
    signing_key = tmp_path / "audit-key.pem"
    r = _citadel("audit", "keygen", "--out", str(signing_key))
    assert r.returncode == 0, r.stderr
    port = free_port()
    audit = tmp_path / "audit.log"
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(
        ca_serve_cmd(
            state, port, "--audit-log", str(audit), "--audit-signing-key", str(signing_key)
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        root = (state / "cacerts" / "root-cert.pem").read_bytes()
        creds = grpc.ssl_channel_credentials(root_certificates=root)
        with grpc.secure_channel(f"localhost:{port}", creds) as ch:
            grpc.channel_ready_future(ch).result(timeout=20)
            from citadel.ca._proto import ca_pb2_grpc

            resp = ca_pb2_grpc.IstioCertificateServiceStub(ch).CreateCertificate(
                ca_pb2.IstioCertificateRequest(csr=csr_pem()),
                metadata=[("authorization", f"Bearer {token}")],
                timeout=10,
            )
        leaf = x509.load_pem_x509_certificate(resp.cert_chain[0].encode())
        assert leaf.extensions.get_extension_for_class(
            x509.SubjectAlternativeName
        ).value.get_values_for_type(x509.UniformResourceIdentifier) == [WEB]
        # A second server on the same port is refused clearly.
        r = _citadel(
            "ca",
            "serve",
            "--state-dir",
            str(state),
            "--listen",
            f"127.0.0.1:{port}",
            "--jwks-file",
            str(state / "dev-issuer" / "jwks.json"),
            "--audit-log",
            str(tmp_path / "a2.log"),
        )
        assert r.returncode == 1 and "in use" in r.stderr
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=20)
    assert proc.returncode == 0, err
    assert "serving" in err and "stopped" in err
    assert '"outcome":"granted"' in audit.read_text()
    assert token not in audit.read_text() and token not in err
    assert verify_files([audit]).ok
    # The stream was closed with a checkpoint signed by the operator's key.
    r = _citadel(
        "audit", "verify", str(audit), "--public-key", f"{signing_key}.pub", "--require-closed"
    )
    assert r.returncode == 0, r.stderr
