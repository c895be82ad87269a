"""Render the README's performance section (markdown) from ``bench/out/results.json``.

Every bench that reports ``targets`` (``{name: {value, target, met, baseline...}}``) gets
rows in one summary table; the Check service bench also gets its full load table, and
the others their headline figures. If matplotlib happens to be installed, a latency vs
offered load plot is drawn to ``bench/out/latency.png`` (it is not a dependency).

    python bench/report.py                       # prints markdown, writes performance.md
    python bench/report.py --results other.json
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
OUT = HERE / "out"
_HEADLINE = re.compile(r"ratio|per_s|rps|p50|p99|speedup|seconds|_s$|_ms$", re.I)


def _fmt(value: object) -> str:
    if isinstance(value, bool):
        return "yes" if value else "**no**"
    if isinstance(value, float):
        if abs(value) >= 100:
            return f"{value:,.0f}"
        if abs(value) >= 10:
            return f"{value:.1f}"
        return f"{value:.3g}"
    if isinstance(value, int):
        return f"{value:,}"
    if value is None:
        return "-"
    return str(value)


def _flatten(obj: object, prefix: str = "") -> list[tuple[str, object]]:
    out: list[tuple[str, object]] = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, int | float) and not isinstance(obj, bool):
        out.append((prefix, obj))
    return out


def target_rows(name: str, result: dict) -> list[str]:
    rows = []
    for tname, t in (result.get("targets") or {}).items():
        if not isinstance(t, dict):
            rows.append(f"| {name} | {tname} | {_fmt(t)} | | | |")
            continue
        baseline = next((t[k] for k in t if k.startswith("baseline")), t.get("reference", None))
        extra = ", ".join(
            f"{k}={_fmt(v)}"
            for k, v in t.items()
            if k not in {"value", "target", "met", "note"} and not k.startswith("baseline")
        )
        label = f"{tname} ({extra})" if extra else tname
        met = _fmt(t.get("met"))
        if t.get("note"):
            met += f" ({t['note']})"
        rows.append(
            f"| {name} | {label} | {_fmt(t.get('value'))} | {_fmt(baseline)} | "
            f"{_fmt(t.get('target'))} | {met} |"
        )
    return rows


#: The Check service bench; results written before its rename call it ``authz``.
CHECK_BENCHES = ("check_service", "authz")


def check_service(benches: dict) -> tuple[str, dict] | None:
    """(name, result) of the Check service bench in ``benches``, if it measured anything."""
    for name in CHECK_BENCHES:
        result = (benches.get(name) or {}).get("result")
        if result:
            return name, result
    return None


def authz_table(result: dict) -> list[str]:
    lines = [
        "| Server | Policy rules | Offered rps | Achieved rps | p50 ms | p99 ms | Errors |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]

    def add(server: str, rules: str, runs: dict) -> None:
        for run_name, r in runs.items():
            offered = "max (closed loop)" if run_name == "max" else _fmt(r.get("offered_rps"))
            lines.append(
                f"| {server} | {rules} | {offered} | {_fmt(r.get('achieved_rps'))} | "
                f"{_fmt(r.get('p50_ms'))} | {_fmt(r.get('p99_ms'))} | {_fmt(r.get('errors'))} |"
            )

    add("trivial always-OK (asyncio)", "-", result.get("trivial", {}))
    add("trivial always-OK (uvloop)", "-", result.get("trivial_uvloop", {}))
    for rules, entry in result.get("citadel", {}).items():
        add("citadel (audit on)", _fmt(int(rules)), entry.get("runs", {}))
    pyc = result.get("pycasbin_enforce", {})
    if pyc:
        lines.append("")
        lines.append(
            "Plain pycasbin `enforce()` in process, same requests: "
            + ", ".join(f"{_fmt(int(k))} rules {_fmt(v['rate_per_s'])}/s" for k, v in pyc.items())
            + "."
        )
    return lines


def headline(result: dict, limit: int = 10) -> list[str]:
    picked = [(k, v) for k, v in _flatten(result) if _HEADLINE.search(k.rsplit(".", 1)[-1])]
    return [f"- `{k}`: {_fmt(v)}" for k, v in picked[:limit]]


def render(results: dict) -> str:
    benches: dict = results.get("benches", {})
    lines = [
        "## Performance",
        "",
        f"Measured by `make bench` on {results.get('cpu_count')} cores "
        f"(Python {results.get('python')}, {results.get('generated_at')}); every figure "
        "sits beside a baseline measured in the same run. Latency at a fixed offered load "
        "is measured open loop from each request's due time, so queueing counts.",
        "",
        "| Bench | Target | Measured | Baseline (same run) | Goal | Met |",
        "|---|---|---:|---:|---|---|",
    ]
    for name, entry in benches.items():
        result = entry.get("result") or {}
        rows = target_rows(name, result)
        if not entry.get("ok"):
            rows = rows or [f"| {name} | - | not measured: {entry.get('error')} | | | |"]
        lines += rows
    check = check_service(benches)
    if check:
        lines += ["", f"### Check service under load (`bench/{check[0]}.py`)", ""]
        lines += authz_table(check[1])
    for name, entry in benches.items():
        result = entry.get("result")
        if name in CHECK_BENCHES or not result or result.get("targets"):
            continue
        figures = headline(result)
        if figures:
            lines += ["", f"### `bench/{name}.py`", "", *figures]
    if (OUT / "latency.png").exists():
        lines += ["", "![Check p99 latency vs offered load](bench/out/latency.png)"]
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> bool:
    """p99 vs offered load per server; only if matplotlib is already installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    check = check_service(results.get("benches", {}))
    if not check:
        return False
    authz = check[1]
    series = {"trivial": authz.get("trivial", {})}
    for rules, entry in authz.get("citadel", {}).items():
        series[f"citadel, {int(rules):,} rules"] = entry.get("runs", {})
    fig, ax = plt.subplots(figsize=(7, 4))
    for label, runs in series.items():
        pts = sorted((r["offered_rps"], r["p99_ms"]) for r in runs.values() if r.get("offered_rps"))
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=label)
    ax.set_xlabel("offered load (requests/s, open loop)")
    ax.set_ylabel("p99 latency (ms)")
    ax.set_yscale("log")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return True


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--results", type=Path, default=OUT / "results.json")
    parser.add_argument("--out", type=Path, default=OUT / "performance.md")
    args = parser.parse_args(argv)
    try:
        results = json.loads(args.results.read_text())
    except (OSError, ValueError) as exc:
        print(f"cannot read {args.results}: {exc}", file=sys.stderr)
        return 1
    plot(results, args.out.parent / "latency.png")
    text = render(results)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
