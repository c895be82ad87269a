"""CSR policy, leaf building and the self-check: what makes a certificate an X509-SVID.

The identity in a leaf comes only from the authenticated caller; the CSR contributes its
public key and nothing else. A CSR that *asks* for anything beyond that one identity
(another URI, a DNS name, an IP, an e-mail, a CA certificate) is refused rather than
silently trimmed, so a confused or malicious client learns exactly what was wrong.

Every leaf is then verified by an independent validator (cryptography's Web PKI
``x509.verification``) before it leaves the process: a CA that can emit a bad certificate
is worse than one that refuses. The whole chain is walked once at start; per leaf, the
verifier is anchored at the signing certificate and the chain's validity window is checked
explicitly, which proves what a per-leaf walk to the root proves for one ECDSA verification
instead of two (``_needs_full_chain`` says why, and when the full walk is kept).

Per-authority constants (issuer name, AKI, key-usage variants, verifier store) are built
once in ``Issuer.__init__``; per-identity ones (the validated SPIFFE ID and its SAN
extension) are memoised in a small bounded table, since renewals repeat identities; ``issue``
only does what must differ per leaf. Extensions whose value never changes between leaves
are handed to the builder as their DER (``_pre_encoded``): cryptography otherwise walks
each typed value through Python on every ``sign``, about a quarter of building a leaf. The
bytes are the same (a test compares the TBS), and the self-check parses them back with an
independent validator before any leaf leaves the process.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Final

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509 import verification
from cryptography.x509.oid import ExtendedKeyUsageOID

from citadel.ca.authority import Authority, end_entity_key_usage, key_type_of
from citadel.ca.tokens import Caller
from citadel.errors import AuthorityError, InvalidRequest, InvalidSpiffeId, PermissionDenied
from citadel.spiffe import SpiffeId

__all__ = [
    "DEFAULT_BACKDATE",
    "DEFAULT_TTL",
    "MAX_CSR_BYTES",
    "MAX_TTL",
    "SELF_CHECKS",
    "IssuedCertificate",
    "Issuer",
    "parse_csr",
]

DEFAULT_TTL: Final = timedelta(hours=1)
MAX_TTL: Final = timedelta(hours=24)
#: Absorbs clock skew between the CA and relying parties (SPIRE uses 10 s, Istio 2 min).
DEFAULT_BACKDATE: Final = timedelta(seconds=30)
#: A 4096-bit RSA CSR with one URI SAN is ~1.7 KiB of PEM; anything near this is abuse.
MAX_CSR_BYTES: Final = 8 * 1024

_PEM_BEGIN: Final = b"-----BEGIN CERTIFICATE REQUEST-----"
_PEM_END: Final = b"-----END CERTIFICATE REQUEST-----"
_EC_CURVES: Final = frozenset({"secp256r1", "secp384r1"})
#: Memoised identities (SPIFFE ID + SAN extension); cleared wholesale when full.
_IDENTITY_CACHE: Final = 4096
_RSA_BITS: Final = (2048, 4096)

Clock = Callable[[], float]


@dataclass(frozen=True, slots=True)
class IssuedCertificate:
    certificate: x509.Certificate
    spiffe_id: SpiffeId
    #: Leaf first, root last: Istio's ``cert_chain`` order.
    chain_pem: tuple[str, ...]
    serial: int
    not_before: datetime
    not_after: datetime
    key_type: str
    requested_ttl: int
    granted_ttl: int

    @property
    def pem(self) -> str:
        return self.chain_pem[0]


#: ``chain`` (default): the leaf is proven to chain to the root at issuance time, with one
#: ECDSA verification per leaf (see ``_needs_full_chain``). ``full``: the verifier walks
#: leaf -> root for every leaf (two or more verifications). ``issuer``: the leaf is
#: verified against the signing certificate only, whatever the certificates above carry.
SELF_CHECKS: Final = ("chain", "full", "issuer")
#: Extensions of a certificate above the signing one that constrain nothing about a leaf
#: (the verifier checks them against fixed inputs: depth, CA profile, the policy's EKU).
_LEAF_INDEPENDENT: Final = frozenset(
    {
        x509.BasicConstraints.oid,
        x509.KeyUsage.oid,
        x509.SubjectKeyIdentifier.oid,
        x509.AuthorityKeyIdentifier.oid,
        x509.SubjectAlternativeName.oid,
        x509.ExtendedKeyUsage.oid,
    }
)

_KU_EC: Final = end_entity_key_usage(rsa_key=False)
_KU_RSA: Final = end_entity_key_usage(rsa_key=True)
_EKU: Final = x509.ExtendedKeyUsage(
    [ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH]
)
_NOT_CA: Final = x509.BasicConstraints(ca=False, path_length=None)
_EMPTY_NAME: Final = x509.Name([])


def _pre_encoded(value: x509.ExtensionType, *, critical: bool) -> x509.Extension[Any]:
    """``value`` as an extension carrying its DER, which the builder copies as is."""
    return x509.Extension(
        value.oid, critical, x509.UnrecognizedExtension(value.oid, value.public_bytes())
    )


_EXT_NOT_CA: Final = _pre_encoded(_NOT_CA, critical=True)
_EXT_KU_EC: Final = _pre_encoded(_KU_EC, critical=True)
_EXT_KU_RSA: Final = _pre_encoded(_KU_RSA, critical=True)
_EXT_EKU: Final = _pre_encoded(_EKU, critical=False)


def _needs_full_chain(upper: tuple[x509.Certificate, ...]) -> str | None:
    """Why each leaf must be verified through the whole chain; ``None`` when it need not.

    Verifying leaf -> signing cert -> ... -> root for every leaf repeats work whose result
    cannot change between leaves: the signatures of the certificates above the leaf (the
    same immutable objects, proven once in ``__init__``), their CA profile and depth. What
    *can* change is (a) the time, covered per leaf by the chain's validity window in
    ``_self_check``, and (b) constraints a CA certificate places on its descendants' names
    (name constraints, policies). When any chain certificate carries an extension outside
    ``_LEAF_INDEPENDENT``, every leaf is walked to the root as before.
    """
    for cert in upper:
        for ext in cert.extensions:
            if ext.oid not in _LEAF_INDEPENDENT:
                name = cert.subject.rfc4514_string() or "a CA certificate"
                return f"{name} carries extension {ext.oid.dotted_string}"
    return None


def parse_csr(
    data: str | bytes, *, max_bytes: int = MAX_CSR_BYTES
) -> x509.CertificateSigningRequest:
    """Exactly one PEM ``CERTIFICATE REQUEST`` block, nothing around it, signature valid."""
    raw = data.encode("utf-8", "replace") if isinstance(data, str) else bytes(data)
    if not raw.strip():
        raise InvalidRequest(
            "the request carries no CSR (field 'csr' is empty)", reason="csr_missing"
        )
    if len(raw) > max_bytes:
        raise InvalidRequest(
            f"CSR is {len(raw)} bytes; at most {max_bytes} are accepted", reason="csr_too_large"
        )
    body = raw.strip()
    if not body.startswith(_PEM_BEGIN) or not body.endswith(_PEM_END):
        raise InvalidRequest(
            "CSR must be a single PEM block '-----BEGIN CERTIFICATE REQUEST-----' ... "
            "'-----END CERTIFICATE REQUEST-----' with nothing before or after it",
            reason="csr_malformed",
        )
    if body.count(b"-----BEGIN") != 1 or body.count(b"-----END") != 1:
        raise InvalidRequest("CSR must hold exactly one PEM block", reason="csr_malformed")
    try:
        csr = x509.load_pem_x509_csr(body)
    except (ValueError, x509.InvalidVersion, UnsupportedAlgorithm):  # InvalidVersion: fuzzing
        raise InvalidRequest("CSR is not a valid PKCS#10 request", reason="csr_malformed") from None
    try:
        valid = csr.is_signature_valid
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # A public key or signature algorithm that cannot even be loaded (found by fuzzing:
        # a damaged EC point raised ValueError here and became INTERNAL).
        raise InvalidRequest(
            "CSR public key or signature algorithm cannot be parsed", reason="csr_key"
        ) from None
    if not valid:
        raise InvalidRequest(
            "CSR signature does not verify with its own public key", reason="csr_signature"
        )
    return csr


def _check_key(csr: x509.CertificateSigningRequest) -> tuple[object, str]:
    try:
        key = csr.public_key()
    except (ValueError, TypeError):
        raise InvalidRequest("CSR public key cannot be parsed", reason="csr_key") from None
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in _EC_CURVES:
            raise InvalidRequest(
                f"CSR key is EC {key.curve.name}; only P-256 and P-384 are accepted",
                reason="csr_key",
            )
    elif isinstance(key, rsa.RSAPublicKey):
        if not _RSA_BITS[0] <= key.key_size <= _RSA_BITS[1]:
            raise InvalidRequest(
                f"CSR key is RSA-{key.key_size}; RSA keys must be 2048 to 4096 bits",
                reason="csr_key",
            )
    else:
        raise InvalidRequest(
            f"CSR key type {type(key).__name__.lstrip('_')} is not accepted; "
            "use EC P-256/P-384 or RSA 2048-4096",
            reason="csr_key",
        )
    return key, key_type_of(key)


def _describe(name: x509.GeneralName) -> str:
    kinds = {
        x509.DNSName: "DNS",
        x509.IPAddress: "IP",
        x509.RFC822Name: "e-mail",
        x509.UniformResourceIdentifier: "URI",
        x509.DirectoryName: "directory name",
        x509.RegisteredID: "registered ID",
        x509.OtherName: "other name",
    }
    value = str(getattr(name, "value", ""))
    if len(value) > 80:
        value = value[:80] + "..."
    return f"{kinds.get(type(name), type(name).__name__)} {value!r}"


def _check_extensions(csr: x509.CertificateSigningRequest, wanted: str) -> None:
    try:
        extensions = list(csr.extensions)
    except (ValueError, x509.DuplicateExtension, x509.UnsupportedGeneralNameType) as exc:
        raise InvalidRequest(
            f"CSR extensions cannot be parsed: {exc}", reason="csr_malformed"
        ) from None
    for ext in extensions:
        value = ext.value
        if isinstance(value, x509.BasicConstraints) and value.ca:
            raise InvalidRequest(
                "CSR requests a CA certificate (basicConstraints CA=true); "
                "workload certificates are never CAs",
                reason="csr_ca",
            )
        if isinstance(value, x509.SubjectAlternativeName):
            names = list(value)
            others = [
                n
                for n in names
                if not (isinstance(n, x509.UniformResourceIdentifier) and n.value == wanted)
            ]
            uris = [n for n in others if isinstance(n, x509.UniformResourceIdentifier)]
            if uris:
                raise PermissionDenied(
                    f"CSR asks for identity {_describe(uris[0])}, but the token authenticates "
                    f"{wanted}; leave the SAN out or request exactly that ID",
                    reason="csr_identity_mismatch",
                )
            if others:
                raise InvalidRequest(
                    f"CSR carries a {_describe(others[0])} SAN; only the caller's SPIFFE ID "
                    f"({wanted}) may be requested",
                    reason="csr_san",
                )
            if len(names) > 1:
                raise InvalidRequest(
                    "CSR repeats the SPIFFE ID SAN; request it once", reason="csr_san"
                )


class Issuer:
    """Signs X509-SVIDs for authenticated callers under one ``Authority``."""

    def __init__(
        self,
        authority: Authority,
        *,
        clock: Clock = time.time,
        default_ttl: timedelta = DEFAULT_TTL,
        max_ttl: timedelta = MAX_TTL,
        backdate: timedelta = DEFAULT_BACKDATE,
        max_csr_bytes: int = MAX_CSR_BYTES,
        self_check: str = "chain",
    ) -> None:
        """``self_check`` picks how each leaf is proven before it is returned (see
        ``SELF_CHECKS``); every mode verifies the whole chain once here, at start."""
        if default_ttl <= timedelta(0) or max_ttl <= timedelta(0):
            raise AuthorityError("TTLs must be positive")
        if default_ttl > max_ttl:
            raise AuthorityError(f"default TTL {default_ttl} exceeds max TTL {max_ttl}")
        if backdate < timedelta(0) or backdate > timedelta(minutes=10):
            raise AuthorityError("NotBefore backdate must be between 0 and 10 minutes")
        self.authority = authority
        self.trust_domain = authority.trust_domain
        self.default_ttl = default_ttl
        self.max_ttl = max_ttl
        self.backdate = backdate
        self.max_csr_bytes = max_csr_bytes
        self._clock = clock
        self._issuer_name = authority.signing_cert.subject
        self._aki = authority.authority_key_identifier
        self._ext_aki = _pre_encoded(self._aki, critical=False)
        self._key = authority.key
        self._hash = authority.hash_algorithm
        self._chain_tail = authority.chain_pem
        self._not_after = authority.not_after
        if self_check not in SELF_CHECKS:
            raise AuthorityError(f"self_check must be one of {', '.join(map(repr, SELF_CHECKS))}")
        self.self_check = self_check
        self._identities: dict[tuple[str, str], tuple[SpiffeId, x509.Extension[Any]]] = {}
        chain = (authority.signing_cert, *authority.intermediates, authority.root)
        #: Every chain certificate must be valid at the moment a leaf is issued.
        self._window = (
            max(c.not_valid_before_utc for c in chain),
            min(c.not_valid_after_utc for c in chain),
        )
        self._store = verification.Store([authority.root])
        self._untrusted = authority.untrusted_chain
        # Prove the whole bundle once, now: a broken layout fails at start, not per call.
        self._probe()
        #: Why the per-leaf check is not anchored at the signing certificate (None: it is).
        self.full_chain_reason = _needs_full_chain(chain) if self_check == "chain" else None
        if self_check == "full":
            self.full_chain_reason = "requested"
        if self.full_chain_reason is None:
            self._store = verification.Store([authority.signing_cert])
            self._untrusted = []

    def _probe(self) -> None:
        probe = ec.generate_private_key(ec.SECP256R1())
        csr = (
            x509.CertificateSigningRequestBuilder()
            .subject_name(_EMPTY_NAME)
            .sign(probe, self._hash)
            .public_bytes(serialization.Encoding.PEM)
        )
        caller = Caller(namespace="citadel-probe", service_account="probe", subject="probe")
        self.issue(caller, csr)

    # ------------------------------------------------------------------ policy

    def ttl_for(self, requested_seconds: int) -> timedelta:
        """0 means "the default"; a larger request is clamped to the maximum."""
        if requested_seconds < 0:
            raise InvalidRequest(
                f"validity_duration must be positive seconds or 0 for the default "
                f"(got {requested_seconds})",
                reason="bad_ttl",
            )
        if requested_seconds == 0:
            return self.default_ttl
        if requested_seconds >= self.max_ttl.total_seconds():
            return self.max_ttl
        return timedelta(seconds=requested_seconds)

    def spiffe_id_for(self, caller: Caller) -> SpiffeId:
        return self._identity(caller)[0]

    def _identity(self, caller: Caller) -> tuple[SpiffeId, x509.Extension[Any]]:
        """The caller's SPIFFE ID and the critical SAN extension naming it (memoised)."""
        key = (caller.namespace, caller.service_account)
        found = self._identities.get(key)
        if found is not None:
            return found
        try:
            spiffe_id = self.trust_domain.workload(caller.namespace, caller.service_account)
        except InvalidSpiffeId as exc:
            raise PermissionDenied(
                f"service account {caller.namespace}/{caller.service_account} does not form a "
                f"valid SPIFFE ID: {exc}",
                reason="invalid_identity",
            ) from None
        san = x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(spiffe_id))])
        found = (spiffe_id, _pre_encoded(san, critical=True))
        if len(self._identities) >= _IDENTITY_CACHE:
            self._identities.clear()
        self._identities[key] = found
        return found

    # ------------------------------------------------------------------ issuing

    def issue(
        self, caller: Caller, csr_pem: str | bytes, *, requested_ttl: int = 0
    ) -> IssuedCertificate:
        """Check the CSR against the caller, sign, self-check; raise a ``CitadelError``."""
        spiffe_id, san = self._identity(caller)
        ttl = self.ttl_for(requested_ttl)
        csr = parse_csr(csr_pem, max_bytes=self.max_csr_bytes)
        public_key, key_type = _check_key(csr)
        _check_extensions(csr, str(spiffe_id))

        now = datetime.fromtimestamp(int(self._clock()), UTC)
        not_before = now - self.backdate
        not_after = min(now + ttl, self._not_after)
        if not_after <= now:
            raise AuthorityError("the CA certificate has expired; rotate ca-cert.pem")
        serial = x509.random_serial_number()
        builder = x509.CertificateBuilder(
            issuer_name=self._issuer_name,
            subject_name=_EMPTY_NAME,
            public_key=public_key,  # type: ignore[arg-type]
            serial_number=serial,
            not_valid_before=not_before,
            not_valid_after=not_after,
            extensions=[
                _EXT_NOT_CA,
                _EXT_KU_RSA if key_type.startswith("rsa") else _EXT_KU_EC,
                _EXT_EKU,
                san,
                x509.Extension(
                    x509.SubjectKeyIdentifier.oid,
                    False,
                    x509.SubjectKeyIdentifier.from_public_key(public_key),  # type: ignore[arg-type]
                ),
                self._ext_aki,
            ],
        )
        leaf = builder.sign(self._key, self._hash)
        self._self_check(leaf, spiffe_id, now)
        pem = leaf.public_bytes(serialization.Encoding.PEM).decode()
        return IssuedCertificate(
            certificate=leaf,
            spiffe_id=spiffe_id,
            chain_pem=(pem, *self._chain_tail),
            serial=serial,
            not_before=not_before,
            not_after=not_after,
            key_type=key_type,
            requested_ttl=requested_ttl,
            granted_ttl=round((not_after - now).total_seconds()),
        )

    def _self_check(self, leaf: x509.Certificate, spiffe_id: SpiffeId, now: datetime) -> None:
        if not self._window[0] <= now <= self._window[1]:
            raise AuthorityError(
                "issued certificate failed self-verification: the CA chain is not valid at "
                f"{now.isoformat()} (valid {self._window[0].isoformat()} to "
                f"{self._window[1].isoformat()})"
            )
        verifier = verification.PolicyBuilder().store(self._store).time(now).build_client_verifier()
        try:
            verified = verifier.verify(leaf, self._untrusted)
        except verification.VerificationError as exc:
            raise AuthorityError(f"issued certificate failed self-verification: {exc}") from None
        subjects = verified.subjects or []
        if [getattr(s, "value", None) for s in subjects] != [str(spiffe_id)]:
            raise AuthorityError("issued certificate failed self-verification: wrong SAN")
