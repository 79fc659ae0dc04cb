"""Per-request metrics, percentiles and SLO parsing / goodput against hand-computed truth."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from harness import metrics
from harness.errors import ConfigError
from harness.metrics import stats_ms
from harness.records import RequestRecord
from harness.slo import Slo, SloTarget, goodput, parse_slo, request_meets

TOL = 1e-9


def rec(**kw: Any) -> RequestRecord:
    base: dict[str, Any] = {
        "request_id": "r",
        "engine": "e",
        "point": "rate=1",
        "phase": "measure",
        "scheduled": 1.0,
    }
    base.update(kw)
    if "chunk_tokens" in kw and "client_output_tokens" not in kw:
        base["client_output_tokens"] = sum(kw["chunk_tokens"])
    return RequestRecord(**base)


def test_ttft_e2e_send_lag_count_from_scheduled() -> None:
    r = rec(scheduled=1.0, sent=1.004, chunk_times=[1.250, 1.300], chunk_tokens=[1, 1], done=1.320)
    assert metrics.ttft(r) == pytest.approx(0.250, abs=TOL)
    assert metrics.e2e(r) == pytest.approx(0.320, abs=TOL)
    assert metrics.send_lag(r) == pytest.approx(0.004, abs=TOL)


def test_missing_timestamps_give_none() -> None:
    r = rec(status="connect_error")
    assert metrics.ttft(r) is None and metrics.e2e(r) is None and metrics.send_lag(r) is None
    assert metrics.itl_samples(r) == [] and metrics.tpot(r) is None


def test_itl_multi_token_chunk_is_split_evenly() -> None:
    # first chunk carries 2 tokens (no ITL samples), then 3 tokens after 30 ms, then 1 token after 20 ms
    r = rec(chunk_times=[1.100, 1.130, 1.150], chunk_tokens=[2, 3, 1])
    samples = metrics.itl_samples(r)
    assert len(samples) == 4
    assert samples == pytest.approx([0.010, 0.010, 0.010, 0.020], abs=TOL)


def test_itl_one_token_per_chunk() -> None:
    r = rec(chunk_times=[0.0, 0.01, 0.03, 0.06], chunk_tokens=[1, 1, 1, 1], scheduled=0.0)
    assert metrics.itl_samples(r) == pytest.approx([0.01, 0.02, 0.03], abs=TOL)


def test_tpot_uses_server_count_and_excludes_first_token() -> None:
    # server says 6 tokens; stream showed 5 in 3 chunks spanning 50 ms: TPOT = 0.050 / (6 - 1)
    r = rec(
        chunk_times=[1.100, 1.130, 1.150],
        chunk_tokens=[2, 2, 1],
        output_tokens=6,
        token_source="server_usage",
    )
    assert metrics.output_tokens(r) == metrics.TokenCount(6, "server_usage")
    assert metrics.tpot(r) == pytest.approx(0.010, abs=TOL)


def test_output_tokens_fall_back_to_client_count_flagged() -> None:
    r = rec(chunk_times=[1.1, 1.2, 1.3], chunk_tokens=[1, 1, 1])
    assert metrics.output_tokens(r) == metrics.TokenCount(3, "client_count")
    assert metrics.tpot(r) == pytest.approx(0.1, abs=TOL)


def test_tpot_none_below_two_tokens_or_two_chunks() -> None:
    assert metrics.tpot(rec(chunk_times=[1.1], chunk_tokens=[1])) is None
    # a non-streamed answer: all 16 tokens in one chunk, no decode time observed (not 0 ms)
    assert (
        metrics.tpot(rec(chunk_times=[1.1], chunk_tokens=[16], output_tokens=16, token_source="server_usage"))
        is None
    )


def test_stats_ms_hand_computed() -> None:
    s = stats_ms([0.001, 0.002, 0.003, 0.004, 0.005])  # seconds → 1..5 ms
    assert s.count == 5
    assert s.mean == pytest.approx(3.0, abs=1e-9)
    assert s.p50 == pytest.approx(3.0, abs=1e-9)
    assert s.p90 == pytest.approx(4.6, abs=1e-9)  # linear: rank 0.9*4 = 3.6 → 4 + 0.6
    assert s.p95 == pytest.approx(4.8, abs=1e-9)
    assert s.p99 == pytest.approx(4.96, abs=1e-9)
    assert s.max == pytest.approx(5.0, abs=1e-9)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_stats_ms_match_numpy_linear(seed: int) -> None:
    arr = np.random.default_rng(seed).lognormal(mean=-3, sigma=1, size=1001)
    s = stats_ms(arr.tolist())
    for q, got in ((50, s.p50), (90, s.p90), (95, s.p95), (99, s.p99)):
        assert got == pytest.approx(np.percentile(arr, q, method="linear") * 1000, rel=1e-12)
    assert s.max == pytest.approx(arr.max() * 1000, rel=1e-12)


def test_stats_ms_empty_and_none_samples() -> None:
    assert stats_ms([]).count == 0 and stats_ms([]).p99 is None
    assert stats_ms([None, 0.002]).count == 1


def test_parse_slo_units_and_round_trip() -> None:
    slo = parse_slo("ttft_p95=200ms, tpot_p95=50ms,e2e_p99=2s,itl_p99=500us")
    assert slo.to_dict() == {
        "ttft_p95_ms": 200.0,
        "tpot_p95_ms": 50.0,
        "e2e_p99_ms": 2000.0,
        "itl_p99_ms": 0.5,
    }
    assert Slo.from_dict(slo.to_dict()) == slo
    assert parse_slo("") == Slo() and not parse_slo(None)


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("foo_p95=200ms", "unknown metric in 'foo_p95=200ms'"),
        ("ttft_p97=200ms", "unknown statistic in 'ttft_p97=200ms'"),
        ("ttft_p95=200", "missing unit in 'ttft_p95=200'"),
        ("ttft_p95=200min", "unknown unit 'min' in 'ttft_p95=200min'"),
        ("ttft_p95", "is not name=value"),
        ("ttft_p95=fast", "bad value in 'ttft_p95=fast'"),
        ("ttft_p95=1s,ttft_p95=2s", "ttft_p95 given twice"),
    ],
)
def test_parse_slo_errors_name_the_bad_part(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_slo(text)
    assert fragment in str(e.value)


def test_request_meets_and_goodput() -> None:
    slo = parse_slo("ttft_p95=200ms,tpot_p95=50ms,e2e_p99=2s,itl_p99=60ms")
    bounds = slo.request_bounds_ms()
    assert bounds == {"ttft": 200.0, "tpot": 50.0, "e2e": 2000.0}  # itl is judged per point only
    good = rec(scheduled=0.0, chunk_times=[0.1, 0.14, 0.18], chunk_tokens=[1, 1, 1], done=0.2)
    slow_ttft = rec(scheduled=0.0, chunk_times=[0.3, 0.31], chunk_tokens=[1, 1], done=0.4)
    slow_tpot = rec(scheduled=0.0, chunk_times=[0.1, 0.2], chunk_tokens=[1, 1], done=0.25)  # TPOT 100 ms
    one_token = rec(
        scheduled=0.0, chunk_times=[0.1], chunk_tokens=[1], done=0.1
    )  # no TPOT: passes that bound
    failed = rec(scheduled=0.0, status="timeout", done=0.05)
    assert [request_meets(r, bounds) for r in (good, slow_ttft, slow_tpot, one_token, failed)] == [
        True,
        False,
        False,
        True,
        False,
    ]
    stats = {"ttft": stats_ms([0.1, 0.3]), "itl": stats_ms([0.04, 0.04, 0.07])}
    g = goodput([good, slow_ttft, slow_tpot, one_token, failed], 2.0, slo, stats)
    assert g.good == 2
    assert g.requests_per_s == pytest.approx(1.0)
    assert g.fraction == pytest.approx(0.4)
    by_name = {t.name: t for t in g.targets}
    assert by_name["ttft_p95"].met is False  # p95 of [100, 300] = 290 ms
    assert by_name["ttft_p95"].value_ms == pytest.approx(290.0)
    assert by_name["tpot_p95"].value_ms is None and by_name["tpot_p95"].met is False
    assert g.met is False


def test_request_bound_is_the_loosest_of_a_metric() -> None:
    slo = Slo(
        targets=(
            SloTarget(metric="ttft", stat="p50", bound_ms=100),
            SloTarget(metric="ttft", stat="p99", bound_ms=500),
        )
    )
    assert slo.request_bounds_ms() == {"ttft": 500.0}


@given(
    st.lists(
        st.tuples(st.floats(min_value=0.0, max_value=1.0), st.integers(min_value=1, max_value=8)),
        min_size=1,
        max_size=50,
    )
)
def test_itl_samples_partition_the_decode_time(chunks: list[tuple[float, int]]) -> None:
    # however tokens are bundled, ITL samples add up to last − first chunk, one sample per token after the first chunk
    times = list(np.cumsum([gap for gap, _ in chunks]))
    tokens = [k for _, k in chunks]
    samples = metrics.itl_samples(rec(scheduled=0.0, chunk_times=times, chunk_tokens=tokens))
    assert len(samples) == sum(tokens[1:])
    assert sum(samples) == pytest.approx(times[-1] - times[0], abs=1e-9)


def test_percentile_linear_interpolation() -> None:
    assert metrics.percentile([10.0, 20.0], 25) == pytest.approx(12.5)
    assert metrics.percentile([3.0, 1.0, 2.0], 50) == pytest.approx(2.0)
