"""Energy per token and per-process GPU memory: the arithmetic against known readings, then the sampler against the
stand-in NVML (tests/fakes/pynvml_standin.py, injected; scripted power, energy counter and process lists), and the
summary, table footer, decision criterion and cost built on them."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path
from typing import Any

import orjson
import psutil
import pytest

from harness.records import RequestRecord
from harness.telemetry import (
    EngineTelemetry,
    energy_line,
    gpu_energy,
    gpu_memory_share,
    summarize_telemetry,
)
from tests.fakes.pynvml_standin import FakeGpu, StandInNvml

MB = 2**20


def sample(t: float, *gpus: dict[str, Any], repeat: int | None = None) -> dict[str, Any]:
    line: dict[str, Any] = {"kind": "sample", "point": "p", "t": t, "gpus": list(gpus)}
    if repeat is not None:
        line["repeat"] = repeat
    return line


def gpu(index: int, power_w: float | None, energy_mj: int | None = None, **more: Any) -> dict[str, Any]:
    return {"index": index, "memory_used_bytes": 0, "memory_total_bytes": 1, "power_w": power_w,
            "energy_mj": energy_mj, **more}  # fmt: skip


def record(rid: str, at: float, tokens: int, status: str = "ok") -> RequestRecord:
    return RequestRecord(rid, "e", "p", "measure", scheduled=at, sent=at, chunk_times=[at + 0.1],
                         chunk_tokens=[tokens], done=at + 0.2, output_tokens=tokens, token_source="server_usage",
                         status=status)  # type: ignore[arg-type]  # fmt: skip


# ------------------------------------------------------------------------------------------------- arithmetic


def test_trapezoid_per_gpu_over_known_readings() -> None:
    # GPU 0: 100, 200, 300 W at t = 0, 1, 3 s -> (100+200)/2·1 + (200+300)/2·2 = 150 + 500 = 650 J
    # GPU 1: 50 W throughout -> 150 J. Window 3 s, samples 1.5 s apart on average.
    lines = [
        sample(10.0, gpu(0, 100.0), gpu(1, 50.0)),
        sample(11.0, gpu(0, 200.0), gpu(1, 50.0)),
        sample(13.0, gpu(0, 300.0), gpu(1, 50.0)),
    ]
    e = gpu_energy(lines)
    assert e is not None
    assert e.by_gpu_j == pytest.approx((650.0, 150.0), abs=1e-9)
    assert e.total_j == pytest.approx(800.0, abs=1e-9)
    assert e.window_s == pytest.approx(3.0) and e.interval_s == pytest.approx(1.5)
    assert e.mean_w == pytest.approx(800.0 / 3.0) and e.peak_w == pytest.approx(350.0)
    assert e.coverage == pytest.approx(1.0) and e.counter_j is None  # no counter in these readings


def test_repeats_are_separate_segments_and_the_gap_between_them_is_not_integrated() -> None:
    lines = [
        sample(0.0, gpu(0, 100.0), repeat=0),
        sample(2.0, gpu(0, 100.0), repeat=0),
        sample(50.0, gpu(0, 400.0), repeat=1),  # 48 s later: an idle gap that must not count
        sample(51.0, gpu(0, 200.0), repeat=1),
    ]
    e = gpu_energy(lines)
    assert e is not None
    assert e.total_j == pytest.approx(100.0 * 2 + 300.0 * 1)  # 200 + 300 J
    assert e.window_s == pytest.approx(3.0) and e.windows == ((0.0, 2.0), (50.0, 51.0))


def test_a_missing_reading_is_bridged_inside_and_shortens_coverage_at_the_edge() -> None:
    inside = [sample(0.0, gpu(0, 100.0)), sample(1.0, gpu(0, None)), sample(2.0, gpu(0, 300.0))]
    e = gpu_energy(inside)
    assert e is not None and e.total_j == pytest.approx(400.0) and e.coverage == pytest.approx(1.0)
    edge = [sample(0.0, gpu(0, None)), sample(1.0, gpu(0, 100.0)), sample(3.0, gpu(0, 100.0))]
    e = gpu_energy(edge)
    assert e is not None and e.total_j == pytest.approx(200.0) and e.coverage == pytest.approx(2.0 / 3.0)
    assert gpu_energy([sample(0.0, gpu(0, None)), sample(1.0, gpu(0, None))]) is None  # no power at all
    assert gpu_energy([sample(0.0, gpu(0, 100.0))]) is None  # one sample spans no time


def test_the_energy_counter_is_read_over_the_same_window() -> None:
    lines = [
        sample(0.0, gpu(0, 100.0, 5_000_000), gpu(1, 100.0, 7_000_000)),
        sample(2.0, gpu(0, 100.0, 5_210_000), gpu(1, 100.0, 7_190_000)),
    ]
    e = gpu_energy(lines)
    assert e is not None and e.total_j == pytest.approx(400.0) and e.counter_j == pytest.approx(400.0)


def test_energy_per_token_and_request_from_the_points_successful_requests() -> None:
    lines = [sample(1.0, gpu(0, 200.0)), sample(6.0, gpu(0, 200.0))]  # 1000 J over 5 s
    recs = [
        record("a", 1.5, 100),
        record("b", 2.0, 150),
        record("c", 3.0, 250),
        record("failed", 3.5, 40, status="http_error"),  # drew power, delivered nothing: not a divisor
        record("before", 0.5, 999),  # sent before the window (an earlier attempt of a resumed point)
    ]
    s = summarize_telemetry(lines, "p", recs)
    assert s is not None
    assert s.gpu_energy_j == pytest.approx(1000.0) and s.gpu_energy_window_s == pytest.approx(5.0)
    assert (s.energy_requests, s.energy_output_tokens) == (3, 500)
    assert s.energy_per_output_token_j == pytest.approx(2.0)
    assert s.energy_per_request_j == pytest.approx(1000.0 / 3)
    assert s.gpu_power_mean_w == pytest.approx(200.0) and s.gpu_power_peak_w == pytest.approx(200.0)
    line = energy_line("e", "p", s)
    assert line is not None and "2 J/token" in line and "333 J/request" in line and "mean 200 W" in line
    assert energy_line("e", "p", summarize_telemetry([sample(1.0, gpu(0, None))], "p")) is None


# ------------------------------------------------------------------------------------------------- GPU processes


def test_the_engines_gpu_memory_is_told_apart_from_other_tenants() -> None:
    def procs(engine_bytes: int, other_bytes: int) -> list[dict[str, Any]]:
        return [{"pid": 10, "used_bytes": engine_bytes, "engine": True},
                {"pid": 11, "used_bytes": other_bytes, "engine": False}]  # fmt: skip

    lines = [
        sample(
            0.0, gpu(0, 1.0, processes=procs(100 * MB, 900 * MB)), gpu(1, 1.0, processes=procs(50 * MB, 0))
        ),
        sample(
            1.0, gpu(0, 1.0, processes=procs(300 * MB, 700 * MB)), gpu(1, 1.0, processes=procs(50 * MB, 0))
        ),
    ]
    share = gpu_memory_share(lines)
    assert share is not None and share.basis == "process" and share.reason is None
    assert share.engine_peak_bytes == 350 * MB and share.engine_mean_bytes == pytest.approx(250 * MB)
    assert share.others_peak_bytes == 900 * MB


@pytest.mark.parametrize(
    ("processes", "why"),
    [
        (None, "does not list the compute processes"),
        ([{"pid": 7, "used_bytes": 1}], "attached endpoint"),
        ([{"pid": 7, "used_bytes": 1, "engine": False}], "none in the engine's process tree"),
        ([{"pid": 7, "used_bytes": None, "engine": True}], "cannot tell"),
    ],
)
def test_device_totals_with_the_reason_where_the_engine_cannot_be_told_apart(
    processes: list[dict[str, Any]] | None, why: str
) -> None:
    g = gpu(0, 1.0) if processes is None else gpu(0, 1.0, processes=processes)
    share = gpu_memory_share([sample(0.0, g)])
    assert share is not None and share.basis == "device" and share.reason is not None and why in share.reason
    assert share.engine_peak_bytes is None
    old = {
        k: v for k, v in g.items() if k != "energy_mj"
    }  # a line written before energy and processes were read
    share = gpu_memory_share([sample(0.0, old)])
    assert share is not None and share.basis == "device" and share.reason is not None
    assert ("recorded before" in share.reason) == (processes is None)


# ------------------------------------------------------------------------------------------------- the sampler


async def test_sampler_integrates_standin_power_over_the_whole_point(tmp_path: Path) -> None:
    me = os.getpid()
    lib = StandInNvml(
        [
            FakeGpu(power_mw=300_000, processes=[(me, 400 * MB), (4_000_000, 2_000 * MB)]),
            FakeGpu(power_mw=[100_000, 200_000, 300_000, 400_000, 500_000, 600_000], processes=None),
        ]
    )
    tel = EngineTelemetry(
        tmp_path, "e", time.perf_counter(), nvml_lib=lib, interval_s=0.05,
        processes=lambda: [psutil.Process(me)],
    )  # fmt: skip
    async with tel.point("p"):
        t0 = time.perf_counter() - tel.zero  # the point's requests start here, after the start scrape
        await asyncio.sleep(0.3)
        t1 = time.perf_counter() - tel.zero
    lines = [orjson.loads(x) for x in (tmp_path / "telemetry" / "e.jsonl").read_bytes().splitlines()]
    samples = [ln for ln in lines if ln["kind"] == "sample"]
    ts = [s["t"] for s in samples]
    # the first sample as the point starts, the last as it ends: the window is the point's, within a tick
    assert abs(ts[0] - t0) < 0.05 and 0 <= ts[-1] - t1 < 0.05 and len(samples) >= 4
    # GPU 1's script: the k-th sample read the k-th value (the last repeats); the truth is the trapezoid over them
    script = [100.0, 200.0, 300.0, 400.0, 500.0, 600.0]
    p1 = [script[min(k, 5)] for k in range(len(samples))]
    assert [s["gpus"][1]["power_w"] for s in samples] == p1
    truth1 = sum((a + b) / 2 * (tb - ta) for a, b, ta, tb in zip(p1, p1[1:], ts, ts[1:], strict=False))
    s = summarize_telemetry(lines, "p")
    assert s is not None and s.gpu_energy_by_gpu_j == pytest.approx([300.0 * (ts[-1] - ts[0]), truth1])
    assert s.gpu_power_peak_w == pytest.approx(300.0 + max(p1))
    # per-process memory: GPU 1 lists no processes, so the engine cannot be told apart on every GPU
    assert s.gpu_memory_basis == "device" and "does not list" in (s.gpu_memory_basis_reason or "")
    assert samples[0]["gpus"][0]["processes"] == [
        {"pid": me, "used_bytes": 400 * MB, "engine": True},
        {"pid": 4_000_000, "used_bytes": 2_000 * MB, "engine": False},
    ]


async def test_sampler_reports_the_engines_own_gpu_memory(tmp_path: Path) -> None:
    me = os.getpid()
    lib = StandInNvml(
        [FakeGpu(memory_used=(3_000 * MB,), processes=[(me, 700 * MB), (4_000_000, 2_000 * MB)])]
    )
    tel = EngineTelemetry(tmp_path, "e", time.perf_counter(), nvml_lib=lib, interval_s=0.05,
                          processes=lambda: [psutil.Process(me)])  # fmt: skip
    async with tel.point("p"):
        await asyncio.sleep(0.12)
    lines = [orjson.loads(x) for x in (tmp_path / "telemetry" / "e.jsonl").read_bytes().splitlines()]
    s = summarize_telemetry(lines, "p")
    assert s is not None and s.gpu_memory_basis == "process"
    assert s.gpu_memory_engine_peak_bytes == 700 * MB and s.gpu_memory_others_peak_bytes == 2_000 * MB
    assert s.gpu_memory_peak_bytes == 3_000 * MB  # the device total stays what it was


# ------------------------------------------------------------------------------------------------- decision, cost


def _summary_point(
    engine: str, conc: int, j_per_token: float | None, *, engine_gpu_mib: float
) -> dict[str, Any]:
    stats = {"count": 50, "mean": 100.0, "p50": 90.0, "p90": 120.0, "p95": 130.0, "p99": 150.0, "max": 160.0}
    telemetry: dict[str, Any] = {
        "samples": 20, "gpu_memory_peak_bytes": 70 * 2**30, "gpu_memory_engine_peak_bytes": engine_gpu_mib * MB,
        "gpu_memory_basis": "process",
    }  # fmt: skip
    if j_per_token is not None:
        telemetry |= {"gpu_energy_j": 1000.0, "energy_per_output_token_j": j_per_token}
    return {
        "engine": engine, "point": f"concurrency={conc}", "workload_fingerprint": "sha256:w",
        "load": {"kind": "concurrency", "value": conc, "closed_loop": True}, "duration_s": 20.0,
        "requests": {"total": 50, "measured": 50, "ok": 50, "failed": 0, "warmup": 0, "cooldown": 0},
        "errors": {}, "error_rate": 0.0, "ttft_ms": stats, "itl_ms": stats, "tpot_ms": stats, "e2e_ms": stats,
        "send_lag_ms": stats, "requests_per_s": 2.0 * conc, "input_tokens_per_s": 100.0 * conc,
        "output_tokens_per_s": 50.0 * conc, "total_tokens_per_s": 150.0 * conc,
        "verdict": {"status": "VALID", "reasons": []}, "telemetry": telemetry,
    }  # fmt: skip


def _gpu_run(d: Path, engine: str, points: list[dict[str, Any]]) -> Path:
    d.mkdir(parents=True)
    manifest = {
        "schema_version": 1, "kind": "manifest", "run_id": d.name, "started_at": "2026-12-07T00:00:00+00:00",
        "clock_anchor": {"wall": 1.0, "perf": 1.0}, "status": "complete", "command": ["bench", "run"],
        "host": {"hostname": "h", "os": "linux", "python": "3.11", "cpu_model": None, "cores": 16,
                 "memory_bytes": None, "gpus": [{"name": "NVIDIA H100", "vendor": "nvidia"}]},
        "engines": [{"name": engine, "adapter": engine, "mode": "launched", "cold_start_s": 5.0}],
        "workload": {"name": "synthetic", "version": 1, "fingerprint": "sha256:w", "params": {}},
        "load": {"kind": "concurrency", "values": [1, 4]}, "slo": {},
    }  # fmt: skip
    summary = {
        "schema_version": 1,
        "kind": "summary",
        "run_id": d.name,
        "generated_by": "test",
        "points": points,
    }
    (d / "manifest.json").write_text(orjson.dumps(manifest).decode())
    (d / "summary.json").write_text(orjson.dumps(summary).decode())
    recs = [record(f"r{i}", 1.0, 16) for i in range(len(points))]
    for r, p in zip(recs, points, strict=True):
        r.engine, r.point = engine, p["point"]
    (d / "records.jsonl").write_bytes(b"".join(orjson.dumps(r.to_dict()) + b"\n" for r in recs))
    return d


def test_decide_ranks_energy_per_token_at_the_common_load_and_prices_it(tmp_path: Path) -> None:
    from harness.decide import DecideConfig, decide

    a = _gpu_run(tmp_path / "a", "vllm", [
        _summary_point("vllm", 1, 3.0, engine_gpu_mib=800), _summary_point("vllm", 4, 0.9, engine_gpu_mib=1200),
    ])  # fmt: skip
    b = _gpu_run(tmp_path / "b", "sglang", [
        _summary_point("sglang", 1, 2.0, engine_gpu_mib=600), _summary_point("sglang", 4, 1.8, engine_gpu_mib=800),
        _summary_point("sglang", 8, 0.1, engine_gpu_mib=900),  # no other engine ran c=8: not the common load
    ])  # fmt: skip
    c = _gpu_run(tmp_path / "c", "tgi", [_summary_point("tgi", 4, None, engine_gpu_mib=500)])  # no power
    weights = tmp_path / "w.yaml"
    weights.write_text("weights: {energy_per_token: 1}\n")
    d = decide(DecideConfig(run_dirs=(a, b, c), weights_file=weights, usd_per_kwh=0.15))
    scores = {s["engine"]: s["criteria"] for s in d["scores"]}
    assert scores["vllm"]["energy_per_token"]["raw"] == pytest.approx(0.9)  # at concurrency=4, common to both
    assert scores["sglang"]["energy_per_token"]["raw"] == pytest.approx(1.8)
    assert scores["tgi"]["energy_per_token"]["raw"] is None  # missing, not zero
    assert d["ranking"][:2] == ["vllm", "sglang"]
    # the engine's own GPU memory (not the device's 70 GiB) per request in flight: 1200 MiB / 4
    assert scores["vllm"]["memory_per_request"]["raw"] == pytest.approx(300.0)
    rows = {r["capacity"]["engine"]: r for r in d["capacity"]}
    e = rows["vllm"]["energy_cost"]
    # no SLO: capacity is the heaviest valid point, c=4, 200 output tokens/s at 0.9 J/token
    assert e["at_point"] == "concurrency=4" and e["j_per_output_token"] == pytest.approx(0.9)
    assert e["kwh_per_1m_output_tokens"] == pytest.approx(0.9e6 / 3.6e6)  # 0.25 kWh
    assert e["usd_per_1m_output_tokens"] == pytest.approx(0.25 * 0.15)
    assert e["usd_per_month"] == pytest.approx(0.9 * 200 * 3600 * 730 / 3.6e6 * 0.15)  # 131.4 kWh → $19.71
    assert e["price_source"] == "--usd-per-kwh" and d["inputs"]["energy_price"]["usd_per_kwh"] == 0.15
    assert "not priced" in rows["tgi"]["energy_cost"]["note"]


def test_energy_price_from_a_price_table_needs_a_source(tmp_path: Path) -> None:
    from harness.errors import ConfigError
    from matrix.cost import energy_price

    assert (
        energy_price({"usd_per_kwh": 0.12, "source": "my utility bill", "date": "2026-11"}, "p.yaml")
        is not None
    )
    with pytest.raises(ConfigError, match="energy needs a `source`"):
        energy_price({"usd_per_kwh": 0.12}, "p.yaml")
    with pytest.raises(ConfigError, match="must be a number"):
        energy_price({"usd_per_kwh": "cheap", "source": "x"}, "p.yaml")
    assert energy_price(None, "p.yaml") is None


def test_the_report_shows_energy_per_point_and_says_when_it_was_not_recorded(tmp_path: Path) -> None:
    from reports.html import ReportConfig, build_report, render_report

    gpu_run = _gpu_run(tmp_path / "gpu", "vllm", [_summary_point("vllm", 4, 0.9, engine_gpu_mib=1200)])
    cpu_point = _summary_point("llamacpp", 4, None, engine_gpu_mib=0)
    cpu_point["telemetry"] = {"samples": 10, "engine_rss_peak_bytes": 2**30}
    cpu_run = _gpu_run(tmp_path / "cpu", "llamacpp", [cpu_point])
    html = render_report(build_report(ReportConfig(run_dirs=(gpu_run,))))
    table = html.split('<table class="energy">', 1)[1].split("</table>", 1)[0]
    assert "0.9" in table and "1.2 GiB" in table and "engine&#39;s processes" in table
    html = render_report(build_report(ReportConfig(run_dirs=(cpu_run,))))
    assert "energy-not-recorded" in html and '<table class="energy">' not in html
