"""The load generator counts what it sends, against the trivial servicer over real gRPC."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import cores
import loadgen
import pytest


def test_open_loop_sends_exactly_the_offered_requests(trivial) -> None:
    target, payload = trivial
    result = loadgen.run_load(
        loadgen.LoadSpec(target=target, payloads=[payload], rate=200, duration=1.0, warmup=0.2)
    )
    assert result.mode == "open"
    assert result.errors == 0 and result.dropped == 0
    assert result.requests == 200  # due times inside the 1 s window, none lost
    assert result.allowed == 200 and result.denied == 0
    assert 0 < result.p50_ms <= result.p99_ms <= result.max_ms


def test_closed_loop_across_processes_merges_counts(trivial) -> None:
    target, payload = trivial
    result = loadgen.run_load(
        loadgen.LoadSpec(
            target=target,
            payloads=[payload],
            concurrency=4,
            connections=2,
            processes=2,
            duration=0.5,
            warmup=0.1,
        )
    )
    assert result.mode == "closed" and result.processes == 2
    assert result.errors == 0
    assert result.requests > 50
    assert result.allowed == result.requests


def test_a_dead_target_fails_fast_with_a_clear_error() -> None:
    port = loadgen.free_port()
    payload = loadgen.check_payload(principal="", host="h", method="GET", path="/x")
    with pytest.raises(ConnectionError, match="cannot connect"):
        loadgen.run_load(
            loadgen.LoadSpec(
                target=f"127.0.0.1:{port}",
                payloads=[payload],
                rate=10,
                duration=0.2,
                connect_timeout=0.5,
            )
        )


def test_percentile_is_nearest_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert loadgen.percentile(values, 50) == 50.0
    assert loadgen.percentile(values, 99) == 99.0
    assert loadgen.percentile(values, 100) == 100.0
    assert loadgen.percentile([], 99) == 0.0


@pytest.mark.skipif(not cores.can_pin(), reason="no sched_setaffinity here")
def test_pinned_server_and_client_stay_on_their_cores(tmp_path: Path) -> None:
    available = sorted(os.sched_getaffinity(0))
    server_cores, client_cores = [available[0]], [available[-1]]
    target = f"127.0.0.1:{loadgen.free_port()}"
    payload = loadgen.check_payload(principal="", host="h", method="GET", path="/x")
    trivial = Path(loadgen.__file__).with_name("trivial_authz.py")
    with loadgen.ServerProcess(
        [sys.executable, str(trivial), "--listen", target],
        name="trivial-pinned",
        log_dir=tmp_path,
        cores=server_cores,
    ) as server:
        loadgen.wait_for_check(target, payload, timeout=20)
        # Started pinned: every thread grpc started inherited the mask.
        tids = os.listdir(f"/proc/{server.pid}/task")
        assert len(tids) > 1
        assert {t: sorted(os.sched_getaffinity(int(t))) for t in tids} == dict.fromkeys(
            tids, server_cores
        )
        result = loadgen.run_load(
            loadgen.LoadSpec(
                target=target,
                payloads=[payload],
                rate=100,
                duration=0.3,
                warmup=0.1,
                cores=client_cores,
                event_loop="uvloop" if importlib.util.find_spec("uvloop") else "asyncio",
            )
        )
        assert result.errors == 0 and result.requests == 30
        assert result.client_cores == client_cores  # as read back in the client process
        assert result.client_cpu_s > 0 and result.client_cpu_util > 0
        assert 0 <= result.send_lag_p99_ms <= result.p99_ms
        server.pin(None)  # back to every core, live
        assert cores.affinity(server.pid) == available
        assert server.cores is None
