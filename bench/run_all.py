"""Run every bench in ``bench/`` one after the other and collect their JSON (``make bench``).

A bench is any ``bench/*.py`` that is not harness (the load generator, the trivial
servicer, the policy generator, this runner, the report) and does not start with ``_``;
each prints one JSON object on stdout. They run sequentially, never side by side, since
they measure the same two cores. The whole run is kept under a time budget (ten minutes by
default): each bench gets what is left, split fairly between those still to run, and one
that overruns is stopped and recorded as such rather than stalling the rest.

Results go to ``bench/out/results.json`` (one entry per bench: ok, seconds, its JSON or the
error and the tail of its stderr), then ``bench/report.py`` renders the README table to
``bench/out/performance.md``.

    python bench/run_all.py                 # everything
    python bench/run_all.py --only check_service,workers
    python bench/run_all.py --quick         # pass --quick to benches that take it
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
HARNESS = {
    "loadgen",
    "h2load",
    "trivial_authz",
    "policies",
    "run_all",
    "report",
    "cores",
    "envoy_setup",
}
#: Order: quick, independent benches first; the long service benches last.
PREFERRED_ORDER = ("engine", "reload", "ca", "agent", "check_service", "workers", "envoy_vs_rbac")
DEFAULT_BUDGET_S = 570.0  # leaves room for start-up and the report inside ten minutes
RESERVE_PER_BENCH_S = 45.0  # kept back for each bench still to run


def discover(only: set[str] | None = None) -> list[Path]:
    found = {
        p.stem: p for p in HERE.glob("*.py") if p.stem not in HARNESS and not p.stem.startswith("_")
    }
    names = [n for n in PREFERRED_ORDER if n in found]
    names += sorted(n for n in found if n not in PREFERRED_ORDER)
    if only:
        names = [n for n in names if n in only]
    return [found[n] for n in names]


def last_json_object(text: str) -> dict | None:
    """The JSON object a bench printed (the last one, if it printed several)."""
    text = text.strip()
    try:
        value = json.loads(text)
        return value if isinstance(value, dict) else None
    except ValueError:
        pass
    starts = [i for i, line in enumerate(text.splitlines()) if line.startswith("{")]
    lines = text.splitlines()
    for i in reversed(starts):
        try:
            value = json.loads("\n".join(lines[i:]))
        except ValueError:
            continue
        if isinstance(value, dict):
            return value
    return None


def takes_quick(script: Path) -> bool:
    return '"--quick"' in script.read_text(encoding="utf-8", errors="replace")


def run_one(script: Path, *, timeout: float, quick: bool) -> dict:
    argv = [sys.executable, str(script)]
    if quick and takes_quick(script):
        argv.append("--quick")
    started = time.monotonic()
    entry: dict = {"script": f"bench/{script.name}", "argv": argv[1:], "timeout_s": round(timeout)}
    try:
        proc = subprocess.run(
            argv,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=HERE.parent,
            env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
    except subprocess.TimeoutExpired as exc:
        stderr = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else ""
        entry.update(
            ok=False,
            seconds=round(time.monotonic() - started, 1),
            error=f"timed out after {timeout:.0f} s (time budget)",
            stderr_tail=(stderr or "")[-2000:],
        )
        return entry
    entry["seconds"] = round(time.monotonic() - started, 1)
    result = last_json_object(proc.stdout)
    if proc.returncode != 0 or result is None:
        entry.update(
            ok=False,
            error=f"exit code {proc.returncode}"
            + ("" if result is not None else ", no JSON object on stdout"),
            stderr_tail=proc.stderr[-2000:],
        )
        if result is not None:
            entry["result"] = result
        return entry
    entry.update(ok=True, result=result)
    return entry


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help="comma-separated bench names (file stems)")
    parser.add_argument("--quick", action="store_true", help="pass --quick where supported")
    parser.add_argument("--budget", type=float, default=DEFAULT_BUDGET_S, help="seconds")
    parser.add_argument("--out", type=Path, default=OUT / "results.json")
    args = parser.parse_args(argv)

    only = set(args.only.split(",")) if args.only else None
    scripts = discover(only)
    if not scripts:
        print("no benches found", file=sys.stderr)
        return 1
    deadline = time.monotonic() + args.budget
    results: dict = {
        "generated_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "budget_s": args.budget,
        "benches": {},
    }
    started = time.monotonic()
    for i, script in enumerate(scripts):
        remaining = deadline - time.monotonic()
        if remaining < 5:
            results["benches"][script.stem] = {"ok": False, "error": "skipped: budget spent"}
            continue
        # Keep a floor of time for each bench still to come; any slack rolls forward.
        after = len(scripts) - i - 1
        timeout = min(remaining, max(60.0, remaining - RESERVE_PER_BENCH_S * after))
        print(f"[run_all] {script.name} (up to {timeout:.0f} s)", file=sys.stderr, flush=True)
        load_before = os.getloadavg()[0]
        entry = run_one(script, timeout=timeout, quick=args.quick)
        # Other work on the machine skews every figure: say how busy it was.
        entry["loadavg_1m_before_after"] = [round(load_before, 2), round(os.getloadavg()[0], 2)]
        status = "ok" if entry["ok"] else f"FAILED: {entry.get('error')}"
        print(f"[run_all] {script.name}: {status} in {entry.get('seconds')} s", file=sys.stderr)
        results["benches"][script.stem] = entry
    results["total_s"] = round(time.monotonic() - started, 1)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"[run_all] wrote {args.out} in {results['total_s']} s", file=sys.stderr)

    report = subprocess.run(
        [sys.executable, str(HERE / "report.py"), "--results", str(args.out)],
        capture_output=True,
        text=True,
    )
    sys.stdout.write(report.stdout)
    if report.returncode != 0:
        sys.stderr.write(report.stderr[-2000:])
    failed = [n for n, e in results["benches"].items() if not e.get("ok")]
    if failed:
        print(f"[run_all] failed or skipped: {', '.join(failed)}", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
