"""A supervisor for N server processes sharing one port (``SO_REUSEPORT``).

One Python process serves on about one core (the GIL, and grpc-core's own threads), so
using every core takes processes. ``run_workers`` spawns N workers (``multiprocessing``
spawn: a clean interpreter, no inherited gRPC threads), each running a picklable
top-level callable that builds its own server, state and audit stream and binds with
``SO_REUSEPORT`` so the kernel spreads incoming *connections* across them.

The supervisor refuses a port someone else already holds (``SO_REUSEPORT`` would
otherwise silently share it), waits until every worker reports it is serving, forwards
SIGTERM/SIGINT, and exits 0 once all have drained. If a worker dies on its own, it stops
the rest and exits 1, so an orchestrator restarts the whole set rather than running
with fewer cores than asked for.

A worker callable is called as ``target(*args, ready)`` in the child; it calls
``ready()`` once it serves and returns after draining. Raising ``CitadelError`` (or
``SystemExit``) before ``ready()`` is reported as a start-up failure.
"""

from __future__ import annotations

import contextlib
import errno
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any

from citadel.errors import CitadelError, ConfigError
from citadel.logs import get_logger

__all__ = ["START_TIMEOUT_S", "ensure_port_free", "run_workers"]

_log = get_logger("citadel.workers")
#: How long a worker may take to load its state and bind before start-up is abandoned.
START_TIMEOUT_S = 120.0


def _child(target: Callable[..., Any], args: tuple[Any, ...], index: int, conn: Any) -> None:
    """Run one worker, telling the supervisor once it serves (or why it cannot)."""
    started = False

    def ready() -> None:
        nonlocal started
        started = True
        conn.send(("ready", os.getpid()))

    try:
        target(*args, ready)
    except CitadelError as exc:
        if not started:
            conn.send(("error", exc.message))
        sys.exit(2)
    except KeyboardInterrupt:  # a signal before the worker's handlers took over: just stop
        sys.exit(0)
    except SystemExit as exc:
        if not started and exc.code not in (0, None):
            with contextlib.suppress(OSError):
                conn.send(("error", f"worker {index} could not start (exit {exc.code})"))
        raise
    except Exception as exc:
        if not started:
            with contextlib.suppress(OSError):
                conn.send(("error", f"worker {index} failed to start: {type(exc).__name__}: {exc}"))
        raise


def ensure_port_free(host: str, port: int, *, what: str = "gRPC") -> None:
    """Fail like a single process would if another server already holds the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            why = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise ConfigError(f"cannot listen on {host}:{port} ({what}): {why}") from exc


def run_workers(
    target: Callable[..., Any],
    worker_args: Sequence[tuple[Any, ...]],
    *,
    host: str,
    port: int,
    grace_s: float,
    name: str = "worker",
) -> int:
    """Run one process per ``worker_args`` entry until SIGTERM/SIGINT; return the exit code.

    Raises ``ConfigError`` before starting anything when the address cannot be shared.
    Start-up failures print ``error: ...`` to stderr and return 2.
    """
    workers = len(worker_args)
    if workers < 1:
        raise ConfigError("--workers must be at least 1")
    if port == 0:
        raise ConfigError("--workers needs a fixed --listen port (port 0 would differ per worker)")
    ensure_port_free(host, port)

    ctx = multiprocessing.get_context("spawn")
    procs: list[multiprocessing.process.BaseProcess] = []
    conns: list[multiprocessing.connection.Connection] = []
    stopping = False

    def stop_all(sig: int = signal.SIGTERM) -> None:
        for p in procs:
            if p.is_alive() and p.pid is not None:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, sig)

    def on_signal(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        stop_all(signal.SIGTERM)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        for i, args in enumerate(worker_args):
            reader, writer = ctx.Pipe(duplex=False)
            p = ctx.Process(target=_child, args=(target, args, i, writer), name=f"{name}-{i}")
            p.start()
            writer.close()
            procs.append(p)
            conns.append(reader)

        # Wait until every worker serves, or one says why it cannot.
        deadline = time.monotonic() + START_TIMEOUT_S
        pending = dict(zip(conns, range(workers), strict=True))
        while pending and not stopping:
            for conn in multiprocessing.connection.wait(list(pending), timeout=0.5):
                if stopping:  # told to stop while starting: not a failure
                    break
                index = pending.pop(conn)  # type: ignore[call-overload]
                try:
                    kind, detail = conn.recv()
                except EOFError:
                    kind, detail = "error", f"worker {index} exited while starting"
                if kind != "ready":
                    stop_all(signal.SIGTERM)
                    _join(procs)
                    print(f"error: {detail}", file=sys.stderr)
                    return 2
            if time.monotonic() > deadline:
                stop_all(signal.SIGKILL)
                _join(procs)
                print(
                    f"error: workers did not start within {START_TIMEOUT_S:.0f} s", file=sys.stderr
                )
                return 2
        if not stopping:
            _log.info("workers serving", workers=workers, port=port,
                      pids=[p.pid for p in procs])  # fmt: skip

        # Serve until told to stop; a worker dying on its own takes the set down.
        while not stopping:
            dead = multiprocessing.connection.wait([p.sentinel for p in procs], timeout=0.5)
            if dead and not stopping:
                gone = [p for p in procs if not p.is_alive()]
                _log.error("worker exited unexpectedly; stopping all",
                           workers=[(p.name, p.exitcode) for p in gone])  # fmt: skip
                stop_all(signal.SIGTERM)
                _join(procs)
                return 1
        _join(procs, grace_s + 15)
        codes = [p.exitcode for p in procs]
        _log.info("workers stopped", exit_codes=codes)
        # A worker stopped by the signal before its handlers were in place is a clean stop too.
        return 0 if all(c in (0, -signal.SIGTERM) for c in codes) else 1
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for conn in conns:
            conn.close()


def _join(procs: list[multiprocessing.process.BaseProcess], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    for p in procs:
        p.join(max(0.1, deadline - time.monotonic()))
        if p.is_alive():
            p.kill()
            p.join(5)
