"""Soak: mixed CA and ext_authz load against a real ``citadel up`` for a bounded time.

Default 15 s (CI); ``CITADEL_SOAK_SECONDS=600`` for a longer run. Measures the plane's
RSS after warm-up and at the end (printed; asserted only against a generous bound, since
figures belong in bench/), then stops it with SIGTERM and checks the books: one audit
record per answer the clients got, for both services, every chain intact and closed.
"""

from __future__ import annotations

import os
import threading
import time
from collections import Counter
from pathlib import Path

import grpc
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from envoy.service.auth.v3 import external_auth_pb2_grpc as eag
from google.rpc import code_pb2

from citadel.audit import read_records, verify_files
from citadel.ca._proto import ca_pb2, ca_pb2_grpc
from citadel.dev import load_dev_issuer, mint_token
from tests.authz.test_adversarial import req
from tests.e2e.test_up import start_up, wait_ready

SOAK_SECONDS = float(os.environ.get("CITADEL_SOAK_SECONDS", "15"))
FRONTEND = "spiffe://cluster.local/ns/shop/sa/frontend"
#: (principal, path) mixes: allow, deny by rule, no rule, refused as ambiguous.
MIX = [(FRONTEND, "/api/orders"), (FRONTEND, "/admin/x"), ("", "/api/orders"),
       (FRONTEND, "/api/orders%2Fx"), ("", "/healthz")]  # fmt: skip


def _csr_without_san() -> str:
    """A CSR naming no identity: the CA names it from the token."""
    key = ec.generate_private_key(ec.SECP256R1())
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([]))
        .sign(key, hashes.SHA256())
    )
    return csr.public_bytes(serialization.Encoding.PEM).decode()


def _rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


@pytest.mark.slow
def test_soak_mixed_load(tmp_path: Path) -> None:
    up = wait_ready(start_up(tmp_path / "state"))
    state = up.state
    stop = threading.Event()
    counts: Counter[str] = Counter()
    lock = threading.Lock()
    errors: list[str] = []

    def authz_client() -> None:
        with grpc.insecure_channel(f"127.0.0.1:{up.authz}") as ch:
            stub = eag.AuthorizationStub(ch)
            i = 0
            while not stop.is_set():
                futs = [stub.Check.future(req(principal=p, path=path), timeout=30)
                        for p, path in MIX]  # fmt: skip
                for f in futs:
                    try:
                        code = f.result().status.code
                    except grpc.RpcError as exc:  # pragma: no cover - a failure below
                        errors.append(f"authz {exc.code()}")
                        continue
                    with lock:
                        counts["authz"] += 1
                        counts["authz_allow"] += code == code_pb2.OK
                i += 1

    def ca_client() -> None:
        issuer = load_dev_issuer(state)
        root = (state / "cacerts" / "root-cert.pem").read_bytes()
        creds = grpc.ssl_channel_credentials(root_certificates=root)
        # Many identities: the CA limits each to 20/s (citadel/ca/limits.py); this is a
        # fleet renewing, not one workload storming.
        tokens = [mint_token(issuer, namespace="soak", service_account=f"sa-{k}")
                  for k in range(32)]  # fmt: skip
        csr = _csr_without_san()
        with grpc.secure_channel(
            f"127.0.0.1:{up.ca}", creds, options=[("grpc.ssl_target_name_override", "localhost")]
        ) as ch:
            stub = ca_pb2_grpc.IstioCertificateServiceStub(ch)
            i = 0
            while not stop.is_set():
                good = tokens[i % len(tokens)]
                token = good if i % 4 else good[:-8] + "AAAAAAAA"  # every 4th: forged
                try:
                    stub.CreateCertificate(
                        ca_pb2.IstioCertificateRequest(csr=csr, validity_duration=600),
                        metadata=(("authorization", f"Bearer {token}"),),
                        timeout=30,
                    )
                    key = "ca_granted"
                except grpc.RpcError as exc:
                    key = "ca_refused" if exc.code() == grpc.StatusCode.UNAUTHENTICATED else ""
                    if not key:  # pragma: no cover - a failure below
                        errors.append(f"ca {exc.code()} {exc.details()}")
                        continue
                with lock:
                    counts[key] += 1
                i += 1

    threads = [threading.Thread(target=authz_client) for _ in range(2)]
    threads.append(threading.Thread(target=ca_client))
    try:
        for t in threads:
            t.start()
        time.sleep(min(2.0, SOAK_SECONDS / 5))  # warm-up: caches, first allocations
        rss_start = _rss_kb(up.proc.pid)
        at_start = dict(counts)
        time.sleep(SOAK_SECONDS)
        rss_end = _rss_kb(up.proc.pid)
        stop.set()
        for t in threads:
            t.join(60)
        rc, _, err = up.stop(timeout=30)
    finally:
        stop.set()
        if up.proc.poll() is None:
            up.proc.kill()
            up.proc.communicate()
    assert rc == 0, err[-2000:]
    assert not errors, errors[:5]

    audit = state / "audit.log"
    records = list(read_records([audit]))
    decisions = [r for r in records if r.get("kind") == "authz.decision"]
    issuance = [r for r in records if r.get("kind") == "ca.issuance"]
    granted = sum(r.get("outcome") == "granted" for r in issuance)
    rate = (counts["authz"] - at_start.get("authz", 0)) / SOAK_SECONDS
    print(
        f"\nsoak {SOAK_SECONDS:.0f}s: {counts['authz']} Checks ({rate:.0f}/s), "
        f"{counts['ca_granted']} certificates, {counts['ca_refused']} refused; RSS "
        f"{rss_start / 1024:.1f} -> {rss_end / 1024:.1f} MiB "
        f"({(rss_end - rss_start) / 1024:+.1f}); {len(records)} audit records"
    )
    assert counts["authz"] > 0 and counts["ca_granted"] > 0 and counts["ca_refused"] > 0
    assert len(decisions) == counts["authz"]
    assert sum(r["outcome"] == "allow" for r in decisions) == counts["authz_allow"]
    assert granted == counts["ca_granted"]
    assert len(issuance) == counts["ca_granted"] + counts["ca_refused"]
    report = verify_files([audit], require_closed=True)
    assert report.ok, report.problem
    assert len(report.streams) == 2
    # Generous: a leak of a few KB per request would still show at minutes-long runs.
    assert rss_end < rss_start * 1.5 + 64 * 1024, (rss_start, rss_end)
