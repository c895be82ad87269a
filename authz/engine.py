"""Decision engines behind one small interface.

``build_engine`` returns an engine for a ``Policy``; engines are immutable once built
(a reload builds a new one and swaps a reference), so a decision that started on one
revision finishes on it. ``CasbinEngine`` is the reference: pycasbin's own ``Enforcer``
behind a lock (one shared Enforcer is not safe across threads on Python 3.11).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Protocol

import casbin
from casbin import model as casbin_model

from authz.policy import Policy
from citadel.errors import PolicyError

__all__ = ["CasbinEngine", "Decision", "Engine", "build_engine"]


@dataclass(frozen=True, slots=True)
class Decision:
    allowed: bool
    #: The policy row that decided (without its ptype), or None when nothing matched.
    rule: tuple[str, ...] | None
    revision: str


class Engine(Protocol):
    revision: str
    #: "compiled" or "casbin", so operators can see which path decides.
    kind: str

    def decide(self, sub: str, dom: str, obj: str, act: str) -> Decision: ...

    def roles_for(self, sub: str, dom: str) -> list[str]: ...


def new_enforcer(policy: Policy) -> casbin.Enforcer:
    """A pycasbin Enforcer loaded from the policy's texts; raises PolicyError."""
    m = casbin_model.Model()
    try:
        m.load_model_from_text(policy.model_text)
    except Exception as exc:  # pycasbin raises bare exceptions of many kinds
        raise PolicyError(f"model does not parse: {exc}", file="model.conf") from exc
    try:
        enforcer = casbin.Enforcer(m)
        for row, line in zip(policy.rows, policy.lines or [None] * len(policy.rows), strict=False):
            ptype, values = row[0], list(row[1:])
            sec = ptype[0]
            if sec not in ("p", "g") or ptype not in m.model.get(sec, {}):
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

    def __init__(self, policy: Policy) -> None:
        self.revision = policy.revision
        self._enforcer = new_enforcer(policy)
        self._lock = threading.Lock()

    def decide(self, sub: str, dom: str, obj: str, act: str) -> Decision:
        with self._lock:
            allowed, explain = self._enforcer.enforce_ex(sub, dom, obj, act)
        return Decision(bool(allowed), tuple(explain) if explain else None, self.revision)

    def roles_for(self, sub: str, dom: str) -> list[str]:
        with self._lock:
            return list(self._enforcer.get_implicit_roles_for_user(sub, dom))


def build_engine(policy: Policy) -> Engine:
    """The fastest correct engine for this policy."""
    return CasbinEngine(policy)
