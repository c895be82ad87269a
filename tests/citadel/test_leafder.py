"""The DER leaf template: byte for byte what ``CertificateBuilder`` makes, or not used."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from citadel.ca.authority import Authority, init_authority
from citadel.ca.issuance import Issuer
from citadel.ca.leafder import children, pem_certificate
from citadel.ca.tokens import Caller

T0 = datetime(2030, 1, 1, tzinfo=UTC).timestamp()
CALLER = Caller(
    namespace="default", service_account="web", subject="system:serviceaccount:default:web"
)
LEAF_KEYS = {
    "ec-p256": ec.generate_private_key(ec.SECP256R1()),
    "ec-p384": ec.generate_private_key(ec.SECP384R1()),
    "rsa-2048": rsa.generate_private_key(public_exponent=65537, key_size=2048),
}


def _csr(key: object) -> bytes:
    return (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())  # type: ignore[arg-type]
        .public_bytes(serialization.Encoding.PEM)
    )


@pytest.fixture(scope="module", params=["ec-p256", "ec-p384", "rsa-2048"])
def authority(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Authority:
    return init_authority(
        tmp_path_factory.mktemp("ca") / "cacerts",
        trust_domain="cluster.local",
        key_type=request.param,
        clock=lambda: T0,
    )


def test_template_is_adopted_for_every_supported_authority_key(authority: Authority) -> None:
    iss = Issuer(authority, clock=lambda: T0)
    assert iss.template_reason is None and iss._template is not None


@pytest.mark.parametrize("leaf_key", list(LEAF_KEYS), ids=list(LEAF_KEYS))
@pytest.mark.parametrize(
    "serial",
    [1, 0x7F, 0x80, 0xFF, 0x100, (1 << 151) + 5, (1 << 158) + 1, (1 << 159) - 1],
    ids=["one", "7f", "80-top-bit", "ff", "two-bytes", "19-bytes-top-bit", "159-bit", "max"],
)
def test_template_tbs_is_the_builders_byte_for_byte(
    authority: Authority, leaf_key: str, serial: int
) -> None:
    iss = Issuer(authority, clock=lambda: T0)
    template = iss._template
    assert template is not None
    _, san, san_der = iss._identity(CALLER)
    public_key = LEAF_KEYS[leaf_key].public_key()
    rsa_key = leaf_key.startswith("rsa")
    nb = datetime.fromtimestamp(T0, UTC) - timedelta(seconds=30)
    na = datetime.fromtimestamp(T0, UTC) + timedelta(hours=1)
    typed = iss._typed_leaf(public_key, rsa_key, san, serial, nb, na)
    mine = template.tbs(
        serial=serial, not_before=nb, not_after=na, public_key=public_key, rsa_key=rsa_key,
        san=san_der,
    )  # fmt: skip
    assert mine == typed.tbs_certificate_bytes
    # The whole certificate: same TBS, same algorithm, a signature the issuer's key made.
    leaf = x509.load_der_x509_certificate(template.sign(mine))
    assert leaf.tbs_certificate_bytes == typed.tbs_certificate_bytes
    assert leaf.signature_algorithm_oid == typed.signature_algorithm_oid
    leaf.verify_directly_issued_by(authority.signing_cert)


@pytest.mark.parametrize(
    "not_after",
    [
        datetime(2049, 12, 31, 23, 59, 59, tzinfo=UTC),
        datetime(2050, 1, 1, tzinfo=UTC),
        datetime(2123, 6, 7, 8, 9, 10, tzinfo=UTC),
    ],
    ids=["last-utctime", "first-generalizedtime", "far-generalizedtime"],
)
def test_template_encodes_times_as_the_builder_does(
    authority: Authority, not_after: datetime
) -> None:
    iss = Issuer(authority, clock=lambda: T0)
    template = iss._template
    assert template is not None
    _, san, san_der = iss._identity(CALLER)
    pk = LEAF_KEYS["ec-p256"].public_key()
    nb = datetime(2029, 12, 31, 23, 59, 30, tzinfo=UTC)
    typed = iss._typed_leaf(pk, False, san, 42, nb, not_after)
    mine = template.tbs(
        serial=42, not_before=nb, not_after=not_after, public_key=pk, rsa_key=False, san=san_der
    )
    assert mine == typed.tbs_certificate_bytes


@pytest.mark.parametrize("leaf_key", list(LEAF_KEYS), ids=list(LEAF_KEYS))
def test_issued_leaf_and_pem_are_what_the_builder_path_returns(
    authority: Authority, leaf_key: str
) -> None:
    """Same inputs through the template and through the builder: the same TBS, and the
    PEM is exactly ``public_bytes(PEM)`` of the certificate returned."""
    iss = Issuer(authority, clock=lambda: T0)
    csr = _csr(LEAF_KEYS[leaf_key])
    out = iss.issue(CALLER, csr, requested_ttl=3600)
    assert out.pem == out.certificate.public_bytes(serialization.Encoding.PEM).decode()
    assert pem_certificate(out.certificate.public_bytes(serialization.Encoding.DER)) == out.pem
    template, iss._template = iss._template, None  # the builder path, same serial and times
    try:
        _, san, _ = iss._identity(CALLER)
        typed = iss._typed_leaf(
            LEAF_KEYS[leaf_key].public_key(), leaf_key.startswith("rsa"), san, out.serial,
            out.not_before, out.not_after,
        )  # fmt: skip
        again = iss.issue(CALLER, csr, requested_ttl=3600)
    finally:
        iss._template = template
    assert typed.tbs_certificate_bytes == out.certificate.tbs_certificate_bytes
    assert list(again.certificate.extensions) == list(out.certificate.extensions)
    assert again.chain_pem[1:] == out.chain_pem[1:]


def test_pem_lines_match_cryptography_for_every_length() -> None:
    # ``public_bytes`` of real certificates is compared above; here, the line breaks.
    for n in (1, 47, 48, 49, 95, 96, 97, 300, 1000):
        pem = pem_certificate((bytes(range(256)) * 4)[:n])
        body = pem.splitlines()[1:-1]
        assert all(len(line) == 64 for line in body[:-1]) and 0 < len(body[-1]) <= 64
        assert pem.startswith("-----BEGIN CERTIFICATE-----\n")
        assert pem.endswith("\n-----END CERTIFICATE-----\n")


def test_children_refuses_what_is_not_one_sequence() -> None:
    assert children(b"\x30\x03\x02\x01\x05") == [b"\x02\x01\x05"]
    with pytest.raises(ValueError, match="SEQUENCE"):
        children(b"\x31\x00")
    with pytest.raises(ValueError, match="SEQUENCE"):
        children(b"\x30\x00\x00")


def test_fractional_validity_falls_back_to_the_builder(tmp_path: Path) -> None:
    """A backdate with a fraction of a second cannot be encoded by the template (DER
    times are whole seconds there); such an issuer uses the builder, and says why."""
    auth = init_authority(tmp_path / "c", trust_domain="cluster.local", clock=lambda: T0)
    iss = Issuer(auth, clock=lambda: T0, backdate=timedelta(seconds=1.5))
    assert iss._template is None and "whole seconds" in (iss.template_reason or "")
    out = iss.issue(CALLER, _csr(LEAF_KEYS["ec-p256"]))
    out.certificate.verify_directly_issued_by(auth.signing_cert)
