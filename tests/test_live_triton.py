"""Triton for real on this CPU: Triton core 2.51 (nvidia-pytriton 0.7.0) + our python-backend model serving vLLM CPU
(adapters/triton_native.py, adapters/triton_vllm_model.py), one launch; the synthetic and chat workloads through real
`bench run` subprocesses at concurrency 1 and 2 over Triton's native generate protocol, VALID under a relaxed verdict
policy, the client's requests matched by Triton's own `nv_inference_*` counters, exact input and output lengths,
nothing listening off loopback, and nothing left behind when the process that launched it dies by SIGKILL (the
launcher's watch stops the tagged tree: tritonserver, the backend stub, vLLM's engine core and worker).

The engine is launched by a helper process through the harness's own launcher (`adapters.process.launched`, as
`bench run` does) and each run attaches to it with `--endpoint triton=URL`; killing the helper is `bench` killed
mid-run. Skips with the reason when Triton is not installed (`bench engines install triton`). It starts in ~60-140 s
here (vLLM's start inside the stub) and holds ~4.5 GB; the engine runs at nice 19 (others measure on this machine).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import psutil
import pytest

from adapters import install, registry
from adapters.process import TAG_VAR
from adapters.prometheus import Histogram, scrape

pytestmark = [pytest.mark.live, pytest.mark.timeout(900)]

REPO = Path(__file__).resolve().parents[1]
POINTS = ("concurrency=1", "concurrency=2")
IN_TOKENS, OUT_TOKENS = 48, 12
# short points on 2 shared cores (as tests/test_live_decide.py): errors and token-count mismatches must still be 0
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
_LAUNCH = """
import asyncio, json, sys
from pathlib import Path
from adapters import registry
from adapters.process import launched
async def main():
    adapter, cfg = registry.get("triton"), registry.default_config("triton")
    async with launched(adapter, cfg, Path(sys.argv[1]), 600.0, nice=19) as ep:
        print(json.dumps({"url": ep.base_url, "metrics": adapter.metrics_url(ep.config, ep.base_url),
                          "tag": ep.process.tag, "cold_start_s": ep.cold_start_s, "model": ep.model,
                          "version": ep.version}), flush=True)
        await asyncio.sleep(3600)
