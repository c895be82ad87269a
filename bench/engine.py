"""Decision engine, in process (issue 7, target 1).

Prints JSON: compiled-engine decisions/s at 10 and 10,000 rules on cache misses (every
request a distinct path) and on cache hits, the build time of a 10,000-rule policy, and
pycasbin's own ``Enforcer.enforce`` at the same sizes in the same run (time-boxed), with
the ratios and ``os.cpu_count()``.

    python bench/engine.py [--requests 20000] [--rounds 7] [--pycasbin-seconds 3] [--quick]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import casbin

from authz.engine import build_engine
from authz.policy import Policy
from bench.policies import generate, requests, write_policy_dir

MODEL = (Path(__file__).resolve().parents[1] / "policies" / "model.conf").read_text()
_ID = re.compile(r"/x(\d+)")


def distinct_requests(pol, n: int) -> list[tuple[str, str, str, str]]:  # type: ignore[no-untyped-def]
    """``n`` distinct tuples with the generator's allow/deny mix: 2,000 drawn by
    ``bench.policies.requests`` (slow to draw), then copies whose path ids differ, so
    each one is still a cache miss that matches the same rule as its original."""
    base = requests(pol, min(n, 2000), seed=1)
    out = []
    for k in range(-(-n // len(base))):
        for sub, dom, obj, act in base:
            out.append((sub, dom, _ID.sub(lambda m, k=k: f"/x{m.group(1)}v{k}", obj), act))
    out = out[:n]
    assert len(set(out)) == len(out)
    return out


def _timed(fn, reqs) -> tuple[float, float]:  # type: ignore[no-untyped-def]
    """(wall, cpu) decisions/s. CPU time leaves out time the process sat descheduled,
    which on a shared 2-core runner is most of the noise."""
    w0, c0 = time.perf_counter(), time.process_time()
    for r in reqs:
        fn(*r)
    wall, cpu = time.perf_counter() - w0, time.process_time() - c0
    return len(reqs) / wall, len(reqs) / max(cpu, 1e-9)


def _summary(rates: list[float]) -> dict[str, float]:
    return {"best": round(max(rates)), "median": round(statistics.median(rates))}


def compiled_figures(sizes: tuple[int, ...], n_requests: int, rounds: int) -> dict[str, dict]:
    """Rounds interleave the sizes so both see the same machine load; every round uses a
    fresh engine and an unseen slice of distinct requests, so each decision is a miss.
    Each fresh engine is frozen out of the cyclic GC before it is timed, as the server
    freezes every engine it loads: otherwise a full collection scanning the 10,000-rule
    engine lands inside some rounds and not others (medians swung ±30% between runs)."""
    setups = {}
    for n in sizes:
        pol = generate(n, seed=0)
        t0 = time.perf_counter()
        policy = Policy.from_texts(MODEL, pol.csv)
        parse_s = time.perf_counter() - t0
        builds, build_cpu = [], []
        for _ in range(3):
            b0, c0 = time.perf_counter(), time.process_time()
            engine = build_engine(policy)
            builds.append(time.perf_counter() - b0)
            build_cpu.append(time.process_time() - c0)
        assert engine.kind == "compiled"
        reqs = distinct_requests(pol, n_requests * rounds)
        setups[n] = (pol, policy, reqs, parse_s, builds, build_cpu)

    wall: dict[int, list[float]] = {n: [] for n in sizes}
    cpu: dict[int, list[float]] = {n: [] for n in sizes}
    for k in range(rounds):
        for n in sizes:
            _, policy, reqs, _, _, _ = setups[n]
            fresh = build_engine(policy)
            gc.collect()
            gc.freeze()  # as the server does after every load (authz/server.py, reload.py)
            w, c = _timed(fresh.decide, reqs[k * n_requests : (k + 1) * n_requests])
            del fresh
            gc.unfreeze()
            wall[n].append(w)
            cpu[n].append(c)

    out: dict[str, dict] = {}
    if len(sizes) == 2:
        # Each round's larger-policy rate over the smaller one's, measured back to back:
        # this machine's speed drifts ±30% over seconds, and a pair shares the drift.
        small, large = sorted(sizes)
        pairs = [b / a for a, b in zip(cpu[small], cpu[large], strict=True)]
        out["paired"] = {"ratio_median": round(statistics.median(pairs), 3),
                         "ratios": [round(r, 3) for r in pairs]}  # fmt: skip
    for n in sizes:
        pol, policy, reqs, parse_s, builds, build_cpu = setups[n]
        engine = build_engine(policy)
        hot = reqs[:1000]
        for r in hot:
            engine.decide(*r)
        hit_cpu = max(_timed(engine.decide, hot * 50)[1] for _ in range(3))
        sample = reqs[:2000]
        out[str(n)] = {
            "rules": n,
            "role_assignments": len(pol.assignments),
            "engine": engine.kind,
            "parse_policy_s": round(parse_s, 4),
            "build_s": round(min(builds), 4),
            "build_s_median": round(statistics.median(builds), 4),
            "build_cpu_s": round(min(build_cpu), 4),
            "miss_per_s_wall": _summary(wall[n]),
            "miss_per_s_cpu": _summary(cpu[n]),
            "miss_us_per_decision_cpu": round(1e6 / statistics.median(cpu[n]), 2),
            "hit_per_s_cpu": round(hit_cpu),
            "allowed_fraction_sample": round(
                sum(engine.decide(*r).allowed for r in sample) / len(sample), 3
            ),
        }
    return out


def pycasbin_figures(n_rules: int, seconds: float) -> dict[str, float | int]:
    pol = generate(n_rules, seed=0)
    with tempfile.TemporaryDirectory() as d:
        write_policy_dir(d, pol)
        t0 = time.perf_counter()
        enforcer = casbin.Enforcer(f"{d}/model.conf", f"{d}/policy.csv")
        load_s = time.perf_counter() - t0
    reqs = requests(pol, 500, seed=1)
    done = 0
    t0 = time.perf_counter()
    deadline = t0 + seconds
    while time.perf_counter() < deadline:  # pycasbin has no cache: repeats cost the same
        enforcer.enforce(*reqs[done % len(reqs)])
        done += 1
    elapsed = time.perf_counter() - t0
    return {
        "rules": n_rules,
        "load_s": round(load_s, 3),
        "decisions": done,
        "decisions_per_s": round(done / elapsed, 1),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=20_000, help="per round and size")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--pycasbin-seconds", type=float, default=3.0)
    parser.add_argument("--quick", action="store_true", help="3 rounds, 1.5 s of pycasbin")
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.pycasbin_seconds = 3, 1.5

    compiled = compiled_figures((10, 10_000), args.requests, args.rounds)
    paired = compiled.pop("paired")
    small, large = compiled["10"], compiled["10000"]
    py_small = pycasbin_figures(10, args.pycasbin_seconds)
    py_large = pycasbin_figures(10_000, args.pycasbin_seconds)
    target = 100_000
    large_cpu, small_cpu = large["miss_per_s_cpu"]["median"], small["miss_per_s_cpu"]["median"]
    out = {
        "bench": "engine",
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
        "compiled": compiled,
        "pycasbin_enforce": {"10": py_small, "10000": py_large},
        "ratios": {
            "compiled_miss_10k_over_10_cpu": round(large_cpu / small_cpu, 3),
            "compiled_miss_10k_over_10_cpu_paired": paired["ratio_median"],
            "paired_round_ratios": paired["ratios"],
            "compiled_miss_over_pycasbin_10": round(small_cpu / py_small["decisions_per_s"], 1),
            "compiled_miss_over_pycasbin_10k": round(large_cpu / py_large["decisions_per_s"], 1),
            "compiled_hit_over_miss_10k": round(large["hit_per_s_cpu"] / large_cpu, 2),
        },
        "targets": {
            "miss_10k_at_least_per_s": target,
            "miss_10k_met_cpu_median": large_cpu >= target,
            "miss_10k_met_wall_best": large["miss_per_s_wall"]["best"] >= target,
            # Judged on the median of per-round ratios (each round measures both sizes
            # back to back); the ratio of the two medians is in ``ratios`` beside it.
            "within_2x_of_10_rules": paired["ratio_median"] >= 0.5,
            "build_10k_under_s": 1.0,
            "build_10k_met_wall": large["build_s"] < 1.0,
            "build_10k_met_cpu": large["build_cpu_s"] < 1.0,
        },
    }
    print(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
