"""What a policy means to the compiled engine: the model read with pycasbin's own parser,
the policy validated against it, and whether the compiled engine can decide it.

``analyse`` either returns what ``CompiledEngine`` needs (the matcher as a conjunction of
role, equality and pattern tests, the rows split by type) or says why only pycasbin
itself can decide this model (``fallback_reason``). It refuses, with file and line, what
pycasbin would refuse or fail on at request time, so a reload keeps the last good policy.

A reload's policy usually differs from the serving one in a few lines (``Policy.splice``
says which): its analysis is then the serving analysis with those rows replaced, and
only they are validated again, instead of a walk over every row of a large policy.
"""

from __future__ import annotations

import ast
import bisect
import dataclasses
import re
from collections.abc import Collection
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from casbin import model as casbin_model
from casbin import util as casbin_util
from casbin.constant.constants import (
    ALLOW_AND_DENY_EFFECT,
    ALLOW_OVERRIDE_EFFECT,
    DENY_OVERRIDE_EFFECT,
    PRIORITY_EFFECT,
    SUBJECT_PRIORITY_EFFECT,
)
from casbin.model.function import FunctionMap

from authz.matchers import PATTERN_FUNCTIONS
from authz.pacing import breathe
from citadel.errors import PolicyError

if TYPE_CHECKING:
    from authz.policy import Policy

__all__ = ["Analysis", "Conjunct", "analyse"]

MODEL_FILE = "model.conf"
POLICY_FILE = "policy.csv"

_SECTIONS = {
    "r": "request_definition",
    "p": "policy_definition",
    "e": "policy_effect",
    "m": "matchers",
}
_COMPILED_EFFECTS = (ALLOW_OVERRIDE_EFFECT, DENY_OVERRIDE_EFFECT, ALLOW_AND_DENY_EFFECT)
_BUILTINS = frozenset(FunctionMap.load_function_map().get_functions())


@dataclass(frozen=True, slots=True)
class Conjunct:
    """``func(r.<ri>, p.<pj>)``; for roles ``func`` is "g" and ``gkey`` names the role
    definition, ``dom_ri`` the request field a domain role definition is looked up in."""

    func: str
    ri: int
    pj: int
    gkey: str | None = None
    dom_ri: int | None = None


@dataclass(slots=True)
class Analysis:
    """A validated model + policy, and whether the compiled engine can decide it."""

    model: Any  # casbin.model.Model
    r_tokens: list[str]
    p_tokens: list[str]
    effect: str
    matcher: str
    conjuncts: list[Conjunct] | None
    fallback_reason: str | None
    #: ptype "p" rows (values only) in policy order, with their csv lines.
    p_rows: list[tuple[str, ...]] = field(default_factory=list)
    p_lines: list[int | None] = field(default_factory=list)
    #: role definition key -> its rows (values only), in policy order, and their lines.
    g_rows: dict[str, list[tuple[str, ...]]] = field(default_factory=dict)
    g_lines: dict[str, list[int | None]] = field(default_factory=dict)
    g_arity: dict[str, int] = field(default_factory=dict)
    #: The policy revision and model text analysed (what a later splice must start from).
    revision: str = ""
    model_text: str = ""
    #: Whether every row's line is known (a policy built in memory may not say).
    has_lines: bool = False
    #: The custom matcher functions the model was analysed with.
    functions: tuple[str, ...] = ()
    #: Set when these rows were spliced into ``previous``'s: (its revision, the p rows
    #: kept from its front, from its back). The engine reuses its index around them.
    p_splice: tuple[str, int, int] | None = None


def _rewrite(expr: str) -> str:
    """pycasbin's ``_get_expression`` rewrite of a matcher into Python syntax."""
    expr = expr.replace("&&", "and").replace("||", "or")
    return re.sub(r"!(?!=)", "not ", expr)


def _load_model(text: str) -> Any:
    m = casbin_model.Model()
    try:
        m.load_model_from_text(text)
    except Exception as exc:  # pycasbin's config parser raises bare exceptions
        raise PolicyError(f"model does not parse: {exc}", file=MODEL_FILE) from exc
    for sec, name in _SECTIONS.items():
        if m[sec] is None or sec not in m[sec]:
            raise PolicyError(f"model has no [{name}] with '{sec} = ...'", file=MODEL_FILE)
    return m


