"""Property tests (hypothesis, bounded budget) for the CA's two gates.

- CSR policy: whatever a CSR asks for (random SAN mixes, CA flags, subjects, key types,
  damaged bytes), a leaf is either refused with one of our errors or carries exactly the
  caller's identity and nothing else.
- Token verifier: any change to a valid token (a flipped byte in any segment, a claim
  edited without re-signing, segments swapped or dropped) is refused with
  ``AuthenticationError``/``Unavailable``, unless the change was a no-op.
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import json
from datetime import timedelta

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from citadel.ca.authority import Authority, init_authority
from citadel.ca.issuance import Issuer, parse_csr
from citadel.ca.jwks import JwksAuthenticator
from citadel.ca.tokens import Caller
from citadel.dev import DevIssuer, init_dev_issuer, mint_token
from citadel.errors import AuthenticationError, CitadelError, InvalidRequest, Unavailable

T0 = 1_900_000_000.0
BUDGET = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

KEYS = {
    "p256": ec.generate_private_key(ec.SECP256R1()),
    "p384": ec.generate_private_key(ec.SECP384R1()),
    "p521": ec.generate_private_key(ec.SECP521R1()),
    "k256": ec.generate_private_key(ec.SECP256K1()),
    "rsa2048": rsa.generate_private_key(public_exponent=65537, key_size=2048),
    "rsa1024": rsa.generate_private_key(public_exponent=65537, key_size=1024),  # noqa: S505
    "ed25519": ed25519.Ed25519PrivateKey.generate(),
}
NAMES = st.sampled_from(["default", "web", "shop", "cart", "kube-system", "admin", "a", "x-1"])


@pytest.fixture(scope="module")
def issuer(tmp_path_factory: pytest.TempPathFactory) -> Issuer:
    authority: Authority = init_authority(
        tmp_path_factory.mktemp("ca") / "cacerts", trust_domain="cluster.local"
    )
    return Issuer(authority)


# ------------------------------------------------------------------ CSR policy

_uris = st.one_of(
    st.builds(lambda n, s: f"spiffe://cluster.local/ns/{n}/sa/{s}", NAMES, NAMES),
    st.builds(lambda n, s: f"spiffe://evil.org/ns/{n}/sa/{s}", NAMES, NAMES),
    st.sampled_from(["spiffe://cluster.local", "https://example.com/", "urn:x:y"]),
)
_general_names = st.one_of(
    _uris.map(x509.UniformResourceIdentifier),
    st.from_regex(r"[a-z]{1,10}(\.[a-z]{1,10}){0,2}", fullmatch=True).map(x509.DNSName),
    st.ip_addresses().map(lambda ip: x509.IPAddress(ipaddress.ip_address(ip))),
    st.from_regex(r"[a-z]{1,8}@[a-z]{1,8}\.example", fullmatch=True).map(x509.RFC822Name),
)


@st.composite
def csrs(draw: st.DrawFn) -> tuple[bytes, list[x509.GeneralName]]:
    key = KEYS[draw(st.sampled_from(sorted(KEYS)))]
    cn = draw(st.one_of(st.none(), st.text(min_size=1, max_size=20)))
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)] if cn else [])
    )
    sans = draw(st.lists(_general_names, max_size=4))
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    ca = draw(st.one_of(st.none(), st.booleans()))
    if ca is not None:
        builder = builder.add_extension(
            x509.BasicConstraints(ca=ca, path_length=None), critical=True
        )
    algo = None if isinstance(key, ed25519.Ed25519PrivateKey) else hashes.SHA256()
    return builder.sign(key, algo).public_bytes(serialization.Encoding.PEM), sans


def _leaf_ids(leaf: x509.Certificate) -> list[str]:
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(getattr(n, "value", n)) for n in san]


@BUDGET
@given(csr=csrs(), ns=NAMES, sa=NAMES)
def test_csr_never_yields_another_identity(
    issuer: Issuer, csr: tuple[bytes, list[x509.GeneralName]], ns: str, sa: str
) -> None:
    pem, sans = csr
    caller = Caller(namespace=ns, service_account=sa, subject=f"system:serviceaccount:{ns}:{sa}")
    mine = f"spiffe://cluster.local/ns/{ns}/sa/{sa}"
    try:
        issued = issuer.issue(caller, pem)
    except CitadelError as exc:
        assert exc.status in ("INVALID_ARGUMENT", "PERMISSION_DENIED"), exc
        return
    assert _leaf_ids(issued.certificate) == [mine]
    asked = [str(getattr(n, "value", n)) for n in sans]
    assert asked in ([], [mine]), "only no SAN or exactly the caller's ID is accepted"


@BUDGET
@given(data=st.data())
def test_damaged_csr_bytes_refused_or_caller_identity(issuer: Issuer, data: st.DataObject) -> None:
    pem, _ = data.draw(csrs())
    der = bytearray(base64.b64decode(b"".join(pem.splitlines()[1:-1])))
    for _ in range(data.draw(st.integers(1, 3))):
        # ECDSA signatures vary in length: draw a position independent of it.
        i = data.draw(st.integers(0, 4095)) % len(der)
        der[i] ^= data.draw(st.integers(1, 255))
    body = base64.encodebytes(bytes(der))
    damaged = (
        b"-----BEGIN CERTIFICATE REQUEST-----\n" + body + b"-----END CERTIFICATE REQUEST-----\n"
    )
    caller = Caller(namespace="default", service_account="web", subject="s")
    try:
        issued = issuer.issue(caller, damaged)
    except CitadelError as exc:
        assert exc.status in ("INVALID_ARGUMENT", "PERMISSION_DENIED"), exc
        return
    assert _leaf_ids(issued.certificate) == ["spiffe://cluster.local/ns/default/sa/web"]


@BUDGET
@given(raw=st.one_of(st.binary(max_size=600), st.text(max_size=600)))
def test_arbitrary_input_is_only_ever_invalid_request(raw: bytes | str) -> None:
    with pytest.raises(InvalidRequest):
        parse_csr(raw)


# ------------------------------------------------------------------ token verifier


@pytest.fixture(scope="module")
def dev(tmp_path_factory: pytest.TempPathFactory) -> DevIssuer:
    return init_dev_issuer(tmp_path_factory.mktemp("dev"))[0]


@pytest.fixture(scope="module")
def auth(dev: DevIssuer) -> JwksAuthenticator:
    return JwksAuthenticator(jwks_file=dev.jwks_path, clock=lambda: T0)


@pytest.fixture(scope="module")
def valid(dev: DevIssuer) -> str:
    return mint_token(
        dev, namespace="default", service_account="web", clock=lambda: T0, ttl=timedelta(hours=1)
    )


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _unb64(seg: str) -> bytes:
    return base64.urlsafe_b64decode(seg + "=" * (-len(seg) % 4))


_CLAIM_EDITS = st.sampled_from(
    [
        ("sub", "system:serviceaccount:kube-system:admin"),
        ("sub", "system:serviceaccount:default:web "),
        ("aud", ["vault"]),
        ("aud", ["istio-ca", "vault"]),
        ("exp", T0 + 10**6),
        ("exp", None),
        ("nbf", T0 - 10),
        ("iss", "https://evil.example"),
        ("kubernetes.io", {"namespace": "kube-system"}),
        ("jti", "other"),
        ("extra", True),
    ]
)


@st.composite
def mutations(draw: st.DrawFn, token: str) -> str:
    parts = token.split(".")
    kind = draw(st.sampled_from(["text-flip", "byte-flip", "claim", "header", "shape"]))
    if kind == "text-flip":  # a character of the compact form
        i = draw(st.integers(0, len(token) - 1))
        c = draw(st.sampled_from("AQgw_-.=+/ a0"))
        return token[:i] + c + token[i + 1 :]
    if kind == "byte-flip":  # a byte of one decoded segment, re-encoded canonically
        seg = draw(st.integers(0, 2))
        raw = bytearray(_unb64(parts[seg]))
        i = draw(st.integers(0, len(raw) - 1))
        raw[i] ^= draw(st.integers(1, 255))
        parts[seg] = _b64(bytes(raw))
        return ".".join(parts)
    if kind == "claim":  # an edited claim, signature kept
        claims = json.loads(_unb64(parts[1]))
        name, value = draw(_CLAIM_EDITS)
        if value is None:
            claims.pop(name, None)
        else:
            claims[name] = value
        parts[1] = _b64(json.dumps(claims).encode())
        return ".".join(parts)
    if kind == "header":
        header = json.loads(_unb64(parts[0]))
        name, value = draw(
            st.sampled_from(
                [
                    ("alg", "none"),
                    ("alg", "HS256"),
                    ("alg", "RS512"),
                    ("alg", "PS256"),
                    ("kid", "other"),
                    ("kid", None),
                    ("crit", ["exp"]),
                    ("typ", "at+jwt"),
                ]
            )
        )
        if value is None:
            header.pop(name, None)
        else:
            header[name] = value
        parts[0] = _b64(json.dumps(header).encode())
        return ".".join(parts)
    shape = draw(st.sampled_from(["drop-sig", "swap", "extra-seg", "double", "empty-sig"]))
    return {
        "drop-sig": f"{parts[0]}.{parts[1]}",
        "swap": f"{parts[1]}.{parts[0]}.{parts[2]}",
        "extra-seg": token + ".e30",
        "double": token + token,
        "empty-sig": f"{parts[0]}.{parts[1]}.",
    }[shape]


@BUDGET
@given(data=st.data())
def test_any_change_to_a_valid_token_is_refused(
    auth: JwksAuthenticator, valid: str, data: st.DataObject
) -> None:
    assert asyncio.run(auth.authenticate(valid)).service_account == "web"
    mutated = data.draw(mutations(valid))
    if mutated == valid:
        return  # a no-op draw
    with pytest.raises((AuthenticationError, Unavailable)):
        asyncio.run(auth.authenticate(mutated))


@BUDGET
@given(raw=st.text(max_size=300))
def test_arbitrary_bearer_text_is_refused(auth: JwksAuthenticator, raw: str) -> None:
    with pytest.raises((AuthenticationError, Unavailable)):
        asyncio.run(auth.authenticate(raw))


def _redo_pem(der: bytes) -> bytes:
    body = base64.encodebytes(der)
    return b"-----BEGIN CERTIFICATE REQUEST-----\n%b-----END CERTIFICATE REQUEST-----\n" % body


def _der(key: object) -> bytes:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
        .public_bytes(serialization.Encoding.DER)
    )


@pytest.mark.parametrize(
    "damage",
    [
        lambda der: der.replace(b"\x02\x01\x00", b"\x02\x01\x05", 1),
        lambda der: der.replace(b"\x03\x42\x00\x04", b"\x03\x42\x00\x05", 1),
    ],
    ids=["csr-version-5", "ec-point-not-uncompressed"],
)
def test_regressions_found_by_fuzzing(issuer: Issuer, damage: object) -> None:
    """Both once escaped as bare exceptions (INTERNAL over gRPC) instead of INVALID_ARGUMENT."""
    der = damage(_der(KEYS["p256"]))  # type: ignore[operator]
    caller = Caller(namespace="default", service_account="web", subject="s")
    with pytest.raises(InvalidRequest):
        issuer.issue(caller, _redo_pem(der))
