"""The embedded default: the whole plane (CA, ext_authz, admin) in one process.

``citadel up`` and ``citadel demo`` share this module. It owns three things the
individual services do not: the state directory's first-run story (create the dev CA and
the dev token issuer once, reuse them afterwards), starting the services on one event
loop with one audit file (a stream each: the chains stay independent, the file stays one),
and ``up.json``, the small record that lets a second command find a running ``up``.

Ports are checked before any key is generated, so a taken port is refused in
milliseconds with the flag that moves it, instead of after a CA was half created.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import citadel
from citadel.errors import ConfigError

# The services (gRPC, FastAPI, uvicorn, the CA's crypto) load when a plane starts:
# ``citadel up --help`` and the CLI's command tree import this module for its defaults.
if TYPE_CHECKING:
    from authz.server import RunningAuthz
    from authz.state import PolicyState
    from citadel.audit import AuditLog
    from citadel.ca.authority import Authority
    from citadel.ca.server import RunningCA
    from citadel.dev import DevIssuer

__all__ = [
    "DEFAULT_ADMIN_LISTEN",
    "DEFAULT_AUTHZ_LISTEN",
    "DEFAULT_CA_LISTEN",
    "UP_FILE",
    "Bootstrap",
    "PlaneConfig",
    "RunningPlane",
    "UpInfo",
    "bootstrap_state",
    "check_ports",
    "default_policy_dir",
    "find_running",
    "read_up_info",
    "start_plane",
]

DEFAULT_CA_LISTEN = "127.0.0.1:15012"
DEFAULT_AUTHZ_LISTEN = "127.0.0.1:9191"
DEFAULT_ADMIN_LISTEN = "127.0.0.1:8181"
UP_FILE = "up.json"


def default_policy_dir() -> Path | None:
    """The shipped ``policies/``: package data when installed, else the source tree's."""
    pkg = Path(citadel.__file__).resolve().parent
    for candidate in (pkg / "policies", pkg.parent / "policies", Path.cwd() / "policies"):
        if (candidate / "model.conf").is_file() and (candidate / "policy.csv").is_file():
            return candidate
    return None


# ---------------------------------------------------------------- state directory


@dataclass(frozen=True, slots=True)
class Bootstrap:
    state_dir: Path
    authority: Authority
    issuer: DevIssuer
    created_ca: bool
    created_issuer: bool

    @property
    def root_cert(self) -> Path:
        from citadel.ca.authority import cacerts_dir

        return cacerts_dir(self.state_dir) / "root-cert.pem"


def bootstrap_state(
    state_dir: Path,
    *,
    trust_domain: str,
    on_step: Callable[[str], contextlib.AbstractContextManager[Any]] | None = None,
) -> Bootstrap:
    """Create (first run) or reuse the dev CA and dev token issuer in ``state_dir``.

    ``on_step`` wraps each slow step (key generation) so the CLI can show progress.
    """
    from citadel.ca.authority import cacerts_dir, load_or_init_authority
    from citadel.dev import init_dev_issuer

    step = on_step or (lambda _msg: contextlib.nullcontext())
    state_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    directory = cacerts_dir(state_dir)
    with step(f"CA for trust domain {trust_domain} (EC P-256 root + intermediate)"):
        authority, created_ca = load_or_init_authority(directory, trust_domain=trust_domain)
    if authority.trust_domain.name != trust_domain:
        raise ConfigError(
            f"{directory} holds a CA for trust domain {authority.trust_domain.name}, not "
            f"{trust_domain} (pass --trust-domain {authority.trust_domain.name} or another "
            "--state-dir)"
        )
    with step("dev token issuer (RSA 2048)"):
        issuer, created_issuer = init_dev_issuer(state_dir)
    return Bootstrap(state_dir, authority, issuer, created_ca, created_issuer)


# ---------------------------------------------------------------- ports


