"""The telemetry sampler against real parts: a stand-in NVML library (injected, scripted readings), real processes
read through psutil, a real `/metrics` server on loopback serving vLLM's own exposition text, the scripted server
(exact token counts), and real run directories on disk."""

from __future__ import annotations

import asyncio
import math
import os
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web

from adapters import scripted, vllm
from adapters.process import EngineProcess
from adapters.prometheus import Histogram, delta, scrape
from harness.calibration import Faults, ScriptConfig, ScriptedServer, serve_in_process
from harness.client import Target
from harness.errors import SchemaError
from harness.gpu import Nvml, open_nvml
from harness.records import RequestRecord
from harness.rundir import TruncatedLineWarning
from harness.runner import StopRule, run_point
from harness.telemetry import (
    EngineTelemetry,
    decode_values,
    encode_values,
    point_delta,
    read_telemetry,
    summarize_telemetry,
)
from tests.fakes.pynvml_standin import FakeGpu, StandInNvml
from workloads.arrival import LoadPoint
from workloads.spec import RequestSpec

FIXTURES = Path(__file__).parent / "fixtures" / "metrics"
MB = 2**20


def lines_of(path: Path) -> list[dict[str, Any]]:
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


# ------------------------------------------------------------------------------------------------- NVML


def test_nvml_reads_the_standin_through_the_pynvml_interface() -> None:
    lib = StandInNvml(
        [FakeGpu(memory_used=(3 * 2**30,)), FakeGpu(name=b"Old Board", util_gpu=10, power_mw=None)]  # type: ignore[arg-type]
    )
    nvml = Nvml.open(lib)
    assert nvml.count == 2 and nvml.names == ["NVIDIA Stand-in 80GB", "Old Board"]  # bytes names decoded
    a, b = nvml.read()
    assert (a.memory_used_bytes, a.memory_total_bytes) == (3 * 2**30, 80 * 2**30)
    assert (a.util_gpu, a.util_memory, a.power_w) == (0.5, 0.2, 250.0)
    assert b.util_gpu == 0.1 and b.power_w is None  # NVMLError "Not Supported" -> None, not a failure
    nvml.close()
    nvml.close()
    assert lib.initialised == 0 and lib.shutdowns == 1


def test_no_driver_or_no_gpu_gives_a_reason_not_an_error() -> None:
    nvml, why = open_nvml(StandInNvml(init_error=12))
    assert nvml is None and why is not None and "NVML Shared Library Not Found" in why
    empty = StandInNvml([])
    nvml, why = open_nvml(empty)
    assert nvml is None and why == "NVML found no GPU" and empty.initialised == 0  # shut down again


async def test_sampler_records_every_gpu_and_summarizes_exact_peak_and_mean(tmp_path: Path) -> None:
    script0 = [10 * MB * k for k in (1, 4, 9, 2, 7, 5, 3, 8, 6, 6)]
    script1 = [100 * MB] * 10
    lib = StandInNvml(
        [FakeGpu(memory_used=script0), FakeGpu(memory_used=script1, util_gpu=30, power_mw=100_000)]
    )
    tel = EngineTelemetry(tmp_path, "e", time.perf_counter(), nvml_lib=lib, interval_s=0.02)
    async with tel.point("concurrency=1"):
        await asyncio.sleep(0.12)
    lines = lines_of(tmp_path / "telemetry" / "e.jsonl")
    samples = [ln for ln in lines if ln["kind"] == "sample"]
    n = len(samples)
    assert 3 <= n <= 10
    used = [script0[min(i, 9)] + script1[min(i, 9)] for i in range(n)]
    assert [sum(g["memory_used_bytes"] for g in s["gpus"]) for s in samples] == used
    assert all(s["point"] == "concurrency=1" and s["schema_version"] == 1 for s in samples)
    assert [s["t"] for s in samples] == sorted(s["t"] for s in samples)
    assert lib.initialised == 0  # NVML shut down at the point's end
    summary = summarize_telemetry(lines, "concurrency=1")
    assert summary is not None and summary.samples == n
    assert summary.gpu_count == 2 and summary.gpu_memory_total_bytes == 160 * 2**30
    assert summary.gpu_memory_peak_bytes == max(used)
    assert summary.gpu_memory_mean_bytes == pytest.approx(sum(used) / n)
    assert summary.gpu_util_mean == pytest.approx(0.4) and summary.gpu_power_mean_w == pytest.approx(350.0)
    assert summary.skipped == {
        "process": "no local engine process to read",
        "engine_metrics": "the engine exposes no Prometheus metrics",
    }
    sampler = next(ln for ln in lines if ln["kind"] == "sampler")
    assert sampler["ticks"] == n and sampler["cpu_s"] >= 0 and summary.sampler_cpu_s == sampler["cpu_s"]


