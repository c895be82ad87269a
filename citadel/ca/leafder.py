"""Leaf certificates assembled from DER pieces prepared once per authority.

``x509.CertificateBuilder.sign`` costs about three raw ECDSA signatures per leaf: it walks
every input through Python-level type checks, encodes names, times and extensions that
never change between leaves, signs, then parses the certificate it just produced. Almost
all of a leaf is the same for every caller of one authority (version, signature
algorithm, issuer, empty subject, the constant extensions); only the serial, the validity
window, the public key, the SAN and the SKI differ. ``LeafTemplate`` encodes the constant
parts once and concatenates the rest per leaf, then signs the TBS with the authority key
directly.

Nothing is trusted on faith: ``Issuer`` builds a reference leaf both ways at start and
keeps the template only when the TBS bytes are identical to the builder's (otherwise it
keeps using the builder and says why), and every leaf it returns still goes through the
independent validator of the self-check, which parses it from its DER.
"""

from __future__ import annotations

import binascii
import hashlib
from datetime import datetime
from typing import Any, Final

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

__all__ = ["LeafTemplate", "children", "extension_der", "pem_certificate"]

_SEQUENCE: Final = 0x30
_VERSION_3: Final = b"\xa0\x03\x02\x01\x02"
_EMPTY_SUBJECT: Final = b"\x30\x00"
_TRUE: Final = b"\x01\x01\xff"
_PEM_HEAD: Final = "-----BEGIN CERTIFICATE-----\n"
_PEM_TAIL: Final = "\n-----END CERTIFICATE-----\n"
#: Memoised encoded validity windows; leaves issued in one second share one.
_TIME_CACHE: Final = 64


