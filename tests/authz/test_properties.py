"""Property tests (bounded budget) for the path normaliser and the policy loader.

The normaliser's promises: whatever it accepts is absolute and already normal (a second
pass changes nothing) and holds none of the spellings that mean different paths to
different servers; anything else is refused with ``Refused``, never a crash. The loader's:
any text at all either loads or is refused with ``PolicyError``.
"""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz.loading import load_engine
from authz.request import MAX_PATH_BYTES, Refused, normalize_path, request_tuple
from citadel.errors import PolicyError

REPO = Path(__file__).resolve().parents[2]
MODEL = (REPO / "policies" / "model.conf").read_text()
BUDGET = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PIECES = ["/", "//", ".", "..", "%2e", "%2E", "%2e%2E", "a", "admin", "api", "%2F", "%2f",
          "%5C", "%5c", "\\", "%41", "%7e", "~", "%25", "%252F", "?", "#", ";", "%3B", "%00",
          "\x00", "%zz", "%", "%c3%a9", "%ff", "\u00e9", " ", "\t", "-", "_", ":id",
          "*"]  # fmt: skip
tricky_paths = st.lists(st.sampled_from(PIECES), max_size=24).map(lambda xs: "/" + "".join(xs))
any_text = st.text(max_size=300)
any_bytes = st.binary(max_size=300).map(lambda b: b.decode("latin-1"))


def _check_normal(out: str) -> None:
    assert out.startswith("/")
    for bad in ("//", "/./", "/../", "\x00", "\\", ";", "?", "#"):
        assert bad not in out, (bad, out)
    assert not out.endswith(("/.", "/.."))
    upper = out.upper()
    for bad in ("%2F", "%5C", "%00", "%3B", "%2E"):
        assert bad not in upper, (bad, out)
    assert out.isascii() and len(out) <= MAX_PATH_BYTES


def _normalise_or_refuse(raw: str) -> str | None:
    try:
        return normalize_path(raw)
    except Refused as refused:
        assert refused.code.startswith("path_") and refused.http_status == 403
        return None


@BUDGET
@given(st.one_of(tricky_paths, any_text, any_bytes))
def test_normaliser_accepts_only_normal_paths_and_is_idempotent(raw: str) -> None:
    out = _normalise_or_refuse(raw)
    if out is None:
        return
    _check_normal(out)
    assert normalize_path(out) == out


@BUDGET
@given(tricky_paths)
def test_dot_segments_never_climb_above_root(raw: str) -> None:
    out = _normalise_or_refuse(raw)
    if out is not None:
        segments = out.split("/")[1:]
        assert ".." not in segments and "." not in segments


@BUDGET
@given(principal=any_text, host=any_text, method=any_text, path=st.one_of(tricky_paths, any_text))
def test_request_tuple_never_crashes(principal: str, host: str, method: str, path: str) -> None:
    try:
        tup = request_tuple(principal=principal, host=host, method=method, path=path)
    except Refused:
        return
    assert tup.sub == (principal or "anonymous")
    _check_normal(tup.obj)


# ---------------------------------------------------------------- the policy loader

row_field = st.one_of(
    st.sampled_from(["role:a", "spiffe://cluster.local/ns/x/sa/y", "*", "/api/*", "/a/:id",
                     "^GET$", ".*", "(", "[", "allow", "deny", "", " ", '"', '""', "\\"]),
    st.text(max_size=12),
)  # fmt: skip
row = st.tuples(
    st.sampled_from(["p", "g", "p2", "g2", "x", "", "#"]), st.lists(row_field, max_size=7)
).map(lambda t: ", ".join([t[0], *t[1]]))
policy_text = st.one_of(st.lists(row, max_size=12).map("\n".join), st.text(max_size=400))

MODEL_LINES = MODEL.splitlines()
model_text = st.one_of(
    st.just(MODEL),
    st.text(max_size=400),
    # the real model with lines dropped, duplicated or replaced
    st.lists(st.one_of(st.sampled_from(MODEL_LINES), st.text(max_size=40)), max_size=20).map(
        "\n".join
    ),
)


def _load(model: str, policy: str) -> None:
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "model.conf").write_text(model, encoding="utf-8", errors="surrogatepass")
        (Path(d) / "policy.csv").write_text(policy, encoding="utf-8", errors="surrogatepass")
        try:
            loaded = load_engine(d)
        except PolicyError as exc:
            assert exc.message
            return
        decision = loaded.engine.decide("anonymous", "h", "/healthz", "GET")
        assert isinstance(decision.allowed, bool)


@BUDGET
@given(policy_text)
def test_policy_loader_refuses_bad_rows_with_policy_error_only(policy: str) -> None:
    _load(MODEL, policy)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(model_text, policy_text)
def test_policy_loader_refuses_bad_models_with_policy_error_only(model: str, policy: str) -> None:
    _load(model, policy)
