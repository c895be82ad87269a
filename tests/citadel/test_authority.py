"""The cacerts layout: init writes Istio's four files; load refuses every broken layout."""

from __future__ import annotations

import ipaddress
import os
import stat
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509 import verification
from cryptography.x509.oid import NameOID

from citadel.ca.authority import (
    CA_CERT,
    CA_KEY,
    CERT_CHAIN,
    KEY_TYPES,
    ROOT_CERT,
    cacerts_dir,
    init_authority,
    load_authority,
    load_or_init_authority,
)
from citadel.errors import AuthorityError
from citadel.spiffe import TrustDomain

T0 = datetime(2030, 1, 1, tzinfo=UTC).timestamp()


def clock() -> float:
    return T0


@pytest.fixture(scope="module")
def ca_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("ca") / "cacerts"
    init_authority(d, trust_domain="cluster.local", clock=clock)
    return d


def _copy(src: Path, dst: Path) -> Path:
    dst.mkdir(parents=True)
    for name in (ROOT_CERT, CA_CERT, CA_KEY, CERT_CHAIN):
        (dst / name).write_bytes((src / name).read_bytes())
    os.chmod(dst / CA_KEY, 0o600)
    return dst


def _pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def _key_pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: str,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = True,
    key_cert_sign: bool = True,
    uri: str | None = None,
    not_after: datetime | None = None,
) -> x509.Certificate:
    now = datetime.fromtimestamp(T0, UTC)
    b = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, issuer)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - timedelta(days=1))
        .not_valid_after(not_after or now + timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(True, False, False, False, False, key_cert_sign, ca, False, False),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()), False
        )
    )
    if uri:
        b = b.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]), False
        )
    return b.sign(issuer_key, hashes.SHA256())


def _write_layout(
    d: Path,
    *,
    root: x509.Certificate,
    ca: x509.Certificate,
    key: ec.EllipticCurvePrivateKey,
    chain: bytes,
) -> Path:
    d.mkdir(parents=True)
    (d / ROOT_CERT).write_bytes(_pem(root))
    (d / CA_CERT).write_bytes(_pem(ca))
    (d / CERT_CHAIN).write_bytes(chain)
    fd = os.open(d / CA_KEY, os.O_WRONLY | os.O_CREAT, 0o600)
    os.write(fd, _key_pem(key))
    os.close(fd)
    return d


# ------------------------------------------------------------------ init


def test_init_writes_istio_layout(ca_dir: Path) -> None:
    assert stat.S_IMODE(os.stat(ca_dir / CA_KEY).st_mode) == 0o600
    root = x509.load_pem_x509_certificate((ca_dir / ROOT_CERT).read_bytes())
    ca = x509.load_pem_x509_certificate((ca_dir / CA_CERT).read_bytes())
    chain = x509.load_pem_x509_certificates((ca_dir / CERT_CHAIN).read_bytes())
    assert chain == [ca, root]
    root.verify_directly_issued_by(root)
    ca.verify_directly_issued_by(root)
    for cert, pathlen in ((root, None), (ca, 0)):
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
        assert bc.critical and bc.value.ca and bc.value.path_length == pathlen
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
        assert ku.critical and ku.value.key_cert_sign
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        assert san.get_values_for_type(x509.UniformResourceIdentifier) == ["spiffe://cluster.local"]
    assert root.not_valid_after_utc - root.not_valid_before_utc > timedelta(days=3000)
    assert ca.not_valid_after_utc <= root.not_valid_after_utc
    key = serialization.load_pem_private_key((ca_dir / CA_KEY).read_bytes(), None)
    assert key.public_key() == ca.public_key()


@pytest.mark.parametrize("key_type", KEY_TYPES)
def test_init_each_key_type(tmp_path: Path, key_type: str) -> None:
    a = init_authority(tmp_path / "c", trust_domain="example.org", key_type=key_type, clock=clock)
    assert a.key_type == key_type
    assert a.trust_domain == TrustDomain("example.org")
    again = load_authority(tmp_path / "c", clock=clock)
    assert again.signing_cert == a.signing_cert
    assert again.chain_pem[-1] == a.root_pem


