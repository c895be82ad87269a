"""A gRPC load generator for ext_authz Check (or any unary method), for the benches.

Two modes:

* **open loop** (``rate=...``): request *i* is due at ``t0 + i / rate`` whatever happened
  to earlier ones, and its latency is measured from that due time, not from when a free
  slot finally sent it. A server that stalls therefore shows its queueing in the latency
  figures instead of silently slowing the generator down ("coordinated omission").
  ``concurrency`` caps requests in flight; when the cap is reached, due requests wait (and
  that wait counts). Requests still unsent two seconds after the end are counted as
  ``dropped``.
* **closed loop** (``rate=None``): ``concurrency`` workers send back to back; this finds
  the maximum throughput at that many requests in flight.

The client runs in its own process(es) (``multiprocessing`` spawn), never in the process
under test, so the two never share a GIL; several client processes split the rate, the
in-flight cap and the connections between them and start together. Requests are
pre-serialised bytes sent with no serializer and responses are read as bytes, so the
client spends as little CPU as a Python client can. Each of ``connections`` channels is
its own TCP connection (a local subchannel pool), which is what spreads load across
``SO_REUSEPORT`` server processes.

``LoadSpec(cores=...)`` pins the client process(es) to those cores before grpc starts a
thread, and ``ServerProcess(cores=...)`` / ``ServerProcess.pin()`` keep the server on
others (``bench/cores.py``: on a small machine a client floating over the server's
cores makes the server's tail latency mostly the client's). Every result says which cores
the client had and how busy it was (``client_cpu_util``: CPU seconds per wall second).

The same two modes from a C client (nghttp2's ``h2load``) are in ``bench/h2load.py``.

CLI::

    python bench/loadgen.py --target 127.0.0.1:9191 --rate 1000 --duration 5
    python bench/loadgen.py --target 127.0.0.1:9191 --concurrency 32   # closed loop
    python bench/loadgen.py --target 127.0.0.1:9191 --rate 1000 --cores 1  # client on core 1
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from array import array
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cores as _cores

__all__ = [
    "CHECK_METHOD",
    "LoadResult",
    "LoadSpec",
    "ServerProcess",
    "check_payload",
    "free_port",
    "group_cpu_seconds",
    "group_pids",
    "machine_busy_seconds",
    "own_cpu_seconds",
    "percentile",
    "run_load",
    "wait_for_check",
    "wait_quiet",
]

CHECK_METHOD = "/envoy.service.auth.v3.Authorization/Check"
#: Requests still unsent this long after the end of an open-loop run are dropped.
DRAIN_GRACE_S = 2.0


@dataclass(frozen=True)
class LoadSpec:
    target: str
    payloads: Sequence[bytes]
    #: Offered requests per second (open loop); None means closed loop.
    rate: float | None = None
    concurrency: int = 16
    duration: float = 5.0
    warmup: float = 1.0
    connections: int = 1
    processes: int = 1
    method: str = CHECK_METHOD
    timeout: float = 5.0
    connect_timeout: float = 10.0
    #: Parse each response as a CheckResponse and count allowed / denied.
    classify: bool = True
    #: Cores the client process(es) are pinned to (``cores.split_cores()``); None: any.
    cores: Sequence[int] | None = None
    #: The client's event loop: ``asyncio`` or ``uvloop`` (less CPU per call).
    event_loop: str = "asyncio"


@dataclass
class LoadResult:
    mode: str
    offered_rps: float | None
    achieved_rps: float
    requests: int
    errors: int
    dropped: int
    concurrency: int
    connections: int
    processes: int
    duration_s: float
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    mean_ms: float
    #: Time from actually sending to the answer (excludes waiting for a free slot).
    service_p99_ms: float
    allowed: int = 0
    denied: int = 0
    error_kinds: dict[str, int] = field(default_factory=dict)
    #: The cores the client process(es) ran on, read back from the kernel (None: not pinned).
    client_cores: list[int] | None = None
    #: CPU seconds the client process(es) used from the start barrier to the end, and
    #: that divided by the wall time: near the number of client cores means the client,
    #: not the server, was the limit (a closed-loop maximum is then the client's).
    client_cpu_s: float = 0.0
    client_cpu_util: float = 0.0
    #: How late the client sent (due time to send, p99): the generator's own share of
    #: the latency (its timers wake on millisecond ticks, its loop is busy with answers).
    send_lag_p99_ms: float = 0.0

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


def check_payload(
    *,
    principal: str,
    host: str,
    method: str,
    path: str,
    headers: dict[str, str] | None = None,
) -> bytes:
    """A serialised ``CheckRequest`` shaped like the ones Envoy's HTTP ext_authz sends."""
    from envoy.service.auth.v3 import external_auth_pb2

    req = external_auth_pb2.CheckRequest()
    attrs = req.attributes
    attrs.source.principal = principal
    attrs.source.address.socket_address.address = "127.0.0.1"
    attrs.source.address.socket_address.port_value = 40000
    http = attrs.request.http
    http.id = "1"
    http.method = method
    http.host = host
    http.path = path
    http.scheme = "http"
    http.protocol = "HTTP/1.1"
    base = {
        ":authority": host,
        ":method": method,
        ":path": path,
        "user-agent": "citadel-bench",
        "x-request-id": "bench-0000",
    }
    base.update(headers or {})
    for k, v in base.items():
        http.headers[k] = v
    return req.SerializeToString()


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an ascending sequence (0 when empty)."""
    if not sorted_values:
        return 0.0
    rank = max(1, math.ceil(q / 100.0 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


# ------------------------------------------------------------------ the client process


async def _client(spec: dict, barrier) -> dict:
    import grpc

    response_cls = None
    if spec["classify"]:
        from envoy.service.auth.v3 import external_auth_pb2

        response_cls = external_auth_pb2.CheckResponse

    payloads: list[bytes] = spec["payloads"]
    n_payloads = len(payloads)
    options = [("grpc.use_local_subchannel_pool", 1), ("grpc.enable_retries", 0)]
    channels = [
        grpc.aio.insecure_channel(spec["target"], options=[*options, ("bench.channel", i)])
        for i in range(spec["connections"])
    ]
    calls = [ch.unary_unary(spec["method"]) for ch in channels]
    timeout = spec["timeout"]
    try:
        for ch in channels:
            await asyncio.wait_for(ch.channel_ready(), timeout=spec["connect_timeout"])
    except TimeoutError:
        barrier.abort()
        raise ConnectionError(f"cannot connect to {spec['target']}") from None

    rate: float | None = spec["rate"]
    concurrency: int = spec["concurrency"]
    latencies = array("d")
    service = array("d")
    errors: Counter[str] = Counter()
    outcome = Counter()
    counters = {"next": 0, "dropped": 0}
    clock = time.perf_counter

    # Every process is connected: start together.
    await asyncio.get_running_loop().run_in_executor(None, barrier.wait, 30)
    t0 = clock()
    cpu0 = time.process_time()
    measure_from = t0 + spec["warmup"]
    t_end = measure_from + spec["duration"]

    async def one(call, payload: bytes, due: float) -> None:
        sent = clock()
        try:
            raw = await call(payload, timeout=timeout)
        except grpc.aio.AioRpcError as exc:
            if due >= measure_from:
                errors[exc.code().name] += 1
            return
        except Exception as exc:  # a generator must report, never die
            if due >= measure_from:
                errors[type(exc).__name__] += 1
            return
        done = clock()
        if due >= measure_from:
            latencies.append(done - due)
            service.append(done - sent)
            if response_cls is not None:
                code = response_cls.FromString(raw).status.code
                outcome["allowed" if code == 0 else "denied"] += 1

    async def open_worker(w: int) -> None:
        call = calls[w % len(calls)]
        interval = 1.0 / rate
        while True:
            i = counters["next"]
            counters["next"] = i + 1
            due = t0 + i * interval
            if due >= t_end:
                return
            now = clock()
            if now > t_end + DRAIN_GRACE_S:
                counters["dropped"] += 1
                continue
            if due > now:
                await asyncio.sleep(due - now)
            await one(call, payloads[i % n_payloads], due)

    async def closed_worker(w: int) -> None:
        call = calls[w % len(calls)]
        i = w
        while True:
            due = clock()
            if due >= t_end:
                return
            await one(call, payloads[i % n_payloads], due)
            i += concurrency

    worker = open_worker if rate else closed_worker
    await asyncio.gather(*(worker(w) for w in range(concurrency)))
    elapsed = clock() - measure_from
    cpu = time.process_time() - cpu0
    wall = clock() - t0
    for ch in channels:
        await ch.close()
    return {
        "cores": sorted(os.sched_getaffinity(0)) if spec["cores"] else None,
        "cpu_s": cpu,
        "wall_s": wall,
        "latencies": latencies.tobytes(),
        "service": service.tobytes(),
        "errors": dict(errors),
        "outcome": dict(outcome),
        "dropped": counters["dropped"],
        "elapsed": elapsed,
    }


def _client_main(spec: dict, barrier, results) -> None:
    try:
        if spec.get("cores"):
            # Before grpc starts its threads, so they all inherit the mask.
            os.sched_setaffinity(0, spec["cores"])
        if spec.get("event_loop") == "uvloop":
            import uvloop

            results.put(uvloop.run(_client(spec, barrier)))
        else:
            results.put(asyncio.run(_client(spec, barrier)))
    except BaseException as exc:
        with contextlib.suppress(Exception):
            barrier.abort()
        results.put({"failure": f"{type(exc).__name__}: {exc}"})


def _split(total: int, parts: int, index: int) -> int:
    return total // parts + (1 if index < total % parts else 0)


def run_load(spec: LoadSpec) -> LoadResult:
    """Run one load and return its figures; the client runs in separate process(es)."""
    procs = max(1, spec.processes)
    if not spec.payloads:
        raise ValueError("at least one payload is needed")
    if spec.concurrency < procs or spec.connections < procs:
        raise ValueError("need at least one in-flight slot and one connection per process")
    ctx = multiprocessing.get_context("spawn")
    child_specs = []
    for p in range(procs):
        child_specs.append(
            {
                "target": spec.target,
                "payloads": list(spec.payloads[p::procs]) or list(spec.payloads),
                "rate": spec.rate / procs if spec.rate else None,
                "concurrency": _split(spec.concurrency, procs, p),
                "connections": _split(spec.connections, procs, p),
                "duration": spec.duration,
                "warmup": spec.warmup,
                "method": spec.method,
                "timeout": spec.timeout,
                "classify": spec.classify,
                "connect_timeout": spec.connect_timeout,
                "cores": sorted(spec.cores) if spec.cores else None,
                "event_loop": spec.event_loop,
            }
        )
    barrier = ctx.Barrier(procs)
    results = ctx.Queue()
    children = [
        ctx.Process(target=_client_main, args=(cs, barrier, results), daemon=True)
        for cs in child_specs
    ]
    for child in children:
        child.start()
    limit = spec.connect_timeout + spec.warmup + spec.duration + spec.timeout + 60
    outs = [results.get(timeout=limit) for _ in children]
    for child in children:
        child.join(10)
    failures = sorted({o["failure"] for o in outs if "failure" in o})
    if failures:
        raise ConnectionError("; ".join(failures))

    lat = array("d")
    svc = array("d")
    errors: Counter[str] = Counter()
    outcome: Counter[str] = Counter()
    dropped = 0
    elapsed = 0.0
    cpu_s = 0.0
    wall_s = 0.0
    client_cores: set[int] = set()
    for out in outs:
        client_cores.update(out["cores"] or ())
        cpu_s += out["cpu_s"]
        wall_s = max(wall_s, out["wall_s"])
        lat.frombytes(out["latencies"])
        svc.frombytes(out["service"])
        errors.update(out["errors"])
        outcome.update(out["outcome"])
        dropped += out["dropped"]
        elapsed = max(elapsed, out["elapsed"])
    lag_ms = sorted((a - b) * 1000.0 for a, b in zip(lat, svc, strict=True))
    lat_ms = sorted(v * 1000.0 for v in lat)
    svc_ms = sorted(v * 1000.0 for v in svc)
    n = len(lat_ms)
    n_err = sum(errors.values())
    return LoadResult(
        mode="open" if spec.rate else "closed",
        offered_rps=spec.rate,
        achieved_rps=round(n / elapsed, 1) if elapsed > 0 else 0.0,
        requests=n,
        errors=n_err,
        dropped=dropped,
        concurrency=spec.concurrency,
        connections=spec.connections,
        processes=procs,
        duration_s=round(elapsed, 3),
        p50_ms=round(percentile(lat_ms, 50), 3),
        p90_ms=round(percentile(lat_ms, 90), 3),
        p99_ms=round(percentile(lat_ms, 99), 3),
        max_ms=round(lat_ms[-1], 3) if lat_ms else 0.0,
        mean_ms=round(sum(lat_ms) / n, 3) if n else 0.0,
        service_p99_ms=round(percentile(svc_ms, 99), 3),
        allowed=outcome.get("allowed", 0),
        denied=outcome.get("denied", 0),
        error_kinds=dict(errors),
        client_cores=sorted(client_cores) if spec.cores else None,
        client_cpu_s=round(cpu_s, 3),
        client_cpu_util=round(cpu_s / wall_s, 3) if wall_s > 0 else 0.0,
        send_lag_p99_ms=round(percentile(lag_ms, 99), 3),
    )


# ------------------------------------------------------------------ servers under test


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _group_stats(pgid: int):
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid:  # fields[2] is pgrp (field 5 of stat)
            yield int(entry.name), fields


def group_pids(pgid: int) -> list[int]:
    """Every live process in a process group (a server and its workers)."""
    return [pid for pid, _ in _group_stats(pgid)]


def group_cpu_seconds(pgid: int) -> float:
    """CPU seconds (user + system) used so far by every live process in a process group."""
    tick = os.sysconf("SC_CLK_TCK")
    total = sum(int(f[11]) + int(f[12]) for _, f in _group_stats(pgid))
    return total / tick


def machine_busy_seconds() -> float:
    """CPU seconds every core of the machine has been busy so far (``/proc/stat``).

    Minus what a bench's own processes used over the same span, this is other people's
    work on the box: a trial it disturbed is not evidence about the server.
    """
    with open("/proc/stat") as fh:
        f = [int(x) for x in fh.readline().split()[1:]]
    return (sum(f[:8]) - f[3] - f[4]) / os.sysconf("SC_CLK_TCK")  # minus idle, iowait


def own_cpu_seconds() -> float:
    """CPU seconds of this process and its reaped children (the load generators it ran)."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def wait_quiet(budget: float, *, threshold: float = 0.15, window: float = 0.4) -> float:
    """Wait at most ``budget`` s until the whole machine is busy less than ``threshold``
    cores (the servers under test idle between runs, so busy cores are someone else's)."""
    waited = 0.0
    while waited < budget:
        busy0 = machine_busy_seconds()
        time.sleep(window)
        waited += window
        if (machine_busy_seconds() - busy0) / window < threshold:
            break
    return round(waited, 2)


