"""Shadow mode: decide every request with a candidate policy too, never enforce it.

A team wants to know what a policy change does to live traffic before it enforces it.
With ``--shadow-policy-dir DIR2`` each Check is also decided by the candidate; the enforced
decision is what Envoy gets, whatever the candidate says or however it fails.

Counters (names and meaning as Envoy's RBAC filter shadow rules, so dashboards read the
same): ``shadow_allowed`` / ``shadow_denied`` count every request the candidate *would*
allow / deny. Disagreements are counted apart: ``shadow_would_allow`` (the candidate would
allow what was denied) and ``shadow_would_deny`` (it would deny what was allowed);
``shadow_errors`` counts candidate failures (logged, never raised into the enforced path).

Each disagreement is written as its own audit record, kind ``authz.shadow``, beside the
decision record (joined by ``decision_id``): the request tuple, the enforced outcome, rule
and revision, and the candidate's. A separate kind (rather than fields on every decision
record) keeps agreeing traffic's records unchanged and lets ``grep authz.shadow`` list just
the differences. A failed shadow audit write is counted, never turned into a denial: the
enforced decision's own record is the one that must fail closed.

The shadow policy hot-reloads like the main one (its own ``PolicyState`` and ``Reloader``).
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from authz.engine import Decision
from authz.reload import Reloader, initial_state
from authz.state import PolicyState
from citadel.audit import AuditLog
from citadel.errors import PolicyError
from citadel.logs import get_logger

__all__ = ["SHADOW_KIND", "ShadowEvaluator", "ShadowResult", "register_metrics"]

SHADOW_KIND = "authz.shadow"
log = get_logger("authz.shadow")


@dataclass(frozen=True, slots=True)
class ShadowResult:
    allowed: bool
    rule: tuple[str, ...] | None
    revision: str
    agrees: bool


def _outcome(allowed: bool) -> str:
    return "allow" if allowed else "deny"


class ShadowEvaluator:
    """Decides beside the enforced engine; counts and records disagreements."""

    def __init__(
        self,
        state: PolicyState,
        *,
        audit: AuditLog | None = None,
        reloader: Reloader | None = None,
    ) -> None:
        self.state = state
        self.audit = audit
        self.reloader = reloader
        self._lock = threading.Lock()
        self.shadow_allowed = 0
        self.shadow_denied = 0
        self.shadow_would_allow = 0
        self.shadow_would_deny = 0
        self.shadow_errors = 0
        self.shadow_audit_failures = 0

    @classmethod
    def from_dir(
        cls,
        policy_dir: str | Path,
        *,
        audit: AuditLog | None = None,
        debounce: float = 0.2,
        poll_interval: float = 5.0,
    ) -> ShadowEvaluator:
        """Load the candidate (PolicyError, prefixed "shadow policy", if it is invalid)."""
        try:
            state = initial_state(policy_dir)
        except PolicyError as exc:
            # The message names the directory, file and line; no file/line of its own, so
            # nobody joins them to the enforced policy's directory.
            raise PolicyError(f"shadow policy: {exc.message}") from exc
        reloader = Reloader(
            state, policy_dir, debounce=debounce, poll_interval=poll_interval, name="shadow"
        )
        return cls(state, audit=audit, reloader=reloader)

    def compare(
        self,
        sub: str,
        dom: str,
        obj: str,
        act: str,
        enforced: Decision,
        *,
        decision_id: str | None = None,
    ) -> ShadowResult | None:
        """The candidate's decision, or None if it failed. Never raises."""
        try:
            d = self.state.engine.decide(sub, dom, obj, act)
        except Exception as exc:
            with self._lock:
                self.shadow_errors += 1
            log.warning("shadow decision failed", error=f"{type(exc).__name__}: {exc}")
            return None
        agrees = d.allowed == enforced.allowed
        with self._lock:
            if d.allowed:
                self.shadow_allowed += 1
            else:
                self.shadow_denied += 1
            if not agrees:
                if d.allowed:
                    self.shadow_would_allow += 1
                else:
                    self.shadow_would_deny += 1
        result = ShadowResult(d.allowed, d.rule, d.revision, agrees)
        if not agrees:
            self._record(sub, dom, obj, act, enforced, result, decision_id)
        return result

    def _record(
        self,
        sub: str,
        dom: str,
        obj: str,
        act: str,
        enforced: Decision,
        shadow: ShadowResult,
        decision_id: str | None,
    ) -> None:
        if self.audit is None:
            return
        fields: dict[str, Any] = {
            "decision_id": decision_id,
            "sub": sub,
            "dom": dom,
            "obj": obj,
            "act": act,
            "outcome": _outcome(enforced.allowed),
            "rule": list(enforced.rule) if enforced.rule else None,
            "revision": enforced.revision,
            "shadow_outcome": _outcome(shadow.allowed),
            "shadow_rule": list(shadow.rule) if shadow.rule else None,
            "shadow_revision": shadow.revision,
        }
        try:
            self.audit.record(SHADOW_KIND, fields)
        except Exception as exc:
            with self._lock:
                self.shadow_audit_failures += 1
            log.warning("shadow audit record failed", error=repr(exc))

    def start(self) -> None:
        if self.reloader is not None:
            self.reloader.start()

    def stop(self) -> None:
        if self.reloader is not None:
            self.reloader.stop()

    def metrics(self) -> dict[str, Any]:
        with self._lock:
            return {
                "shadow_allowed": self.shadow_allowed,
                "shadow_denied": self.shadow_denied,
                "shadow_would_allow": self.shadow_would_allow,
                "shadow_would_deny": self.shadow_would_deny,
                "shadow_errors": self.shadow_errors,
                "shadow_audit_failures": self.shadow_audit_failures,
                "shadow_revision": self.state.revision,
            }


class _ShadowCollector:
    def __init__(self, shadow: ShadowEvaluator) -> None:
        self._s = shadow

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, InfoMetricFamily

        m = self._s.metrics()
        yield CounterMetricFamily(
            "citadel_authz_shadow_allowed",
            "Requests the shadow (candidate) policy would allow (Envoy RBAC shadow_allowed).",
            value=m["shadow_allowed"],
        )
        yield CounterMetricFamily(
            "citadel_authz_shadow_denied",
            "Requests the shadow (candidate) policy would deny (Envoy RBAC shadow_denied).",
            value=m["shadow_denied"],
        )
        dis = CounterMetricFamily(
            "citadel_authz_shadow_disagreements",
            "Requests the shadow policy decides differently from the enforced one.",
            labels=["shadow"],
        )
        dis.add_metric(["would_allow"], m["shadow_would_allow"])
        dis.add_metric(["would_deny"], m["shadow_would_deny"])
        yield dis
        yield CounterMetricFamily(
            "citadel_authz_shadow_errors",
            "Shadow decisions that failed (never affecting the enforced one).",
            value=m["shadow_errors"],
        )
        yield CounterMetricFamily(
            "citadel_authz_shadow_audit_failures",
            "authz.shadow audit records that could not be written.",
            value=m["shadow_audit_failures"],
        )
        info = InfoMetricFamily("citadel_authz_shadow_policy", "The shadow policy revision.")
        info.add_metric([], {"revision": str(m["shadow_revision"])})
        yield info


def register_metrics(registry: Any, shadow: ShadowEvaluator) -> None:
    """Expose the shadow counters (and its reloader's) in a prometheus_client registry."""
    registry.register(_ShadowCollector(shadow))
