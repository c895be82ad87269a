"""Issuance: every leaf is an X509-SVID; every CSR asking for more is refused by name."""

from __future__ import annotations

import base64
import ipaddress
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from citadel.ca.authority import Authority, end_entity_key_usage, init_authority
from citadel.ca.issuance import Issuer, parse_csr
from citadel.ca.tokens import Caller
from citadel.errors import AuthorityError, CitadelError, InvalidRequest, PermissionDenied

T0 = datetime(2030, 1, 1, tzinfo=UTC).timestamp()
WEB = "spiffe://cluster.local/ns/default/sa/web"
CALLER = Caller(
    namespace="default", service_account="web", subject="system:serviceaccount:default:web"
)


def clock() -> float:
    return T0


@pytest.fixture(scope="module")
def authority(tmp_path_factory: pytest.TempPathFactory) -> Authority:
    return init_authority(
        tmp_path_factory.mktemp("ca") / "cacerts", trust_domain="cluster.local", clock=clock
    )


@pytest.fixture(scope="module")
def issuer(authority: Authority) -> Issuer:
    return Issuer(authority, clock=clock)


_P256 = ec.generate_private_key(ec.SECP256R1())


def make_csr(
    key: object = None,
    *,
    sans: list[x509.GeneralName] | None = None,
    ca: bool | None = None,
    subject: str | None = None,
) -> bytes:
    key = key or _P256
    b = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)] if subject else [])
    )
    if sans is not None:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    if ca is not None:
        b = b.add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    algo = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return b.sign(key, algo).public_bytes(serialization.Encoding.PEM)  # type: ignore[arg-type]


def _uri(v: str) -> x509.UniformResourceIdentifier:
    return x509.UniformResourceIdentifier(v)


# ------------------------------------------------------------------ the leaf


@pytest.mark.parametrize(
    "key",
    [
        ec.generate_private_key(ec.SECP256R1()),
        ec.generate_private_key(ec.SECP384R1()),
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
    ],
    ids=["ec-p256", "ec-p384", "rsa-2048"],
)
def test_leaf_is_an_x509_svid(issuer: Issuer, authority: Authority, key: object) -> None:
    out = issuer.issue(CALLER, make_csr(key))
    leaf = out.certificate
    ext = leaf.extensions
    assert leaf.subject == x509.Name([])
    san = ext.get_extension_for_class(x509.SubjectAlternativeName)
    assert san.critical  # empty subject => SAN critical
    assert list(san.value) == [_uri(WEB)]
    bc = ext.get_extension_for_class(x509.BasicConstraints)
    assert bc.critical and bc.value.ca is False
    ku = ext.get_extension_for_class(x509.KeyUsage)
    assert ku.critical and ku.value.digital_signature
    assert not ku.value.key_cert_sign and not ku.value.crl_sign
    assert ku.value.key_encipherment is isinstance(key, rsa.RSAPrivateKey)
    eku = ext.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert set(eku) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    ski = ext.get_extension_for_class(x509.SubjectKeyIdentifier).value
    assert ski == x509.SubjectKeyIdentifier.from_public_key(key.public_key())  # type: ignore[attr-defined]
    aki = ext.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    issuer_ski = authority.signing_cert.extensions.get_extension_for_class(
        x509.SubjectKeyIdentifier
    ).value
    assert aki.key_identifier == issuer_ski.digest
    assert leaf.issuer == authority.signing_cert.subject
    leaf.verify_directly_issued_by(authority.signing_cert)
    assert out.serial == leaf.serial_number > 2**64
    assert out.chain_pem[1:] == authority.chain_pem
    assert x509.load_pem_x509_certificate(out.pem.encode()) == leaf


