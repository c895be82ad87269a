"""A real decision service on loopback, run in a background event loop for sync tests."""

from __future__ import annotations

import asyncio
import shutil
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import pytest
from envoy.service.auth.v3 import attribute_context_pb2 as ac
from envoy.service.auth.v3 import external_auth_pb2 as ea

from authz.server import AuthzConfig, RunningAuthz, start_authz

REPO = Path(__file__).resolve().parents[2]
POLICIES = REPO / "policies"

FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"
ORDERS = "spiffe://cluster.local/ns/shop/sa/orders"
PROMETHEUS = "spiffe://cluster.local/ns/ops/sa/prometheus"
ORDERS_HOST = "orders.shop.svc.cluster.local"
PAYMENTS_HOST = "payments.shop.svc.cluster.local"


class ServerThread:
    """``start_authz`` in its own thread and loop; ``call`` runs a coroutine there."""

    def __init__(self, config: AuthzConfig, **kwargs: Any) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self._thread.start()
        self.running: RunningAuthz = self.call(start_authz(config, **kwargs))

    def call(self, coro: Any, timeout: float = 30) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    @property
    def grpc_target(self) -> str:
        return f"127.0.0.1:{self.running.grpc_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.running.admin_port}"

    def stop(self) -> None:
        try:
            self.call(self.running.stop(1))
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
            self.loop.close()


def config_for(policy_dir: Path, audit: Path | None, **overrides: Any) -> AuthzConfig:
    return AuthzConfig(
        policy_dir=policy_dir,
        listen="127.0.0.1:0",
        admin_listen="127.0.0.1:0",
        audit_log=str(audit) if audit is not None else None,
        grace_s=1,
        **overrides,
    )


@pytest.fixture(scope="module")
def start_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Callable[..., ServerThread]]:
    """Start servers (stopped at module end); each gets its own audit file."""
    started: list[ServerThread] = []

    def start(policy_dir: Path = POLICIES, **overrides: Any) -> ServerThread:
        audit = tmp_path_factory.mktemp("audit") / "authz.log"
        kwargs = {k: overrides.pop(k) for k in ("audit", "state") if k in overrides}
        srv = ServerThread(config_for(policy_dir, audit, **overrides), **kwargs)
        srv.audit_path = audit  # type: ignore[attr-defined]
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.stop()


@pytest.fixture(scope="module")
def server(start_server: Callable[..., ServerThread]) -> ServerThread:
    """The shipped policies/ behind a real gRPC listener and admin HTTP listener."""
    return start_server()


def policy_copy(tmp: Path, extra: str = "") -> Path:
    d = tmp / "policy"
    d.mkdir(parents=True, exist_ok=True)
    shutil.copy(POLICIES / "model.conf", d / "model.conf")
    (d / "policy.csv").write_text((POLICIES / "policy.csv").read_text() + extra)
    return d


def check_request(
    *,
    principal: str = "",
    host: str = ORDERS_HOST,
    method: str = "GET",
    path: str = "/api/orders",
    headers: dict[str, str] | None = None,
    **attrs: object,
) -> ea.CheckRequest:
    """A CheckRequest shaped as Envoy's HTTP filter sends it; ``attrs`` add or override
    AttributeContext fields (context_extensions, tls_session, ...)."""
    return ea.CheckRequest(
        attributes=ac.AttributeContext(
            source=ac.AttributeContext.Peer(principal=principal),
            request=ac.AttributeContext.Request(
                http=ac.AttributeContext.HttpRequest(
                    method=method, host=host, path=path, headers=headers or {}
                )
            ),
            **attrs,
        )
    )
