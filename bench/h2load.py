"""nghttp2's ``h2load``, a C client, as a gRPC load generator for the benches (h2c).

Why a C client: the Python load generator (``loadgen.run_load``) is part of what it
measures. Its event loop is busy with answers and its timers wake on millisecond ticks
(``LoadResult.send_lag_p99_ms`` is that share of the latency), and a C client costs the
server's cores a small fraction of what a Python client does, which matters when the
question is how far the *server* scales. h2load speaks gRPC framing over h2c but sees
only HTTP statuses, not ``grpc-status`` trailers, so gRPC-level outcomes are checked
another way (the audit count, or the answers' DATA bytes).

* ``run_h2load``: the closed-loop maximum, one payload (a decision cache sees hits).
* ``run_h2load_rate``: a fixed rate, open loop. h2load's ``--rps`` timer ticks every
  10 ms at best, so one client offered more than 100 rps sends bursts; the rate is
  therefore split over many h2load processes (one connection each, under 100 rps each,
  their rates ``RATE_SPREAD`` apart so their sends drift past each other), and latency
  is reported both from when h2load sent each request (its own figure) and from the
  request's slot in its client's schedule (free of coordinated omission).

``h2load_path()`` is None when h2load is not installed (Debian ``nghttp2-client``).
"""

from __future__ import annotations

import contextlib
import itertools
import math
import re
import resource
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import cores as _cores
from loadgen import CHECK_METHOD, percentile

__all__ = [
    "H2RateResult",
    "H2RateSpec",
    "client_rates",
    "h2load_path",
    "parse_h2load_log",
    "run_h2load",
    "run_h2load_rate",
    "schedule_of",
    "summarise_h2load_rate",
]


def h2load_path() -> str | None:
    """nghttp2's ``h2load`` (Debian ``nghttp2-client``), or None when not installed."""
    return shutil.which("h2load")


def run_h2load(
    target: str,
    payload: bytes,
    *,
    connections: int = 8,
    streams: int = 4,
    duration: float = 5.0,
    warmup: float = 1.0,
    threads: int = 1,
    method: str = CHECK_METHOD,
) -> dict[str, object]:
    """Closed-loop maximum with ``h2load`` speaking gRPC framing over h2c.

    A C client costs the server's two cores a small fraction of what a Python client
    does, which matters when the question is how far the *server* scales. It sends one
    payload (so a decision cache sees hits), and it sees only HTTP statuses, not
    ``grpc-status`` trailers: cross-check gRPC-level outcomes another way (audit count).
    ``connections * streams`` requests are in flight.
    """
    exe = h2load_path()
    if exe is None:
        raise FileNotFoundError("h2load is not installed (apt-get install nghttp2-client)")
    with tempfile.TemporaryDirectory(prefix="h2load-") as tmp:
        body = Path(tmp) / "body"
        body.write_bytes(b"\x00" + len(payload).to_bytes(4, "big") + payload)
        log = Path(tmp) / "log"
        argv = [
            exe,
            f"--clients={connections}",
            f"--max-concurrent-streams={streams}",
            f"--threads={threads}",
            f"--duration={max(1, round(duration))}",
            f"--warm-up-time={max(1, round(warmup * 1000))}ms",
            f"--data={body}",
            "--header=content-type: application/grpc",
            "--header=te: trailers",
            f"--log-file={log}",
            f"http://{target}{method}",
        ]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=duration + warmup + 60)
        lat_ms: list[float] = []
        statuses: Counter[str] = Counter()
        if log.exists():
            for line in log.read_text().splitlines():
                parts = line.split("\t")
                if len(parts) == 3:
                    statuses[parts[1]] += 1
                    lat_ms.append(int(parts[2]) / 1000.0)
    lat_ms.sort()
    summary = re.search(r"finished in [\d.]+s, ([\d.]+) req/s", proc.stdout)
    counts = re.search(
        r"requests: (\d+) total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, "
        r"(\d+) errored, (\d+) timeout",
        proc.stdout,
    )
    if proc.returncode != 0 or summary is None or counts is None:
        raise RuntimeError(f"h2load failed ({proc.returncode}): {proc.stderr[-500:]}")
    succeeded, failed, errored, timeouts = (int(counts.group(i)) for i in (3, 4, 5, 6))
    non_200 = sum(v for k, v in statuses.items() if k != "200")
    return {
        "client": "h2load",
        "mode": "closed",
        "achieved_rps": float(summary.group(1)),
        "requests": succeeded,
        "errors": failed + errored + timeouts + non_200,
        "connections": connections,
        "concurrency": connections * streams,
        "duration_s": duration,
        "p50_ms": round(percentile(lat_ms, 50), 3),
        "p90_ms": round(percentile(lat_ms, 90), 3),
        "p99_ms": round(percentile(lat_ms, 99), 3),
        "max_ms": round(lat_ms[-1], 3) if lat_ms else 0.0,
    }


