"""Client vs engine reconciliation on crafted records and histograms whose answers are known by construction."""

from __future__ import annotations

import math
from typing import Any

import pytest

from adapters.prometheus import Histogram, Value
from harness.reconcile import ReconcilePolicy, bucket_interval, reconcile
from harness.records import RequestRecord

# vLLM's TTFT bucket bounds (seconds), the ones a real engine reports
BOUNDS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0)


def hist(observations: list[float], bounds: tuple[float, ...] = BOUNDS) -> Histogram:
    """A cumulative histogram of `observations` (seconds), as Prometheus would expose it."""
    les = (*bounds, math.inf)
    buckets = tuple((le, float(sum(1 for o in observations if o <= le))) for le in les)
    return Histogram(buckets, float(sum(observations)), float(len(observations)))


def rec(
    i: int, ttft_s: float, *, phase: str = "measure", out: int = 16, prompt: int = 100, **kw: Any
) -> RequestRecord:
    base: dict[str, Any] = {
        "request_id": f"r{i}",
        "engine": "e",
        "point": "concurrency=2",
        "phase": phase,
        "scheduled": float(i),
        "sent": float(i) + 0.0005,
        "chunk_times": [i + ttft_s + 0.01 * k for k in range(out)],
        "chunk_tokens": [1] * out,
        "done": i + ttft_s + 0.01 * out,
        "output_tokens": out,
        "prompt_tokens": prompt,
        "token_source": "server_usage",
        "client_output_tokens": out,
    }
    base.update(kw)
    return RequestRecord(**base)


def engine_delta(
    recs: list[RequestRecord], ttfts: list[float] | None = None, **override: float
) -> dict[str, Value]:
    ok = [r for r in recs if r.ok]
    d: dict[str, Value] = {
        "generation_tokens_total": float(sum(r.output_tokens or 0 for r in ok)),
        "prompt_tokens_total": float(sum(r.prompt_tokens or 0 for r in ok)),
        "requests_finished_total": float(len(ok)),
    }
    if ttfts is not None:
        d["ttft_seconds"] = hist(ttfts)
    d.update(override)
    return d


def test_bucket_interval_finds_the_bucket_holding_the_quantile() -> None:
    h = hist([0.003, 0.007, 0.015, 0.015, 0.03, 0.03, 0.05, 0.07, 0.09, 0.2])  # 10 observations
    assert bucket_interval(h, 0.5) == (0.02, 0.04)  # rank 5: the 5th and 6th observations are 0.03
    assert bucket_interval(h, 0.9) == (0.08, 0.1)  # rank 9: 0.09
    assert bucket_interval(h, 1.0) == (0.1, 0.25)
    assert bucket_interval(h, 0.0) == (0.001, 0.005)  # the first non-empty bucket
    over = hist([7.0, 8.0, 9.0])
    assert bucket_interval(over, 0.5) == (5.0, math.inf)
    assert bucket_interval(Histogram((), 0.0, 0.0), 0.5) is None


def test_counts_agree_exactly_over_every_phase() -> None:
    recs = [rec(i, 0.05, phase="warmup") for i in range(3)] + [rec(i, 0.05) for i in range(3, 23)]
    recs += [rec(i, 0.05, phase="cooldown", out=7, prompt=33) for i in range(23, 25)]
    r = reconcile(recs, engine_delta(recs, [0.045] * 25))
    by = {c.metric: c for c in r.counts}
    assert by["generation_tokens_total"].client == 23 * 16 + 2 * 7 == by["generation_tokens_total"].engine
    assert by["prompt_tokens_total"].client == 23 * 100 + 2 * 33
    assert by["requests_finished_total"].client == 25
    assert all(c.verdict == "agree" and c.difference == 0 for c in r.counts)
    assert r.status == "agree" and r.requests == 25 and r.failed == 0


def test_a_count_mismatch_is_reported_with_its_likely_reason() -> None:
    recs = [rec(i, 0.05) for i in range(10)]
    r = reconcile(recs, engine_delta(recs, generation_tokens_total=170.0))
    gen = next(c for c in r.counts if c.metric == "generation_tokens_total")
    assert gen.verdict == "disagree" and gen.difference == -10.0
    assert "10 fewer" in gen.reason and "other traffic" in gen.reason
    assert r.status == "disagree"

    # a request cut mid-stream: the engine generated 16 tokens, the client saw 5 of them
    cut = rec(10, 0.05, status="read_error", output_tokens=None, token_source="none", client_output_tokens=5)
    r = reconcile([*recs, cut], engine_delta(recs, generation_tokens_total=176.0))
    gen = next(c for c in r.counts if c.metric == "generation_tokens_total")
    assert gen.client == 165.0 and gen.difference == -11.0
    assert "1 request(s) did not finish normally" in gen.reason
    assert r.failed == 1


def test_client_side_counts_are_named_as_a_reason() -> None:
    recs = [rec(i, 0.05) for i in range(4)]
    recs[0] = rec(0, 0.05, output_tokens=None, token_source="none", client_output_tokens=15)
    r = reconcile(recs, engine_delta([rec(i, 0.05) for i in range(4)]))
    gen = next(c for c in r.counts if c.metric == "generation_tokens_total")
    assert gen.verdict == "disagree" and gen.difference == -1.0
    assert "1 output count(s) are not the server's usage" in gen.reason


