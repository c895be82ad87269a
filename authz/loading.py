"""Load a policy directory into an engine: read -> validate -> build, never half.

``authz.reload`` builds on this (adding the directory's policy tests, the one-generation
read of a ConfigMap and the swap); start-up, the watcher and ``POST /v1/reload`` all go
through it, so every path into serving passes the same gate.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from authz.engine import Engine, build_engine
from authz.policy import Policy, load_policy_dir, rule_counts
from citadel.errors import PolicyError

__all__ = ["LoadedPolicy", "counts_for", "load_engine"]

# Rule counts by ptype for recent revisions. A revision is a content hash, so this memo
# is a pure function of its key and safe to share between states in one process.
_COUNTS: OrderedDict[str, dict[str, int]] = OrderedDict()
_COUNTS_MAX = 64


@dataclass(frozen=True, slots=True)
class LoadedPolicy:
    policy: Policy
    engine: Engine
    duration_s: float


def _remember_counts(policy: Policy) -> None:
    _COUNTS[policy.revision] = rule_counts(policy)
    _COUNTS.move_to_end(policy.revision)
    while len(_COUNTS) > _COUNTS_MAX:
        _COUNTS.popitem(last=False)


def counts_for(revision: str) -> dict[str, int]:
    """Rows per ptype of a revision loaded in this process ({} if unknown)."""
    return dict(_COUNTS.get(revision, {}))


def load_engine(
    directory: str | Path, *, perf_counter: Callable[[], float] = time.perf_counter
) -> LoadedPolicy:
    """Read, validate and build; raise ``PolicyError`` (with file/line when known)."""
    started = perf_counter()
    policy = load_policy_dir(directory)
    try:
        engine = build_engine(policy)
    except PolicyError:
        raise
    except Exception as exc:  # an engine bug must read as "policy refused", not a crash
        raise PolicyError(f"engine could not be built: {type(exc).__name__}: {exc}") from exc
    _remember_counts(policy)
    return LoadedPolicy(policy=policy, engine=engine, duration_s=perf_counter() - started)
