"""Faults on the CA's side, injected for real: every one fails closed and says so.

- the OIDC issuer goes down while its keys are cached: known keys keep verifying until the
  cache's hard expiry, then UNAVAILABLE; an unknown ``kid`` meanwhile is UNAVAILABLE (the CA
  cannot tell a rotated key from a forgery), never UNAUTHENTICATED;
- the audit sink fails: a full disk (``/dev/full`` under the sink's descriptor: the kernel's
  ENOSPC) and a closed pipe (the audit FIFO's reader goes away: EPIPE). CreateCertificate
  answers UNAVAILABLE naming the audit log and hands out nothing;
- SIGTERM under load: every call that got a certificate has its audit record, every
  granted record was delivered, the process exits 0 and the chain verifies.

Kubernetes API faults (unreachable, slow, 5xx, 429, timeout, RBAC) are covered end to end in
``test_ca_tokenreview.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import grpc
import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import rsa

from citadel.audit import AuditLog, FileSink, verify_files
from citadel.ca._proto import ca_pb2, ca_pb2_grpc
from citadel.ca.jwks import JwksAuthenticator
from citadel.dev import load_dev_issuer, mint_token
from tests.citadel.test_issuance import make_csr
from tests.citadel.test_jwks import _Issuer
from tests.conftest import free_port
from tests.e2e.conftest import running_ca

CSR = make_csr().decode()


def _call(stub: Any, token: str, timeout: float = 10) -> tuple[grpc.StatusCode, str, Any]:
    try:
        resp = stub.CreateCertificate(
            ca_pb2.IstioCertificateRequest(csr=CSR),
            metadata=[("authorization", f"Bearer {token}")],
            timeout=timeout,
        )
        return grpc.StatusCode.OK, "", resp
    except grpc.RpcError as err:
        return err.code(), err.details() or "", None


# ------------------------------------------------------------------ OIDC down, keys cached


def test_oidc_down_cached_keys_until_expiry_then_unavailable(
    ca_state: Path, tmp_path: Path
) -> None:
    dev = load_dev_issuer(ca_state)
    oidc = _Issuer(dev.jwks())
    now = [time.time()]
    auth = JwksAuthenticator(oidc_issuer=oidc.url, clock=lambda: now[0])
    try:
        with running_ca(ca_state, authenticator=auth, audit_path=tmp_path / "a.log") as h:

            def tok(**kw: Any) -> str:
                return mint_token(
                    dev,
                    namespace="default",
                    service_account="web",
                    issuer_url=oidc.url,
                    clock=lambda: now[0],
                    **kw,
                )

            stub = h.stub()
            assert _call(stub, tok())[0] == grpc.StatusCode.OK
            fetches = auth.fetches
            oidc.fail = True  # the issuer goes down
            now[0] += 11 * 60  # past max_age: a refresh is tried, fails, cached keys serve
            assert _call(stub, tok())[0] == grpc.StatusCode.OK
            assert auth.fetches == fetches + 1

            other = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            claims = jwt.decode(tok(), options={"verify_signature": False})
            rotated = jwt.encode(claims, other, "RS256", headers={"kid": "rotated"})
            code, details, _ = _call(stub, rotated)
            assert code == grpc.StatusCode.UNAVAILABLE, details
            assert "cannot be refreshed" in details and "HTTP 503" in details
            assert h.audit_records()[-1]["reason"] == "jwks_unavailable"

            now[0] += 6 * 3600  # past the cache's hard expiry
            code, details, _ = _call(stub, tok())
            assert code == grpc.StatusCode.UNAVAILABLE, details
            assert "cannot be refreshed" in details
            assert h.audit_records()[-1]["reason"] == "jwks_stale"

            oidc.fail = False  # back: the next call refreshes and is served
            now[0] += 31
            assert _call(stub, tok())[0] == grpc.StatusCode.OK
            # and a kid that is still unknown once the issuer answers is a forgery again
            assert _call(stub, rotated)[0] == grpc.StatusCode.UNAUTHENTICATED
            granted = [r for r in h.audit_records() if r["outcome"] == "granted"]
            assert len(granted) == 3
    finally:
        oidc.server.shutdown()
        oidc.server.server_close()


# ------------------------------------------------------------------ the audit sink fails


def test_disk_full_fails_closed_then_recovers(ca_state: Path, tmp_path: Path) -> None:
    path = tmp_path / "audit.log"
    sink = FileSink(path)
    audit = AuditLog(sink, name="ca")
    with running_ca(ca_state, audit=audit, audit_path=path) as h:
        stub = h.stub()
        token = h.token()
        assert _call(stub, token)[0] == grpc.StatusCode.OK
        granted_before = h.running.servicer.granted
        saved = os.dup(sink._fd)
        full = os.open("/dev/full", os.O_WRONLY)
        os.dup2(full, sink._fd)  # the disk is full from here on: write(2) -> ENOSPC
        try:
            code, details, resp = _call(stub, token)
            assert code == grpc.StatusCode.UNAVAILABLE, details
            assert "audit" in details and resp is None
            assert h.running.servicer.granted == granted_before, "nothing handed out"
            assert audit.write_failures == 1
        finally:
            os.dup2(saved, sink._fd)
            os.close(saved)
            os.close(full)
        assert _call(stub, token)[0] == grpc.StatusCode.OK  # space again: serving again
    assert verify_files([path]).ok, "the failed record left no gap in the chain"


def test_closed_audit_pipe_fails_closed(ca_state: Path, tmp_path: Path) -> None:
    fifo = tmp_path / "audit.fifo"
    os.mkfifo(fifo)
    reader = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    received = bytearray()
    stop = threading.Event()

    def drain() -> None:
        while not stop.is_set():
            ready, _, _ = select.select([reader], [], [], 0.05)
            if ready:
                with contextlib.suppress(BlockingIOError):
                    received.extend(os.read(reader, 65536))

    drainer = threading.Thread(target=drain, daemon=True)
    drainer.start()
    port = free_port()
    dev = load_dev_issuer(ca_state)
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "citadel.cli", "ca", "serve",
            "--state-dir", str(ca_state), "--listen", f"127.0.0.1:{port}",
            "--jwks-file", str(dev.jwks_path), "--audit-log", str(fifo),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    try:
        root = (ca_state / "cacerts" / "root-cert.pem").read_bytes()
        with grpc.secure_channel(
            f"localhost:{port}", grpc.ssl_channel_credentials(root_certificates=root)
        ) as ch:
            grpc.channel_ready_future(ch).result(timeout=30)
            stub = ca_pb2_grpc.IstioCertificateServiceStub(ch)
            token = mint_token(dev, namespace="default", service_account="web")
            assert _call(stub, token)[0] == grpc.StatusCode.OK
            deadline = time.monotonic() + 5
            while b'"outcome":"granted"' not in received and time.monotonic() < deadline:
                time.sleep(0.02)
            assert b'"outcome":"granted"' in received
            stop.set()
            drainer.join(5)
            os.close(reader)  # the log collector is gone: writes now fail with EPIPE
            code, details, resp = _call(stub, token)
            assert code == grpc.StatusCode.UNAVAILABLE, details
            assert "cannot write its audit log" in details and resp is None
    finally:
        proc.send_signal(signal.SIGTERM)
        _out, err = proc.communicate(timeout=30)
    text = err.decode()
    assert "ca.issuance.audit_failed" in text and "Broken pipe" in text
    assert token not in text
    assert received.count(b'"outcome":"granted"') == 1


# ------------------------------------------------------------------ SIGTERM under load


def test_sigterm_under_load_drains_and_audits_everything(ca_state: Path, tmp_path: Path) -> None:
    port, audit = free_port(), tmp_path / "audit.log"
    dev = load_dev_issuer(ca_state)
    proc = subprocess.Popen(
        [
            sys.executable, "-m", "citadel.cli", "ca", "serve",
            "--state-dir", str(ca_state), "--listen", f"127.0.0.1:{port}",
            "--jwks-file", str(dev.jwks_path), "--audit-log", str(audit),
            "--log-level", "warning",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )  # fmt: skip
    root = (ca_state / "cacerts" / "root-cert.pem").read_bytes()
    creds = grpc.ssl_channel_credentials(root_certificates=root)
    tokens = [mint_token(dev, namespace="load", service_account=f"sa{i}") for i in range(8)]
    served: list[int] = []
    failed: list[grpc.StatusCode] = []
    lock = threading.Lock()
    go = threading.Event()

    def client(i: int) -> None:
        with grpc.secure_channel(f"localhost:{port}", creds) as ch:
            stub = ca_pb2_grpc.IstioCertificateServiceStub(ch)
            go.wait()
            while True:
                code, _details, resp = _call(stub, tokens[i % len(tokens)], timeout=10)
                with lock:
                    if code == grpc.StatusCode.OK:
                        leaf = x509.load_pem_x509_certificate(resp.cert_chain[0].encode())
                        served.append(leaf.serial_number)
                    else:
                        failed.append(code)
                        return

    with grpc.secure_channel(f"localhost:{port}", creds) as ch:
        grpc.channel_ready_future(ch).result(timeout=30)
    threads = [threading.Thread(target=client, args=(i,)) for i in range(12)]
    for t in threads:
        t.start()
    go.set()
    time.sleep(1.0)
    proc.send_signal(signal.SIGTERM)  # mid-load
    for t in threads:
        t.join(30)
    _out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0, err.decode()
    assert len(served) > 20, "there was load when SIGTERM arrived"
    assert set(failed) <= {grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED}, failed
    records = [json.loads(x) for x in audit.read_text().splitlines()]
    granted = [int(r["serial"], 16) for r in records if r.get("outcome") == "granted"]
    assert sorted(granted) == sorted(served), "every delivered certificate audited, and only those"
    assert verify_files([audit]).ok
    print(f"\nSIGTERM under load: {len(served)} served and audited; clients then got {failed[:3]}")
