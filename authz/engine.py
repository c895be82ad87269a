"""Decision engines behind one small interface.

``build_engine`` returns an engine for a ``Policy``; engines are immutable once built
(a reload builds a new one and swaps a reference), so a decision that started on one
revision finishes on it. ``CompiledEngine`` (authz/compiled.py) decides the model family
citadel ships from indexes built at load; ``CasbinEngine`` is the reference and the
fallback for anything else: pycasbin's own ``Enforcer`` behind a lock (one shared
Enforcer is not safe across threads on Python 3.11). ``build_engine`` validates the
policy the same way whichever engine it returns, and says when it had to fall back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import casbin
from casbin import util as casbin_util
from casbin.util.builtin_operators import generate_g_function

from authz.policy import Policy
from citadel.errors import PolicyError
from citadel.logs import get_logger

__all__ = ["CasbinEngine", "Decision", "Engine", "build_engine", "new_enforcer"]

_log = get_logger("authz.engine")


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    #: The policy row that decided (without its ptype), or None when nothing matched.
    rule: tuple[str, ...] | None
    revision: str
    #: True when this answer came from the engine's decision cache.
    cached: bool = False


class Engine(Protocol):
    revision: str
    #: "compiled" or "casbin", so operators can see which path decides.
    kind: str

    def decide(self, sub: str, dom: str, obj: str, act: str) -> Decision: ...

    def roles_for(self, sub: str, dom: str) -> list[str]: ...


def new_enforcer(
    policy: Policy, *, functions: Mapping[str, Callable[..., Any]] | None = None
) -> casbin.Enforcer:
    """A pycasbin Enforcer loaded from the policy's texts; raises PolicyError."""
    from authz.analysis import _load_model

    m = _load_model(policy.model_text)
    try:
        enforcer = casbin.Enforcer(m)
    except Exception as exc:  # e.g. "unsupported effect"
        raise PolicyError(f"model is not usable: {exc}", file="model.conf") from exc
    for name, fn in (functions or {}).items():
        enforcer.add_function(name, fn)
    try:
        for row, line in zip(policy.rows, policy.lines or [None] * len(policy.rows), strict=False):
            ptype, values = row[0], list(row[1:])
            sec = ptype[0]
            if sec not in ("p", "g") or ptype not in (m.model.get(sec) or {}):
                raise PolicyError(f"unknown policy type {ptype!r}", file="policy.csv", line=line)
            m.add_policy(sec, ptype, values)
        enforcer.build_role_links()
    except PolicyError:
        raise
    except Exception as exc:
        raise PolicyError(f"policy does not load: {exc}", file="policy.csv") from exc
    return enforcer


class CasbinEngine:
    """pycasbin's ``Enforcer``, serialised by a lock: correct for any model, but slow."""

    kind = "casbin"

    def __init__(
        self,
        policy: Policy,
        *,
        functions: Mapping[str, Callable[..., Any]] | None = None,
        fallback_reason: str | None = None,
    ) -> None:
        self.revision = policy.revision
        self.fallback_reason = fallback_reason
        self.rules = sum(1 for r in policy.rows if r[0] == "p")
        self._enforcer = new_enforcer(policy, functions=functions)
        self._lock = threading.Lock()
        self._functions = dict(self._enforcer.fm.get_functions())
        for key, assertion in (self._enforcer.model["g"] or {}).items():
            if getattr(assertion, "rm", None) is not None:
                self._functions[key] = generate_g_function(assertion.rm)

    def decide(self, sub: str, dom: str, obj: str, act: str) -> Decision:
        with self._lock:
            allowed, explain = self._enforcer.enforce_ex(sub, dom, obj, act)
            rule = tuple(explain) if explain else None
            if allowed and rule is None:
                # With deny-capable effects pycasbin explains only denies; find the row
                # that allowed with the enforcer's own matcher so audits name a rule.
                rule = self._first_allow((sub, dom, obj, act))
        return Decision(bool(allowed), rule, self.revision)

    def _first_allow(self, rvals: tuple[str, ...]) -> tuple[str, ...] | None:
        model = self._enforcer.model
        r_tokens = model["r"]["r"].tokens
        p_tokens = model["p"]["p"].tokens
        exp_string = model["m"]["m"].value
        has_eval = casbin_util.has_eval(exp_string)
        expression = (
            None if has_eval else self._enforcer._get_expression(exp_string, self._functions)
        )
        r_params = dict(zip(r_tokens, rvals, strict=False))
        for pvals in model["p"]["p"].policy:
            p_params = dict(zip(p_tokens, pvals, strict=False))
            if has_eval:
                rule_names = casbin_util.get_eval_value(exp_string)
                rules = [casbin_util.escape_assertion(p_params[n]) for n in rule_names]
                expression = self._enforcer._get_expression(
                    casbin_util.replace_eval(exp_string, rules), self._functions
                )
            assert expression is not None
            result = expression.eval(dict(r_params, **p_params))
            matched = result is True or (isinstance(result, float) and result != 0)
            if matched and p_params.get("p_eft", "allow") == "allow":
                return tuple(pvals)
        return None

    def roles_for(self, sub: str, dom: str) -> list[str]:
        with self._lock:
            return list(self._enforcer.get_implicit_roles_for_user(sub, dom))


def build_engine(
    policy: Policy,
    *,
    functions: Mapping[str, Callable[..., Any]] | None = None,
    cache_size: int | None = None,
    previous: Engine | None = None,
) -> Engine:
    """The fastest correct engine for this policy; raises PolicyError for a bad one.

    ``functions`` are custom matcher functions (pycasbin's ``add_function``); a model that
    needs them, or anything else the compiled engine cannot reproduce exactly, is decided
    by ``CasbinEngine`` and the reason is logged and kept as ``fallback_reason``.
    ``previous``, the engine serving now, lets a compiled engine share the parts of its
    index that the new revision did not change (see ``CompiledEngine``).
    """
    from authz.compiled import DEFAULT_CACHE_SIZE, CompiledEngine, analyse

    prior = previous if isinstance(previous, CompiledEngine) else None
    analysis = analyse(
        policy,
        extra_functions=tuple(functions or ()),
        previous=prior.analysis if prior is not None else None,
    )
    if analysis.conjuncts is not None:
        return CompiledEngine(
            analysis,
            revision=policy.revision,
            cache_size=DEFAULT_CACHE_SIZE if cache_size is None else cache_size,
            previous=prior,
        )
    engine = CasbinEngine(policy, functions=functions, fallback_reason=analysis.fallback_reason)
    _log.warning(
        "policy_engine_fallback",
        engine="casbin",
        reason=analysis.fallback_reason,
        revision=policy.revision,
        source=policy.source,
    )
    return engine
