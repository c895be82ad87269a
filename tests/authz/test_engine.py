"""The decision engines: load-time validation, fallback to pycasbin, explanations,
role queries, the decision cache, and decisions under many threads."""

from __future__ import annotations

import ipaddress
import random
import re
import threading
from pathlib import Path

import casbin
import pytest
from structlog.testing import capture_logs

from authz.engine import CasbinEngine, Decision, build_engine
from authz.policy import Policy, load_policy_dir
from citadel.errors import PolicyError

ROOT = Path(__file__).resolve().parents[2]
MODEL = (ROOT / "policies" / "model.conf").read_text()
FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"
ORDERS = "spiffe://cluster.local/ns/shop/sa/orders"
ORDERS_HOST = "orders.shop.svc.cluster.local"
PAYMENTS_HOST = "payments.shop.svc.cluster.local"


def model(matcher: str | None = None, *, effect: str | None = None, r: str | None = None) -> str:
    text = MODEL
    if matcher is not None:
        text = re.sub(r"(?m)^m = .*$", lambda _: f"m = {matcher}", text)
    if effect is not None:
        text = re.sub(r"(?m)^e = .*$", lambda _: f"e = {effect}", text)
    if r is not None:
        text = re.sub(r"(?m)^r = .*$", lambda _: f"r = {r}", text)
    return text


def reference(policy: Policy, tmp: Path, **functions: object) -> casbin.Enforcer:
    (tmp / "model.conf").write_text(policy.model_text)
    (tmp / "policy.csv").write_text(policy.policy_text + "\n")
    e = casbin.Enforcer(str(tmp / "model.conf"), str(tmp / "policy.csv"))
    for name, fn in functions.items():
        e.add_function(name, fn)
    return e


# -- the shipped policy ---------------------------------------------------------------


@pytest.fixture(scope="module")
def shipped() -> Policy:
    return load_policy_dir(ROOT / "policies")


def test_shipped_policy_compiles(shipped: Policy) -> None:
    engine = build_engine(shipped)
    assert engine.kind == "compiled"
    assert engine.fallback_reason is None  # type: ignore[attr-defined]
    assert engine.revision == shipped.revision


@pytest.mark.parametrize(
    ("sub", "dom", "obj", "act", "allowed", "rule_sub"),
    [
        (FRONTEND, ORDERS_HOST, "/api/orders", "POST", True, "role:storefront"),
        (FRONTEND, ORDERS_HOST, "/api/orders/7", "GET", True, "role:storefront"),
        (FRONTEND, ORDERS_HOST, "/api/orders/7", "DELETE", False, None),
        (FRONTEND, PAYMENTS_HOST, "/api/charges", "POST", False, None),
        (ORDERS, PAYMENTS_HOST, "/api/charges", "POST", True, "role:order-service"),
        (ORDERS, PAYMENTS_HOST, "/status", "GET", True, "role:internal"),
        (ORDERS, PAYMENTS_HOST, "/admin/users", "GET", False, "role:internal"),
        ("anonymous", "anything", "/healthz", "GET", True, "anonymous"),
        ("anonymous", ORDERS_HOST, "/api/orders", "GET", False, None),
    ],
    ids=[
        "storefront-places-order",
        "storefront-reads-order",
        "storefront-cannot-delete",
        "storefront-cannot-charge",
        "orders-charges-payments",
        "inherited-role-reads-status",
        "explicit-deny-names-deny-row",
        "anonymous-health",
        "default-deny-has-no-rule",
    ],
)
def test_shipped_policy_decisions_and_explanations(
    shipped: Policy,
    sub: str,
    dom: str,
    obj: str,
    act: str,
    allowed: bool,
    rule_sub: str | None,
) -> None:
    compiled, locked = build_engine(shipped), CasbinEngine(shipped)
    got, ref = compiled.decide(sub, dom, obj, act), locked.decide(sub, dom, obj, act)
    assert got.allowed is allowed
    assert (got.rule[0] if got.rule else None) == rule_sub
    assert (got.allowed, got.rule) == (ref.allowed, ref.rule)
    if got.rule is not None and not allowed:
        assert got.rule[-1] == "deny"