@pytest.mark.parametrize(
    "key",
    [ec.generate_private_key(ec.SECP256R1()), rsa.generate_private_key(65537, 2048)],
    ids=["ec-p256", "rsa-2048"],
)
def test_pre_encoded_extensions_are_the_typed_ones_byte_for_byte(
    issuer: Issuer, authority: Authority, key: object
) -> None:
    """The constant extensions go to the builder as DER; the TBS must be what the typed
    values would have produced (same order, criticality and encoding)."""
    leaf = issuer.issue(CALLER, make_csr(key)).certificate
    typed = [
        (x509.BasicConstraints(ca=False, path_length=None), True),
        (end_entity_key_usage(rsa_key=isinstance(key, rsa.RSAPrivateKey)), True),
        (
            x509.ExtendedKeyUsage(
                [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
            ),
            False,
        ),
        (x509.SubjectAlternativeName([_uri(WEB)]), True),
        (x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False),  # type: ignore[attr-defined]
        (authority.authority_key_identifier, False),
    ]
    builder = (
        x509.CertificateBuilder()
        .issuer_name(authority.signing_cert.subject)
        .subject_name(x509.Name([]))
        .public_key(key.public_key())  # type: ignore[attr-defined]
        .serial_number(leaf.serial_number)
        .not_valid_before(leaf.not_valid_before_utc)
        .not_valid_after(leaf.not_valid_after_utc)
    )
    for value, critical in typed:
        builder = builder.add_extension(value, critical=critical)
    rebuilt = builder.sign(authority.key, authority.hash_algorithm)
    assert rebuilt.tbs_certificate_bytes == leaf.tbs_certificate_bytes


def test_validity_default_backdate_and_ttl(issuer: Issuer) -> None:
    out = issuer.issue(CALLER, make_csr())
    now = datetime.fromtimestamp(T0, UTC)
    assert out.not_before == now - timedelta(seconds=30)
    assert out.not_after == now + timedelta(hours=1)
    assert out.granted_ttl == 3600 and out.requested_ttl == 0


@pytest.mark.parametrize(
    ("requested", "granted"),
    [(600, 600), (7200, 7200), (86400, 86400), (90 * 86400, 86400), (2**63 - 1, 86400)],
    ids=["10m", "2h", "max", "90d-clamped", "int64-clamped"],
)
def test_requested_ttl_clamped_to_max(issuer: Issuer, requested: int, granted: int) -> None:
    out = issuer.issue(CALLER, make_csr(), requested_ttl=requested)
    assert out.granted_ttl == granted
    assert out.requested_ttl == requested


def test_negative_ttl_refused(issuer: Issuer) -> None:
    with pytest.raises(InvalidRequest, match="validity_duration"):
        issuer.issue(CALLER, make_csr(), requested_ttl=-5)


def test_configured_ttls_and_backdate(authority: Authority) -> None:
    iss = Issuer(
        authority,
        clock=clock,
        default_ttl=timedelta(minutes=5),
        max_ttl=timedelta(minutes=30),
        backdate=timedelta(seconds=10),
    )
    out = iss.issue(CALLER, make_csr())
    assert out.granted_ttl == 300
    assert out.not_before == datetime.fromtimestamp(T0 - 10, UTC)
    assert iss.issue(CALLER, make_csr(), requested_ttl=7200).granted_ttl == 1800


def test_bad_ttl_configuration_refused(authority: Authority) -> None:
    with pytest.raises(AuthorityError, match="exceeds max"):
        Issuer(authority, default_ttl=timedelta(hours=2), max_ttl=timedelta(hours=1))


def test_not_after_capped_by_issuer(authority: Authority) -> None:
    near_end = authority.not_after.timestamp() - 1800
    iss = Issuer(authority, clock=lambda: near_end)
    out = iss.issue(CALLER, make_csr(), requested_ttl=86400)
    assert out.not_after == authority.not_after
    assert out.granted_ttl == 1800


def test_serials_unique(issuer: Issuer) -> None:
    csr = make_csr()
    serials = {issuer.issue(CALLER, csr).serial for _ in range(300)}
    assert len(serials) == 300


@pytest.mark.parametrize(
    "csr",
    [
        make_csr(),
        make_csr(sans=[_uri(WEB)]),
        make_csr(subject="ignored subject"),
        make_csr(ca=False),
        make_csr(rsa.generate_private_key(public_exponent=65537, key_size=3072)),
    ],
    ids=["no-san", "exact-uri-san", "subject-ignored", "ca-false", "rsa-3072"],
)
def test_acceptable_csrs(issuer: Issuer, csr: bytes) -> None:
    out = issuer.issue(CALLER, csr.decode())
    assert str(out.spiffe_id) == WEB
    assert out.certificate.subject == x509.Name([])


def test_identity_comes_from_caller_not_csr(issuer: Issuer) -> None:
    other = Caller(namespace="prod", service_account="db", subject="system:serviceaccount:prod:db")
    out = issuer.issue(other, make_csr())
    assert str(out.spiffe_id) == "spiffe://cluster.local/ns/prod/sa/db"


# ------------------------------------------------------------------ refusals


def _tamper_signature(pem: bytes) -> bytes:
    der = bytearray(x509.load_pem_x509_csr(pem).public_bytes(serialization.Encoding.DER))
    der[-3] ^= 0x01
    b64 = base64.encodebytes(bytes(der)).replace(b"\n", b"")
    lines = b"\n".join(b64[i : i + 64] for i in range(0, len(b64), 64))
    return (
        b"-----BEGIN CERTIFICATE REQUEST-----\n" + lines + b"\n-----END CERTIFICATE REQUEST-----\n"
    )


_GOOD = make_csr()
REFUSED = [
    ("empty", b"", InvalidRequest, "no CSR"),
    ("not-pem", b"hello", InvalidRequest, "single PEM block"),
    ("trailing-data", _GOOD + b"trailing", InvalidRequest, "nothing before or after"),
    ("leading-data", b"junk\n" + _GOOD, InvalidRequest, "nothing before or after"),
    ("two-blocks", _GOOD + _GOOD, InvalidRequest, "exactly one PEM block"),
    ("oversized", b"-----BEGIN CERTIFICATE REQUEST-----\n" + b"A" * 9000, InvalidRequest, "bytes"),
    (
        "garbage-der",
        b"-----BEGIN CERTIFICATE REQUEST-----\nAAAA\n-----END CERTIFICATE REQUEST-----",
        InvalidRequest,
        "not a valid PKCS#10",
    ),
    ("bad-signature", _tamper_signature(_GOOD), InvalidRequest, "signature does not verify"),
    ("dns-san", make_csr(sans=[x509.DNSName("web.example")]), InvalidRequest, "DNS"),
    (
        "ip-san",
        make_csr(sans=[x509.IPAddress(ipaddress.ip_address("10.0.0.1"))]),
        InvalidRequest,
        "IP",
    ),
    ("email-san", make_csr(sans=[x509.RFC822Name("a@b.example")]), InvalidRequest, "e-mail"),
    (
        "dns-beside-id",
        make_csr(sans=[_uri(WEB), x509.DNSName("web.example")]),
        InvalidRequest,
        "DNS",
    ),
    (
        "other-identity",
        make_csr(sans=[_uri("spiffe://cluster.local/ns/kube-system/sa/admin")]),
        PermissionDenied,
        "kube-system",
    ),
    (
        "other-trust-domain",
        make_csr(sans=[_uri("spiffe://evil.org/ns/default/sa/web")]),
        PermissionDenied,
        "evil.org",
    ),
    ("second-uri", make_csr(sans=[_uri(WEB), _uri(WEB + "2")]), PermissionDenied, "identity"),
    ("repeated-id", make_csr(sans=[_uri(WEB), _uri(WEB)]), InvalidRequest, "once"),
    ("ca-request", make_csr(ca=True), InvalidRequest, "CA"),
    ("ed25519-key", make_csr(ed25519.Ed25519PrivateKey.generate()), InvalidRequest, "key type"),
    ("p521-key", make_csr(ec.generate_private_key(ec.SECP521R1())), InvalidRequest, "P-256"),
    ("secp256k1-key", make_csr(ec.generate_private_key(ec.SECP256K1())), InvalidRequest, "P-256"),
    (
        "rsa-1024",
        make_csr(rsa.generate_private_key(public_exponent=65537, key_size=1024)),  # noqa: S505
        InvalidRequest,
        "2048 to 4096",
    ),
]


@pytest.mark.parametrize(
    ("csr", "error", "message"), [r[1:] for r in REFUSED], ids=[r[0] for r in REFUSED]
)
def test_refused_csrs(issuer: Issuer, csr: bytes, error: type[CitadelError], message: str) -> None:
    with pytest.raises(error, match=message) as info:
        issuer.issue(CALLER, csr)
    assert info.value.status in {"INVALID_ARGUMENT", "PERMISSION_DENIED"}
    assert info.value.reason


def test_parse_csr_accepts_str_and_surrounding_whitespace() -> None:
    assert parse_csr("\n  " + _GOOD.decode() + "\n\n").is_signature_valid


def test_invalid_identity_refused(issuer: Issuer) -> None:
    weird = Caller(namespace="a b", service_account="c", subject="system:serviceaccount:a b:c")
    with pytest.raises(PermissionDenied, match="valid SPIFFE ID"):
        issuer.issue(weird, make_csr())


@pytest.mark.parametrize("mode", ["chain", "full", "issuer"])
def test_self_check_refuses_a_bad_leaf(authority: Authority, tmp_path: Path, mode: str) -> None:
    """An authority whose key does not match its certificate signs leaves that cannot
    verify; the self-check must catch it instead of handing them out."""
    other = init_authority(tmp_path / "other", trust_domain="cluster.local", clock=clock)
    broken = Authority(
        trust_domain=authority.trust_domain,
        root=authority.root,
        signing_cert=authority.signing_cert,
        key=other.key,
    )
    with pytest.raises(AuthorityError, match="self-verification"):
        Issuer(broken, clock=clock, self_check=mode).issue(CALLER, make_csr())


def test_issuer_anchored_self_check_issues_the_same_leaves(authority: Authority) -> None:
    iss = Issuer(authority, clock=clock, self_check="issuer")
    out = iss.issue(CALLER, make_csr())
    out.certificate.verify_directly_issued_by(authority.signing_cert)
    assert str(out.spiffe_id) == WEB and out.chain_pem[1:] == authority.chain_pem
    with pytest.raises(AuthorityError, match="'chain', 'full', 'issuer'"):
        Issuer(authority, self_check="none")


def test_self_check_refuses_expired_window(authority: Authority) -> None:
    """The verifier runs at the injected time: a clock past the chain refuses."""
    late = authority.not_after.timestamp() + 10
    with pytest.raises(AuthorityError):
        Issuer(authority, clock=lambda: late).issue(CALLER, make_csr())


# ------------------------------------------------------------------ self-check equivalence


def _ca_cert(
    name: str,
    key: ec.EllipticCurvePrivateKey,
    issuer_key: ec.EllipticCurvePrivateKey,
    issuer_name: x509.Name | None,
    valid: tuple[datetime, datetime],
    extra: tuple[x509.ExtensionType, ...] = (),
) -> x509.Certificate:
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    b = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_name or subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(valid[0])
        .not_valid_after(valid[1])
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(False, False, False, False, False, True, True, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
    )
    if issuer_name is not None:
        aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key())
        b = b.add_extension(aki, critical=False)
    for ext in extra:
        b = b.add_extension(ext, critical=True)
    return b.sign(issuer_key, hashes.SHA256())


