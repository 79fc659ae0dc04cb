"""`bench gate`: the statistics against known truth (synthetic samples from known distributions), the renderings
(JUnit parsed back with xml.etree), and end to end with real `bench run` / `bench gate` processes against the
scripted server (exact timing) on loopback."""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import pytest

from harness.calibration import ScriptConfig, serve_in_process
from harness.errors import CompareError
from matrix.gate_stats import (
    GatePolicy,
    PointData,
    compare_error_rate,
    compare_latency,
    compare_points,
    compare_rate,
    window_rates,
)
from reports.gate import render_junit, render_markdown

BENCH = [sys.executable, "-m", "harness.cli"]


# ------------------------------------------------------------------------------------- statistics, known truth

TRIALS = 200
N = 200  # requests per run
SIGMA = 0.5  # lognormal shape: TTFT-like right skew
THRESHOLD = 0.10


def _trials(change: float, stat: str, policy: GatePolicy, seed: int) -> tuple[float, list[float]]:
    """Fraction of trials flagged as a regression when the candidate's true scale is (1 + change)× the baseline's,
    and each trial's log ratio of the statistic."""
    rng = np.random.default_rng(seed)
    flagged, log_ratios = 0, []
    for _ in range(TRIALS):
        base = rng.lognormal(np.log(0.1), SIGMA, N)
        cand = rng.lognormal(np.log(0.1 * (1 + change)), SIGMA, N)
        r = compare_latency(f"ttft_{stat}", base, cand, THRESHOLD, policy)
        flagged += r.verdict == "regression"
        assert r.baseline is not None and r.candidate is not None
        log_ratios.append(float(np.log(r.candidate / r.baseline)))
    return flagged / TRIALS, log_ratios


def test_threshold_sized_noise_rarely_flips_the_gate_and_twice_the_threshold_is_caught() -> None:
    policy = GatePolicy(bootstrap_resamples=500)
    # true change 0: the p95 of 200 lognormal(σ=0.5) samples wobbles by about the threshold from run to run ...
    fa, log_ratios = _trials(0.0, "p95", policy, seed=1)
    assert 0.07 < float(np.std(log_ratios)) < 0.13, "the noise should be of the size of the 10 % threshold"
    # ... yet the gate flips in at most 3 % of trials (stated in docs/gating.md; measured 0/200)
    assert fa <= 0.03, fa
    # true change = 2 × threshold (+20 % on every quantile): caught in at least 60 % (measured 71.5 %)
    power, _ = _trials(2 * THRESHOLD, "p95", policy, seed=2)
    assert power >= 0.60, power
    # the median is less noisy than the p95: +20 % caught more often (measured 85 %), ≤ 3 % false (measured 1 %)
    fa50, _ = _trials(0.0, "p50", policy, seed=3)
    power50, _ = _trials(2 * THRESHOLD, "p50", policy, seed=4)
    assert fa50 <= 0.03 and power50 >= 0.75, (fa50, power50)


def test_a_change_within_the_threshold_is_never_a_regression_however_significant() -> None:
    rng = np.random.default_rng(5)
    base = rng.lognormal(np.log(0.1), 0.1, 5000)
    cand = base * 1.05  # +5 %: overwhelmingly significant, but inside the 10 % allowed
    r = compare_latency("e2e_p50", base, cand, 0.10, GatePolicy(bootstrap_resamples=200))
    assert r.p_value is not None and r.p_value < 1e-10
    assert r.verdict == "ok" and r.change == pytest.approx(0.05, abs=1e-9)
    assert r.baseline == pytest.approx(1000 * float(np.median(base)))  # reported in ms


def test_repeats_are_the_units_when_each_side_has_enough_of_them() -> None:
    """Five repeats a side whose values scatter by ±25 % between repeats: a +12 % candidate is significant among
    its 1,000 pooled requests, but not between repeats, so it is not a regression; with tight repeats it is."""
    rng = np.random.default_rng(6)
    policy = GatePolicy(bootstrap_resamples=200)

    def repeats(scale: float, spread: list[float]) -> list[np.ndarray]:
        return [rng.lognormal(np.log(0.1 * scale * s), 0.05, 200) for s in spread]

    spread = [0.75, 0.87, 1.0, 1.13, 1.25]
    loose = compare_latency("ttft_p50", repeats(1.0, spread), repeats(1.12, spread[::-1]), 0.10, policy)
    assert loose.p_value is not None and loose.p_value < 0.01  # pooled requests: "significant"
    assert loose.p_repeats is not None and loose.p_repeats > policy.repeat_alpha
    assert loose.verdict == "ok"
    tight = compare_latency("ttft_p50", repeats(1.0, [1.0] * 5), repeats(1.12, [1.0] * 5), 0.10, policy)
    assert tight.verdict == "regression" and tight.p_repeats == pytest.approx(1 / 252)  # 5 v 5, fully apart
    # below `min_repeats` a side there is no repeat-level test
    assert (
        compare_latency("ttft_p50", repeats(1.0, [1.0] * 3), repeats(1.0, [1.0] * 3), 0.1, policy).p_repeats
        is None
    )


