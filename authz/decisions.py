"""The decision pipeline every transport shares: request -> tuple -> engine -> audit -> outcome.

Written once so the gRPC ``Check``, Envoy's HTTP variant and anything later decide and
record identically. The pipeline fails closed at every step: a request it cannot name,
an engine error and an audit record that cannot be written all end as a denial, and
only a decision that is on record is ever an allow.

Hot path budget: one ``request_tuple`` (no regex compiled here), one ``engine.decide``,
one audit ``record`` (a single ``write``), two pre-bound metric updates. The engine is
read once from the state, so a reload mid-decision cannot mix revisions.
"""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from authz.engine import Engine
from authz.metrics import AuthzMetrics
from authz.request import ANONYMOUS, Refused, RequestTuple, request_tuple
from authz.state import PolicyState
from citadel.audit import AuditLog
from citadel.errors import AuditError

if TYPE_CHECKING:
    from authz.shadow import ShadowEvaluator
from citadel.logs import get_logger

__all__ = ["AUDIT_KIND", "DecisionPipeline", "Explanation", "Outcome", "explain_request"]

AUDIT_KIND = "authz.decision"
RAW_CLIP = 256
NO_RULE = "no rule allowed"
DENY_RULE = "denied by rule"

_log = get_logger("authz.decisions")


@dataclass(frozen=True, slots=True)
class Outcome:
    allowed: bool
    decision_id: str
    #: What the transport answers: 200 allow, 403 deny, 400 malformed request.
    http_status: int
    #: Short stable name of why: allow, no_rule, deny_rule, path_*, internal_error, ...
    code: str
    #: Words for a person (audit, explain); None for an allow.
    reason: str | None
    rule: tuple[str, ...] | None = None
    revision: str | None = None
    tuple: RequestTuple | None = None


def _clip(value: str, limit: int = RAW_CLIP) -> str:
    return value if len(value) <= limit else value[:limit] + "...[clipped]"


