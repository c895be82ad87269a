"""``citadel authz serve --workers 1`` vs ``--workers 2``: does Check throughput scale?

Issue 7 target 3: SO_REUSEPORT worker processes sharing the port should scale Check
throughput >= 1.7x from one worker to two on two cores. Both servers run the same
1,000-rule policy with the audit log on (one file, shared by the workers), and each is
driven to its closed-loop maximum over many connections (the kernel spreads connections,
not requests, across SO_REUSEPORT sockets).

The load generator matters here: on a two-core machine a Python client eats about as much
CPU per request as the server, so it would cap the two-worker figure at the client, not
the server. The headline therefore uses ``h2load`` (nghttp2's C client, Debian package
``nghttp2-client``), which costs a small fraction of that; it sends one request (a decision
cache sees hits) and cannot read ``grpc-status``, so the audit file is counted to confirm
every request was decided. The Python client (distinct requests, gRPC statuses checked) is
run too and reported beside it. Without h2load, the bench says so and reports only the
Python figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import h2load
import loadgen

import policies

TARGET_SCALING = 1.7
RULES = 1000


def citadel_cmd() -> list[str]:
    override = os.environ.get("CITADEL_BENCH_CMD")
    return override.split() if override else [sys.executable, "-m", "citadel.cli"]


def count_records(path: Path) -> int:
    if not path.exists():
        return 0
    with open(path, "rb") as fh:
        return sum(1 for line in fh if b'"kind":"authz.decision"' in line)


def measure(workers: int, work: Path, payloads: list[bytes], args: argparse.Namespace) -> dict:
    port, admin = loadgen.free_port(), loadgen.free_port()
    target = f"127.0.0.1:{port}"
    audit = work / f"audit-w{workers}.jsonl"
    argv = [
        *citadel_cmd(), "authz", "serve",
        "--policy-dir", str(work / "policy"),
        "--listen", target,
        "--admin-listen", f"127.0.0.1:{admin}",
        "--audit-log", str(audit),
        "--workers", str(workers),
    ]  # fmt: skip
    entry: dict = {"workers": workers}
    with loadgen.ServerProcess(argv, name=f"citadel-w{workers}", log_dir=work) as server:
        try:
            loadgen.wait_for_check(target, payloads[0], timeout=120)
        except TimeoutError:
            server.check_alive()
            raise
        time.sleep(0.5 * workers)  # every worker up, not just the first to answer
        if h2load.h2load_path():
            before = count_records(audit)
            cpu0 = loadgen.group_cpu_seconds(server.pid)
            r = h2load.run_h2load(
                target,
                payloads[0],
                connections=args.connections,
                streams=args.streams,
                duration=args.duration,
                warmup=args.warmup,
            )
            r["server_cpu_s"] = round(loadgen.group_cpu_seconds(server.pid) - cpu0, 2)
            time.sleep(0.3)
            r["audit_records_written"] = count_records(audit) - before
            entry["h2load"] = r
            print(f"  workers={workers} h2load: {r['achieved_rps']} rps", file=sys.stderr)
        cpu0 = loadgen.group_cpu_seconds(server.pid)
        py = loadgen.run_load(
            loadgen.LoadSpec(
                target=target,
                payloads=payloads,
                concurrency=args.connections * args.streams,
                connections=args.connections,
                processes=args.client_processes,
                duration=args.duration,
                warmup=args.warmup,
            )
        ).as_dict()
        py["client"] = f"python grpc.aio x{args.client_processes}"
        py["server_cpu_s"] = round(loadgen.group_cpu_seconds(server.pid) - cpu0, 2)
        entry["python"] = py
        print(f"  workers={workers} python: {py['achieved_rps']} rps", file=sys.stderr)
        server.check_alive()
    entry["exit_code"] = server.proc.returncode
    return entry


def run(args: argparse.Namespace) -> dict:
    work = Path(tempfile.mkdtemp(prefix="citadel-bench-workers-"))
    pol = policies.generate(RULES)
    policies.write_policy_dir(work / "policy", pol)
    payloads = [
        loadgen.check_payload(principal="" if s == "anonymous" else s, host=d, method=a, path=o)
        for s, d, o, a in policies.requests(pol, 1000)
    ]
    out: dict = {
        "bench": "workers",
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "params": {
            "rules": RULES,
            "audit": "on, one shared file",
            "connections": args.connections,
            "in_flight": args.connections * args.streams,
            "duration_s": args.duration,
            "h2load": h2load.h2load_path() or "missing: apt-get install nghttp2-client",
        },
    }
    if not h2load.h2load_path():
        print("h2load is missing: reporting the Python client only", file=sys.stderr)
    one = measure(1, work, payloads, args)
    two = measure(2, work, payloads, args)
    out["workers_1"], out["workers_2"] = one, two
    client = "h2load" if "h2load" in one and "h2load" in two else "python"
    base, scaled = one[client]["achieved_rps"], two[client]["achieved_rps"]
    ratio = round(scaled / base, 3) if base else None
    out["ratio_python_client"] = (
        round(two["python"]["achieved_rps"] / one["python"]["achieved_rps"], 3)
        if one["python"]["achieved_rps"]
        else None
    )
    out["targets"] = {
        "throughput_scaling_1_to_2_workers": {
            "value": ratio,
            "baseline_workers_1_rps": base,
            "workers_2_rps": scaled,
            "client": client,
            "target": f">= {TARGET_SCALING}",
            "met": ratio is not None and ratio >= TARGET_SCALING,
        }
    }
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--connections", type=int, default=8)
    p.add_argument("--streams", type=int, default=4, help="in flight per connection")
    p.add_argument("--client-processes", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="short runs: a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.warmup = 1.0, 0.3
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()
