"""CreateCertificate throughput and latency over TLS, beside the in-process pipeline.

``citadel ca serve`` (JWKS auth over the dev issuer, audit log ON to a file, TLS, default
``--self-check chain``) runs in its own process group; this process drives it with N
concurrent grpc.aio clients for a bounded time, each call a fresh token/CSR pair from a
pool (distinct service accounts and keys). Then ``ca serve --workers W`` (SO_REUSEPORT
processes) is driven the same way over several TCP connections (a local subchannel pool
per channel, so the kernel spreads them across the workers). The CA's CPU time is read
from /proc for every loaded phase: ``ca_cpu_ms_per_call`` is what one issuance costs the
CA, and ``capacity_per_core_per_s`` what one worker with a core to itself would serve
(on a 2-core box the Python client takes much of the other core).

In the same run it measures, in process:

- ``raw_p256_sign_per_s``: cryptography ECDSA P-256 signatures of a 32-byte digest;
- ``raw_leaf_sign_per_s``: a minimal leaf certificate built and signed with P-256;
- ``pipeline_<mode>_per_s``: what the servicer does per call minus gRPC: verify the token
  (JWKS), parse and verify the CSR, build and sign the leaf, self-check it (``chain``: the
  default, one ECDSA verification; ``full``: the old per-leaf walk to the root, two), and
  the stages alone (``stage_*``) to show where the time goes.

Pinning (``--pin auto``, the default, via ``bench/cores.py``): the 1-worker phase runs
twice in the same run, unpinned (CA and client float over all cores) and pinned (the CA's
processes on the lower half of the cores, this client on the rest, as if the client were
on another machine); each phase's JSON says which cores each side had, and the client's
own CPU use (``client_cpu_util``). The per-worker target is judged on the pinned phase.

``--ab GIT_REF`` replaces the run with a code A/B: the CA as of GIT_REF (its ``citadel/``
exported from git, imported through PYTHONPATH) against this work tree, the in-process
pipeline of each side and both served CAs up at once with the load alternating between
them in short slices (see ``code_ab``); for judging a change to the CA's hot path.

Prints one JSON object with the figures, ratios, ``targets`` and ``os.cpu_count()``.
The CA runs on ``--event-loop auto`` (uvloop when installed); one single-worker phase on
the standard asyncio loop is measured beside it. ``--quick`` shortens every phase (a
smoke test, not a measurement).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import cores
import grpc
import loadgen
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
    issuers = {mode: Issuer(authority, self_check=mode) for mode in ("chain", "full")}

    async def pipeline(issuer: Issuer, n_calls: int) -> float:
        start = time.perf_counter()
        for k in range(n_calls):
            who = await auth.authenticate(tokens[k % len(tokens)])
            issuer.issue(who, csrs[k % len(csrs)])
        return n_calls / (time.perf_counter() - start)

    # The two self-check modes alternate in short rounds, best of each reported: on a
    # shared, noisy box a disturbance then hits both instead of one.
    rounds = 3
    pipe: dict[str, list[float]] = {m: [] for m in issuers}
    stage: dict[str, list[float]] = {m: [] for m in issuers}
    for issuer in issuers.values():
        asyncio.run(pipeline(issuer, 200))  # warm up
    for _ in range(rounds):
        for mode, issuer in issuers.items():
            pipe[mode].append(asyncio.run(pipeline(issuer, max(100, n // rounds))))
            j = [0]

            def issue_only(issuer: Issuer = issuer, j: list[int] = j) -> None:
                j[0] += 1
                issuer.issue(caller, csrs[j[0] % len(csrs)])

            stage[mode].append(rate(issue_only, seconds / rounds))
    for mode in issuers:
        out[f"pipeline_{mode}_per_s"] = round(max(pipe[mode]))
        out[f"pipeline_{mode}_median_per_s"] = round(statistics.median(pipe[mode]))
        out[f"stage_csr_sign_selfcheck_{mode}_per_s"] = round(max(stage[mode]))
    return out


async def drive(
    port: int,
    root: bytes,
    tokens: list[str],
    csrs: list[str],
    concurrency: int,
    seconds: float,
    connections: int = 4,
) -> dict:
    creds = grpc.ssl_channel_credentials(root_certificates=root)
    # Each channel its own TCP connection: SO_REUSEPORT spreads connections, not calls.
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.aio.secure_channel(f"localhost:{port}", creds, options=options)
        for _ in range(min(connections, concurrency))
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

    start, cpu0 = time.perf_counter(), time.process_time()
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = time.perf_counter() - start
    client_cpu = time.process_time() - cpu0
    for ch in channels:
        await ch.close()
    latencies.sort()

    def pct(p: float) -> float:
        return round(latencies[min(len(latencies) - 1, int(p * len(latencies)))] * 1000, 2)

    return {
        "concurrency": concurrency,
        "connections": len(channels),
        "seconds": round(elapsed, 2),
        "calls": len(latencies),
        "errors": errors,
        "per_s": round(len(latencies) / elapsed),
        "p50_ms": pct(0.50) if latencies else None,
        "p99_ms": pct(0.99) if latencies else None,
        "mean_ms": round(statistics.fmean(latencies) * 1000, 2) if latencies else None,
        "distinct_certs_sampled": len(serials),
        # CPU seconds per wall second of this (client) process: near its core count means
        # the client, not the CA, set the pace.
        "client_cpu_util": round(client_cpu / elapsed, 2),
        "client_cores": cores.affinity(),
    }


def pin_server(pgid: int, cpus: frozenset[int]) -> list[int]:
    """Pin every thread of every process of the CA's group; the cores read back."""
    for pid in loadgen.group_pids(pgid):
        with contextlib.suppress(ProcessLookupError):
            cores.pin(pid, cpus)
    return cores.affinity(pgid)


