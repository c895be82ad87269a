"""Atheris harness: CSR parsing and policy (``Issuer.issue``) on arbitrary and damaged input.

Run: ``python tests/fuzz/fuzz_csr.py -atheris_runs=100000`` (libFuzzer flags pass through;
give a corpus directory to keep findings). Two inputs per run, chosen by the first byte:
arbitrary bytes as the CSR field, or a valid CSR's DER with bytes overwritten (reaching the
ASN.1, key and extension parsers, which random bytes rarely get past the PEM checks into).

The property: ``issue`` returns a leaf naming exactly the caller, or raises one of our
``CitadelError``s with a client-side status; anything else is a finding (it would be an
INTERNAL error over gRPC).
"""

from __future__ import annotations

import base64
import sys
import tempfile
from pathlib import Path

import atheris

with atheris.instrument_imports():
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    from citadel.ca.authority import init_authority
    from citadel.ca.issuance import Issuer
    from citadel.ca.tokens import Caller
    from citadel.errors import CitadelError

_TMP = tempfile.TemporaryDirectory(prefix="citadel-fuzz-csr-")
ISSUER = Issuer(init_authority(Path(_TMP.name) / "cacerts", trust_domain="cluster.local"))
CALLER = Caller(namespace="default", service_account="web", subject="fuzz")
MINE = "spiffe://cluster.local/ns/default/sa/web"


def _template(key: object, sans: list[x509.GeneralName]) -> bytes:
    b = x509.CertificateSigningRequestBuilder().subject_name(x509.Name([]))
    if sans:
        b = b.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return b.sign(key, hashes.SHA256()).public_bytes(serialization.Encoding.DER)  # type: ignore[arg-type]


TEMPLATES = [
    _template(ec.generate_private_key(ec.SECP256R1()), []),
    _template(ec.generate_private_key(ec.SECP384R1()), [x509.UniformResourceIdentifier(MINE)]),
    _template(
        rsa.generate_private_key(public_exponent=65537, key_size=2048),
        [x509.UniformResourceIdentifier(MINE), x509.DNSName("web.example")],
    ),
]


def _pem(der: bytes) -> bytes:
    return (
        b"-----BEGIN CERTIFICATE REQUEST-----\n%b-----END CERTIFICATE REQUEST-----\n"
        % base64.encodebytes(der)
    )


def check(csr: bytes | str) -> None:
    try:
        issued = ISSUER.issue(CALLER, csr)
    except CitadelError as exc:
        if exc.status not in ("INVALID_ARGUMENT", "PERMISSION_DENIED"):
            raise AssertionError(f"unexpected status {exc.status}: {exc.message}") from None
        return
    san = issued.certificate.extensions.get_extension_for_class(x509.SubjectAlternativeName)
    ids = san.value.get_values_for_type(x509.UniformResourceIdentifier)
    if ids != [MINE] or len(list(san.value)) != 1:
        raise AssertionError(f"leaf names {ids!r}, not only the caller")


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 2)
    if mode == 0:
        check(fdp.ConsumeBytes(fdp.remaining_bytes()))
    elif mode == 1:
        check(_pem(fdp.ConsumeBytes(fdp.remaining_bytes())))
    else:
        der = bytearray(TEMPLATES[fdp.ConsumeIntInRange(0, len(TEMPLATES) - 1)])
        for _ in range(fdp.ConsumeIntInRange(1, 8)):
            if not fdp.remaining_bytes():
                break
            der[fdp.ConsumeIntInRange(0, len(der) - 1)] = fdp.ConsumeInt(1) & 0xFF
        check(_pem(bytes(der)))


def main() -> None:
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