def analyse(
    policy: Policy,
    *,
    extra_functions: Collection[str] = (),
    previous: Analysis | None = None,
) -> Analysis:
    """Validate ``policy`` completely and decide whether it compiles.

    Raises PolicyError (with file and line where known) for anything pycasbin would
    refuse or fail on at request time, so the reload path can keep the last good policy.
    ``previous``: the serving revision's analysis. Its role rows were proven free of
    cycles, so a role definition whose rows equal them is not walked again; when
    ``policy.splice`` says how the rows derive from that revision (same model), only the
    new rows are checked and the rest are spliced in.
    """
    if (
        previous is not None
        and previous.model_text == policy.model_text
        and previous.functions == tuple(extra_functions)
    ):
        # The same model means the same analysis of it (pycasbin's model object is only
        # read after loading); only the rows are new.
        analysis = dataclasses.replace(
            previous, p_rows=[], p_lines=[], g_rows={}, g_lines={}, p_splice=None
        )
    else:
        analysis = _analyse_model(policy.model_text, extra_functions)
    analysis.revision = policy.revision
    analysis.has_lines = bool(policy.lines)
    breathe()
    if _splices(policy, previous):
        assert previous is not None
        _splice_rows(policy, previous, analysis)
    else:
        _load_rows(policy, analysis)
    breathe()
    for gkey, arity in analysis.g_arity.items():
        rows = analysis.g_rows.get(gkey, [])
        if previous is None or previous.g_rows.get(gkey) != rows:
            _check_acyclic(gkey, arity, rows, policy)
    return analysis


def _analyse_model(model_text: str, extra_functions: Collection[str]) -> Analysis:
    """The model's part of an analysis (rows empty): refused, compiled, or pycasbin's."""
    m = _load_model(model_text)
    r_tokens = list(m["r"]["r"].tokens)
    if len(r_tokens) != 4:
        raise PolicyError(
            "request definition must take exactly 4 values (sub, dom, obj, act), "
            f"got {len(r_tokens)}: r = {m['r']['r'].value}",
            file=MODEL_FILE,
        )
    p_tokens = list(m["p"]["p"].tokens)
    effect = m["e"]["e"].value
    reasons: list[str] = []
    if effect in (PRIORITY_EFFECT, SUBJECT_PRIORITY_EFFECT):
        reasons.append(f"priority effect {effect!r}")
    elif effect not in _COMPILED_EFFECTS:
        raise PolicyError(f"unsupported policy effect {effect!r}", file=MODEL_FILE)
    if "p_priority" in p_tokens:
        reasons.append("policy definition has a priority column")

    g_arity: dict[str, int] = {}
    for gkey, assertion in (m["g"] or {}).items():
        count = assertion.value.count("_")
        if count < 2:
            raise PolicyError(
                f"role definition {gkey} = {assertion.value} needs at least two '_'",
                file=MODEL_FILE,
            )
        if assertion.params_tokens:
            reasons.append(f"conditional role definition {gkey}")
        elif count > 3:
            reasons.append(f"role definition {gkey} with {count} fields")
        g_arity[gkey] = count

    matcher = m["m"]["m"].value
    functions = set(_BUILTINS) | set(g_arity) | set(extra_functions)
    conjuncts, reason = _analyse_matcher(matcher, r_tokens, p_tokens, functions, g_arity, m)
    if reason:
        reasons.append(reason)
    if extra_functions:
        reasons.append("custom functions " + ", ".join(sorted(extra_functions)))

    return Analysis(
        model=m,
        r_tokens=r_tokens,
        p_tokens=p_tokens,
        effect=effect,
        matcher=matcher,
        conjuncts=None if reasons else conjuncts,
        fallback_reason="; ".join(reasons) or None,
        g_arity=g_arity,
        model_text=model_text,
        functions=tuple(extra_functions),
    )


