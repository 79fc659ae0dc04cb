"""Distributed load (harness/distributed.py): a Locust master and real worker processes on loopback, against the
scripted calibration server (exact timing truth) and a real llama.cpp server (skipped when absent).

Known truths used: the scripted server answers after `ttft` = 50 ms, then 16 tokens `itl` = 5 ms apart; every worker
here shares the master's CLOCK_MONOTONIC, so the true clock offset is 0 and a measured one can only be off by half
the probe's round trip; the open-loop schedule is `send_times(point, n)` exactly.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import replace
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import numpy as np
import orjson
import psutil
import pytest

from adapters.scripted import make_adapter
from harness.calibration import ScriptConfig, serve_in_process
from harness.client import Target
from harness.distributed import DistributedConfig, ids_digest, parse_master, run_point_distributed
from harness.errors import ConfigError
from harness.records import RequestRecord
from harness.rundir import RunDir
from harness.runner import PointOutcome, StopRule
from harness.summary import summarize_run
from workloads.arrival import LoadPoint, send_times
from workloads.spec import RequestSpec

pytestmark = [
    pytest.mark.timeout(120),
    # not importorskip: importing locust the usual way would monkey-patch this process with gevent
    pytest.mark.skipif(
        find_spec("locust") is None, reason="distributed load needs the [distributed] extra (Locust)"
    ),
]

TTFT_S, ITL_S, TOKENS = 0.05, 0.005, 16
TTFT_TOL_S = 0.025  # as tests/test_client.py: loopback + a shared 2-core machine
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def url() -> Iterator[str]:
    with serve_in_process(ScriptConfig(ttft=TTFT_S, itl=ITL_S, output_tokens=TOKENS)) as base:
        yield base


def _specs(n: int) -> list[RequestSpec]:
    return [
        RequestSpec(f"r{i}", "chat", TOKENS, messages=({"role": "user", "content": "hi"},)) for i in range(n)
    ]


async def _run(
    target: Target, specs: list[RequestSpec], point: LoadPoint, stop: StopRule, **kw: Any
) -> tuple[PointOutcome, list[RequestRecord], list[dict[str, Any]]]:
    records: list[RequestRecord] = []
    events: list[dict[str, Any]] = []
    outcome = await run_point_distributed(
        target, specs, point, stop, records.append, time.perf_counter(),
        cluster=DistributedConfig(workers=2, port=0), on_event=events.append, **kw,
    )  # fmt: skip
    return outcome, records, events


def _workers(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    (ev,) = [e for e in events if e["kind"] == "distributed_point"]
    return list(ev["workers"])


def _tally(recs: list[RequestRecord]) -> dict[str, int]:
    c: Counter[str] = Counter()
    for r in recs:
        c.update(("total", r.phase, r.status))
    return dict(c)


async def test_open_loop_two_workers_merge_exactly(url: str) -> None:
    point = LoadPoint("rate", 40, "poisson", seed=5)
    outcome, recs, events = await _run(Target("scripted", url, make_adapter(), "scripted"), _specs(60), point,
                                       StopRule(requests=40, warmup=4))  # fmt: skip
    ids = [r.request_id for r in recs]
    assert sorted(ids) == sorted(f"r{i}" for i in range(44)) and len(set(ids)) == len(ids)
    assert all(r.ok for r in recs), [r.error for r in recs if not r.ok]
    workers = _workers(events)
    assert len(workers) == 2 and outcome.processes == 2 and len(outcome.per_process_cpu) == 2
    for w in workers:  # the merged records are the union of what each worker reported, per worker
        mine = [r for r in recs if r.tags["node"] == w["node"]]
        assert w["reported_counts"] == w["counts"] == _tally(mine)
        assert w["ids_digest"] == w["ids_digest_received"] == ids_digest(r.request_id for r in mine)
        assert w["requests_planned"] == len(mine) == 22
        # same clock here (true offset 0): the estimate is within half the probe's round trip
        assert abs(w["clock_offset_s"]) <= w["clock_rtt_s"] / 2 + 1e-6
    assert outcome.counts == _tally(recs) and outcome.stop_reason == "requests"
    assert outcome.client_cpu.mean_util == max(c.mean_util for c in outcome.per_process_cpu)
    # the arrival schedule survives the split: scheduled times are the point's own send times
    by_index = sorted(recs, key=lambda r: int(r.request_id[1:]))
    assert [r.phase for r in by_index] == ["warmup"] * 4 + ["measure"] * 40
    assert np.allclose([r.scheduled - outcome.started for r in by_index], send_times(point, 44), atol=1e-6)
    ttft = np.array([r.chunk_times[0] - r.scheduled for r in recs])
    assert TTFT_S <= np.median(ttft) <= TTFT_S + TTFT_TOL_S, ttft
    assert all(r.output_tokens == TOKENS for r in recs)


async def test_closed_loop_split_keeps_the_concurrency(url: str) -> None:
    point = LoadPoint("concurrency", 4, "closed")
    outcome, recs, events = await _run(Target("scripted", url, make_adapter(), "scripted"), _specs(24), point,
                                       StopRule(requests=20, warmup=2))  # fmt: skip
    assert sorted(r.request_id for r in recs) == sorted(f"r{i}" for i in range(22))
    assert outcome.counts["warmup"] == 2 and outcome.counts["measure"] == 20 and outcome.counts["ok"] == 22
    assert {r.worker for r in recs} == {0, 1, 2, 3}  # 2 slots per worker process
    assert {r.tags["node"] for r in recs} == {w["node"] for w in _workers(events)}
    ttft = np.array([r.chunk_times[0] - r.scheduled for r in recs])
    assert TTFT_S <= np.median(ttft) <= TTFT_S + TTFT_TOL_S, ttft


async def test_a_killed_worker_is_reported_and_its_records_kept(url: str, tmp_path: Path) -> None:
    point = LoadPoint("rate", 20, "constant")
    records: list[RequestRecord] = []
    events: list[dict[str, Any]] = []
    task = asyncio.ensure_future(
        run_point_distributed(
            Target("scripted", url, make_adapter(), "scripted"), _specs(70), point, StopRule(requests=60, warmup=2),
            records.append, time.perf_counter(), cluster=DistributedConfig(workers=2, port=0), on_event=events.append,
        )
    )  # fmt: skip
    deadline = time.perf_counter() + 60
    while len(records) < 10 and not task.done() and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    victims = [p for p in psutil.Process().children() if "worker" in p.cmdline() and "--once" in p.cmdline()]
    assert len(victims) == 2 and len(records) >= 10
    victims[0].send_signal(signal.SIGKILL)
    outcome = await task

    (lost,) = [e for e in events if e["kind"] == "worker_lost"]
    workers = {w["node"]: w for w in _workers(events)}
    assert workers[lost["node"]]["pid"] == victims[0].pid and "exited" in lost["reason"]
    kept = [r for r in records if r.tags["node"] == lost["node"] and "worker_lost" not in r.tags]
    filled = [r for r in records if "worker_lost" in r.tags]
    assert len(kept) == lost["records_kept"] >= 1 and len(filled) == lost["cancelled_unreported"] >= 1
    assert all(r.status == "cancelled" and r.sent is None for r in filled)
    # nothing lost, nothing twice: every planned request is either a record the workers sent or marked cancelled
    ids = [r.request_id for r in records]
    assert sorted(ids) == sorted(f"r{i}" for i in range(62)) and len(set(ids)) == len(ids)
    survivor = [r for r in records if r.tags["node"] != lost["node"]]
    assert len(survivor) == 31 and all(r.ok for r in survivor)
    assert outcome.stop_reason == "aborted" and len(outcome.per_process_cpu) == 1

    run = RunDir.create(tmp_path / "run")
    run.start(run_id="killed")
    for r in records:
        run.append_record(r)
    for e in events:
        run.append_event({"engine": "scripted", **e})
    run.close()
    summary = summarize_run(run.path)
    assert any(lost["node"] in n and "lost" in n for n in summary.notes), summary.notes
    assert summary.points[0].requests.total == 62


async def test_a_silent_remote_worker_is_found_by_heartbeat(url: str) -> None:
    """A worker on "another machine" (a `bench worker` the master did not start) killed mid-point: the master cannot
    see its process, only Locust's heartbeats stopping; it is reported lost and its records are kept."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    remote = subprocess.Popen(
        [sys.executable, "-m", "harness.cli", "worker", "--master", f"127.0.0.1:{port}", "--once"],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        records: list[RequestRecord] = []
        events: list[dict[str, Any]] = []
        task = asyncio.ensure_future(
            run_point_distributed(
                Target("scripted", url, make_adapter(), "scripted"), _specs(70), LoadPoint("rate", 20, "constant"),
                StopRule(requests=60, warmup=2), records.append, time.perf_counter(),
                cluster=DistributedConfig(workers=2, local_workers=1, port=port), on_event=events.append,
            )
        )  # fmt: skip
        deadline = time.perf_counter() + 60
        while len(records) < 10 and not task.done() and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
        remote.kill()
        outcome = await asyncio.wait_for(task, 60)
    finally:
        remote.kill()
        remote.wait()
    (lost,) = [e for e in events if e["kind"] == "worker_lost"]
    assert "heartbeat" in lost["reason"] and {w["pid"] for w in _workers(events)} >= {remote.pid}
    kept = [r for r in records if r.tags["node"] == lost["node"] and "worker_lost" not in r.tags]
    assert len(kept) == lost["records_kept"] >= 1
    assert sorted(r.request_id for r in records) == sorted(f"r{i}" for i in range(62))
    assert outcome.stop_reason == "aborted"


