"""PolicyReader parses only the lines that changed, and gets exactly what a full read gets:
the same rows, line numbers, revision, and the same refusal (message, file, line)."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from authz.loading import _remember_counts, counts_for
from authz.policy import (
    Policy,
    PolicyBytes,
    PolicyReader,
    _byte_span,
    common_affixes,
    load_policy_dir,
    rule_counts,
)
from citadel.errors import PolicyError

MODEL = (Path(__file__).resolve().parents[2] / "policies" / "model.conf").read_text()
OTHER_MODEL = MODEL.replace("g = _, _", "g = _, _\ng2 = _, _")

LINES = [
    "p, role:a, *, /api/:id, ^GET$, allow",
    "p, role:b, *.shop, /x/*, ^(GET|POST)$, deny",
    "p,role:c,h,/y,^GET$,allow",
    "  p, role:a, h, /z, [GP]ET, allow  ",
    "g, spiffe://td/ns/a/sa/b, role:a",
    "g, role:a, role:b",
    "# a comment, with commas",
    "",
    "   ",
]
BAD_LINES = [
    "p, role:a, *, /x",  # too few values
    "q, role:a, *, /x, GET, allow",  # unknown policy type
    "p, role:a, *, /x, (GET, allow",  # unclosed bracket
    "p, role:a, *, /x, GET, maybe",  # effect neither allow nor deny
]


def _read_full(d: Path) -> tuple[object, ...]:
    try:
        return ("ok", load_policy_dir(d))
    except PolicyError as exc:
        return ("error", exc.message, exc.file, exc.line)


def _read(reader: PolicyReader, d: Path, *, given: bool = False) -> tuple[object, ...]:
    """``given``: the files as a reload's snapshot already read and hashed them."""
    try:
        if given:
            files = PolicyBytes.of((d / "model.conf").read_bytes(), (d / "policy.csv").read_bytes())
            return ("ok", reader.read(d, given=files))
        return ("ok", reader.read(d))
    except PolicyError as exc:
        return ("error", exc.message, exc.file, exc.line)


@st.composite
def revisions(draw: st.DrawFn) -> list[tuple[str, list[str]]]:
    """A first policy, then edits: splice a run of lines (insert, delete, replace)."""
    lines = draw(st.lists(st.sampled_from(LINES), max_size=30))
    out = [(MODEL, list(lines))]
    for _ in range(draw(st.integers(1, 5))):
        start = draw(st.integers(0, len(lines)))
        stop = draw(st.integers(start, min(len(lines), start + 4)))
        pool = LINES + BAD_LINES if draw(st.integers(0, 4)) == 0 else LINES
        lines = lines[:start] + draw(st.lists(st.sampled_from(pool), max_size=4)) + lines[stop:]
        model = OTHER_MODEL if draw(st.integers(0, 9)) == 0 else MODEL
        out.append((model, list(lines)))
    return out


#: How a revision is written: plain, with CRLF line ends (read whole: universal newlines),
#: or with a byte that is not UTF-8 in its last line (refused, naming the file).
ENCODINGS = ["lf", "lf", "lf", "crlf", "not-utf8"]


def _write(path: Path, lines: list[str], trailing_newline: bool, encoding: str) -> None:
    data = ("\n".join(lines) + ("\n" if trailing_newline else "")).encode()
    if encoding == "crlf":
        data = data.replace(b"\n", b"\r\n")
    elif encoding == "not-utf8":
        data += b"p, role:\xff, *, /x, GET, allow\n"
    path.write_bytes(data)


@settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    revisions(),
    st.booleans(),
    st.lists(st.sampled_from(ENCODINGS), min_size=6, max_size=6),
    st.lists(st.booleans(), min_size=6, max_size=6),
)
def test_incremental_read_equals_a_full_read(
    tmp_path: Path,
    revs: list[tuple[str, list[str]]],
    trailing_newline: bool,
    codes: list[str],
    given: list[bool],
) -> None:
    reader = PolicyReader()
    base: Policy | None = None  # the reader's last good read
    for (model, lines), encoding, pre_read in zip(revs, codes, given, strict=False):
        (tmp_path / "model.conf").write_text(model)
        _write(tmp_path / "policy.csv", lines, trailing_newline, encoding)
        got = _read(reader, tmp_path, given=pre_read)
        assert got == _read_full(tmp_path)
        if got[0] == "ok" and got[1].splice is not None:
            assert base is not None
            _assert_splice_rebuilds(got[1], base)
        if got[0] == "ok":  # rule counts for /v1/policy, kept up to date from the base's
            _remember_counts(got[1])
            assert counts_for(got[1].revision) == rule_counts(got[1])
        if got[0] == "ok":
            base = got[1]


def _assert_splice_rebuilds(policy: Policy, base: Policy) -> None:
    """``splice`` says truly how the rows derive from the last good read's."""
    sp = policy.splice
    assert sp is not None and sp.base == base.revision
    assert policy.rows[: sp.head] == base.rows[: sp.head]
    assert policy.rows[sp.head + sp.added :] == base.rows[sp.head + sp.removed :]
    assert all(n <= sp.start_line for n in base.lines[: sp.head])
    assert all(n > sp.old_end_line for n in base.lines[sp.head + sp.removed :])
    moved = [n + sp.shift for n in base.lines[sp.head + sp.removed :]]
    assert list(policy.lines[sp.head + sp.added :]) == moved


