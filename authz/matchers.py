"""Index levels for the compiled engine: each one is exactly one pycasbin matcher function.

A level answers "which of these pattern groups match this request value?" for one
conjunct of the matcher (``keyMatch2(r.obj, p.obj)`` and so on). Patterns are compiled
once, at build time, and grouped so one request touches a few dict lookups instead of
every row. Where a shortcut (the segment trie, the prefix test) could differ from
pycasbin's regex in any corner, the level keeps pycasbin's own regex for that case:
exactness comes first, speed second.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Callable, Mapping
from typing import Any

from casbin.util.builtin_operators import KEY_MATCH2_PATTERN, KEY_MATCH3_PATTERN, glob_match

__all__ = [
    "PATTERN_FUNCTIONS",
    "Level",
    "compile_pattern",
    "key_match2_regex",
    "key_match3_regex",
    "make_level",
]

#: pycasbin builtins the compiled engine reproduces; any other function falls back.
PATTERN_FUNCTIONS = frozenset({"keyMatch", "keyMatch2", "keyMatch3", "regexMatch", "globMatch"})

_REGEX_META = frozenset("\\.^$*+?{}[]|()")

Node = Any  # a level's node, or a leaf ``(allow_index, deny_index)`` after the last level
Closure = Callable[[tuple[str, ...]], tuple[str, ...]]


def key_match2_regex(pattern: str) -> re.Pattern[str]:
    """The regex ``casbin.util.key_match2`` builds for ``pattern``, compiled once."""
    key2 = pattern.replace("/*", "/.*")
    key2 = KEY_MATCH2_PATTERN.sub(r"\g<1>[^\/]+\g<2>", key2, 0)
    if key2 == "*":
        key2 = "(.*)"
    return re.compile("^" + key2 + "$")


def key_match3_regex(pattern: str) -> re.Pattern[str]:
    """The regex ``casbin.util.key_match3`` builds for ``pattern``, compiled once."""
    key2 = pattern.replace("/*", "/.*")
    key2 = KEY_MATCH3_PATTERN.sub(r"\g<1>[^\/]+\g<2>", key2, 0)
    return re.compile("^" + key2 + "$")


def compile_pattern(func: str, pattern: str) -> Callable[[str], object]:
    """A one-argument predicate equal (in truth value) to ``func(value, pattern)``.

    Raises ``re.error`` for a pattern pycasbin would choke on at request time, so the
    policy is refused at load instead of failing on some requests later.
    """
    if func == "==":
        return pattern.__eq__
    if func == "keyMatch":
        star = pattern.find("*")
        if star == -1:
            return pattern.__eq__
        prefix = pattern[:star]
        return lambda value: value.startswith(prefix)
    if func == "keyMatch2":
        return key_match2_regex(pattern).match
    if func == "keyMatch3":
        return key_match3_regex(pattern).match
    if func == "regexMatch":
        return re.compile(pattern).match
    if func == "globMatch":
        return glob_predicate(pattern)
    raise ValueError(f"no compiled form for {func}")


_GLOB_META = frozenset("*?[\\")


@functools.lru_cache(maxsize=4096)
def glob_predicate(pattern: str) -> Callable[[str], bool]:
    """``glob_match(value, pattern)`` as a predicate, one per pattern text.

    pycasbin walks a glob in Python (~7 µs a call). Hosts are globbed against few
    distinct patterns but from thousands of index nodes (one per path group), so the
    answers are memoised per pattern, shared by every node that holds it, rather than
    per node, where each node's first request paid the walk again. Two shapes that
    ``glob_match`` decides without a walk skip it: a pattern without metacharacters
    compares characters to the end (equality), and a pattern of stars only accepts any
    value without a ``/``.
    """
    if not _GLOB_META.intersection(pattern):
        return pattern.__eq__
    if pattern.strip("*") == "":
        return lambda value: "/" not in value
    memo: dict[str, bool] = {}

    def match(value: str) -> bool:
        hit = memo.get(value)
        if hit is None:
            hit = bool(glob_match(value, pattern))
            if len(memo) >= GLOB_MEMO_SIZE:
                memo.clear()  # racing threads may both clear; each answer is exact
            memo[value] = hit
        return hit

    return match


class Level:
    """One conjunct ``func(r.<ri>, p.<pj>)`` as an index level over pattern groups.

    ``expand`` takes the whole frontier (the nodes the previous levels reached) and
    returns the children that match, so per-request work such as splitting a path
    happens once per level, not once per node.
    """

    __slots__ = ("func", "pj", "ri")

    def __init__(self, func: str, ri: int, pj: int) -> None:
        self.func = func
        self.ri = ri
        self.pj = pj

    def make_node(self, children: Mapping[str, Node]) -> Node:
        raise NotImplementedError

    def expand(self, frontier: list[Node], req: tuple[str, ...]) -> list[Node]:
        raise NotImplementedError


class _ExactLevel(Level):
    """``r.x == p.y``: one dict lookup."""

    __slots__ = ()

    def make_node(self, children: Mapping[str, Node]) -> Node:
        return dict(children)

    def expand(self, frontier: list[Node], req: tuple[str, ...]) -> list[Node]:
        value = req[self.ri]
        out = []
        for node in frontier:
            child = node.get(value)
            if child is not None:
                out.append(child)
        return out


class _RoleLevel(Level):
    """``g(r.x, p.y)``: look up each name the request subject has (itself and its roles)."""

    __slots__ = ("names",)

    def __init__(self, func: str, ri: int, pj: int, names: Callable[[tuple[str, ...]], Any]):
        super().__init__(func, ri, pj)
        self.names = names

    def make_node(self, children: Mapping[str, Node]) -> Node:
        return dict(children)

    def expand(self, frontier: list[Node], req: tuple[str, ...]) -> list[Node]:
        names = self.names(req)
        out = []
        for node in frontier:
            get = node.get
            for name in names:
                child = get(name)
                if child is not None:
                    out.append(child)
        return out


class _PrefixLevel(Level):
    """``keyMatch``: exact patterns in a dict, ``*`` patterns as prefixes (pycasbin's rule:
    everything after the first ``*`` is ignored)."""

    __slots__ = ()

    def make_node(self, children: Mapping[str, Node]) -> Node:
        exact: dict[str, Node] = {}
        prefixes: list[tuple[str, Node]] = []
        for pattern, child in children.items():
            star = pattern.find("*")
            if star == -1:
                exact[pattern] = child
            else:
                prefixes.append((pattern[:star], child))
        return exact, tuple(prefixes)

    def expand(self, frontier: list[Node], req: tuple[str, ...]) -> list[Node]:
        value = req[self.ri]
        out = []
        for exact, prefixes in frontier:
            child = exact.get(value)
            if child is not None:
                out.append(child)
            for prefix, child in prefixes:
                if value.startswith(prefix):
                    out.append(child)
        return out


_NO_CHILDREN: dict[str, Any] = {}  # shared by leaf nodes; never written to


class _Trie:
    __slots__ = ("end", "lit", "param", "tail")

    def __init__(self) -> None:
        self.lit: dict[str, _Trie] = _NO_CHILDREN  # replaced on first insert
        self.param: _Trie | None = None
        self.end: list[Node] = []  # patterns that end here
        self.tail: list[Node] = []  # patterns ending in "/*" here


_SEG = r"(?:[^/:\\.^$*+?{}\[\]|()]*|:[^/]+)"
#: Patterns whose every segment is a plain literal or a whole ``:param``, optionally
#: ending in ``/*``: the ones the trie reproduces exactly.
_TRIE_EXACT = re.compile(_SEG + "(?:/" + _SEG + ")*(?:/\\*)?")


def _trie_segments(pattern: str) -> list[tuple[str, str]] | None:
    """Segments of a keyMatch2 pattern the trie reproduces exactly, or None.

    Exact means: for any value without a newline, walking the trie gives the same answer
    as pycasbin's regex. Literal segments may hold no regex metacharacter (``.`` alone
    would match ``/``), ``:name`` is a whole segment, ``*`` only as the last one.
    """
    if _TRIE_EXACT.fullmatch(pattern) is None:
        return None
    out: list[tuple[str, str]] = []
    for seg in pattern.split("/"):
        if seg[:1] == ":":
            out.append(("param", ""))
        elif seg == "*":
            out.append(("tail", ""))
        else:
            out.append(("lit", seg))
    return out


def trie_exact(pattern: str) -> bool:
    """True when the trie decides ``pattern`` (so its regex is known to be valid)."""
    return pattern == "*" or _TRIE_EXACT.fullmatch(pattern) is not None


class _PathNode:
    """One keyMatch2 node: a trie, the non-RESTful patterns as regexes, and (built on
    first need) every pattern's regex for values with a newline."""

    __slots__ = ("anything", "children", "every", "regexes", "root")

    def __init__(self, children: Mapping[str, Node]) -> None:
        self.root = _Trie()
        self.children = dict(children)
        self.every: tuple[tuple[Callable[[str], object], Node], ...] | None = None
        anything: list[Node] = []
        regexes: list[tuple[Callable[[str], object], Node]] = []
        for pattern, child in children.items():
            if pattern == "*":
                anything.append(child)
                continue
            segs = _trie_segments(pattern)
            if segs is None:
                regexes.append((key_match2_regex(pattern).match, child))
                continue
            t = self.root
            for kind, lit in segs:
                if kind == "lit":
                    nxt = t.lit.get(lit)
                    if nxt is None:
                        if t.lit is _NO_CHILDREN:
                            t.lit = {}
                        nxt = t.lit[lit] = _Trie()
                    t = nxt
                elif kind == "param":
                    if t.param is None:
                        t.param = _Trie()
                    t = t.param
            if segs[-1][0] == "tail":
                t.tail.append(child)
            else:
                t.end.append(child)
        self.anything = tuple(anything)
        self.regexes = tuple(regexes)

    def with_newline(self, value: str, out: list[Node]) -> None:
        every = self.every
        if every is None:  # two threads may both build it; they build the same thing
            every = self.every = tuple(
                (key_match2_regex(p).match, c) for p, c in self.children.items()
            )
        for match, child in every:
            if match(value):
                out.append(child)