async def test_abort_stops_every_worker_and_keeps_their_records(url: str) -> None:
    """What `bench run` does when the engine dies: set `abort`; in-flight requests end `cancelled`, nothing is lost."""
    abort = asyncio.Event()
    records: list[RequestRecord] = []
    task = asyncio.ensure_future(
        run_point_distributed(
            Target("scripted", url, make_adapter(), "scripted"), _specs(200), LoadPoint("rate", 20, "constant"),
            StopRule(requests=190, warmup=2), records.append, time.perf_counter(), abort=abort,
            cluster=DistributedConfig(workers=2, port=0),
        )
    )  # fmt: skip
    deadline = time.perf_counter() + 60
    while len(records) < 10 and time.perf_counter() < deadline:
        await asyncio.sleep(0.05)
    abort.set()
    outcome = await asyncio.wait_for(task, 30)
    assert outcome.stop_reason == "aborted" and outcome.counts == _tally(records)
    ids = [r.request_id for r in records]
    assert len(set(ids)) == len(ids) and 10 <= len(ids) < 100  # stopped well before the 192 planned
    assert {r.status for r in records} <= {"ok", "cancelled"}


def test_bench_worker_without_a_master_fails_in_one_line() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "worker", "--master", "127.0.0.1:1", "--connect-timeout", "1"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode != 0
    assert "cannot reach the EngineBench master at 127.0.0.1:1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_master_address_parsing() -> None:
    assert parse_master("10.0.0.5") == ("10.0.0.5", 5557)
    assert parse_master("10.0.0.5:6000") == ("10.0.0.5", 6000)
    with pytest.raises(ConfigError, match="HOST:PORT"):
        parse_master("10.0.0.5:x")
    with pytest.raises(ConfigError, match="fixed master port"):
        DistributedConfig(workers=3, local_workers=1, port=0)


