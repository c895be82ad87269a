"""Wiring of the decision service: gRPC listener (TLS, limits, health, reflection) and the
admin HTTP app in one process and one event loop.

``start_authz`` is the in-process entry point (``citadel authz serve`` and ``citadel up``
both use it); it returns a ``RunningAuthz`` with the bound ports and ``stop()``. Start-up
fails closed and early, before anything listens: an invalid policy, an unopenable audit
log, unreadable TLS files or a taken port raise ``ConfigError``/``PolicyError`` with a
message naming the cause. ``stop()`` drains: health turns NOT_SERVING, new RPCs are
refused, in-flight ones finish (up to the grace period), then the audit log is closed.

SO_REUSEPORT is off unless asked for (``reuse_port``): grpc turns it on by default, which
would let a second server silently share a port instead of failing to start.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import gc
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
import uvicorn
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection
from prometheus_client.core import GaugeMetricFamily

from authz.admin import AdminApp, create_admin_app, create_ext_authz_app
from authz.decisions import DecisionPipeline
from authz.metrics import AuthzMetrics
from authz.reload import Reloader, initial_state
from authz.reload import register_metrics as register_reload_metrics
from authz.service import SERVICE_NAME, AuthorizationServicer, add_to_server
from authz.shadow import ShadowEvaluator
from authz.shadow import register_metrics as register_shadow_metrics
from authz.state import PolicyState
from citadel.audit import AuditLog, open_audit_log
from citadel.errors import AuditError, ConfigError
from citadel.eventloop import running_loop_name
from citadel.logs import get_logger

__all__ = ["AuthzConfig", "RunningAuthz", "parse_listen", "start_authz"]

DEFAULT_MAX_MESSAGE_BYTES = 4 * 1024 * 1024
_log = get_logger("authz.server")


@dataclass
class AuthzConfig:
    policy_dir: Path
    listen: str = "127.0.0.1:9191"
    #: None: no admin HTTP listener (the gRPC service alone).
    admin_listen: str | None = "127.0.0.1:9192"
    #: "-" is stdout; None too. Ignored when an AuditLog is passed to start_authz.
    audit_log: str | None = "-"
    #: Key (``citadel audit keygen``) signing periodic checkpoints and the closing record.
    audit_signing_key: Path | None = None
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None
    trust_xfcc: bool = False
    http_prefix: str = "/ext_authz"
    #: Envoy's HTTP ext_authz variant alone on its own port (every ``--workers`` process,
    #: sharing it like the gRPC port); None: only under the admin port's ``http_prefix``.
    http_listen: str | None = None
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    grace_s: float = 10.0
    reuse_port: bool = False
    #: Checks queued before the server starts shedding them (CANCELLED, so Envoy denies).
    max_pending: int = 10_000
    #: RPCs accepted and not yet answered (queued on the event loop included) beyond which
    #: new ones are refused at once with RESOURCE_EXHAUSTED, before they are read; Envoy
    #: denies them (status_on_error). None: unbounded. Bounds memory and queueing delay.
    max_in_flight: int | None = 4096
    #: A Check with less of its gRPC deadline left than this is denied unevaluated and
    #: audited as ``deadline_exceeded`` (authz/service.py).
    min_deadline_s: float = 0.001
    #: Watch policy_dir (and shadow_policy_dir) and hot-reload them (authz/reload.py).
    #: A caller that passes its own ``state`` to start_authz manages that state's watching.
    watch_policy: bool = True
    reload_debounce_s: float = 0.2
    reload_poll_s: float = 5.0
    #: A candidate policy decided beside every Check, never enforced (authz/shadow.py).
    shadow_policy_dir: Path | None = None
    #: ``auto``, ``uvloop`` or ``asyncio`` (citadel/eventloop.py); used by ``serve`` and by
    #: every ``--workers`` process, which each run their own loop.
    event_loop: str = "auto"


def parse_listen(value: str) -> tuple[str, int]:
    """``HOST:PORT``, ``[V6]:PORT`` or ``:PORT`` (all interfaces); port 0 picks one."""
    host, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"listen address {value!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
    return host or "0.0.0.0", int(port)


def _grpc_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _bind_http_socket(value: str, what: str, *, reuse_port: bool = False) -> socket.socket:
    host, port = parse_listen(value)
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    if reuse_port:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    try:
        sock.bind((host, port))
        sock.listen(1024)
    except OSError as exc:
        sock.close()
        why = "address already in use" if exc.errno == errno.EADDRINUSE else exc.strerror
        raise ConfigError(f"cannot listen on {value} ({what}): {why}") from exc
    sock.setblocking(False)
    return sock


def _read(path: Path, what: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from exc


def _server_credentials(config: AuthzConfig) -> grpc.ServerCredentials | None:
    if config.tls_cert is None and config.tls_key is None:
        if config.client_ca is not None:
            raise ConfigError("--client-ca needs --tls-cert and --tls-key")
        return None
    if config.tls_cert is None or config.tls_key is None:
        raise ConfigError("TLS needs both --tls-cert and --tls-key")
    cert = _read(config.tls_cert, "TLS certificate")
    key = _read(config.tls_key, "TLS key")
    ca = _read(config.client_ca, "client CA bundle") if config.client_ca is not None else None
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=ca, require_client_auth=ca is not None
    )


class _AuditHealthCollector:
    """``citadel_authz_audit_healthy``: 0 while audit writes fail (and everything is denied)."""

    def __init__(self, pipeline: DecisionPipeline) -> None:
        self._pipeline = pipeline

    def collect(self) -> Iterator[GaugeMetricFamily]:
        g = GaugeMetricFamily(
            "citadel_authz_audit_healthy",
            "1 if the last audit write succeeded; 0 while the sink fails and every Check is "
            "denied (fail closed).",
        )
        g.add_metric([], 1.0 if self._pipeline.audit_ok else 0.0)
        yield g


class _EmbeddedUvicorn(uvicorn.Server):
    """uvicorn without its own signal handling: the host process decides when to stop."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


