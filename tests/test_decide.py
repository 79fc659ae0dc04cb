"""`bench decide` end to end: synthetic run directories in the documented format, a real subprocess, real files."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from harness.decide import DecideConfig, decide
from harness.errors import CompareError

BENCH = shutil.which("bench", path=str(Path(sys.executable).parent)) or "bench"


def _stats(p95: float, mean: float | None = None) -> dict[str, Any]:
    m = p95 * 0.7 if mean is None else mean
    return {
        "count": 100,
        "mean": m,
        "p50": p95 * 0.6,
        "p90": p95 * 0.9,
        "p95": p95,
        "p99": p95 * 1.2,
        "max": p95 * 1.5,
    }


def _point(
    engine: str, conc: int, ttft95: float, rps: float, *, valid: bool = True, memory: float | None = None
) -> dict:
    p: dict[str, Any] = {
        "engine": engine, "point": f"concurrency={conc}", "workload_fingerprint": "sha256:chat1",
        "load": {"kind": "concurrency", "value": conc, "arrival": "closed", "closed_loop": True},
        "duration_s": 30.0,
        "requests": {"total": 120, "measured": 100, "ok": 100, "failed": 0, "warmup": 10, "cooldown": 10},
        "errors": {}, "error_rate": 0.0,
        "ttft_ms": _stats(ttft95), "itl_ms": _stats(30), "tpot_ms": _stats(30), "e2e_ms": _stats(3000, 2000),
        "send_lag_ms": _stats(1),
        "requests_per_s": rps, "input_tokens_per_s": rps * 200, "output_tokens_per_s": rps * 64,
        "total_tokens_per_s": rps * 264,
        "goodput": {"slo": {"ttft_p95_ms": 500}, "requests_per_s": rps, "fraction": 1.0},
        "token_sources": {"server_usage": 100}, "client_cpu": {"mean_util": 0.2, "max_util": 0.4},
        "verdict": {"status": "VALID" if valid else "INVALID",
                    "reasons": [] if valid else [{"code": "client_saturated"}], "recommendation": ""},
    }  # fmt: skip
    if memory is not None:
        p["telemetry"] = {"engine_rss_peak_bytes": memory}
    return p


def _write_run(d: Path, engines: dict[str, float], points: list[dict], *, workload: str = "chat",
               fingerprint: str = "sha256:chat1") -> Path:  # fmt: skip
    d.mkdir(parents=True)
    manifest = {
        "schema_version": 1, "kind": "manifest", "run_id": d.name, "started_at": "2026-11-24T05:00:00+00:00",
        "clock_anchor": {"wall": 1.0, "perf": 1.0}, "finished_at": "2026-11-24T05:10:00+00:00", "status": "complete",
        "command": ["bench", "run"], "host": {"hostname": "h", "os": "linux", "python": "3.11", "cpu_model": "EPYC",
                                             "cores": 2, "memory_bytes": 24 * 2**30},
        "engines": [{"name": n, "adapter": n, "mode": "launched", "cold_start_s": c, "config": {"threads": 2}}
                    for n, c in engines.items()],
        "workload": {"name": workload, "version": 1, "fingerprint": fingerprint, "params": {}},
        "load": {"kind": "concurrency", "values": [1, 4, 8]}, "slo": {"ttft_p95_ms": 500},
    }  # fmt: skip
    summary = {"schema_version": 1, "kind": "summary", "run_id": d.name, "generated_by": "test",
               "slo": {"ttft_p95_ms": 500}, "points": points}  # fmt: skip
    (d / "manifest.json").write_text(json.dumps(manifest))
    (d / "summary.json").write_text(json.dumps(summary))
    return d


@pytest.fixture
def runs(tmp_path: Path) -> list[Path]:
    a = _write_run(tmp_path / "run-llamacpp", {"llamacpp": 1.0}, [
        _point("llamacpp", 1, 80, 2.0, memory=600 * 2**20), _point("llamacpp", 4, 200, 6.0, memory=700 * 2**20),
        _point("llamacpp", 8, 800, 8.0, memory=800 * 2**20),
        _point("llamacpp", 16, 10, 900.0, valid=False),  # INVALID: must be ignored everywhere
    ])  # fmt: skip
    b = _write_run(tmp_path / "run-vllm", {"vllm": 30.0}, [
        _point("vllm", 1, 300, 1.0), _point("vllm", 4, 450, 3.0), _point("vllm", 8, 1200, 4.0),
    ])  # fmt: skip
    return [a, b]


def _bench(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([BENCH, "decide", *map(str, args)], capture_output=True, text=True, timeout=120)


def test_bench_decide_writes_the_decision_json(runs: list[Path], tmp_path: Path) -> None:
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "schema_version: 1\nuse_cases:\n"
        "  - {name: chat, workload: chat, slo: {ttft_p95_ms: 300}, traffic: {concurrent_users: 100, think_time_s: 10}}\n"
        "  - {name: edge, workload: chat, slo: {ttft_p95_ms: 500}, traffic: {concurrent_users: 1}, "
        "hardware: {on_device: true}}\n"
        "  - {name: impossible, workload: chat, slo: {ttft_p95_ms: 10}, traffic: {requests_per_s: 1}}\n"
    )
    out = tmp_path / "decision.json"
    r = _bench(*runs, "--profile", "latency-critical-chatbot", "--plan", plan, "--json", out, "--users", "1000",
               "--think-time", "10")  # fmt: skip
    assert r.returncode == 0, r.stderr
    d = json.loads(out.read_text())
    assert d["schema_version"] == 1 and d["kind"] == "decision"
    assert d["winner"] == "llamacpp" and d["ranking"] == ["llamacpp", "vllm"]
    scores = {s["engine"]: s for s in d["scores"]}
    ttft = scores["llamacpp"]["criteria"]["ttft_p95"]
    assert ttft["raw"] == 800 and ttft["score"] == 5 and "ratio" in ttft["rule"]  # common load: concurrency=8
    assert scores["vllm"]["criteria"]["ttft_p95"]["raw"] == 1200
    assert scores["llamacpp"]["criteria"]["goodput"]["raw"] == 8.0  # not the INVALID point's 900
    assert scores["vllm"]["criteria"]["memory_per_request"]["raw"] is None  # missing, not zero
    assert scores["llamacpp"]["criteria"]["memory_per_request"]["raw"] == pytest.approx(100.0)  # 800 MiB / 8
    assert any("INVALID point(s) ignored" in w for w in d["warnings"])
    assert {w["criterion"] for w in d["sensitivity"]["weights"]} >= {"ttft_p95", "goodput"}
    caps = {c["capacity"]["engine"]: c for c in d["capacity"]}
    # llamacpp: TTFT p95 crosses 500 between c=4 (200) and c=8 (800) → c=6, interpolated
    assert caps["llamacpp"]["capacity"]["sustained_load"] == pytest.approx(6.0)
    assert caps["llamacpp"]["capacity"]["interpolated"] is True
    assert caps["llamacpp"]["extrapolated"] is True and "linearly" in caps["llamacpp"]["replicas"]["note"]
    assert caps["vllm"]["cost"]["usd_per_month"] > 0
    uses = {a["use_case"]["name"]: a for a in d["plan"]["assignments"]}
    # both meet TTFT p95 ≤ 300 (vLLM only at c=1, 1 req/s); llama.cpp sustains more req/s per replica: cheaper
    assert uses["chat"]["chosen"]["engine"] == "llamacpp"
    vllm_chat = next(o for o in uses["chat"]["options"] if o["engine"] == "vllm")
    assert (
        vllm_chat["feasible"]
        and vllm_chat["cost"]["usd_per_month"] > uses["chat"]["chosen"]["cost"]["usd_per_month"]
    )
    assert uses["edge"]["chosen"]["engine"] == "llamacpp"  # vLLM is not an on-device engine
    assert uses["impossible"]["status"] == "unservable" and uses["impossible"]["chosen"] is None
    assert "wrote" in r.stderr and "winner" in r.stdout


def test_bad_weights_file_is_one_line_error(runs: list[Path], tmp_path: Path) -> None:
    w = tmp_path / "w.yaml"
    w.write_text("weights: {ttft_p95: 1, speed: 2}\n")
    r = _bench(*runs, "--weights", w)
    assert r.returncode != 0
    assert "speed" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    r2 = _bench(*runs, "--profile", "nope")
    assert r2.returncode != 0 and "unknown profile 'nope'" in r2.stderr and "Traceback" not in r2.stderr


def test_user_weights_change_the_winner(runs: list[Path], tmp_path: Path) -> None:
    # all weight on operational simplicity: the knowledge file decides (llama.cpp 5, vLLM 3); a user file flips it
    w = tmp_path / "w.json"
    w.write_text(json.dumps({"weights": {"operational_simplicity": 1}}))
    d = decide(DecideConfig(run_dirs=tuple(runs), weights_file=w))
    assert d["winner"] == "llamacpp" and d["weights"]["operational_simplicity"] == 1.0
    kn = tmp_path / "k.yaml"
    kn.write_text("schema_version: 1\nengines:\n  vllm:\n    scores:\n      operational_simplicity: "
                  "{score: 5, source: 'our runbook', date: '2026-11-24'}\n  llamacpp:\n    scores:\n"
                  "      operational_simplicity: {score: 2, source: 'our runbook', date: '2026-11-24'}\n")  # fmt: skip
    d2 = decide(DecideConfig(run_dirs=tuple(runs), weights_file=w, knowledge_file=kn))
    assert d2["winner"] == "vllm"


def test_different_fingerprints_are_never_compared(tmp_path: Path) -> None:
    a = _write_run(tmp_path / "a", {"e1": 1.0}, [_point("e1", 1, 100, 1.0)])
    b = _write_run(tmp_path / "b", {"e2": 1.0}, [_point("e2", 1, 100, 1.0)], fingerprint="sha256:other")
    with pytest.raises(CompareError, match="never compared"):
        decide(DecideConfig(run_dirs=(a, b)))


def _records(
    rd: Any,
    engine: str,
    point: str,
    ttft_s: float,
    n: int = 40,
    gap: float = 0.3,
    control_ttft_s: float | None = None,
) -> None:
    """`n` requests with a known TTFT; with `control_ttft_s`, every 4th is a shared-prefix control (role tags)."""
    from harness.records import RequestRecord

    for i in range(n):
        t = i * gap
        control = control_ttft_s is not None and i % 4 == 3
        tags = {} if control_ttft_s is None else {"role": "control" if control else "reuse"}
        ttft_s_i = control_ttft_s if control and control_ttft_s is not None else ttft_s
        chunks = [t + ttft_s_i + 0.01 * k for k in range(8)]
        rd.append_record(
            RequestRecord(
                request_id=f"{engine}-{point}-{i}", engine=engine, point=point, phase="measure", scheduled=t, sent=t,
                first_byte=t + ttft_s_i * 0.5, chunk_times=chunks, chunk_tokens=[1] * 8, done=chunks[-1] + 0.001,
                prompt_tokens=10, output_tokens=8, token_source="server_usage", client_output_tokens=8,
                expected_input_tokens=10, expected_output_tokens=8, tags=tags,
            )
        )  # fmt: skip


def test_decide_reads_a_summary_written_by_the_harness(tmp_path: Path) -> None:
    """The real writer (RunDir + harness.summary) and this reader agree on the run-directory format."""
    from harness.rundir import RunDir
    from harness.summary import rebuild_summary
    from harness.verdict import VerdictPolicy

    path = tmp_path / "run"
    rd = RunDir.create(path)
    rd.start(
        "run-1",
        engines=[{"name": "eng", "adapter": "llamacpp", "cold_start_s": 1.5}],
        workload={"name": "chat", "version": 1, "fingerprint": "sha256:x", "params": {}},
        load={"kind": "concurrency", "values": [1, 2]},
        slo={"ttft_p95_ms": 150.0},
    )
    _records(rd, "eng", "concurrency=1", 0.100)
    _records(rd, "eng", "concurrency=2", 0.200)
    rd.close()
    rd.finish("complete")
    summary = rebuild_summary(path, policy=VerdictPolicy(min_requests=10, min_duration_s=1.0))
    assert [p.verdict.status for p in summary.points] == ["VALID", "VALID"], [
        p.verdict for p in summary.points
    ]
    d = decide(DecideConfig(run_dirs=(path,), weights_file=None, profile="latency-critical-chatbot"))
    scores = d["scores"][0]["criteria"]
    assert scores["ttft_p95"]["raw"] == pytest.approx(
        200.0, abs=1.0
    )  # the common load of one engine: its heaviest
    assert scores["cold_start"]["raw"] == 1.5
    assert scores["ecosystem"]["score"] == 5  # adapter "llamacpp" found in the knowledge file
    cap = d["capacity"][0]["capacity"]
    assert cap["sustained_load"] == 1 and cap["at_point"] == "concurrency=1" and not cap["interpolated"]


def test_maintenance_mode_engine_is_flagged_and_missing_dir_is_one_line(tmp_path: Path) -> None:
    run = _write_run(tmp_path / "tgi", {"text-generation-inference": 20.0},
                     [_point("text-generation-inference", 1, 100, 1.0)])  # fmt: skip
    d = decide(DecideConfig(run_dirs=(run,)))
    assert any("upstream status is maintenance" in w for w in d["warnings"])
    eco = d["scores"][0]["criteria"]["ecosystem"]
    assert eco["score"] == 1 and eco["source"] and eco["date"] == "2025-12-11"
    r = _bench(tmp_path / "nope")
    assert r.returncode != 0 and "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_prefix_reuse_gain_from_tagged_records_of_a_shared_prefix_run(tmp_path: Path) -> None:
    from harness.rundir import RunDir
    from harness.summary import rebuild_summary
    from harness.verdict import VerdictPolicy

    path = tmp_path / "sp"
    rd = RunDir.create(path)
    rd.start("sp-1", engines=[{"name": "eng", "adapter": "vllm"}],
             workload={"name": "shared-prefix", "version": 1, "fingerprint": "sha256:sp", "params": {}},
             load={"kind": "concurrency", "values": [1]})  # fmt: skip
    _records(rd, "eng", "concurrency=1", 0.100, control_ttft_s=0.400)
    rd.close()
    rd.finish("complete")
    rebuild_summary(path, policy=VerdictPolicy(min_requests=10, min_duration_s=1.0))
    d = decide(DecideConfig(run_dirs=(path,)))
    gain = d["scores"][0]["criteria"]["prefix_reuse_gain"]
    assert gain["raw"] == pytest.approx(4.0, rel=0.01) and "control/reuse" in gain["note"]  # 400 ms / 100 ms


# -- the host sets the price; the decision names what the result depends on ----------------------------------------
def _with_host(run: Path, **host: Any) -> Path:
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["host"].update(host)
    (run / "manifest.json").write_text(json.dumps(manifest))
    return run


@pytest.mark.parametrize(
    ("machine", "cores", "cpu", "memory_mib", "instance"),
    [
        ("x86_64", 2, "AMD EPYC 7B13 64-Core Processor", 800, "aws-m6a.large"),  # x86 AMD: not the Arm m7g
        ("x86_64", 2, "Intel(R) Xeon(R) Platinum 8488C", 800, "aws-m7i.large"),
        ("x86_64", 2, "AMD EPYC 7B13", 12 * 1024, "aws-r6a.large"),  # the engine's peak needs 16 GiB
        ("x86_64", 4, "AMD EPYC 7B13", 800, "aws-m6a.xlarge"),  # 4 cores measured: a 4-vCPU instance
        ("aarch64", 2, "Neoverse-V1", 800, "aws-m7g.large"),
    ],
)
def test_cpu_run_is_priced_on_an_instance_of_the_hosts_architecture_and_size(
    tmp_path: Path, machine: str, cores: int, cpu: str, memory_mib: int, instance: str
) -> None:
    run = _write_run(tmp_path / "run", {"llamacpp": 1.0}, [
        _point("llamacpp", 4, 200, 6.0, memory=memory_mib * 2**20),
    ])  # fmt: skip
    _with_host(run, machine=machine, cores=cores, cpu_model=cpu)
    d = decide(DecideConfig(run_dirs=(run,)))
    cost = d["capacity"][0]["cost"]
    assert cost["instance"] == instance, cost
    price = d["prices"][instance]["usd_per_hour"]
    assert cost["usd_per_month"] == pytest.approx(price * 730)
    arch = "arm64" if machine == "aarch64" else "x86_64"
    assert d["prices"][instance]["arch"] == arch and arch in cost["why"], cost["why"]
    # --instance still wins, and says so
    forced = decide(DecideConfig(run_dirs=(run,), instance="aws-m7g.large"))["capacity"][0]["cost"]
    assert forced["instance"] == "aws-m7g.large" and "--instance" in forced["why"]


def test_decision_notes_name_the_host_facts_and_engine_warnings(runs: list[Path]) -> None:
    _with_host(runs[0], machine="x86_64", cpu_features=["sse4_2", "avx", "avx2", "fma", "f16c"])
    manifest = json.loads((runs[1] / "manifest.json").read_text())
    manifest["host"].update(machine="x86_64", cpu_features=["avx2", "avx512f", "avx512_bf16"])
    manifest["host"]["gpus"] = []
    line = "WARNING 12-07 23:00:01 [utils.py:598] Failed to create oneDNN linear, fallback to torch linear."
    manifest["engines"][0]["log_warnings"] = [
        {
            "id": "onednn_linear_fallback",
            "line": line,
            "count": 30,
            "cost": "several times slower",
            "source": "s",
        }
    ]
    manifest["engines"][0]["dtype_choice"] = {"dtype": "float32", "reason": "no AVX-512 BF16 or AMX"}
    (runs[1] / "manifest.json").write_text(json.dumps(manifest))
    notes = decide(DecideConfig(run_dirs=tuple(runs)))["notes"]
    text = "\n".join(notes)
    assert "avx2" in text and "without avx512f, avx512_bf16, amx_bf16" in text  # the AVX2-only host
    assert "without amx_bf16" in text  # the AVX-512 BF16 host lacks only AMX
    assert any(n.startswith("vllm logged") and "oneDNN linear" in n and "30 times" in n for n in notes), notes
    assert "vllm ran in float32 (no AVX-512 BF16 or AMX)" in notes


def test_the_brief_answer_gives_winner_reasons_with_numbers_and_costs(
    runs: list[Path], tmp_path: Path
) -> None:
    from rich.console import Console

    from harness.decide import decision_reasons, render_brief

    for run in runs:
        _with_host(run, machine="x86_64", cores=2, cpu_model="AMD EPYC 7B13")
    d = decide(DecideConfig(run_dirs=tuple(runs), profile="latency-critical-chatbot"))
    reasons = decision_reasons(d)
    assert 1 <= len(reasons) <= 3 and all(r["winner"] == "llamacpp" and r["other"] == "vllm" for r in reasons)
    ttft = next(r for r in reasons if r["criterion"] == "ttft_p95")  # 800 ms vs 1,200 ms at the common load
    assert (ttft["winner_raw"], ttft["other_raw"]) == (800, 1200)
    console = Console(width=200, record=True)
    report = tmp_path / "report.html"
    render_brief(d, console, report=report)
    out = console.export_text()
    assert "Run llamacpp for this workload on this machine" in out
    assert "ttft_p95 (weight" in out and "llamacpp 800 ms vs vllm 1,200 ms" in out
    cost_lines = [ln for ln in out.splitlines() if "$" in ln and "/month" in ln]
    assert len(cost_lines) == 2 and all("on aws-m6a.large ($0.0864/h)" in ln for ln in cost_lines), out
    assert f"decision report: {report}" in out
