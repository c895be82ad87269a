"""``citadel authz serve --workers N``: N processes sharing one gRPC port.

One Python process decides on about one core (the GIL), so using every core takes
processes. The supervisor spawns N workers (``multiprocessing`` spawn: a clean interpreter,
no inherited gRPC threads) that each run the ordinary single-process server with
``SO_REUSEPORT`` on, so the kernel spreads incoming *connections* across them. Each worker
has its own engine and reload watcher (whatever ``serve`` runs, a worker runs) and its own
audit stream: records go to the shared file through one ``O_APPEND`` write each, under the
worker's own stream id, so lines never interleave and every chain verifies on its own.

The admin HTTP app (health, metrics, explain) runs in worker 0 only, so its metrics are
worker 0's share of the traffic. The supervisor refuses a port someone else already holds
(``SO_REUSEPORT`` would otherwise silently share it), waits until every worker is serving,
forwards SIGTERM/SIGINT, and exits 0 once all have drained. If a worker dies on its own,
the supervisor stops the rest and exits 1, so the orchestrator restarts the whole set
rather than running with fewer cores than asked for.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import multiprocessing
import multiprocessing.connection
import os
import signal
import socket
import sys
import time
from typing import Any

from authz.server import AuthzConfig, parse_listen
from citadel.errors import ConfigError, PolicyError
from citadel.logs import configure_logging, get_logger

__all__ = ["run_workers"]

_log = get_logger("authz.workers")
#: How long a worker may take to load its policy and bind before start-up is abandoned.
START_TIMEOUT_S = 120.0


def _worker_main(index: int, config: AuthzConfig, log_level: str, conn: Any) -> None:
    """One worker: the ordinary server, telling the supervisor once it serves (or why not)."""
    import asyncio

    import structlog

    from authz.commands import _serve, policy_error_text

    configure_logging(level=log_level)
    structlog.contextvars.bind_contextvars(worker=index)

    def ready(_running: object) -> None:
        conn.send(("ready", os.getpid()))

    try:
        asyncio.run(_serve(config, on_ready=ready))
    except PolicyError as exc:
        conn.send(("error", f"policy refused: {policy_error_text(exc, config.policy_dir)}"))
        sys.exit(2)
    except ConfigError as exc:
        conn.send(("error", exc.message))
        sys.exit(2)
    except KeyboardInterrupt:  # a signal before the event loop took over: just stop
        sys.exit(0)
    except Exception as exc:
        with contextlib.suppress(OSError):
            conn.send(("error", f"worker {index} failed to start: {type(exc).__name__}: {exc}"))
        raise


def _ensure_port_free(host: str, port: int) -> None:
    """Fail like a single process would if another server already holds the port."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as s:
        try:
            s.bind((host, port))
        except OSError as exc:
            why = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
            raise ConfigError(f"cannot listen on {host}:{port} (gRPC): {why}") from exc


def run_workers(config: AuthzConfig, *, workers: int, log_level: str = "info") -> int:
    """Run ``workers`` server processes until SIGTERM/SIGINT; returns the exit code.

    Raises ``ConfigError`` before starting anything when the address cannot be shared.
    """
    if workers < 1:
        raise ConfigError("--workers must be at least 1")
    host, port = parse_listen(config.listen)
    if port == 0:
        raise ConfigError("--workers needs a fixed --listen port (port 0 would differ per worker)")
    _ensure_port_free(host, port)

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
        for i in range(workers):
            reader, writer = ctx.Pipe(duplex=False)
            cfg = dataclasses.replace(
                config,
                reuse_port=True,
                admin_listen=config.admin_listen if i == 0 else None,
            )
            p = ctx.Process(
                target=_worker_main, args=(i, cfg, log_level, writer), name=f"authz-worker-{i}"
            )
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
            _log.info("workers serving", workers=workers, listen=config.listen,
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
        _join(procs, config.grace_s + 15)
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
