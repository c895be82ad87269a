"""Faults on the decision service, over real gRPC and HTTP: the audit sink failing (disk
full, FIFO reader gone), the policy directory removed, deadlines and overload, SIGTERM
under load. Every case fails closed and says so; recoverable ones recover.
"""

from __future__ import annotations

import os
import select
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import httpx
from envoy.service.auth.v3 import external_auth_pb2_grpc as eag
from google.rpc import code_pb2

from citadel.audit import AuditLog, FileSink, read_records, verify_files
from tests.authz.conftest import FRONTEND, POLICIES, policy_copy
from tests.authz.test_adversarial import req
from tests.conftest import free_port


def _check(target: str, **kw):
    with grpc.insecure_channel(target) as ch:
        return eag.AuthorizationStub(ch).Check(req(**kw), timeout=10)


def _metric(srv, name: str) -> float:
    text = httpx.get(f"{srv.admin_url}/metrics", timeout=5).text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


def _ready(srv) -> int:
    return httpx.get(f"{srv.admin_url}/readyz", timeout=5).status_code


def _decisions(path: Path) -> list[dict]:
    return [r for r in read_records([path]) if r.get("kind") == "authz.decision"]


# ---------------------------------------------------------------- audit sink faults


def test_disk_full_denies_everything_and_recovers(start_server, tmp_path: Path) -> None:
    """The audit file's descriptor is pointed at /dev/full (ENOSPC) and back."""
    path = tmp_path / "audit.log"
    sink = FileSink(path)
    srv = start_server(audit=AuditLog(sink, name="authz"))
    assert _check(srv.grpc_target).status.code == code_pb2.OK
    saved = os.dup(sink._fd)
    full = os.open("/dev/full", os.O_WRONLY)
    try:
        os.dup2(full, sink._fd)  # the disk fills up under the running server
        for _ in range(3):
            resp = _check(srv.grpc_target)
            assert resp.status.code == code_pb2.PERMISSION_DENIED
            assert "could not be recorded" in resp.denied_response.body
        assert _ready(srv) == 503
        assert _metric(srv, "citadel_authz_audit_healthy") == 0
        assert _metric(srv, "citadel_authz_audit_failures_total") == 3
        assert srv.running.pipeline.audit_ok is False
    finally:
        os.dup2(saved, sink._fd)  # space freed
        os.close(saved)
        os.close(full)
    assert _check(srv.grpc_target).status.code == code_pb2.OK
    assert _ready(srv) == 200 and _metric(srv, "citadel_authz_audit_healthy") == 1
    assert verify_files([path]).ok  # failed records left no gap in the chain
    assert [r["outcome"] for r in _decisions(path)] == ["allow", "allow"]


def test_audit_log_on_dev_full_refuses_to_start(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "citadel.cli", "authz", "serve", "--policy-dir", str(POLICIES),
           "--listen", f"127.0.0.1:{free_port()}", "--admin-listen",
           f"127.0.0.1:{free_port()}", "--audit-log", "/dev/full"]  # fmt: skip
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
    assert res.returncode == 2, res.stderr
    said = " ".join(res.stderr.split())
    assert "No space left on device" in said and "Traceback" not in said


class _FifoReader:
    """Drains a FIFO in a thread, like a log shipper; ``close`` makes it go away."""

    def __init__(self, path: Path) -> None:
        self.data = bytearray()
        self._fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while True:
            r, _, _ = select.select([self._fd], [], [], 0.02)
            if r:
                chunk = os.read(self._fd, 65536)
                self.data += chunk
            elif self._stop.is_set():
                break
        os.close(self._fd)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)


def test_fifo_reader_gone_denies_and_recovers_when_a_reader_returns(
    start_server, tmp_path: Path
) -> None:
    fifo = tmp_path / "audit.fifo"
    os.mkfifo(fifo)
    first = _FifoReader(fifo)
    srv = start_server(audit=AuditLog(FileSink(fifo), name="authz"))
    assert _check(srv.grpc_target).status.code == code_pb2.OK
    time.sleep(0.1)
    first.close()  # the log shipper died: writes now fail with EPIPE
    resp = _check(srv.grpc_target)
    assert resp.status.code == code_pb2.PERMISSION_DENIED
    assert "could not be recorded" in resp.denied_response.body
    assert _ready(srv) == 503 and _metric(srv, "citadel_authz_audit_healthy") == 0
    second = _FifoReader(fifo)  # a new shipper attaches to the same FIFO
    try:
        assert _check(srv.grpc_target).status.code == code_pb2.OK
        assert _ready(srv) == 200
        time.sleep(0.1)
    finally:
        second.close()
    combined = tmp_path / "shipped.log"
    combined.write_bytes(bytes(first.data) + bytes(second.data))
    assert verify_files([combined]).ok
    assert [r["outcome"] for r in _decisions(combined)] == ["allow", "allow"]


# ---------------------------------------------------------------- policy directory removed


def test_policy_directory_removed_last_good_keeps_serving(start_server, tmp_path: Path) -> None:
    pdir = policy_copy(tmp_path)
    srv = start_server(pdir, reload_debounce_s=0.05, reload_poll_s=0.2)
    revision = srv.running.state.revision
    shutil.rmtree(pdir)
    deadline = time.monotonic() + 10
    while srv.running.reloader.directory_missing is False and time.monotonic() < deadline:
        time.sleep(0.05)
    assert srv.running.reloader.directory_missing
    status = httpx.get(f"{srv.admin_url}/v1/policy", timeout=5).json()
    assert "does not exist" in status["last_error"]["error"] and status["revision"] == revision
    assert _ready(srv) == 200
    for _ in range(5):
        assert _check(srv.grpc_target).status.code == code_pb2.OK
    assert {r["revision"] for r in _decisions(srv.audit_path)} == {revision}
    # back, with one more rule: the new revision serves
    policy_copy(tmp_path, "p, role:storefront, orders.shop.svc.cluster.local, /new, ^GET$, allow\n")
    while srv.running.state.revision == revision and time.monotonic() < deadline + 10:
        time.sleep(0.05)
    assert srv.running.state.revision != revision
    assert _check(srv.grpc_target, path="/new").status.code == code_pb2.OK