def test_throughput_uses_time_windows_and_repeats() -> None:
    policy = GatePolicy()
    rng = np.random.default_rng(7)
    base_w = list(500 * (1 + 0.01 * rng.standard_normal(15)))
    cand_w = list(440 * (1 + 0.01 * rng.standard_normal(15)))  # −12 %, beyond the −5 % allowed
    r = compare_rate(
        "output_tokens_per_s",
        500.0,
        440.0,
        base_w,
        cand_w,
        0.05,
        policy,
        [500, 502, 498, 501],
        [440, 441, 439, 442],
    )
    assert r.verdict == "regression" and r.change == pytest.approx(-0.12)
    assert r.p_repeats is not None and r.p_repeats < 0.05
    same = compare_rate("output_tokens_per_s", 500.0, 497.0, base_w, base_w, 0.05, policy)
    assert same.verdict == "ok"
    # batch means: 100 tokens/s arriving evenly over 10 s, cut into 5 windows of 2 s
    times = list(np.linspace(0.005, 9.995, 1000))
    assert window_rates(times, [1.0] * 1000, 5, 0.0, 10.0) == pytest.approx([100.0] * 5)


def test_error_rate_needs_both_size_and_significance() -> None:
    policy = GatePolicy()
    caught = compare_error_rate(0, 200, 12, 200, 0.01, policy)  # 0 % -> 6 %
    assert caught.verdict == "regression" and caught.p_value is not None and caught.p_value < 0.001
    assert caught.change == pytest.approx(0.06)
    assert compare_error_rate(0, 200, 1, 200, 0.01, policy).verdict == "ok"  # one failure: could be chance
    assert compare_error_rate(0, 20, 3, 20, 0.01, policy).verdict == "ok"  # 15 % but on 20 requests: p ≈ 0.12


# ------------------------------------------------------------------------------------- matching, rendering


def _point(
    engine: str, point: str, fp: str, scale: float = 1.0, valid: bool = True, seed: int = 0
) -> PointData:
    rng = np.random.default_rng(seed)
    lat = {m: (rng.lognormal(np.log(0.05 * scale), 0.2, 100),) for m in ("ttft", "tpot", "e2e", "itl")}
    return PointData(
        engine=engine,
        point=point,
        workload_fingerprint=fp,
        valid=valid,
        invalid_reasons=() if valid else ("measured for 2.0 s (< 10 s)",),
        latency_s=lat,
        rates={"output_tokens_per_s": 500 / scale},
        rate_windows={"output_tokens_per_s": tuple(500 / scale * (1 + 0.01 * rng.standard_normal(5)))},
        failed=0,
        completed=100,
    )


def test_points_match_on_engine_point_and_fingerprint() -> None:
    policy = GatePolicy(bootstrap_resamples=200)
    base = [_point("vllm", "concurrency=1", "sha256:a"), _point("vllm", "concurrency=8", "sha256:a", seed=1)]
    cand = [
        _point("vllm", "concurrency=1", "sha256:a", scale=1.5, seed=2),
        _point("vllm", "rate=4", "sha256:a"),
    ]
    report = compare_points(base, cand, policy)
    assert report.exit_code == 1 and report.status == "regression"
    assert report.baseline_only == ["vllm concurrency=8"] and report.candidate_only == ["vllm rate=4"]
    flagged = {m.metric for m in report.points[0].metrics if m.verdict == "regression"}
    assert flagged == {"ttft_p95", "tpot_p50", "e2e_p95", "output_tokens_per_s"}

    with pytest.raises(CompareError, match="fingerprints differ"):
        compare_points(base, [_point("vllm", "concurrency=1", "sha256:b")], policy)
    with pytest.raises(CompareError, match="nothing to compare"):
        compare_points(base, [_point("sglang", "concurrency=1", "sha256:a")], policy)
    # an INVALID candidate point fails the gate even when its numbers are fine
    invalid = compare_points(base, [_point("vllm", "concurrency=1", "sha256:a", valid=False)], policy)
    assert invalid.exit_code == 1 and invalid.points[0].status == "invalid"


