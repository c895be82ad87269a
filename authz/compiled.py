"""The compiled decision engine: a Casbin model and policy turned into indexes, once.

pycasbin evaluates its matcher string against every policy row on every call. For the
model family citadel ships (a conjunction of role/equality/pattern tests over the request
tuple) the same answer comes from indexes built at load: each subject's role closure,
then one index level per conjunct (exact dict, prefix list, segment trie, grouped
regexes), ending in leaves that hold the first allow row and the first deny row of the
rows that reach them. A decision walks a few small nodes and combines leaves with the
policy effect exactly as ``casbin.effect.default_effectors`` does.

What the engine is built from, the model and the validated rows, is
``authz.analysis.analyse``'s work (re-exported here).
"""

from __future__ import annotations

import bisect
import contextlib
import operator
import re
import sys
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from casbin.constant.constants import ALLOW_OVERRIDE_EFFECT, DENY_OVERRIDE_EFFECT

from authz.analysis import POLICY_FILE, Analysis, Conjunct, analyse
from authz.matchers import Level, compile_pattern, make_level, trie_exact
from authz.pacing import breathe
from authz.policy import common_affixes
from citadel.errors import PolicyError

if TYPE_CHECKING:
    from authz.engine import Decision

__all__ = ["Analysis", "CompiledEngine", "Conjunct", "analyse"]

#: pycasbin's default RoleManager(10): ``has_link`` looks at most 9 links deep.
MAX_HIERARCHY_LEVEL = 10
DEFAULT_CACHE_SIZE = 65_536
#: (caller, host) pairs whose role/host index nodes are kept; real meshes have far fewer.
PLAN_CACHE_SIZE = 16_384
_NONE = sys.maxsize  # "no row" in a leaf; any real row id is smaller
_ITEM_ID = operator.itemgetter(1)  # an index item's row id
#: Spacing of row ids in a fully built engine: 2**32 inserts fit between two rows before
#: an incremental build has to renumber (a full build), and 10**8 rows stay below _NONE.
ROW_ID_STEP = 1 << 32


def _closure(edges: dict[str, list[str]]) -> dict[str, tuple[str, ...]]:
    """For every user: itself, then every role ``has_link`` reaches (at most 9 links)."""
    out: dict[str, tuple[str, ...]] = {}
    for user in edges:
        seen = {user}
        order = [user]
        frontier = [user]
        for _ in range(MAX_HIERARCHY_LEVEL - 1):
            nxt = []
            for name in frontier:
                for role in edges.get(name, ()):
                    if role not in seen:
                        seen.add(role)
                        order.append(role)
                        nxt.append(role)
            if not nxt:
                break
            frontier = nxt
        out[user] = tuple(order)
    return out