@pytest.mark.slow
def test_bench_run_distributed_writes_one_run_directory(url: str, tmp_path: Path) -> None:
    """The CLI end to end: `bench run --distributed --workers 2` against the scripted server."""
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "harness.cli", "run", "--endpoint", f"scripted={url}", "--workload", "synthetic",
         "--set", f"output_tokens={TOKENS}", "--set", "input_tokens=32", "--rate", "20", "--requests", "30",
         "--warmup", "2", "--distributed", "--workers", "2", "--master-bind", "127.0.0.1:5591", "--out", str(out)],
        capture_output=True, text=True, timeout=110, cwd=ROOT,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    recs = [orjson.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    events = [orjson.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert len(recs) == 32 and len({r["request_id"] for r in recs}) == 32
    (dist,) = [e for e in events if e["kind"] == "distributed_point"]
    assert sorted(w["counts"]["total"] for w in dist["workers"]) == [16, 16]
    (end,) = [e for e in events if e["kind"] == "point_end"]
    assert len(end["per_process_cpu"]) == 2 and end["counts"]["total"] == 32
    summary = orjson.loads((out / "summary.json").read_text())
    (p,) = summary["points"]
    assert p["requests"]["ok"] == 30 and TTFT_S * 1e3 <= p["ttft_ms"]["p50"] <= (TTFT_S + TTFT_TOL_S) * 1e3


@pytest.mark.live
@pytest.mark.timeout(400)
async def test_llamacpp_two_workers(tmp_path: Path) -> None:
    """A real CPU engine: two workers' records against llama.cpp merge exactly and agree on token counts."""
    from adapters import registry
    from adapters.process import launched

    adapter = registry.get("llamacpp")
    avail = registry.availability(adapter)
    if not avail.runnable:
        pytest.skip(f"llama.cpp cannot run here: {avail.reason}")
    cfg = replace(registry.default_config("llamacpp"), prefix_caching=False)
    async with launched(adapter, cfg, tmp_path / "llamacpp.log", 120) as ep:
        target = Target("llamacpp", ep.base_url, adapter, ep.model)
        specs = [RequestSpec(f"q{i}", "completions", 8, prompt=f"Count to {i + 3}:", pin_output=True)
                 for i in range(10)]  # fmt: skip
        outcome, recs, events = await _run(
            target, specs, LoadPoint("rate", 4, "constant"), StopRule(requests=8, warmup=2)
        )
    assert sorted(r.request_id for r in recs) == sorted(s.request_id for s in specs)
    assert all(r.ok for r in recs), [r.error for r in recs if not r.ok]
    for w in _workers(events):
        assert w["reported_counts"] == _tally([r for r in recs if r.tags["node"] == w["node"]])
    assert all(r.output_tokens == 8 and r.token_source == "server_usage" for r in recs)
    assert all(r.chunk_times and r.scheduled <= r.chunk_times[0] <= (r.done or 0) for r in recs)
    assert outcome.counts["total"] == 10
