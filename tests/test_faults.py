"""Faults against the scripted server (and a real engine where one is installed): every finished record is kept,
every failed request carries a status and a reason, the summary counts errors by kind, the verdict and the exit code
reflect them, and the run stops or continues as `--error-budget` says.

Fast cases drive `harness.runner.run_point` against the scripted server in this process; the ones where the whole
program matters (engine killed, error storms, exit codes) run real `bench run` subprocesses.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import psutil
import pytest

from adapters.scripted import ADAPTER as SCRIPTED
from harness.calibration import Faults, ScriptConfig, ScriptedServer, serve_in_process
from harness.records import RequestRecord
from harness.rundir import RunDir
from harness.runner import PointOutcome, StopRule, Target, run_point
from harness.summary import summarize_run
from workloads.arrival import LoadPoint
from workloads.spec import RequestSpec

BENCH = [sys.executable, "-m", "harness.cli"]
N = 20  # requests per fault case; faults are dealt deterministically (a fraction f of N, within one request)


def _spec(i: int, n: int = 6) -> RequestSpec:
    return RequestSpec(
        request_id=f"q{i:03d}",
        api="chat",
        max_tokens=n,
        messages=({"role": "user", "content": "hello there"},),
        pin_output=True,
    )


@contextlib.asynccontextmanager
async def scripted(faults: Faults, **cfg: float) -> AsyncIterator[str]:
    base: dict[str, float] = {"ttft": 0.01, "itl": 0.002, "output_tokens": 6}
    async with ScriptedServer(ScriptConfig(**{**base, **cfg}, faults=faults, precise=False)) as srv:  # type: ignore[arg-type]
        yield srv.url


async def _point(
    url: str, n: int = N, concurrency: int = 4, **stop: float | None
) -> tuple[PointOutcome, list[RequestRecord]]:
    target = Target("scripted", url, SCRIPTED, "scripted")
    recs: list[RequestRecord] = []
    rule = StopRule(**{"requests": n, "stall_timeout_s": 5.0, "request_timeout_s": 20.0, **stop})  # type: ignore[arg-type]
    outcome = await run_point(
        target,
        [_spec(i) for i in range(n)],
        LoadPoint("concurrency", concurrency, "closed"),
        rule,
        recs.append,
        time.perf_counter(),
    )
    return outcome, recs


def _check_accounting(outcome: PointOutcome, recs: list[RequestRecord], n: int = N) -> None:
    """Nothing lost: one record per request sent, the outcome's counts are the records' counts, every failure
    explained."""
    assert len(recs) == n and len({r.request_id for r in recs}) == n
    by_status = Counter(r.status for r in recs)
    assert {k: v for k, v in outcome.counts.items() if k in by_status} == dict(by_status)
    for r in recs:
        if r.status != "ok":
            assert r.error, r
            assert r.done is not None


# expected status, and a phrase of the reason, for a quarter of the requests faulted with each kind
CASES = {
    "status500": (Faults(status={500: 0.25}), "http_error", "HTTP 500"),
    "status503": (Faults(status={503: 0.25}), "http_error", "HTTP 503"),
    "status429": (Faults(status={429: 0.25}), "http_error", "HTTP 429"),
    "reset": (Faults(reset=0.25), "connect_error", ""),
    "cut": (Faults(cut=0.25), "read_error", ""),
    "malformed": (Faults(malformed=0.25), "stream_error", "unparsable event"),
    "error_event": (Faults(error_event=0.25), "stream_error", "error event"),
    "stall": (Faults(stall=0.25, stall_s=30.0), "timeout", "stall: no byte for 0.5s"),
}


@pytest.mark.parametrize("case", sorted(CASES))
async def test_each_fault_fails_its_requests_with_a_reason(case: str) -> None:
    faults, status, phrase = CASES[case]
    async with scripted(faults) as url:
        outcome, recs = await _point(url, stall_timeout_s=0.5)
    _check_accounting(outcome, recs)
    failed = [r for r in recs if r.status != "ok"]
    assert len(failed) == N // 4, Counter(r.status for r in recs)  # dealt exactly: 5 of 20
    assert all(r.status == status and phrase in (r.error or "") for r in failed), failed[0]
    if status == "http_error":
        code = int(phrase.split()[-1])
        assert all(r.http_status == code for r in failed)
    ok = [r for r in recs if r.ok]
    assert all(r.output_tokens == 6 and r.client_output_tokens == 6 for r in ok)


async def test_no_done_with_a_finish_reason_is_complete_and_marked() -> None:
    async with scripted(Faults(no_done=0.5)) as url:
        outcome, recs = await _point(url)
    _check_accounting(outcome, recs)
    assert all(r.ok and r.output_tokens == 6 for r in recs)
    assert sum(r.tags.get("stream_end") == "eof" for r in recs) == N // 2


async def test_slow_first_byte_within_the_stall_timeout_is_slow_not_failed() -> None:
    async with scripted(Faults(slow_first_byte=0.25, slow_first_byte_s=0.6)) as url:
        outcome, recs = await _point(url)
    _check_accounting(outcome, recs)
    assert all(r.ok for r in recs)
    ttfts = sorted(r.chunk_times[0] - r.scheduled for r in recs)
    # 5 of 20 answered 0.6 s late, the rest after 10 ms (loose bounds: a loaded 2-core machine)
    assert all(t >= 0.6 for t in ttfts[-5:]) and all(t < 0.45 for t in ttfts[:15]), ttfts


async def test_slow_first_byte_beyond_the_stall_timeout_times_out() -> None:
    async with scripted(Faults(slow_first_byte=0.25, slow_first_byte_s=3.0)) as url:
        outcome, recs = await _point(url, stall_timeout_s=0.5)
    _check_accounting(outcome, recs)
    failed = [r for r in recs if not r.ok]
    assert len(failed) == 5 and all(r.status == "timeout" and "stall" in (r.error or "") for r in failed)
    assert all(r.first_byte is None for r in failed)  # no headers either


async def test_huge_events_are_read_whole() -> None:
    async with scripted(Faults(huge=0.25, huge_bytes=8 << 20)) as url:
        outcome, recs = await _point(url, n=8, concurrency=2)
    _check_accounting(outcome, recs, n=8)
    assert all(r.ok and r.output_tokens == 6 and r.client_output_tokens == 6 for r in recs)


async def test_connection_refused_is_a_connect_error() -> None:
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    outcome, recs = await _point(f"http://127.0.0.1:{port}", n=6, concurrency=2)
    _check_accounting(outcome, recs, n=6)
    assert all(r.status == "connect_error" and r.error and r.first_byte is None for r in recs)


async def _raw_server(body: bytes, framing: str) -> tuple[asyncio.Server, str]:
    """A server that answers every request with `body` as an event stream, then closes."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        head = f"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n{framing}Connection: close\r\n\r\n"
        writer.write(head.encode() + body)
        await writer.drain()
        writer.close()

    srv = await asyncio.start_server(handle, "127.0.0.1", 0)
    return srv, f"http://127.0.0.1:{srv.sockets[0].getsockname()[1]}"