def test_init_refuses_to_overwrite(ca_dir: Path) -> None:
    with pytest.raises(AuthorityError, match="refusing to overwrite"):
        init_authority(ca_dir, trust_domain="cluster.local", clock=clock)


def test_init_refuses_unknown_key_type(tmp_path: Path) -> None:
    with pytest.raises(AuthorityError, match="unknown key type"):
        init_authority(tmp_path / "c", trust_domain="cluster.local", key_type="ed25519")


def test_load_or_init_reuses(ca_dir: Path, tmp_path: Path) -> None:
    a, created = load_or_init_authority(ca_dir, trust_domain="cluster.local", clock=clock)
    assert not created and a.directory == ca_dir
    b, created = load_or_init_authority(tmp_path / "new", trust_domain="td", clock=clock)
    assert created and b.trust_domain.name == "td"


def test_cacerts_dir_resolution(tmp_path: Path, ca_dir: Path) -> None:
    assert cacerts_dir(tmp_path) == tmp_path / "cacerts"
    assert cacerts_dir(ca_dir) == ca_dir  # a mounted Secret passed directly


# ------------------------------------------------------------------ load refusals


def test_load_missing_dir(tmp_path: Path) -> None:
    with pytest.raises(AuthorityError, match="citadel ca init"):
        load_authority(tmp_path / "nope")


@pytest.mark.parametrize("name", [ROOT_CERT, CA_CERT, CA_KEY, CERT_CHAIN])
def test_load_missing_file(tmp_path: Path, ca_dir: Path, name: str) -> None:
    d = _copy(ca_dir, tmp_path / "c")
    (d / name).unlink()
    with pytest.raises(AuthorityError, match=f"missing {name}"):
        load_authority(d, clock=clock)


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660], ids=oct)
def test_load_refuses_key_readable_by_others(tmp_path: Path, ca_dir: Path, mode: int) -> None:
    d = _copy(ca_dir, tmp_path / "c")
    os.chmod(d / CA_KEY, mode)
    with pytest.raises(AuthorityError, match="chmod 600"):
        load_authority(d, clock=clock)


def test_load_refuses_key_mismatch(tmp_path: Path, ca_dir: Path) -> None:
    d = _copy(ca_dir, tmp_path / "c")
    (d / CA_KEY).write_bytes(_key_pem(ec.generate_private_key(ec.SECP256R1())))
    with pytest.raises(AuthorityError, match="does not match"):
        load_authority(d, clock=clock)


def test_load_refuses_garbage_key(tmp_path: Path, ca_dir: Path) -> None:
    d = _copy(ca_dir, tmp_path / "c")
    (d / CA_KEY).write_bytes(b"not a key")
    with pytest.raises(AuthorityError, match="not an unencrypted PEM private key"):
        load_authority(d, clock=clock)


def test_load_refuses_garbage_cert(tmp_path: Path, ca_dir: Path) -> None:
    d = _copy(ca_dir, tmp_path / "c")
    (d / ROOT_CERT).write_bytes(b"junk")
    with pytest.raises(AuthorityError, match="does not hold PEM certificates"):
        load_authority(d, clock=clock)


def test_load_refuses_chain_from_other_root(tmp_path: Path, ca_dir: Path) -> None:
    other = init_authority(tmp_path / "other", trust_domain="cluster.local", clock=clock)
    d = _copy(ca_dir, tmp_path / "c")
    (d / ROOT_CERT).write_bytes(other.root_pem.encode())
    with pytest.raises(AuthorityError, match="does not verify"):
        load_authority(d, clock=clock)


def test_load_refuses_chain_not_starting_with_ca(tmp_path: Path, ca_dir: Path) -> None:
    d = _copy(ca_dir, tmp_path / "c")
    (d / CERT_CHAIN).write_bytes((d / ROOT_CERT).read_bytes() + (d / CA_CERT).read_bytes())
    with pytest.raises(AuthorityError, match="must start with"):
        load_authority(d, clock=clock)


