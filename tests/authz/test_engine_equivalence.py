"""The compiled engine decides exactly as pycasbin's own ``Enforcer.enforce``.

Randomized (hypothesis) over policies with multi-level and shared roles, deep role chains
(past pycasbin's 10-level limit), wildcards, every pattern function we compile, allow /
deny / unknown effects, and requests biased to hit rows. The reference is a fresh
``casbin.Enforcer(model_path, policy_path)`` reading the same files from disk, i.e. pycasbin
exactly as a user would run it, not our own loader.
"""

from __future__ import annotations

import random
from pathlib import Path

import casbin
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz.engine import CasbinEngine, build_engine
from authz.policy import Policy

SETTINGS = settings(
    max_examples=80,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

DEFAULT_MATCHER = (
    "g(r.sub, p.sub) && keyMatch(r.dom, p.dom) && keyMatch2(r.obj, p.obj) "
    "&& regexMatch(r.act, p.act)"
)
ALLOW = "some(where (p.eft == allow))"
DENY_OVERRIDE = "!some(where (p.eft == deny))"
ALLOW_AND_DENY = "some(where (p.eft == allow)) && !some(where (p.eft == deny))"


def model_text(*, effect: str, matcher: str, eft: bool = True, g: str | None = "_, _") -> str:
    p = "sub, dom, obj, act" + (", eft" if eft else "")
    roles = f"[role_definition]\ng = {g}\n\n" if g else ""
    return (
        "[request_definition]\nr = sub, dom, obj, act\n\n"
        f"[policy_definition]\np = {p}\n\n{roles}"
        f"[policy_effect]\ne = {effect}\n\n[matchers]\nm = {matcher}\n"
    )


# name: (effect, matcher, eft column, role definition)
VARIANTS: dict[str, tuple[str, str, bool, str | None]] = {
    "default-allow-and-deny": (ALLOW_AND_DENY, DEFAULT_MATCHER, True, "_, _"),
    "allow-override": (ALLOW, DEFAULT_MATCHER, True, "_, _"),
    "deny-override": (DENY_OVERRIDE, DEFAULT_MATCHER, True, "_, _"),
    "no-eft-column-allow": (ALLOW, DEFAULT_MATCHER, False, "_, _"),
    "no-eft-column-deny-override": (DENY_OVERRIDE, DEFAULT_MATCHER, False, "_, _"),
    "equality-only-no-roles": (
        ALLOW_AND_DENY,
        "r.sub == p.sub && r.dom == p.dom && r.obj == p.obj && r.act == p.act",
        True,
        None,
    ),
    "reversed-equality-keymatch-path": (
        ALLOW_AND_DENY,
        "p.sub == r.sub && r.dom == p.dom && keyMatch(r.obj, p.obj) && regexMatch(r.act, p.act)",
        True,
        None,
    ),
    "glob-dom-keymatch3-path": (
        ALLOW_AND_DENY,
        "g(r.sub, p.sub) && globMatch(r.dom, p.dom) && keyMatch3(r.obj, p.obj) && r.act == p.act",
        True,
        "_, _",
    ),
    "regex-dom-keymatch2-act": (
        DENY_OVERRIDE,
        "g(r.sub, p.sub) && regexMatch(r.dom, p.dom) && keyMatch2(r.obj, p.obj) "
        "&& keyMatch(r.act, p.act)",
        True,
        "_, _",
    ),
}

USERS = ["alice", "bob", "carol", "svc"]
ROLES = ["r0", "r1", "r2", "r3", "r4"]
CHAIN = [f"c{i}" for i in range(13)]  # a role chain deeper than pycasbin looks
DOMAINS = ["a.example", "b.example", "x.other", ""]
DOM_PATTERNS = {
    "keyMatch": ["a.example", "*", "a.*", "*.example", "b.example", "x.other"],
    "==": ["a.example", "b.example", "x.other"],
    "globMatch": ["a.example", "*", "*.example", "?.example", "[ab].example", "x.*"],
    "regexMatch": ["a.example", "^a\\.example$", ".*", "b", "^(a|b)\\.example$", "x"],
}
SEGMENTS = ["api", "v1", "x", "", "a.b", "aXb", "1", "zz", "a:b"]
PATH_PATTERNS = {
    "keyMatch2": [
        "*",
        "/*",
        "/api/*",
        "/api/:id",
        "/api/:id/x",
        "/api",
        "/a.b",
        "/:a/:b",
        "/api/v[0-9]",
        "/api/:id/*",
        "",
        "/v1/*/x",
        "/a:b",
        "/api/x*",
    ],
    "keyMatch": ["/api", "/api/*", "*", "/a*", "/api/x", "/"],
    "keyMatch3": ["/api/{id}", "/api/*", "/{a}/{b}", "/api", "/api/{id}/x", "/a.b"],
    "==": ["/api", "/api/x", "/", "/a.b"],
}
ACT_PATTERNS = {
    "regexMatch": ["^GET$", "GET", "^(GET|POST)$", ".*", "P", "^P.*"],
    "==": ["GET", "POST", "PUT"],
    "keyMatch": ["GET", "P*", "*"],
}
ACTS = ["GET", "POST", "PUT", "GETX", "", "GET\n", "PATCH"]
EFTS = ["allow", "allow", "deny", "Allow"]


def _dom_func(variant: str) -> str:
    matcher = VARIANTS[variant][1]
    for f in ("globMatch", "regexMatch", "keyMatch"):
        if f + "(r.dom" in matcher:
            return f
    return "=="


def instantiate(pattern: str, rnd: random.Random) -> str:
    """A path the pattern is likely to match, to bias requests toward hits."""
    out = []
    for seg in pattern.split("/"):
        if seg.startswith((":", "{")):
            out.append(rnd.choice(["1", "abc", "a.b", ""]))
        elif seg == "*" or seg.endswith("*"):
            out.append("/".join(rnd.choice(SEGMENTS) for _ in range(rnd.randint(0, 3))))
        else:
            out.append(seg)
    return "/".join(out)


@st.composite
def scenario(draw: st.DrawFn, variant: str) -> tuple[str, str, list[tuple[str, ...]]]:
    effect, matcher, eft, g = VARIANTS[variant]
    dom_f = _dom_func(variant)
    obj_f = next(
        (f for f in ("keyMatch2", "keyMatch3", "keyMatch") if f + "(r.obj" in matcher), "=="
    )
    act_f = next((f for f in ("regexMatch", "keyMatch") if f + "(r.act" in matcher), "==")
    names = USERS + ROLES
    g_rows: list[tuple[str, str]] = []
    if g:
        # A DAG: users and roles only point to later names, so no cycles.
        n_edges = draw(st.integers(0, 12))
        for _ in range(n_edges):
            i = draw(st.integers(0, len(names) - 2))
            j = draw(st.integers(i + 1, len(names) - 1))
            g_rows.append((names[i], names[j]))
        depth = draw(st.integers(0, len(CHAIN) - 1))
        if depth:
            g_rows.append(("alice", CHAIN[0]))
            g_rows.extend((CHAIN[k], CHAIN[k + 1]) for k in range(depth))
    # Rows at the edge of pycasbin's depth limit (alice reaches c8, not c9) come often.
    subjects = names + (CHAIN + ["c8", "c9"] * 3 if g else [])
    n_rows = draw(st.integers(0, 14))
    rows = []
    for _ in range(n_rows):
        row = [
            draw(st.sampled_from(subjects)),
            draw(st.sampled_from(DOM_PATTERNS[dom_f])),
            draw(st.sampled_from(PATH_PATTERNS[obj_f])),
            draw(st.sampled_from(ACT_PATTERNS[act_f])),
        ]
        if eft:
            row.append(draw(st.sampled_from(EFTS)))
        rows.append(tuple(row))
    policy = "\n".join(
        [", ".join(("g", *r)) for r in g_rows] + [", ".join(("p", *r)) for r in rows]
    )
    seed = draw(st.integers(0, 2**32 - 1))
    return model_text(effect=effect, matcher=matcher, eft=eft, g=g), policy, [seed]  # type: ignore[list-item]


def requests_for(policy_rows: list[list[str]], seed: int, subjects: list[str]) -> list[tuple]:
    rnd = random.Random(seed)
    out = []
    for _ in range(20):
        if policy_rows and rnd.random() < 0.8:
            row = rnd.choice(policy_rows)
            sub = row[0] if rnd.random() < 0.5 else rnd.choice(["alice", "alice", *subjects])
            dom = row[1].replace("*", "a") if rnd.random() < 0.6 else rnd.choice(DOMAINS)
            obj = instantiate(row[2], rnd) if rnd.random() < 0.8 else row[2]
            act = rnd.choice(["GET", "POST", "GET", row[3]] if rnd.random() < 0.7 else ACTS)
        else:
            sub = rnd.choice([*subjects, "nobody"])
            dom = rnd.choice(DOMAINS)
            obj = "/" + "/".join(rnd.choice(SEGMENTS) for _ in range(rnd.randint(0, 3)))
            act = rnd.choice(ACTS)
        if rnd.random() < 0.05:
            obj += "\n"
        out.append((sub, dom, obj, act))
    return out


def check_equivalent(tmp: Path, model: str, policy_text: str, seed: int) -> None:
    (tmp / "model.conf").write_text(model)
    (tmp / "policy.csv").write_text(policy_text + "\n")
    policy = Policy.from_texts(model, policy_text)
    compiled = build_engine(policy)
    assert compiled.kind == "compiled", getattr(compiled, "fallback_reason", None)
    reference = casbin.Enforcer(str(tmp / "model.conf"), str(tmp / "policy.csv"))
    locked = CasbinEngine(policy)
    p_rows = [r[1:] for r in policy.rows if r[0] == "p"]
    subjects = USERS + ROLES + CHAIN
    for req in requests_for(p_rows, seed, subjects):
        allowed, explain = reference.enforce_ex(*req)
        got = compiled.decide(*req)
        assert got.allowed == allowed, (req, got, explain)
        if explain:
            assert got.rule == tuple(explain), (req, got, explain)
        # Where pycasbin names no rule (allows under deny-capable effects), the compiled
        # engine must name the same first allowing row the locked reference finds.
        if allowed and not explain:
            assert got.rule == locked.decide(*req).rule, req
        again = compiled.decide(*req)  # the cached answer
        assert again.cached and (again.allowed, again.rule) == (got.allowed, got.rule)
    for sub in subjects[:6]:
        assert set(compiled.roles_for(sub, "")) == set(
            reference.get_implicit_roles_for_user(sub, "")
        )


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_compiled_engine_matches_pycasbin(variant: str, tmp_path: Path) -> None:
    @SETTINGS
    @given(scenario(variant))
    def run(case: tuple[str, str, list[int]]) -> None:
        model, policy_text, (seed,) = case
        check_equivalent(tmp_path, model, policy_text, seed)

    run()


DOMAIN_MODEL = model_text(
    effect=ALLOW_AND_DENY,
    matcher="g(r.sub, p.sub, r.dom) && r.dom == p.dom && keyMatch2(r.obj, p.obj) "
    "&& regexMatch(r.act, p.act)",
    g="_, _, _",
)


@SETTINGS
@given(
    st.lists(
        st.tuples(
            st.integers(0, len(USERS + ROLES) - 2),
            st.integers(1, len(USERS + ROLES) - 1),
            st.sampled_from(DOMAINS[:3]),
        ),
        max_size=12,
    ),
    st.lists(
        st.tuples(
            st.sampled_from(USERS + ROLES),
            st.sampled_from(DOMAINS[:3]),
            st.sampled_from(PATH_PATTERNS["keyMatch2"][:8]),
            st.sampled_from(ACT_PATTERNS["regexMatch"]),
            st.sampled_from(EFTS),
        ),
        max_size=12,
    ),
    st.integers(0, 2**32 - 1),
)
def test_domain_roles_match_pycasbin(
    tmp_path_factory: pytest.TempPathFactory,
    edges: list[tuple[int, int, str]],
    rows: list[tuple[str, ...]],
    seed: int,
) -> None:
    names = USERS + ROLES
    g_rows = [
        (names[i], names[max(i + 1, j)], d) for i, j, d in edges if max(i + 1, j) < len(names)
    ]
    text = "\n".join([", ".join(("g", *r)) for r in g_rows] + [", ".join(("p", *r)) for r in rows])
    tmp = tmp_path_factory.mktemp("dom")
    check_equivalent(tmp, DOMAIN_MODEL, text, seed)
    engine = build_engine(Policy.from_texts(DOMAIN_MODEL, text))
    reference = casbin.Enforcer(str(tmp / "model.conf"), str(tmp / "policy.csv"))
    for user in names:
        for dom in DOMAINS[:3]:
            assert set(engine.roles_for(user, dom)) == set(
                reference.get_implicit_roles_for_user(user, dom)
            )