@pytest.mark.parametrize(
    ("name", "body"),
    [
        ("truncated_json", b'data: {"choices":[{"index":0,"delta":{"content":" the"'),
        (
            "truncated_line",
            b'data: {"choices":[{"index":0,"delta":{"content":" the"},"finish_reason":null}]}\n\nda',
        ),
        ("garbage", b"\x00\xff\xfe not sse at all \r\n\r\n"),
    ],
)
async def test_truncated_or_garbage_sse_is_a_stream_error(name: str, body: bytes) -> None:
    srv, url = await _raw_server(body, f"Content-Length: {len(body)}\r\n")
    async with srv:
        outcome, recs = await _point(url, n=4, concurrency=2)
    _check_accounting(outcome, recs, n=4)
    assert all(r.status == "stream_error" and r.error for r in recs), [r.error for r in recs]


async def test_error_budget_stops_a_storm_and_keeps_every_record() -> None:
    async with scripted(Faults(status={500: 0.5})) as url:
        outcome, recs = await _point(url, n=200, concurrency=4, error_budget=0.2)
    assert outcome.stop_reason == "error_budget"
    assert len(recs) == outcome.counts["total"] < 200  # stopped early; every sent request has its record
    assert outcome.counts.get("http_error", 0) == sum(r.status == "http_error" for r in recs) >= 5
    assert all(r.error for r in recs if not r.ok)


async def test_without_a_budget_a_storm_runs_to_the_end() -> None:
    async with scripted(Faults(status={503: 0.5})) as url:
        outcome, recs = await _point(url, n=40, concurrency=4)
    assert outcome.stop_reason == "requests" and len(recs) == 40
    assert sum(r.status == "http_error" for r in recs) == 20


# ---- end to end: `bench run` ------------------------------------------------------------------------------------


def bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BENCH, *args], capture_output=True, text=True, timeout=timeout)


def _run_args(url: str, out: Path, *extra: str) -> list[str]:
    return [
        "run", "--endpoint", f"s={url}", "--workload", "synthetic", "--set", "output_tokens=6",
        "--concurrency", "4", "--warmup", "0", "--stall-timeout", "0.5", "--out", str(out), *extra,
    ]  # fmt: skip


def test_storm_with_error_budget_stops_exits_nonzero_and_counts_by_kind(tmp_path: Path) -> None:
    faults = Faults(status={500: 0.3, 429: 0.2}, reset=0.1)
    with serve_in_process(ScriptConfig(ttft=0.01, itl=0.002, output_tokens=6, faults=faults)) as url:
        out = tmp_path / "run"
        r = bench(*_run_args(url, out, "--requests", "300", "--error-budget", "0.2"))
    assert r.returncode == 5, r.stdout + r.stderr  # a point stopped on its budget: not a measurement
    records = list(RunDir.open(out).iter_records())
    events = list(RunDir.open(out).iter_events())
    end = next(e for e in events if e["kind"] == "point_end")
    assert end["stop_reason"] == "error_budget" and end["counts"]["total"] == len(records) < 300
    point = summarize_run(out).points[0]
    kinds = Counter(x.status for x in records if x.phase == "measure" and x.status != "ok")
    assert dict(point.errors) == dict(kinds)  # counted by kind, cancelled ones (stopped by the budget) apart
    assert {"http_error", "connect_error"} <= set(point.errors)
    assert point.verdict.status == "INVALID"
    assert "INVALID" in r.stdout