async def test_a_missing_gpu_is_noted_once_per_engine(tmp_path: Path) -> None:
    events: list[dict[str, Any]] = []
    tel = EngineTelemetry(
        tmp_path, "e", time.perf_counter(), nvml_lib=StandInNvml(init_error=12), interval_s=0.02,
        on_event=lambda e: events.append(dict(e)),
    )  # fmt: skip
    for point in ("concurrency=1", "concurrency=2"):
        async with tel.point(point):
            await asyncio.sleep(0.05)
    lines = lines_of(tmp_path / "telemetry" / "e.jsonl")
    skipped = [ln for ln in lines if ln["kind"] == "source_skipped"]
    assert sorted(ln["source"] for ln in skipped) == ["engine_metrics", "gpu", "process"]
    assert sorted(e["source"] for e in events) == ["engine_metrics", "gpu", "process"]
    assert all(e["kind"] == "telemetry_skipped" and e["engine"] == "e" for e in events)
    for point in ("concurrency=1", "concurrency=2"):
        s = summarize_telemetry(lines, point)
        assert s is not None and "NVML Shared Library Not Found" in s.skipped["gpu"]
        assert s.gpu_memory_peak_bytes is None and s.samples >= 1


# ------------------------------------------------------------------------------------------------- processes

TREE = """
import subprocess, sys, time
ballast = bytearray({parent_mb} * 2**20)
child = subprocess.Popen([sys.executable, "-c", '''
import time
ballast = bytearray({child_mb} * 2**20)
print("child ready", flush=True)
while True:
    pass  # spin: one core's worth of CPU
'''])
time.sleep(3600)
"""


@pytest.fixture
def tree(tmp_path: Path) -> Iterator[EngineProcess]:
    argv = [sys.executable, "-c", TREE.format(parent_mb=150, child_mb=100)]
    proc = EngineProcess("tree", argv, dict(os.environ), tmp_path / "tree.log")
    proc.start()
    try:
        deadline = time.monotonic() + 20
        while b"child ready" not in (tmp_path / "tree.log").read_bytes():
            assert time.monotonic() < deadline, "the test's process tree did not start"
            time.sleep(0.05)
        yield proc
    finally:
        proc.stop()


async def test_process_tree_rss_is_summed_and_cpu_measured(tmp_path: Path, tree: EngineProcess) -> None:
    tel = EngineTelemetry(tmp_path, "e", time.perf_counter(), processes=tree.tree, gpu=False, interval_s=0.1)
    async with tel.point("concurrency=1"):
        await asyncio.sleep(1.0)
    s = summarize_telemetry(lines_of(tmp_path / "telemetry" / "e.jsonl"), "concurrency=1")
    assert s is not None and s.engine_processes == 2
    # 250 MB of touched ballast in two interpreters (each ~10-40 MB of its own)
    assert s.engine_rss_peak_bytes is not None and 250 * MB < s.engine_rss_peak_bytes < 250 * MB + 100 * MB
    assert (
        s.engine_rss_mean_bytes is not None and 250 * MB < s.engine_rss_mean_bytes <= s.engine_rss_peak_bytes
    )
    # PSS (start and end only) counts the interpreters' shared pages once: at most the RSS sum, still the ballast
    assert s.engine_pss_bytes is not None and 250 * MB < s.engine_pss_bytes <= s.engine_rss_peak_bytes
    # a spinning child: some CPU (the machine is shared, so not necessarily a whole core), never more than 2 cores
    assert s.engine_cpu_mean_cores is not None and 0.1 < s.engine_cpu_mean_cores < 2.1
    assert s.skipped["gpu"] == "GPU telemetry turned off"


