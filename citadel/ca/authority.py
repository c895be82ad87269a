"""The signing authority: Istio's plugged-CA ``cacerts`` layout, created or validated.

Four files, named exactly as Istio names them so a team's existing ``cacerts`` Secret can
be mounted unchanged: ``root-cert.pem`` (the trust anchor), ``ca-cert.pem`` (the signing
certificate), ``ca-key.pem`` (its key, mode 0600) and ``cert-chain.pem`` (the signing
certificate, any further intermediates, then usually the root).

Loading is strict on purpose: a CA that starts with a key that does not match its
certificate, a chain that does not verify, or a signing certificate that may not sign,
would only fail later, per request, in a way nobody can act on. Everything is checked
once here and refused with a message naming the file and the fix.
"""

from __future__ import annotations

import contextlib
import hmac
import ipaddress
import itertools
import os
import stat
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from citadel.errors import AuthorityError, InvalidSpiffeId
from citadel.spiffe import SpiffeId, TrustDomain

__all__ = [
    "CA_CERT",
    "CA_KEY",
    "CERT_CHAIN",
    "KEY_TYPES",
    "ROOT_CERT",
    "Authority",
    "PrivateKey",
    "cacerts_dir",
    "check_key_file_mode",
    "end_entity_key_usage",
    "generate_key",
    "init_authority",
    "key_type_of",
    "load_authority",
    "load_or_init_authority",
    "signature_hash",
]

ROOT_CERT: Final = "root-cert.pem"
CA_CERT: Final = "ca-cert.pem"
CA_KEY: Final = "ca-key.pem"
CERT_CHAIN: Final = "cert-chain.pem"
LAYOUT: Final = (ROOT_CERT, CA_CERT, CA_KEY, CERT_CHAIN)

KEY_TYPES: Final = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096")
DEFAULT_ROOT_TTL: Final = timedelta(days=3650)
DEFAULT_INTERMEDIATE_TTL: Final = timedelta(days=365)
#: Below this remaining lifetime the signing certificate is refused at load.
DEFAULT_MIN_REMAINING: Final = timedelta(hours=1)

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
Clock = Callable[[], float]


def cacerts_dir(state_dir: str | Path) -> Path:
    """Where the layout lives for a state directory.

    ``DIR/cacerts`` normally; ``DIR`` itself when it already holds the layout (a mounted
    ``cacerts`` Secret passed directly as the state directory).
    """
    base = Path(state_dir)
    if not (base / "cacerts").exists() and (base / CA_CERT).exists():
        return base
    return base / "cacerts"


# ------------------------------------------------------------------------------ keys