def test_allow_names_first_matching_row_where_pycasbin_names_none(
    shipped: Policy, tmp_path: Path
) -> None:
    enforcer = reference(shipped, tmp_path)
    allowed, explain = enforcer.enforce_ex(FRONTEND, ORDERS_HOST, "/api/orders", "GET")
    assert allowed and explain == []  # pycasbin explains only denies for this effect
    got = build_engine(shipped).decide(FRONTEND, ORDERS_HOST, "/api/orders", "GET")
    assert got.rule == (
        "role:storefront",
        ORDERS_HOST,
        "/api/orders",
        "^(GET|POST)$",
        "allow",
    )


def test_roles_are_transitive_like_get_implicit_roles(shipped: Policy, tmp_path: Path) -> None:
    engine = build_engine(shipped)
    enforcer = reference(shipped, tmp_path)
    assert engine.roles_for(ORDERS, "") == ["role:order-service", "role:internal"]
    assert set(engine.roles_for(ORDERS, "")) == set(enforcer.get_implicit_roles_for_user(ORDERS))
    assert engine.roles_for("spiffe://nobody", "") == []


# -- semantics corners ----------------------------------------------------------------


def test_role_depth_limit_matches_pycasbin(tmp_path: Path) -> None:
    """pycasbin's has_link looks at most 9 links deep; c9 is 10 links from alice."""
    chain = ["g, alice, c0"] + [f"g, c{i}, c{i + 1}" for i in range(12)]
    rows = [f"p, c{i}, *, /r{i}, GET, allow" for i in range(13)]
    policy = Policy.from_texts(MODEL, "\n".join(chain + rows))
    engine, enforcer = build_engine(policy), reference(policy, tmp_path)
    got = [engine.decide("alice", "h", f"/r{i}", "GET").allowed for i in range(13)]
    assert got == [enforcer.enforce("alice", "h", f"/r{i}", "GET") for i in range(13)]
    assert got == [True] * 9 + [False] * 4
    # get_implicit_roles_for_user has no such limit
    assert len(engine.roles_for("alice", "")) == 13


@pytest.mark.parametrize(
    ("effect", "expect"),
    [
        ("some(where (p.eft == allow))", (False, False)),
        ("!some(where (p.eft == deny))", (True, True)),
        ("some(where (p.eft == allow)) && !some(where (p.eft == deny))", (False, False)),
    ],
    ids=["allow-override", "deny-override", "allow-and-deny"],
)
def test_unknown_eft_value_is_ignored_like_pycasbin(
    effect: str, expect: tuple[bool, bool], tmp_path: Path
) -> None:
    """An eft of "Allow" or "DENY" is Effector.INDETERMINATE in pycasbin: never counts."""
    policy = Policy.from_texts(
        model(effect=effect), "p, alice, *, /a, GET, Allow\np, alice, *, /b, GET, DENY"
    )
    engine, enforcer = build_engine(policy), reference(policy, tmp_path)
    got = (engine.decide("alice", "h", "/a", "GET"), engine.decide("alice", "h", "/b", "GET"))
    assert tuple(d.allowed for d in got) == expect
    assert [enforcer.enforce("alice", "h", p, "GET") for p in ("/a", "/b")] == list(expect)
    assert all(d.rule is None for d in got)


def test_empty_policy_evaluates_matcher_once_with_empty_fields(tmp_path: Path) -> None:
    policy = Policy.from_texts(model("r.sub == p.sub && r.obj == p.obj"), "")
    engine, enforcer = build_engine(policy), reference(policy, tmp_path)
    assert engine.kind == "compiled"
    for req in [("", "h", "", "GET"), ("alice", "h", "", "GET"), ("", "h", "/x", "GET")]:
        assert engine.decide(*req).allowed == enforcer.enforce(*req)
        assert engine.decide(*req).rule is None
    assert engine.decide("", "h", "", "GET").allowed