# ---------------------------------------------------------------- deadlines and overload


def test_check_with_too_little_deadline_is_not_evaluated(start_server) -> None:
    srv = start_server(min_deadline_s=2.0)  # a server that wants 2 s of budget
    with grpc.insecure_channel(srv.grpc_target) as ch:
        stub = eag.AuthorizationStub(ch)
        resp = stub.Check(req(headers={"x-request-id": "short"}), timeout=1.0)
        assert resp.status.code == code_pb2.DEADLINE_EXCEEDED
        assert resp.denied_response.status.code == 503
        assert stub.Check(req(), timeout=10).status.code == code_pb2.OK
        assert stub.Check(req()).status.code == code_pb2.OK  # no deadline: evaluated
    (rec,) = [r for r in _decisions(srv.audit_path) if r.get("request_id") == "short"]
    assert rec["outcome"] == "deny" and rec["code"] == "deadline_exceeded"
    assert rec["principal"] == FRONTEND and rec["rule"] is None
    assert srv.running.metrics.decisions("deny", "deadline_exceeded") == 1


def test_overload_is_shed_fast_and_never_allowed_unrecorded(start_server) -> None:
    """A burst far past the queue bounds: the excess is refused at once, before it is read
    (CANCELLED by grpc-core past ``max_pending``, RESOURCE_EXHAUSTED past ``max_in_flight``;
    Envoy denies both), stale ones are refused unevaluated (deadline_exceeded), everything
    answered is on record, and the server serves normally afterwards. Latency figures:
    bench/authz_overload.py."""
    # Bounds of one: with 1,500 pipelined calls, overlap (and so shedding) is certain even
    # when the server is fast enough to keep a bound of 16 from ever filling.
    srv = start_server(max_in_flight=1, max_pending=1, min_deadline_s=0.01)
    n = 1500
    with grpc.insecure_channel(srv.grpc_target) as ch:
        stub = eag.AuthorizationStub(ch)
        stub.Check(req(), timeout=10)
        futures = [stub.Check.future(req(headers={"x-request-id": f"burst-{i}"}), timeout=0.2)
                   for i in range(n)]  # fmt: skip
        answered: dict[str, int] = {}
        shed = other = 0
        for i, f in enumerate(futures):
            try:
                answered[f"burst-{i}"] = f.result().status.code
            except grpc.RpcError as exc:
                if exc.code() in (grpc.StatusCode.RESOURCE_EXHAUSTED, grpc.StatusCode.CANCELLED):
                    shed += 1
                else:
                    assert exc.code() == grpc.StatusCode.DEADLINE_EXCEEDED, exc
                    other += 1
        assert shed > 0, "the queue bounds never engaged"
        assert stub.Check(req(), timeout=10).status.code == code_pb2.OK
    recs = {r["request_id"]: r for r in _decisions(srv.audit_path)
            if str(r.get("request_id", "")).startswith("burst-")}  # fmt: skip
    for rid, code in answered.items():  # every answer the client got is on record
        rec = recs[rid]
        assert (code == code_pb2.OK) == (rec["outcome"] == "allow")
    assert set(recs) >= set(answered)
    assert len(recs) <= n - shed  # shed ones were never read, so never recorded


# ---------------------------------------------------------------- SIGTERM under load


def test_sigterm_under_load_every_answer_on_record(tmp_path: Path) -> None:
    port, audit = free_port(), tmp_path / "audit.log"
    cmd = [sys.executable, "-m", "citadel.cli", "authz", "serve", "--policy-dir", str(POLICIES),
           "--listen", f"127.0.0.1:{port}", "--admin-listen", f"127.0.0.1:{free_port()}",
           "--audit-log", str(audit), "--grace", "10"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    answers: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()

    def client(k: int) -> None:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            stub = eag.AuthorizationStub(ch)
            i = 0
            while not stop.is_set():
                futs = [stub.Check.future(req(path="/api/orders" if j % 2 else "/admin/x"),
                                          timeout=15) for j in range(8)]  # fmt: skip
                for f in futs:
                    try:
                        code = f.result().status.code
                    except grpc.RpcError:
                        stop.set()  # refused after the drain began: never decided
                        continue
                    with lock:
                        answers.append(code)
                i += 1

    try:
        with grpc.insecure_channel(f"127.0.0.1:{port}") as ch:
            grpc.channel_ready_future(ch).result(timeout=30)
        threads = [threading.Thread(target=client, args=(k,)) for k in range(4)]
        for t in threads:
            t.start()
        while len(answers) < 400 and proc.poll() is None:
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        for t in threads:
            t.join(30)
        assert proc.wait(timeout=30) == 0, proc.stderr.read().decode()[-2000:]
    finally:
        stop.set()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    decisions = _decisions(audit)
    assert len(decisions) == len(answers) >= 400
    assert sum(c == code_pb2.OK for c in answers) == sum(r["outcome"] == "allow" for r in decisions)
    report = verify_files([audit], require_closed=True)  # closed cleanly: close record
    assert report.ok, report.problem
