"""Load a policy directory into an engine: read -> validate -> build, never half.

``authz.reload`` builds on this (adding the directory's policy tests, the one-generation
read of a ConfigMap and the swap); start-up, the watcher and ``POST /v1/reload`` all go
through it, so every path into serving passes the same gate.

Why a helper process (``BuildWorker``): the serving process decides every Check on one
event loop, and any Python work a reload does there takes the GIL from that loop. Parsing
a large change to ``policy.csv`` (or all of it, after a model change) and a directory's
own policy tests, which can be any size, run in the helper on another core; it hands back
only the parsed ``Policy`` (plain tuples: unpickling it costs a few ms). Small edits are
parsed in the serving process by a ``PolicyReader`` (a few changed lines cost less than
the round trip). The serving process builds its own engine either way (engines hold
closures and compiled regexes, which do not cross processes cheaply). Anything wrong with
the helper (it cannot start, it died, it hangs) makes the reload do the same work in
process: the gate never weakens.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import multiprocessing.util
import os
import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from authz.engine import Engine, build_engine
from authz.policy import Policy, PolicyReader, rule_counts
from citadel.errors import PolicyError
from citadel.logs import get_logger

__all__ = [
    "BuildWorker",
    "BuildWorkerUnavailable",
    "LoadedPolicy",
    "counts_for",
    "load_engine",
    "load_engine_from",
    "shared_build_worker",
]

log = get_logger("authz.loading")

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
    sp = policy.splice
    base = _COUNTS.get(sp.base) if sp is not None else None
    if sp is not None and base is not None:  # the base's counts, updated for the span
        counts = Counter(base)
        counts.subtract(sp.dropped)
        counts.update(row[0] for row in policy.rows[sp.head : sp.head + sp.added])
        _COUNTS[policy.revision] = {k: n for k, n in counts.items() if n > 0}
    else:
        _COUNTS[policy.revision] = rule_counts(policy)
    _COUNTS.move_to_end(policy.revision)
    while len(_COUNTS) > _COUNTS_MAX:
        _COUNTS.popitem(last=False)


def counts_for(revision: str) -> dict[str, int]:
    """Rows per ptype of a revision loaded in this process ({} if unknown)."""
    return dict(_COUNTS.get(revision, {}))


def load_engine(
    directory: str | Path,
    *,
    perf_counter: Callable[[], float] = time.perf_counter,
    previous: Engine | None = None,
    reader: PolicyReader | None = None,
) -> LoadedPolicy:
    """Read, validate and build; raise ``PolicyError`` (with file/line when known).
    A ``reader`` parses only what changed since its last read."""
    started = perf_counter()
    policy = (reader or PolicyReader()).read(directory)
    assert policy is not None  # no limit on changed lines
    return load_engine_from(policy, started=started, perf_counter=perf_counter, previous=previous)


def load_engine_from(
    policy: Policy,
    *,
    started: float | None = None,
    perf_counter: Callable[[], float] = time.perf_counter,
    previous: Engine | None = None,
) -> LoadedPolicy:
    """Validate and build an already parsed policy (e.g. one a BuildWorker read);
    ``previous`` is the serving engine, whose unchanged parts the new one may share."""
    started = perf_counter() if started is None else started
    try:
        engine = build_engine(policy, previous=previous)
    except PolicyError:
        raise
    except Exception as exc:  # an engine bug must read as "policy refused", not a crash
        raise PolicyError(f"engine could not be built: {type(exc).__name__}: {exc}") from exc
    _remember_counts(policy)
    return LoadedPolicy(policy=policy, engine=engine, duration_s=perf_counter() - started)


# ------------------------------------------------------------------ the helper process


class BuildWorkerUnavailable(Exception):
    """The helper cannot do this job (not started, died, timed out): do it in process."""


def _child_init(parent: int) -> None:
    """Exit once the serving process is gone. A helper whose parent was SIGKILLed would
    otherwise wait forever on its job queue (it holds that pipe's write end itself)."""

    def watch() -> None:
        while True:
            time.sleep(0.5)
            if os.getppid() != parent:
                os._exit(0)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _child_ready() -> bool:
    import authz.reload  # noqa: F401  (pay the imports before the first reload needs them)

    return True


def _error_tuple(exc: PolicyError) -> tuple[str, str, str | None, int | None]:
    return ("error", exc.message, exc.file, exc.line)


#: The helper's own reader: its parses, too, cover only the lines that changed.
_reader = PolicyReader()


def _child_parse(directory: str) -> tuple[Any, ...]:
    try:
        return ("ok", _reader.read(directory))
    except PolicyError as exc:
        return _error_tuple(exc)


#: The helper's last engine that passed its gate, per directory (one directory per
#: serving process in practice): the next check builds incrementally from it.
_checked: dict[str, Engine] = {}


def _child_check(directory: str) -> tuple[Any, ...]:
    """The whole gate (parse, validate, build, probe, the directory's policy tests)."""
    from authz.reload import load_candidate

    try:
        _, engine = load_candidate(
            directory, run_tests=True, previous=_checked.get(directory), reader=_reader
        )
    except PolicyError as exc:
        return _error_tuple(exc)
    _checked.clear()
    _checked[directory] = engine
    return ("ok",)


def _unpack(result: tuple[Any, ...]) -> Any:
    if result[0] == "error":
        raise PolicyError(result[1], file=result[2], line=result[3])
    return result[1] if len(result) > 1 else None


def _stop_pool(pool: concurrent.futures.ProcessPoolExecutor) -> None:
    with contextlib.suppress(Exception):
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.kill()
    with contextlib.suppress(Exception):
        pool.shutdown(wait=False, cancel_futures=True)


class BuildWorker:
    """One spawned helper process that parses candidate policies and runs their tests.

    Jobs run one at a time (reloads are serialised anyway); ``timeout_s`` bounds each, and
    a helper that exceeds it or dies is discarded and replaced on the next job.
    """

    def __init__(self, *, timeout_s: float = 60.0) -> None:
        self.timeout_s = timeout_s
        self._lock = threading.Lock()
        self._pool: concurrent.futures.ProcessPoolExecutor | None = None
        self._ready: concurrent.futures.Future[Any] | None = None
        #: Jobs that fell back to the serving process (for tests and /metrics).
        self.fallbacks = 0
        #: Jobs handed to the helper (parses, gates, the start-up probe).
        self.jobs = 0

    def _executor(self) -> concurrent.futures.ProcessPoolExecutor:
        with self._lock:
            if self._pool is None:
                # spawn: a clean interpreter (never fork a process running gRPC threads).
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    max_workers=1,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_child_init,
                    initargs=(os.getpid(),),
                )
                # A process that is itself a multiprocessing child (``--workers``) joins
                # its children at exit *before* the executor's own shutdown hook runs, so
                # the helper must be stopped first or that exit waits forever.
                multiprocessing.util.Finalize(None, _stop_pool, args=(self._pool,), exitpriority=10)
            return self._pool

    def _submit(self, fn: Callable[..., Any], *args: Any) -> concurrent.futures.Future[Any]:
        self.jobs += 1
        try:
            return self._executor().submit(fn, *args)
        except Exception as exc:  # broken pool, daemonic parent, interpreter shutting down
            self._discard()
            raise BuildWorkerUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def _result(self, fut: concurrent.futures.Future[Any]) -> tuple[Any, ...]:
        try:
            return fut.result(timeout=self.timeout_s)
        except Exception as exc:  # died, timed out, result did not unpickle
            self._discard()
            raise BuildWorkerUnavailable(f"{type(exc).__name__}: {exc}") from exc

    def _discard(self) -> None:
        self.fallbacks += 1
        with self._lock:
            pool, self._pool, self._ready = self._pool, None, None
        if pool is not None:
            _stop_pool(pool)  # a hung helper must not hold the next job
        log.warning("policy build helper unavailable; loading in process")

    def pid(self) -> int | None:
        """The helper's process id, once it runs (for operators and tests)."""
        with self._lock:
            procs = getattr(self._pool, "_processes", None) or {}
        return next(iter(procs), None)

    def start(self) -> None:
        """Spawn the helper now (its imports take a while), without waiting for it."""
        with contextlib.suppress(BuildWorkerUnavailable):
            fut = self._submit(_child_ready)
            with self._lock:
                self._ready = fut

    def ready(self) -> bool:
        """True once the helper runs; starts it if it is not starting. A reload does not
        wait for a helper to boot (a second or so): it loads in process meanwhile."""
        fut = self._ready
        if fut is None:
            self.start()
            return False
        if not fut.done():
            return False
        if fut.cancelled() or fut.exception() is not None:
            self._discard()
            return False
        return True

    def wait_ready(self, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while not self.ready():
            if time.monotonic() > deadline:
                return False
            time.sleep(0.02)
        return True

    def parse(self, directory: str | Path) -> Policy:
        """``load_policy_dir`` in the helper; PolicyError as it would raise in process."""
        policy = _unpack(self._result(self._submit(_child_parse, str(directory))))
        if not isinstance(policy, Policy):
            self._discard()
            raise BuildWorkerUnavailable(f"helper returned {type(policy).__name__}")
        return policy

    def check(self, directory: str | Path) -> concurrent.futures.Future[Any]:
        """Start the whole gate, tests included, in the helper; ``verdict`` waits for it."""
        return self._submit(_child_check, str(directory))

    def verdict(self, fut: concurrent.futures.Future[Any]) -> None:
        """None if the candidate passed; PolicyError if not; BuildWorkerUnavailable."""
        _unpack(self._result(fut))

    def close(self) -> None:
        with self._lock:
            pool, self._pool, self._ready = self._pool, None, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)


_shared: BuildWorker | None = None
_shared_lock = threading.Lock()


def shared_build_worker() -> BuildWorker:
    """The process-wide helper (one per serving process, shared by its reloaders)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = BuildWorker()
        return _shared