def test_stalls_fail_as_timeouts_and_the_run_goes_on(tmp_path: Path) -> None:
    faults = Faults(stall=0.2, stall_s=30.0)
    with serve_in_process(ScriptConfig(ttft=0.01, itl=0.002, output_tokens=6, faults=faults)) as url:
        out = tmp_path / "run"
        r = bench(*_run_args(url, out, "--requests", "20"))
    assert r.returncode == 0, r.stderr  # no budget: the run goes on; the verdict carries the errors
    records = list(RunDir.open(out).iter_records())
    assert len(records) == 20
    stalled = [x for x in records if x.status == "timeout"]
    assert len(stalled) == 4 and all("stall" in (x.error or "") for x in stalled)
    point = summarize_run(out).points[0]
    assert point.errors == {"timeout": 4} and point.verdict.status == "INVALID"


def test_all_requests_failing_exits_nonzero(tmp_path: Path) -> None:
    with serve_in_process(ScriptConfig(faults=Faults(status={503: 1.0}))) as url:
        out = tmp_path / "run"
        r = bench(*_run_args(url, out, "--requests", "8"))
    assert r.returncode == 5, r.stdout + r.stderr
    assert all(x.status == "http_error" and x.http_status == 503 for x in RunDir.open(out).iter_records())


def _children(pid: int, needle: str) -> list[psutil.Process]:
    out = []
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            if needle in " ".join(child.cmdline()):
                out.append(child)
    return out


def _kill_engine_mid_run(out: Path, args: list[str], needle: str, after_records: int, timeout: float) -> str:
    proc = subprocess.Popen([*BENCH, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        recs = out / "records.jsonl"
        while time.monotonic() < deadline:
            if recs.exists() and recs.read_bytes().count(b"\n") >= after_records:
                break
            if proc.poll() is not None:
                pytest.fail(f"bench run ended before the kill: {proc.communicate()}")
            time.sleep(0.1)
        else:
            pytest.fail("no records in time")
        engines = _children(proc.pid, needle)
        assert engines, "the engine process was not found among bench's children"
        for e in engines:
            os.kill(e.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 3, stdout + stderr
    return stdout + stderr


def _check_engine_death(out: Path, output: str) -> None:
    assert "engine died" in (out / "records.jsonl").read_text() or "killed by signal 9" in output
    assert "killed by signal 9" in output and "last log lines" in output  # the reason and the log tail
    records = list(RunDir.open(out).iter_records())
    assert len({x.request_id for x in records}) == len(records)
    failed = [x for x in records if not x.ok]
    assert failed and all(x.error and "engine died" in x.error for x in failed), [
        (x.status, x.error, x.done) for x in failed
    ]
    events = [e for e in RunDir.open(out).iter_events()]
    assert any(e["kind"] == "engine_died" for e in events)
    manifest = orjson.loads((out / "manifest.json").read_bytes())
    assert manifest["status"] == "failed"
    summarize_run(out)  # what was kept still summarizes


def test_engine_killed_mid_run_keeps_records_and_says_why(tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = [
        "run", "--engines", "scripted", "--workload", "synthetic", "--set", "output_tokens=50",
        "--concurrency", "3", "--requests", "400", "--warmup", "0", "--out", str(out),
    ]  # fmt: skip
    output = _kill_engine_mid_run(out, args, "harness.calibration", after_records=6, timeout=60)
    _check_engine_death(out, output)
    ok = [x for x in RunDir.open(out).iter_records() if x.ok]
    assert len(ok) >= 6 and all(x.output_tokens for x in ok)


def _runnable(engine: str) -> str | None:
    """None when `engine` can be launched here, else why not."""
    from adapters import registry

    try:
        avail = registry.availability(registry.get(engine))
    except Exception as e:
        return str(e)
    return None if avail.runnable else avail.reason


@pytest.mark.slow
@pytest.mark.parametrize(("engine", "needle"), [("llamacpp", "llama"), ("vllm", "vllm")])
def test_real_engine_killed_mid_run(tmp_path: Path, engine: str, needle: str) -> None:
    why = _runnable(engine)
    if why is not None:
        pytest.skip(f"{engine} cannot run here: {why}")
    out = tmp_path / "run"
    args = [
        "run", "--engines", engine, "--workload", "synthetic", "--set", "output_tokens=24",
        "--set", "input_tokens=16", "--concurrency", "2", "--requests", "200", "--warmup", "0",
        "--out", str(out),
    ]  # fmt: skip
    output = _kill_engine_mid_run(out, args, needle, after_records=2, timeout=600)
    _check_engine_death(out, output)