def _analyse_matcher(
    matcher: str,
    r_tokens: list[str],
    p_tokens: list[str],
    functions: set[str],
    g_arity: dict[str, int],
    m: Any,
) -> tuple[list[Conjunct], str | None]:
    if casbin_util.has_eval(matcher):
        return [], "matcher uses eval()"
    try:
        body = ast.parse(_rewrite(matcher).strip()).body
    except SyntaxError as exc:
        raise PolicyError(f"matcher does not parse: {exc.msg}: {matcher}", file=MODEL_FILE) from exc
    if len(body) != 1 or not isinstance(body[0], ast.Expr):
        raise PolicyError(f"matcher is not one expression: {matcher!r}", file=MODEL_FILE)
    tree = body[0].value
    names = set(r_tokens) | set(p_tokens)
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            if node.func.id not in functions:
                raise PolicyError(
                    f"matcher calls unknown function {node.func.id}()", file=MODEL_FILE
                )
        elif isinstance(node, ast.Name) and node.id not in names and node.id not in functions:
            shown = node.id.replace("_", ".", 1)
            raise PolicyError(
                f"matcher uses {shown}, which the request and policy definitions lack",
                file=MODEL_FILE,
            )

    terms = _conjunction(tree)
    conjuncts: list[Conjunct] = []
    for term in terms:
        conj = _conjunct(term, r_tokens, p_tokens, g_arity)
        if conj is None:
            return [], f"matcher term {ast.unparse(term)!r} has no compiled form"
        conjuncts.append(conj)
    return conjuncts, None


def _conjunction(tree: ast.expr) -> list[ast.expr]:
    if isinstance(tree, ast.BoolOp) and isinstance(tree.op, ast.And):
        out: list[ast.expr] = []
        for value in tree.values:
            out.extend(_conjunction(value))
        return out
    return [tree]


def _conjunct(
    term: ast.expr, r_tokens: list[str], p_tokens: list[str], g_arity: dict[str, int]
) -> Conjunct | None:
    def r_index(node: ast.expr) -> int | None:
        if isinstance(node, ast.Name) and node.id in r_tokens:
            return r_tokens.index(node.id)
        return None

    def p_index(node: ast.expr) -> int | None:
        if isinstance(node, ast.Name) and node.id in p_tokens:
            return p_tokens.index(node.id)
        return None

    if isinstance(term, ast.Compare) and len(term.ops) == 1 and isinstance(term.ops[0], ast.Eq):
        left, right = term.left, term.comparators[0]
        ri, pj = r_index(left), p_index(right)
        if ri is None or pj is None:
            ri, pj = r_index(right), p_index(left)
        if ri is not None and pj is not None:
            return Conjunct("==", ri, pj)
        return None
    if not (isinstance(term, ast.Call) and isinstance(term.func, ast.Name)) or term.keywords:
        return None
    fn, args = term.func.id, term.args
    if len(args) < 2:
        return None
    ri, pj = r_index(args[0]), p_index(args[1])
    if ri is None or pj is None:
        return None
    if fn in PATTERN_FUNCTIONS and len(args) == 2:
        return Conjunct(fn, ri, pj)
    arity = g_arity.get(fn)
    if arity == 2 and len(args) == 2:
        return Conjunct("g", ri, pj, gkey=fn)
    if arity == 3 and len(args) == 3 and (di := r_index(args[2])) is not None:
        return Conjunct("g", ri, pj, gkey=fn, dom_ri=di)
    return None


def _load_rows(policy: Policy, a: Analysis, rows: range | None = None) -> None:
    """Check each row's type and arity against the model and append it to ``a``'s lists
    (all rows, or those in ``rows``)."""
    m = a.model
    kinds: dict[str, tuple[str, int]] = {}  # ptype -> (section, values it takes)
    p_rows, p_lines = a.p_rows, a.p_lines
    every, lines = policy.rows, policy.lines
    for n in range(len(every)) if rows is None else rows:
        if not n & 511:
            breathe()
        row, line = every[n], lines[n] if lines else None
        ptype = row[0]
        kind = kinds.get(ptype)
        if kind is None:
            sec = ptype[:1]
            defs = m[sec] if sec in ("p", "g") else None
            if not defs or ptype not in defs:
                raise PolicyError(
                    f"unknown policy type {ptype!r} (the model defines "
                    f"{', '.join(sorted(list(m['p']) + list(m['g'] or {})))})",
                    file=POLICY_FILE,
                    line=line,
                )
            want = len(defs[ptype].tokens) if sec == "p" else a.g_arity[ptype]
            kind = kinds[ptype] = (sec, want)
        sec, want = kind
        if len(row) - 1 != want:
            raise PolicyError(
                f"{ptype} row has {len(row) - 1} values, its definition "
                f"'{ptype} = {m[sec][ptype].value}' takes {want}",
                file=POLICY_FILE,
                line=line,
            )
        if ptype == "p":
            p_rows.append(row[1:])
            p_lines.append(line)
        elif sec == "g":
            a.g_rows.setdefault(ptype, []).append(row[1:])
            a.g_lines.setdefault(ptype, []).append(line)


