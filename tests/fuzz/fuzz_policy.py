"""Fuzz the policy loader (authz/loading.py): any model/policy text either loads into an
engine that decides, or is refused with ``PolicyError`` (never another exception)."""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

from _fuzz import instrumented, main

with instrumented():
    from authz.loading import load_engine
    from citadel.errors import PolicyError

REPO = Path(__file__).resolve().parents[2]
MODEL = (REPO / "policies" / "model.conf").read_bytes()
POLICY = (REPO / "policies" / "policy.csv").read_bytes()
SEEDS = [MODEL + b"\x00" + POLICY, MODEL + b"\x00p, a, b, c, d, allow",
         MODEL + b"\x00g, a, b\ng, b, a", b"[request_definition]\nr = sub\x00p, x"]  # fmt: skip
_DIR = Path(tempfile.mkdtemp(prefix="fuzz-policy-"))


def test_one_input(data: bytes) -> None:
    model, sep, policy = data.partition(b"\x00")
    if not sep:  # one part only: fuzz the rows against the real model
        model, policy = MODEL, data
    (_DIR / "model.conf").write_bytes(model)
    (_DIR / "policy.csv").write_bytes(policy)
    try:
        loaded = load_engine(_DIR)
    except PolicyError:
        return
    decision = loaded.engine.decide("anonymous", "h", "/healthz", "GET")
    assert isinstance(decision.allowed, bool)


if __name__ == "__main__":
    main(test_one_input, seeds=SEEDS)
    sys.exit(0)
