"""gRPC wiring for the CA: ports, TLS, limits, health, reflection, graceful stop.

Kept apart from the servicer so the logic can be tested without sockets and the wiring
can be reused: ``citadel up`` and tests call ``start_ca`` to run the CA inside their own
event loop, and other services (the trust bundle) join the same server through
``extra_services`` hooks.

TLS is the default. The serving certificate is issued at start from the intermediate, so
``root-cert.pem`` — the same file workloads trust — verifies the endpoint; plaintext needs
an explicit ``insecure_plaintext``. ``SO_REUSEPORT`` is off so a second server on a taken
port fails loudly instead of silently sharing it.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import grpc
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from citadel.audit import AuditLog
from citadel.ca import bundle
from citadel.ca.authority import Authority, load_authority
from citadel.ca.issuance import DEFAULT_BACKDATE, DEFAULT_TTL, MAX_TTL, Issuer
from citadel.ca.limits import Limits, RateLimiter
from citadel.ca.service import SERVICE_NAME, AccessLists, IstioCertificateServicer, add_to_server
from citadel.ca.tokens import TokenAuthenticator
from citadel.errors import ConfigError
from citadel.eventloop import stop_signals
from citadel.logs import get_logger

__all__ = [
    "DEFAULT_LISTEN",
    "CAConfig",
    "RunningCA",
    "backstop_rpcs",
    "parse_listen",
    "serve_ca",
    "start_ca",
]

DEFAULT_LISTEN = "127.0.0.1:15012"
DEFAULT_DNS_NAMES = ("localhost", "127.0.0.1")
#: A CSR is ~1-2 KiB; nothing legitimate comes near this.
MAX_RECEIVE_BYTES = 64 * 1024
#: Room for a 16 KiB token in metadata, so oversized tokens get our clear refusal.
MAX_METADATA_BYTES = 32 * 1024
_log = get_logger("citadel.ca.server")

ServiceHook = Callable[[grpc.aio.Server], None]


@dataclass
class CAConfig:
    cacerts_dir: Path
    authenticator: TokenAuthenticator
    audit: AuditLog
    listen: str = DEFAULT_LISTEN
    trust_domain: str | None = None
    default_ttl: timedelta = DEFAULT_TTL
    max_ttl: timedelta = MAX_TTL
    backdate: timedelta = DEFAULT_BACKDATE
    #: "chain" (every leaf proven to chain to the root), "full" (and walked to it per
    #: leaf) or "issuer" (see ``issuance.SELF_CHECKS``).
    self_check: str = "chain"
    insecure_plaintext: bool = False
    #: SANs of the serving certificate; entries that parse as IPs become IP SANs.
    dns_names: Sequence[str] = DEFAULT_DNS_NAMES
    #: Renewed automatically after two thirds of this.
    serving_cert_ttl: timedelta = timedelta(days=30)
    access: AccessLists = field(default_factory=AccessLists)
    #: Called with the server before it starts, to register more services on it.
    extra_services: Sequence[ServiceHook] = ()
    #: Full names of services added by hooks, for health and reflection.
    extra_service_names: Sequence[str] = ()
    #: HOST:PORT for the trust bundle over HTTPS (``GET /bundle``); off when None.
    bundle_listen: str | None = None
    max_receive_bytes: int = MAX_RECEIVE_BYTES
    #: Rate limits and the concurrency cap (``RESOURCE_EXHAUSTED`` with a retry hint).
    limits: Limits = field(default_factory=Limits)
    clock: Callable[[], float] = time.time
    #: An already validated authority (skips loading ``cacerts_dir``).
    authority: Authority | None = None
    #: Share the port with sibling processes (``ca serve --workers N``). Off by default so a
    #: port another server holds is refused instead of silently shared.
    reuse_port: bool = False


@dataclass
class RunningCA:
    server: grpc.aio.Server
    host: str
    port: int
    authority: Authority
    issuer: Issuer
    servicer: IstioCertificateServicer
    health: health.aio.HealthServicer
    tls: bool
    serving: _ServingCertificate | None = None

    @property
    def serving_chain_pem(self) -> bytes:
        """PEM of the current serving certificate chain (empty for plaintext)."""
        return self.serving.chain_pem if self.serving is not None else b""

    @property
    def address(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def root_pem(self) -> str:
        return self.authority.root_pem

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, let in-flight calls finish (up to ``grace`` s), then close."""
        with contextlib.suppress(Exception):
            await self.health.enter_graceful_shutdown()
        await self.server.stop(grace)

    async def wait(self) -> None:
        await self.server.wait_for_termination()


def backstop_rpcs(max_in_flight: int) -> int:
    """gRPC's own concurrent-RPC bound: room for the servicer's cap plus health probes
    and calls waiting for the event loop, so our audited refusal normally answers first."""
    return 4 * max_in_flight + 256


