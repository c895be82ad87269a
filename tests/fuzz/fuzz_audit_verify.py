"""Fuzz ``citadel audit verify`` (citadel/audit.py): any file content yields a report
(ok or a named problem), with and without a checkpoint key; never an exception."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from _fuzz import instrumented, main
from cryptography.hazmat.primitives.asymmetric import ed25519

with instrumented():
    from citadel.audit import AuditLog, FileSink, verify_files

_DIR = Path(tempfile.mkdtemp(prefix="fuzz-audit-"))
_KEY = ed25519.Ed25519PrivateKey.generate()


def _seed() -> bytes:
    p = _DIR / "seed.log"
    log = AuditLog(FileSink(p), name="fuzz", signing_key=_KEY, checkpoint_every=3,
                   checkpoint_interval_s=None)  # fmt: skip
    for i in range(7):
        log.record("authz.decision", {"i": i, "path": f"/p/{i}", "rule": ["a", "b"]})
    log.close()
    return p.read_bytes()


SEEDS = [_seed(), b'{"seq":0}\n', b"[" * 5000 + b"\n", b'{"hash":"x"}\n\n\n']


def test_one_input(data: bytes) -> None:
    p = _DIR / "input.log"
    p.write_bytes(data)
    for key in (None, _KEY.public_key()):
        report = verify_files([p], public_key=key, require_closed=key is not None)
        assert report.ok or report.problem


if __name__ == "__main__":
    main(test_one_input, seeds=SEEDS)
    sys.exit(0)