def generate_key(key_type: str) -> PrivateKey:
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type in ("rsa-2048", "rsa-3072", "rsa-4096"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    raise AuthorityError(f"unknown key type {key_type!r}; choose one of {', '.join(KEY_TYPES)}")


def key_type_of(key: object) -> str:
    """``ec-p256``-style name of a public or private key (``other`` when unsupported)."""
    if isinstance(key, ec.EllipticCurvePublicKey | ec.EllipticCurvePrivateKey):
        return {"secp256r1": "ec-p256", "secp384r1": "ec-p384", "secp521r1": "ec-p521"}.get(
            key.curve.name, f"ec-{key.curve.name}"
        )
    if isinstance(key, rsa.RSAPublicKey | rsa.RSAPrivateKey):
        return f"rsa-{key.key_size}"
    return "other"


def signature_hash(key: PrivateKey) -> hashes.HashAlgorithm:
    """The hash a key signs with: SHA-384 for P-384, SHA-256 otherwise (Web PKI pairs)."""
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1":
        return hashes.SHA384()
    return hashes.SHA256()


def _spki(key: object) -> bytes:
    return key.public_bytes(  # type: ignore[attr-defined]
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


# ------------------------------------------------------------------------------ the value


@dataclass(frozen=True, eq=False)
class Authority:
    """A validated signing identity, with what every issuance needs precomputed."""

    trust_domain: TrustDomain
    root: x509.Certificate
    #: ``ca-cert.pem``: the certificate that signs leaves.
    signing_cert: x509.Certificate
    key: PrivateKey
    #: Certificates between the signing certificate and the root (often none).
    intermediates: tuple[x509.Certificate, ...] = ()
    directory: Path | None = None
    #: PEM of signing cert, intermediates, root: appended after each leaf in responses.
    chain_pem: tuple[str, ...] = field(init=False)
    root_pem: str = field(init=False)
    hash_algorithm: hashes.HashAlgorithm = field(init=False)
    authority_key_identifier: x509.AuthorityKeyIdentifier = field(init=False)

    def __post_init__(self) -> None:
        pem = [
            c.public_bytes(serialization.Encoding.PEM).decode()
            for c in (self.signing_cert, *self.intermediates, self.root)
        ]
        object.__setattr__(self, "chain_pem", tuple(pem))
        object.__setattr__(self, "root_pem", pem[-1])
        object.__setattr__(self, "hash_algorithm", signature_hash(self.key))
        try:
            ski = self.signing_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
            aki = x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski.value)
        except x509.ExtensionNotFound:
            aki = x509.AuthorityKeyIdentifier.from_issuer_public_key(
                self.signing_cert.public_key()  # type: ignore[arg-type]
            )
        object.__setattr__(self, "authority_key_identifier", aki)

    @property
    def not_after(self) -> datetime:
        """The earliest expiry along the chain: no leaf may outlive it."""
        return min(
            c.not_valid_after_utc for c in (self.signing_cert, *self.intermediates, self.root)
        )

    @property
    def key_type(self) -> str:
        return key_type_of(self.key)

    @property
    def untrusted_chain(self) -> list[x509.Certificate]:
        """Everything a verifier needs besides the trust anchor."""
        return [self.signing_cert, *self.intermediates]

    def remaining(self, now: datetime) -> timedelta:
        return self.not_after - now

    def issue_serving_certificate(
        self,
        *,
        dns_names: Sequence[str],
        key: PrivateKey,
        ttl: timedelta,
        clock: Clock = time.time,
    ) -> x509.Certificate:
        """A TLS server certificate for the CA's own endpoint (names that are IPs become
        IP SANs). It is no SVID: it proves the endpoint, not a workload."""
        if not dns_names:
            raise AuthorityError("the serving certificate needs at least one DNS name or IP")
        sans: list[x509.GeneralName] = []
        for name in dns_names:
            try:
                sans.append(x509.IPAddress(ipaddress.ip_address(name)))
            except ValueError:
                sans.append(x509.DNSName(name))
        now = datetime.fromtimestamp(clock(), UTC)
        not_after = min(now + ttl, self.not_after)
        builder = (
            x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "citadel CA")]))
            .issuer_name(self.signing_cert.subject)
            .public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - timedelta(minutes=1))
            .not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(
                end_entity_key_usage(rsa_key=isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey)),
                critical=True,
            )
            .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
            .add_extension(x509.SubjectAlternativeName(sans), critical=False)
            .add_extension(
                x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
            )
            .add_extension(self.authority_key_identifier, critical=False)
        )
        return builder.sign(self.key, self.hash_algorithm)


def end_entity_key_usage(*, rsa_key: bool) -> x509.KeyUsage:
    """Key usage of every leaf citadel signs (SVIDs and its own serving certificate):
    digitalSignature, plus keyEncipherment only for RSA keys (SPIFFE X509-SVID, Istio)."""
    return x509.KeyUsage(
        digital_signature=True,
        content_commitment=False,
        key_encipherment=rsa_key,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=False,
        crl_sign=False,
        encipher_only=False,
        decipher_only=False,
    )


_CA_KEY_USAGE: Final = x509.KeyUsage(
    digital_signature=True,
    content_commitment=False,
    key_encipherment=False,
    data_encipherment=False,
    key_agreement=False,
    key_cert_sign=True,
    crl_sign=True,
    encipher_only=False,
    decipher_only=False,
)


# ------------------------------------------------------------------------------ init


def _ca_builder(
    *,
    subject: x509.Name,
    issuer: x509.Name,
    public_key: object,
    issuer_public_key: object,
    trust_domain: TrustDomain,
    not_before: datetime,
    not_after: datetime,
    path_length: int | None,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)  # type: ignore[arg-type]
        .serial_number(x509.random_serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(public_key),  # type: ignore[arg-type]
            critical=False,
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_public_key),  # type: ignore[arg-type]
            critical=False,
        )
        .add_extension(
            x509.SubjectAlternativeName([x509.UniformResourceIdentifier(str(trust_domain.id))]),
            critical=False,
        )
    )