@settings(max_examples=400, deadline=None)
@given(
    st.lists(st.sampled_from([b"a", b"b", b"\n", b"ab", b"\n\n"]), max_size=40),
    st.lists(st.sampled_from([b"a", b"b", b"\n", b"ab", b"\n\n"]), max_size=12),
    st.integers(0, 40),
    st.integers(0, 6),
)
def test_byte_span_covers_exactly_the_changed_lines(
    base: list[bytes], insert: list[bytes], at: int, cut: int
) -> None:
    """The lines outside the span are equal in both files, and the bytes it names are
    the span's lines; a line edit is a span of about that many lines."""
    old = b"".join(base)
    new = b"".join(base[:at] + insert + base[at + cut :])
    old_end, start, stop, a, b = _byte_span(old, new)
    old_lines, new_lines = old.split(b"\n"), new.split(b"\n")
    assert start <= stop and start <= old_end
    assert old_lines[:start] == new_lines[:start]
    assert old_lines[old_end:] == new_lines[stop:]
    assert (new[a:b].split(b"\n") if stop > start else []) == new_lines[start:stop]


@pytest.mark.parametrize("at", [0, 40, 99])
def test_a_line_deleted_parses_nothing(tmp_path: Path, at: int) -> None:
    rows = [f"p, role:r{k}, *, /api/{k}, ^GET$, allow" for k in range(100)]
    (tmp_path / "model.conf").write_text(MODEL)
    (tmp_path / "policy.csv").write_text("\n".join(rows) + "\n")
    reader = PolicyReader()
    base = reader.read(tmp_path)
    del rows[at]
    (tmp_path / "policy.csv").write_text("\n".join(rows) + "\n")
    policy = reader.read(tmp_path)
    assert reader.last_parsed == 0
    assert policy == load_policy_dir(tmp_path)
    assert policy.splice is not None and (policy.splice.removed, policy.splice.added) == (1, 0)
    _assert_splice_rebuilds(policy, base)


def test_a_one_line_edit_parses_one_line(tmp_path: Path) -> None:
    rows = [f"p, role:r{k}, *, /api/{k}, ^GET$, allow" for k in range(500)]
    (tmp_path / "model.conf").write_text(MODEL)
    (tmp_path / "policy.csv").write_text("\n".join(rows) + "\n")
    reader = PolicyReader()
    reader.read(tmp_path)
    assert reader.last_parsed == 501  # the first read: every line
    rows.insert(250, "p, role:new, *, /new, ^GET$, allow")
    (tmp_path / "policy.csv").write_text("\n".join(rows) + "\n")
    policy = reader.read(tmp_path)
    assert reader.last_parsed == 1
    assert policy == load_policy_dir(tmp_path)
    assert policy.lines[-1] == 501  # the rows after the insert moved down one line


@pytest.mark.parametrize(
    "change",
    [pytest.param("many-lines", id="more-lines-changed-than-allowed"), "model"],
)
def test_too_large_a_change_is_declined_then_adopted(tmp_path: Path, change: str) -> None:
    rows = [f"p, role:r{k}, *, /api/{k}, ^GET$, allow" for k in range(50)]
    (tmp_path / "model.conf").write_text(MODEL)
    (tmp_path / "policy.csv").write_text("\n".join(rows) + "\n")
    reader = PolicyReader()
    reader.read(tmp_path, max_changed=5)  # a first read is always done
    if change == "model":
        (tmp_path / "model.conf").write_text(OTHER_MODEL)
    else:
        rows[10:20] = [f"p, role:x{k}, *, /b/{k}, ^GET$, allow" for k in range(10)]
        (tmp_path / "policy.csv").write_text("\n".join(rows) + "\n")
    assert reader.read(tmp_path, max_changed=5) is None
    parsed_elsewhere = load_policy_dir(tmp_path)
    reader.adopt(parsed_elsewhere)
    rows.append("p, role:last, *, /last, ^GET$, allow")
    (tmp_path / "policy.csv").write_text("\n".join(rows) + "\n")
    assert reader.read(tmp_path, max_changed=5) == load_policy_dir(tmp_path)
    assert reader.last_parsed == 1  # diffed against what was adopted


def test_adopt_ignores_a_policy_from_other_texts(tmp_path: Path) -> None:
    (tmp_path / "model.conf").write_text(MODEL)
    (tmp_path / "policy.csv").write_text("p, a, *, /a, GET, allow\n")
    reader = PolicyReader()
    first = reader.read(tmp_path)
    (tmp_path / "policy.csv").write_text("".join(f"p, a, *, /{k}, GET, allow\n" for k in range(9)))
    assert reader.read(tmp_path, max_changed=2) is None
    reader.adopt(first)  # not what was declined: the reader keeps its own last read
    assert reader.read(tmp_path) == load_policy_dir(tmp_path)
    assert reader.last_parsed == 9


def _affixes_by_loop(a: list[str], b: list[str]) -> tuple[int, int]:
    lim = min(len(a), len(b))
    p = 0
    while p < lim and a[p] == b[p]:
        p += 1
    s = 0
    while s < lim - p and a[-1 - s] == b[-1 - s]:
        s += 1
    return p, s


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.sampled_from("ab"), max_size=1500),
    st.integers(0, 1500),
    st.lists(st.sampled_from("abc"), max_size=600),
    st.integers(0, 600),
)
def test_common_affixes_equal_a_plain_loop(
    base: list[str], at: int, insert: list[str], cut: int
) -> None:
    """Block-wise comparison finds the same prefix and suffix as comparing one by one,
    including long runs (past the 256-item blocks) and overlapping repeats."""
    edited = base[:at] + insert + base[at + cut :]
    assert common_affixes(base, edited) == _affixes_by_loop(base, edited)
    assert common_affixes(edited, base) == _affixes_by_loop(edited, base)
