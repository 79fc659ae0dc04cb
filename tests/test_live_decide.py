"""`bench decide` and `bench report` on one real run: llama.cpp and vLLM CPU, synthetic workload, two concurrencies.

One `bench run --engines llamacpp,vllm` (vLLM launched once, llama.cpp once) with small sizes, a generous SLO
(e2e p99 within 120 s, so goodput exists without judging speed), then re-summarized with the relaxed verdict policy
below so the short points are VALID, then `bench decide --json` and `bench report`. The run itself ends in its
answer (`--decide`: decision.json and report.html in the run directory) and records the host's facts and the engine
log lines known to cost speed. The checks: exit codes, a
ranking of exactly the engines that ran, and every measured criterion value traced back to summary.json or the
manifest (nothing made up; criteria without data stay null).

Relaxed policy (short runs on 2 shared cores): min 1 request, no minimum duration or send rate, send lag and read
stall p99 up to 1 s, client CPU up to 100%; errors and token-count mismatches still must be zero.
The engines run at nice 19 (`--engine-nice 19`: another developer measures on this machine), the light client at
the default priority, above them. Skips when an engine is not installed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from adapters import registry

pytestmark = [pytest.mark.live, pytest.mark.timeout(1800)]

REPO = Path(__file__).resolve().parents[1]
ENGINES = ("llamacpp", "vllm")
POINTS = ("concurrency=1", "concurrency=2")
RELAXED_POLICY = {
    "min_requests": 1,
    "min_duration_s": 0.0,
    "min_send_rate_fraction": 0.0,
    "max_send_lag_p99_ms": 1000.0,
    "max_read_stall_p99_ms": 1000.0,
    "max_client_cpu_util": 1.0,
    "max_error_rate": 0.0,
    "max_token_count_mismatch": 0.0,
    "max_output_length_mismatch": 0.0,
}


def bench(*args: str, timeout: float = 1500) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "harness.cli", *args]
    env = {**os.environ, "COLUMNS": "200"}
    return subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=timeout, env=env)


def ok(done: subprocess.CompletedProcess[str]) -> subprocess.CompletedProcess[str]:
    assert done.returncode == 0, (
        f"{done.args} exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    )
    return done


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    for name in ENGINES:
        avail = registry.availability(registry.get(name))
        if not avail.runnable:
            pytest.skip(f"{name} cannot run here: {avail.reason}")
    out = tmp_path_factory.mktemp("decide") / "synthetic"
    done = ok(bench("run", "--engines", ",".join(ENGINES), "--workload", "synthetic", "--set", "input_tokens=64",
             "--set", "output_tokens=16", "--requests", "6", "--warmup", "1", "--concurrency", "1,2",
             "--slo", "e2e_p99=120s", "--engine-nice", "19", "--out", str(out), "--decide"))  # fmt: skip
    (out.parent / "run-stdout.txt").write_text(done.stdout)
    policy = out.parent / "relaxed-policy.json"
    policy.write_text(json.dumps(RELAXED_POLICY))
    ok(bench("summarize", str(out), "--policy", str(policy)))
    return out


@pytest.fixture(scope="module")
def decision(run_dir: Path) -> dict[str, Any]:
    path = run_dir.parent / "decision.json"
    ok(bench("decide", str(run_dir), "--json", str(path)))
    return dict(json.loads(path.read_text()))


def _summary(run_dir: Path) -> dict[str, Any]:
    return dict(json.loads((run_dir / "summary.json").read_text()))


def _point(s: dict[str, Any], engine: str, point: str) -> dict[str, Any]:
    return next(p for p in s["points"] if p["engine"] == engine and p["point"] == point)


def test_run_points_are_valid_under_the_relaxed_policy(run_dir: Path) -> None:
    s = _summary(run_dir)
    assert {(p["engine"], p["point"]) for p in s["points"]} == {(e, p) for e in ENGINES for p in POINTS}
    for p in s["points"]:
        reasons = "; ".join(f"{r['code']}: {r['message']}" for r in p["verdict"]["reasons"])
        reasons += "".join(f"; note: {n}" for n in p["verdict"].get("notes") or [])
        assert p["verdict"]["status"] == "VALID", f"{p['engine']} {p['point']}: {reasons}"
        assert p["requests"]["ok"] == 6 and p["error_rate"] == 0.0


def test_engines_ran_below_the_client(run_dir: Path) -> None:
    """`--engine-nice 19` is in the manifest (for `--resume`) and in each engine's recorded launch command."""
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["settings"]["effective"]["engine_nice"] == 19
    assert manifest["settings"]["run_config"]["engine_nice"] == 19
    assert {e["name"]: e["launch_argv"][:3] for e in manifest["engines"]} == {
        e: ["nice", "-n", "19"] for e in ENGINES
    }