@contextlib.contextmanager
def client_on(cpus: frozenset[int] | None):
    """This process (the load generator) on ``cpus`` for the block, then back."""
    if cpus is None:
        yield
        return
    before = cores.affinity()
    cores.pin_self(cpus)
    try:
        yield
    finally:
        cores.pin_self(before)


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


#: The CA with a chosen ``self_check`` (``ca serve`` offers chain|issuer; ``full`` is the
#: per-leaf walk to the root this CA did before): same server wiring, asyncio loop.
_SELF_CHECK_SERVER = """
import asyncio, sys
from pathlib import Path
from citadel.audit import open_audit_log
from citadel.ca.jwks import JwksAuthenticator
from citadel.ca.server import CAConfig, serve_ca
from citadel.logs import configure_logging
state, port, jwks, audit, mode = sys.argv[1:6]
configure_logging(level="warning", json=True)
async def main():
    log = open_audit_log(audit, name="citadel-ca")
    config = CAConfig(
        cacerts_dir=Path(state) / "cacerts", listen=f"127.0.0.1:{port}", audit=log,
        authenticator=JwksAuthenticator(jwks_file=Path(jwks)), self_check=mode,
    )
    try:
        await serve_ca(config)
    finally:
        log.close()
asyncio.run(main())
"""


def self_check_ab(
    state: Path, jwks: Path, tokens: list[str], csrs: list[str], concurrency: int, seconds: float
) -> dict:
    """The served CA with ``self_check`` chain (now) vs full (before), same run."""
    out: dict = {}
    for mode in ("full", "chain"):
        port = loadgen.free_port()
        audit = state / f"audit-ab-{mode}.log"
        argv = [
            sys.executable, "-c", _SELF_CHECK_SERVER,
            str(state), str(port), str(jwks), str(audit), mode,
        ]  # fmt: skip
        with loadgen.ServerProcess(argv, name=f"ca-ab-{mode}", log_dir=state) as server:
            root = (state / "cacerts" / "root-cert.pem").read_bytes()
            wait_ready(port, root, server.proc)
            asyncio.run(drive(port, root, tokens, csrs, 8, 1.0))  # warm up
            cpu0 = loadgen.group_cpu_seconds(server.pid)
            loaded = asyncio.run(drive(port, root, tokens, csrs, concurrency, seconds))
            cpu = loadgen.group_cpu_seconds(server.pid) - cpu0
            server.check_alive()
        loaded["ca_cpu_ms_per_call"] = round(1000 * cpu / max(1, loaded["calls"]), 3)
        out[mode] = loaded
    out["chain_vs_full_per_s"] = round(out["chain"]["per_s"] / out["full"]["per_s"], 3)
    out["chain_vs_full_cpu_per_call"] = round(
        out["chain"]["ca_cpu_ms_per_call"] / out["full"]["ca_cpu_ms_per_call"], 3
    )
    return out


