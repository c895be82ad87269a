"""Replay recorded traffic against a candidate policy: what would this change do?

A policy diff says which rows changed; it does not say who loses access. The audit trail
already holds every real decision (``authz.decision`` records: principal, host, method,
path as Envoy sent them, the outcome, the rule and revision that decided). Replaying them
through a candidate engine, with the same request mapping as a live Check, lists exactly
the requests whose outcome would flip (allow->deny, deny->allow), grouped by principal and
rule so a reviewer sees "orders loses POST /api/charges (rule X)" rather than a count.

Changes are information, not failure: ``citadel authz replay`` exits 0 whatever it finds
(2 only when the candidate itself is invalid or a log cannot be read).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from authz.engine import Engine
from authz.policytests import request_tuple
from authz.request import Refused
from citadel.audit import read_records

__all__ = ["DECISION_KIND", "ReplayChange", "ReplayReport", "replay_files", "replay_records"]

DECISION_KIND = "authz.decision"
ALLOW_TO_DENY = "allow->deny"
DENY_TO_ALLOW = "deny->allow"


def rule_text(rule: Any) -> str:
    """One spelling for a rule whether recorded as a list, a string or nothing."""
    if rule is None or rule == "" or rule == []:
        return "(no rule: default deny)"
    if isinstance(rule, list | tuple):
        return ", ".join(str(x) for x in rule)
    return str(rule)


@dataclass(frozen=True, slots=True)
class ReplayChange:
    direction: str  # ALLOW_TO_DENY | DENY_TO_ALLOW
    decision_id: str | None
    principal: str
    host: str
    method: str
    path: str
    was_rule: str
    now_rule: str
    was_revision: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "direction": self.direction,
            "decision_id": self.decision_id,
            "principal": self.principal,
            "host": self.host,
            "method": self.method,
            "path": self.path,
            "was_rule": self.was_rule,
            "now_rule": self.now_rule,
            "was_revision": self.was_revision,
        }


@dataclass(slots=True)
class ReplayReport:
    candidate_revision: str
    records: int = 0  # decision records seen
    replayed: int = 0
    skipped: int = 0  # records lacking the fields a replay needs
    changes: list[ReplayChange] = field(default_factory=list)

    @property
    def allow_to_deny(self) -> int:
        return sum(1 for c in self.changes if c.direction == ALLOW_TO_DENY)

    @property
    def deny_to_allow(self) -> int:
        return sum(1 for c in self.changes if c.direction == DENY_TO_ALLOW)

    def groups(self) -> list[dict[str, Any]]:
        """Changes grouped by (direction, principal, rule before, rule after), biggest first."""
        acc: dict[tuple[str, str, str, str], dict[str, Any]] = {}
        for c in self.changes:
            key = (c.direction, c.principal, c.was_rule, c.now_rule)
            g = acc.setdefault(
                key,
                {
                    "direction": c.direction,
                    "principal": c.principal,
                    "was_rule": c.was_rule,
                    "now_rule": c.now_rule,
                    "count": 0,
                    "examples": [],
                },
            )
            g["count"] += 1
            example = f"{c.method} {c.host}{c.path}"
            if len(g["examples"]) < 3 and example not in g["examples"]:
                g["examples"].append(example)
        return sorted(acc.values(), key=lambda g: (-g["count"], g["direction"], g["principal"]))

    def as_dict(self) -> dict[str, Any]:
        return {
            "candidate_revision": self.candidate_revision,
            "records": self.records,
            "replayed": self.replayed,
            "skipped": self.skipped,
            "unchanged": self.replayed - len(self.changes),
            "changed": len(self.changes),
            "allow_to_deny": self.allow_to_deny,
            "deny_to_allow": self.deny_to_allow,
            "groups": self.groups(),
            "changes": [c.as_dict() for c in self.changes],
        }


def _decide(engine: Engine, principal: str, host: str, method: str, path: str) -> tuple[bool, str]:
    try:
        tup = request_tuple(principal, host, method, path)
    except Refused as exc:
        return False, f"(refused: {exc.code})"
    d = engine.decide(*tup)
    return d.allowed, rule_text(d.rule)


def replay_records(engine: Engine, records: Iterable[Mapping[str, Any]]) -> ReplayReport:
    """Re-decide every ``authz.decision`` record with ``engine``."""
    report = ReplayReport(candidate_revision=engine.revision)
    for rec in records:
        if rec.get("kind") != DECISION_KIND:
            continue
        report.records += 1
        outcome = rec.get("outcome")
        # ``path`` is the normalised one; a refused request kept only its raw path.
        method, path = rec.get("method"), rec.get("path") or rec.get("raw_path")
        if outcome not in ("allow", "deny") or not isinstance(method, str) or not path:
            report.skipped += 1
            continue
        principal = str(rec.get("principal") or "")
        host = str(rec.get("host") or "")
        allowed, now_rule = _decide(engine, principal, host, method, str(path))
        report.replayed += 1
        if allowed == (outcome == "allow"):
            continue
        report.changes.append(
            ReplayChange(
                direction=DENY_TO_ALLOW if allowed else ALLOW_TO_DENY,
                decision_id=rec.get("decision_id"),
                principal=principal or "anonymous",
                host=host,
                method=method,
                path=str(path),
                was_rule=rule_text(rec.get("rule")),
                now_rule=now_rule,
                was_revision=rec.get("revision"),
            )
        )
    return report


def replay_files(engine: Engine, files: Iterable[str | Path]) -> ReplayReport:
    """Replay the decision records of audit files (rotated ones in any order)."""
    return replay_records(engine, read_records(files))
