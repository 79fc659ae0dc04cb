"""Telemetry on real engines and real hardware: `bench run` launches llama.cpp / vLLM here, and the summary's
telemetry must show plausible memory and engine metrics and a reconciliation that holds (token counters equal
exactly, TTFT within the engine histogram's resolution). NVML is read for real only where a GPU exists.

Skips (with the reason) when an engine is not installed (`bench engines install vllm llamacpp`) or there is no GPU.
vLLM takes ~30-60 s to start here, so it is run once.
"""

from __future__ import annotations

import itertools
import subprocess
import sys
from pathlib import Path
from typing import Any

import orjson
import pytest

from adapters import registry
from harness.gpu import open_nvml
from harness.telemetry import read_telemetry

MB = 2**20


def run_engine(name: str, out: Path, requests: int = 20) -> dict[str, Any]:
    """`bench run` against a launched engine; returns the point's telemetry summary (asserting it ran)."""
    avail = registry.availability(registry.get(name))
    if not avail.runnable:
        pytest.skip(f"{name} cannot run here: {avail.reason}")
    r = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", "--engines", name, "--workload", "synthetic",
         "--set", "output_tokens=16", "--concurrency", "2", "--requests", str(requests), "--out", str(out)],
        capture_output=True, text=True, timeout=480,
    )  # fmt: skip
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    summary = orjson.loads((out / "summary.json").read_bytes())
    (point,) = summary["points"]
    assert point["telemetry"] is not None, "no telemetry in the summary"
    return dict(point["telemetry"])


def check_common(tel: dict[str, Any], out: Path, engine: str, rss_range: tuple[int, int]) -> None:
    low, high = rss_range
    assert low <= tel["engine_rss_peak_bytes"] <= high, tel["engine_rss_peak_bytes"] / MB
    assert low <= tel["engine_rss_mean_bytes"] <= tel["engine_rss_peak_bytes"]
    assert tel["engine_cpu_mean_cores"] is not None and 0 < tel["engine_cpu_mean_cores"] <= 2.5
    assert tel["samples"] >= 2
    assert "gpu" in tel["skipped"] or tel["gpu_memory_peak_bytes"] is not None
    if tel["kv_cache_usage_peak"] is not None:
        assert 0.0 <= tel["kv_cache_usage_peak"] <= 1.0
    assert tel["requests_running_peak"] is not None and 1 <= tel["requests_running_peak"] <= 2
    assert tel["sampler_overhead"] is not None and tel["sampler_overhead"] < 0.2
    counts = {c["metric"]: c for c in tel["reconciliation"]["counts"]}
    gen = counts["generation_tokens_total"]
    assert gen["verdict"] == "agree" and gen["engine"] == gen["client"] > 0, gen
    prompt = counts["prompt_tokens_total"]
    assert prompt["verdict"] == "agree", prompt
    # the time series is on disk, on the records' clock
    lines = read_telemetry(out)[engine]
    samples = [ln for ln in lines if ln["kind"] == "sample"]
    assert all(ln["schema_version"] == 1 and ln["point"] == "concurrency=2" for ln in samples)
    assert all(a["t"] < b["t"] for a, b in itertools.pairwise(samples))


@pytest.mark.live
@pytest.mark.slow  # ~10 s on a quiet machine, minutes on a busy one
@pytest.mark.timeout(480)
def test_llamacpp_telemetry(tmp_path: Path) -> None:
    out = tmp_path / "run"
    tel = run_engine("llamacpp", out, requests=12)
    # llama-server with the 98 MB SmolLM2 GGUF and a 16k-token KV cache: ~0.5-1 GB
    check_common(tel, out, "llamacpp", (100 * MB, 2 * 2**30))
    assert tel["engine_processes"] == 1
    assert tel["prefix_cache_hit_rate"] is None or 0.0 <= tel["prefix_cache_hit_rate"] <= 1.0


@pytest.mark.live
@pytest.mark.slow
@pytest.mark.timeout(600)
def test_vllm_telemetry(tmp_path: Path) -> None:
    out = tmp_path / "run"
    tel = run_engine("vllm", out, requests=30)
    # vLLM's CPU build: API server + engine core (+ helpers), several GB together
    check_common(tel, out, "vllm", (1 * 2**30, 20 * 2**30))
    assert tel["engine_processes"] >= 2
    assert tel["kv_cache_usage_peak"] is not None and 0.0 < tel["kv_cache_usage_peak"] <= 1.0
    assert tel["prefix_cache_hit_rate"] is not None and 0.0 <= tel["prefix_cache_hit_rate"] <= 1.0
    assert tel["preemptions"] == 0.0
    rec = tel["reconciliation"]
    finished = {c["metric"]: c for c in rec["counts"]}["requests_finished_total"]
    assert finished["verdict"] == "agree" and finished["engine"] == rec["requests"]
    assert rec["engine_ttft_count"] == rec["client_ttft_count"] == rec["requests"]
    for check in rec["ttft"]:
        assert check["verdict"] == "agree", check["reason"]
        assert check["client_ms"] >= check["engine_low_ms"] - check["tolerance_ms"]
    assert rec["status"] == "agree"


@pytest.mark.live
def test_real_nvml_where_a_gpu_exists() -> None:
    nvml, why = open_nvml()
    if nvml is None:
        pytest.skip(f"no GPU telemetry here: {why}")
    try:
        readings = nvml.read()
    finally:
        nvml.close()
    assert len(readings) == nvml.count >= 1
    for g in readings:
        assert 0 < g.memory_used_bytes <= g.memory_total_bytes
        assert g.util_gpu is None or 0.0 <= g.util_gpu <= 1.0
        assert g.power_w is None or 0.0 < g.power_w < 2000.0