def serve_and_drive(
    state: Path,
    jwks: Path,
    tokens: list[str],
    csrs: list[str],
    *,
    workers: int,
    concurrency: int,
    seconds: float,
    single: bool,
    event_loop: str = "auto",
    split: tuple[frozenset[int], frozenset[int]] | None = None,
) -> dict:
    """``citadel ca serve --workers W`` in its own process group, driven from this one.

    With ``split`` (server cores, client cores) the CA's processes are pinned to the first
    set and this process to the second for the phase, as if the client were elsewhere."""
    port = loadgen.free_port()
    audit = state / f"audit-w{workers}-{event_loop}.log"
    argv = [
        sys.executable, "-m", "citadel.cli", "ca", "serve",
        "--state-dir", str(state), "--listen", f"127.0.0.1:{port}",
        "--token-auth", "jwks", "--jwks-file", str(jwks),
        "--audit-log", str(audit), "--log-level", "warning", "--workers", str(workers),
        "--event-loop", event_loop,
    ]  # fmt: skip
    connections = 4 * workers
    out: dict = {"workers": workers, "event_loop": event_loop}
    name = f"ca-w{workers}-{event_loop}" + ("-pinned" if split else "")
    out.update(cores.describe(split))
    with (
        loadgen.ServerProcess(argv, name=name, log_dir=state) as server,
        client_on(split[1] if split else None),
    ):
        if split:
            pin_server(server.pid, split[0])  # before grpc starts its threads
        root = (state / "cacerts" / "root-cert.pem").read_bytes()
        wait_ready(port, root, server.proc)
        time.sleep(0.5 * (workers - 1))  # every worker up, not just the first to answer
        if split:  # workers spawned meanwhile inherit the mask; read it back for the JSON
            out["server_cores_read_back"] = pin_server(server.pid, split[0])
        asyncio.run(drive(port, root, tokens, csrs, 8, 1.0, connections))  # warm up
        if single:
            out["one_in_flight"] = asyncio.run(
                drive(port, root, tokens, csrs, 1, max(1.0, seconds / 4))
            )
        cpu0 = loadgen.group_cpu_seconds(server.pid)
        loaded = asyncio.run(drive(port, root, tokens, csrs, concurrency, seconds, connections))
        cpu = loadgen.group_cpu_seconds(server.pid) - cpu0
        server.check_alive()
    loaded["ca_cpu_s"] = round(cpu, 2)
    if loaded["calls"]:
        loaded["ca_cpu_ms_per_call"] = round(1000 * cpu / loaded["calls"], 3)
        loaded["capacity_per_core_per_s"] = round(loaded["calls"] / cpu) if cpu else None
    loaded["per_worker_per_s"] = round(loaded["per_s"] / workers)
    out["loaded"] = loaded
    out["granted_records_audited"] = sum(
        1 for line in audit.open("rb") if b'"outcome":"granted"' in line
    )
    return out


def pipeline_rate(state: Path, tokens: list[str], csrs: list[str], seconds: float) -> dict:
    """The in-process chain pipeline alone (token + CSR + sign + self-check), best of 3."""
    from citadel.ca.authority import load_authority

    authority = load_authority(state / "cacerts")
    auth = JwksAuthenticator(jwks_file=state / "dev-issuer" / "jwks.json")
    issuer = Issuer(authority, self_check="chain")

    async def pipeline(n_calls: int) -> float:
        start = time.perf_counter()
        for k in range(n_calls):
            who = await auth.authenticate(tokens[k % len(tokens)])
            issuer.issue(who, csrs[k % len(csrs)])
        return n_calls / (time.perf_counter() - start)

    asyncio.run(pipeline(200))
    n = max(100, int(seconds * 400))
    runs = [asyncio.run(pipeline(n)) for _ in range(3)]
    return {"pipeline_chain_per_s": round(max(runs)), "median": round(statistics.median(runs))}