def wait_for_check(target: str, payload: bytes, *, timeout: float = 30.0) -> None:
    """Block until one Check on ``target`` answers (any CheckResponse counts)."""
    import grpc

    deadline = time.monotonic() + timeout
    last: Exception | None = None
    while time.monotonic() < deadline:
        with grpc.insecure_channel(target) as ch:
            try:
                ch.unary_unary(CHECK_METHOD)(payload, timeout=2)
                return
            except grpc.RpcError as exc:
                last = exc
        time.sleep(0.1)
    raise TimeoutError(f"no Check answered on {target} within {timeout:.0f} s: {last}")


class ServerProcess:
    """A server under test in its own process group; stopped with SIGTERM, then SIGKILL."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        name: str,
        log_dir: str | Path,
        env: dict[str, str] | None = None,
        cores: Sequence[int] | None = None,
    ) -> None:
        self.name = name
        #: The cores the server was started on (None: any); see ``pin()``.
        self.cores = sorted(cores) if cores else None
        self.log_path = Path(log_dir) / f"{name}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            list(argv),
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            env={**os.environ, **(env or {})},
            preexec_fn=_cores.preexec(cores) if cores else None,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def pin(self, cores: Sequence[int] | None) -> None:
        """Move every thread of every process in the server's group to ``cores``.

        None means every core this bench may use (unpinned). Worker processes forked
        later inherit the mask of their parent.
        """
        mask = sorted(cores) if cores else sorted(os.sched_getaffinity(0))
        for pid in group_pids(self.proc.pid):
            with contextlib.suppress(ProcessLookupError):
                _cores.pin(pid, mask)
        self.cores = sorted(cores) if cores else None

    def log_tail(self, n: int = 20) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        return ""

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}"
            )

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, 9)
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


# ------------------------------------------------------------------ CLI


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="gRPC Check load generator (JSON out)")
    parser.add_argument("--target", required=True)
    parser.add_argument("--rate", type=float, default=None, help="open loop rps; omit = closed")
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--connections", type=int, default=1)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--duration", type=float, default=5.0)
    parser.add_argument("--warmup", type=float, default=1.0)
    parser.add_argument("--principal", default="spiffe://cluster.local/ns/shop/sa/frontend")
    parser.add_argument("--host", default="orders.shop.svc.cluster.local")
    parser.add_argument("--method", default="GET")
    parser.add_argument("--path", default="/api/orders/{i}", help="{i} cycles 0..999")
    parser.add_argument("--event-loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument(
        "--cores",
        type=lambda s: [int(x) for x in s.split(",")],
        default=None,
        help="pin the client process(es) to these cores, e.g. 1 or 2,3 (Linux)",
    )
    args = parser.parse_args(argv)
    payloads = [
        check_payload(
            principal=args.principal,
            host=args.host,
            method=args.method,
            path=args.path.format(i=i),
        )
        for i in range(1000 if "{i}" in args.path else 1)
    ]
    result = run_load(
        LoadSpec(
            target=args.target,
            payloads=payloads,
            rate=args.rate,
            concurrency=args.concurrency,
            connections=args.connections,
            processes=args.processes,
            duration=args.duration,
            warmup=args.warmup,
            cores=args.cores,
            event_loop=args.event_loop,
        )
    )
    json.dump({"cpu_count": os.cpu_count(), **result.as_dict()}, sys.stdout, indent=2)
    print()


if __name__ == "__main__":
    main()