def test_newline_in_path_uses_pycasbin_regex(tmp_path: Path) -> None:
    policy = Policy.from_texts(MODEL, "p, a, *, /x/*, GET, allow\np, a, *, *, POST, allow")
    engine, enforcer = build_engine(policy), reference(policy, tmp_path)
    for obj in ["/x/\n", "/x/a\nb", "/y\n", "a\nb", "/x/a"]:
        for act in ["GET", "POST", "GET\n"]:
            assert engine.decide("a", "h", obj, act).allowed == enforcer.enforce("a", "h", obj, act)


# -- the decision cache ---------------------------------------------------------------


def test_cache_serves_repeats_and_stays_bounded(shipped: Policy) -> None:
    engine = build_engine(shipped, cache_size=8)
    first = engine.decide(FRONTEND, ORDERS_HOST, "/api/orders", "GET")
    again = engine.decide(FRONTEND, ORDERS_HOST, "/api/orders", "GET")
    assert not first.cached and again.cached
    assert (again.allowed, again.rule, again.revision) == (
        first.allowed,
        first.rule,
        first.revision,
    )
    for i in range(100):
        engine.decide(FRONTEND, ORDERS_HOST, f"/api/orders/{i}", "GET")
    assert engine.cache_info()["size"] <= 8  # type: ignore[attr-defined]
    uncached = build_engine(shipped, cache_size=0)
    uncached.decide(FRONTEND, ORDERS_HOST, "/api/orders", "GET")
    assert not uncached.decide(FRONTEND, ORDERS_HOST, "/api/orders", "GET").cached


# -- threads --------------------------------------------------------------------------


def test_many_threads_share_one_engine_without_a_wrong_answer() -> None:
    rnd = random.Random(7)
    roles = [f"role:{i}" for i in range(20)]
    lines = [f"g, spiffe://td/ns/a/sa/s{i}, {roles[i % 20]}" for i in range(200)]
    lines += [f"g, {roles[i]}, {roles[i + 1]}" for i in range(0, 18, 3)]
    for i in range(240):
        eft = "deny" if i % 9 == 0 else "allow"
        path = rnd.choice(["/api/:id", "/api/*", "/v1/x", "/v1/:a/:b", "*"])
        lines.append(f"p, {roles[i % 20]}, h{i % 5}.svc, /p{i % 7}{path}, ^(GET|POST)$, {eft}")
    policy = Policy.from_texts(MODEL, "\n".join(lines))
    requests = [
        (
            f"spiffe://td/ns/a/sa/s{rnd.randrange(220)}",
            f"h{rnd.randrange(6)}.svc",
            f"/p{rnd.randrange(8)}" + rnd.choice(["/api/1", "/api/x/y", "/v1/x", "/v1/a/b", "/z"]),
            rnd.choice(["GET", "POST", "PUT"]),
        )
        for _ in range(600)
    ]
    locked = CasbinEngine(policy)
    expected = [locked.decide(*r) for r in requests]
    assert any(d.allowed for d in expected) and any(not d.allowed for d in expected)
    engine = build_engine(policy, cache_size=64)  # small: eviction races under load too
    assert engine.kind == "compiled"
    wrong: list[tuple[tuple[str, ...], Decision]] = []
    barrier = threading.Barrier(8)

    errors: list[BaseException] = []

    def work(seed: int) -> None:
        order = list(range(len(requests)))
        random.Random(seed).shuffle(order)
        barrier.wait()
        try:
            for _ in range(5):
                for i in order:
                    got = engine.decide(*requests[i])
                    if (got.allowed, got.rule) != (expected[i].allowed, expected[i].rule):
                        wrong.append((requests[i], got))
        except BaseException as exc:  # a crash in a thread must fail the test
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(s,)) for s in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    assert wrong == []