#: h2load's ``--rps`` timer fires at most every 10 ms (``rps_watcher.repeat =
#: max(0.01, 1 / rps)`` in nghttp2's src/h2load.cc), so one client offered more than
#: 100 rps sends bursts: 1,000 rps from one client is ten requests at once every 10 ms.
H2LOAD_TICK_S = 0.01
#: The clients' rates differ by this much from slowest to fastest (same total), so their
#: send phases drift past each other instead of freezing wherever process start-up put
#: them (start-up jitter is milliseconds, so starts cannot place them).
RATE_SPREAD = 0.01
#: Sends closer together than this count as one burst in ``H2RateResult.burst_gaps``.
BURST_GAP_US = 100


@dataclass(frozen=True)
class H2RateSpec:
    """A fixed offered rate from h2load client processes, one HTTP/2 connection each."""

    target: str
    #: One request body per client process, cycled (the client's every request sends it).
    payloads: Sequence[bytes]
    rate: float = 1000.0
    duration: float = 5.0
    warmup: float = 1.0
    #: Streams each client may have open: its in-flight cap. At under 100 rps per client
    #: the default covers a one-second stall before a send would wait on the server.
    streams: int = 100
    #: Cores the h2load processes run on (``cores.preexec``); None: any.
    cores: Sequence[int] | None = None
    method: str = CHECK_METHOD
    #: gRPC message bytes (5-byte prefix included) each payload's answer has, in the same
    #: order; when given, answers without them (a gRPC error is trailers only, no DATA)
    #: are counted as errors from h2load's received-DATA total.
    answer_bytes: Sequence[int] | None = None
    timeout: float = 30.0


