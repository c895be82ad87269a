"""``citadel authz serve --workers 2``: two processes on one port, one audit file, clean stop."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import grpc
import httpx
import pytest
from envoy.service.auth.v3 import attribute_context_pb2 as ac
from envoy.service.auth.v3 import external_auth_pb2 as ea
from envoy.service.auth.v3 import external_auth_pb2_grpc as eag
from google.rpc import code_pb2

from citadel.audit import read_records
from tests.conftest import assert_workers_drain_on_sigterm, free_port

POLICIES = Path(__file__).resolve().parents[2] / "policies"
FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"
ORDERS_HOST = "orders.shop.svc.cluster.local"


def serve_argv(port: int, admin: int, audit: Path, workers: int = 2, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "citadel.cli", "authz", "serve",
        "--policy-dir", str(POLICIES),
        "--listen", f"127.0.0.1:{port}",
        "--admin-listen", f"127.0.0.1:{admin}",
        "--audit-log", str(audit),
        "--workers", str(workers),
        "--grace", "2",
        *extra,
    ]  # fmt: skip


def headers_written(audit: Path) -> int:
    if not audit.exists():
        return 0
    return sum(1 for r in read_records([audit]) if r.get("kind") == "audit.header")


def check(stub: eag.AuthorizationStub, path: str) -> int:
    req = ea.CheckRequest(
        attributes=ac.AttributeContext(
            source=ac.AttributeContext.Peer(principal=FRONTEND),
            request=ac.AttributeContext.Request(
                http=ac.AttributeContext.HttpRequest(method="GET", host=ORDERS_HOST, path=path)
            ),
        )
    )
    return stub.Check(req, timeout=10).status.code


@pytest.fixture(scope="module")
def two_workers(tmp_path_factory: pytest.TempPathFactory):
    tmp = tmp_path_factory.mktemp("workers")
    port, admin, http = free_port(), free_port(), free_port()
    audit = tmp / "audit.jsonl"
    argv = serve_argv(port, admin, audit, 2, "--http-listen", f"127.0.0.1:{http}", "--trust-xfcc")
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    while headers_written(audit) < 2:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.fail(f"workers did not start: {proc.communicate()[1].decode()[-2000:]}")
        time.sleep(0.1)
    yield proc, port, audit, http
    if proc.poll() is None:
        proc.kill()
        proc.wait(10)


def test_two_workers_share_the_port_and_each_decides(two_workers) -> None:
    _proc, port, audit, _http = two_workers
    sent = 0
    # Every channel is its own connection; the kernel spreads connections across workers.
    for i in range(40):
        with grpc.insecure_channel(
            f"127.0.0.1:{port}", options=[("grpc.use_local_subchannel_pool", 1)]
        ) as ch:
            stub = eag.AuthorizationStub(ch)
            assert check(stub, f"/api/orders/{i}") == code_pb2.OK
            assert check(stub, "/admin/x") == code_pb2.PERMISSION_DENIED
            sent += 2
    time.sleep(0.2)
    decisions = [r for r in read_records([audit]) if r.get("kind") == "authz.decision"]
    per_stream = Counter(r["stream"] for r in decisions)
    headers = [r for r in read_records([audit]) if r.get("kind") == "audit.header"]
    assert len({h["pid"] for h in headers}) == 2, "each worker is its own process"
    assert len(decisions) == sent, "exactly one audit record per Check, none lost"
    assert len(per_stream) == 2, f"both workers decided: {dict(per_stream)}"


def test_every_worker_serves_the_http_variant_on_the_shared_port(two_workers) -> None:
    """``--http-listen`` is bound by every worker (SO_REUSEPORT), like the gRPC port."""
    _proc, _port, audit, http = two_workers
    before = {r["decision_id"] for r in read_records([audit]) if r.get("kind") == "authz.decision"}
    xfcc = {"host": ORDERS_HOST, "x-forwarded-client-cert": f"URI={FRONTEND}"}
    for i in range(40):  # a fresh connection each: the kernel spreads them across workers
        with httpx.Client(base_url=f"http://127.0.0.1:{http}", timeout=10) as c:
            assert c.get(f"/ext_authz/api/orders/{i}", headers=xfcc).status_code == 200
    time.sleep(0.2)
    fresh = [r for r in read_records([audit]) if r.get("kind") == "authz.decision"
             and r["decision_id"] not in before]  # fmt: skip
    assert len(fresh) == 40 and {r["transport"] for r in fresh} == {"http"}
    assert len(Counter(r["stream"] for r in fresh)) == 2, "both workers answered"


def test_sigterm_drains_every_worker_and_the_chains_verify(two_workers) -> None:
    proc, _port, audit, _http = two_workers
    assert_workers_drain_on_sigterm(proc, audit, workers=2)


def test_a_port_already_taken_is_refused_before_any_worker_starts(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen(1)
        port = holder.getsockname()[1]
        proc = subprocess.run(
            serve_argv(port, free_port(), tmp_path / "audit.jsonl"),
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "COLUMNS": "200"},
        )
    assert proc.returncode == 2
    assert "address already in use" in proc.stderr
    assert not (tmp_path / "audit.jsonl").exists()