def test_junit_and_markdown_carry_every_point_and_metric() -> None:
    policy = GatePolicy(bootstrap_resamples=200)
    base = [_point("vllm", "concurrency=1", "sha256:a"), _point("vllm", "concurrency=8", "sha256:a", seed=1)]
    cand = [
        _point("vllm", "concurrency=1", "sha256:a", scale=1.5, seed=2),
        _point("vllm", "concurrency=8", "sha256:a", valid=False, seed=3),
    ]
    doc = compare_points(base, cand, policy).model_dump(mode="json")
    root = ET.fromstring(render_junit(doc))
    cases = root.findall(".//testcase")
    assert len(cases) == 2 * (1 + 5)  # per point: validity + 5 default metrics
    failures = root.findall(".//testcase/failure")
    assert len(failures) == 4 + 1  # four regressions at concurrency=1, the INVALID point at concurrency=8
    assert root.get("tests") == "12" and root.get("failures") == "5"
    suites = {s.get("name"): s for s in root.findall("testsuite")}
    assert suites["vllm concurrency=8"].get("failures") == "1"
    assert {f.get("type") for f in failures} == {"regression", "invalid"}

    md = render_markdown(doc)
    assert md.startswith("## EngineBench gate: ❌ regression")
    assert md.count("| ttft_p95 (ms) |") == 2 and "Candidate point is INVALID" in md
    assert "| metric | baseline | candidate | change | p-value | threshold | verdict |" in md


def test_policy_file_overrides_thresholds_and_refuses_unknown_metrics(tmp_path: Path) -> None:
    from harness.errors import ConfigError
    from harness.gate import load_gate_policy

    f = tmp_path / "policy.yaml"
    f.write_text("alpha: 0.002\nmetrics:\n  ttft_p95: 0.2\n  itl_p99: {threshold: 0.3}\n  error_rate: null\n")
    p = load_gate_policy(f)
    assert (
        p.alpha == 0.002 and p.metrics["ttft_p95"].threshold == 0.2 and p.metrics["itl_p99"].threshold == 0.3
    )
    assert not p.metrics["error_rate"].enabled and p.metrics["tpot_p50"].threshold == 0.10  # defaults kept
    f.write_text("metrics:\n  ttft_p97: 0.1\n")
    with pytest.raises(ConfigError, match="unknown gate metric 'ttft_p97'"):
        load_gate_policy(f)


# ------------------------------------------------------------------------------------- end to end

RUN_ARGS = ["--workload", "synthetic", "--set", "output_tokens=8", "--concurrency", "4", "--warmup", "4"]
# send lag up to 500 ms: the gate's logic is under test, not the machine (a shared CI machine can stall the client
# once past 10 ms in a short point, and a closed loop counts that as the next request's send lag)
POLICY = "verdict:\n  min_duration_s: 1\n  min_requests: 30\n  max_send_lag_p99_ms: 500\n  max_read_stall_p99_ms: 500\nmetrics:\n  ttft_p50: 0.10\n"


def bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "COLUMNS": "160"}
    return subprocess.run([*BENCH, *args], capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Path]]:
    """Short runs (4 repeats × 30 requests of 8 tokens, ~5 s each) against three scripted servers: the reference, one with
    ITL × 1.5 and one with TTFT + 50 %; plus one run of another workload fingerprint."""
    root = tmp_path_factory.mktemp("gate")
    out: dict[str, Path] = {}
    configs = {
        "ref": ScriptConfig(ttft=0.05, itl=0.005, output_tokens=16),
        "slow_itl": ScriptConfig(ttft=0.05, itl=0.0075, output_tokens=16),
        "slow_ttft": ScriptConfig(ttft=0.075, itl=0.005, output_tokens=16),
    }
    plan = [
        ("base", "ref", ()),
        ("same", "ref", ()),
        ("slow_itl", "slow_itl", ()),
        ("slow_ttft", "slow_ttft", ()),
    ]
    for name, server, extra in plan:
        with serve_in_process(configs[server]) as url:
            r = bench(
                "run", "--endpoint", f"scripted={url}", *RUN_ARGS, "--requests", "30", "--repeat", "4",
                "--out", str(root / name), *extra,
            )  # fmt: skip
            assert r.returncode == 0, r.stdout + r.stderr
            out[name] = root / name
            if name == "base":  # another fingerprint: other output length
                r = bench(
                    "run", "--endpoint", f"scripted={url}", "--workload", "synthetic", "--set", "output_tokens=24",
                    "--concurrency", "4", "--requests", "8", "--out", str(root / "other"),
                )  # fmt: skip
                assert r.returncode == 0, r.stdout + r.stderr
                out["other"] = root / "other"
    (root / "policy.yaml").write_text(POLICY)
    out["policy"] = root / "policy.yaml"
    yield out