@dataclass
class H2RateResult:
    client: str
    offered_rps: float
    #: Answers in the measured window per second of it.
    achieved_rps: float
    #: Requests due in the measured window (warm-up excluded) that were answered.
    requests: int
    #: Whole run, warm-up included: HTTP status not 200 (-1: stream failed), requests
    #: never logged, answers without a gRPC message.
    errors: int
    error_kinds: dict[str, int]
    clients: int
    #: Mean rate per client (they differ by ``RATE_SPREAD``).
    per_client_rps: float
    streams: int
    duration_s: float
    #: From when h2load sent the request's HEADERS (its own figure).
    p50_ms: float
    p90_ms: float
    p99_ms: float
    p999_ms: float
    max_ms: float
    #: From the request's slot in its client's schedule (coordinated-omission free: a
    #: send the client made late counts its lateness as latency).
    p50_ms_from_schedule: float
    p99_ms_from_schedule: float
    p999_ms_from_schedule: float
    #: How late h2load sent (schedule slot to HEADERS sent).
    send_lag_p50_ms: float
    send_lag_p99_ms: float
    send_lag_max_ms: float
    #: Requests due in the window over rate x duration: 1.0 means the rate was kept.
    kept_rate: float
    #: Requests h2load logged in the whole run (warm-up included).
    sent: int
    #: Most requests one client had open at once: below ``streams`` means no send ever
    #: waited for an answer (the load stayed open loop).
    max_in_flight: int
    #: First to last client's first slot: the window starts after the last one.
    start_spread_ms: float
    #: Gaps between consecutive sends in the window (all clients merged), and the share
    #: of them under BURST_GAP_US. Evenly spaced 1,000 rps: 1 ms gaps, no bursts;
    #: Poisson arrivals at 1,000 rps: p50 0.69 ms, p99 4.6 ms, 9.5 % bursts.
    gap_p50_ms: float
    gap_p99_ms: float
    burst_gaps: float
    client_cores: list[int] | None = None
    client_cpu_s: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def parse_h2load_log(text: str) -> list[tuple[int, int, int]]:
    """``--log-file`` rows as (start µs since epoch, HTTP status, µs to end of response).

    h2load writes one row per closed stream (status -1 for a failed one), ordered by end
    of response, and appends to an existing file; rows here are sorted by start.
    Malformed lines are skipped.
    """
    rows = []
    for line in text.splitlines():
        parts = line.split("\t")
        if len(parts) >= 3:
            with contextlib.suppress(ValueError):
                rows.append((int(parts[0]), int(parts[1]), int(parts[2])))
    rows.sort()
    return rows


def schedule_of(rows: Sequence[tuple[int, int, int]], period_us: float) -> float:
    """When a fixed-rate client's first request was due (µs), from its sorted sends.

    Request *k* is due at ``t0 + k * period``. h2load sends each at the first timer tick
    at or after that, except that a tick more than half a period late sends the next
    request too, early (it rounds the requests due). So ``t0`` is a low percentile (the
    1st) of ``start_k - k * period``, not its minimum: one early catch-up send would
    otherwise make every other send look late by up to half a period.
    """
    offsets = sorted(start - k * period_us for k, (start, _, _) in enumerate(rows))
    return percentile(offsets, 1)


def client_rates(rate: float) -> list[float]:
    """Per-client ``--rps`` for ``rate`` in all: each under 100 (one send per 10 ms tick at
    most), spread by ``RATE_SPREAD`` around the mean, summing to ``rate``."""
    clients = max(1, math.floor(rate * H2LOAD_TICK_S) + 1)
    mean = rate / clients
    if clients == 1:
        return [mean]
    return [mean * (1 + RATE_SPREAD * (i / (clients - 1) - 0.5)) for i in range(clients)]