@dataclass
class _HttpServer:
    """One embedded uvicorn serving an ASGI app on an already bound socket."""

    uv: _EmbeddedUvicorn
    task: asyncio.Task[None]
    port: int

    @classmethod
    async def start(
        cls, app: Any, sock: socket.socket, *, grace_s: float, what: str
    ) -> _HttpServer:
        uv = _EmbeddedUvicorn(
            uvicorn.Config(
                app,
                log_config=None,
                log_level="warning",
                access_log=False,
                lifespan="off",
                timeout_graceful_shutdown=max(1, int(grace_s)),
            )
        )
        task = asyncio.create_task(uv.serve(sockets=[sock]))
        while not uv.started:
            if task.done():
                task.result()
                raise ConfigError(f"{what} HTTP server did not start")
            await asyncio.sleep(0.005)
        return cls(uv, task, sock.getsockname()[1])

    async def stop(self, grace: float) -> None:
        self.uv.should_exit = True
        try:
            await asyncio.wait_for(self.task, timeout=grace + 1)
        except (TimeoutError, asyncio.CancelledError):
            self.task.cancel()


@dataclass
class RunningAuthz:
    config: AuthzConfig
    state: PolicyState
    pipeline: DecisionPipeline
    metrics: AuthzMetrics
    audit: AuditLog
    grpc_port: int
    admin_port: int | None
    admin_app: AdminApp | None
    _server: grpc.aio.Server
    _health: HealthServicer
    _owns_audit: bool
    #: The port of the HTTP ext_authz listener (``http_listen``), or None.
    http_port: int | None = None
    _http: list[_HttpServer] = field(default_factory=list)
    _stopped: asyncio.Event = field(default_factory=asyncio.Event)
    _stopping: bool = False
    reloader: Reloader | None = None
    shadow: ShadowEvaluator | None = None

    @property
    def serving(self) -> bool:
        return not self._stopping

    async def stop(self, grace: float | None = None) -> None:
        """Drain and stop; idempotent."""
        if self._stopping:
            await self._stopped.wait()
            return
        self._stopping = True
        grace = self.config.grace_s if grace is None else grace
        with contextlib.suppress(Exception):
            await self._health.enter_graceful_shutdown()
        await self._server.stop(grace)
        for watcher in (self.reloader, self.shadow):
            if watcher is not None:
                await asyncio.to_thread(watcher.stop)
        for http in self._http:
            await http.stop(grace)
        if self._owns_audit:
            self.audit.close()
        self._stopped.set()
        _log.info("authz stopped", records=self.audit.records_written)

    async def wait(self) -> None:
        await self._stopped.wait()


