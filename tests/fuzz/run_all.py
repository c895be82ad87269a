"""`make fuzz`: run every tests/fuzz/fuzz_*.py for a bounded number of inputs each.

    python3 tests/fuzz/run_all.py [--runs N] [--max-total-time S] [NAME ...]

``FUZZ_RUNS`` (default 20000) and ``FUZZ_MAX_TIME`` (seconds per harness, default 60) set
the budget. Harnesses run under atheris when installed (coverage-guided, libFuzzer flags),
else a seeded random-mutation fallback. Each runs in its own process and working
directory (``tests/fuzz/.out/NAME``, where crash inputs land); exit 1 if any found one.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=int(os.environ.get("FUZZ_RUNS", "20000")))
    ap.add_argument(
        "--max-total-time", type=int, default=int(os.environ.get("FUZZ_MAX_TIME", "60"))
    )
    ap.add_argument("names", nargs="*", help="harness names (fuzz_path ...); default all")
    args = ap.parse_args()
    harnesses = sorted(HERE.glob("fuzz_*.py"))
    if args.names:
        harnesses = [h for h in harnesses if h.stem in args.names or h.name in args.names]
    try:
        import atheris  # noqa: F401

        engine = "atheris"
    except ImportError:
        engine = "random fallback (pip install atheris for coverage-guided fuzzing)"
    print(f"fuzzing {len(harnesses)} harness(es) with {engine}, {args.runs} runs each")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    failed = []
    for h in harnesses:
        out = HERE / ".out" / h.stem
        out.mkdir(parents=True, exist_ok=True)
        t0 = time.monotonic()
        cmd = [sys.executable, str(h), f"-runs={args.runs}",
               f"-max_total_time={args.max_total_time}", "-max_len=4096", "-timeout=10",
               "-rss_limit_mb=2048"]  # fmt: skip
        res = subprocess.run(cmd, cwd=out, env=env, capture_output=True, text=True)
        took = time.monotonic() - t0
        status = "ok" if res.returncode == 0 else f"FINDING (exit {res.returncode})"
        print(f"  {h.stem:24s} {status:22s} {took:6.1f}s")
        if res.returncode != 0:
            failed.append(h.stem)
            sys.stdout.write(res.stderr[-4000:])
    if failed:
        print(f"findings in: {', '.join(failed)} (inputs in tests/fuzz/.out/<name>/crash-*)")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