def test_missing_engine_counters_are_unavailable_not_disagreements() -> None:
    recs = [rec(i, 0.05) for i in range(5)]
    r = reconcile(recs, {"generation_tokens_total": 80.0})
    by = {c.metric: c for c in r.counts}
    assert by["generation_tokens_total"].verdict == "agree"
    assert by["prompt_tokens_total"].verdict == "unavailable" and by["prompt_tokens_total"].engine is None
    assert all(t.verdict == "unavailable" and t.reason == "the engine has no TTFT histogram" for t in r.ttft)
    assert r.status == "agree"
    assert reconcile(recs, {}).status == "unavailable"


@pytest.mark.parametrize(
    ("client_s", "engine_s", "verdict", "outside_ms", "says"),
    [
        # inside the engine's bucket [40, 60] ms: agree, nothing outside
        (0.050, 0.045, "agree", 0.0, "inside"),
        # 10 ms above the bucket's upper bound (60 ms): within the 25 ms tolerance
        (0.070, 0.045, "agree", 10.0, "within"),
        # 140 ms above [80, 100] ms: beyond max(25 ms, 20% of 240 ms) -> disagree, with the reason
        (0.240, 0.090, "disagree", 140.0, "time spent outside the engine"),
        # the client below the engine's bucket [250, 500] ms by 150 ms: it cannot see a token first
        (0.100, 0.300, "disagree", -150.0, "below"),
        # the engine only says "more than 5 s": a client above that agrees
        (6.0, 5.5, "agree", 0.0, "+Inf"),
    ],
)
def test_ttft_against_the_histogram_resolution(
    client_s: float, engine_s: float, verdict: str, outside_ms: float, says: str
) -> None:
    recs = [rec(i, client_s) for i in range(20)]
    r = reconcile(recs, engine_delta(recs, [engine_s] * 20), ReconcilePolicy(quantiles=(0.5,)))
    (check,) = r.ttft
    assert check.client_ms == pytest.approx(client_s * 1000, abs=1e-6)
    assert check.verdict == verdict, check.reason
    assert check.outside_ms == pytest.approx(outside_ms, abs=1e-6)
    assert says in check.reason
    assert r.engine_ttft_count == 20 and r.client_ttft_count == 20


def test_ttft_p50_and_p90_land_in_their_own_buckets() -> None:
    # engine: 10 requests at 30 ms, 8 at 70 ms, 2 at 150 ms; client: the same plus 3 ms of network each
    engine = [0.03] * 10 + [0.07] * 8 + [0.15] * 2
    recs = [rec(i, t + 0.003) for i, t in enumerate(engine)]
    r = reconcile(recs, engine_delta(recs, engine))
    p50, p90 = r.ttft
    assert (p50.engine_low_ms, p50.engine_high_ms) == (20.0, 40.0)  # rank 10 of 20: the 30 ms group
    assert (p90.engine_low_ms, p90.engine_high_ms) == (60.0, 80.0)  # rank 18: the last 70 ms one
    # the client at the histogram's ranks: the 10th smallest (33 ms) and the 18th (73 ms), each inside its bucket
    assert p50.client_ms == pytest.approx(33.0, abs=1e-6) and p50.outside_ms == 0.0
    assert p90.client_ms == pytest.approx(73.0, abs=1e-6) and p90.outside_ms == 0.0
    assert p50.engine_estimate_ms == pytest.approx(40.0, abs=1e-6)  # PromQL interpolation: rank 10 at 40
    assert r.status == "agree"


def test_a_slow_first_request_among_few_is_compared_at_the_histograms_rank() -> None:
    """Seen on a freshly started vLLM: 7 requests, the first (warm-up) 600 ms, the rest 110-130 ms. The client's p50
    is the 4th smallest, the rank the histogram picks its bucket by (an interpolated value would mix requests)."""
    engine = [0.6, 0.11, 0.115, 0.12, 0.12, 0.125, 0.13]
    recs = [rec(i, t + 0.002) for i, t in enumerate(engine)]
    r = reconcile(recs, engine_delta(recs, engine))
    p50 = r.ttft[0]
    assert p50.client_ms == pytest.approx(122.0, abs=1e-6) and p50.verdict == "agree", p50.reason
    assert r.status == "agree"