def _two_level(
    root_valid: tuple[datetime, datetime],
    signing_valid: tuple[datetime, datetime],
    root_extra: tuple[x509.ExtensionType, ...] = (),
) -> Authority:
    from citadel.spiffe import TrustDomain

    rk, ik = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root = _ca_cert("root", rk, rk, None, root_valid, root_extra)
    signing = _ca_cert("signing", ik, rk, root.subject, signing_valid)
    return Authority(
        trust_domain=TrustDomain("cluster.local"), root=root, signing_cert=signing, key=ik
    )


def test_chain_self_check_matches_the_full_walk_at_every_time() -> None:
    """The default check is anchored at the signing certificate (one ECDSA verification
    per leaf) and must refuse exactly when walking every leaf to the root would: here the
    root becomes valid an hour after the signing certificate, so at T-90min only the
    root's validity can refuse (the anchored verifier alone would issue)."""
    t = datetime.fromtimestamp(T0, UTC)
    auth = _two_level(
        (t - timedelta(hours=1), t + timedelta(days=5)),
        (t - timedelta(hours=2), t + timedelta(days=10)),
    )
    now = [T0]
    issuers = {
        mode: Issuer(auth, clock=lambda: now[0], backdate=timedelta(0), self_check=mode)
        for mode in ("chain", "full")
    }
    assert issuers["chain"].full_chain_reason is None
    assert issuers["full"].full_chain_reason == "requested"
    outcomes: dict[int, set[str]] = {}
    for minutes in (-150, -90, -30, 0, 60 * 24 * 4):
        now[0] = T0 + minutes * 60
        for mode, iss in issuers.items():
            try:
                iss.issue(CALLER, make_csr())
                outcome = "issued"
            except AuthorityError:
                outcome = "refused"
            outcomes.setdefault(minutes, set()).add(outcome)
            assert outcomes[minutes] == {outcome}, (minutes, mode)
    assert outcomes == {
        -150: {"refused"},
        -90: {"refused"},
        -30: {"issued"},
        0: {"issued"},
        60 * 24 * 4: {"issued"},
    }


