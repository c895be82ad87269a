"""End-to-end fixtures: a real CA on a loopback port, reusable by every e2e test.

Fixtures (module scope, so one server per test module):

- ``ca_state``: a state directory with an initialized CA (``DIR/cacerts``, trust domain
  ``cluster.local``, EC P-256) and a dev token issuer (``DIR/dev-issuer``).
- ``ca_server``: a ``CAHandle`` for a CA serving TLS on a free 127.0.0.1 port with JWKS
  authentication against the dev issuer and an audit file. Use ``handle.stub()`` for a
  verified gRPC client (sync), ``handle.token(namespace=..., service_account=...)`` for a
  projected-token-shaped JWT, ``handle.audit_records()`` to read what was audited.

Need a different configuration (extra services, access lists, plaintext, your own
``audit`` log or ``authenticator``)? Use ``running_ca(state_dir, **CAConfig overrides)``
as a context manager in your own fixture.
The server runs in its own event loop on a background thread, so sync tests and clients
in the test thread talk to it over a real socket.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.server
import json
import sys
import threading
from collections.abc import Coroutine, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpc
import pytest

from citadel.audit import open_audit_log
from citadel.ca._proto import ca_pb2_grpc
from citadel.ca.authority import init_authority
from citadel.ca.jwks import JwksAuthenticator
from citadel.ca.server import CAConfig, RunningCA, start_ca
from citadel.dev import DevIssuer, init_dev_issuer, load_dev_issuer, mint_token
from citadel.envoyproc import EnvoyProcess, find_envoy, validate

__all__ = [
    "CAHandle",
    "LoopThread",
    "RecordingHTTPServer",
    "ca_serve_cmd",
    "make_ca_state",
    "recording_http_server",
    "running_ca",
    "validated_envoy",
]

TRUST_DOMAIN = "cluster.local"


class LoopThread:
    """An asyncio event loop on a daemon thread; ``run`` executes a coroutine there."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, Any], timeout: float = 30.0) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.close()


@dataclass
class CAHandle:
    state_dir: Path
    running: RunningCA
    issuer: DevIssuer
    audit_path: Path
    loop: LoopThread

    @property
    def port(self) -> int:
        return self.running.port

    @property
    def target(self) -> str:
        """``localhost:PORT``: a name the serving certificate carries."""
        return f"localhost:{self.running.port}"

    @property
    def root_pem(self) -> bytes:
        return self.running.root_pem.encode()

    @property
    def root_path(self) -> Path:
        return self.state_dir / "cacerts" / "root-cert.pem"

    def channel(self) -> grpc.Channel:
        creds = grpc.ssl_channel_credentials(root_certificates=self.root_pem)
        if not self.running.tls:
            return grpc.insecure_channel(f"127.0.0.1:{self.port}")
        return grpc.secure_channel(self.target, creds)

    def stub(self, channel: grpc.Channel | None = None) -> ca_pb2_grpc.IstioCertificateServiceStub:
        return ca_pb2_grpc.IstioCertificateServiceStub(channel or self.channel())

    def token(self, namespace: str = "default", service_account: str = "web", **kw: Any) -> str:
        return mint_token(self.issuer, namespace=namespace, service_account=service_account, **kw)

    def audit_records(self, kind: str | None = "ca.issuance") -> list[dict[str, Any]]:
        lines = self.audit_path.read_text().splitlines()
        records = [json.loads(line) for line in lines if line.strip()]
        return [r for r in records if kind is None or r.get("kind") == kind]


def make_ca_state(state_dir: Path, *, key_type: str = "ec-p256") -> Path:
    init_authority(state_dir / "cacerts", trust_domain=TRUST_DOMAIN, key_type=key_type)
    init_dev_issuer(state_dir)
    return state_dir


@contextlib.contextmanager
def running_ca(state_dir: Path, **overrides: Any) -> Iterator[CAHandle]:
    """A CA on ``127.0.0.1:0`` (TLS, JWKS over the dev issuer) for the life of the block."""
    loop = LoopThread()
    audit_path = overrides.pop("audit_path", state_dir / "audit.log")
    audit = overrides.pop("audit", None) or open_audit_log(audit_path, name="citadel-ca-test")
    issuer = load_dev_issuer(state_dir)
    config = CAConfig(
        cacerts_dir=state_dir / "cacerts",
        authenticator=overrides.pop("authenticator", JwksAuthenticator(jwks_file=issuer.jwks_path)),
        audit=audit,
        listen="127.0.0.1:0",
    )
    for name, value in overrides.items():
        setattr(config, name, value)
    running = loop.run(start_ca(config))
    try:
        yield CAHandle(state_dir, running, issuer, Path(audit_path), loop)
    finally:
        loop.run(running.stop(1.0))
        audit.close()
        loop.close()


@pytest.fixture(scope="module")
def ca_state(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_ca_state(tmp_path_factory.mktemp("citadel-state"))


@pytest.fixture(scope="module")
def ca_server(ca_state: Path) -> Iterator[CAHandle]:
    with running_ca(ca_state) as handle:
        yield handle


def ca_serve_cmd(state_dir: Path, port: int, *extra: str) -> list[str]:
    """``citadel ca serve`` on loopback with the state dir's dev issuer (JWKS auth), as a
    subprocess argv; ``extra`` adds flags (audit log, DNS names, ...)."""
    return [
        sys.executable, "-m", "citadel.cli", "ca", "serve",
        "--state-dir", str(state_dir),
        "--listen", f"127.0.0.1:{port}",
        "--token-auth", "jwks",
        "--jwks-file", str(state_dir / "dev-issuer" / "jwks.json"),
        *extra,
    ]  # fmt: skip


@contextlib.contextmanager
def validated_envoy(config: dict[str, Any], work_dir: Path) -> Iterator[EnvoyProcess]:
    """A real Envoy on ``config``, ready; always stopped. The bootstrap goes through
    ``--mode validate`` first, so a bad one fails with Envoy's own message rather than as a
    readiness timeout."""
    binary = find_envoy()
    check = validate(config, binary=binary)
    assert check.returncode == 0, check.stdout + check.stderr
    with EnvoyProcess(config, work_dir=work_dir, binary=binary) as envoy:
        yield envoy.wait_ready()


class RecordingHTTPServer(http.server.ThreadingHTTPServer):
    """Answers every request 200 ``upstream ok`` and keeps its headers (lower-cased): an
    app behind Envoy, or an HTTP ext_authz service that allows everything."""

    seen: list[dict[str, str]]


class _Record(http.server.BaseHTTPRequestHandler):
    def _reply(self) -> None:
        self.server.seen.append({k.lower(): v for k, v in self.headers.items()})  # type: ignore[attr-defined]
        body = b"upstream ok"
        self.send_response(200)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    do_GET = do_POST = do_HEAD = do_DELETE = _reply

    def log_message(self, *args: object) -> None:
        pass


def recording_http_server() -> RecordingHTTPServer:
    """A RecordingHTTPServer on a free loopback port, serving on a daemon thread."""
    server = RecordingHTTPServer(("127.0.0.1", 0), _Record)
    server.seen = []
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server
