"""Hot reload under load: how long a change takes to serve, and what decisions feel meanwhile.

For generated policies of 1,000 and 10,000 rules (bench/policies.py), in one run:

* ``reload_s``: from the atomic ``..data`` symlink swap on disk (the way the kubelet
  updates a mounted ConfigMap) to the new revision serving, through the real watcher
  (watchfiles + debounce) and ``load_candidate`` (parse, validate, compile, probe);
* ``build_s``: ``load_candidate`` alone with nothing else running (the floor);
* the latency of ``state.engine.decide`` measured by concurrent decision threads, first
  with no reloads (the baseline) then while reloads run back to back; p50/p99/max and
  the ratio to the baseline. Decisions take no lock a reload holds; what they share with
  the reloader is the interpreter (the GIL), which is what the worst case shows.

Then, at the Check level (issue 7 target 6): ``citadel authz serve`` with the 10,000-rule
policy and audit on (to a file) runs as its own process; ``bench/loadgen.py`` offers 1,000
rps open loop from another process; phases alternate between no reloads (the baseline)
and the policy directory swapped the kubelet way every ``--swap-every`` seconds. Check
p50/p99/max per phase (the summary is the median over phases, and each reload phase's p99
minus the baseline phase before it: single phases swing severalfold on a shared machine),
the client's own send lag and the send-to-answer p99 without it (the swapper shares the
client's cores), the ratio, every reload's disk-to-serving time (from the server's
own ``/v1/policy`` history, whose ``at`` is the swap's wall-clock time) and the CPU each
reload took in the serving process (``cpu_s``: GIL time the event loop lost). With
``--pin auto`` (the default where there are two cores or more) the server runs on its own
core(s) and the load generator on the others (bench/cores.py); ``pinning`` says which.

    python bench/reload.py [--quick] [--threads 2] [--seconds 2] [--check-seconds 5]
    python bench/reload.py --only check --variants before,default   # experiments
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import policies
from authz.reload import Reloader, initial_state, load_candidate
from authz.state import PolicyState
from citadel.logs import configure_logging

_HERE = Path(__file__).resolve().parent

MODEL = (_HERE.parent / "policies" / "model.conf").read_text()


class ConfigMapDir:
    """Writes generations exactly as the kubelet does (see tests/authz/test_reload.py)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)
        self.n = 0

    def write(self, files: dict[str, str]) -> float:
        """Returns the perf_counter at the atomic swap."""
        data = self.root / "..data"
        old = self.root / os.readlink(data) if data.is_symlink() else None
        self.n += 1
        ts = self.root / f"..2026_01_01_00_00_00.{self.n:06d}"
        ts.mkdir()
        for name, text in files.items():
            (ts / name).write_text(text)
        tmp = self.root / "..data_tmp"
        os.symlink(ts.name, tmp)
        os.replace(tmp, data)
        swapped = time.perf_counter()
        for name in files:
            if not (self.root / name).is_symlink():
                os.symlink(f"..data/{name}", self.root / name)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
        return swapped


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    s = sorted(values)
    return s[min(len(s) - 1, int(q * len(s)))]


def summary_us(lat_ns: list[int], seconds: float) -> dict[str, float]:
    us = [x / 1000 for x in lat_ns]
    return {
        "decisions": len(us),
        "per_s": round(len(us) / seconds) if seconds else 0,
        "p50_us": round(pct(us, 0.50), 1),
        "p99_us": round(pct(us, 0.99), 1),
        "p999_us": round(pct(us, 0.999), 1),
        "max_us": round(max(us), 1) if us else float("nan"),
    }