def test_decide_ranks_the_engines_that_ran(decision: dict[str, Any]) -> None:
    assert decision["kind"] == "decision"
    assert sorted(decision["ranking"]) == sorted(ENGINES)
    assert decision["winner"] == decision["ranking"][0]
    totals = {s["engine"]: s["total"] for s in decision["scores"]}
    assert totals[decision["ranking"][0]] >= totals[decision["ranking"][1]]
    assert [r["engines"] for r in decision["inputs"]["runs"]] == [sorted(ENGINES)]
    print("ranking", decision["ranking"], "totals", totals)


def test_every_measured_value_traces_to_the_run(decision: dict[str, Any], run_dir: Path) -> None:
    s = _summary(run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    cold = {e["name"]: e["cold_start_s"] for e in manifest["engines"]}
    kinds = {c["name"]: c["kind"] for c in decision["criteria"]}
    traced = 0
    for score in decision["scores"]:
        engine = score["engine"]
        points = [p for p in s["points"] if p["engine"] == engine]
        for name, c in score["criteria"].items():
            if kinds[name] != "measured":
                continue
            raw = c["raw"]
            if name in ("ttft_p95", "tpot_p95"):
                at = c["note"].split("common load ")[1].split(" ")[0]
                metric = "ttft_ms" if name == "ttft_p95" else "tpot_ms"
                assert raw == _point(s, engine, at)[metric]["p95"], (engine, name, c)
            elif name == "goodput":  # only VALID points count
                valid = [p for p in points if p["verdict"]["status"] == "VALID"]
                assert raw == max(p["goodput"]["requests_per_s"] for p in valid), (engine, c)
            elif name == "cold_start":
                assert raw == pytest.approx(cold[engine], rel=1e-12), (engine, c)
            elif name == "error_rate":
                measured = sum(p["requests"]["measured"] for p in points)
                weighted = sum(p["error_rate"] * p["requests"]["measured"] for p in points) / measured
                assert raw == pytest.approx(weighted, abs=1e-12), (engine, c)
            elif name == "memory_per_request":
                # peak engine RSS / requests in flight, at the most loaded point (closed loop: its concurrency)
                top = max(points, key=lambda p: p["load"]["value"])
                expected = top["telemetry"]["engine_rss_peak_bytes"] / top["load"]["value"] / 2**20
                assert raw == pytest.approx(expected, rel=1e-9), (engine, c)
            else:
                # nothing in this run measures long context or prefix reuse (synthetic only)
                assert raw is None and c["score"] is None, (engine, name, c)
                continue
            assert raw is not None and c["score"] in (1, 2, 3, 4, 5)
            traced += 1
    assert traced == 6 * len(ENGINES)
    for row in decision["capacity"]:
        cap = row["capacity"]
        assert cap["requests_per_s"] == _point(s, cap["engine"], cap["at_point"])["requests_per_s"]
    print({sc["engine"]: {k: v["raw"] for k, v in sc["criteria"].items() if kinds[k] == "measured"} for sc in
           decision["scores"]})  # fmt: skip


def test_decide_sees_the_measured_memory(decision: dict[str, Any], run_dir: Path) -> None:
    s = _summary(run_dir)
    assert all(p["telemetry"]["engine_rss_peak_bytes"] for p in s["points"])
    for score in decision["scores"]:
        assert score["criteria"]["memory_per_request"]["raw"] is not None, score["criteria"][
            "memory_per_request"
        ]


def test_report_renders_both_engines(run_dir: Path) -> None:
    html = run_dir.parent / "report.html"
    ok(bench("report", str(run_dir), "--out", str(html)))
    text = html.read_text()
    assert len(text) > 1000
    for engine in ENGINES:
        assert engine in text
    # works offline: no script or stylesheet fetched from anywhere
    assert not re.search(r"<script[^>]+src=\"https?:", text) and not re.search(
        r"<link[^>]+href=\"https?:", text
    )
    print(f"report: {html} ({len(text):,} bytes)")


def test_run_decide_answer_and_host_facts_of_a_real_run(run_dir: Path) -> None:
    from adapters.logwarnings import KNOWN_WARNINGS

    stdout = (run_dir.parent / "run-stdout.txt").read_text()
    assert (run_dir / "report.html").stat().st_size > 10_000 and (run_dir / "decision.json").exists()
    assert f"decision report: {run_dir / 'report.html'}" in stdout
    assert "Recommendation" in stdout and "this result depends on the host CPU" in stdout
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert isinstance(manifest["host"]["cpu_features"], list) and manifest["host"]["gpus"] == []
    for entry in manifest["engines"]:
        log = (run_dir / "engines" / f"{entry['name']}.log").read_text(errors="replace")
        recorded = {w["id"]: w for w in entry.get("log_warnings") or []}
        for w in recorded.values():  # nothing invented: each recorded line is in the engine's own log
            assert w["line"] in log and w["count"] == log.count(
                next(k.needle for k in KNOWN_WARNINGS if k.id == w["id"])
            )
        for known in KNOWN_WARNINGS:  # nothing missed: each known line the log has is recorded
            if entry["adapter"] in known.engines and known.needle in log:
                assert known.id in recorded, (entry["name"], known.id)