async def start_authz(
    config: AuthzConfig,
    *,
    state: PolicyState | None = None,
    audit: AuditLog | None = None,
    clock: Callable[[], float] = time.time,
) -> RunningAuthz:
    """Load the policy, bind both listeners, start serving; raise before listening on error."""
    watch = config.watch_policy and state is None
    if state is None:  # PolicyError (with the policy's own tests as a gate): fail closed
        state = initial_state(config.policy_dir, clock=clock)
    reloader = Reloader(
        state,
        config.policy_dir,
        debounce=config.reload_debounce_s,
        poll_interval=config.reload_poll_s,
    )
    creds = _server_credentials(config)
    owns_audit = audit is None
    if audit is None:
        try:
            audit = open_audit_log(
                config.audit_log,
                name="authz",
                clock=clock,
                signing_key=config.audit_signing_key,
            )
        except (OSError, AuditError) as exc:  # e.g. a full disk refuses the header record
            raise ConfigError(f"cannot open audit log {config.audit_log}: {exc}") from exc
    cleanup: list[Callable[[], object]] = [audit.close] if owns_audit else []
    try:
        admin_sock = http_sock = None
        if config.admin_listen:
            admin_sock = _bind_http_socket(config.admin_listen, "admin")
            cleanup.append(admin_sock.close)
        if config.http_listen:
            http_sock = _bind_http_socket(
                config.http_listen, "HTTP ext_authz", reuse_port=config.reuse_port
            )
            cleanup.append(http_sock.close)
        shadow = None
        if config.shadow_policy_dir is not None:
            shadow = ShadowEvaluator.from_dir(
                config.shadow_policy_dir,
                audit=audit,
                debounce=config.reload_debounce_s,
                poll_interval=config.reload_poll_s,
            )
        metrics = AuthzMetrics(state=state)
        register_reload_metrics(metrics.registry, reloader)
        if shadow is not None:
            register_shadow_metrics(metrics.registry, shadow)
        pipeline = DecisionPipeline(state=state, audit=audit, metrics=metrics, shadow=shadow)
        server = grpc.aio.server(
            options=[
                ("grpc.max_receive_message_length", config.max_message_bytes),
                ("grpc.max_send_message_length", config.max_message_bytes),
                ("grpc.so_reuseport", 1 if config.reuse_port else 0),
                # grpc-core cancels calls queued beyond these (randomly past the soft
                # limit); Envoy bursts can exceed the defaults (1,000/3,000) on one loop.
                ("grpc.server.max_pending_requests", config.max_pending),
                ("grpc.server.max_pending_requests_hard_limit", config.max_pending * 2),
            ],
            maximum_concurrent_rpcs=config.max_in_flight,
        )
        metrics.registry.register(_AuditHealthCollector(pipeline))
        servicer = AuthorizationServicer(pipeline, min_deadline_s=config.min_deadline_s)
        add_to_server(servicer, server)
        health = HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health, server)
        reflection.enable_server_reflection(
            (SERVICE_NAME, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name,
             reflection.SERVICE_NAME),
            server,
        )  # fmt: skip
        host, port = parse_listen(config.listen)
        address = _grpc_address(host, port)
        try:
            if creds is None:
                bound = server.add_insecure_port(address)
            else:
                bound = server.add_secure_port(address, creds)
        except RuntimeError as exc:
            raise ConfigError(
                f"cannot listen on {config.listen} (gRPC): address in use or not local"
            ) from exc
        if bound == 0:
            raise ConfigError(f"cannot listen on {config.listen} (gRPC)")
        await server.start()
    except BaseException:
        for fn in reversed(cleanup):
            with contextlib.suppress(Exception):
                fn()
        raise

    await health.set("", health_pb2.HealthCheckResponse.SERVING)
    await health.set(SERVICE_NAME, health_pb2.HealthCheckResponse.SERVING)

    running = RunningAuthz(
        config=config, state=state, pipeline=pipeline, metrics=metrics, audit=audit,
        grpc_port=bound, admin_port=None, admin_app=None, _server=server, _health=health,
        _owns_audit=owns_audit, reloader=reloader, shadow=shadow,
    )  # fmt: skip
    if watch:
        reloader.start()
    if shadow is not None and config.watch_policy:
        shadow.start()
    if admin_sock is not None:
        app = create_admin_app(
            state=state,
            pipeline=pipeline,
            metrics=metrics,
            # Not ready while the audit sink fails: every Check is being denied then.
            ready=lambda: running.serving and pipeline.audit_ok,
            http_prefix=config.http_prefix,
            trust_xfcc=config.trust_xfcc,
            reload=reloader.reload_now,
        )
        running.admin_app = app
        await _serve_http(running, server, app, admin_sock, "admin")
        running.admin_port = running._http[-1].port
    if http_sock is not None:
        authz_app = create_ext_authz_app(
            pipeline=pipeline, http_prefix=config.http_prefix, trust_xfcc=config.trust_xfcc
        )
        await _serve_http(running, server, authz_app, http_sock, "HTTP ext_authz")
        running.http_port = running._http[-1].port
    if reloader.gc_freeze:
        # What start-up built (the engine, its indexes, grpc and the admin app) lives as
        # long as the process: move it out of the collector's sight, as every reload does
        # for its engine. Otherwise each full collection re-scans a 10,000-rule engine
        # while holding the GIL (measured: ~12% more Checks/s with it frozen).
        gc.collect()
        gc.freeze()
    _log.info(
        "authz serving",
        grpc=f"{host}:{running.grpc_port}",
        admin=config.admin_listen
        and f"{config.admin_listen.rpartition(':')[0]}:{running.admin_port}",
        http_ext_authz=config.http_listen
        and f"{config.http_listen.rpartition(':')[0]}:{running.http_port}",
        revision=state.revision,
        engine=state.engine.kind,
        tls=creds is not None,
        mtls=config.client_ca is not None,
        loop=running_loop_name(),
    )
    return running


async def _serve_http(
    running: RunningAuthz, server: grpc.aio.Server, app: Any, sock: socket.socket, what: str
) -> None:
    """Start ``app`` on ``sock`` as one of ``running``'s HTTP servers. On failure, stop what
    already serves and raise: start-up serves every listener or none."""
    try:
        running._http.append(
            await _HttpServer.start(app, sock, grace_s=running.config.grace_s, what=what)
        )
    except BaseException:
        for http in running._http:
            await http.stop(0)
        await server.stop(0)
        raise
