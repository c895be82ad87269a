"""CreateCertificate throughput and latency over TLS, beside the raw signing rate.

``citadel ca serve`` (JWKS auth over the dev issuer, audit log ON to a file, TLS) runs in
its own process; this process drives it with N concurrent grpc.aio clients for a bounded
time, each call a fresh token/CSR pair from a pool (distinct service accounts and keys).
In the same run it measures, in process:

- ``raw_p256_sign_per_s``: cryptography ECDSA P-256 signatures of a 32-byte digest;
- ``raw_leaf_sign_per_s``: a minimal leaf certificate built and signed with P-256;
- ``pipeline_per_s``: what the servicer does per call minus gRPC: verify the token
  (JWKS), parse and verify the CSR, build and sign the leaf, self-check it with
  cryptography's verifier (full chain: two ECDSA verifications); and the two stages
  alone (``stage_*``) to show where the time goes.

Prints one JSON object with the figures, ratios and ``os.cpu_count()``. On a small
machine the Python client competes with the server for the same cores; the JSON says how
many. ``--quick`` shortens every phase (a smoke test, not a measurement).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import grpc
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec

from citadel.agent.keys import build_csr
from citadel.ca._proto import ca_pb2, ca_pb2_grpc
from citadel.ca.authority import init_authority
from citadel.ca.issuance import Issuer
from citadel.ca.jwks import JwksAuthenticator
from citadel.dev import init_dev_issuer, mint_token


def rate(fn, seconds: float) -> float:
    n, start = 0, time.perf_counter()
    deadline = start + seconds
    while True:
        for _ in range(50):
            fn()
        n += 50
        now = time.perf_counter()
        if now >= deadline:
            return n / (now - start)


def make_csr(key: ec.EllipticCurvePrivateKey) -> str:
    """What an agent sends (empty subject, SHA-256), minus the URI SAN: the CA sets it."""
    return build_csr(key=key, spiffe_id=None).decode()


def baselines(state: Path, tokens: list[str], csrs: list[str], seconds: float) -> dict:
    key = ec.generate_private_key(ec.SECP256R1())
    digest = os.urandom(32)
    sign_rate = rate(lambda: key.sign(digest, ec.ECDSA(hashes.SHA256())), seconds)

    leaf_key = ec.generate_private_key(ec.SECP256R1()).public_key()
    now = datetime.now(UTC)
    name = x509.Name([])

    def leaf() -> None:
        (
            x509.CertificateBuilder()
            .subject_name(name)
            .issuer_name(name)
            .public_key(leaf_key)
            .serial_number(x509.random_serial_number())
            .not_valid_before(now)
            .not_valid_after(now + timedelta(hours=1))
            .add_extension(
                x509.SubjectAlternativeName([x509.UniformResourceIdentifier("spiffe://td/a")]),
                critical=True,
            )
            .sign(key, hashes.SHA256())
        )

    leaf_rate = rate(leaf, seconds)

    from citadel.ca.authority import load_authority

    authority = load_authority(state / "cacerts")
    auth = JwksAuthenticator(jwks_file=state / "dev-issuer" / "jwks.json")
    n = max(200, int(seconds * 1200))
    out = {"raw_p256_sign_per_s": round(sign_rate), "raw_leaf_sign_per_s": round(leaf_rate)}

    async def tokens_only(n_calls: int) -> float:
        start = time.perf_counter()
        for k in range(n_calls):
            await auth.authenticate(tokens[k % len(tokens)])
        return n_calls / (time.perf_counter() - start)

    out["stage_token_verify_per_s"] = round(asyncio.run(tokens_only(n)))
    caller = asyncio.run(auth.authenticate(tokens[0]))
    for mode in ("chain", "issuer"):
        issuer = Issuer(authority, self_check=mode)

        async def pipeline(n_calls: int, issuer: Issuer = issuer) -> float:
            start = time.perf_counter()
            for k in range(n_calls):
                who = await auth.authenticate(tokens[k % len(tokens)])
                issuer.issue(who, csrs[k % len(csrs)])
            return n_calls / (time.perf_counter() - start)

        asyncio.run(pipeline(200))  # warm up
        out[f"pipeline_{mode}_per_s"] = round(asyncio.run(pipeline(n)))
        j = [0]

        def issue_only(issuer: Issuer = issuer, j: list[int] = j) -> None:
            j[0] += 1
            issuer.issue(caller, csrs[j[0] % len(csrs)])

        out[f"stage_csr_sign_selfcheck_{mode}_per_s"] = round(rate(issue_only, seconds))
    return out


async def drive(
    port: int, root: bytes, tokens: list[str], csrs: list[str], concurrency: int, seconds: float
) -> dict:
    creds = grpc.ssl_channel_credentials(root_certificates=root)
    channels = [
        grpc.aio.secure_channel(f"localhost:{port}", creds) for _ in range(min(4, concurrency))
    ]
    for ch in channels:
        await asyncio.wait_for(ch.channel_ready(), 30)
    stubs = [ca_pb2_grpc.IstioCertificateServiceStub(ch) for ch in channels]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    serials: set[int] = set()
    deadline = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        stub = stubs[w % len(stubs)]
        k = w
        while time.perf_counter() < deadline:
            k += concurrency
            req = ca_pb2.IstioCertificateRequest(csr=csrs[k % len(csrs)], validity_duration=3600)
            md = (("authorization", "Bearer " + tokens[k % len(tokens)]),)
            t0 = time.perf_counter()
            try:
                resp = await stub.CreateCertificate(req, metadata=md, timeout=10)
            except grpc.aio.AioRpcError as exc:
                errors[exc.code().name] = errors.get(exc.code().name, 0) + 1
                continue
            latencies.append(time.perf_counter() - t0)
            if len(serials) < 5000:
                serials.add(hash(resp.cert_chain[0]))

    start = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - start
    for ch in channels:
        await ch.close()
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 2)

    return {
        "concurrency": concurrency,
        "seconds": round(elapsed, 2),
        "calls": len(latencies),
        "errors": errors,
        "per_s": round(len(latencies) / elapsed),
        "p50_ms": pct(0.50) if latencies else None,
        "p99_ms": pct(0.99) if latencies else None,
        "mean_ms": round(statistics.fmean(latencies) * 1000, 2) if latencies else None,
        "distinct_certs_sampled": len(serials),
    }


def wait_ready(port: int, root: bytes, proc: subprocess.Popen, timeout: float = 60) -> None:
    creds = grpc.ssl_channel_credentials(root_certificates=root)
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if proc.poll() is not None:
            raise SystemExit(f"citadel ca serve exited early ({proc.returncode})")
        with grpc.secure_channel(f"localhost:{port}", creds) as ch:
            try:
                grpc.channel_ready_future(ch).result(timeout=1)
                return
            except grpc.FutureTimeoutError:
                continue
    raise SystemExit("citadel ca serve did not become ready")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_drive(
    state: Path,
    jwks: Path,
    tokens: list[str],
    csrs: list[str],
    mode: str,
    concurrency: int,
    seconds: float,
) -> dict:
    """``citadel ca serve --self-check MODE`` in its own process, driven from this one."""
    port = free_port()
    audit = state / f"audit-{mode}.log"
    with open(state / f"serve-{mode}.err", "wb") as stderr:
        proc = subprocess.Popen(
            [
                sys.executable, "-m", "citadel.cli", "ca", "serve",
                "--state-dir", str(state), "--listen", f"127.0.0.1:{port}",
                "--token-auth", "jwks", "--jwks-file", str(jwks), "--self-check", mode,
                "--audit-log", str(audit), "--log-level", "warning",
            ],
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )  # fmt: skip
        try:
            root = (state / "cacerts" / "root-cert.pem").read_bytes()
            wait_ready(port, root, proc)
            asyncio.run(drive(port, root, tokens, csrs, 8, 1.0))  # warm up
            single = asyncio.run(drive(port, root, tokens, csrs, 1, max(1.0, seconds / 4)))
            loaded = asyncio.run(drive(port, root, tokens, csrs, concurrency, seconds))
        finally:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    audited = sum(1 for line in audit.open("rb") if b'"outcome":"granted"' in line)
    return {"loaded": loaded, "one_in_flight": single, "granted_records_audited": audited}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=12.0, help="load phase length")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument("--quick", action="store_true", help="smoke test: short phases")
    args = ap.parse_args()
    load_s = 2.0 if args.quick else args.seconds
    base_s = 0.5 if args.quick else 2.0

    with tempfile.TemporaryDirectory(prefix="citadel-bench-ca-") as tmp:
        state = Path(tmp)
        init_authority(state / "cacerts", trust_domain="cluster.local", key_type="ec-p256")
        dev, _ = init_dev_issuer(state)
        tokens = [
            mint_token(
                dev, namespace=f"ns{i % 10}", service_account=f"sa{i}", ttl=timedelta(hours=2)
            )
            for i in range(200)
        ]
        csrs = [make_csr(ec.generate_private_key(ec.SECP256R1())) for _ in range(200)]
        base = baselines(state, tokens, csrs, base_s)

        runs = {}
        for mode in ("chain", "issuer"):
            runs[mode] = serve_and_drive(
                state, dev.jwks_path, tokens, csrs, mode, args.concurrency, load_s
            )

    chain, issuer = runs["chain"], runs["issuer"]
    result = {
        "bench": "ca",
        "what": "CreateCertificate over TLS, JWKS auth, audit to file, P-256 CA and CSRs",
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "quick": args.quick,
        "grpc_tls_self_check_chain": chain,
        "grpc_tls_self_check_issuer": issuer,
        "baseline_in_process": base,
        "ratios": {
            "grpc_chain_vs_pipeline_chain": round(
                chain["loaded"]["per_s"] / base["pipeline_chain_per_s"], 3
            ),
            "grpc_chain_vs_raw_leaf_sign": round(
                chain["loaded"]["per_s"] / base["raw_leaf_sign_per_s"], 3
            ),
            "grpc_chain_vs_raw_p256_sign": round(
                chain["loaded"]["per_s"] / base["raw_p256_sign_per_s"], 3
            ),
            "grpc_issuer_vs_chain": round(issuer["loaded"]["per_s"] / chain["loaded"]["per_s"], 3),
            "pipeline_chain_vs_raw_leaf_sign": round(
                base["pipeline_chain_per_s"] / base["raw_leaf_sign_per_s"], 3
            ),
        },
        "target": {
            "per_s": 1000,
            "met_chain": chain["loaded"]["per_s"] >= 1000,
            "met_issuer": issuer["loaded"]["per_s"] >= 1000,
        },
    }
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