def summarise_h2load_rate(
    per_client: Sequence[Sequence[tuple[int, int, int]]],
    *,
    rates: Sequence[float],
    duration: float,
    warmup: float,
    expected_per_client: Sequence[int] | None = None,
    data_bytes: Sequence[int] | None = None,
    answer_bytes: Sequence[int] | None = None,
) -> dict[str, object]:
    """Figures from each client's log rows (``parse_h2load_log``) and ``--rps``.

    The measured window starts ``warmup`` s after the last client's first slot (every
    client is running by then) and lasts ``duration`` s; a request belongs to it by its
    *due* time, so a late send cannot move a request out of the window. See
    ``H2RateResult`` for the figures.
    """
    rate = sum(rates)
    periods = [1e6 / r for r in rates]
    errors: Counter[str] = Counter()
    # A stream that failed before its HEADERS went out has no start time (0).
    unsent = [sum(1 for r in rows if r[0] <= 0) for rows in per_client]
    if any(unsent):
        errors["never_sent"] = sum(unsent)
        per_client = [[r for r in rows if r[0] > 0] for rows in per_client]
    schedules = [
        schedule_of(rows, period) if rows else None
        for rows, period in zip(per_client, periods, strict=True)
    ]
    known = [t for t in schedules if t is not None]
    if not known:
        raise RuntimeError("h2load logged no request")
    start = max(known) + warmup * 1e6
    end = start + duration * 1e6
    lat, from_sched, lag, sends = [], [], [], []
    due_in_window = 0
    for i, rows in enumerate(per_client):
        logged = len(rows) + unsent[i]
        if expected_per_client is not None and logged < expected_per_client[i]:
            errors["not_logged"] += expected_per_client[i] - logged
        t0 = schedules[i]
        if t0 is None:
            continue
        ok = 0
        for k, (sent, status, took) in enumerate(rows):
            due = t0 + k * periods[i]
            in_window = start <= due < end
            due_in_window += in_window
            if status != 200:
                errors[f"http_{status}"] += 1
                continue
            ok += 1
            if in_window:
                late = max(0.0, sent - due)  # an early catch-up send is not late
                lat.append(took / 1000.0)
                from_sched.append((late + took) / 1000.0)
                lag.append(late / 1000.0)
                sends.append(sent)
        if data_bytes is not None and answer_bytes is not None and answer_bytes[i]:
            # Every answer to one payload has the same size (decision ids are fixed
            # width), so a shortfall of whole messages is gRPC errors (trailers only).
            missing = ok - data_bytes[i] // answer_bytes[i]
            if missing > 0:
                errors["no_grpc_message"] += missing
    lat.sort()
    from_sched.sort()
    lag.sort()
    sends.sort()
    gaps = sorted(b - a for a, b in itertools.pairwise(sends))
    in_flight = 0
    for rows in per_client:
        events = sorted([(r[0], 1) for r in rows] + [(r[0] + r[2], -1) for r in rows])
        open_now = 0
        for _, step in events:
            open_now += step
            in_flight = max(in_flight, open_now)
    return {
        "offered_rps": round(rate, 3),
        "achieved_rps": round(len(lat) / duration, 1),
        "requests": len(lat),
        "errors": sum(errors.values()),
        "error_kinds": dict(errors),
        "clients": len(per_client),
        "per_client_rps": round(rate / len(per_client), 3),
        "duration_s": duration,
        "p50_ms": round(percentile(lat, 50), 3),
        "p90_ms": round(percentile(lat, 90), 3),
        "p99_ms": round(percentile(lat, 99), 3),
        "p999_ms": round(percentile(lat, 99.9), 3),
        "max_ms": round(lat[-1], 3) if lat else 0.0,
        "p50_ms_from_schedule": round(percentile(from_sched, 50), 3),
        "p99_ms_from_schedule": round(percentile(from_sched, 99), 3),
        "p999_ms_from_schedule": round(percentile(from_sched, 99.9), 3),
        "send_lag_p50_ms": round(percentile(lag, 50), 3),
        "send_lag_p99_ms": round(percentile(lag, 99), 3),
        "send_lag_max_ms": round(lag[-1], 3) if lag else 0.0,
        "kept_rate": round(due_in_window / (rate * duration), 4),
        "sent": sum(len(rows) for rows in per_client) + sum(unsent),
        "max_in_flight": in_flight,
        "start_spread_ms": round((max(known) - min(known)) / 1000.0, 3),
        "gap_p50_ms": round(percentile(gaps, 50) / 1000.0, 3),
        "gap_p99_ms": round(percentile(gaps, 99) / 1000.0, 3),
        "burst_gaps": round(sum(g < BURST_GAP_US for g in gaps) / len(gaps), 3) if gaps else 0.0,
    }


_TRAFFIC_DATA = re.compile(r"^traffic: .*?, [\d.]+[KMG]?B \((\d+)\) data", re.M)


