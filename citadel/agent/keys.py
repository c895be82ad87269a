"""Workload keys and CSRs, made in memory and never written anywhere but the output set.

The CSR carries the SPIFFE ID the agent *expects* (read from the token's claims without
verifying them — the CA derives the real identity from the verified token and refuses a CSR
that disagrees), so a misconfigured pod fails loudly at the CA instead of receiving an
identity it did not expect. A token that is not a JWT yields a CSR with no SAN at all.
"""

from __future__ import annotations

import base64
import binascii
import enum
import json
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from citadel.errors import InvalidSpiffeId
from citadel.spiffe import SpiffeId, TrustDomain

__all__ = [
    "KeyType",
    "PrivateKey",
    "build_csr",
    "expected_spiffe_id",
    "generate_key",
    "key_pem",
    "token_claims_unverified",
]

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

_SA_PREFIX = "system:serviceaccount:"


class KeyType(enum.StrEnum):
    EC_P256 = "ec-p256"
    EC_P384 = "ec-p384"
    RSA_2048 = "rsa-2048"


def generate_key(key_type: KeyType) -> PrivateKey:
    match KeyType(key_type):
        case KeyType.EC_P256:
            return ec.generate_private_key(ec.SECP256R1())
        case KeyType.EC_P384:
            return ec.generate_private_key(ec.SECP384R1())
        case KeyType.RSA_2048:
            return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    raise ValueError(f"unsupported key type {key_type!r}")  # pragma: no cover


def key_pem(key: PrivateKey) -> bytes:
    """PKCS#8, unencrypted: what Envoy and most TLS stacks load without options."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def build_csr(*, key: PrivateKey, spiffe_id: SpiffeId | None) -> bytes:
    """A PEM CSR with an empty subject and, when known, exactly one URI SAN."""
    builder = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if spiffe_id is not None:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))]),
            critical=True,
        )
    algorithm = (
        hashes.SHA384()
        if isinstance(key, ec.EllipticCurvePrivateKey) and isinstance(key.curve, ec.SECP384R1)
        else hashes.SHA256()
    )
    csr = builder.sign(key, algorithm)
    return csr.public_bytes(serialization.Encoding.PEM)


def token_claims_unverified(token: str) -> dict[str, Any] | None:
    """The JWT payload, NOT verified: only a hint for the CSR. ``None`` if not a JWT."""
    parts = token.strip().split(".")
    if len(parts) != 3:
        return None
    payload = parts[1]
    try:
        raw = base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4))
        claims = json.loads(raw)
    except (binascii.Error, ValueError, UnicodeDecodeError):
        return None
    return claims if isinstance(claims, dict) else None


def expected_spiffe_id(token: str, trust_domain: TrustDomain) -> SpiffeId | None:
    """``spiffe://<td>/ns/<ns>/sa/<sa>`` from the token's claims, or ``None`` if unknowable.

    The ``kubernetes.io`` claim and ``sub`` must agree when both are present; a token whose
    claims contradict each other gives no hint (the CA will judge it).
    """
    claims = token_claims_unverified(token)
    if claims is None:
        return None
    from_sub: tuple[str, str] | None = None
    sub = claims.get("sub")
    if isinstance(sub, str) and sub.startswith(_SA_PREFIX):
        parts = sub[len(_SA_PREFIX) :].split(":")
        if len(parts) == 2 and all(parts):
            from_sub = (parts[0], parts[1])
    from_k8s: tuple[str, str] | None = None
    k8s = claims.get("kubernetes.io")
    if isinstance(k8s, dict):
        ns = k8s.get("namespace")
        sa = k8s.get("serviceaccount")
        sa_name = sa.get("name") if isinstance(sa, dict) else None
        if isinstance(ns, str) and isinstance(sa_name, str) and ns and sa_name:
            from_k8s = (ns, sa_name)
    if from_sub and from_k8s and from_sub != from_k8s:
        return None
    pair = from_k8s or from_sub
    if pair is None:
        return None
    try:
        return trust_domain.workload(*pair)
    except InvalidSpiffeId:
        return None