# -- fallback to pycasbin -------------------------------------------------------------


def _ip_in(ip: str, net: str) -> bool:
    return ipaddress.ip_address(ip) in ipaddress.ip_network(net)


@pytest.mark.parametrize(
    ("matcher", "effect", "functions", "reason"),
    [
        ("g(r.sub, p.sub) && (r.obj == p.obj || p.obj == r.dom)", None, None, "no compiled"),
        ("g(r.sub, p.sub) && !(r.obj == p.obj)", None, None, "no compiled"),
        ("g(r.sub, p.sub) && ipMatch(r.dom, p.dom) && r.obj == p.obj", None, None, "ipMatch"),
        ("g(r.sub, p.sub) && inNet(r.dom, p.dom) && r.obj == p.obj", None, _ip_in, "custom"),
        ("g(r.sub, p.sub) && eval(p.act)", None, None, "eval()"),
        ("g(r.sub, p.sub) && r.obj == '/fixed'", None, None, "no compiled"),
        ("g(r.sub, p.sub) && r.obj == p.obj", "priority(p.eft) || deny", None, "priority"),
    ],
    ids=[
        "or-operator",
        "negation",
        "uncompiled-builtin-ipMatch",
        "custom-function",
        "eval-rule",
        "string-literal",
        "priority-effect",
    ],
)
def test_uncompilable_models_fall_back_and_decide_like_pycasbin(
    matcher: str, effect: str | None, functions: object, reason: str, tmp_path: Path
) -> None:
    rows = [
        "g, alice, admin",
        "p, admin, 10.0.0.0/8, /a, r_obj == '/a', allow",
        "p, alice, 10.1.0.0/16, /b, r_act == 'GET', allow",
        "p, alice, 10.1.0.0/16, 10.1.2.3, r_obj == '/c', deny",
        "p, bob, 192.168.0.0/16, /fixed, r_act == 'PUT', allow",
    ]
    policy = Policy.from_texts(model(matcher, effect=effect), "\n".join(rows))
    extra = {"inNet": functions} if functions else {}
    with capture_logs() as logs:
        engine = build_engine(policy, functions=extra or None)  # type: ignore[arg-type]
    assert engine.kind == "casbin"
    assert reason in (engine.fallback_reason or "")  # type: ignore[attr-defined]
    assert any(e["event"] == "policy_engine_fallback" for e in logs)
    enforcer = reference(policy, tmp_path, **extra)
    requests = [
        (sub, dom, obj, act)
        for sub in ("alice", "bob", "carol")
        for dom in ("10.1.2.3", "192.168.1.1", "10.200.0.1")
        for obj in ("/a", "/b", "/c", "/fixed", "10.1.2.3")
        for act in ("GET", "PUT")
    ]
    hits = 0
    for req in requests:
        allowed, explain = enforcer.enforce_ex(*req)
        got = engine.decide(*req)
        hits += allowed
        assert got.allowed == allowed, req
        if explain:
            assert got.rule == tuple(explain)
    assert hits  # the comparison saw allows, not only default denies


def test_fallback_engine_explains_allows(shipped: Policy) -> None:
    policy = Policy.from_texts(
        model(
            "g(r.sub, p.sub) && keyMatch(r.dom, p.dom) && "
            "(keyMatch2(r.obj, p.obj) || r.obj == '/always') && regexMatch(r.act, p.act)"
        ),
        shipped.policy_text,
    )
    engine = build_engine(policy)
    assert engine.kind == "casbin"
    got = engine.decide(FRONTEND, ORDERS_HOST, "/api/orders/1", "GET")
    assert got.allowed and got.rule is not None and got.rule[2] == "/api/orders/:id"


# -- load-time validation -------------------------------------------------------------

