"""The real CA (``citadel.ca.server.start_ca``), hosted on its own event-loop thread.

The agent's end-to-end tests need a CA that outlives one test's event loop (module-scoped
fixtures) and that a test can stop and start again on the same port ("CA down at boot,
then up"; "CA down during renewal"). Nothing here replaces our code: it is the real
server, the real JWKS authenticator, dev tokens from the real dev issuer, and the real
trust-bundle service the server always publishes.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any, TypeVar

from citadel.audit import open_audit_log
from citadel.ca.authority import init_authority
from citadel.ca.jwks import JwksAuthenticator
from citadel.ca.server import CAConfig, RunningCA, start_ca
from citadel.dev import DevIssuer, init_dev_issuer, mint_token
from tests.conftest import free_port

T = TypeVar("T")
TD = "cluster.local"


@dataclass
class CaHarness:
    state: Path
    port: int = field(default_factory=free_port)
    running: RunningCA | None = None
    issuer: DevIssuer | None = None

    def __post_init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.thread.start()
        self.cacerts = self.state / "cacerts"
        init_authority(self.cacerts, trust_domain=TD)
        self.issuer, _ = init_dev_issuer(self.state)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def root_path(self) -> Path:
        return self.cacerts / "root-cert.pem"

    def call(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def start(self) -> None:
        async def go() -> RunningCA:
            return await start_ca(
                CAConfig(
                    cacerts_dir=self.cacerts,
                    authenticator=JwksAuthenticator(
                        jwks_file=self.issuer.jwks_path  # type: ignore[union-attr]
                    ),
                    audit=open_audit_log(self.state / "audit.log", name="citadel-ca"),
                    listen=self.address,
                    max_ttl=timedelta(hours=1),
                    backdate=timedelta(seconds=1),
                )
            )

        self.running = self.call(go())

    def stop(self) -> None:
        if self.running is not None:
            self.call(self.running.stop(grace=0))
            self.running = None

    def close(self) -> None:
        self.stop()
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)

    def token(self, namespace: str, service_account: str, **kw: Any) -> str:
        return mint_token(
            self.issuer,  # type: ignore[arg-type]
            namespace=namespace,
            service_account=service_account,
            **kw,
        )

    def granted(self) -> int:
        return self.running.servicer.granted if self.running else 0