def parse_listen(listen: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[v6]:PORT``; port 0 picks a free one."""
    host, sep, port_text = listen.rpartition(":")
    if not sep or not host:
        raise ConfigError(f"--listen must be HOST:PORT (got {listen!r})")
    host = host.strip("[]")
    try:
        port = int(port_text)
    except ValueError:
        raise ConfigError(f"--listen port must be a number (got {port_text!r})") from None
    if not 0 <= port <= 65535:
        raise ConfigError(f"--listen port must be 0-65535 (got {port})")
    return host, port


class _ServingCertificate:
    """The endpoint's own certificate, re-issued from the intermediate before it expires.

    gRPC asks ``fetch`` before every new TLS handshake; it answers ``None`` (keep the
    current one) until two thirds of the lifetime have passed, so a CA that runs for
    months never serves an expired certificate and never needs a restart for it.
    """

    def __init__(self, authority: Authority, config: CAConfig) -> None:
        self._authority = authority
        self._names = list(config.dns_names)
        self._ttl = config.serving_cert_ttl
        self._clock = config.clock
        self.renewals = 0
        self.chain_pem = b""
        self.initial = self._issue()

    def _issue(self) -> grpc.ServerCertificateConfiguration:
        key = ec.generate_private_key(ec.SECP256R1())
        cert = self._authority.issue_serving_certificate(
            dns_names=self._names, key=key, ttl=self._ttl, clock=self._clock
        )
        key_pem = key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        self.chain_pem = (
            cert.public_bytes(serialization.Encoding.PEM)
            + "".join(self._authority.chain_pem[:-1]).encode()
        )
        start, end = cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
        self.renew_at = start + (end - start) * 2 / 3
        return grpc.ssl_server_certificate_configuration([(key_pem, self.chain_pem)])

    def fetch(self) -> grpc.ServerCertificateConfiguration | None:
        if self._clock() < self.renew_at:
            return None
        try:
            config = self._issue()
        except Exception as exc:  # keep serving the current one; retry next handshake
            _log.error("ca.serving_cert_renewal_failed", error=str(exc)[:200])
            return None
        self.renewals += 1
        _log.info("ca.serving_cert_renewed", renewals=self.renewals)
        return config

    def credentials(self) -> grpc.ServerCredentials:
        return grpc.dynamic_ssl_server_credentials(self.initial, self.fetch)


async def start_ca(config: CAConfig) -> RunningCA:
    """Load the authority, bind, start serving; raise ``ConfigError`` on any set-up flaw."""
    host, port = parse_listen(config.listen)
    authority = config.authority or load_authority(
        config.cacerts_dir, trust_domain=config.trust_domain, clock=config.clock
    )
    issuer = Issuer(
        authority,
        clock=config.clock,
        default_ttl=config.default_ttl,
        max_ttl=config.max_ttl,
        backdate=config.backdate,
        self_check=config.self_check,
    )
    servicer = IstioCertificateServicer(
        authenticator=config.authenticator,
        issuer=issuer,
        audit=config.audit,
        access=config.access,
        limiter=RateLimiter(config.limits),
    )
    server = grpc.aio.server(
        # A backstop far above the servicer's own cap: the servicer sheds (and audits)
        # first; this only bounds what a flood can queue in gRPC itself.
        maximum_concurrent_rpcs=backstop_rpcs(config.limits.max_in_flight),
        options=[
            ("grpc.so_reuseport", 1 if config.reuse_port else 0),
            ("grpc.max_receive_message_length", config.max_receive_bytes),
            ("grpc.max_send_message_length", 1024 * 1024),
            ("grpc.max_metadata_size", MAX_METADATA_BYTES),
        ],
    )
    add_to_server(servicer, server)
    # The trust bundle for agents and federation: citadel.v1.TrustBundleService (+ HTTPS).
    await bundle.attach(
        server,
        authority=authority,
        cacerts_dir=config.cacerts_dir,
        https_listen=config.bundle_listen,
        tls=not config.insecure_plaintext,
        dns_names=config.dns_names,
    )
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    for hook in config.extra_services:
        hook(server)
    names = [SERVICE_NAME, bundle.SERVICE_NAME, *config.extra_service_names]
    reflection.enable_server_reflection(
        [*names, health.SERVICE_NAME, reflection.SERVICE_NAME], server
    )
    address = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    serving: _ServingCertificate | None = None
    try:
        if config.insecure_plaintext:
            bound = server.add_insecure_port(address)
        else:
            serving = _ServingCertificate(authority, config)
            bound = server.add_secure_port(address, serving.credentials())
    except RuntimeError:
        bound = 0
    if not bound:
        raise ConfigError(
            f"cannot listen on {config.listen}: the address is in use or not available "
            "(pick another with --listen HOST:PORT)"
        )
    await server.start()
    for name in ("", *names):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    _log.info(
        "ca.serving",
        address=f"{host}:{bound}",
        tls=not config.insecure_plaintext,
        trust_domain=authority.trust_domain.name,
        authenticator=getattr(config.authenticator, "name", ""),
    )
    return RunningCA(
        server=server,
        host=host,
        port=bound,
        authority=authority,
        issuer=issuer,
        servicer=servicer,
        health=health_servicer,
        tls=not config.insecure_plaintext,
        serving=serving,
    )


async def serve_ca(
    config: CAConfig,
    *,
    on_ready: Callable[[RunningCA], None] | None = None,
    grace: float = 5.0,
) -> None:
    """Run until SIGTERM/SIGINT, then drain in-flight calls and return (exit 0)."""
    running = await start_ca(config)
    try:
        async with stop_signals() as stop:
            if on_ready is not None:
                on_ready(running)
            await stop.wait()
            _log.info("ca.stopping", grace_seconds=grace)
    finally:
        await running.stop(grace)
    _log.info("ca.stopped", granted=running.servicer.granted, refused=running.servicer.refused)