# ------------------------------------------------------------------------------------------------- /metrics


class MetricsServer:
    def __init__(self, text: str) -> None:
        self.text, self.hits, self.url = text, 0, ""

    async def handle(self, request: web.Request) -> web.Response:
        self.hits += 1
        return web.Response(text=self.text, content_type="text/plain")


@pytest.fixture
async def metrics_server() -> AsyncIterator[MetricsServer]:
    srv = MetricsServer((FIXTURES / "vllm_before.prom").read_text())
    app = web.Application()
    app.router.add_get("/metrics", srv.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    srv.url = f"http://127.0.0.1:{port}/metrics"
    try:
        yield srv
    finally:
        await runner.cleanup()


def _vllm_texts() -> tuple[str, str, str]:
    before = (FIXTURES / "vllm_before.prom").read_text()
    after = (FIXTURES / "vllm_after.prom").read_text()
    labels = '{engine="0",model_name="SmolLM2-135M-Instruct"}'
    after = after.replace(
        f"vllm:prefix_cache_hits_total{labels} 0.0", f"vllm:prefix_cache_hits_total{labels} 64.0"
    )
    after = after.replace(
        f"vllm:num_preemptions_total{labels} 0.0", f"vllm:num_preemptions_total{labels} 2.0"
    )
    during = after.replace(f"vllm:kv_cache_usage_perc{labels} 0.0", f"vllm:kv_cache_usage_perc{labels} 0.37")
    during = during.replace(
        f"vllm:num_requests_running{labels} 0.0", f"vllm:num_requests_running{labels} 3.0"
    )
    return before, during, after


async def test_scrapes_give_exact_deltas_and_samples_the_gauges(
    tmp_path: Path, metrics_server: MetricsServer
) -> None:
    before, during, after = _vllm_texts()
    tel = EngineTelemetry(
        tmp_path, "vllm", time.perf_counter(), metrics_url=metrics_server.url, metric_map=vllm.METRICS,
        gpu=False, interval_s=0.02, settle_s=1.0,
    )  # fmt: skip
    sampler = await tel.start_point("concurrency=4")
    metrics_server.text = during
    await asyncio.sleep(0.15)
    metrics_server.text = after
    await sampler.stop()
    lines = lines_of(tmp_path / "telemetry" / "vllm.jsonl")
    scrapes = {ln["at"]: ln for ln in lines if ln["kind"] == "scrape"}
    assert decode_values(scrapes["start"]["metrics"]) == scrape(before, vllm.METRICS)
    assert decode_values(scrapes["end"]["metrics"]) == scrape(after, vllm.METRICS)
    truth = delta(scrape(before, vllm.METRICS), scrape(after, vllm.METRICS))
    assert point_delta(lines) == truth
    ttft = truth["ttft_seconds"]
    assert isinstance(ttft, Histogram) and ttft.count == 4.0

    # periodic samples keep only gauge and counter lines, and parse them to the same values as a whole scrape
    whole = {k: v for k, v in scrape(during, vllm.METRICS).items() if not isinstance(v, Histogram)}
    seen = [ln["engine"] for ln in lines if ln["kind"] == "sample" and ln["engine"].get("kv_cache_usage")]
    assert seen and all(e == whole for e in seen)

    s = summarize_telemetry(lines, "concurrency=4")
    assert s is not None
    assert s.kv_cache_usage_peak == 0.37 and s.requests_running_peak == 3.0
    assert s.prefix_cache_hit_rate == pytest.approx(64 / 133) and s.preemptions == 2.0
    assert s.prefix_cache_hit_rate_basis == "prefix_cache_hits_total / prefix_cache_queries_total"
    assert s.engine_counters["generation_tokens_total"] == 136.0
    assert s.engine_counters["requests_finished_total"] == 4.0
    assert s.reconciliation is None  # no records given


async def test_an_unreachable_metrics_endpoint_is_noted_and_sampling_goes_on(tmp_path: Path) -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    tel = EngineTelemetry(
        tmp_path, "e", time.perf_counter(), metrics_url=f"http://127.0.0.1:{port}/metrics",
        metric_map=vllm.METRICS, nvml_lib=StandInNvml([FakeGpu()]), interval_s=0.02,
    )  # fmt: skip
    async with tel.point("rate=1"):
        await asyncio.sleep(0.1)
    lines = lines_of(tmp_path / "telemetry" / "e.jsonl")
    notes = [ln for ln in lines if ln["kind"] == "source_skipped" and ln["source"] == "engine_metrics"]
    assert len(notes) == 1 and "failed" in notes[0]["reason"]
    samples = [ln for ln in lines if ln["kind"] == "sample"]
    assert len(samples) >= 2 and all("gpus" in s and "engine" not in s for s in samples)


async def test_a_metrics_text_that_does_not_parse_never_ends_the_point(
    tmp_path: Path, metrics_server: MetricsServer
) -> None:
    metrics_server.text = "vllm:num_requests_running{engine=0 this is not prometheus\n"
    tel = EngineTelemetry(
        tmp_path, "e", time.perf_counter(), metrics_url=metrics_server.url, metric_map=vllm.METRICS,
        gpu=False, interval_s=0.02, settle_s=0.2,
    )  # fmt: skip
    async with tel.point("rate=1") as sampler:
        await asyncio.sleep(0.1)
    lines = lines_of(tmp_path / "telemetry" / "e.jsonl")
    (note,) = [ln for ln in lines if ln["kind"] == "source_skipped" and ln["source"] == "sampler"]
    assert "failed" in note["reason"] and metrics_server.hits >= 3
    assert sampler.ticks == 0 and lines[-1]["kind"] == "sampler"


# ------------------------------------------------------------------------------------------------- files


def test_values_round_trip_through_json_with_infinite_bounds() -> None:
    values = scrape((FIXTURES / "vllm_after.prom").read_text(), vllm.METRICS)
    encoded = orjson.loads(orjson.dumps(encode_values(values)))
    assert encoded["ttft_seconds"]["buckets"][-1][0] is None
    back = decode_values(encoded)
    assert back == values
    h = back["ttft_seconds"]
    assert isinstance(h, Histogram) and math.isinf(h.buckets[-1][0])


def test_reader_refuses_other_versions_and_skips_a_truncated_last_line(tmp_path: Path) -> None:
    d = tmp_path / "telemetry"
    d.mkdir()
    good = {"schema_version": 1, "kind": "sample", "point": "p", "t": 1.0}
    (d / "a.jsonl").write_bytes(orjson.dumps(good) + b"\n" + b'{"schema_version": 1, "kind": "sam')
    with pytest.warns(TruncatedLineWarning):
        assert read_telemetry(tmp_path) == {"a": [good]}
    (d / "a.jsonl").write_bytes(orjson.dumps({**good, "schema_version": 7}) + b"\n")
    with pytest.raises(SchemaError, match="schema_version 7"):
        read_telemetry(tmp_path)
    assert read_telemetry(tmp_path / "nowhere") == {}


def test_repeats_pool_and_only_requests_inside_a_scrape_window_are_reconciled() -> None:
    def scrape_line(at: str, t: float, gen: float, repeat: int) -> dict[str, Any]:
        metrics = {"generation_tokens_total": gen, "requests_finished_total": gen / 16}
        return {"schema_version": 1, "kind": "scrape", "at": at, "point": "p", "repeat": repeat, "t": t,
                "metrics": metrics}  # fmt: skip

    lines = [
        scrape_line("start", 1.0, 0.0, 1), scrape_line("end", 2.0, 32.0, 1),  # repeat 1: two requests
        scrape_line("start", 5.0, 160.0, 2), scrape_line("end", 6.0, 176.0, 2),  # repeat 2: one (others between)
        scrape_line("start", 9.0, 176.0, 3),  # a repeat killed before its end scrape
    ]  # fmt: skip

    def done(rid: str, at: float) -> RequestRecord:
        return RequestRecord(rid, "e", "p", "measure", scheduled=at, sent=at, chunk_times=[at + 0.1],
                             chunk_tokens=[16], done=at + 0.2, output_tokens=16, token_source="server_usage")  # fmt: skip

    recs = [done("a", 1.1), done("b", 1.5), done("c", 5.5), done("old", 3.0), done("killed", 9.5)]
    s = summarize_telemetry(lines, "p", recs)
    assert s is not None and s.engine_counters == {
        "generation_tokens_total": 48.0,
        "requests_finished_total": 3.0,
    }
    assert s.reconciliation is not None and s.reconciliation.requests == 3
    assert s.reconciliation.status == "agree"


# ------------------------------------------------------------------------------------------------- known truth


async def _scripted_point(
    tmp_path: Path, cfg: ScriptConfig, n: int, out: int
) -> tuple[list[dict[str, Any]], list[RequestRecord]]:
    records: list[RequestRecord] = []
    async with ScriptedServer(cfg) as srv:
        target = Target("scripted", srv.url, scripted.ADAPTER, cfg.model)
        specs = [
            RequestSpec(f"r{i}", "chat", out, ({"role": "user", "content": f"question {i} " * (i % 5 + 1)},))
            for i in range(n)
        ]
        tel = EngineTelemetry(
            tmp_path, "scripted", time.perf_counter(), metrics_url=f"{srv.url}/metrics",
            metric_map=scripted.METRICS, gpu=False, interval_s=0.05,
        )  # fmt: skip
        async with tel.point("concurrency=3"):
            await run_point(
                target, specs, LoadPoint("concurrency", 3, "closed"), StopRule(requests=n - 2, warmup=2),
                records.append, tel.zero,
            )  # fmt: skip
    return lines_of(tmp_path / "telemetry" / "scripted.jsonl"), records


async def test_scripted_server_counts_reconcile_exactly(tmp_path: Path) -> None:
    lines, recs = await _scripted_point(tmp_path, ScriptConfig(ttft=0.02, itl=0.002), n=24, out=16)
    assert len(recs) == 24 and all(r.ok for r in recs)
    assert {r.phase for r in recs} == {"warmup", "measure"}
    s = summarize_telemetry(lines, "concurrency=3", recs)
    assert s is not None and s.reconciliation is not None
    by = {c.metric: c for c in s.reconciliation.counts}
    # the truth: every request generates exactly 16 tokens (ignore_eos); all phases reached the engine
    assert by["generation_tokens_total"].engine == by["generation_tokens_total"].client == 24 * 16
    assert by["requests_finished_total"].engine == 24
    assert by["prompt_tokens_total"].engine == sum(r.prompt_tokens or 0 for r in recs) > 0
    assert s.reconciliation.status == "agree"
    assert all(
        t.verdict == "unavailable" for t in s.reconciliation.ttft
    )  # the scripted server has no histogram
    assert s.requests_running_peak is not None and 1 <= s.requests_running_peak <= 3


async def test_scripted_server_cut_streams_show_up_as_explained_disagreement(tmp_path: Path) -> None:
    cfg = ScriptConfig(ttft=0.02, itl=0.002, faults=Faults(cut=0.25))
    lines, recs = await _scripted_point(tmp_path, cfg, n=24, out=16)
    cut = [r for r in recs if not r.ok]
    assert 5 <= len(cut) <= 7 and all(r.status == "read_error" for r in cut)
    s = summarize_telemetry(lines, "concurrency=3", recs)
    assert s is not None and s.reconciliation is not None
    gen = next(c for c in s.reconciliation.counts if c.metric == "generation_tokens_total")
    # the server generated all 16 tokens of every request, but cut the connection after 8 of them in `cut` ones
    assert gen.engine == 16 * 24
    assert gen.client == 16 * (24 - len(cut)) + 8 * len(cut)
    assert gen.difference == -8 * len(cut)
    assert gen.verdict == "disagree" and f"{len(cut)} request(s) did not finish normally" in gen.reason
    assert s.reconciliation.status == "disagree" and s.reconciliation.failed == len(cut)


def test_bench_run_writes_telemetry_and_the_summary_rebuilds_it(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with serve_in_process(ScriptConfig(ttft=0.02, itl=0.002, output_tokens=16)) as url:
        r = subprocess.run(
            [sys.executable, "-m", "harness.cli", "run", "--endpoint", f"scripted={url}", "--workload", "synthetic",
             "--set", "output_tokens=16", "--concurrency", "2", "--requests", "12", "--warmup", "2",
             "--out", str(out)],
            capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert r.returncode == 0, r.stderr
    summary = orjson.loads((out / "summary.json").read_bytes())
    (point,) = summary["points"]
    tel = point["telemetry"]
    assert tel["samples"] >= 1 and "attached endpoint" in tel["skipped"]["process"]
    rec = tel["reconciliation"]
    assert rec["status"] == "agree" and rec["requests"] == 14  # warm-up requests count too
    assert {c["metric"]: c["engine"] for c in rec["counts"]}["generation_tokens_total"] == 14 * 16
    events = [orjson.loads(x) for x in (out / "events.jsonl").read_bytes().splitlines()]
    assert {e["source"] for e in events if e["kind"] == "telemetry_skipped"} >= {"process", "gpu"}
    from harness.summary import summarize_run

    rebuilt = summarize_run(out).model_dump(mode="json")["points"][0]["telemetry"]
    assert rebuilt == tel


# ------------------------------------------------------------------------------------------------- overhead


@pytest.mark.bench
async def test_sampler_cpu_overhead(tmp_path: Path, tree: EngineProcess) -> None:
    """The sampler's whole CPU cost (HTTP included) in this process, at the default interval, against a server
    in another process serving vLLM's real 60 kB exposition text, with a two-process tree to read."""
    (tmp_path / "metrics").write_bytes((FIXTURES / "vllm_after.prom").read_bytes())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen(
        [sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1", "--directory", str(tmp_path)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        for _ in range(100):
            with socket.socket() as s:
                if s.connect_ex(("127.0.0.1", port)) == 0:
                    break
            await asyncio.sleep(0.05)
        tel = EngineTelemetry(
            tmp_path, "vllm", time.perf_counter(), metrics_url=f"http://127.0.0.1:{port}/metrics",
            metric_map=vllm.METRICS, processes=tree.tree, nvml_lib=StandInNvml([FakeGpu()]),
        )  # fmt: skip
        idle_c, idle_w = time.process_time(), time.perf_counter()
        await asyncio.sleep(2.0)
        idle = (time.process_time() - idle_c) / (time.perf_counter() - idle_w)
        c0, w0 = time.process_time(), time.perf_counter()
        async with tel.point("concurrency=1") as sampler:
            await asyncio.sleep(5.0)
        whole = (time.process_time() - c0) / (time.perf_counter() - w0) - idle
        own = sampler.cpu_s / (time.perf_counter() - w0)
    finally:
        server.terminate()
        server.wait(5)
    print(f"\nsampler overhead: {whole:.2%} of a core (process CPU, HTTP included), {own:.2%} self-timed; "
          f"{sampler.ticks} ticks at {tel.interval_s} s")  # fmt: skip
    assert sampler.ticks >= 8
    assert whole < 0.05
