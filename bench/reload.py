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

    python bench/reload.py [--quick] [--threads 2] [--seconds 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="shorter phases, fewer reloads")
    ap.add_argument("--threads", type=int, default=2, help="decision threads")
    ap.add_argument("--seconds", type=float, default=3.0, help="baseline phase length")
    ap.add_argument(
        "--no-gc-freeze", action="store_true", help="reloader without gc.freeze() after swaps"
    )
    args = ap.parse_args()
    configure_logging(level="warning")  # stdout carries only the JSON
    seconds = 1.5 if args.quick else args.seconds
    sizes = [(1000, 3 if args.quick else 6), (10000, 2 if args.quick else 3)]
    results = [
        bench_size(
            n, threads=args.threads, seconds=seconds, reloads=r, gc_freeze=not args.no_gc_freeze
        )
        for n, r in sizes
    ]
    print(
        json.dumps(
            {
                "bench": "reload",
                "cpu_count": os.cpu_count(),
                "python": platform.python_version(),
                "decision_threads": args.threads,
                "gc_freeze": not args.no_gc_freeze,
                "sizes": results,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
