"""policy.csv rows are split exactly as pycasbin's own file adapter splits them."""

from __future__ import annotations

import pytest
from casbin import model as casbin_model
from casbin.persist.adapter import load_policy_line
from hypothesis import given
from hypothesis import strategies as st

from authz.policy import parse_policy_rows
from citadel.errors import PolicyError

MODEL = """
[request_definition]
r = sub, dom, obj, act
[policy_definition]
p = sub, dom, obj, act, eft
[role_definition]
g = _, _
[policy_effect]
e = some(where (p.eft == allow))
[matchers]
m = g(r.sub, p.sub) && r.dom == p.dom && r.obj == p.obj && r.act == p.act
"""


def _pycasbin_rows(text: str) -> list[tuple[str, ...]]:
    m = casbin_model.Model()
    m.load_model_from_text(MODEL)
    for line in text.split("\n"):
        load_policy_line(line.strip(), m)
    return [("p", *r) for r in m.model["p"]["p"].policy] + [
        ("g", *r) for r in m.model["g"]["g"].policy
    ]


@pytest.mark.parametrize(
    "line",
    [
        "p, role:a, *, /x, ^(GET,POST)$, allow",
        "p, role:a, *, /x, [GET,POST], allow",
        'p, "a,b", h, /x, GET, allow',
        "p,role:a,h,/x,GET,allow   ",
        "g, spiffe://cluster.local/ns/a/sa/b, role:a",
    ],
    ids=["comma_in_parens", "comma_in_brackets", "quotes_are_not_csv", "no_spaces", "g_row"],
)
def test_rows_split_like_pycasbin(line: str) -> None:
    rows, _ = parse_policy_rows(line)
    assert sorted(rows) == sorted(_pycasbin_rows(line))


@pytest.mark.parametrize(
    "line",
    ["p, a), h, /x, GET, allow", "p, (a, h, /x, GET, allow", "(p, a, h"],
    ids=["unbalanced_close", "unclosed_open", "starts_with_bracket"],
)
def test_unbalanced_brackets_are_refused_with_a_line(line: str) -> None:
    with pytest.raises(PolicyError) as err:
        parse_policy_rows("# header\n" + line)
    assert err.value.line == 2


_value = st.text(alphabet="abc:/*^$,()[] .|-", min_size=1, max_size=12)


@given(st.lists(_value, min_size=5, max_size=5))
def test_generated_p_rows_match_pycasbin(values: list[str]) -> None:
    line = "p, " + ", ".join(values)
    try:
        ours, _ = parse_policy_rows(line)
    except PolicyError:
        return  # unbalanced brackets: pycasbin would crash or mis-split; we refuse
    ours_p = [r for r in ours if r[0] == "p"]
    assert ours_p == _pycasbin_rows(line)


@given(st.text(alphabet="ab ,()[]\t", max_size=30))
def test_fast_split_equals_the_bracket_aware_split(line: str) -> None:
    """The str.split fast path never disagrees with the character loop it short-cuts."""
    from authz.policy import _split_bracketed, split_policy_line

    try:
        slow = _split_bracketed(line)
    except ValueError:
        with pytest.raises(ValueError):
            split_policy_line(line)
        return
    assert split_policy_line(line) == slow


@pytest.mark.parametrize(
    "line",
    ["", ",", ",a, b", "a,,b", "a, b ,", " a", "p, alice, /x, GET"],
    ids=["empty", "comma", "leading_comma", "empty_field", "trailing_comma", "space", "plain"],
)
def test_fast_split_edge_lines(line: str) -> None:
    from authz.policy import _split_bracketed, split_policy_line

    assert split_policy_line(line) == _split_bracketed(line)