def _gate(runs: dict[str, Path], candidate: str, tmp_path: Path) -> tuple[int, dict[str, Any], str]:
    r = bench(
        "gate", "--baseline", str(runs["base"]), "--candidate", str(runs[candidate]), "--policy", str(runs["policy"]),
        "--json", str(tmp_path / "gate.json"), "--junit", str(tmp_path / "gate.xml"), "--markdown", str(tmp_path / "gate.md"),
    )  # fmt: skip
    doc = orjson.loads((tmp_path / "gate.json").read_bytes())
    return r.returncode, doc, r.stdout + r.stderr


def _metrics(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {m["metric"]: m for m in doc["points"][0]["metrics"]}


def test_repeat_tags_every_record_with_its_repeat(runs: dict[str, Path]) -> None:
    from harness.rundir import RunDir

    recs = list(RunDir.open(runs["base"]).iter_records())
    assert sorted({r.tags["repeat"] for r in recs}) == ["1", "2", "3", "4"]
    for rep in ("1", "2", "3", "4"):
        mine = [r for r in recs if r.tags["repeat"] == rep]
        assert sum(r.phase == "measure" for r in mine) == 30 and sum(r.phase == "warmup" for r in mine) == 4
    assert len({r.request_id for r in recs}) == len(recs)  # ids stay unique across repeats
    assert {r.point for r in recs} == {"concurrency=4"}


def test_identical_runs_pass(runs: dict[str, Path], tmp_path: Path) -> None:
    code, doc, out = _gate(runs, "same", tmp_path)
    assert code == 0, out
    assert doc["schema_version"] == 1 and doc["kind"] == "gate" and doc["status"] == "pass"
    m = _metrics(doc)
    assert m["tpot_p50"]["change"] == pytest.approx(
        0.0, abs=0.03
    )  # the server's ITL is exact: 5 ms both times
    assert doc["points"][0]["baseline_repeats"] == 4 and doc["points"][0]["candidate_repeats"] == 4
    root = ET.parse(tmp_path / "gate.xml").getroot()
    assert root.get("failures") == "0" and root.get("tests") == str(1 + 6)
    assert (tmp_path / "gate.md").read_text().startswith("## EngineBench gate: ✅ pass")


def test_itl_times_1_5_is_caught_on_tpot(runs: dict[str, Path], tmp_path: Path) -> None:
    code, doc, out = _gate(runs, "slow_itl", tmp_path)
    assert code == 1, out
    m = _metrics(doc)
    assert m["tpot_p50"]["verdict"] == "regression"
    assert m["tpot_p50"]["change"] == pytest.approx(0.5, abs=0.05)  # truth: 7.5 ms / 5 ms
    # 8 tokens 7.5 ms apart instead of 5 ms: the scripted E2E is 50 ms + 7 × ITL = 102.5 ms vs 85 ms, so closed-loop
    # throughput falls by about 17 %
    assert m["output_tokens_per_s"]["verdict"] == "regression"
    assert m["output_tokens_per_s"]["change"] == pytest.approx(-0.17, abs=0.06)
    assert m["error_rate"]["verdict"] == "ok" and m["ttft_p50"]["verdict"] != "regression"
    root = ET.parse(tmp_path / "gate.xml").getroot()
    failed = {c.get("name") for c in root.iter("testcase") if c.find("failure") is not None}
    assert {"tpot_p50", "output_tokens_per_s"} <= failed and root.get("failures") == str(len(failed))


def test_ttft_plus_50_percent_is_caught_on_ttft(runs: dict[str, Path], tmp_path: Path) -> None:
    code, doc, out = _gate(runs, "slow_ttft", tmp_path)
    assert code == 1, out
    m = _metrics(doc)
    assert m["ttft_p50"]["verdict"] == "regression"
    assert m["ttft_p50"]["change"] == pytest.approx(
        0.45, abs=0.12
    )  # truth +50 % of the server's part (50 -> 75 ms)
    assert m["tpot_p50"]["verdict"] != "regression"


def test_different_fingerprints_are_refused(runs: dict[str, Path], tmp_path: Path) -> None:
    code, doc, out = _gate(runs, "other", tmp_path)
    assert code == 2, out
    assert "fingerprints differ" in out and len(out.strip().splitlines()) == 1  # one line, no traceback
    assert doc["status"] == "error" and doc["exit_code"] == 2 and "fingerprints differ" in doc["reason"]
    assert ET.parse(tmp_path / "gate.xml").getroot().get("errors") == "1"


def test_a_directory_that_is_not_a_run_cannot_be_compared(runs: dict[str, Path], tmp_path: Path) -> None:
    r = bench("gate", "--baseline", str(runs["base"]), "--candidate", str(tmp_path))
    assert r.returncode == 2 and "is not a run directory" in r.stderr