def _split(listen: str) -> tuple[str, int]:
    host, sep, port = listen.rpartition(":")
    if not sep or not host or not port.isdigit() or int(port) > 65535:
        raise ConfigError(f"listen address {listen!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def check_ports(listens: list[tuple[str, str, str]]) -> None:
    """``(what, flag, HOST:PORT)`` each: refuse early and clearly when one is taken."""
    seen: dict[tuple[str, int], str] = {}
    for what, flag, listen in listens:
        host, port = _split(listen)
        if port == 0:
            continue
        if (host, port) in seen:
            raise ConfigError(
                f"port {port} is given to both {seen[(host, port)]} and {what} ({flag} {listen})"
            )
        seen[(host, port)] = what
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind((host, port))
            except OSError as exc:
                why = (
                    "is already in use"
                    if exc.errno == errno.EADDRINUSE
                    else (f"cannot be bound ({exc.strerror})")
                )
                raise ConfigError(
                    f"port {port} {why}: {what} wants {listen}; stop whatever holds it "
                    f"or pick another with {flag} HOST:PORT"
                ) from None


# ---------------------------------------------------------------- up.json


@dataclass(frozen=True, slots=True)
class UpInfo:
    """What ``up.json`` says about a running plane (addresses are HOST:PORT)."""

    pid: int
    state_dir: str
    trust_domain: str
    ca: str
    authz: str
    admin: str
    root_cert: str
    audit_log: str
    jwks: str
    policy_dir: str
    started_at: float
    version: int = 1

    @property
    def admin_url(self) -> str:
        return f"http://{self.admin}"


def read_up_info(state_dir: Path) -> UpInfo | None:
    try:
        doc = json.loads((state_dir / UP_FILE).read_text())
        return UpInfo(**doc)
    except (OSError, ValueError, TypeError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _answers(listen: str, timeout: float = 0.5) -> bool:
    host, port = _split(listen)
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def find_running(state_dir: Path) -> UpInfo | None:
    """The ``up`` serving this state dir: up.json present, its pid alive, all ports answer."""
    info = read_up_info(state_dir)
    if info is None or not _pid_alive(info.pid):
        return None
    if not all(_answers(a) for a in (info.ca, info.authz, info.admin)):
        return None
    return info


def _write_up_info(path: Path, info: UpInfo) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(asdict(info), indent=2) + "\n")
    os.replace(tmp, path)


# ---------------------------------------------------------------- the plane


@dataclass(frozen=True, kw_only=True)
class PlaneConfig:
    state_dir: Path
    policy_dir: Path
    ca_listen: str = DEFAULT_CA_LISTEN
    authz_listen: str = DEFAULT_AUTHZ_LISTEN
    admin_listen: str = DEFAULT_ADMIN_LISTEN
    #: Default: STATE/audit.log.
    audit_log: Path | None = None
    trust_domain: str = "cluster.local"
    #: Seconds in-flight calls get on stop.
    grace: float = 5.0
    #: Watch the policy directory and hot-reload it (last good wins).
    watch_policies: bool = True
    #: Write STATE/up.json so other commands can find this plane.
    publish: bool = True

    @property
    def audit_path(self) -> Path:
        return self.audit_log or self.state_dir / "audit.log"


def _host_port(listen: str, port: int) -> str:
    host, _ = _split(listen)
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class RunningPlane:
    config: PlaneConfig
    bootstrap: Bootstrap
    ca: RunningCA
    authz: RunningAuthz
    ca_audit: AuditLog
    authz_audit: AuditLog
    info: UpInfo
    #: The policy directory is watched and hot-reloaded (last good wins).
    watching: bool = False
    _stopped: bool = field(default=False, repr=False)

    @property
    def state(self) -> PolicyState:
        return self.authz.state

    async def stop(self, grace: float | None = None) -> None:
        """Drain both services (in-flight calls finish), then close the audit streams."""
        if self._stopped:
            return
        self._stopped = True
        grace = self.config.grace if grace is None else grace
        # One after the other keeps the shutdown log readable; each drains in parallel
        # with nothing new arriving, because both stop accepting first.
        await self.authz.stop(grace)
        await self.ca.stop(grace)
        for log in (self.ca_audit, self.authz_audit):
            with contextlib.suppress(Exception):
                log.close()
        if self.config.publish:
            path = self.config.state_dir / UP_FILE
            current = read_up_info(self.config.state_dir)
            if current is not None and current.pid == os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()


async def start_plane(config: PlaneConfig, bootstrap: Bootstrap) -> RunningPlane:
    """Start CA (TLS) + ext_authz (gRPC) + admin (HTTP); raise ConfigError/PolicyError early."""
    from authz.server import AuthzConfig, start_authz
    from citadel.audit import open_audit_log
    from citadel.ca import bundle as ca_bundle
    from citadel.ca.authority import cacerts_dir
    from citadel.ca.jwks import JwksAuthenticator
    from citadel.ca.server import CAConfig, start_ca

    audit_path = config.audit_path
    try:
        ca_audit = open_audit_log(audit_path, name="citadel-ca")
        authz_audit = open_audit_log(audit_path, name="authz")
    except OSError as exc:
        raise ConfigError(f"cannot open audit log {audit_path}: {exc.strerror}") from None
    root_path = bootstrap.root_cert
    source = ca_bundle.BundleSource(
        trust_domain=bootstrap.authority.trust_domain, roots_path=root_path
    )
    ca_config = CAConfig(
        cacerts_dir=cacerts_dir(config.state_dir),
        authenticator=JwksAuthenticator(jwks_file=bootstrap.issuer.jwks_path),
        audit=ca_audit,
        listen=config.ca_listen,
        authority=bootstrap.authority,
        extra_services=(lambda server: ca_bundle.add_to_server(server, source),),
        extra_service_names=(ca_bundle.SERVICE_NAME,),
    )
    authz: RunningAuthz | None = None
    try:
        # The policy first: an invalid one (or one failing its own tests) stops start-up
        # before anything listens. start_authz watches the directory when asked to.
        authz = await start_authz(
            AuthzConfig(
                policy_dir=config.policy_dir,
                listen=config.authz_listen,
                admin_listen=config.admin_listen,
                grace_s=config.grace,
                watch_policy=config.watch_policies,
            ),
            audit=authz_audit,
        )
        ca = await start_ca(ca_config)
    except BaseException:
        if authz is not None:
            await authz.stop(0)
        ca_audit.close()
        authz_audit.close()
        raise
    reloader = getattr(authz, "reloader", None) if config.watch_policies else None
    assert authz.admin_port is not None
    info = UpInfo(
        pid=os.getpid(),
        state_dir=str(config.state_dir.resolve()),
        trust_domain=bootstrap.authority.trust_domain.name,
        ca=_host_port(config.ca_listen, ca.port),
        authz=_host_port(config.authz_listen, authz.grpc_port),
        admin=_host_port(config.admin_listen, authz.admin_port),
        root_cert=str(root_path.resolve()),
        audit_log=str(audit_path.resolve()),
        jwks=str(bootstrap.issuer.jwks_path.resolve()),
        policy_dir=str(config.policy_dir.resolve()),
        started_at=time.time(),
    )
    if config.publish:
        _write_up_info(config.state_dir / UP_FILE, info)
    return RunningPlane(
        config=config,
        bootstrap=bootstrap,
        ca=ca,
        authz=authz,
        ca_audit=ca_audit,
        authz_audit=authz_audit,
        info=info,
        watching=reloader is not None,
    )
