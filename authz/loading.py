"""Load a policy directory into a serving engine: read -> validate -> build, never half.

Used at start-up (``initial_state``: a bad policy stops the server) and by reloads
(``reload_state``: a bad policy is recorded and the last good keeps serving). The
directory watcher and ``POST /v1/reload`` call ``reload_state``; nothing else swaps.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from authz.engine import Engine, build_engine
from authz.policy import Policy, load_policy_dir, rule_counts
from authz.state import LoadOutcome, PolicyState
from citadel.errors import PolicyError

__all__ = ["LoadedPolicy", "counts_for", "initial_state", "load_engine", "reload_state"]

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


def initial_state(
    directory: str | Path, *, clock: Callable[[], float] = time.time, history_size: int = 20
) -> PolicyState:
    """The state to serve from at start-up; raises ``PolicyError`` (fail closed)."""
    loaded = load_engine(directory)
    return PolicyState(loaded.engine, source=str(directory), clock=clock, history_size=history_size)


def reload_state(state: PolicyState, directory: str | Path | None = None) -> LoadOutcome:
    """Load ``directory`` (default: the state's source) and swap it in only if it is good.

    Never raises for a bad policy: the failure is recorded on the state (``last_error``,
    history, counters) and the previous engine keeps deciding.
    """
    started = time.perf_counter()
    try:
        loaded = load_engine(directory if directory is not None else state.source)
    except PolicyError as exc:
        return state.record_failure(exc, duration_s=time.perf_counter() - started)
    state.swap(loaded.engine, duration_s=loaded.duration_s, rules=len(loaded.policy.rows))
    return state.history[-1]