asyncio.run(main())
"""


def descendants(engine: dict[str, Any]) -> list[psutil.Process]:
    """The launcher's process tree below it (vLLM's processes retitle themselves, which can hide their environment
    and so their tag: the tree finds them)."""
    with contextlib.suppress(psutil.Error):
        return psutil.Process(engine["helper"].pid).children(recursive=True)
    return []


def tagged(tag: str) -> list[psutil.Process]:
    found = []
    for p in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if p.environ().get(TAG_VAR) == tag:
                found.append(p)
    return found


@pytest.fixture(scope="module")
def engine(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    avail = registry.availability(registry.get("triton"))
    if not avail.runnable or not install.status("triton").installed:
        pytest.skip(f"triton cannot run here: {avail.reason}")
    log = tmp_path_factory.mktemp("triton") / "triton.log"
    helper = subprocess.Popen(
        [sys.executable, "-c", _LAUNCH, str(log)], cwd=REPO, stdout=subprocess.PIPE, text=True
    )
    assert helper.stdout is not None
    line = helper.stdout.readline()  # blocks until ready (or the helper failed)
    if not line:
        helper.wait(30)
        pytest.fail(f"Triton did not start (exit {helper.returncode}); log {log}:\n{log.read_text()[-3000:]}")
    info = dict(json.loads(line), helper=helper, log=log, out=log.parent)
    try:
        yield info
    finally:
        if helper.poll() is None:
            helper.kill()
        deadline = time.monotonic() + 40
        while tagged(info["tag"]) and time.monotonic() < deadline:
            time.sleep(0.5)
        for p in tagged(
            info["tag"]
        ):  # a failed test must not leave the engine running for the next developer
            with contextlib.suppress(psutil.Error):
                p.kill()


def bench(*args: str) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-m", "harness.cli", *args]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=600, env={**os.environ})
    assert done.returncode == 0, (
        f"bench {' '.join(args)} exited {done.returncode}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    )
    return done


def counters(url: str) -> dict[str, float]:
    """Triton's per-model counters: requests that succeeded (a decoupled request counts once, at its FINAL
    response), failed (any reason), and inferences."""

    async def get() -> str:
        async with aiohttp.ClientSession() as s, s.get(url) as r:
            assert r.status == 200
            return await r.text()

    text = asyncio.run(get())
    out = {
        k: float(v)
        for k, v in scrape(text, registry.get("triton").metrics).items()
        if not isinstance(v, Histogram)
    }
    for name in ("nv_inference_request_failure", "nv_inference_count"):
        out[name] = sum(
            float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name + "{")
        )
    return out


def settled(url: str, quiet_s: float = 2.5, limit_s: float = 30.0) -> dict[str, float]:
    last, since, start = counters(url), time.monotonic(), time.monotonic()
    while time.monotonic() - since < quiet_s and time.monotonic() - start < limit_s:
        time.sleep(0.5)
        now = counters(url)
        if now != last:
            last, since = now, time.monotonic()
    return last


def run_workload(engine: dict[str, Any], workload: str, *extra: str) -> tuple[Path, dict[str, float]]:
    out = engine["out"] / workload
    before = settled(engine["metrics"])
    bench("run", "--endpoint", f"triton={engine['url']}", "--tokenizer", str(install.hf_model_dir()),
          "--workload", workload, *extra, "--requests", "3", "--warmup", "1", "--concurrency", "1,2",
          "--out", str(out))  # fmt: skip
    after = settled(engine["metrics"])
    policy = out.parent / "relaxed-policy.json"
    policy.write_text(json.dumps(RELAXED_POLICY))
    bench("summarize", str(out), "--policy", str(policy))
    return out, {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}


def check_run(out: Path, delta: dict[str, float]) -> list[dict[str, Any]]:
    summary = json.loads((out / "summary.json").read_text())
    points = {p["point"]: p for p in summary["points"] if p["engine"] == "triton"}
    assert sorted(points) == list(POINTS)
    for p in points.values():
        assert p["verdict"]["status"] == "VALID", (p["point"], p["verdict"])
    recs = [json.loads(x) for x in (out / "records.jsonl").read_text().splitlines() if x.strip()]
    assert recs and all(r["status"] == "ok" for r in recs), [r for r in recs if r["status"] != "ok"]
    # Triton's own counters moved by exactly what the client saw (warm-up requests included: they ran too)
    assert delta["requests_finished_total"] == len(recs), (delta, len(recs))
    assert delta["nv_inference_count"] == len(recs), delta
    assert delta["nv_inference_request_failure"] == 0, delta
    for r in recs:  # every response stated its token count (num_output_tokens), and the client summed them
        assert r["client_output_tokens"] == r["output_tokens"] and r["finish_reason"] in ("length", "stop"), r
    return recs


def test_serves_vllm_inside_triton_on_loopback_only(engine: dict[str, Any]) -> None:
    procs = descendants(engine)
    names = {p.name() for p in procs}
    lines = [" ".join(p.cmdline()) for p in procs]
    assert "tritonserver" in names, names
    assert any("triton_python_backend_stub" in line for line in lines), lines  # the python backend's stub
    for vllm in ("VLLM::EngineCore", "VLLM::Worker"):  # vLLM's processes (their titles), started by the stub
        assert any(vllm in line or vllm[:15] in names for line in lines), (vllm, names, lines)
    assert engine["version"] == "tritonserver 2.51.0" and engine["model"] == registry.SERVED_MODEL, engine
    pids = {p.pid for p in procs}
    listening = [c for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.pid in pids]
    addrs = [(str(c.laddr[0]), int(c.laddr[1]), c.pid) for c in listening if c.laddr]
    ports = {port for _, port, _ in addrs}
    http, metrics = int(engine["url"].rsplit(":", 1)[1]), int(engine["metrics"].split(":")[2].split("/")[0])
    assert {http, metrics} <= ports, (http, metrics, ports)
    assert 8001 not in ports  # gRPC is off
    outside = [a for a in addrs if a[0] not in ("127.0.0.1", "::ffff:127.0.0.1", "::1")]
    assert not outside, f"Triton or vLLM listens off loopback: {outside}"
    print(
        f"triton: cold start {engine['cold_start_s']:.1f} s, {len(pids)} processes, {len(listening)} listeners"
    )


def test_synthetic_counts_agree_with_the_engine(engine: dict[str, Any]) -> None:
    out, delta = run_workload(
        engine, "synthetic", "--set", f"input_tokens={IN_TOKENS}", "--set", f"output_tokens={OUT_TOKENS}"
    )
    recs = check_run(out, delta)
    for (
        r
    ) in recs:  # exact lengths: the served model's own tokenizer, num_input_tokens, and ignore_eos/min_tokens
        assert r["prompt_tokens"] == r["expected_input_tokens"] and r["output_tokens"] == OUT_TOKENS, r


def test_chat_counts_agree_with_the_engine(engine: dict[str, Any]) -> None:
    short = ("--set", f"reply_tokens={{dist: constant, value: {OUT_TOKENS}}}", "--set", "think_time_s={dist: constant, value: 0.5}",
             "--set", "turns={dist: constant, value: 2}")  # fmt: skip
    out, delta = run_workload(engine, "chat", *short)
    recs = check_run(out, delta)
    for r in recs:  # the chat template applied client-side: the prefill is the length the client counted
        assert r["prompt_tokens"] == r["expected_input_tokens"], r
    detail = f"synthetic + chat at concurrency 1-2, cold start {engine['cold_start_s']:.0f} s"
    registry.record_live_test("triton", True, engine["version"], detail)  # `bench engines`: live-tested here


def test_sigkill_of_the_launcher_leaves_nothing(engine: dict[str, Any]) -> None:
    procs = descendants(engine)
    assert len(procs) >= 5, procs  # launcher, tritonserver, stub, vLLM's engine core and worker
    engine["helper"].send_signal(
        signal.SIGKILL
    )  # no handler, no atexit: only the launcher's own watch is left
    engine["helper"].wait(10)
    started = time.monotonic()
    _, alive = psutil.wait_procs(procs, timeout=60)
    left = [(p.pid, p.name()) for p in alive] + [(p.pid, p.name()) for p in tagged(engine["tag"])]
    assert not left, f"left running after SIGKILL of the launcher: {left}"
    print(f"triton: {len(procs)} processes gone {time.monotonic() - started:.1f} s after SIGKILL")
