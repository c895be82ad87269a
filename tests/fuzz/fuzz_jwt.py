"""Atheris harness: the bearer-token verifier (``JwksAuthenticator``) on hostile input.

Run: ``python tests/fuzz/fuzz_jwt.py -atheris_runs=100000``. Inputs are arbitrary text,
or a valid projected token with bytes overwritten in its compact form or in one decoded
segment (re-encoded canonically, so the JSON and signature code is reached).

The property: only the untouched token authenticates; everything else raises
``AuthenticationError`` or ``Unavailable`` — any other exception is a finding.
"""

from __future__ import annotations

import asyncio
import base64
import sys
import tempfile

import atheris

with atheris.instrument_imports():
    from citadel.ca.jwks import JwksAuthenticator
    from citadel.dev import init_dev_issuer, mint_token
    from citadel.errors import AuthenticationError, Unavailable

T0 = 1_900_000_000.0
_TMP = tempfile.TemporaryDirectory(prefix="citadel-fuzz-jwt-")
_DEV, _ = init_dev_issuer(_TMP.name)
AUTH = JwksAuthenticator(jwks_file=_DEV.jwks_path, clock=lambda: T0)
VALID = mint_token(_DEV, namespace="default", service_account="web", clock=lambda: T0)
LOOP = asyncio.new_event_loop()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def check(token: str) -> None:
    try:
        caller = LOOP.run_until_complete(AUTH.authenticate(token))
    except (AuthenticationError, Unavailable):
        return
    if token != VALID:
        raise AssertionError(f"a changed token authenticated as {caller.subject}")


def TestOneInput(data: bytes) -> None:
    fdp = atheris.FuzzedDataProvider(data)
    mode = fdp.ConsumeIntInRange(0, 2)
    if mode == 0:
        check(fdp.ConsumeUnicodeNoSurrogates(fdp.remaining_bytes()))
        return
    if mode == 1:
        text = bytearray(VALID.encode())
        for _ in range(fdp.ConsumeIntInRange(1, 4)):
            text[fdp.ConsumeIntInRange(0, len(text) - 1)] = fdp.ConsumeIntInRange(0x20, 0x7E)
        check(text.decode())
        return
    parts = VALID.split(".")
    seg = fdp.ConsumeIntInRange(0, 2)
    raw = bytearray(base64.urlsafe_b64decode(parts[seg] + "=" * (-len(parts[seg]) % 4)))
    for _ in range(fdp.ConsumeIntInRange(1, 4)):
        raw[fdp.ConsumeIntInRange(0, len(raw) - 1)] = fdp.ConsumeInt(1) & 0xFF
    parts[seg] = _b64(bytes(raw))
    check(".".join(parts))


def main() -> None:
    assert LOOP.run_until_complete(AUTH.authenticate(VALID)).service_account == "web"
    atheris.Setup(sys.argv, TestOneInput)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
