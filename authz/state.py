"""The serving policy: one reference, swapped whole.

A reload builds a complete new engine off to the side and then replaces ``engine`` in one
assignment (atomic in CPython). A Check reads ``state.engine`` once at its start and uses
that object to the end, so a decision in flight finishes on the revision it started with
and no decision ever waits on a reload. A failed load never touches ``engine``; it is kept
as ``last_error`` and in ``history`` for the status endpoint and metrics.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from authz.engine import Engine
from citadel.errors import PolicyError

__all__ = ["LoadOutcome", "PolicyState", "build_info"]


@dataclass(frozen=True, slots=True)
class LoadOutcome:
    at: float
    ok: bool
    revision: str | None = None
    error: str | None = None
    file: str | None = None
    line: int | None = None
    duration_s: float = 0.0
    rules: int = 0
    #: CPU the loading thread of this process spent (parsing elsewhere does not count):
    #: what a reload took from the event loop that decides Checks, which shares the GIL.
    cpu_s: float = 0.0
    #: "full", or "incremental" (rebuilt only what changed; see CompiledEngine), and how
    #: many rows that build indexed. None for engines that do not say (pycasbin's).
    build: str | None = None
    rows_rebuilt: int | None = None

    def as_dict(self) -> dict[str, object]:
        return {k: getattr(self, k) for k in self.__slots__}


def build_info(engine: Engine) -> dict[str, Any]:
    """``build`` and ``rows_rebuilt`` for a LoadOutcome, from what the engine reports."""
    info = getattr(engine, "build", None) or {}
    return {"build": info.get("mode"), "rows_rebuilt": info.get("rows_rebuilt")}


class PolicyState:
    """Holds the engine that decides now, plus what happened on recent loads."""

    def __init__(
        self,
        engine: Engine,
        *,
        source: str,
        clock: Callable[[], float] = time.time,
        history_size: int = 20,
    ) -> None:
        self._clock = clock
        self._lock = threading.Lock()  # guards bookkeeping only, never decisions
        self.source = source
        self.engine: Engine = engine
        self.loaded_at = clock()
        self.last_error: LoadOutcome | None = None
        self.reloads_ok = 0
        self.reloads_failed = 0
        self.history: deque[LoadOutcome] = deque(maxlen=history_size)
        self.history.append(LoadOutcome(at=self.loaded_at, ok=True, revision=engine.revision))

    @property
    def revision(self) -> str:
        return self.engine.revision

    def swap(
        self, engine: Engine, *, duration_s: float = 0.0, rules: int = 0, cpu_s: float = 0.0
    ) -> None:
        with self._lock:
            self.engine = engine
            self.loaded_at = self._clock()
            self.reloads_ok += 1
            self.history.append(
                LoadOutcome(
                    at=self.loaded_at,
                    ok=True,
                    revision=engine.revision,
                    duration_s=duration_s,
                    rules=rules,
                    cpu_s=cpu_s,
                    **build_info(engine),
                )
            )

    def record_failure(self, error: PolicyError, *, duration_s: float = 0.0) -> LoadOutcome:
        outcome = LoadOutcome(
            at=self._clock(),
            ok=False,
            error=error.message,
            file=error.file,
            line=error.line,
            duration_s=duration_s,
        )
        with self._lock:
            self.last_error = outcome
            self.reloads_failed += 1
            self.history.append(outcome)
        return outcome
