"""A fleet renewing at once: N in-process agents against one CA (``citadel ca serve``).

What it measures (JSON on stdout):
- ``boot``: N agents with fresh channels (TLS handshake + bundle + CreateCertificate each)
  all fetching at the same instant, the worst case after a cluster-wide restart;
- ``renew``: the same N agents renewing at the same instant over their open channels
  (what a fleet does at half-life if nobody jittered);
- per request (client-observed, the CA's latency as a workload sees it): p50/p99 of
  CreateCertificate; time until all N hold a verified certificate; failures (including
  RESOURCE_EXHAUSTED answers that the agents retried after the CA's hint);
- ``baseline``: one agent's sequential renewal latency, measured in the same run, and
  the ratio of the burst's per-certificate cost to it.

The CA runs as its own process (as in a cluster) and the agents in this one, so the two
compete for the machine's cores like a CA and a node full of pods would.

    python bench/agent.py [--agents 500] [--quick]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from citadel.agent.agent import Agent, AgentConfig
from citadel.dev import init_dev_issuer, mint_token
from citadel.logs import configure_logging


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


def start_ca(state: Path) -> tuple[subprocess.Popen[bytes], str]:
    subprocess.run(
        ["citadel", "ca", "init", "--state-dir", str(state), "--trust-domain", "cluster.local"],
        check=True,
        capture_output=True,
    )
    issuer, _ = init_dev_issuer(state)
    port = _free_port()
    proc = subprocess.Popen(
        [
            "citadel", "ca", "serve", "--state-dir", str(state),
            "--listen", f"127.0.0.1:{port}", "--token-auth", "jwks",
            "--jwks-file", str(issuer.jwks_path), "--audit-log", str(state / "audit.log"),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit("the CA exited at start-up")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, f"127.0.0.1:{port}"
        except OSError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the CA did not start listening within 30 s")


class TimedAgent(Agent):
    """An agent that records each CreateCertificate's client-observed latency."""

    latencies: list[float]

    async def fetch(self):  # type: ignore[override]
        client = self.client
        original = client.create_certificate

        async def timed(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return await original(*args, **kwargs)
            finally:
                self.latencies.append(time.perf_counter() - t0)

        client.create_certificate = timed  # type: ignore[method-assign]
        try:
            return await super().fetch()
        finally:
            client.create_certificate = original  # type: ignore[method-assign]


def _cpu_seconds(pid: int) -> float | None:
    """utime + stime of a process, from /proc (Linux); None elsewhere."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def burst(agents: list[TimedAgent], ca_pid: int) -> dict[str, object]:
    for a in agents:
        a.latencies = []
        a.failures = 0
    ca0, me0 = _cpu_seconds(ca_pid), time.process_time()
    t0 = time.perf_counter()
    results = await asyncio.gather(*(a.fetch_once() for a in agents), return_exceptions=True)
    elapsed = time.perf_counter() - t0
    ca1, me1 = _cpu_seconds(ca_pid), time.process_time()
    lat = [x for a in agents for x in a.latencies]
    errors = [r for r in results if isinstance(r, BaseException)]
    return {
        "agents": len(agents),
        "all_renewed_s": round(elapsed, 3),
        "certs_per_s": round((len(agents) - len(errors)) / elapsed, 1),
        "ca_p50_ms": round(_pct(lat, 0.50) * 1000, 2),
        "ca_p99_ms": round(_pct(lat, 0.99) * 1000, 2),
        "ca_max_ms": round(max(lat) * 1000, 2) if lat else None,
        "requests": len(lat),
        "retried_failures": sum(a.failures for a in agents),
        "gave_up": len(errors),
        "error_kinds": sorted({type(e).__name__ + ": " + str(e)[:120] for e in errors})[:5],
        # Where the time went: the CA's process vs the N agents' (key, CSR, verify, write).
        "ca_cpu_s": round(ca1 - ca0, 2) if ca0 is not None and ca1 is not None else None,
        "agents_cpu_s": round(me1 - me0, 2),
    }


async def run(
    n: int, baseline_rounds: int, work: Path, address: str, ca_pid: int
) -> dict[str, object]:
    ca_root = work / "state" / "cacerts" / "root-cert.pem"
    if not ca_root.exists():
        ca_root = next((work / "state").rglob("root-cert.pem"))
    issuer, _ = init_dev_issuer(work / "state")
    # Each real agent writes to its own pod's volume; N fsyncs on one shared disk would
    # measure that disk, not the CA. tmpfs (like a memory-backed emptyDir) when available.
    shm = Path("/dev/shm")
    out_root = Path(tempfile.mkdtemp(dir=shm)) if shm.is_dir() else work

    def make(i: int) -> TimedAgent:
        tok = work / f"tok{i}"
        tok.write_text(mint_token(issuer, namespace="bench", service_account=f"sa{i}"))
        return TimedAgent(
            AgentConfig(
                ca_address=address,
                ca_root=ca_root,
                token_file=tok,
                out_dir=out_root / f"out{i}",
                backoff_initial=0.2,
                backoff_max=5.0,
                max_attempts=30,
                max_retry_seconds=120,
                request_timeout=60,
            )
        )

    # Baseline: one agent, sequential renewals over a warm channel.
    solo = make(-1)
    solo.latencies = []
    await solo.fetch_once()
    solo.latencies = []
    t0 = time.perf_counter()
    for _ in range(baseline_rounds):
        await solo.fetch_once()
    seq_s = (time.perf_counter() - t0) / baseline_rounds
    baseline = {
        "sequential_fetch_ms": round(seq_s * 1000, 2),
        "sequential_ca_p50_ms": round(_pct(solo.latencies, 0.5) * 1000, 2),
        "sequential_certs_per_s": round(1 / seq_s, 1),
    }
    await solo.close()

    agents = [make(i) for i in range(n)]
    boot = await burst(agents, ca_pid)
    renew = await burst(agents, ca_pid)
    for a in agents:
        await a.close()
    if out_root != work:
        shutil.rmtree(out_root, ignore_errors=True)
    per_cert_burst = float(renew["all_renewed_s"]) / n  # type: ignore[arg-type]
    return {
        "bench": "agent",
        "cpu_count": os.cpu_count(),
        "baseline": baseline,
        "boot": boot,
        "renew": renew,
        "ratio_burst_throughput_to_sequential": round(seq_s / per_cert_burst, 2),
        "out_dir_fs": "tmpfs" if out_root != work else "disk",
        "note": "CA in its own process, agents in this one; latencies are client-observed "
        "CreateCertificate times; key type ec-p256",
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--agents", type=int, default=500)
    p.add_argument("--quick", action="store_true", help="50 agents: a smoke test")
    args = p.parse_args(argv)
    n = 50 if args.quick else args.agents
    configure_logging(level="warning", json=True)  # stderr; stdout is the JSON result
    with tempfile.TemporaryDirectory(prefix="citadel-bench-agent-") as tmp:
        work = Path(tmp)
        proc, address = start_ca(work / "state")
        try:
            result = asyncio.run(run(n, 20 if args.quick else 100, work, address, proc.pid))
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
    print(json.dumps(result, indent=2))
    return 0 if not result["renew"]["gave_up"] else 1  # type: ignore[index]


if __name__ == "__main__":
    sys.exit(main())
