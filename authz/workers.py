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

import dataclasses

from authz.server import AuthzConfig, parse_listen
from citadel.errors import ConfigError, PolicyError
from citadel.logs import configure_logging
from citadel.workers import run_workers as _run_workers

__all__ = ["run_workers"]


def _worker_main(index: int, config: AuthzConfig, log_level: str, ready: object) -> None:
    """One worker: the ordinary server, telling the supervisor once it serves (or why not)."""
    from collections.abc import Callable
    from typing import cast

    import structlog

    from authz.commands import _serve, policy_error_text
    from citadel import eventloop

    configure_logging(level=log_level)
    structlog.contextvars.bind_contextvars(worker=index)
    notify = cast("Callable[[], None]", ready)
    try:
        eventloop.run(
            _serve(config, on_ready=lambda _running: notify()), event_loop=config.event_loop
        )
    except PolicyError as exc:
        raise ConfigError(f"policy refused: {policy_error_text(exc, config.policy_dir)}") from exc


def run_workers(config: AuthzConfig, *, workers: int, log_level: str = "info") -> int:
    """Run ``workers`` server processes until SIGTERM/SIGINT; returns the exit code.

    Raises ``ConfigError`` before starting anything when the address cannot be shared.
    """
    if workers < 1:
        raise ConfigError("--workers must be at least 1")
    host, port = parse_listen(config.listen)
    per_worker = [
        (
            i,
            dataclasses.replace(
                config, reuse_port=True, admin_listen=config.admin_listen if i == 0 else None
            ),
            log_level,
        )
        for i in range(workers)
    ]
    return _run_workers(
        _worker_main, per_worker, host=host, port=port, grace_s=config.grace_s, name="authz-worker"
    )