class Load:
    """Decision threads calling ``state.engine.decide`` over a request mix."""

    def __init__(self, state: PolicyState, reqs: list[tuple[str, str, str, str]], n: int):
        self.state = state
        self.reqs = reqs
        self.n = n
        self.stop = threading.Event()
        self.samples: list[list[int]] = [[] for _ in range(n)]
        self.errors = 0

    def _run(self, idx: int) -> None:
        out = self.samples[idx]
        reqs = self.reqs
        k = idx * 7919
        clock = time.perf_counter_ns
        while not self.stop.is_set():
            t = reqs[k % len(reqs)]
            k += 1
            t0 = clock()
            try:
                self.state.engine.decide(*t)
            except Exception:
                self.errors += 1
            out.append(clock() - t0)
            if k % 64 == 0:
                time.sleep(0)  # a server thread yields between requests too

    def run_for(self, fn, *args) -> tuple[list[int], float, object]:
        self.stop.clear()
        self.samples = [[] for _ in range(self.n)]
        threads = [threading.Thread(target=self._run, args=(i,)) for i in range(self.n)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        try:
            result = fn(*args)
        finally:
            self.stop.set()
            for t in threads:
                t.join()
        elapsed = time.perf_counter() - t0
        return [x for s in self.samples for x in s], elapsed, result


def variant(policy: policies.GeneratedPolicy, k: int) -> str:
    """The policy with one more rule: a real change, same size class."""
    return policy.csv + f"p, role:r{k % 7}, *, /api/v9/reload{k}/:id, ^GET$, allow\n"


class GcPauses:
    """Longest cyclic-GC pass seen (it holds the GIL: every decision thread waits)."""

    def __init__(self) -> None:
        self.max_s = 0.0
        self._t0 = 0.0
        gc.callbacks.append(self._cb)

    def _cb(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._t0 = time.perf_counter()
        else:
            self.max_s = max(self.max_s, time.perf_counter() - self._t0)

    def take(self) -> float:
        v, self.max_s = self.max_s, 0.0
        return round(v * 1000, 1)


GC = GcPauses()


def bench_size(
    n_rules: int, *, threads: int, seconds: float, reloads: int, gc_freeze: bool
) -> dict:
    gen = policies.generate(n_rules)
    reqs = policies.requests(gen, 20000)
    tmp = Path(tempfile.mkdtemp(prefix=f"reload{n_rules}-"))
    try:
        cm = ConfigMapDir(tmp / "policy")
        cm.write({"model.conf": MODEL, "policy.csv": gen.csv})
        builds = []
        for _ in range(2):
            t0 = time.perf_counter()
            load_candidate(cm.root)
            builds.append(time.perf_counter() - t0)
        state = initial_state(cm.root)
        reloader = Reloader(
            state, cm.root, debounce=0.05, poll_interval=5.0, gc_freeze=gc_freeze
        ).start()
        time.sleep(0.3)  # the watcher's first no-op check
        for t in reqs:  # a warm engine (its decision cache) is the steady state
            state.engine.decide(*t)
        load = Load(state, reqs, threads)
        GC.take()
        base_lat, base_s, _ = load.run_for(time.sleep, seconds)
        base_gc = GC.take()

        def do_reloads() -> list[float]:
            times = []
            for k in range(1, reloads + 1):
                before = state.revision
                swapped = cm.write({"model.conf": MODEL, "policy.csv": variant(gen, k)})
                while state.revision == before:
                    time.sleep(0.001)
                times.append(time.perf_counter() - swapped)
            return times

        rel_lat, rel_s, reload_times = load.run_for(do_reloads)
        rel_gc = GC.take()
        reloader.stop()
        base = summary_us(base_lat, base_s)
        during = summary_us(rel_lat, rel_s)
        return {
            "rules": n_rules,
            "role_assignments": len(gen.assignments),
            "engine": state.engine.kind,
            "reloads": reloads,
            "reload_s": {
                "min": round(min(reload_times), 3),
                "median": round(statistics.median(reload_times), 3),
                "max": round(max(reload_times), 3),
            },
            "build_s_idle": round(min(builds), 3),
            "reloads_ok": state.reloads_ok,
            "reloads_failed": state.reloads_failed,
            "decision_errors": load.errors,
            "baseline_no_reload": base,
            "during_reloads": during,
            "max_gc_pause_ms": {"baseline": base_gc, "during_reloads": rel_gc},
            "ratio_p99": round(during["p99_us"] / base["p99_us"], 2),
            "ratio_max": round(during["max_us"] / base["max_us"], 2),
            "ratio_throughput": round(during["per_s"] / base["per_s"], 2),
        }
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# ------------------------------------------------------------------ Check level

#: Reloader settings the in-process server (``--serve``) can run with, by name, so ideas
#: are compared in one run against the same load. "cli" is the real ``citadel authz serve``;
#: "before" is the reloader without the build helper and the sliced teardown.
VARIANTS: dict[str, dict] = {
    "cli": {},
    "default": {},
    "before": {"isolate": False, "retire_slices": False, "incremental": False},
    "full": {"incremental": False},
    "unpaced": {"pace_s": None},
    "pace_1ms": {"pace_s": 0.001},
    "pace_200us": {"pace_s": 0.0002},
    "thread": {"isolate": False},
    "no_freeze": {"gc_freeze": False},
}
CHECK_RULES = 10000
CHECK_RATE = 1000.0


def serve_main(args: argparse.Namespace) -> None:
    """The server under test, wired as ``citadel authz serve`` wires it, but with its
    reloader built from a named variant's settings (what ``start_authz`` would build)."""
    import asyncio
    import signal

    from authz.server import AuthzConfig, start_authz

    configure_logging(level="info")
    knobs = VARIANTS[args.serve]
    config = AuthzConfig(
        policy_dir=Path(args.policy_dir),
        listen=args.listen,
        admin_listen=args.admin_listen,
        audit_log=args.audit_log,
    )

    async def run() -> None:
        state = initial_state(config.policy_dir)
        running = await start_authz(config, state=state)
        reloader = Reloader(
            state,
            config.policy_dir,
            debounce=config.reload_debounce_s,
            poll_interval=config.reload_poll_s,
            **knobs,
        ).start()
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await asyncio.to_thread(reloader.stop)
        await running.stop()

    asyncio.run(run())


class Swapper(threading.Thread):
    """Swaps the policy directory every ``every`` seconds until stopped; notes each time."""

    def __init__(self, cm: ConfigMapDir, gen: policies.GeneratedPolicy, every: float, k0: int):
        super().__init__(daemon=True)
        self.cm, self.gen, self.every, self.k = cm, gen, every, k0
        self.stop = threading.Event()
        self.at: list[tuple[float, str]] = []  # (wall clock, revision written)

    def run(self) -> None:
        from authz.policy import revision_of

        while not self.stop.wait(self.every):
            self.k += 1
            csv = variant(self.gen, self.k)
            self.cm.write({"model.conf": MODEL, "policy.csv": csv})
            self.at.append((time.time(), revision_of(MODEL, csv)))


def policy_history(admin: str) -> list[dict]:
    import httpx

    return list(httpx.get(f"http://{admin}/v1/policy", timeout=10).json()["history"])


def match_reloads(
    swaps: list[tuple[float, str]], history: list[dict]
) -> tuple[list[float], list[float], int]:
    """(disk-to-serving seconds, serving-process CPU seconds) of each swap the server
    served, matched by revision (the history's ``at`` is the server's wall clock), and
    how many swaps never served (a later one overtook them: the kubelet's can too)."""
    served = {h["revision"]: h for h in history if h.get("ok") and h.get("revision")}
    total, cpu, skipped = [], [], 0
    for at, revision in swaps:
        h = served.get(revision)
        if h is None:
            skipped += 1
            continue
        total.append(h["at"] - at)
        cpu.append(h.get("cpu_s", 0.0))
    return total, cpu, skipped


def check_phase(
    target: str, payloads: list[bytes], seconds: float, warmup: float, client_cores=None
) -> dict:
    import loadgen

    r = loadgen.run_load(
        loadgen.LoadSpec(
            target=target,
            payloads=payloads,
            rate=CHECK_RATE,
            concurrency=64,
            duration=seconds,
            warmup=warmup,
            cores=sorted(client_cores) if client_cores else None,
        )
    )
    keep = ("achieved_rps", "requests", "errors", "dropped", "p50_ms", "p99_ms", "max_ms")
    # The client's own lateness (the swapper shares its cores) and the latency from send
    # to answer without it: what the server did, told apart from what the client did.
    keep += ("send_lag_p99_ms", "service_p99_ms")
    return {k: r.as_dict()[k] for k in keep}


def check_variant(name: str, args: argparse.Namespace, work: Path, split=None) -> dict:
    """One server variant: baseline phases and phases with a swap every ``swap_every``
    seconds, alternating. With ``split`` the server (and the reload helper it spawns) runs
    on the server cores and the load generator on the others, as a client on another
    machine would; the swapper (the kubelet's part) stays with the client."""
    import loadgen
    from check_service import citadel_cmd, payloads_for

    gen = policies.generate(CHECK_RULES)
    cm = ConfigMapDir(work / f"policy-{name}")
    cm.write({"model.conf": MODEL, "policy.csv": gen.csv})
    payloads = payloads_for(gen, args.requests)
    port, admin_port = loadgen.free_port(), loadgen.free_port()
    target, admin = f"127.0.0.1:{port}", f"127.0.0.1:{admin_port}"
    common = ["--policy-dir", str(cm.root), "--listen", target, "--admin-listen", admin,
              "--audit-log", str(work / f"audit-{name}.jsonl")]  # fmt: skip
    if name == "cli":
        argv = [*citadel_cmd(), "authz", "serve", *common]
    else:
        argv = [sys.executable, str(Path(__file__).resolve()), "--serve", name, *common]
    phases: list[dict] = []
    server_cores, client_cores = split if split else (None, None)
    with loadgen.ServerProcess(
        argv, name=f"reload-{name}", log_dir=work, cores=server_cores
    ) as server:
        loadgen.wait_for_check(target, payloads[0], timeout=120)
        k = 0
        for i in range(args.rounds * 2):
            reloads = i % 2 == 1
            swapper = Swapper(cm, gen, args.swap_every, k) if reloads else None
            if swapper:
                swapper.start()
            phase = check_phase(target, payloads, args.check_seconds, args.warmup, client_cores)
            if swapper:
                swapper.stop.set()
                swapper.join()
                k = swapper.k
                time.sleep(1.5)  # let the last swap land before asking
                total, cpu, skipped = match_reloads(swapper.at, policy_history(admin))
                phase |= {
                    "swaps": len(swapper.at),
                    "reloads_seen": len(total),
                    "overtaken": skipped,
                    "reload_s": [round(x, 3) for x in total],
                    "reload_cpu_ms": [round(x * 1000, 1) for x in cpu],
                }
            phase["reloading"] = reloads
            phases.append(phase)
        server.check_alive()
    base = [p for p in phases if not p["reloading"]]
    during = [p for p in phases if p["reloading"]]
    reload_s = [x for p in during for x in p["reload_s"]]
    cpu_ms = [x for p in during for x in p["reload_cpu_ms"]]

    def mean(key: str, ps: list[dict]) -> float:
        """The median over phases: one disturbed phase on this shared machine (a p99
        several times its neighbours') must not decide the comparison."""
        return round(statistics.median(p[key] for p in ps), 3)

    # Phases alternate baseline, reloads, baseline, ...: each reload phase against the
    # baseline just before it, so slow drifts of the machine cancel out.
    rises = [r["p99_ms"] - b["p99_ms"] for b, r in zip(base, during, strict=False)]

    out = {
        "variant": name,
        "settings": VARIANTS[name],
        "p50_ms": {"baseline": mean("p50_ms", base), "during_reloads": mean("p50_ms", during)},
        "p99_ms": {"baseline": mean("p99_ms", base), "during_reloads": mean("p99_ms", during)},
        "service_p99_ms": {
            "baseline": mean("service_p99_ms", base),
            "during_reloads": mean("service_p99_ms", during),
        },
        "send_lag_p99_ms": {
            "baseline": mean("send_lag_p99_ms", base),
            "during_reloads": mean("send_lag_p99_ms", during),
        },
        "max_ms": {
            "baseline": max(p["max_ms"] for p in base),
            "during_reloads": max(p["max_ms"] for p in during),
        },
        "reload_s": {
            "n": len(reload_s),
            "median": round(statistics.median(reload_s), 3) if reload_s else None,
            "max": round(max(reload_s), 3) if reload_s else None,
        },
        # CPU the reloading thread took in the serving process (the GIL the loop lost).
        "reload_cpu_ms_median": round(statistics.median(cpu_ms), 1) if cpu_ms else None,
        "paired_p99_rise_ms": {
            "median": round(statistics.median(rises), 3) if rises else None,
            "each": [round(x, 3) for x in rises],
            "reload_phases_not_higher": sum(x <= 0 for x in rises),
        },
        "phases": phases,
    }
    out["ratio_p99"] = round(out["p99_ms"]["during_reloads"] / out["p99_ms"]["baseline"], 2)
    print(
        f"  {name}: p99 {out['p99_ms']['baseline']} -> {out['p99_ms']['during_reloads']} ms "
        f"(x{out['ratio_p99']}), reload {out['reload_s']}, "
        f"cpu/reload {out['reload_cpu_ms_median']} ms",
        file=sys.stderr,
    )
    return out


def check_level(args: argparse.Namespace) -> dict:
    import cores

    work = Path(tempfile.mkdtemp(prefix="citadel-bench-reload-"))
    split = cores.split_cores(args.pin)
    before = cores.affinity() if split else None
    try:
        if split:
            cores.pin_self(split[1])  # the swapper thread runs here
        results = [check_variant(v, args, work, split) for v in args.variants]
    finally:
        if before:
            cores.pin_self(before)
        shutil.rmtree(work, ignore_errors=True)
    return {
        "pinning": cores.describe(split),
        "rules": CHECK_RULES,
        "offered_rps": CHECK_RATE,
        "swap_every_s": args.swap_every,
        "phase_s": args.check_seconds,
        "rounds": args.rounds,
        "audit": "on, to a file",
        "variants": results,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter phases, fewer reloads")
    ap.add_argument("--threads", type=int, default=2, help="decision threads")
    ap.add_argument("--seconds", type=float, default=2.0, help="baseline phase length")
    ap.add_argument(
        "--no-gc-freeze", action="store_true", help="reloader without gc.freeze() after swaps"
    )
    ap.add_argument("--only", choices=("decide", "check"), help="one half of the bench")
    ap.add_argument("--variants", type=lambda s: s.split(","), default=["cli"])
    ap.add_argument(
        "--pin",
        choices=("auto", "off"),
        default="auto",
        help="Check level: server on its own core(s), load generator on the others",
    )
    ap.add_argument("--check-seconds", type=float, default=4.0, help="Check phase length")
    ap.add_argument("--rounds", type=int, default=3, help="baseline+reload phase pairs")
    ap.add_argument("--swap-every", type=float, default=1.5)
    ap.add_argument("--warmup", type=float, default=1.0)
    ap.add_argument("--requests", type=int, default=2000, help="distinct Check requests")
    # internal: run the server under test in this process (see serve_main)
    ap.add_argument("--serve", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    ap.add_argument("--policy-dir", help=argparse.SUPPRESS)
    ap.add_argument("--listen", help=argparse.SUPPRESS)
    ap.add_argument("--admin-listen", help=argparse.SUPPRESS)
    ap.add_argument("--audit-log", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.serve:
        serve_main(args)
        return
    configure_logging(level="warning")  # stdout carries only the JSON
    if args.quick:
        args.check_seconds, args.rounds = 4.0, 1
    out: dict = {
        "bench": "reload",
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
    }
    if args.only != "check":
        seconds = 1.5 if args.quick else args.seconds
        sizes = [(1000, 3 if args.quick else 4), (10000, 2 if args.quick else 3)]
        out |= {
            "decision_threads": args.threads,
            "gc_freeze": not args.no_gc_freeze,
            "sizes": [
                bench_size(
                    n,
                    threads=args.threads,
                    seconds=seconds,
                    reloads=r,
                    gc_freeze=not args.no_gc_freeze,
                )
                for n, r in sizes
            ],
        }
    if args.only != "decide":
        out["check_level"] = check_level(args)
        first = out["check_level"]["variants"][0]
        out["targets"] = {
            "reload_s_10000_rules": {
                "value": first["reload_s"]["max"],
                "median": first["reload_s"]["median"],
                "target": "<= 1",
                "met": first["reload_s"]["max"] is not None and first["reload_s"]["max"] <= 1.0,
            },
            "check_p99_ms_during_reloads": {
                "value": first["p99_ms"]["during_reloads"],
                "baseline_no_reloads": first["p99_ms"]["baseline"],
                "ratio": first["ratio_p99"],
                "paired_rise_ms": first["paired_p99_rise_ms"]["median"],
                "target": "no rise (ratio of phase medians <= 1.1, noise)",
                "met": first["ratio_p99"] <= 1.1,
            },
        }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
