"""Summaries and verdicts from synthetic records whose statistics are known by construction."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from harness.errors import ConfigError
from harness.records import RequestRecord
from harness.rundir import RunDir
from harness.slo import parse_slo
from harness.summary import PointMeta, point_meta, render_table, summarize_point, summarize_run
from harness.verdict import PointChecks, VerdictPolicy, judge, load_policy

TOL = 1e-6
META = PointMeta(
    engine="fake",
    point="rate=2",
    load={"kind": "rate", "value": 2, "arrival": "poisson", "closed_loop": False},  # type: ignore[arg-type]
)


def ok_record(i: int, rate: float = 2.0, **kw: Any) -> RequestRecord:
    """A successful request: TTFT 100+i ms, then 4 more one-token chunks 20 ms apart, done 5 ms later."""
    t = i / rate
    first = t + 0.100 + 0.001 * i
    chunks = [first + 0.020 * k for k in range(5)]
    base: dict[str, Any] = {
        "request_id": f"m{i}",
        "engine": "fake",
        "point": "rate=2",
        "phase": "measure",
        "scheduled": t,
        "sent": t + 0.001,
        "chunk_times": chunks,
        "chunk_tokens": [1] * 5,
        "done": chunks[-1] + 0.005,
        "output_tokens": 5,
        "prompt_tokens": 100,
        "token_source": "server_usage",
        "client_output_tokens": 5,
    }
    base.update(kw)
    return RequestRecord(**base)


def synthetic_point() -> list[RequestRecord]:
    recs = [ok_record(-5 + i, phase="warmup", chunk_times=[10.0], done=20.0) for i in range(5)]
    recs += [ok_record(i) for i in range(40)]
    recs += [
        RequestRecord(
            "f1",
            "fake",
            "rate=2",
            "measure",
            scheduled=5.0,
            sent=5.001,
            done=35.0,
            status="http_error",
            http_status=500,
        ),
        RequestRecord(
            "f2", "fake", "rate=2", "measure", scheduled=6.0, sent=6.001, done=16.0, status="timeout"
        ),
        RequestRecord("f3", "fake", "rate=2", "measure", scheduled=19.0, sent=19.001, status="cancelled"),
    ]
    recs += [ok_record(40 + i, phase="cooldown", done=99.0) for i in range(5)]
    return recs


def test_summary_excludes_warmup_cooldown_and_failures() -> None:
    p = summarize_point(synthetic_point(), META)
    assert p.requests.model_dump() == {
        "total": 53,
        "measured": 43,
        "ok": 40,
        "failed": 3,
        "warmup": 5,
        "cooldown": 5,
    }
    assert p.errors == {"http_error": 1, "timeout": 1, "cancelled": 1}
    assert p.error_rate == pytest.approx(2 / 42, abs=TOL)  # cancelled by the run's end: not an engine error

    ttft = np.array([100 + i for i in range(40)], dtype=float)
    assert p.ttft_ms.count == 40
    assert p.ttft_ms.mean == pytest.approx(ttft.mean(), abs=TOL)
    assert p.ttft_ms.p99 == pytest.approx(np.percentile(ttft, 99), abs=TOL)
    assert p.ttft_ms.max == pytest.approx(139.0, abs=TOL)  # warmup's 10 s TTFT is not in
    assert p.e2e_ms.max == pytest.approx(139 + 80 + 5, abs=TOL)  # the failed 30 s request is not in
    assert p.itl_ms.count == 160 and p.itl_ms.p50 == pytest.approx(20.0, abs=TOL)
    assert p.tpot_ms.p50 == pytest.approx(20.0, abs=TOL)
    assert p.send_lag_ms.p99 == pytest.approx(1.0, abs=TOL)

    duration = 35.0 - 0.0  # first measured scheduled → last measured done (the failed http_error one)
    assert p.duration_s == pytest.approx(duration, abs=TOL)
    assert p.requests_per_s == pytest.approx(40 / duration, abs=TOL)  # ok requests only
    assert p.output_tokens_per_s == pytest.approx(200 / duration, abs=TOL)
    assert p.input_tokens_per_s == pytest.approx(4000 / duration, abs=TOL)
    assert p.total_tokens_per_s == pytest.approx(4200 / duration, abs=TOL)
    assert p.token_sources == {"server_usage": 40}
    assert p.verdict.status == "INVALID"
    assert [r.code for r in p.verdict.reasons] == ["error_rate"]
    assert "inspect errors by kind in records.jsonl" in p.verdict.recommendation


def test_summarize_run_from_files_alone(tmp_path: Path) -> None:
    with RunDir.create(tmp_path / "run") as rd:
        rd.start(
            "run-7",
            load={"kind": "rate", "arrival": "poisson"},
            workload={"fingerprint": "sha256:abc"},
            slo={"ttft_p95_ms": 120.0, "e2e_p99_ms": 1000.0},
        )
        rd.append_event({"kind": "point_start", "engine": "fake", "point": "rate=2"})
        for r in synthetic_point():
            rd.append_record(r)
        rd.append_event(
            {
                "kind": "point_end",
                "engine": "fake",
                "point": "rate=2",
                "client_cpu": {"mean_util": 0.3, "max_util": 0.5, "saturated": False},
                "max_send_lag_s": 0.001,
                "stop_reason": "requests",
            }
        )
    s = summarize_run(tmp_path / "run")
    assert s.run_id == "run-7" and s.slo == {"ttft_p95_ms": 120.0, "e2e_p99_ms": 1000.0}
    (p,) = s.points
    assert p.workload_fingerprint == "sha256:abc"
    assert p.load.kind == "rate" and p.load.value == 2 and p.load.closed_loop is False
    assert p.client_cpu is not None and p.client_cpu.mean_util == pytest.approx(0.3)
    assert p.stop_reason == "requests"
    assert p.goodput is not None
    assert p.goodput.good == 21  # TTFT 100..120 ms meet the 120 ms bound; failures never good
    assert p.goodput.fraction == pytest.approx(21 / 42, abs=TOL)  # of completed requests
    assert p.goodput.requests_per_s == pytest.approx(21 / 35.0, abs=TOL)
    assert {t.name: t.met for t in p.goodput.targets} == {"ttft_p95": False, "e2e_p99": True}
    # the same summary comes back from disk
    RunDir(tmp_path / "run").write_summary(s)
    assert RunDir.open(tmp_path / "run").load_summary() == s
    table = render_table(s)
    assert table.row_count == 1


def test_point_meta_closed_loop_from_point_id() -> None:
    m = point_meta(None, "fake", "concurrency=8")
    assert m.load.kind == "concurrency" and m.load.value == 8 and m.load.closed_loop is True


# -- verdict rules, each triggered by a crafted point -------------------------------------------------------------


def codes(records: list[RequestRecord], events: list[dict[str, Any]] | None = None, **kw: Any) -> list[str]:
    p = summarize_point(records, META, events or [], **kw)
    return [r.code for r in p.verdict.reasons]


def test_clean_point_is_valid() -> None:
    p = summarize_point([ok_record(i) for i in range(40)], META)
    assert p.verdict.status == "VALID" and p.verdict.reasons == [] and p.verdict.recommendation == ""


def test_too_few_requests() -> None:
    recs = [ok_record(i, rate=0.5) for i in range(10)]  # 18 s, 10 requests
    p = summarize_point(recs, META)
    assert [r.code for r in p.verdict.reasons] == ["too_few_requests"]
    # 10 requests in 18.2 s: 0.55 req/s; 30 requests need 54.6 s; both with a 20 % margin
    assert p.verdict.reasons[0].recommendation == "run longer: --requests 36 / --duration 66"
    assert codes(recs, policy=VerdictPolicy(min_requests=10)) == []


def test_too_short() -> None:
    p = summarize_point([ok_record(i, rate=10) for i in range(40)], META)  # 4 s
    assert [r.code for r in p.verdict.reasons] == ["too_short"]
    assert "run longer" in p.verdict.recommendation


def test_rate_not_achieved_and_send_lag() -> None:
    # the client falls behind by 50 ms more on each request: sends at ~1.82/s of 2/s scheduled
    recs = [ok_record(i, sent=i / 2 + 0.05 * i) for i in range(40)]
    p = summarize_point(recs, META)
    assert [r.code for r in p.verdict.reasons] == ["rate_not_achieved", "send_lag"]
    assert p.checks.achieved_rate_per_s == pytest.approx(39 / (19.5 + 1.95), abs=TOL)
    assert p.verdict.recommendation == (
        "the client cannot keep up: lower --rate or spread the load over client processes (--distributed)"
    )
    # a closed loop's rate depends on the server: only the lag is judged
    closed = META.model_copy(update={"load": META.load.model_copy(update={"closed_loop": True})})
    assert [r.code for r in summarize_point(recs, closed).verdict.reasons] == ["send_lag"]


def test_send_lag_alone() -> None:
    recs = [ok_record(i) for i in range(40)]
    for i in (10, 20):
        recs[i].sent = recs[i].scheduled + 0.050
    assert codes(recs) == ["send_lag"]


def test_client_cpu_saturated() -> None:
    recs = [ok_record(i) for i in range(40)]
    ev = {"kind": "point_end", "engine": "fake", "point": "rate=2"}
    assert codes(recs, [{**ev, "client_cpu": {"mean_util": 0.97, "max_util": 1.0, "saturated": True}}]) == [
        "client_cpu_saturated"
    ]
    assert codes(recs, [{**ev, "client_cpu": {"mean_util": 0.95, "max_util": 1.0}}]) == [
        "client_cpu_saturated"
    ]
    assert codes(recs, [{**ev, "client_cpu": {"mean_util": 0.5, "max_util": 0.8}}]) == []


def test_client_cpu_saturation_follows_the_policy_not_the_runners_flag() -> None:
    """87 % of a core, stored by the runner as saturated (its 0.85 bound): VALID under the default policy (0.90),
    and INVALID only when the policy's bound is below it; the summary's flag says the same as the verdict."""
    recs = [ok_record(i) for i in range(40)]
    ev = {"kind": "point_end", "engine": "fake", "point": "rate=2"}
    stored = [{**ev, "client_cpu": {"mean_util": 0.87, "max_util": 1.0, "saturated": True}}]
    p = summarize_point(recs, META, stored)
    assert p.verdict.status == "VALID" and p.client_cpu is not None and p.client_cpu.saturated is False
    lax = summarize_point(recs, META, stored, policy=VerdictPolicy(max_client_cpu_util=1.0))
    assert lax.verdict.status == "VALID"
    strict = summarize_point(recs, META, stored, policy=VerdictPolicy(max_client_cpu_util=0.8))
    assert [r.code for r in strict.verdict.reasons] == ["client_cpu_saturated"]
    assert strict.client_cpu is not None and strict.client_cpu.saturated is True
    # a run written before the rule with no mean kept: its stored flag is all there is
    old = [{**ev, "client_cpu": {"saturated": True}}]
    assert [r.code for r in summarize_point(recs, META, old).verdict.reasons] == ["client_cpu_saturated"]


def test_token_count_mismatch() -> None:
    recs = [ok_record(i, output_tokens=10) for i in range(40)]  # server 10, stream showed 5
    p = summarize_point(recs, META)
    assert [r.code for r in p.verdict.reasons] == ["token_count_mismatch"]
    assert p.checks.token_count_mismatch == pytest.approx(0.5, abs=TOL)


def test_output_length_mismatch_flags_ignore_eos() -> None:
    recs = [ok_record(i, expected_output_tokens=8 if i % 2 else 5) for i in range(40)]
    p = summarize_point(recs, META)
    assert [r.code for r in p.verdict.reasons] == ["output_length_mismatch"]
    assert p.checks.output_length_mismatched == 20
    assert p.checks.output_length_mismatch == pytest.approx(0.5 * 3 / 8, abs=TOL)
    assert "engine may not honour ignore_eos" in p.verdict.recommendation


def test_judge_thresholds_from_policy_and_file(tmp_path: Path) -> None:
    c = PointChecks(measured=100, duration_s=60, closed_loop=False, error_rate=0.03)
    assert judge(c).status == "INVALID"
    f = tmp_path / "policy.yaml"
    f.write_text("max_error_rate: 0.05\n")
    assert judge(c, load_policy(f)).status == "VALID"
    f.write_text("max_eror_rate: 0.05\n")
    with pytest.raises(ConfigError, match="max_eror_rate"):
        load_policy(f)


def test_no_slo_means_no_goodput() -> None:
    assert summarize_point([ok_record(i) for i in range(40)], META).goodput is None
    g = summarize_point([ok_record(i) for i in range(40)], META, slo=parse_slo("ttft_p99=1s")).goodput
    assert g is not None and g.good == 40 and g.met


def test_summarize_run_notes_truncation_and_missing_manifest(tmp_path: Path) -> None:
    with RunDir.create(tmp_path / "run") as rd:  # records only: no manifest, no events
        for i in range(3):
            rd.append_record(ok_record(i))
    with open(tmp_path / "run" / "records.jsonl", "ab") as f:
        f.write(b'{"schema_version": 1, "request_id": "cut')
    s = summarize_run(tmp_path / "run")
    assert s.run_id == "run" and s.points[0].requests.measured == 3
    assert s.points[0].load.kind == "rate" and s.points[0].load.value == 2
    assert any("no manifest.json" in n for n in s.notes)
    assert any("skipped a truncated last line (line 4" in n for n in s.notes)


def test_client_engine_disagreement_makes_the_point_invalid() -> None:
    from harness.verdict import PointChecks, judge

    base = dict(measured=100, duration_s=30.0, closed_loop=True, error_rate=0.0)
    assert judge(PointChecks(**base)).status == "VALID"
    verdict = judge(
        PointChecks(**base, engine_disagreements=["generation_tokens_total: the client counted 12 fewer"])
    )
    assert verdict.status == "INVALID"
    assert [r.code for r in verdict.reasons] == ["engine_disagrees"]
    assert "12 fewer" in verdict.reasons[0].message


def test_a_starved_client_is_named_as_the_cause_of_its_late_sends_and_reads() -> None:
    """Late sends and reads with the client's loop waiting for a CPU 35% of the point: the same rules fire, and
    the recommendation says other processes held the cores (not that the client did too much). Under 10% (the
    policy's `starved_cpu_wait`) it gives the usual advice; a starved client whose timing passed stays VALID."""
    from harness.verdict import PointChecks, VerdictPolicy, judge

    base = dict(measured=100, duration_s=30.0, closed_loop=False, error_rate=0.0, ttft_p50_ms=50.0)
    late = dict(base, send_lag_p99_ms=400.0, read_stall_p99_ms=300.0)
    starved = judge(PointChecks(**late, client_cpu_wait=0.35))
    assert [r.code for r in starved.reasons] == ["send_lag", "read_stall"]
    assert all("waited for a CPU 35% of the point" in r.recommendation for r in starved.reasons)
    assert "--engine-nice 19" in starved.recommendation
    busy = judge(PointChecks(**late, client_cpu_wait=0.05))
    assert [r.code for r in busy.reasons] == ["send_lag", "read_stall"]
    assert not any("waited for a CPU" in r.recommendation and "%" in r.recommendation for r in busy.reasons)
    assert "--distributed" in busy.reasons[0].recommendation
    strict = judge(PointChecks(**late, client_cpu_wait=0.05), VerdictPolicy(starved_cpu_wait=0.04))
    assert "waited for a CPU 5% of the point" in strict.recommendation
    assert judge(PointChecks(**base, client_cpu_wait=0.5)).status == "VALID"


def test_a_closed_loop_whose_slots_waited_for_the_client_is_invalid() -> None:
    """Each request takes 185 ms from due to done (TTFT 100+ ms, 4 more chunks, 5 ms); the client reads the end 20 ms
    after it arrived: the slot was idle 20 / 205 of its time, ~9.8 %, above the 5 % limit. The end-read lag is
    summarised; 5 ms late (2.6 %) is within the limit, and an open loop (no slots) is not judged by it."""
    closed = META.model_copy(update={"load": META.load.model_copy(update={"closed_loop": True})})

    def point(late_s: float, meta: PointMeta = closed) -> Any:
        recs = []
        for i in range(40):
            rec = ok_record(i)
            rec.chunk_times = [rec.scheduled + 0.100 + 0.020 * k for k in range(5)]
            rec.done = rec.chunk_times[-1] + 0.005
            rec.done_read = rec.done + late_s
            recs.append(rec)
        return summarize_point(recs, meta)

    late = point(0.020)
    assert [r.code for r in late.verdict.reasons] == ["slot_idle"]
    assert late.checks.slot_idle_share == pytest.approx(0.020 / 0.205, abs=TOL)
    assert late.end_read_lag_ms.p50 == pytest.approx(20.0, abs=1e-6) and late.end_read_lag_ms.count == 40
    assert "taskset" in late.verdict.recommendation
    assert point(0.005).verdict.status == "VALID"
    assert point(0.020, META).verdict.status == "VALID"