BAD = [
    ("model-does-not-parse", "[request_definition\nr = sub", "", "model.conf", None),
    ("model-missing-matchers", MODEL.split("[matchers]")[0], "", "model.conf", None),
    ("request-takes-3-values", model(r="sub, obj, act"), "", "model.conf", None),
    ("request-takes-5-values", model(r="sub, dom, obj, act, ip"), "", "model.conf", None),
    (
        "unknown-function-in-matcher",
        model("g(r.sub, p.sub) && fooMatch(r.obj, p.obj)"),
        "",
        "model.conf",
        None,
    ),
    (
        "matcher-names-undefined-field",
        model("g(r.sub, p.sub) && r.obj == p.owner"),
        "",
        "model.conf",
        None,
    ),
    ("matcher-syntax-error", model("g(r.sub, p.sub) && && r.obj"), "", "model.conf", None),
    ("unsupported-effect", model(effect="some(where (p.eft == permit))"), "", "model.conf", None),
    (
        "p-row-too-few-values",
        MODEL,
        "p, a, *, /x, GET, allow\n\np, a, *, /y, GET",
        "policy.csv",
        3,
    ),
    ("p-row-too-many-values", MODEL, "p, a, *, /x, GET, allow, extra", "policy.csv", 1),
    ("g-row-too-many-values", MODEL, "g, a, b\ng, a, b, dom", "policy.csv", 2),
    ("g-row-too-few-values", MODEL, "g, a", "policy.csv", 1),
    ("unknown-ptype", MODEL, "p, a, *, /x, GET, allow\np3, a, b", "policy.csv", 2),
    ("role-cycle", MODEL, "g, a, b\ng, b, c\ng, c, a", "policy.csv", 3),
    ("role-self-cycle", MODEL, "g, x, y\ng, a, a", "policy.csv", 2),
    ("invalid-method-regex", MODEL, "p, a, *, /x, *GET, allow", "policy.csv", 1),
    (
        "invalid-path-pattern",
        MODEL,
        "p, a, *, /x, GET, allow\np, a, *, /x/**, GET, allow",
        "policy.csv",
        2,
    ),
]


@pytest.mark.parametrize(
    ("model_text", "policy_text", "file", "line"),
    [b[1:] for b in BAD],
    ids=[b[0] for b in BAD],
)
def test_bad_policies_are_refused_at_load(
    model_text: str, policy_text: str, file: str, line: int | None
) -> None:
    policy = Policy.from_texts(model_text, policy_text)
    with pytest.raises(PolicyError) as info:
        build_engine(policy)
    assert info.value.file == file
    assert info.value.line == line
    assert info.value.message  # a sentence an operator can act on


def test_role_cycle_message_names_the_cycle() -> None:
    with pytest.raises(PolicyError, match="a -> b -> c -> a"):
        build_engine(Policy.from_texts(MODEL, "g, a, b\ng, b, c\ng, c, a"))


def test_glob_memo_bound_never_changes_a_decision(
    shipped: Policy, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """globMatch answers are memoised per pattern and value; a memo that keeps filling and
    clearing (bound 2 here) decides exactly like pycasbin."""
    from authz import matchers

    monkeypatch.setattr(matchers, "GLOB_MEMO_SIZE", 2)
    engine = build_engine(shipped, cache_size=0)
    ref = reference(shipped, tmp_path)
    rnd = random.Random(7)
    hosts = [ORDERS_HOST, PAYMENTS_HOST, "evil.example.com", "shop.svc.cluster.local",
             "a.b.shop.svc.cluster.local", "orders.shop.svc.cluster.local.evil"]  # fmt: skip
    for _ in range(400):
        sub, host = rnd.choice([FRONTEND, ORDERS]), rnd.choice(hosts)
        path, act = rnd.choice(["/api/orders/7", "/status", "/admin/x"]), rnd.choice(["GET", "PUT"])
        got = engine.decide(sub, host, path, act).allowed
        assert got == bool(ref.enforce(sub, host, path, act)), (sub, host, path, act)
