"""An engine built from the serving one (sharing its unchanged subtrees) decides exactly
as one built from scratch, over chains of random edits, and leaves the old one intact.

The from-scratch engine is itself held to pycasbin by test_engine_equivalence.py, so
equality with it is equality with pycasbin.
"""

from __future__ import annotations

import random
import re
import tempfile
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from authz.compiled import CompiledEngine
from authz.engine import build_engine
from authz.policy import Policy, PolicyReader
from authz.reload import retire
from tests.authz.test_engine_equivalence import (
    ACT_PATTERNS,
    CHAIN,
    DOM_PATTERNS,
    EFTS,
    PATH_PATTERNS,
    ROLES,
    SETTINGS,
    USERS,
    VARIANTS,
    _dom_func,
    model_text,
    requests_for,
    scenario,
)

SUBJECTS = USERS + ROLES + CHAIN


def _policy(
    model: str, g_rows: list[str], p_rows: list[tuple[str, ...]], read: Path | None = None
) -> Policy:
    """The revision in memory, or (with ``read``, a directory) as the serving process's
    PolicyReader reads it after the previous revision: spliced from that one's rows. The
    reader refuses effects other than allow/deny, which pycasbin (and so the engine)
    takes as "no effect", so the file has "deny" there: the engines compared are built
    from the same policy either way."""
    text = "\n".join([*g_rows, *(", ".join(("p", *r)) for r in p_rows)])
    if read is None:
        return Policy.from_texts(model, text)
    (read / "model.conf").write_text(model)
    (read / "policy.csv").write_text(re.sub(r", Allow$", ", deny", text, flags=re.M))
    policy = _READERS[read].read(read)
    assert policy is not None
    return policy


_READERS: dict[Path, PolicyReader] = {}


def _split(policy_text: str) -> tuple[list[str], list[tuple[str, ...]]]:
    g_rows, p_rows = [], []
    for line in policy_text.splitlines():
        if line.startswith("g,"):
            g_rows.append(line)
        elif line.startswith("p,"):
            p_rows.append(tuple(v.strip() for v in line.split(",")[1:]))
    return g_rows, p_rows


def _decisions(engine: object, reqs: list[tuple[str, ...]]) -> list[tuple[bool, object]]:
    out = []
    for req in reqs:
        d = engine.decide(*req)  # type: ignore[attr-defined]
        out.append((d.allowed, d.rule))
    return out


def _random_row(rnd: random.Random, variant: str) -> tuple[str, ...]:
    _, matcher, eft, _ = VARIANTS[variant]
    obj_f = next(
        (f for f in ("keyMatch2", "keyMatch3", "keyMatch") if f + "(r.obj" in matcher), "=="
    )
    act_f = next((f for f in ("regexMatch", "keyMatch") if f + "(r.act" in matcher), "==")
    row = [
        rnd.choice(SUBJECTS),
        rnd.choice(DOM_PATTERNS[_dom_func(variant)]),
        rnd.choice(PATH_PATTERNS[obj_f]),
        rnd.choice(ACT_PATTERNS[act_f]),
    ]
    if eft:
        row.append(rnd.choice(EFTS))
    return tuple(row)


def _edit(rnd: random.Random, variant: str, g_rows: list[str], p_rows: list) -> None:
    """One security-team edit: insert, delete, replace or move a row; or a role change."""
    op = rnd.choice(["insert", "insert", "delete", "replace", "move", "dup", "role"])
    n = len(p_rows)
    if op == "insert" or not p_rows:
        p_rows.insert(rnd.randint(0, n), _random_row(rnd, variant))
    elif op == "delete":
        del p_rows[rnd.randrange(n)]
    elif op == "replace":
        p_rows[rnd.randrange(n)] = _random_row(rnd, variant)
    elif op == "move":
        p_rows.insert(rnd.randint(0, n - 1), p_rows.pop(rnd.randrange(n)))
    elif op == "dup":
        p_rows.insert(rnd.randint(0, n), p_rows[rnd.randrange(n)])
    elif VARIANTS[variant][3]:  # a role change, where the model has roles
        names = USERS + ROLES
        i = rnd.randrange(len(names) - 1)
        g_rows.append(f"g, {names[i]}, {names[rnd.randrange(i + 1, len(names))]}")


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_incremental_build_decides_as_a_full_build(variant: str) -> None:
    @SETTINGS
    @given(scenario(variant), st.integers(0, 2**32 - 1))
    def run(case: tuple[str, str, list[int]], seed: int) -> None:
        model, policy_text, (req_seed,) = case
        rnd = random.Random(seed)
        g_rows, p_rows = _split(policy_text)
        with tempfile.TemporaryDirectory() as tmp:
            _READERS[Path(tmp)] = PolicyReader()
            try:
                chain(model, rnd, g_rows, p_rows, req_seed, Path(tmp))
            finally:
                del _READERS[Path(tmp)]

    def chain(model: str, rnd: random.Random, g_rows, p_rows, req_seed: int, tmp: Path) -> None:
        serving = build_engine(_policy(model, g_rows, p_rows, tmp))
        for _ in range(rnd.randint(1, 4)):  # a chain of revisions, each built from the last
            for _ in range(rnd.randint(1, 3)):
                _edit(rnd, variant, g_rows, p_rows)
            # Read from files (rows spliced into the serving revision's), or in memory.
            policy = _policy(model, g_rows, p_rows, tmp if rnd.random() < 0.7 else None)
            reqs = requests_for([list(r) for r in p_rows], req_seed, SUBJECTS)
            before = _decisions(serving, reqs)
            new = build_engine(policy, previous=serving)
            full = build_engine(policy)
            assert isinstance(new, CompiledEngine)
            assert _decisions(new, reqs) == _decisions(full, reqs)
            # Building from the serving engine changed nothing it decides.
            assert _decisions(serving, reqs) == before
            for sub in SUBJECTS[:6]:
                assert new.roles_for(sub, "") == full.roles_for(sub, "")
            modes.add(new.build["mode"])
            spliced.append(new.analysis.p_splice is not None)
            old, serving = serving, new
            assert retire(old)  # freeing the old one leaves the shared parts alone
            assert _decisions(new, reqs) == _decisions(full, reqs)

    modes: set[str] = set()
    spliced: list[bool] = []
    run()
    assert "incremental" in modes
    assert any(spliced)  # analyses were spliced into the serving one's, not only re-read