def _name(common_name: str, trust_domain: TrustDomain) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "citadel"),
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, trust_domain.name[:64]),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write(path: Path, data: bytes, mode: int) -> None:
    """Write atomically (temp file + rename) so a crash never leaves half a key."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise


def init_authority(
    directory: str | Path,
    *,
    trust_domain: TrustDomain | str,
    key_type: str = "ec-p256",
    root_ttl: timedelta = DEFAULT_ROOT_TTL,
    intermediate_ttl: timedelta = DEFAULT_INTERMEDIATE_TTL,
    clock: Clock = time.time,
    passphrase: bytes | None = None,
) -> Authority:
    """Create a self-signed root and a signing intermediate in ``directory``.

    Refuses to touch a directory that already holds any of the four files: replacing a
    CA's keys silently would orphan every certificate it issued. With ``passphrase`` the
    key is written as encrypted PKCS#8 (cryptography's best available scheme), so a copy
    of the file alone (a backup, a leaked Secret) does not give the key away.
    """
    if passphrase is not None and not passphrase:
        raise AuthorityError("the key passphrase is empty")
    td = trust_domain if isinstance(trust_domain, TrustDomain) else TrustDomain(trust_domain)
    if key_type not in KEY_TYPES:
        raise AuthorityError(f"unknown key type {key_type!r}; choose one of {', '.join(KEY_TYPES)}")
    out = Path(directory)
    present = [n for n in LAYOUT if (out / n).exists()]
    if present:
        raise AuthorityError(
            f"{out} already holds {', '.join(present)}; refusing to overwrite a CA "
            "(use it as is, or remove the directory to start over)"
        )
    out.mkdir(parents=True, exist_ok=True, mode=0o700)
    now = datetime.fromtimestamp(clock(), UTC).replace(microsecond=0)
    root_key = generate_key(key_type)
    root_name = _name("citadel root CA", td)
    root = _ca_builder(
        subject=root_name,
        issuer=root_name,
        public_key=root_key.public_key(),
        issuer_public_key=root_key.public_key(),
        trust_domain=td,
        not_before=now - timedelta(minutes=5),
        not_after=now + root_ttl,
        path_length=None,
    ).sign(root_key, signature_hash(root_key))
    ca_key = generate_key(key_type)
    ca = _ca_builder(
        subject=_name("citadel intermediate CA", td),
        issuer=root_name,
        public_key=ca_key.public_key(),
        issuer_public_key=root_key.public_key(),
        trust_domain=td,
        not_before=now - timedelta(minutes=5),
        not_after=min(now + intermediate_ttl, root.not_valid_after_utc),
        path_length=0,
    ).sign(root_key, signature_hash(root_key))
    del root_key  # the root key is never stored: the intermediate does all signing

    pem = serialization.Encoding.PEM
    encryption: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase)
        if passphrase
        else serialization.NoEncryption()
    )
    key_pem = ca_key.private_bytes(pem, serialization.PrivateFormat.PKCS8, encryption)
    _write(out / CA_KEY, key_pem, 0o600)
    del key_pem
    _write(out / ROOT_CERT, root.public_bytes(pem), 0o644)
    _write(out / CA_CERT, ca.public_bytes(pem), 0o644)
    _write(out / CERT_CHAIN, ca.public_bytes(pem) + root.public_bytes(pem), 0o644)
    return load_authority(out, trust_domain=td, clock=clock, passphrase=passphrase)


# ------------------------------------------------------------------------------ load


def _read_certs(path: Path) -> list[x509.Certificate]:
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise AuthorityError(f"{path} is missing") from None
    except OSError as exc:
        raise AuthorityError(f"{path} cannot be read: {exc.strerror}") from None
    try:
        certs = x509.load_pem_x509_certificates(data)
    except ValueError:
        raise AuthorityError(f"{path} does not hold PEM certificates") from None
    return certs


#: Group read: what Kubernetes gives Secret files when the pod sets ``fsGroup``.
_GROUP_READ: Final = 0o040


def check_key_file_mode(path: Path, *, allow_group_readable: bool = False) -> None:
    """Refuse a key file others could read or anyone but its owner could write.

    A mounted Kubernetes Secret with ``fsGroup`` is group-readable (``defaultMode: 0440``)
    and cannot be made 0600; ``allow_group_readable`` accepts exactly that one extra bit,
    never "other" bits, group write or execute.
    """
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise AuthorityError(f"{path} is missing") from None
    extra = st.st_mode & 0o077
    allowed = _GROUP_READ if allow_group_readable else 0
    if extra & ~allowed:
        mode = stat.filemode(st.st_mode)
        if extra & ~_GROUP_READ or allow_group_readable:
            fix = f"chmod 600 {path} (a Kubernetes Secret: defaultMode 0400, or 0440 with fsGroup)"
        else:
            fix = (
                f"chmod 600 {path}, or, for a Kubernetes Secret mounted group-readable "
                "(fsGroup, defaultMode 0440), pass --allow-group-readable-key"
            )
        raise AuthorityError(
            f"{path} is accessible by group or others (mode {mode}); restrict it with: {fix}"
        )


def _check_key_file(
    path: Path, *, allow_group_readable: bool = False, passphrase: bytes | None = None
) -> PrivateKey:
    check_key_file_mode(path, allow_group_readable=allow_group_readable)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise AuthorityError(f"{path} cannot be read: {exc.strerror}") from None
    encrypted = b"ENCRYPTED" in data
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError:
        # cryptography's own wording says which way round; ours adds the fix.
        if passphrase is None:
            raise AuthorityError(
                f"{path} is encrypted; give its passphrase with --key-passphrase-file FILE "
                "or --key-passphrase-env NAME"
            ) from None
        raise AuthorityError(
            f"{path} is not encrypted, but a passphrase was given; drop the passphrase "
            "option, or re-create the CA with one"
        ) from None
    except ValueError:
        if passphrase is not None and encrypted:
            raise AuthorityError(
                f"{path} could not be decrypted: the passphrase is wrong"
            ) from None
        raise AuthorityError(
            f"{path} is not an unencrypted PEM private key (PKCS#8, PKCS#1 or SEC1) "
            "nor an encrypted PKCS#8 one"
        ) from None
    finally:
        del data
    if key_type_of(key) not in KEY_TYPES:
        raise AuthorityError(
            f"{path} holds a {key_type_of(key)} key; supported: {', '.join(KEY_TYPES)}"
        )
    return key  # type: ignore[return-value]


def _check_ca(cert: x509.Certificate, label: str, *, path_len_zero_ok: bool = True) -> None:
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints)
    except x509.ExtensionNotFound:
        raise AuthorityError(f"{label} has no basicConstraints; it is not a CA") from None
    if not bc.value.ca:
        raise AuthorityError(f"{label} has basicConstraints CA=false; it cannot sign")
    if not bc.critical:
        raise AuthorityError(f"{label}: basicConstraints must be critical on a CA")
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage)
    except x509.ExtensionNotFound:
        raise AuthorityError(f"{label} has no keyUsage; a CA needs critical keyCertSign") from None
    if not ku.value.key_cert_sign:
        raise AuthorityError(f"{label}: keyUsage lacks keyCertSign; it may not sign certificates")
    if not ku.critical:
        raise AuthorityError(f"{label}: keyUsage must be critical on a CA")


def _spiffe_ids(cert: x509.Certificate) -> list[str]:
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    except x509.ExtensionNotFound:
        return []
    return [u for u in san.value.get_values_for_type(x509.UniformResourceIdentifier)]


def _issued_by(child: x509.Certificate, parent: x509.Certificate, what: str) -> None:
    try:
        child.verify_directly_issued_by(parent)
    except (ValueError, TypeError, InvalidSignature) as exc:
        raise AuthorityError(f"{what}: {exc or 'signature does not verify'}") from None


def load_authority(
    directory: str | Path,
    *,
    trust_domain: TrustDomain | str | None = None,
    clock: Clock = time.time,
    min_remaining: timedelta = DEFAULT_MIN_REMAINING,
    allow_group_readable_key: bool = False,
    passphrase: bytes | None = None,
) -> Authority:
    """Load and validate a ``cacerts`` directory; raise ``AuthorityError`` naming the flaw.

    The trust domain comes from the signing certificate's ``spiffe://TD`` URI SAN when
    present; a team's intermediate without one needs ``trust_domain`` passed explicitly.
    ``ca-key.pem`` must be private to its owner (``allow_group_readable_key`` also accepts
    group read, for Secrets mounted with ``fsGroup``) and is decrypted with ``passphrase``
    when it is encrypted PKCS#8.
    """
    base = Path(directory)
    if not base.is_dir():
        raise AuthorityError(f"{base} does not exist; create it with: citadel ca init")
    missing = [n for n in LAYOUT if not (base / n).exists()]
    if missing:
        raise AuthorityError(
            f"{base} is not a complete cacerts directory: missing {', '.join(missing)}"
        )
    key = _check_key_file(
        base / CA_KEY, allow_group_readable=allow_group_readable_key, passphrase=passphrase
    )
    roots = _read_certs(base / ROOT_CERT)
    if len(roots) != 1:
        raise AuthorityError(f"{base / ROOT_CERT} must hold exactly one certificate")
    root = roots[0]
    signing = _read_certs(base / CA_CERT)
    if len(signing) != 1:
        raise AuthorityError(f"{base / CA_CERT} must hold exactly one certificate")
    ca = signing[0]
    chain = _read_certs(base / CERT_CHAIN)
    if chain[0] != ca:
        raise AuthorityError(f"{base / CERT_CHAIN} must start with the certificate in {CA_CERT}")
    middle = chain[1:]
    if middle and middle[-1] == root:
        middle = middle[:-1]
    if root in middle:
        raise AuthorityError(f"{base / CERT_CHAIN}: the root may only appear last")

    if not hmac.compare_digest(_spki(key.public_key()), _spki(ca.public_key())):
        raise AuthorityError(f"{base / CA_KEY} does not match the public key of {CA_CERT}")

    _check_ca(root, ROOT_CERT)
    _issued_by(root, root, f"{ROOT_CERT} is not self-signed")
    _check_ca(ca, CA_CERT)
    path = [ca, *middle, root]
    for child, parent in itertools.pairwise(path):
        _issued_by(child, parent, f"{CERT_CHAIN} does not verify up to {ROOT_CERT}")
    for cert in middle:
        _check_ca(cert, f"an intermediate in {CERT_CHAIN}")

    now = datetime.fromtimestamp(clock(), UTC)
    for cert, label in ((root, ROOT_CERT), (ca, CA_CERT), *((m, CERT_CHAIN) for m in middle)):
        if cert.not_valid_before_utc > now:
            raise AuthorityError(
                f"{label} is not valid until {cert.not_valid_before_utc.isoformat()} "
                "(check the clock)"
            )
        if cert.not_valid_after_utc <= now:
            raise AuthorityError(f"{label} expired at {cert.not_valid_after_utc.isoformat()}")

    td = _resolve_trust_domain(ca, root, trust_domain)
    authority = Authority(
        trust_domain=td,
        root=root,
        signing_cert=ca,
        key=key,
        intermediates=tuple(middle),
        directory=base,
    )
    left = authority.remaining(now)
    if left < min_remaining:
        raise AuthorityError(
            f"the CA chain expires at {authority.not_after.isoformat()}, in {left}; "
            f"at least {min_remaining} must remain (rotate {CA_CERT})"
        )
    return authority


def _resolve_trust_domain(
    ca: x509.Certificate, root: x509.Certificate, wanted: TrustDomain | str | None
) -> TrustDomain:
    declared: TrustDomain | None = None
    for cert in (ca, root):
        for uri in _spiffe_ids(cert):
            if not uri.startswith("spiffe://"):
                continue
            try:
                sid = SpiffeId(uri)
            except InvalidSpiffeId as exc:
                raise AuthorityError(f"signing chain carries an invalid SPIFFE ID: {exc}") from None
            if sid.path:
                raise AuthorityError(
                    f"a signing certificate's SPIFFE ID must have no path (found {uri})"
                )
            declared = sid.trust_domain
            break
        if declared is not None:
            break
    if wanted is not None:
        td = wanted if isinstance(wanted, TrustDomain) else TrustDomain(wanted)
        if declared is not None and declared != td:
            raise AuthorityError(
                f"{CA_CERT} is for trust domain {declared.name!r}, not {td.name!r}"
            )
        return td
    if declared is None:
        raise AuthorityError(
            f"{CA_CERT} carries no spiffe:// URI SAN; pass the trust domain explicitly"
        )
    return declared


def load_or_init_authority(
    directory: str | Path,
    *,
    trust_domain: TrustDomain | str,
    key_type: str = "ec-p256",
    clock: Clock = time.time,
    passphrase: bytes | None = None,
) -> tuple[Authority, bool]:
    """Reuse a valid layout or create one when the directory has none. ``(authority, created)``."""
    base = Path(directory)
    if any((base / n).exists() for n in LAYOUT):
        return load_authority(
            base, trust_domain=trust_domain, clock=clock, passphrase=passphrase
        ), False
    created = init_authority(
        base, trust_domain=trust_domain, key_type=key_type, clock=clock, passphrase=passphrase
    )
    return created, True