class CompiledEngine:
    """Indexes over one policy revision; immutable, so ``decide`` takes no lock.

    The only mutable part is the decision cache, a plain dict whose single operations are
    atomic under the GIL; two threads racing on the same miss compute the same answer.

    Built with ``previous`` (the engine serving the revision before, same model), only the
    first-level subtrees that a changed row falls into are rebuilt; every other subtree is
    shared with ``previous``. Why: a reload builds in the process that serves Checks, and
    rebuilding 10,000 rules for a one-line edit took that process's GIL for 150-300 ms.
    Sharing is safe because nodes are never changed after the build (the globMatch memo
    and lazily built regexes are pure functions of the node). Leaves name rows by id, not
    by position, so an inserted row does not renumber the rows after it: ids are spaced
    ``ROW_ID_STEP`` apart and a new row takes an id between its neighbours', so ordering
    by id is ordering by position in every revision.
    """

    kind = "compiled"
    fallback_reason: str | None = None

    def __init__(
        self,
        analysis: Analysis,
        *,
        revision: str,
        cache_size: int = DEFAULT_CACHE_SIZE,
        previous: CompiledEngine | None = None,
    ):
        if analysis.conjuncts is None:
            raise ValueError(f"model does not compile: {analysis.fallback_reason}")
        from authz.engine import Decision  # engine.py imports this module lazily

        self._decision_type = Decision
        #: What this engine was built from; the next revision's analysis splices into it.
        self.analysis = analysis
        self.revision = revision
        self.rules = len(analysis.p_rows)
        self._rows = analysis.p_rows
        self._effect = analysis.effect
        self._shape = _shape(analysis)
        self._g_rows = analysis.g_rows
        self._cache: dict[tuple[str, str, str, str], Decision] = {}
        self._cache_size = max(0, cache_size)
        delta = _RowDelta.between(previous, self) if previous is not None else None
        #: How this engine was built: "full", or "incremental" with the rows rebuilt.
        self.build: dict[str, Any] = {"mode": "full", "rows_rebuilt": len(self._rows)}
        if delta is None:
            self._ids = list(range(ROW_ID_STEP, ROW_ID_STEP * (len(self._rows) + 1), ROW_ID_STEP))
        else:
            self._ids = delta.ids
        same_roles = previous is not None and delta is not None and previous._g_rows == self._g_rows
        if previous is not None and same_roles:
            self._direct = previous._direct
            self._names = dict(previous._names)
        else:
            self._direct = self._direct_roles(analysis)
            self._names = {}
        self._g_domains = {k: n >= 3 for k, n in analysis.g_arity.items()}
        self._levels = self._make_levels(analysis)
        # The leading exact/role/prefix levels depend on few request fields (sub, dom):
        # the nodes they reach are memoised per those fields, so a new path for a caller
        # and host seen before only walks the path and method levels.
        head = 0
        while head < len(self._levels) and self._levels[head].func in ("==", "g", "keyMatch"):
            head += 1
        self._head, self._tail = self._levels[:head], self._levels[head:]
        fields = sorted(
            {c.ri for c in self._head_conjuncts(analysis, head)}
            | {c.dom_ri for c in self._head_conjuncts(analysis, head) if c.dom_ri is not None}
        )
        self._plan_key = operator.itemgetter(*fields) if fields else (lambda _req: None)
        self._plans: dict[Any, tuple[Any, ...]] = {}
        _validate_patterns(analysis, delta.new_span(len(self._rows)) if delta else None)
        self._eft_at = analysis.p_tokens.index("p_eft") if "p_eft" in analysis.p_tokens else None
        #: first-level key -> subtree (what the first level's node was made from), and
        #: the (row, id, is_deny) items it was built from, in id order.
        self._top: dict[str, Any] = {}
        self._groups: dict[str, list[tuple[tuple[str, ...], int, bool]]] = {}
        self._root = self._build(delta, previous)
        #: row id (-1: none decided) -> (decision, the same marked cached), built on first
        #: use and then shared: a frozen dataclass costs a fifth of a decision, and
        #: building all of them up front would slow every load.
        self._decide_table: dict[int, tuple[Decision, Decision]] = {}

    # -- build -------------------------------------------------------------------------
    @staticmethod
    def _direct_roles(a: Analysis) -> dict[str, dict[tuple[str, str], list[str]]]:
        """gkey -> (user, domain) -> direct roles in policy order ("" domain for 2 fields)."""
        out: dict[str, dict[tuple[str, str], list[str]]] = {}
        for gkey, rows in a.g_rows.items():
            d = out.setdefault(gkey, {})
            for row in rows:
                dom = row[2] if a.g_arity[gkey] >= 3 else ""
                roles = d.setdefault((row[0], dom), [])
                if row[1] not in roles:
                    roles.append(row[1])
        return out

    @staticmethod
    def _ordered(a: Analysis) -> list[Conjunct]:
        assert a.conjuncts is not None
        order = {"==": 0, "g": 0, "keyMatch": 1, "keyMatch2": 2}
        return sorted(a.conjuncts, key=lambda c: order.get(c.func, 3))

    def _head_conjuncts(self, a: Analysis, head: int) -> list[Conjunct]:
        return self._ordered(a)[:head]

    def _make_levels(self, a: Analysis) -> list[Level]:
        levels: list[Level] = []
        for c in self._ordered(a):
            names = None
            if c.func == "g":
                names = self._names.get(c)
                if names is None:
                    names = self._names[c] = self._names_fn(c)
            levels.append(make_level(c.func, c.ri, c.pj, names))
        return levels

    def _names_fn(self, c: Conjunct) -> Callable[[tuple[str, ...]], tuple[str, ...]]:
        assert c.gkey is not None
        direct = self._direct.get(c.gkey, {})
        ri = c.ri
        if c.dom_ri is None:
            flat = _closure({u: r for (u, _), r in direct.items()})
            get = flat.get
            return lambda req: get(req[ri]) or (req[ri],)
        by_dom: dict[str, dict[str, list[str]]] = {}
        for (u, dom), roles in direct.items():
            by_dom.setdefault(dom, {})[u] = roles
        keyed = {(u, dom): names for dom, e in by_dom.items() for u, names in _closure(e).items()}
        getk = keyed.get
        di = c.dom_ri
        return lambda req: getk((req[ri], req[di])) or (req[ri],)

    def _items(
        self, rows: Iterable[tuple[str, ...]], ids: Iterable[int]
    ) -> list[tuple[tuple[str, ...], int, bool]]:
        """(row, id, is_deny) for each of ``rows`` that can decide, in policy order."""
        eft_at = self._eft_at
        keep_deny = self._effect != ALLOW_OVERRIDE_EFFECT
        items: list[tuple[tuple[str, ...], int, bool]] = []
        for n, (row, rid) in enumerate(zip(rows, ids, strict=True)):
            if not n & 1023:
                breathe()
            eft = row[eft_at] if eft_at is not None else "allow"
            if eft == "allow":
                items.append((row, rid, False))
            elif eft == "deny" and keep_deny:
                items.append((row, rid, True))
            # any other eft is Effector.INDETERMINATE: it can never change the outcome
        return items

    def _build(self, delta: _RowDelta | None, previous: CompiledEngine | None) -> Any:
        if not self._rows:
            # pycasbin evaluates the matcher once with every policy field "" and counts a
            # match as allow (with no row to explain it): id 0, decided in _decision_pair.
            return self._build_node([(("",) * len(self._shape[1]), 0, False)], 0)
        if not self._levels:
            return self._build_node(self._items(self._rows, self._ids), 0)
        level, pj = self._levels[0], self._levels[0].pj
        if delta is None or previous is None or not previous._groups:
            groups: dict[str, list[tuple[tuple[str, ...], int, bool]]] = {}
            for item in self._items(self._rows, self._ids):
                groups.setdefault(item[0][pj], []).append(item)
            top: dict[str, Any] = {}
            rebuild = groups
        else:
            keys = {row[pj] for row in delta.changed_rows(previous, self)}
            groups, rebuild = self._regroup(delta, previous, keys, pj)
            top = dict(previous._top)
            for key in keys:
                top.pop(key, None)
            self.build = {
                "mode": "incremental",
                "rows_rebuilt": sum(map(len, rebuild.values())),
                "subtrees_rebuilt": len(rebuild),
            }
        for key, group in rebuild.items():
            top[key] = self._build_node(group, 1)
        self._groups, self._top = groups, top
        return level.make_node(top)

    def _regroup(
        self, delta: _RowDelta, previous: CompiledEngine, keys: set[str], pj: int
    ) -> tuple[dict[str, list[Any]], dict[str, list[Any]]]:
        """``previous``'s items per first-level key with the changed span's replaced:
        every group, and the groups of ``keys`` (the subtrees to build again). A group is
        in id order and the span's ids lie between the kept rows' ids, so each changed
        group is two slices of the old one around the span's new items: the build costs
        what the edited subtrees hold, not a walk over every row."""
        span = delta.new_span(len(self._rows))
        arrived: dict[str, list[tuple[tuple[str, ...], int, bool]]] = {}
        for item in self._items(
            self._rows[span.start : span.stop], self._ids[span.start : span.stop]
        ):
            arrived.setdefault(item[0][pj], []).append(item)
        old_ids = previous._ids
        lo = old_ids[delta.prefix - 1] if delta.prefix else -1
        hi = old_ids[len(old_ids) - delta.suffix] if delta.suffix else _NONE
        groups, rebuild = dict(previous._groups), {}
        for key in keys:
            old = previous._groups.get(key, [])
            head = bisect.bisect_right(old, lo, key=_ITEM_ID)
            tail = bisect.bisect_left(old, hi, key=_ITEM_ID)
            group = old[:head] + arrived.get(key, []) + old[tail:]
            if group:
                groups[key] = rebuild[key] = group
            else:
                groups.pop(key, None)
        return groups, rebuild

    def _build_node(self, items: list[tuple[tuple[str, ...], int, bool]], depth: int) -> Any:
        if depth == len(self._levels):
            allow = min((i for _, i, deny in items if not deny), default=_NONE)
            deny = min((i for _, i, d in items if d), default=_NONE)
            return (allow, deny)
        level = self._levels[depth]
        groups: dict[str, list[tuple[tuple[str, ...], int, bool]]] = {}
        pj = level.pj
        for item in items:
            groups.setdefault(item[0][pj], []).append(item)
        return level.make_node({k: self._build_node(v, depth + 1) for k, v in groups.items()})

    # -- decide ------------------------------------------------------------------------
    def decide(self, sub: str, dom: str, obj: str, act: str) -> Decision:
        key = (sub, dom, obj, act)
        cache = self._cache
        hit = cache.get(key)
        if hit is not None:
            return hit
        plans = self._plans
        plan_key = self._plan_key(key)
        frontier = plans.get(plan_key)
        if frontier is None:
            frontier = [self._root]
            for level in self._head:
                frontier = level.expand(frontier, key)
                if not frontier:
                    break
            frontier = tuple(frontier)
            if len(plans) >= PLAN_CACHE_SIZE:
                with contextlib.suppress(KeyError, RuntimeError, StopIteration):
                    del plans[next(iter(plans))]
            plans[plan_key] = frontier
        for level in self._tail:
            if not frontier:
                break
            frontier = level.expand(frontier, key)
        allow = deny = _NONE
        for a, d in frontier:
            if a < allow:
                allow = a
            if d < deny:
                deny = d
        idx = self._pick(allow, deny)
        pair = self._decide_table.get(idx)
        if pair is None:  # first time this row decides; racing threads build equal pairs
            pair = self._decide_table[idx] = self._decision_pair(idx)
        if self._cache_size:
            if len(cache) >= self._cache_size:
                # Evict the oldest entry; another thread may be doing the same.
                with contextlib.suppress(KeyError, RuntimeError, StopIteration):
                    del cache[next(iter(cache))]
            cache[key] = pair[1]
        return pair[0]

    def _pick(self, allow: int, deny: int) -> int:
        """The deciding row's id under this effect (as ``default_effectors`` rules it), or
        -1."""
        effect = self._effect
        if effect == ALLOW_OVERRIDE_EFFECT:
            return allow if allow != _NONE else -1
        if deny != _NONE:
            return deny
        return allow if allow != _NONE else -1  # -1: "no row decided"

    def _decision_pair(self, idx: int) -> tuple[Decision, Decision]:
        make, rev = self._decision_type, self.revision
        if idx == -1:
            allowed, rule = self._effect == DENY_OVERRIDE_EFFECT, None
        elif not self._rows:  # the empty policy's one evaluation: a match allows
            allowed, rule = True, None
        else:
            rule = self._rows[bisect.bisect_left(self._ids, idx)]
            allowed = self._eft_at is None or rule[self._eft_at] != "deny"
        return make(allowed, rule, rev), make(allowed, rule, rev, True)

    def roles_for(self, sub: str, dom: str) -> list[str]:
        """pycasbin's ``get_implicit_roles_for_user``: breadth first, no depth limit."""
        res: list[str] = []
        seen: set[str] = set()
        queue = deque([sub])
        while queue:
            name = queue.popleft()
            for gkey, direct in self._direct.items():
                for role in direct.get((name, dom if self._g_domains[gkey] else ""), ()):
                    if role not in seen:
                        seen.add(role)
                        res.append(role)
                        queue.append(role)
        return res

    def cache_info(self) -> dict[str, int]:
        return {"size": len(self._cache), "max": self._cache_size}


