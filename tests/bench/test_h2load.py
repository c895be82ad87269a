"""The C client (h2load): its log parsing and figures on synthetic rows, and a real fixed-rate
run against the trivial servicer over real gRPC."""

from __future__ import annotations

import math

import h2load
import pytest
from loadgen import CHECK_METHOD

T0 = 1_700_000_000_000_000  # µs since epoch


def _client(
    phase_us: int, n: int, *, lat_us: int = 1000, jitter: dict | None = None
) -> list[tuple[int, int, int]]:
    """A 100 rps client's rows: request k sent at its slot plus ``jitter[k]`` µs."""
    jitter = jitter or {}
    return [(T0 + phase_us + k * 10_000 + jitter.get(k, 0), 200, lat_us) for k in range(n)]


def test_parse_h2load_log_sorts_by_start_and_skips_malformed_lines() -> None:
    text = "300\t200\t40\n100\t-1\t7\nnot\ta\trow\n200\t503\t9\nshort\n"
    assert h2load.parse_h2load_log(text) == [(100, -1, 7), (200, 503, 9), (300, 200, 40)]


def test_schedule_is_not_moved_by_one_early_catch_up_send() -> None:
    rows = _client(0, 200, jitter={k: 400 for k in range(200)} | {150: -4000})
    assert h2load.schedule_of(rows, 10_000) == T0 + 400


def test_summary_measures_latency_from_send_and_from_schedule() -> None:
    # Two clients half a period apart, 1,000 ms each; client 1 sends every 10th request
    # 3 ms late, and one of its answers is a 503, one stream failed.
    late = {k: 3000 for k in range(0, 130, 10)}
    c0 = _client(0, 130)
    c1 = _client(5000, 130, jitter=late)
    c1[55] = (c1[55][0], 503, 1000)
    c1[56] = (c1[56][0], -1, 1000)
    fig = h2load.summarise_h2load_rate(
        [c0, c1], rates=[100, 100], duration=1.0, warmup=0.1, expected_per_client=[131, 131]
    )
    assert fig["clients"] == 2 and fig["per_client_rps"] == 100
    # Due in [T0 + 100 ms, T0 + 1100 ms): 100 slots per client, two of them errors.
    assert fig["kept_rate"] == 1.0
    assert fig["requests"] == 198
    assert fig["errors"] == 4
    assert fig["error_kinds"] == {"http_503": 1, "http_-1": 1, "not_logged": 2}
    assert fig["p50_ms"] == fig["p99_ms"] == 1.0  # h2load's own figure ignores lateness
    assert fig["p50_ms_from_schedule"] == 1.0
    assert fig["p99_ms_from_schedule"] == 4.0  # 3 ms late + 1 ms answer
    assert fig["send_lag_p99_ms"] == 3.0 and fig["send_lag_p50_ms"] == 0.0
    assert fig["gap_p50_ms"] == 5.0 and fig["burst_gaps"] == 0.0
    assert fig["max_in_flight"] == 1
    assert fig["start_spread_ms"] == 5.0
    assert fig["sent"] == 260


def test_summary_counts_answers_without_a_grpc_message() -> None:
    rows = _client(0, 50)
    fig = h2load.summarise_h2load_rate(
        [rows], rates=[100], duration=0.3, warmup=0.1, data_bytes=[45 * 48], answer_bytes=[45]
    )
    assert fig["error_kinds"] == {"no_grpc_message": 2}


def test_summary_reports_bursts_of_a_client_sending_many_per_tick() -> None:
    # What one h2load client at --rps 1000 does: ten requests at every 10 ms tick.
    rows = [(T0 + tick * 10_000 + i, 200, 500) for tick in range(40) for i in range(10)]
    fig = h2load.summarise_h2load_rate([rows], rates=[1000], duration=0.3, warmup=0.05)
    assert fig["burst_gaps"] > 0.85
    assert fig["send_lag_p99_ms"] >= 8.0  # the last of each burst was due 9 ms earlier


@pytest.mark.parametrize("rate", [50, 200, 1000, 2500])
def test_client_rates_stay_under_one_send_per_tick_and_add_up(rate: int) -> None:
    rates = h2load.client_rates(rate)
    assert sum(rates) == pytest.approx(rate)
    assert all(r < 1 / h2load.H2LOAD_TICK_S for r in rates)
    assert len(set(rates)) == len(rates)  # all different: their phases drift apart
    assert max(rates) / min(rates) <= 1 + h2load.RATE_SPREAD * 1.01


def test_h2load_traffic_line_gives_received_data_bytes() -> None:
    out = (
        "requests: 3 total, 3 started, 3 done, 3 succeeded, 0 failed, 0 errored, 0 timeout\n"
        "traffic: 420B (420) total, 120B (120) headers (space savings 90.00%), 135B (135) data\n"
    )
    m = h2load._TRAFFIC_DATA.search(out)
    assert m is not None and m.group(1) == "135"


@pytest.mark.skipif(h2load.h2load_path() is None, reason="h2load is not installed")
def test_h2load_offers_the_rate_and_every_request_is_answered(trivial) -> None:
    import grpc

    target, payload = trivial
    with grpc.insecure_channel(target) as ch:
        answer = ch.unary_unary(CHECK_METHOD)(payload, timeout=5)
    result = h2load.run_h2load_rate(
        h2load.H2RateSpec(
            target=target,
            payloads=[payload],
            rate=200,
            duration=1.0,
            warmup=0.2,
            answer_bytes=[len(answer) + 5],
        )
    )
    rates = h2load.client_rates(200)
    assert result.clients == len(rates) == 3
    assert result.errors == 0, result.error_kinds
    assert result.sent == sum(math.ceil(r * 1.7) + 1 for r in rates)
    # Each client's rate is not a whole number per second: one slot more or less each.
    assert abs(result.kept_rate - 1.0) <= len(rates) / 200
    assert abs(result.requests - 200) <= len(rates)
    assert 0 < result.p50_ms <= result.p99_ms <= result.p99_ms_from_schedule
    assert result.max_in_flight < result.streams
