"""A renewal storm: 10,000 distinct agents renew at the same instant against one CA.

Issue 7 target 5: the burst completes with zero errors; requests the CA sheds
(RESOURCE_EXHAUSTED with a ``retry-after`` hint) are retried by the agent's own retry loop
(``Agent.fetch_once``: exponential backoff with jitter, the CA's hint as the earliest
retry, jittered above it). Reported: time until every agent holds a new verified
certificate, per-agent completion p50/p99/max, how many answers were shed (and by whom:
the servicer's audited refusals carry a hint; gRPC's own concurrent-RPC backstop does
not), errors (must be 0), the CA's CPU time, and in the same run a baseline: one agent
renewing sequentially over a warm channel.

Where the excess goes: the CA's gRPC (grpc.aio) takes one new call per event-loop turn,
so in a storm the backlog waits in grpc-core's queue of calls not yet handed to Python.
grpc-core sheds from that queue by itself (``grpc.server.max_pending_requests``, 1,000,
then randomly more up to a hard 3,000): those callers see CANCELLED, no hint, and the CA
never saw them (nothing verified, nothing issued, so no audit record). Calls that reach the
servicer with less than ``--min-time-left`` of their deadline are shed there (audited,
hinted: ``deadline_too_close``). ``ca_audit.granted_not_delivered`` counts certificates
issued to callers that had already given up (audited grants minus renewals minus the
baseline's).

Each agent is real (``citadel.agent.Agent``): its own service-account token (distinct
namespace/name, minted by the dev issuer and verified by the CA through JWKS), a fresh
P-256 key and CSR per attempt, the returned chain verified against the bundle, the set
written atomically to its own directory (tmpfs, like a memory-backed emptyDir). The CA is
``citadel ca serve`` in its own process with its default limits (rate limiter, in-flight
cap, gRPC backstop) and the audit log on. What is not real: the agents share
``--connections`` TLS channels (thousands of TLS handshakes from one Python process would
measure the client) and run in one process, on the same cores as the CA. They hold the
bundle already (a renewal, not a boot).

    python bench/renewal_storm.py [--agents 10000] [--connections 64] [--workers 1]
    python bench/renewal_storm.py --quick          # 1,000 agents: a smoke test
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import grpc
import loadgen

from citadel.agent.agent import Agent, AgentConfig
from citadel.agent.client import CaClient, FetchError
from citadel.ca.authority import init_authority
from citadel.dev import init_dev_issuer, load_dev_issuer, mint_token
from citadel.errors import CitadelError
from citadel.logs import configure_logging

NAMESPACES = 100


def _mint(args: tuple[str, int, int]) -> list[str]:
    """Tokens ``start..stop`` (RS256: ~1.4 ms each, so minted in worker processes)."""
    state, start, stop = args
    issuer = load_dev_issuer(state)
    return [
        mint_token(issuer, namespace=f"ns{i % NAMESPACES}", service_account=f"sa{i}")
        for i in range(start, stop)
    ]


def mint_tokens(state: Path, n: int) -> list[str]:
    procs = max(1, os.cpu_count() or 1)
    step = -(-n // procs)
    chunks = [(str(state), a, min(n, a + step)) for a in range(0, n, step)]
    with ProcessPoolExecutor(procs) as pool:
        return [t for part in pool.map(_mint, chunks) for t in part]


class StormAgent(Agent):
    """An agent that remembers each failure's gRPC code and whether it carried a hint."""

    codes: Counter[str]
    messages: dict[str, str]

    def _note_failure(self, exc: CitadelError, delay: float | None) -> None:
        code = getattr(exc, "code", exc.reason)
        if code == "RESOURCE_EXHAUSTED":
            hinted = isinstance(exc, FetchError) and exc.retry_after is not None
            code += " (retry-after)" if hinted else " (no hint)"
        self.codes[code] += 1
        self.messages.setdefault(code, exc.message[:200])
        self.failures += 1
        self.last_error = exc.message


