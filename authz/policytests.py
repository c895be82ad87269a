"""Policy test cases: the examples a policy's authors promise it keeps deciding the same way.

A change to a policy is reviewed as a diff of CSV rows, which says little about what it
does to real traffic. Test cases say it in requests: "the storefront may read an order,
the storefront may never reach /admin". ``citadel authz test`` runs them (in the spirit of
``opa test``), and the reloader runs them before swapping a policy in, so an edit that
breaks its own tests is refused like a syntax error and the last good policy keeps serving.

Where they live
    ``<policy-dir>/tests/*.yaml`` and, because a ConfigMap is flat (its keys cannot hold a
    ``/``), also ``<policy-dir>/*.test.yaml``. Files are read in name order.

Format
    Each file is a YAML list of cases (or a mapping with a ``cases:`` list)::

        - name: storefront reads an order          # required, unique within the file
          description: why this case matters       # optional
          principal: spiffe://cluster.local/ns/shop/sa/frontend   # empty or absent: anonymous
          host: orders.shop.svc.cluster.local
          method: GET
          path: /api/orders/42?expand=items        # as Envoy sends it: query allowed
          expect: allow                            # allow | deny

    Every case goes through the same request mapping as a live Check (``sub`` = principal
    or ``anonymous``, ``dom`` = host lowercased without port, ``obj`` = normalised path,
    ``act`` = method uppercased); a path the service would refuse as ambiguous decides
    ``deny`` here too. Unknown keys are errors, so a typo cannot silently skip a check.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from authz.decisions import explain_request
from authz.engine import Engine
from authz.request import request_tuple as _service_tuple
from citadel.errors import CitadelError, PolicyError

__all__ = [
    "CaseResult",
    "PolicyCase",
    "TestReport",
    "find_test_files",
    "load_cases",
    "request_tuple",
    "run_cases",
]

TESTS_DIR = "tests"
FLAT_SUFFIX = ".test.yaml"
_KEYS = {"name", "description", "principal", "host", "method", "path", "expect"}
_REQUIRED = ("name", "host", "method", "path", "expect")


@dataclass(frozen=True, slots=True)
class PolicyCase:
    name: str
    principal: str
    host: str
    method: str
    path: str
    expect: str  # "allow" | "deny"
    file: str
    line: int
    description: str = ""


@dataclass(frozen=True, slots=True)
class CaseResult:
    case: PolicyCase
    got: str  # "allow" | "deny"
    rule: tuple[str, ...] | None
    roles: tuple[str, ...]
    tuple_: tuple[str, str, str, str] | None
    #: Why the request never reached the engine (ambiguous path...), else None.
    refused: str | None = None
    duration_s: float = 0.0

    @property
    def passed(self) -> bool:
        return self.got == self.case.expect

    def explain(self) -> str:
        if self.refused:
            return f"request refused before the policy: {self.refused}"
        rule = ", ".join(self.rule) if self.rule else "no rule matched (deny by default)"
        roles = ", ".join(self.roles) if self.roles else "none"
        return f"rule: {rule}; roles: {roles}"

    def as_dict(self) -> dict[str, Any]:
        c = self.case
        return {
            "name": c.name,
            "file": c.file,
            "line": c.line,
            "description": c.description,
            "principal": c.principal,
            "host": c.host,
            "method": c.method,
            "path": c.path,
            "expect": c.expect,
            "got": self.got,
            "passed": self.passed,
            "rule": list(self.rule) if self.rule else None,
            "roles": list(self.roles),
            "request": list(self.tuple_) if self.tuple_ else None,
            "refused": self.refused,
            "duration_s": round(self.duration_s, 6),
        }


@dataclass(slots=True)
class TestReport:
    revision: str
    results: list[CaseResult] = field(default_factory=list)

    @property
    def failures(self) -> list[CaseResult]:
        return [r for r in self.results if not r.passed]

    @property
    def ok(self) -> bool:
        return not self.failures

    def as_dict(self) -> dict[str, Any]:
        return {
            "revision": self.revision,
            "passed": len(self.results) - len(self.failures),
            "failed": len(self.failures),
            "total": len(self.results),
            "results": [r.as_dict() for r in self.results],
        }


# ------------------------------------------------------------------ the request mapping


def request_tuple(principal: str, host: str, method: str, path: str) -> tuple[str, str, str, str]:
    """(sub, dom, obj, act) exactly as the live service builds it; raises ``Refused``."""
    t = _service_tuple(principal=principal, host=host, method=method, path=path)
    return t.sub, t.dom, t.obj, t.act


# ------------------------------------------------------------------ loading cases


def find_test_files(policy_dir: str | Path) -> list[Path]:
    d = Path(policy_dir)
    files: list[Path] = []
    sub = d / TESTS_DIR
    if sub.is_dir():
        files += sorted(p for p in sub.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    if d.is_dir():
        files += sorted(p for p in d.iterdir() if p.name.endswith(FLAT_SUFFIX) and p.is_file())
    return files


def _rel(path: Path, base: Path) -> str:
    try:
        return str(path.relative_to(base))
    except ValueError:
        return str(path)


def load_cases(policy_dir: str | Path, *, files: Sequence[Path] | None = None) -> list[PolicyCase]:
    """All cases of a directory; raises PolicyError naming the file and line of a bad one."""
    base = Path(policy_dir)
    cases: list[PolicyCase] = []
    for path in files if files is not None else find_test_files(base):
        cases += _parse_file(path, _rel(path, base))
    return cases


def _parse_file(path: Path, name: str) -> list[PolicyCase]:
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise PolicyError(f"cannot read policy tests: {exc}", file=name) from exc
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise PolicyError(
            f"policy tests are not valid YAML: {getattr(exc, 'problem', None) or exc}",
            file=name,
            line=mark.line + 1 if mark is not None else None,
        ) from exc
    if data is None:
        return []
    items_node: Any = root
    if isinstance(data, dict) and set(data) == {"cases"}:
        data = data["cases"]
        items_node = root.value[0][1] if root is not None else None
    if not isinstance(data, list):
        raise PolicyError("policy tests must be a list of cases", file=name, line=1)
    lines = [n.start_mark.line + 1 for n in getattr(items_node, "value", [])]
    cases: list[PolicyCase] = []
    seen: set[str] = set()
    for idx, item in enumerate(data):
        line = lines[idx] if idx < len(lines) else 1
        cases.append(_parse_case(item, name, line, seen))
    return cases


def _parse_case(item: Any, file: str, line: int, seen: set[str]) -> PolicyCase:
    if not isinstance(item, dict):
        raise PolicyError("a test case must be a mapping", file=file, line=line)
    unknown = set(item) - _KEYS
    if unknown:
        raise PolicyError(
            f"unknown key(s) {sorted(map(str, unknown))} in test case; allowed: {sorted(_KEYS)}",
            file=file,
            line=line,
        )
    missing = [k for k in _REQUIRED if item.get(k) in (None, "")]
    if missing:
        raise PolicyError(f"test case lacks {missing}", file=file, line=line)
    values = {k: "" if item.get(k) is None else str(item[k]) for k in _KEYS}
    expect = values["expect"].strip().lower()
    if expect not in ("allow", "deny"):
        raise PolicyError(
            f"expect must be allow or deny, not {values['expect']!r}", file=file, line=line
        )
    name = values["name"]
    if name in seen:
        raise PolicyError(f"duplicate test case name {name!r}", file=file, line=line)
    seen.add(name)
    return PolicyCase(
        name=name,
        description=values["description"],
        principal=values["principal"],
        host=values["host"],
        method=values["method"],
        path=values["path"],
        expect=expect,
        file=file,
        line=line,
    )


# ------------------------------------------------------------------ running


def run_case(engine: Engine, case: PolicyCase) -> CaseResult:
    """Decide one case through the live service's own explain path (same mapping, engine)."""
    t0 = time.perf_counter()
    ex = explain_request(
        engine, principal=case.principal, host=case.host, method=case.method, path=case.path
    )
    tup = (ex.tuple.sub, ex.tuple.dom, ex.tuple.obj, ex.tuple.act) if ex.tuple else None
    return CaseResult(
        case,
        "allow" if ex.allowed else "deny",
        ex.rule,
        ex.roles,
        tup,
        refused=None if tup else f"{ex.code}: {ex.reason}",
        duration_s=time.perf_counter() - t0,
    )


def run_cases(engine: Engine, cases: Sequence[PolicyCase]) -> TestReport:
    """Run every case; an engine error on a case is a PolicyError naming that case."""
    report = TestReport(revision=engine.revision)
    for case in cases:
        try:
            report.results.append(run_case(engine, case))
        except CitadelError:
            raise
        except Exception as exc:
            raise PolicyError(
                f"policy fails to decide test case {case.name!r}: {type(exc).__name__}: {exc}",
                file=case.file,
                line=case.line,
            ) from exc
    return report


def failure_error(report: TestReport) -> PolicyError:
    """The PolicyError a reload raises for a report with failures (first failure located)."""
    first = report.failures[0]
    more = len(report.failures) - 1
    tail = f" (and {more} more failing case(s))" if more else ""
    return PolicyError(
        f"policy test {first.case.name!r} failed: expected {first.case.expect}, "
        f"got {first.got} ({first.explain()}){tail}",
        file=first.case.file,
        line=first.case.line,
    )
