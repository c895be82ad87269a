"""Run a ``test_one_input(data: bytes)`` under atheris when installed, else on random bytes.

atheris (``pip install -e '.[fuzz]'``) gives coverage-guided fuzzing and takes libFuzzer
flags (``-runs=N``, ``-max_len=N``, ``-max_total_time=S``, a corpus directory). Without it
the fallback feeds ``-runs`` inputs: the seeds, mutations of them (bit flips, splices,
repeats, truncations) and plain random bytes, from a fixed seed (``FUZZ_SEED``) so a crash
reproduces. Either way an exception escaping ``test_one_input`` is a finding: the input is
written to ``crash-<sha256>`` in the working directory and the process exits non-zero.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import random
import sys
import traceback
from collections.abc import Callable, Iterator, Sequence

try:
    import atheris
except ImportError:  # pragma: no cover - depends on the environment
    atheris = None

__all__ = ["atheris", "instrumented", "main"]


@contextlib.contextmanager
def instrumented() -> Iterator[None]:
    """``atheris.instrument_imports()`` when atheris is there (coverage feedback)."""
    if atheris is None:
        yield
        return
    with atheris.instrument_imports():
        yield


def _arg(argv: Sequence[str], name: str, default: int) -> int:
    for a in argv:
        if a.startswith(f"-{name}="):
            return int(a.split("=", 1)[1])
    return default


def _mutate(rng: random.Random, seeds: Sequence[bytes], max_len: int) -> bytes:
    pick = rng.random()
    if pick < 0.15 or not seeds:
        return rng.randbytes(rng.randint(0, max_len))
    data = bytearray(rng.choice(seeds))
    for _ in range(rng.randint(1, 4)):
        op = rng.randrange(6)
        if op == 0 and data:  # flip a bit
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        elif op == 1 and data:  # replace a byte with an interesting one
            data[rng.randrange(len(data))] = rng.choice(b'\x00\xff\x7f\x80/\\%.;"{}[]:,\n')
        elif op == 2:  # splice another seed in
            other = rng.choice(seeds)
            i = rng.randint(0, len(data))
            data[i:i] = other[: rng.randint(0, len(other))]
        elif op == 3 and data:  # truncate
            del data[rng.randint(0, len(data)) :]
        elif op == 4 and data:  # repeat a slice
            i = rng.randrange(len(data))
            data[i:i] = data[i : i + rng.randint(1, 16)] * rng.randint(2, 64)
        else:  # insert random bytes
            i = rng.randint(0, len(data))
            data[i:i] = rng.randbytes(rng.randint(1, 8))
    return bytes(data[:max_len])


def _crash(data: bytes) -> None:
    name = f"crash-{hashlib.sha256(data).hexdigest()}"
    with open(name, "wb") as fh:
        fh.write(data)
    traceback.print_exc()
    print(f"finding: input written to {name}", file=sys.stderr)


def main(test_one_input: Callable[[bytes], None], *, seeds: Sequence[bytes] = ()) -> None:
    argv = sys.argv
    if atheris is not None and os.environ.get("FUZZ_FALLBACK") != "1":
        atheris.Setup(argv, test_one_input)
        atheris.Fuzz()
        return
    runs = _arg(argv, "runs", 10_000)
    max_len = _arg(argv, "max_len", 4096)
    rng = random.Random(int(os.environ.get("FUZZ_SEED", "1234")))
    for data in list(seeds):
        try:
            test_one_input(data)
        except Exception:
            _crash(data)
            sys.exit(1)
    for _ in range(runs):
        data = _mutate(rng, seeds, max_len)
        try:
            test_one_input(data)
        except Exception:
            _crash(data)
            sys.exit(1)
    print(f"fallback fuzzer: {runs} inputs, no finding", file=sys.stderr)