def run_h2load_rate(spec: H2RateSpec) -> H2RateResult:
    """Offer ``spec.rate`` open loop with h2load; latency percentiles from its logs.

    h2load's ``--rps`` is open loop (requests fall due by the clock whatever the answers;
    a client only waits when all its ``-m`` streams are open, ``max_in_flight`` says if
    that happened) but its timer ticks every 10 ms at best and it times each request
    from when it *sent* it. So: one h2load process (one connection) per < 100 rps, each
    sending one request per tick, their rates a little apart so their sends interleave
    and drift past each other (arrivals then look like many independent clients', not
    like a metronome: ``gap_*``), and each process's own log gives its client's
    schedule, so latency is also reported from each request's due slot
    (``*_from_schedule``, free of coordinated omission) beside h2load's own figure.
    """
    exe = h2load_path()
    if exe is None:
        raise FileNotFoundError("h2load is not installed (apt-get install nghttp2-client)")
    if not spec.payloads:
        raise ValueError("at least one payload is needed")
    rates = client_rates(spec.rate)
    clients = len(rates)
    # Enough requests that every client covers the window even if it started late.
    counts = [math.ceil(r * (spec.warmup + spec.duration + 0.5)) + 1 for r in rates]
    payloads = [spec.payloads[i % len(spec.payloads)] for i in range(clients)]
    answer = (
        [spec.answer_bytes[i % len(spec.answer_bytes)] for i in range(clients)]
        if spec.answer_bytes
        else None
    )
    with tempfile.TemporaryDirectory(prefix="h2load-rate-") as tmp:
        argvs = []
        for i, payload in enumerate(payloads):
            body = Path(tmp) / f"body{i}"
            body.write_bytes(b"\x00" + len(payload).to_bytes(4, "big") + payload)
            argvs.append(
                [
                    exe,
                    "--clients=1",
                    "--threads=1",
                    f"--requests={counts[i]}",
                    f"--rps={rates[i]!r}",
                    f"--max-concurrent-streams={spec.streams}",
                    f"--data={body}",
                    "--header=content-type: application/grpc",
                    "--header=te: trailers",
                    f"--log-file={Path(tmp) / f'log{i}'}",
                    f"http://{spec.target}{spec.method}",
                ]
            )
        usage0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        procs: list[subprocess.Popen[str]] = []
        t0 = time.perf_counter()
        try:
            for i, argv in enumerate(argvs):
                # Roughly staggered (start-up jitter is milliseconds); the rate spread
                # does the rest. A period apart, so one slow start does not bunch the rest.
                delay = t0 + i * (clients + 1) / spec.rate - time.perf_counter()
                if delay > 0:
                    time.sleep(delay)
                procs.append(
                    subprocess.Popen(
                        argv,
                        stdout=subprocess.PIPE,
                        stderr=subprocess.PIPE,
                        text=True,
                        preexec_fn=_cores.preexec(spec.cores) if spec.cores else None,
                    )
                )
            limit = spec.warmup + spec.duration + spec.timeout
            outs = [p.communicate(timeout=limit) for p in procs]
        finally:
            for p in procs:
                if p.poll() is None:
                    p.kill()
                    p.wait()
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        failed = [
            (p.returncode, err) for p, (_, err) in zip(procs, outs, strict=True) if p.returncode
        ]
        if failed:
            raise RuntimeError(f"h2load failed ({failed[0][0]}): {failed[0][1][-500:]}")
        data = []
        for out, _ in outs:
            m = _TRAFFIC_DATA.search(out)
            data.append(int(m.group(1)) if m else 0)
        logs = [parse_h2load_log((Path(tmp) / f"log{i}").read_text()) for i in range(clients)]
    figures = summarise_h2load_rate(
        logs,
        rates=rates,
        duration=spec.duration,
        warmup=spec.warmup,
        expected_per_client=counts,
        data_bytes=data,
        answer_bytes=answer,
    )
    cpu = usage.ru_utime + usage.ru_stime - usage0.ru_utime - usage0.ru_stime
    return H2RateResult(
        client="h2load",
        streams=spec.streams,
        client_cores=sorted(spec.cores) if spec.cores else None,
        client_cpu_s=round(cpu, 3),
        **figures,  # type: ignore[arg-type]
    )
