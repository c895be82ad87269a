"""Hot reload: watch the policy directory, build the new engine off to the side, swap.

Why the directory and not the files: a mounted ConfigMap is updated by writing a new
``..<timestamp>/`` directory and atomically renaming a new ``..data`` symlink over the old
one; the visible ``model.conf`` is a symlink ``model.conf -> ..data/model.conf`` whose own
inode never changes, so a watch on the file paths sees nothing. Editors write a temp file
and rename it over the original (a new inode again); shell redirects write in place. A
watch on the directory sees all three. inotify can still miss events on some network and
overlay mounts, so a slow poll compares a content fingerprint as a fallback.

Why nothing waits: loading, validating and testing happen in this module's thread (or a
worker thread of the caller's event loop), never under a lock a decision takes. The swap
is one reference assignment in ``PolicyState.swap``; a decision that read ``state.engine``
before it finishes on that engine. Reloads are serialised by our own lock, so two triggers
(an event and ``POST /v1/reload``) never race to swap.

Why last good wins: a candidate that does not parse, validate, or pass the directory's own
policy tests is recorded as a failure (``state.last_error``, counted, logged) and the
serving engine is untouched. A directory that vanishes or empties is treated the same way:
the last good revision keeps serving and an outcome says so.

Reads resolve ``..data`` once per load, so the model and the policy always come from the
same ConfigMap generation even if a swap lands between the two reads.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import watchfiles

from authz.engine import Engine
from authz.loading import (
    BuildWorker,
    BuildWorkerUnavailable,
    load_engine,
    load_engine_from,
    shared_build_worker,
)
from authz.pacing import paced
from authz.policy import MODEL_FILE, POLICY_FILE, Policy, PolicyBytes, PolicyReader
from authz.policytests import failure_error, find_test_files, load_cases, run_cases
from authz.snapshot import EMPTY, MISSING, Snapshot, dir_state, resolve_dir, snapshot
from authz.state import LoadOutcome, PolicyState, build_info
from citadel.errors import PolicyError
from citadel.logs import get_logger

__all__ = [
    "ReloadOutcome",
    "Reloader",
    "initial_state",
    "load_candidate",
    "register_metrics",
    "resolve_dir",
    "retire",
]

log = get_logger("authz.reload")

#: Changed policy.csv lines a reload parses in the serving process when the helper is up
#: (about 5 µs a line); a larger change is parsed by the helper.
IN_PROCESS_LINES = 1000


@dataclass(frozen=True, slots=True)
class ReloadOutcome(LoadOutcome):
    """A LoadOutcome plus what the reloader did about it (for ``POST /v1/reload``)."""

    #: True when a new revision was swapped in.
    changed: bool = False
    #: Human note: "unchanged", "directory missing, still serving ...", ...
    note: str | None = None
    #: What triggered it: "explicit", "watch", "poll", "start".
    trigger: str = "explicit"

    def as_dict(self) -> dict[str, object]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


def load_candidate(
    policy_dir: str | Path,
    *,
    run_tests: bool = True,
    worker: BuildWorker | None = None,
    previous: Engine | None = None,
    reader: PolicyReader | None = None,
    seen: Snapshot | None = None,
) -> tuple[Policy, Engine]:
    """Load, build and test a policy directory; raises PolicyError (with file/line) if bad.

    With a ``worker``, a large change (or a model change) is parsed and the directory's
    policy tests run in its helper process, and the engine is built here (see
    authz/loading.py); the gate is the same.
    A vanished ``..<timestamp>`` directory (Kubernetes deletes the old generation right
    after the swap) is retried against the new ``..data`` target. ``previous`` (the
    serving engine) lets the build reuse what the new revision left unchanged, and a
    ``reader`` parses only the lines that changed since its last read; ``seen``, the
    snapshot that triggered the load, gives it the files' bytes already read and hashed.
    """
    d = Path(policy_dir)
    for attempt in range(3):
        real = resolve_dir(d)
        try:
            return _load_from(
                real,
                source=str(d),
                run_tests=run_tests,
                worker=worker,
                previous=previous,
                reader=reader,
                given=seen.files if seen is not None and seen.real == real else None,
            )
        except PolicyError:
            if attempt < 2 and resolve_dir(d) != real:
                continue  # a swap landed while we read; read the new generation
            raise
    raise AssertionError("unreachable")  # pragma: no cover


#: References to a replaced engine that ``retire`` itself accounts for: the caller's
#: variable, retire's parameter, and sys.getrefcount's own argument.
_RETIRE_OWN_REFS = 3
#: Entries popped between two looks at the clock (a small dict is just dropped).
_RETIRE_BATCH = 64


def retire(engine: Engine, *, slice_s: float = 0.001, pause: float = 0.0002) -> bool:
    """Free a replaced engine a slice at a time, instead of in one deallocation cascade.

    Dropping the last reference to a 10,000-rule engine frees its index and decision
    cache (~250,000 objects) in one C-level cascade that holds the GIL for 15-25 ms, and
    every Check waits that long. Here its dicts are emptied ``slice_s`` at a time with a
    ``pause`` in between. Only when nothing else can reach it: if the engine, or any dict
    of it, has a reference besides ours (a decision still running on it, a closure), that
    part is left to reference counting, unchanged. False when nothing was done.
    """
    attrs = getattr(engine, "__dict__", None)
    if attrs is None or sys.getrefcount(engine) > _RETIRE_OWN_REFS:
        return False
    clock = time.perf_counter
    for name in list(attrs):
        value = attrs.pop(name)
        # 2: our variable and getrefcount's argument; more means someone else holds it.
        if type(value) is dict and len(value) > _RETIRE_BATCH and sys.getrefcount(value) == 2:
            pop = value.popitem
            while value:
                until = clock() + slice_s
                while len(value) > _RETIRE_BATCH and clock() < until:
                    for _ in range(_RETIRE_BATCH):
                        pop()
                if len(value) <= _RETIRE_BATCH:
                    value.clear()
                time.sleep(pause)
        del value
    return True


def _load_from(
    real: Path,
    *,
    source: str,
    run_tests: bool,
    worker: BuildWorker | None = None,
    previous: Engine | None = None,
    reader: PolicyReader | None = None,
    given: PolicyBytes | None = None,
) -> tuple[Policy, Engine]:
    tests = None  # the helper's run of the whole gate, tests included
    try:
        # A small edit is parsed here (a few ms); a large one, or a model change, goes
        # to the helper when it runs, and then the reader learns the helper's result.
        limit = IN_PROCESS_LINES if worker is not None and worker.ready() else None
        parsed = reader.read(real, max_changed=limit, given=given) if reader is not None else None
        if parsed is None:
            parsed = _parse_elsewhere(worker, real)
            if parsed is not None and reader is not None:
                reader.adopt(parsed)
        if parsed is None:
            # read, validate, build (and counts for /v1/policy)
            loaded = load_engine(real, previous=previous, reader=reader)
        else:
            if run_tests and worker is not None and find_test_files(real):
                with contextlib.suppress(BuildWorkerUnavailable):
                    tests = worker.check(real)
            loaded = load_engine_from(parsed, previous=previous)  # meanwhile, build here
    except PolicyError as exc:
        if exc.file == MODEL_FILE and exc.line is None and "matcher" in exc.message.lower():
            text = _read_text(real / MODEL_FILE)
            raise PolicyError(exc.message, file=exc.file, line=_matcher_line(text)) from exc
        raise
    policy, engine = dataclasses.replace(loaded.policy, source=source), loaded.engine
    _probe(engine, policy)
    if run_tests and tests is not None:
        try:
            worker.verdict(tests)  # type: ignore[union-attr]  # PolicyError: refused
            return policy, engine
        except BuildWorkerUnavailable:
            pass  # run them here instead
    if run_tests:
        cases = load_cases(real)
        if cases:
            report = run_cases(engine, cases)
            if not report.ok:
                raise failure_error(report)
    return policy, engine


def _parse_elsewhere(worker: BuildWorker | None, real: Path) -> Policy | None:
    """The policy as the helper process parsed it; None: parse here (no helper, it is
    still starting, or it is unavailable). PolicyError when the files are bad."""
    if worker is None or not worker.ready():
        return None
    try:
        return worker.parse(real)
    except BuildWorkerUnavailable as exc:
        log.warning("policy helper unavailable; loading in process", error=str(exc))
        return None


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""


def _probe(engine: Engine, policy: Policy) -> None:
    """One decision before serving: a matcher that cannot evaluate fails here, not live."""
    try:
        engine.decide("anonymous", "probe.citadel.invalid", "/", "GET")
    except Exception as exc:
        raise PolicyError(
            f"policy cannot decide a request: {type(exc).__name__}: {exc}",
            file=MODEL_FILE,
            line=_matcher_line(policy.model_text),
        ) from exc


def _matcher_line(model_text: str) -> int | None:
    """Line of the first matcher definition in model.conf (where such errors live)."""
    in_matchers = False
    for lineno, line in enumerate(model_text.splitlines(), start=1):
        s = line.strip()
        if s.startswith("["):
            in_matchers = s == "[matchers]"
        elif in_matchers and "=" in s and not s.startswith("#"):
            return lineno
    return None


def initial_state(
    policy_dir: str | Path,
    *,
    run_tests: bool = True,
    clock: Callable[[], float] = time.time,
    history_size: int = 20,
) -> PolicyState:
    """The serving state at start-up; PolicyError (a clear message) when nothing valid."""
    d = Path(policy_dir)
    state = dir_state(d)
    if state == MISSING:
        raise PolicyError(f"policy directory {d} does not exist")
    if state == EMPTY:
        raise PolicyError(f"policy directory {d} holds no {MODEL_FILE} or {POLICY_FILE}")
    try:
        _, engine = load_candidate(d, run_tests=run_tests)
    except PolicyError as exc:
        where = f"{exc.file}:{exc.line}: " if exc.file and exc.line else ""
        where = where or (f"{exc.file}: " if exc.file else "")
        raise PolicyError(
            f"no valid policy in {d}: {where}{exc.message}", file=exc.file, line=exc.line
        ) from exc
    return PolicyState(engine, source=str(d), clock=clock, history_size=history_size)


_gc_lock = threading.Lock()
_gc_depth = 0
_gc_was_enabled = False


@contextlib.contextmanager
def quiet_gc() -> Any:
    """No cyclic-GC passes while a policy builds (re-entrant across reloader threads).

    Measured with a 10,000-rule policy: building allocates enough that CPython runs
    several full (generation 2) collections, each scanning every live object while holding
    the GIL, i.e. stalling every decision thread for 0.2-0.5 s, and together more than
    doubling the build time. The build's garbage is freed by reference counting anyway.
    """
    global _gc_depth, _gc_was_enabled
    with _gc_lock:
        if _gc_depth == 0:
            _gc_was_enabled = gc.isenabled()
            gc.disable()
        _gc_depth += 1
    try:
        yield
    finally:
        with _gc_lock:
            _gc_depth -= 1
            if _gc_depth == 0 and _gc_was_enabled:
                gc.enable()


class Reloader:
    """Keeps ``state`` serving the newest valid policy found in ``policy_dir``."""

    def __init__(
        self,
        state: PolicyState,
        policy_dir: str | Path,
        *,
        debounce: float = 0.2,
        poll_interval: float = 5.0,
        watch: bool = True,
        run_tests: bool = True,
        gc_freeze: bool = True,
        isolate: bool = True,
        retire_slices: bool = True,
        incremental: bool = True,
        pace_s: float | None = 0.0005,
        on_swap: Callable[[ReloadOutcome], None] | None = None,
        on_failure: Callable[[ReloadOutcome], None] | None = None,
        name: str = "policy",
    ) -> None:
        self.state = state
        self.policy_dir = Path(policy_dir)
        self.debounce = debounce
        self.poll_interval = poll_interval
        #: False: poll only (for mounts where inotify never fires).
        self.watch = watch
        self.run_tests = run_tests
        #: After a swap, move every live object (the new engine included) to CPython's
        #: permanent generation so later full collections do not rescan a large engine.
        #: Engines are acyclic (freed by refcount when dropped), so nothing of theirs leaks.
        self.gc_freeze = gc_freeze
        #: Parse and test candidates in a helper process (authz/loading.py BuildWorker),
        #: so only the engine build takes the serving process's GIL.
        self.worker: BuildWorker | None = shared_build_worker() if isolate else None
        #: Free the replaced engine in slices (see retire) rather than in one GIL stall.
        self.retire_slices = retire_slices
        #: Build each candidate from the serving engine, rebuilding only what changed.
        self.incremental = incremental
        #: The reload thread pauses this long after each this long of work (see
        #: authz/pacing.py), so a waiting event loop gets the GIL; None: no pauses.
        self.pace_s = pace_s
        #: This reloader's parses of its directory, diffed line by line (see PolicyReader).
        self.reader = PolicyReader()
        self.on_swap = on_swap
        self.on_failure = on_failure
        self.name = name
        self._lock = threading.Lock()  # one reload at a time; decisions never take it
        self._last_fp: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        #: Counters and gauges for /metrics (monotonic counts unless noted).
        self.watch_events = 0
        self.polls = 0
        self.noops = 0
        self.attempts = 0
        self.last_duration_s = 0.0  # gauge
        self.directory_missing = False  # gauge
        self.last_outcome: ReloadOutcome | None = None

    # ----------------------------------------------------------- reloading

    def reload_now(self, *, trigger: str = "explicit") -> ReloadOutcome:
        """Load the directory now (synchronously) and swap if it is new and valid."""
        with self._lock:
            return self._reload_locked(trigger, snapshot(self.policy_dir))

    def check(self, *, trigger: str = "poll") -> ReloadOutcome | None:
        """Reload only if the content changed since the last attempt (watch/poll path)."""
        with self._lock:
            seen = snapshot(self.policy_dir)
            if seen.fingerprint == self._last_fp:
                return None
            return self._reload_locked(trigger, seen)

    def _reload_locked(self, trigger: str, seen: Snapshot) -> ReloadOutcome:
        self.attempts += 1
        self._last_fp = fp = seen.fingerprint
        t0 = time.perf_counter()
        cpu0 = time.thread_time()
        serving = self.state.revision
        if fp in (MISSING, EMPTY):
            self.directory_missing = True
            what = "does not exist" if fp == MISSING else "is empty"
            err = PolicyError(
                f"policy directory {self.policy_dir} {what}; still serving revision {serving}"
            )
            return self._failed(err, t0, trigger, note=f"directory {fp}, kept {serving}")
        self.directory_missing = False
        # No GC pass while building, nor between the swap and the freeze (see quiet_gc).
        with quiet_gc(), paced(self.pace_s, self.pace_s):
            try:
                policy, engine = load_candidate(
                    self.policy_dir,
                    run_tests=self.run_tests,
                    worker=self.worker,
                    previous=self.state.engine if self.incremental else None,
                    reader=self.reader if self.incremental else None,
                    seen=seen,
                )
            except PolicyError as exc:
                failure: PolicyError | None = exc
            else:
                failure = None
                duration = time.perf_counter() - t0
                changed = engine.revision != serving
                old = self.state.engine
                if changed:
                    cpu = time.thread_time() - cpu0
                    self.state.swap(engine, duration_s=duration, rules=len(policy.rows), cpu_s=cpu)
                del engine  # the state holds it
                if changed and self.retire_slices:
                    retire(old)
                del old
                if changed and self.gc_freeze:
                    gc.freeze()
        if failure is not None:
            return self._failed(failure, t0, trigger, note=f"refused, kept {serving}")
        self.last_duration_s = duration
        if not changed:
            self.noops += 1
            out = ReloadOutcome(
                at=time.time(),
                ok=True,
                revision=serving,
                duration_s=duration,
                rules=len(policy.rows),
                changed=False,
                note="unchanged",
                trigger=trigger,
            )
            self.last_outcome = out
            return out
        out = ReloadOutcome(
            at=self.state.loaded_at,
            ok=True,
            revision=self.state.revision,
            duration_s=duration,
            rules=len(policy.rows),
            cpu_s=cpu,
            **build_info(self.state.engine),
            changed=True,
            note=f"swapped {serving} -> {self.state.revision}",
            trigger=trigger,
        )
        self.last_outcome = out
        log.info(
            "policy swapped",
            policy=self.name,
            old=serving,
            new=out.revision,
            rules=len(policy.rows),
            kind=getattr(self.state.engine, "kind", "?"),
            duration_ms=round(duration * 1000, 2),
            cpu_ms=round(cpu * 1000, 2),
            build=out.build,
            rows_rebuilt=out.rows_rebuilt,
            trigger=trigger,
        )
        self._callback(self.on_swap, out)
        return out

    def _failed(self, exc: PolicyError, t0: float, trigger: str, *, note: str) -> ReloadOutcome:
        duration = time.perf_counter() - t0
        base = self.state.record_failure(exc, duration_s=duration)
        out = ReloadOutcome(
            at=base.at,
            ok=False,
            error=base.error,
            file=base.file,
            line=base.line,
            duration_s=duration,
            changed=False,
            note=note,
            trigger=trigger,
        )
        self.last_outcome = out
        log.warning(
            "policy reload refused; last good keeps serving",
            policy=self.name,
            serving=self.state.revision,
            error=exc.message,
            file=exc.file,
            line=exc.line,
            trigger=trigger,
        )
        self._callback(self.on_failure, out)
        return out

    def _callback(self, fn: Callable[[ReloadOutcome], None] | None, out: ReloadOutcome) -> None:
        if fn is None:
            return
        try:
            fn(out)
        except Exception as exc:  # a hook must never undo or block a reload
            log.warning("reload hook failed", policy=self.name, error=repr(exc))

    # ----------------------------------------------------------- watching

    def start(self) -> Reloader:
        """Watch in a daemon thread (idempotent); then start the build helper, which
        takes a second to boot (the first reloads load in process meanwhile)."""
        if self._thread is None or not self._thread.is_alive():
            self._stop.clear()
            self._thread = threading.Thread(
                target=self._watch_loop, name=f"reloader-{self.name}", daemon=True
            )
            self._thread.start()
        if self.worker is not None:
            self.worker.start()
        return self

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    async def run(self) -> None:
        """An asyncio task: watches until cancelled (the work runs in a thread)."""
        self.start()
        try:
            await asyncio.Event().wait()
        finally:
            await asyncio.to_thread(self.stop)

    def _watch_loop(self) -> None:
        while not self._stop.is_set():
            try:
                if self.watch and self.policy_dir.is_dir():
                    self._watch_dir()
                else:
                    self._tick("poll")
                    self._stop.wait(
                        self.poll_interval if not self.watch else min(self.poll_interval, 1.0)
                    )
            except Exception as exc:  # never let the watcher die; fall back to polling
                log.warning("policy watch failed; polling", policy=self.name, error=repr(exc))
                self._stop.wait(min(self.poll_interval, 1.0))
                self._tick("poll")

    def _watch_dir(self) -> None:
        """Watch until stopped or the directory itself is replaced or removed."""
        ino = self.policy_dir.stat().st_ino
        self._tick("poll")  # catch anything that changed before the watch began
        last_poll = time.monotonic()
        first = True  # and, on the first wake-up, anything that changed while it began
        for changes in watchfiles.watch(
            self.policy_dir,
            watch_filter=None,
            debounce=max(int(self.debounce * 1000), 1),
            step=min(50, max(int(self.debounce * 1000), 1)),
            stop_event=self._stop,
            rust_timeout=max(int(min(self.poll_interval, 1.0) * 1000), 50),
            yield_on_timeout=True,
            raise_interrupt=False,
        ):
            if changes:
                self.watch_events += len(changes)
                self._tick("watch")
            if first or time.monotonic() - last_poll >= self.poll_interval:
                first = False
                last_poll = time.monotonic()
                self._tick("poll")
            try:
                if self.policy_dir.stat().st_ino != ino:
                    return  # replaced: watch the new one
            except FileNotFoundError:
                return

    def _tick(self, trigger: str) -> None:
        if trigger == "poll":
            self.polls += 1
        try:
            self.check(trigger=trigger)
        except Exception as exc:
            log.warning("policy check failed", policy=self.name, error=repr(exc))

    # ----------------------------------------------------------- metrics

    def metrics(self) -> dict[str, Any]:
        """Figures for the admin /metrics endpoint (names without a prefix)."""
        return {
            "reloads_ok": self.state.reloads_ok,
            "reloads_failed": self.state.reloads_failed,
            "reload_attempts": self.attempts,
            "reload_noops": self.noops,
            "watch_events": self.watch_events,
            "polls": self.polls,
            "last_reload_duration_seconds": self.last_duration_s,
            "directory_missing": int(self.directory_missing),
            "revision": self.state.revision,
        }


class _ReloaderCollector:
    """Read at scrape time, so a reload costs nothing here (names: citadel_authz_reload_*)."""

    def __init__(self, reloader: Reloader) -> None:
        self._r = reloader

    def collect(self) -> Any:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        r = self._r
        for name, doc, value in (
            ("attempts", "Policy loads attempted (watch, poll or explicit).", r.attempts),
            ("noops", "Loads that found the serving revision unchanged.", r.noops),
            ("watch_events", "Filesystem events seen on the policy directory.", r.watch_events),
            ("polls", "Fallback content checks (for mounts where inotify misses).", r.polls),
        ):
            yield CounterMetricFamily(f"citadel_authz_reload_{name}", doc, value=value)
        yield GaugeMetricFamily(
            "citadel_authz_reload_last_duration_seconds",
            "Load + validate + test time of the last successful load.",
            value=r.last_duration_s,
        )
        yield GaugeMetricFamily(
            "citadel_authz_reload_directory_missing",
            "1 while the policy directory is gone or empty (the last good keeps serving).",
            value=int(r.directory_missing),
        )


def register_metrics(registry: Any, reloader: Reloader) -> None:
    """Expose the reloader's counters in a prometheus_client registry."""
    registry.register(_ReloaderCollector(reloader))