def _splices(policy: Policy, previous: Analysis | None) -> bool:
    """True when ``policy``'s rows are ``previous``'s with one span replaced, under the
    same model, and both know their lines (which place the span in each row list)."""
    sp = policy.splice
    return (
        sp is not None
        and previous is not None
        and sp.base == previous.revision
        and previous.model_text == policy.model_text
        and bool(policy.lines)
        and previous.has_lines
    )


def _splice_rows(policy: Policy, previous: Analysis, a: Analysis) -> None:
    """``a``'s rows as ``previous``'s with the span ``policy.splice`` names replaced by
    the new rows, which alone are checked. Lists of a role definition the edit did not
    touch are ``previous``'s own (nothing mutates an analysis after it is built)."""
    sp = policy.splice
    assert sp is not None
    _load_rows(policy, a, range(sp.head, sp.head + sp.added))
    start, end, shift = sp.start_line, sp.old_end_line, sp.shift

    def splice(
        rows: list[tuple[str, ...]], lines: list[int | None], new_rows: list, new_lines: list
    ) -> tuple[list[tuple[str, ...]], list[int | None], int, int]:
        head = bisect.bisect_right(lines, start)  # type: ignore[arg-type]
        tail = bisect.bisect_right(lines, end)  # type: ignore[arg-type]
        if head == tail and not new_rows and not shift:
            return rows, lines, head, len(rows) - tail
        after = lines[tail:]
        moved = [n + shift for n in after] if shift else after  # type: ignore[operator]
        return (
            rows[:head] + new_rows + rows[tail:],
            lines[:head] + new_lines + moved,
            head,
            len(rows) - tail,
        )

    a.p_rows, a.p_lines, kept_front, kept_back = splice(
        previous.p_rows, previous.p_lines, a.p_rows, a.p_lines
    )
    a.p_splice = (previous.revision, kept_front, kept_back)
    mid_rows, mid_lines = a.g_rows, a.g_lines
    a.g_rows, a.g_lines = {}, {}
    for gkey in [*previous.g_rows, *(k for k in mid_rows if k not in previous.g_rows)]:
        rows, lines, _, _ = splice(
            previous.g_rows.get(gkey, []),
            previous.g_lines.get(gkey, []),
            mid_rows.get(gkey, []),
            mid_lines.get(gkey, []),
        )
        if rows:
            a.g_rows[gkey], a.g_lines[gkey] = rows, lines
    # In policy order of each definition's first row, as a full read would have them.
    order = sorted(a.g_rows, key=lambda k: a.g_lines[k][0])  # type: ignore[arg-type,return-value]
    a.g_rows = {k: a.g_rows[k] for k in order}
    a.g_lines = {k: a.g_lines[k] for k in order}


def _check_acyclic(gkey: str, arity: int, rows: list[tuple[str, ...]], policy: Policy) -> None:
    """A role cycle is always a mistake in a reviewed policy; refuse it at load."""
    graphs: dict[str, dict[str, list[str]]] = {}
    for row in rows:
        dom = row[2] if arity >= 3 else ""
        graphs.setdefault(dom, {}).setdefault(row[0], []).append(row[1])
    for dom, graph in graphs.items():
        state: dict[str, int] = {}  # 1 = on the current path, 2 = done
        for start in graph:
            if state.get(start):
                continue
            path = [start]
            stack = [iter(graph.get(start, ()))]
            state[start] = 1
            while stack:
                nxt = next(stack[-1], None)
                if nxt is None:
                    state[path.pop()] = 2
                    stack.pop()
                    continue
                s = state.get(nxt)
                if s == 1:
                    cycle = [*path[path.index(nxt) :], nxt]
                    where = f" in domain {dom!r}" if arity >= 3 else ""
                    raise PolicyError(
                        f"role cycle in {gkey}{where}: {' -> '.join(cycle)}",
                        file=POLICY_FILE,
                        line=_g_line(policy, gkey, cycle[-2], cycle[-1]),
                    )
                if s is None:
                    state[nxt] = 1
                    path.append(nxt)
                    stack.append(iter(graph.get(nxt, ())))


def _g_line(policy: Policy, gkey: str, user: str, role: str) -> int | None:
    for row, line in zip(policy.rows, policy.lines, strict=False):
        if row[0] == gkey and row[1] == user and row[2] == role:
            return line
    return None