def _length(n: int) -> bytes:
    if n < 0x80:
        return bytes((n,))
    body = n.to_bytes((n.bit_length() + 7) // 8, "big")
    return bytes((0x80 | len(body),)) + body


def _tlv(tag: int, body: bytes) -> bytes:
    return bytes((tag,)) + _length(len(body)) + body


def _integer(n: int) -> bytes:
    """DER INTEGER of a non-negative ``n`` (minimal, a leading zero when the top bit is set)."""
    return _tlv(0x02, n.to_bytes(n.bit_length() // 8 + 1, "big"))


def _oid(oid: x509.ObjectIdentifier) -> bytes:
    arcs = [int(a) for a in oid.dotted_string.split(".")]
    out = bytearray()
    for arc in [40 * arcs[0] + arcs[1], *arcs[2:]]:
        chunk = [arc & 0x7F]
        arc >>= 7
        while arc:
            chunk.append(0x80 | (arc & 0x7F))
            arc >>= 7
        out += bytes(reversed(chunk))
    return _tlv(0x06, bytes(out))


def _time(dt: datetime) -> bytes:
    """RFC 5280 section 4.1.2.5: UTCTime through 2049, GeneralizedTime from 2050."""
    if 1950 <= dt.year < 2050:
        return _tlv(0x17, dt.strftime("%y%m%d%H%M%SZ").encode())
    return _tlv(0x18, dt.strftime("%Y%m%d%H%M%SZ").encode())


def extension_der(oid: x509.ObjectIdentifier, *, critical: bool, value: bytes) -> bytes:
    """One ``Extension`` (criticality written only when TRUE: DER omits defaults)."""
    return _tlv(_SEQUENCE, _oid(oid) + (_TRUE if critical else b"") + _tlv(0x04, value))


def _read(der: bytes, pos: int) -> tuple[int, int, int]:
    """(tag, start of contents, end) of the TLV at ``pos``; definite lengths only."""
    tag, first = der[pos], der[pos + 1]
    pos += 2
    if first < 0x80:
        return tag, pos, pos + first
    size = first & 0x7F
    length = int.from_bytes(der[pos : pos + size], "big")
    return tag, pos + size, pos + size + length


def children(der: bytes) -> list[bytes]:
    """The encoded elements of the SEQUENCE ``der`` (used at start, on our own output)."""
    tag, start, end = _read(der, 0)
    if tag != _SEQUENCE or end != len(der):
        raise ValueError("not a single DER SEQUENCE")
    out, pos = [], start
    while pos < end:
        _, _, stop = _read(der, pos)
        out.append(der[pos:stop])
        pos = stop
    return out


def _subject_key_id(spki: bytes) -> bytes:
    """SHA-1 of the subjectPublicKey bits (RFC 5280 4.2.1.2 method 1), as
    ``SubjectKeyIdentifier.from_public_key`` computes it, read from the SPKI we have."""
    _, start, _ = _read(spki, 0)
    _, _, alg_end = _read(spki, start)
    tag, bits, end = _read(spki, alg_end)
    if tag != 0x03 or spki[bits] != 0:
        raise ValueError("SubjectPublicKeyInfo without a whole-byte BIT STRING")
    return hashlib.sha1(spki[bits + 1 : end]).digest()  # noqa: S324 (RFC 5280 key id)


def pem_certificate(der: bytes) -> str:
    """``Certificate.public_bytes(PEM)`` for ``der``: base64 in 64-character lines."""
    b64 = binascii.b2a_base64(der, newline=False).decode()
    lines = "\n".join([b64[i : i + 64] for i in range(0, len(b64), 64)])
    return _PEM_HEAD + lines + _PEM_TAIL


class LeafTemplate:
    """The DER of an authority's leaves, minus what differs per leaf.

    ``signature_algorithm`` is the AlgorithmIdentifier the authority key signs with, as a
    builder-made leaf carries it; ``constant_extensions`` maps "is the leaf key RSA" to the
    encoded extensions placed before the SAN; ``aki`` is the encoded AKI extension, which
    comes last. The caller (``Issuer``) proves the result against the builder at start.
    """

    def __init__(
        self,
        *,
        key: Any,
        hash_algorithm: hashes.HashAlgorithm,
        issuer_name: x509.Name,
        signature_algorithm: bytes,
        constant_extensions: dict[bool, bytes],
        aki: bytes,
    ) -> None:
        if isinstance(key, ec.EllipticCurvePrivateKey):
            ecdsa = ec.ECDSA(hash_algorithm)
            self._sign = lambda data: key.sign(data, ecdsa)
        elif isinstance(key, rsa.RSAPrivateKey):
            pkcs1 = padding.PKCS1v15()
            self._sign = lambda data: key.sign(data, pkcs1, hash_algorithm)
        else:
            raise TypeError(f"no leaf template for {type(key).__name__} authority keys")
        self._issuer = signature_algorithm + issuer_name.public_bytes()
        self._sigalg = signature_algorithm
        self._before_san = constant_extensions
        self._aki = aki
        #: The SKI extension up to its 20-byte key identifier.
        self._ski_head = extension_der(
            x509.SubjectKeyIdentifier.oid, critical=False, value=_tlv(0x04, bytes(20))
        )[:-20]
        self._validity: dict[tuple[datetime, datetime], bytes] = {}

    def _encoded_validity(self, not_before: datetime, not_after: datetime) -> bytes:
        found = self._validity.get((not_before, not_after))
        if found is None:
            if not_before.microsecond or not_after.microsecond:
                raise ValueError("leaf times are whole seconds")
            if len(self._validity) >= _TIME_CACHE:
                self._validity.clear()
            found = _tlv(_SEQUENCE, _time(not_before) + _time(not_after))
            self._validity[not_before, not_after] = found
        return found

    def tbs(
        self,
        *,
        serial: int,
        not_before: datetime,
        not_after: datetime,
        public_key: Any,
        rsa_key: bool,
        san: bytes,
    ) -> bytes:
        """The TBSCertificate, byte for byte what ``CertificateBuilder`` encodes."""
        spki = public_key.public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        extensions = b"".join(
            (self._before_san[rsa_key], san, self._ski_head, _subject_key_id(spki), self._aki)
        )
        return _tlv(
            _SEQUENCE,
            b"".join(
                (
                    _VERSION_3,
                    _integer(serial),
                    self._issuer,
                    self._encoded_validity(not_before, not_after),
                    _EMPTY_SUBJECT,
                    spki,
                    _tlv(0xA3, _tlv(_SEQUENCE, extensions)),
                )
            ),
        )

    def sign(self, tbs: bytes) -> bytes:
        """The whole certificate's DER: TBS, algorithm, signature."""
        signature = self._sign(tbs)
        return _tlv(_SEQUENCE, tbs + self._sigalg + _tlv(0x03, b"\x00" + signature))