def test_chain_self_check_walks_the_whole_chain_when_a_ca_constrains_names() -> None:
    """Name constraints above the signing certificate depend on each leaf's SAN: then
    every leaf is verified up to the root, as ``full`` does."""
    t = datetime.fromtimestamp(T0, UTC)
    nc = x509.NameConstraints(
        permitted_subtrees=[x509.DNSName("example.com")], excluded_subtrees=None
    )
    auth = _two_level(
        (t - timedelta(hours=1), t + timedelta(days=5)),
        (t - timedelta(hours=1), t + timedelta(days=5)),
        root_extra=(nc,),
    )
    iss = Issuer(auth, clock=clock)
    assert iss.full_chain_reason is not None and "2.5.29.30" in iss.full_chain_reason
    assert iss._untrusted  # the verifier gets the chain and is anchored at the root
    out = iss.issue(CALLER, make_csr())
    assert str(out.spiffe_id) == WEB


def test_default_authority_is_checked_with_one_verification_per_leaf(
    authority: Authority,
) -> None:
    iss = Issuer(authority, clock=clock)
    assert iss.self_check == "chain" and iss.full_chain_reason is None
    leaf = iss.issue(CALLER, make_csr()).certificate
    # What the anchored check skips per leaf was proven once; a full walk still accepts.
    from cryptography.x509 import verification

    verification.PolicyBuilder().store(verification.Store([authority.root])).time(
        datetime.fromtimestamp(T0, UTC)
    ).build_client_verifier().verify(leaf, authority.untrusted_chain)