def export_ref(ref: str, into: Path) -> Path:
    """``citadel/`` as of git ``ref`` under ``into``, importable through PYTHONPATH."""
    repo = Path(__file__).resolve().parents[1]
    archive = subprocess.run(
        ["git", "-C", str(repo), "archive", ref, "citadel"], check=True, capture_output=True
    ).stdout
    into.mkdir(parents=True, exist_ok=True)
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def _served(state: Path, jwks: Path, port: int, name: str) -> list[str]:
    return [
        sys.executable, "-m", "citadel.cli", "ca", "serve",
        "--state-dir", str(state), "--listen", f"127.0.0.1:{port}",
        "--token-auth", "jwks", "--jwks-file", str(jwks),
        "--audit-log", str(state / f"audit-{name}.log"), "--log-level", "warning",
    ]  # fmt: skip


def code_ab(
    state: Path,
    jwks: Path,
    tokens: list[str],
    csrs: list[str],
    *,
    ref: str,
    rounds: int,
    slices: int,
    slice_s: float,
    concurrency: int,
    base_s: float,
    split: tuple[frozenset[int], frozenset[int]] | None,
) -> dict:
    """The CA of git ``ref`` (A) against this work tree (B) in one run.

    In-process pipeline: ``rounds`` subprocesses per side (each importing that side's
    code), alternating. Served (unpinned, then pinned when the machine can pin): both CAs
    are started once and stay up, and the load alternates between them in ``slices``
    short slices each (A B, then B A, ...), CPU per call read from /proc per slice. On a
    shared machine restarting a server per phase left +-8 % between identical builds;
    adjacent slices share the drift, and the paired per-slice differences are reported
    with how many slices B was cheaper in (an identical-code control came out at a
    median of +0.004 ms over 24 slices)."""
    ref_dir = export_ref(ref, state / "ab-ref")
    (state / "ab-inputs.json").write_text(json.dumps({"tokens": tokens, "csrs": csrs}))
    variants = {"a_ref": {"PYTHONPATH": str(ref_dir)}, "b_work": {}}
    here = str(Path(__file__).resolve())
    out: dict = {"ref": ref, "rounds": rounds, "slices": slices, "slice_seconds": slice_s}
    pipe: dict[str, list[int]] = {v: [] for v in variants}
    for r in range(rounds):
        for variant in list(variants) if r % 2 == 0 else list(reversed(variants)):
            res = subprocess.run(
                [sys.executable, here, "--pipeline-only", str(state), "--seconds", str(base_s)],
                env={**os.environ, **variants[variant]}, check=True, capture_output=True,
                text=True,
            )  # fmt: skip
            pipe[variant].append(json.loads(res.stdout)["pipeline_chain_per_s"])
    out["pipeline_chain_per_s"] = {
        v: {"median": statistics.median(x), "runs": x} for v, x in pipe.items()
    }
    root = (state / "cacerts" / "root-cert.pem").read_bytes()
    for phase, sp in [("unpinned", None)] + ([("pinned", split)] if split else []):
        ports = {v: loadgen.free_port() for v in variants}
        with contextlib.ExitStack() as stack:
            servers = {
                v: stack.enter_context(
                    loadgen.ServerProcess(
                        _served(state, jwks, ports[v], f"ab-{v}-{phase}"),
                        name=f"ab-{v}-{phase}", log_dir=state, env=env,
                    )
                )
                for v, env in variants.items()
            }  # fmt: skip
            stack.enter_context(client_on(sp[1] if sp else None))
            for v, server in servers.items():
                if sp:
                    pin_server(server.pid, sp[0])
                wait_ready(ports[v], root, server.proc)
                if sp:
                    pin_server(server.pid, sp[0])
                asyncio.run(drive(ports[v], root, tokens, csrs, 8, 1.0))  # warm up
            rows: dict[str, dict[str, list[float]]] = {
                v: {"cpu": [], "per_s": []} for v in variants
            }
            for k in range(slices):
                for v in list(variants) if k % 2 == 0 else list(reversed(variants)):
                    cpu0 = loadgen.group_cpu_seconds(servers[v].pid)
                    res = asyncio.run(drive(ports[v], root, tokens, csrs, concurrency, slice_s))
                    cpu = loadgen.group_cpu_seconds(servers[v].pid) - cpu0
                    rows[v]["cpu"].append(round(1000 * cpu / max(1, res["calls"]), 3))
                    rows[v]["per_s"].append(res["per_s"])
            for server in servers.values():
                server.check_alive()
        diff = [b - a for a, b in zip(rows["a_ref"]["cpu"], rows["b_work"]["cpu"], strict=True)]
        summary: dict = {"cores": cores.describe(sp)}
        for v, cols in rows.items():
            per_s = statistics.median(cols["per_s"])
            summary[v] = {
                "per_s": per_s,
                "ca_cpu_ms_per_call": statistics.median(cols["cpu"]),
                "vs_pipeline": round(per_s / out["pipeline_chain_per_s"][v]["median"], 3),
                "slices": cols,
            }
        summary["b_minus_a_cpu_ms_per_call"] = {
            "median": round(statistics.median(diff), 3),
            "mean": round(statistics.fmean(diff), 3),
            "slices_b_cheaper": f"{sum(d < 0 for d in diff)}/{len(diff)}",
        }
        out[phase] = summary
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=8.0, help="load phase length")
    ap.add_argument("--concurrency", type=int, default=32)
    ap.add_argument(
        "--workers", type=int, default=2, help="also run `ca serve --workers N` (1: skip)"
    )
    ap.add_argument("--quick", action="store_true", help="smoke test: short phases")
    ap.add_argument(
        "--pin",
        choices=cores.PIN_MODES,
        default="auto",
        help="auto: also run the 1-worker phase with the CA and this client on separate "
        "cores (bench/cores.py); off: unpinned only",
    )
    ap.add_argument(
        "--ab",
        metavar="GIT_REF",
        help="instead of the full run: the CA as of GIT_REF against this work tree, "
        "interleaved (served 1 worker pinned/unpinned, CPU per call, in-process pipeline)",
    )
    ap.add_argument("--ab-rounds", type=int, default=3, help="--ab: pipeline runs per side")
    ap.add_argument("--ab-slices", type=int, default=12, help="--ab: load slices per side")
    ap.add_argument("--ab-slice-seconds", type=float, default=1.5)
    ap.add_argument("--pipeline-only", metavar="STATE", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.pipeline_only:  # one A/B side's in-process pipeline (a subprocess of --ab)
        state = Path(args.pipeline_only)
        inputs = json.loads((state / "ab-inputs.json").read_text())
        print(json.dumps(pipeline_rate(state, inputs["tokens"], inputs["csrs"], args.seconds)))
        return
    split = cores.split_cores(args.pin)
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
        if args.ab:
            ab_out = code_ab(
                state, dev.jwks_path, tokens, csrs, ref=args.ab, rounds=args.ab_rounds,
                slices=args.ab_slices, slice_s=args.ab_slice_seconds,
                concurrency=args.concurrency, base_s=base_s, split=split,
            )  # fmt: skip
            ab_out.update(bench="ca-ab", cpu_count=os.cpu_count(), quick=args.quick)
            print(json.dumps(ab_out, indent=2))
            return
        base = baselines(state, tokens, csrs, base_s)
        one = serve_and_drive(
            state, dev.jwks_path, tokens, csrs,
            workers=1, concurrency=args.concurrency, seconds=load_s, single=True,
        )  # fmt: skip
        # Same run, same server, the CA on its own core(s) and the client on the others.
        pinned = None
        if split is not None:
            pinned = serve_and_drive(
                state, dev.jwks_path, tokens, csrs, workers=1,
                concurrency=args.concurrency, seconds=load_s, single=True, split=split,
            )  # fmt: skip
        ab = self_check_ab(state, dev.jwks_path, tokens, csrs, args.concurrency, load_s)
        # Same run, same worker count, the standard asyncio loop: what uvloop buys.
        std = None
        if importlib.util.find_spec("uvloop") is not None:
            std = serve_and_drive(
                state, dev.jwks_path, tokens, csrs, workers=1,
                concurrency=args.concurrency, seconds=load_s, single=False,
                event_loop="asyncio",
            )  # fmt: skip
        many = None
        if args.workers > 1:
            many = serve_and_drive(
                state, dev.jwks_path, tokens, csrs,
                workers=args.workers, concurrency=args.concurrency, seconds=load_s, single=False,
            )  # fmt: skip

    w1 = one["loaded"]
    result = {
        "bench": "ca",
        "what": "CreateCertificate over TLS, JWKS auth, audit to file, P-256 CA and CSRs, "
        "--self-check chain (default)",
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "quick": args.quick,
        "grpc_tls_workers_1": one,
        "baseline_in_process": base,
        "ratios": {
            "grpc_vs_pipeline_chain": round(w1["per_s"] / base["pipeline_chain_per_s"], 3),
            "grpc_vs_raw_leaf_sign": round(w1["per_s"] / base["raw_leaf_sign_per_s"], 3),
            "pipeline_chain_vs_full": round(
                base["pipeline_chain_per_s"] / base["pipeline_full_per_s"], 3
            ),
            "pipeline_chain_vs_raw_leaf_sign": round(
                base["pipeline_chain_per_s"] / base["raw_leaf_sign_per_s"], 3
            ),
        },
    }
    result["pinning"] = cores.describe(split)
    if pinned is not None:
        wp = pinned["loaded"]
        result["grpc_tls_workers_1_pinned"] = pinned
        result["ratios"]["workers_1_pinned_vs_unpinned"] = round(wp["per_s"] / w1["per_s"], 3)
        result["ratios"]["grpc_pinned_vs_pipeline_chain"] = round(
            wp["per_s"] / base["pipeline_chain_per_s"], 3
        )
    result["self_check_served_chain_vs_full"] = ab
    if std is not None:
        result["grpc_tls_workers_1_asyncio_loop"] = std
        result["ratios"]["workers_1_auto_loop_vs_asyncio"] = round(
            w1["per_s"] / std["loaded"]["per_s"], 3
        )
    result["ca_event_loop"] = "uvloop" if std is not None else "asyncio"
    # One worker with a core to itself is what "per worker" means: the pinned phase when
    # the machine could pin, else the shared-core one (and the JSON says which).
    wt = pinned["loaded"] if pinned is not None else w1
    targets: dict = {
        "issuances_per_s_one_worker": {
            "value": wt["per_s"],
            "pinned": pinned is not None,
            "p99_ms": wt["p99_ms"],
            "ca_cpu_ms_per_call": wt.get("ca_cpu_ms_per_call"),
            "ca_capacity_per_core": wt.get("capacity_per_core_per_s"),
            "unpinned_per_s": w1["per_s"],
            "unpinned_p99_ms": w1["p99_ms"],
            "target": ">= 1000",
            "met": wt["per_s"] >= 1000,
        },
        "grpc_vs_in_process_pipeline": {
            "value": result["ratios"]["grpc_vs_pipeline_chain"],
            "baseline_pipeline_per_s": base["pipeline_chain_per_s"],
            "target": ">= 0.5",
            "met": result["ratios"]["grpc_vs_pipeline_chain"] >= 0.5,
        },
    }
    targets["self_check_chain_vs_full_served"] = {
        "value": ab["chain_vs_full_per_s"],
        "chain_per_s": ab["chain"]["per_s"],
        "baseline_full_per_s": ab["full"]["per_s"],
        "cpu_per_call_ratio": ab["chain_vs_full_cpu_per_call"],
        "target": "report",
        "met": None,
    }
    if many is not None:
        wn = many["loaded"]
        result[f"grpc_tls_workers_{args.workers}"] = many
        result["ratios"][f"workers_{args.workers}_vs_1"] = round(wn["per_s"] / w1["per_s"], 3)
        targets[f"issuances_per_s_per_worker_{args.workers}_workers"] = {
            "value": wn["per_worker_per_s"],
            "total_per_s": wn["per_s"],
            "baseline_workers_1_per_s": w1["per_s"],
            "scaling": result["ratios"][f"workers_{args.workers}_vs_1"],
            "target": ">= 1000",
            "met": wn["per_worker_per_s"] >= 1000,
        }
    result["targets"] = targets
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