class DecisionPipeline:
    """Decides one request at a time; safe to call from the event loop or from threads."""

    def __init__(
        self,
        *,
        state: PolicyState,
        audit: AuditLog,
        metrics: AuthzMetrics | None = None,
        shadow: ShadowEvaluator | None = None,
        clock_ns: Callable[[], int] = time.perf_counter_ns,
        id_prefix: str | None = None,
    ) -> None:
        self.state = state
        self._audit = audit
        self._metrics = metrics
        #: ``--shadow-policy-dir``: a candidate decided beside every Check (authz/shadow.py).
        self.shadow = shadow
        self._clock_ns = clock_ns
        # Decision ids: a random per-process prefix and a counter; unique across
        # replicas and restarts, and far cheaper than a uuid4 per request.
        self._prefix = id_prefix if id_prefix is not None else os.urandom(4).hex()
        self._counter = itertools.count(1)
        #: False from the first audit write that failed until one succeeds again: while it
        #: is False every request is denied, and readiness says not ready.
        self.audit_ok = True

    def new_id(self) -> str:
        return f"{self._prefix}{next(self._counter):08x}"

    def decide(
        self,
        *,
        principal: str,
        host: str,
        method: str,
        path: str,
        transport: str,
        started_ns: int,
        request_id: str | None = None,
        trace_id: str | None = None,
    ) -> Outcome:
        """Decide a request named by its raw parts; never raises."""
        decision_id = self.new_id()
        try:
            tup = request_tuple(principal=principal, host=host, method=method, path=path)
        except Refused as refused:
            return self._finish_refused(
                refused, decision_id, principal, host, method, path,
                transport, started_ns, request_id, trace_id,
            )  # fmt: skip
        engine = self.state.engine
        try:
            decision = engine.decide(tup.sub, tup.dom, tup.obj, tup.act)
            allowed = bool(decision.allowed)
            rule, revision = decision.rule, decision.revision
        except Exception as exc:
            _log.error("engine error; denying", error=f"{type(exc).__name__}: {exc}")
            outcome = Outcome(
                False, decision_id, 403, "internal_error", "internal error while deciding",
                None, getattr(engine, "revision", None), tup,
            )  # fmt: skip
            return self._record(outcome, principal, host, method, path,
                                transport, started_ns, request_id, trace_id)  # fmt: skip
        if allowed:
            outcome = Outcome(True, decision_id, 200, "allow", None, rule, revision, tup)
        elif rule is None:
            outcome = Outcome(False, decision_id, 403, "no_rule", NO_RULE, None, revision, tup)
        else:
            outcome = Outcome(False, decision_id, 403, "deny_rule", DENY_RULE, rule, revision, tup)
        result = self._record(outcome, principal, host, method, path,
                              transport, started_ns, request_id, trace_id)  # fmt: skip
        if self.shadow is not None:  # after the enforced record; never raises, never enforces
            self.shadow.compare(tup.sub, tup.dom, tup.obj, tup.act, decision,
                                decision_id=decision_id)  # fmt: skip
        return result

    def refuse(
        self,
        refused: Refused,
        *,
        transport: str,
        started_ns: int,
        principal: str = "",
        host: str = "",
        method: str = "",
        path: str = "",
        request_id: str | None = None,
        trace_id: str | None = None,
    ) -> Outcome:
        """Deny a request that could not even be read (no HTTP attributes, bad bytes)."""
        return self._finish_refused(
            refused, self.new_id(), principal, host, method, path,
            transport, started_ns, request_id, trace_id,
        )  # fmt: skip

    def _finish_refused(
        self,
        refused: Refused,
        decision_id: str,
        principal: str,
        host: str,
        method: str,
        path: str,
        transport: str,
        started_ns: int,
        request_id: str | None,
        trace_id: str | None,
    ) -> Outcome:
        outcome = Outcome(
            False, decision_id, refused.http_status, refused.code, refused.message,
            None, self.state.revision, None,
        )  # fmt: skip
        return self._record(outcome, principal, host, method, path,
                            transport, started_ns, request_id, trace_id)  # fmt: skip

    def _record(
        self,
        outcome: Outcome,
        principal: str,
        host: str,
        method: str,
        raw_path: str,
        transport: str,
        started_ns: int,
        request_id: str | None,
        trace_id: str | None,
    ) -> Outcome:
        latency_ns = self._clock_ns() - started_ns
        tup = outcome.tuple
        fields: dict[str, Any] = {
            "decision_id": outcome.decision_id,
            "outcome": "allow" if outcome.allowed else "deny",
            "code": outcome.code,
            "reason": outcome.reason,
            "transport": transport,
        }
        if tup is not None:
            fields["principal"] = tup.sub
            fields["host"] = tup.dom
            fields["method"] = tup.act
            fields["path"] = tup.obj
            if tup.obj != raw_path:
                fields["raw_path"] = _clip(raw_path)
        else:
            fields["principal"] = _clip(principal) or ANONYMOUS
            fields["host"] = _clip(host)
            fields["method"] = _clip(method, 32)
            fields["path"] = None
            fields["raw_path"] = _clip(raw_path)
        fields["rule"] = list(outcome.rule) if outcome.rule is not None else None
        fields["revision"] = outcome.revision
        fields["request_id"] = _clip(request_id) if request_id else None
        fields["trace_id"] = trace_id
        fields["latency_us"] = latency_ns // 1000
        metrics = self._metrics
        try:
            self._audit.append(AUDIT_KIND, fields)
        except AuditError as exc:
            if self.audit_ok:
                self.audit_ok = False
                _log.error("audit sink failing: denying every request until it recovers",
                           error=exc.message)  # fmt: skip
            else:
                _log.error("audit record not written; denying", error=exc.message)
            if metrics is not None:
                metrics.audit_failures.inc()
                metrics.count("deny", "audit_failed", latency_ns / 1e9)
            return Outcome(
                False, outcome.decision_id, 403, "audit_failed",
                "the decision could not be recorded", None, outcome.revision, tup,
            )  # fmt: skip
        if not self.audit_ok:
            self.audit_ok = True
            _log.warning("audit sink recovered; deciding again")
        if metrics is not None:
            metrics.count(fields["outcome"], outcome.code, latency_ns / 1e9)
        return outcome


@dataclass(frozen=True, slots=True)
class Explanation:
    """What an engine decides for a request and why, without enforcing or recording it."""

    allowed: bool
    code: str
    reason: str | None
    rule: tuple[str, ...] | None
    revision: str
    engine: str
    roles: tuple[str, ...]
    tuple: RequestTuple | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "decision": "allow" if self.allowed else "deny",
            "allowed": self.allowed,
            "code": self.code,
            "reason": self.reason,
            "rule": list(self.rule) if self.rule is not None else None,
            "revision": self.revision,
            "engine": self.engine,
            "roles": list(self.roles),
            "tuple": self.tuple.as_dict() if self.tuple is not None else None,
        }


def explain_request(
    engine: Engine, *, principal: str, host: str, method: str, path: str
) -> Explanation:
    """The decision for ``/v1/explain`` and ``citadel authz check``: same mapping, same engine."""
    try:
        tup = request_tuple(principal=principal, host=host, method=method, path=path)
    except Refused as refused:
        return Explanation(
            False, refused.code, refused.message, None, engine.revision, engine.kind, (), None
        )
    decision = engine.decide(tup.sub, tup.dom, tup.obj, tup.act)
    if decision.allowed:
        code, reason = "allow", None
    elif decision.rule is None:
        code, reason = "no_rule", NO_RULE
    else:
        code, reason = "deny_rule", DENY_RULE
    return Explanation(
        bool(decision.allowed),
        code,
        reason,
        tuple(decision.rule) if decision.rule is not None else None,
        decision.revision,
        engine.kind,
        tuple(sorted(engine.roles_for(tup.sub, tup.dom))),
        tup,
    )
