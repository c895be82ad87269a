"""Compiled matcher predicates against pycasbin's own functions."""

from __future__ import annotations

from casbin.util.builtin_operators import glob_match
from hypothesis import given, settings
from hypothesis import strategies as st

from authz.matchers import compile_pattern, glob_predicate

#: Glob metacharacters, the separator glob_match treats specially, and plain letters.
_GLOB_ALPHABET = st.sampled_from(list("ab.-/*?[]!\\^"))
globs = st.text(_GLOB_ALPHABET, max_size=10)
values = st.text(st.sampled_from(list("ab.-/*?[]")), max_size=10)


@settings(max_examples=3000, deadline=None)
@given(globs, st.lists(values, min_size=1, max_size=6))
def test_glob_predicate_answers_as_glob_match(pattern: str, asked: list[str]) -> None:
    """Every shape (literal, stars only, general) and the memo's repeat answers."""
    match = compile_pattern("globMatch", pattern)
    for value in asked + asked:  # the second pass is answered from the memo
        assert match(value) == bool(glob_match(value, pattern)), (pattern, value)


def test_literal_and_star_only_globs_skip_the_walk() -> None:
    assert glob_predicate("api.example") == "api.example".__eq__
    star = glob_predicate("**")
    assert star("a.example") and not star("a/b") and star("")
    assert glob_predicate("*.example") is glob_predicate("*.example")  # one memo per pattern