def _shape(a: Analysis) -> tuple[Any, ...]:
    """Everything besides the rows that the index depends on: equal shapes (the same
    model) are what lets one revision's subtrees serve the next."""
    return (
        tuple(a.r_tokens),
        tuple(a.p_tokens),
        a.effect,
        tuple(a.conjuncts or ()),
        tuple(sorted(a.g_arity.items())),
    )


@dataclass(frozen=True, slots=True)
class _RowDelta:
    """How the next revision's p rows differ from the serving ones: an unchanged prefix
    and suffix around one changed span. A one-line edit, the common case, is a span of
    one; edits far apart make one wide span, still exact, just less reused."""

    prefix: int
    suffix: int
    ids: list[int]

    @classmethod
    def between(cls, old: CompiledEngine, new: CompiledEngine) -> _RowDelta | None:
        """The delta, or None when ``new`` must be built in full (another model, an empty
        policy on either side, no room left for ids between two neighbours)."""
        if type(old) is not CompiledEngine or old._shape != new._shape:
            return None
        a, b = old._rows, new._rows
        if not a or not b:
            return None
        spliced = new.analysis.p_splice
        if spliced is not None and spliced[0] == old.revision:
            p, s = spliced[1], spliced[2]  # what the analysis spliced: no comparing
        else:
            p, s = common_affixes(a, b)
        added = len(b) - p - s
        ids = old._ids
        lo = ids[p - 1] if p else 0
        hi = ids[len(a) - s] if s else lo + (added + 1) * ROW_ID_STEP
        gap = (hi - lo) // (added + 1)
        if gap < 1:
            return None
        fresh = [lo + gap * (k + 1) for k in range(added)]
        return cls(p, s, ids[:p] + fresh + ids[len(ids) - s :])

    def changed_rows(self, old: CompiledEngine, new: CompiledEngine) -> list[tuple[str, ...]]:
        """The rows that left (from ``old``) and arrived (in ``new``)."""
        return [
            *old._rows[self.prefix : len(old._rows) - self.suffix],
            *new._rows[self.prefix : len(new._rows) - self.suffix],
        ]

    def new_span(self, count: int) -> range:
        """Indexes of the arrived rows among the new revision's ``count`` rows."""
        return range(self.prefix, count - self.suffix)


def _validate_patterns(a: Analysis, span: range | None = None) -> None:
    """Compile every distinct pattern once (only the rows in ``span`` for an incremental
    build: the others passed when they arrived); a broken regex is refused at load."""
    assert a.conjuncts is not None
    rows = range(len(a.p_rows)) if span is None else span
    seen: set[tuple[str, str]] = set()
    for c in a.conjuncts:
        if c.func in ("==", "g", "keyMatch"):
            continue
        trie = c.func == "keyMatch2"
        for i in rows:
            row, line = a.p_rows[i], a.p_lines[i] if i < len(a.p_lines) else None
            key = (c.func, row[c.pj])
            if key in seen or (trie and trie_exact(row[c.pj])):
                continue
            seen.add(key)
            try:
                compile_pattern(c.func, row[c.pj])
            except re.error as exc:
                raise PolicyError(
                    f"{c.func} pattern {row[c.pj]!r} is not a valid regular expression: {exc}",
                    file=POLICY_FILE,
                    line=line,
                ) from exc