class _PathLevel(Level):
    """``keyMatch2``: a segment trie for RESTful patterns, pycasbin's regex for the rest.

    Values containing a newline (where ``.`` and ``$`` behave specially) go through the
    regexes of every pattern in the node, so the trie never has to model them.
    """

    __slots__ = ()

    def make_node(self, children: Mapping[str, Node]) -> Node:
        return _PathNode(children)

    def expand(self, frontier: list[Node], req: tuple[str, ...]) -> list[Node]:
        value = req[self.ri]
        out: list[Node] = []
        if "\n" in value:
            for node in frontier:
                node.with_newline(value, out)
            return out
        segs = value.split("/")
        n = len(segs)
        for node in frontier:
            if node.anything:
                out.extend(node.anything)
            for match, child in node.regexes:
                if match(value):
                    out.append(child)
            _walk(node.root, segs, 0, n, out)
        return out


def _walk(t: _Trie, segs: list[str], i: int, n: int, out: list[Node]) -> None:
    """Follow ``segs[i:]`` down the trie; loops while there is one way on, recurses where a
    literal and a ``:param`` child both match the segment."""
    while i < n:
        if t.tail:
            out.extend(t.tail)
        seg = segs[i]
        i += 1
        c = t.lit.get(seg)
        p = t.param if seg else None
        if c is None:
            if p is None:
                return
            t = p
        elif p is None:
            t = c
        else:
            _walk(p, segs, i, n, out)
            t = c
    if t.end:
        out.extend(t.end)


class _ListLevel(Level):
    """regexMatch, keyMatch3, globMatch: one compiled predicate per distinct pattern."""

    __slots__ = ()

    def make_node(self, children: Mapping[str, Node]) -> Node:
        return tuple((compile_pattern(self.func, p), child) for p, child in children.items())

    def expand(self, frontier: list[Node], req: tuple[str, ...]) -> list[Node]:
        value = req[self.ri]
        out = []
        for node in frontier:
            for match, child in node:
                if match(value):
                    out.append(child)
        return out


#: Values remembered per globMatch pattern before its memo is cleared.
GLOB_MEMO_SIZE = 256


def make_level(func: str, ri: int, pj: int, names: Closure | None = None) -> Level:
    """The level for ``func(r.<ri>, p.<pj>)``; ``names`` for role functions."""
    if func == "==":
        return _ExactLevel(func, ri, pj)
    if func == "g":
        assert names is not None
        return _RoleLevel(func, ri, pj, names)
    if func == "keyMatch":
        return _PrefixLevel(func, ri, pj)
    if func == "keyMatch2":
        return _PathLevel(func, ri, pj)
    if func in PATTERN_FUNCTIONS:
        return _ListLevel(func, ri, pj)
    raise ValueError(f"no compiled form for {func}")