def test_load_refuses_non_ca_signing_cert(tmp_path: Path) -> None:
    rk, ck = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root = _cert("root", rk, "root", rk, uri="spiffe://td")
    ca = _cert("ca", ck, "root", rk, ca=False, key_cert_sign=False)
    d = _write_layout(tmp_path / "c", root=root, ca=ca, key=ck, chain=_pem(ca, root))
    with pytest.raises(AuthorityError, match="CA=false"):
        load_authority(d, clock=clock)


def test_load_refuses_ca_without_keycertsign(tmp_path: Path) -> None:
    rk, ck = ec.generate_private_key(ec.SECP256R1()), ec.generate_private_key(ec.SECP256R1())
    root = _cert("root", rk, "root", rk, uri="spiffe://td")
    ca = _cert("ca", ck, "root", rk, key_cert_sign=False)
    d = _write_layout(tmp_path / "c", root=root, ca=ca, key=ck, chain=_pem(ca, root))
    with pytest.raises(AuthorityError, match="keyCertSign"):
        load_authority(d, clock=clock)


def test_load_refuses_root_not_self_signed(tmp_path: Path) -> None:
    rk, ok, ck = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _cert("root", rk, "root", ok)  # signed by some other key
    ca = _cert("ca", ck, "root", rk)
    d = _write_layout(tmp_path / "c", root=root, ca=ca, key=ck, chain=_pem(ca, root))
    with pytest.raises(AuthorityError, match="not self-signed"):
        load_authority(d, trust_domain="td", clock=clock)


def test_load_expired_and_not_yet_valid(ca_dir: Path) -> None:
    with pytest.raises(AuthorityError, match="expired"):
        load_authority(ca_dir, clock=lambda: T0 + 400 * 86400)
    with pytest.raises(AuthorityError, match="not valid until"):
        load_authority(ca_dir, clock=lambda: T0 - 86400)


def test_load_refuses_short_remaining_lifetime(ca_dir: Path) -> None:
    a = load_authority(ca_dir, clock=clock)
    near_end = a.not_after.timestamp() - 600
    with pytest.raises(AuthorityError, match="must remain"):
        load_authority(ca_dir, clock=lambda: near_end)
    ok = load_authority(ca_dir, clock=lambda: near_end, min_remaining=timedelta(minutes=5))
    assert ok.remaining(datetime.fromtimestamp(near_end, UTC)) == timedelta(minutes=10)


def test_load_trust_domain_mismatch(ca_dir: Path) -> None:
    with pytest.raises(AuthorityError, match=r"trust domain 'cluster\.local', not 'other\.org'"):
        load_authority(ca_dir, trust_domain="other.org", clock=clock)


def test_team_intermediate_under_corporate_root(tmp_path: Path) -> None:
    """Three levels, no SPIFFE SAN on any CA: usable once the trust domain is given."""
    rk, mk, ck = (ec.generate_private_key(ec.SECP256R1()) for _ in range(3))
    root = _cert("corp root", rk, "corp root", rk)
    mid = _cert("corp issuing", mk, "corp root", rk)
    ca = _cert("team ca", ck, "corp issuing", mk)
    d = _write_layout(tmp_path / "c", root=root, ca=ca, key=ck, chain=_pem(ca, mid, root))
    with pytest.raises(AuthorityError, match="pass the trust domain"):
        load_authority(d, clock=clock)
    a = load_authority(d, trust_domain="corp.example", clock=clock)
    assert a.intermediates == (mid,)
    assert len(a.chain_pem) == 3


def test_serving_certificate_verifies_for_localhost_and_ip(ca_dir: Path) -> None:
    a = load_authority(ca_dir, clock=clock)
    key = ec.generate_private_key(ec.SECP256R1())
    cert = a.issue_serving_certificate(
        dns_names=["localhost", "127.0.0.1"], key=key, ttl=timedelta(days=1), clock=clock
    )

    store = verification.Store([a.root])
    for subject in (
        verification.DNSName("localhost"),
        verification.IPAddress(ipaddress.ip_address("127.0.0.1")),
    ):
        verifier = (
            verification.PolicyBuilder()
            .store(store)
            .time(datetime.fromtimestamp(T0, UTC))
            .build_server_verifier(subject)
        )
        chain = verifier.verify(cert, a.untrusted_chain)
        assert chain[-1] == a.root