def _model(variant: str) -> str:
    effect, matcher, eft, g = VARIANTS[variant]
    return model_text(effect=effect, matcher=matcher, eft=eft, g=g)


MODEL = _model("default-allow-and-deny")
ROWS = [
    ("alice", "a.example", "/api/:id", "GET", "allow"),
    ("r1", "*", "/api/*", "GET", "allow"),
    ("alice", "a.example", "/api/x", ".*", "deny"),
    ("bob", "*", "/*", "POST", "allow"),
]


def test_one_changed_row_rebuilds_only_its_subtree() -> None:
    serving = build_engine(_policy(MODEL, [], ROWS))
    assert serving.build == {"mode": "full", "rows_rebuilt": 4}
    edited = [*ROWS[:2], ("carol", "*", "/c", "GET", "allow"), *ROWS[2:]]
    new = build_engine(_policy(MODEL, [], edited), previous=serving)
    assert new.build == {"mode": "incremental", "rows_rebuilt": 1, "subtrees_rebuilt": 1}
    assert new.decide("carol", "x", "/c", "GET").allowed
    assert not serving.decide("carol", "x", "/c", "GET").allowed
    # The first row still decides for alice (ids keep the rows' order across revisions).
    assert new.decide("alice", "a.example", "/api/x", "GET").rule == ROWS[2]


def test_inserts_at_one_place_renumber_when_ids_run_out() -> None:
    """Ids between two neighbours halve with each insert between them; when none is left
    the engine is rebuilt in full (new spacing), and decides the same throughout."""
    rows = list(ROWS)
    serving = build_engine(_policy(MODEL, [], rows))
    modes = []
    for k in range(40):
        rows.insert(1, ("dave", "*", f"/d{k}", "GET", "allow" if k % 2 else "deny"))
        policy = _policy(MODEL, [], rows)
        serving = build_engine(policy, previous=serving)
        modes.append(serving.build["mode"])
        reqs = [("dave", "x", f"/d{j}", "GET") for j in range(k + 1)]
        reqs += [("alice", "a.example", "/api/x", "GET"), ("r1", "h", "/api/q", "GET")]
        assert _decisions(serving, reqs) == _decisions(build_engine(policy), reqs)
    assert "full" in modes and modes[0] == "incremental"


@pytest.mark.parametrize(
    "change",
    [
        pytest.param("effect", id="another-effect"),
        pytest.param("matcher", id="another-matcher"),
        pytest.param("empty", id="policy-emptied"),
    ],
)
def test_another_model_or_an_empty_policy_builds_in_full(change: str) -> None:
    serving = build_engine(_policy(MODEL, [], ROWS))
    if change == "effect":
        policy = _policy(_model("deny-override"), [], ROWS)
    elif change == "matcher":
        policy = _policy(_model("glob-dom-keymatch3-path"), [], ROWS)
    else:
        policy = _policy(MODEL, [], [])
    new = build_engine(policy, previous=serving)
    assert new.build["mode"] == "full"
    reqs = [("alice", "a.example", "/api/x", "GET"), ("bob", "q", "/z", "POST")]
    assert _decisions(new, reqs) == _decisions(build_engine(policy), reqs)