def _pct(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return round(values[min(len(values) - 1, int(q * len(values)))], 3)


def audit_outcomes(path: Path) -> dict[str, int]:
    counts: Counter[str] = Counter()
    if path.exists():
        with open(path, "rb") as fh:
            for line in fh:
                if b'"kind":"ca.issuance"' not in line:
                    continue
                record = json.loads(line)
                fields = record.get("fields", record)
                outcome = fields.get("outcome")
                counts[
                    "granted" if outcome == "granted" else f"refused:{fields.get('reason')}"
                ] += 1
    return dict(counts)


async def storm(
    n: int,
    tokens: list[str],
    work: Path,
    address: str,
    connections: int,
    ca_pgid: int,
    baseline_rounds: int,
) -> dict:
    root_pem = (work / "state" / "cacerts" / "root-cert.pem").read_bytes()
    shm = Path("/dev/shm")
    out_root = Path(tempfile.mkdtemp(dir=shm if shm.is_dir() else work))
    creds = grpc.ssl_channel_credentials(root_certificates=root_pem)
    options = [("grpc.use_local_subchannel_pool", 1)]
    channels = [
        grpc.aio.secure_channel(address, creds, options=options) for _ in range(connections)
    ]
    for ch in channels:
        await asyncio.wait_for(ch.channel_ready(), 30)
    first_token = out_root / "tok-bundle"
    first_token.write_text(tokens[0])
    info = await CaClient(
        address=address, ca_root_pem=root_pem, token_file=first_token, channel=channels[0]
    ).get_bundle()

    def make(i: int, token: str) -> StormAgent:
        tok = out_root / f"tok{i}"
        tok.write_text(token)
        agent = StormAgent(
            AgentConfig(
                ca_address=address,
                ca_root=work / "state" / "cacerts" / "root-cert.pem",
                token_file=tok,
                out_dir=out_root / f"out{i}",
                # renew_forever never gives up; this budget only bounds a broken run.
                max_attempts=200,
                max_retry_seconds=110,
            ),
            channel=channels[i % connections],
        )
        agent._apply_bundle(info)  # a renewal: the agent holds the bundle already
        agent.codes = Counter()
        agent.messages = {}
        return agent

    try:
        # Baseline, same run: one agent renewing back to back over a warm channel.
        solo = make(-1, tokens[-1])
        await solo.fetch_once()
        t0 = time.perf_counter()
        for _ in range(baseline_rounds):
            await solo.fetch_once()
        seq_s = (time.perf_counter() - t0) / baseline_rounds

        agents = [make(i, tokens[i]) for i in range(n)]
        done_at: list[float] = []

        async def one(agent: StormAgent, t_start: float) -> None:
            await agent.fetch_once()
            done_at.append(time.perf_counter() - t_start)

        cpu0, me0 = loadgen.group_cpu_seconds(ca_pgid), time.process_time()
        t_start = time.perf_counter()
        results = await asyncio.gather(*(one(a, t_start) for a in agents), return_exceptions=True)
        elapsed = time.perf_counter() - t_start
        ca_cpu = loadgen.group_cpu_seconds(ca_pgid) - cpu0
        me_cpu = time.process_time() - me0
    finally:
        for ch in channels:
            await ch.close()
        shutil.rmtree(out_root, ignore_errors=True)

    errors = [r for r in results if isinstance(r, BaseException)]
    codes: Counter[str] = Counter()
    messages: dict[str, str] = {}
    for a in agents:
        codes.update(a.codes)
        for k, v in a.messages.items():
            messages.setdefault(k, v)
    attempts = n + sum(a.failures for a in agents) - len(errors)
    shed = sum(v for k, v in codes.items() if k.startswith("RESOURCE_EXHAUSTED"))
    return {
        "agents": n,
        "renewed": n - len(errors),
        "all_renewed_s": round(elapsed, 2),
        "certs_per_s": round((n - len(errors)) / elapsed, 1),
        "completion_p50_s": _pct(done_at, 0.50),
        "completion_p99_s": _pct(done_at, 0.99),
        "completion_max_s": round(max(done_at), 3) if done_at else None,
        "attempts": attempts,
        "shed": shed,
        "failures_by_code": dict(codes.most_common()),
        "failure_examples": messages,
        "errors": len(errors),
        "error_kinds": sorted({f"{type(e).__name__}: {str(e)[:160]}" for e in errors})[:5],
        "ca_cpu_s": round(ca_cpu, 2),
        "ca_cpu_ms_per_cert": round(1000 * ca_cpu / max(1, n - len(errors)), 3),
        "agents_process_cpu_s": round(me_cpu, 2),
        "baseline_sequential": {
            "rounds": baseline_rounds,
            "fetch_ms": round(seq_s * 1000, 2),
            "certs_per_s": round(1 / seq_s, 1),
        },
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=10_000)
    p.add_argument("--connections", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="ca serve --workers")
    p.add_argument("--quick", action="store_true", help="1,000 agents: a smoke test")
    p.add_argument(
        "--min-time-left",
        type=float,
        default=None,
        help="pass to ca serve (default: the CA's own; 0 disables the deadline floor)",
    )
    args = p.parse_args(argv)
    n = 1000 if args.quick else args.agents
    configure_logging(level="error", json=True)  # stderr; stdout is the JSON result
    wall0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="citadel-bench-storm-") as tmp:
        work = Path(tmp)
        state = work / "state"
        init_authority(state / "cacerts", trust_domain="cluster.local", key_type="ec-p256")
        dev, _ = init_dev_issuer(state)
        t0 = time.perf_counter()
        tokens = mint_tokens(state, n + 1)
        mint_s = time.perf_counter() - t0
        port = loadgen.free_port()
        audit = work / "audit.log"
        argv_ca = [
            sys.executable, "-m", "citadel.cli", "ca", "serve",
            "--state-dir", str(state), "--listen", f"127.0.0.1:{port}",
            "--token-auth", "jwks", "--jwks-file", str(dev.jwks_path),
            "--audit-log", str(audit), "--log-level", "error",
            "--workers", str(args.workers),
        ]  # fmt: skip
        if args.min_time_left is not None:
            argv_ca += ["--min-time-left", str(args.min_time_left)]
        with loadgen.ServerProcess(argv_ca, name="ca", log_dir=work) as server:
            result = asyncio.run(
                storm(
                    n,
                    tokens,
                    work,
                    f"localhost:{port}",
                    args.connections,
                    server.pid,
                    20 if args.quick else 100,
                )
            )
            server.check_alive()
        audited = audit_outcomes(audit)
    baseline_grants = 1 + result["baseline_sequential"]["rounds"]  # warm-up + rounds
    audited["granted_not_delivered"] = (
        audited.get("granted", 0) - result["renewed"] - baseline_grants
    )

    base = result["baseline_sequential"]
    out = {
        "bench": "renewal_storm",
        "what": "N distinct agents (own SA token, fresh key + CSR, chain verified, files "
        "written) renew at once against `ca serve` (JWKS, TLS, audit on, default limits); "
        "shed answers retried by Agent.fetch_once",
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "quick": args.quick,
        "params": {
            "agents": n,
            "connections": args.connections,
            "ca_workers": args.workers,
            "key_type": "ec-p256",
            "ca_min_time_left": args.min_time_left,
        },
        "storm": result,
        "ca_audit": audited,
        "ratios": {
            "storm_throughput_vs_sequential": round(result["certs_per_s"] / base["certs_per_s"], 2),
        },
        "targets": {
            "zero_errors_10k_renewing_at_once": {
                "value": result["errors"],
                "agents": n,
                "all_renewed_s": result["all_renewed_s"],
                "completion_p99_s": result["completion_p99_s"],
                "retried_attempts": result["attempts"] - result["renewed"],
                "resource_exhausted": result["shed"],
                "baseline_sequential_certs_per_s": base["certs_per_s"],
                "target": "0 errors",
                "met": result["errors"] == 0 and n >= 10_000,
            },
        },
        "setup_s": {"mint_tokens": round(mint_s, 1)},
        "bench_wall_s": round(time.perf_counter() - wall0, 1),
    }
    print(json.dumps(out, indent=2))
    return 0 if result["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
