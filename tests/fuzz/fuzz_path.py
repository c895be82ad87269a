"""Fuzz the ext_authz path normaliser and request mapping (authz/request.py).

Anything may be refused (``Refused``); nothing may crash, and whatever is accepted must be
absolute, normal (a second pass changes nothing) and free of ambiguous spellings.
"""

from __future__ import annotations

import contextlib
import sys

from _fuzz import instrumented, main

with instrumented():
    from authz.request import Refused, normalize_path, request_tuple

SEEDS = [b"/api/orders", b"/a/../admin", b"//admin", b"/%2e%2E/x", b"/a%2Fb", b"/a;b",
         b"/a\\b", b"/a%00", b"/caf%C3%A9", b"/x?y#z", b"/%25%32%46", b"*"]  # fmt: skip


def _normal(out: str) -> None:
    assert out.startswith("/"), out
    for bad in ("//", "/./", "/../", "\x00", "\\", ";"):
        assert bad not in out, (bad, out)
    assert not out.endswith(("/.", "/..")), out
    assert "%2F" not in out.upper() and "%5C" not in out.upper(), out


def test_one_input(data: bytes) -> None:
    raw = data.decode("latin-1")
    try:
        out = normalize_path(raw)
    except Refused:
        pass
    else:
        _normal(out)
        assert normalize_path(out) == out, (raw, out)
    parts = raw.split("\x01", 3)
    if len(parts) == 4:
        with contextlib.suppress(Refused):
            request_tuple(principal=parts[0], host=parts[1], method=parts[2], path=parts[3])


if __name__ == "__main__":
    main(test_one_input, seeds=SEEDS)
    sys.exit(0)
