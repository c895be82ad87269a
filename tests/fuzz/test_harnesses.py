"""Every fuzz harness stays runnable: its seeds and a few hundred mutations pass in-process.

The real budget is ``make fuzz`` (tests/fuzz/run_all.py); this only keeps the harnesses
from rotting between runs.
"""

from __future__ import annotations

import importlib
import random
import sys
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
# The harnesses written to the _fuzz.main convention (fuzz_csr/fuzz_jwt run under atheris
# only and are exercised by ``make fuzz``).
HARNESSES = ["fuzz_audit_verify", "fuzz_path", "fuzz_policy", "fuzz_spiffe"]


@pytest.fixture(scope="module", autouse=True)
def _on_path():
    sys.path.insert(0, str(HERE))
    yield
    sys.path.remove(str(HERE))


@pytest.mark.parametrize("name", HARNESSES)
def test_harness_survives_seeds_and_mutations(name: str) -> None:
    import _fuzz

    mod = importlib.import_module(name)
    seeds = list(getattr(mod, "SEEDS", []))
    rng = random.Random(7)
    for data in [*seeds, *(_fuzz._mutate(rng, seeds, 2048) for _ in range(200))]:
        mod.test_one_input(data)
