"""Index levels for the compiled engine: each one is exactly one pycasbin matcher function.

A level answers "which of these pattern groups match this request value?" for one
conjunct of the matcher (``keyMatch2(r.obj, p.obj)`` and so on). Patterns are compiled
once, at build time, and grouped so one request touches a few dict lookups instead of
every row. Where a shortcut (the segment trie, the prefix test) could differ from
pycasbin's regex in any corner, the level keeps pycasbin's own regex for that case:
exactness comes first, speed second.
"""

from __future__ import annotations

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
        return lambda value: glob_match(value, pattern)
    raise ValueError(f"no compiled form for {func}")


class Level:
    """One conjunct ``func(r.<ri>, p.<pj>)`` as an index level over pattern groups."""

    __slots__ = ("func", "pj", "ri")

    def __init__(self, func: str, ri: int, pj: int) -> None:
        self.func = func
        self.ri = ri
        self.pj = pj

    def make_node(self, children: Mapping[str, Node]) -> Node:
        raise NotImplementedError

    def expand(self, node: Node, req: tuple[str, ...], out: list[Node]) -> None:
        raise NotImplementedError


class _ExactLevel(Level):
    """``r.x == p.y``: one dict lookup."""

    __slots__ = ()

    def make_node(self, children: Mapping[str, Node]) -> Node:
        return dict(children)

    def expand(self, node: Node, req: tuple[str, ...], out: list[Node]) -> None:
        child = node.get(req[self.ri])
        if child is not None:
            out.append(child)


class _RoleLevel(Level):
    """``g(r.x, p.y)``: look up each name the request subject has (itself and its roles)."""

    __slots__ = ("names",)

    def __init__(self, func: str, ri: int, pj: int, names: Callable[[tuple[str, ...]], Any]):
        super().__init__(func, ri, pj)
        self.names = names

    def make_node(self, children: Mapping[str, Node]) -> Node:
        return dict(children)

    def expand(self, node: Node, req: tuple[str, ...], out: list[Node]) -> None:
        get = node.get
        for name in self.names(req):
            child = get(name)
            if child is not None:
                out.append(child)


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

    def expand(self, node: Node, req: tuple[str, ...], out: list[Node]) -> None:
        exact, prefixes = node
        value = req[self.ri]
        child = exact.get(value)
        if child is not None:
            out.append(child)
        for prefix, child in prefixes:
            if value.startswith(prefix):
                out.append(child)


class _Trie:
    __slots__ = ("end", "lit", "param", "tail")

    def __init__(self) -> None:
        self.lit: dict[str, _Trie] = {}
        self.param: _Trie | None = None
        self.end: list[Node] = []  # patterns that end here
        self.tail: list[Node] = []  # patterns ending in "/*" here


def _trie_segments(pattern: str) -> list[tuple[str, str]] | None:
    """Segments of a keyMatch2 pattern the trie reproduces exactly, or None.

    Exact means: for any value without a newline, walking the trie gives the same answer
    as pycasbin's regex. Literal segments may hold no regex metacharacter (``.`` alone
    would match ``/``), ``:name`` is a whole segment, ``*`` only as the last one.
    """
    segs = pattern.split("/")
    out: list[tuple[str, str]] = []
    last = len(segs) - 1
    for i, seg in enumerate(segs):
        if seg == "*" and i == last and i >= 1:
            out.append(("tail", ""))
        elif seg.startswith(":") and len(seg) >= 2:
            out.append(("param", ""))
        elif ":" not in seg and _REGEX_META.isdisjoint(seg):
            out.append(("lit", seg))
        else:
            return None
    return out


class _PathLevel(Level):
    """``keyMatch2``: a segment trie for RESTful patterns, pycasbin's regex for the rest.

    Values containing a newline (where ``.`` and ``$`` behave specially) go through the
    regexes of every pattern in the node, so the trie never has to model them.
    """

    __slots__ = ()

    def make_node(self, children: Mapping[str, Node]) -> Node:
        root = _Trie()
        anything: list[Node] = []
        regexes: list[tuple[Callable[[str], object], Node]] = []
        every: list[tuple[Callable[[str], object], Node]] = []
        for pattern, child in children.items():
            match = key_match2_regex(pattern).match
            every.append((match, child))
            if pattern == "*":
                anything.append(child)
                continue
            segs = _trie_segments(pattern)
            if segs is None:
                regexes.append((match, child))
                continue
            t = root
            for kind, lit in segs:
                if kind == "lit":
                    nxt = t.lit.get(lit)
                    if nxt is None:
                        nxt = t.lit[lit] = _Trie()
                    t = nxt
                elif kind == "param":
                    if t.param is None:
                        t.param = _Trie()
                    t = t.param
                else:  # tail
                    break
            if segs[-1][0] == "tail":
                t.tail.append(child)
            else:
                t.end.append(child)
        return root, tuple(anything), tuple(regexes), tuple(every)

    def expand(self, node: Node, req: tuple[str, ...], out: list[Node]) -> None:
        root, anything, regexes, every = node
        value = req[self.ri]
        if "\n" in value:
            for match, child in every:
                if match(value):
                    out.append(child)
            return
        out.extend(anything)
        for match, child in regexes:
            if match(value):
                out.append(child)
        segs = value.split("/")
        n = len(segs)
        stack = [(root, 0)]
        pop = stack.pop
        push = stack.append
        while stack:
            t, i = pop()
            if i == n:
                out.extend(t.end)
                continue
            if t.tail:
                out.extend(t.tail)
            seg = segs[i]
            nxt = t.lit.get(seg)
            if nxt is not None:
                push((nxt, i + 1))
            if t.param is not None and seg:
                push((t.param, i + 1))


class _ListLevel(Level):
    """regexMatch, keyMatch3, globMatch: one compiled predicate per distinct pattern."""

    __slots__ = ()

    def make_node(self, children: Mapping[str, Node]) -> Node:
        return tuple((compile_pattern(self.func, p), child) for p, child in children.items())

    def expand(self, node: Node, req: tuple[str, ...], out: list[Node]) -> None:
        value = req[self.ri]
        for match, child in node:
            if match(value):
                out.append(child)


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
