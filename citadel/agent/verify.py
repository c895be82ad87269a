"""Check what the CA sent back before a single byte of it is used.

A certificate chain from the CA is only as good as this check: the leaf must carry *our*
public key (or the key we write would not match it), the chain must verify to the trust
bundle with an independent validator (cryptography's ``x509.verification``), and the leaf
must name exactly one SPIFFE ID — the one we expected, when we could tell.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.x509.verification import PolicyBuilder, Store, VerificationError

from citadel.agent.keys import PrivateKey, key_pem
from citadel.errors import CitadelError, InvalidSpiffeId
from citadel.spiffe import SpiffeId, TrustDomain

__all__ = ["BadResponse", "Svid", "certs_pem", "load_pem_certs", "verify_chain"]

_PUB = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)


class BadResponse(CitadelError):
    """The CA answered, but with something we must not use."""

    status = "INTERNAL"
    reason = "bad_ca_response"


@dataclass(frozen=True, slots=True)
class Svid:
    """A verified X509-SVID together with its private key."""

    spiffe_id: SpiffeId
    leaf: x509.Certificate
    intermediates: tuple[x509.Certificate, ...]
    key: PrivateKey

    @property
    def not_before(self) -> datetime:
        return self.leaf.not_valid_before_utc

    @property
    def not_after(self) -> datetime:
        return self.leaf.not_valid_after_utc

    @property
    def serial(self) -> int:
        return self.leaf.serial_number

    @property
    def lifetime_seconds(self) -> float:
        return (self.not_after - self.not_before).total_seconds()

    def chain_pem(self) -> bytes:
        """Leaf then intermediates: what ``svid.pem`` and Envoy's certificate_chain hold."""
        return certs_pem((self.leaf, *self.intermediates))

    def key_pem(self) -> bytes:
        return key_pem(self.key)

    def expired(self, now: datetime) -> bool:
        return now >= self.not_after


def certs_pem(certs: Sequence[x509.Certificate]) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def load_pem_certs(data: bytes | str, *, what: str) -> list[x509.Certificate]:
    raw = data.encode() if isinstance(data, str) else data
    try:
        certs = x509.load_pem_x509_certificates(raw)
    except ValueError as exc:
        raise BadResponse(f"{what} is not valid PEM certificates: {exc}") from None
    if not certs:
        raise BadResponse(f"{what} holds no certificate")
    return certs


def _is_self_signed(cert: x509.Certificate) -> bool:
    if cert.subject != cert.issuer:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def verify_chain(
    *,
    cert_chain: Sequence[str],
    key: PrivateKey,
    roots: Sequence[x509.Certificate],
    trust_domain: TrustDomain,
    expected_id: SpiffeId | None,
    now: datetime | None = None,
) -> Svid:
    """Turn Istio's ``cert_chain`` (leaf first, root last) into a verified ``Svid``."""
    if not cert_chain:
        raise BadResponse("the CA returned an empty certificate chain")
    if not roots:
        raise BadResponse("no trust anchors to verify the CA's answer with")
    certs: list[x509.Certificate] = []
    for i, pem in enumerate(cert_chain):
        certs.extend(load_pem_certs(pem, what=f"cert_chain[{i}]"))
    leaf, rest = certs[0], certs[1:]
    # The root is not part of the SVID chain; it lives in the bundle.
    intermediates = [c for c in rest if not _is_self_signed(c)]

    if leaf.public_key().public_bytes(*_PUB) != key.public_key().public_bytes(*_PUB):
        raise BadResponse("the certificate's public key is not the key this agent generated")

    try:
        basic = leaf.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        raise BadResponse("the leaf has no basicConstraints extension") from None
    if basic.ca:
        raise BadResponse("the leaf is a CA certificate")

    try:
        san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        raise BadResponse("the leaf has no subjectAltName, so no SPIFFE ID") from None
    uris = san.get_values_for_type(x509.UniformResourceIdentifier)
    if len(uris) != 1:
        raise BadResponse(f"the leaf must carry exactly one URI SAN, it has {len(uris)}")
    try:
        spiffe_id = SpiffeId(uris[0])
    except InvalidSpiffeId as exc:
        raise BadResponse(f"the leaf's URI SAN is not a SPIFFE ID: {exc.message}") from None
    if not spiffe_id.path:
        raise BadResponse("the leaf's SPIFFE ID has no path")
    if not spiffe_id.member_of(trust_domain):
        raise BadResponse(f"the leaf's SPIFFE ID {spiffe_id} is not in trust domain {trust_domain}")
    if expected_id is not None and spiffe_id != expected_id:
        raise BadResponse(f"the CA issued {spiffe_id}, but this agent expected {expected_id}")

    at = now or datetime.now(UTC)
    verifier = PolicyBuilder().store(Store(list(roots))).time(at).build_client_verifier()
    try:
        verifier.verify(leaf, intermediates)
    except VerificationError as exc:
        raise BadResponse(f"the certificate chain does not verify to the bundle: {exc}") from None
    return Svid(spiffe_id=spiffe_id, leaf=leaf, intermediates=tuple(intermediates), key=key)