def test_a_quantile_that_is_the_slowest_request_is_not_compared() -> None:
    """With 7 requests the p90 rank (ceil(6.3) = 7) is the maximum: one request the API server kept before the
    engine saw it (a fresh vLLM's warm-up; the likely cause of CI's `engine_disagrees` on vLLM at concurrency 1,
    7 requests) would decide the verdict. From 10 requests on, the p90 is the 9th of 10 and compared again."""
    engine = [0.6, 0.11, 0.115, 0.12, 0.12, 0.125, 0.13]
    recs = [rec(i, t + 0.002) for i, t in enumerate(engine)]
    recs[0] = rec(0, 0.95)  # the client saw 350 ms more than the engine on the slowest one
    r = reconcile(recs, engine_delta(recs, engine))
    p50, p90 = r.ttft
    assert p90.verdict == "unavailable" and p90.client_ms == pytest.approx(950.0, abs=1e-6)
    assert "the p90 is the slowest single request; comparing it needs at least 10" in p90.reason
    assert p50.verdict == "agree" and r.status == "agree"

    engine10 = [*engine, 0.12, 0.115, 0.11]
    recs10 = [rec(i, t + 0.002) for i, t in enumerate(engine10)]
    recs10[0] = rec(0, 0.95)
    r10 = reconcile(recs10, engine_delta(recs10, engine10))
    assert r10.ttft[1].verdict == "agree" and r10.ttft[1].client_ms == pytest.approx(132.0, abs=1e-6)
    # and a real disagreement at the 9th of 10 is still one
    recs10[1] = rec(1, 0.95)
    assert reconcile(recs10, engine_delta(recs10, engine10)).ttft[1].verdict == "disagree"


def test_a_count_difference_between_histogram_and_client_is_said() -> None:
    recs = [rec(i, 0.05) for i in range(10)]
    r = reconcile(recs, engine_delta(recs, [0.05] * 12), ReconcilePolicy(quantiles=(0.5,)))
    assert "the engine observed 12 TTFTs, the client 10" in r.ttft[0].reason


def test_ttft_above_the_bucket_is_split_by_side_with_the_clients_own_delays() -> None:
    """The engine says 90 ms (bucket [80, 100] ms); the client 240 ms, 140 ms above, beyond max(25, 20 % of 240) = 48.
    Which side spent them is read off each record's send lag (0.5 ms here) plus its read stall."""
    delta = engine_delta([rec(i, 0.240) for i in range(20)], [0.090] * 20)
    policy = ReconcilePolicy(quantiles=(0.5,))

    def check(read_stall: float | None) -> Any:
        recs = [rec(i, 0.240, read_stall=read_stall) for i in range(20)]
        return reconcile(recs, delta, policy).ttft[0]

    # the client's loop ran on time: 139.5 ms are left above the bucket -> the server's, a finding
    server = check(0.002)
    assert server.verdict == "outside_engine" and server.outside_ms == pytest.approx(140.0)
    assert "the client is not why" in server.reason and "137.5 ms above the bucket" in server.reason
    # the loop was held up 120 ms before the reads: 240 - 0.5 - 120 = 119.5 ms, 19.5 above, within 48: the client's
    delayed = check(0.120)
    assert (
        delayed.verdict == "client_delayed"
        and "the harness, not the engine, may be the bottleneck" in delayed.reason
    )
    # the boundary: 100 + 48 + 0.5 + stall = 240 -> a stall of 91.5 ms leaves exactly the tolerance
    assert check(0.0910).verdict == "outside_engine" and check(0.0920).verdict == "client_delayed"
    # no loop watch (another client, an older run): which side is unknown -> a disagreement
    unknown = check(None)
    assert unknown.verdict == "disagree" and "which side is unknown" in unknown.reason


def test_outside_engine_is_a_note_and_client_delays_are_judged_by_the_read_stall_rule() -> None:
    from harness.summary import _engine_notes
    from harness.telemetry import TelemetrySummary
    from harness.verdict import PointChecks, VerdictPolicy, judge

    recs = [rec(i, 0.240, read_stall=0.002) for i in range(20)]
    r = reconcile(recs, engine_delta(recs, [0.090] * 20), ReconcilePolicy(quantiles=(0.5,)))
    assert r.status == "outside_engine"
    notes = _engine_notes(TelemetrySummary.model_construct(reconciliation=r))
    assert len(notes) == 1 and notes[0].startswith("TTFT p50: client p50 240.0 ms")
    base: dict[str, Any] = {"measured": 40, "duration_s": 20.0, "closed_loop": True}
    valid = judge(PointChecks(**base, read_stall_p99_ms=2.0, engine_notes=notes))
    assert valid.status == "VALID" and valid.notes == notes
    # judged against the TTFT it can inflate: max(10 ms, 10 % of TTFT p50)
    held = judge(PointChecks(**base, read_stall_p99_ms=120.0, ttft_p50_ms=240.0))
    assert held.status == "INVALID" and [x.code for x in held.reasons] == ["read_stall"]
    assert "(> 24.0 ms, max(10 ms, 10% of TTFT p50))" in held.reasons[0].message
    assert judge(PointChecks(**base, read_stall_p99_ms=23.0, ttft_p50_ms=240.0)).status == "VALID"
    assert judge(PointChecks(**base, read_stall_p99_ms=11.0, ttft_p50_ms=20.0)).status == "INVALID"
    assert judge(PointChecks(**base, read_stall_p99_ms=9.0, ttft_p50_ms=20.0)).status == "VALID"
    relaxed = VerdictPolicy(max_read_stall_p99_ms=200)
    assert judge(PointChecks(**base, read_stall_p99_ms=120.0, ttft_p50_ms=240.0), relaxed).status == "VALID"
