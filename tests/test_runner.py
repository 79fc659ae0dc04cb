"""The load-point runner against the scripted server on loopback: schedules, phases, stops, chat history."""

from __future__ import annotations

import time

import numpy as np
import pytest

from harness.records import RequestRecord
from harness.runner import PointOutcome, StopRule, Target, run_point
from tests.test_client import ScriptedServer, script_spec, server, target_for
from workloads.arrival import LoadPoint, send_times
from workloads.spec import RequestSpec

__all__ = ["server"]  # the fixture, re-used


async def _run(
    target: Target, specs: list[RequestSpec], point: LoadPoint, stop: StopRule
) -> tuple[PointOutcome, list[RequestRecord]]:
    records: list[RequestRecord] = []
    outcome = await run_point(target, specs, point, stop, records.append, time.perf_counter())
    return outcome, records


async def test_open_loop_follows_the_schedule_and_marks_phases(server: ScriptedServer) -> None:
    point = LoadPoint("rate", 40, "poisson", seed=11)
    specs = [script_spec(f"r{i}", n=3, itl=0.01) for i in range(40)]
    outcome, recs = await _run(target_for(server.url), specs, point, StopRule(requests=20, warmup=3, cooldown=3))
    assert outcome.stop_reason == "requests" and not outcome.point.closed_loop
    recs.sort(key=lambda r: r.scheduled)
    phases = [r.phase for r in recs]
    assert phases[:3] == ["warmup"] * 3 and phases[3:23] == ["measure"] * 20
    assert set(phases[23:]) <= {"cooldown"} and len(phases) <= 26
    # scheduled times are exactly the precomputed schedule: no drift
    offsets = send_times(point, len(recs))
    assert np.allclose([r.scheduled - outcome.started for r in recs], offsets, atol=1e-9)
    assert all(r.sent is not None and r.sent >= r.scheduled for r in recs if r.status != "cancelled")
    assert all(r.status == "ok" for r in recs if r.phase != "cooldown")
    assert outcome.counts["measure"] == 20 and outcome.counts["warmup"] == 3
    assert outcome.max_send_lag >= 0 and outcome.window_end is None


async def test_closed_loop_keeps_exactly_n_in_flight(server: ScriptedServer) -> None:
    point = LoadPoint("concurrency", 4, "closed")
    specs = [script_spec(f"r{i}", n=3, ttft=0.02, itl=0.01) for i in range(24)]
    outcome, recs = await _run(target_for(server.url), specs, point, StopRule())
    assert outcome.point.closed_loop and outcome.stop_reason == "requests"  # a sized spec list: all of it
    assert len(recs) == 24 and all(r.ok for r in recs)
    assert server.max_inflight == 4
    for w in range(4):
        mine = sorted((r for r in recs if r.worker == w), key=lambda r: r.scheduled)
        for prev, nxt in zip(mine, mine[1:], strict=False):
            assert prev.done is not None and nxt.scheduled >= prev.done
    assert outcome.client_cpu.samples  # sampled at least once (final partial interval)


async def test_cooldown_after_requests(server: ScriptedServer) -> None:
    point = LoadPoint("concurrency", 2, "closed")
    specs = [script_spec(f"r{i}", n=2, itl=0.02) for i in range(40)]
    outcome, recs = await _run(target_for(server.url), specs, point, StopRule(requests=6, warmup=2, cooldown=4))
    assert outcome.counts["warmup"] == 2 and outcome.counts["measure"] == 6
    assert outcome.counts.get("cooldown", 0) <= 4
    last_measured = max(r.scheduled for r in recs if r.phase == "measure")
    assert all(r.scheduled >= last_measured for r in recs if r.phase == "cooldown")
    assert all(r.ok for r in recs if r.phase != "cooldown")


async def test_duration_stop_cancels_in_flight(server: ScriptedServer) -> None:
    point = LoadPoint("concurrency", 2, "closed")
    specs = [script_spec(f"r{i}", n=100, itl=0.05) for i in range(10)]  # each would take 5 s
    t = time.perf_counter()
    outcome, recs = await _run(target_for(server.url), specs, point, StopRule(duration_s=0.4))
    assert time.perf_counter() - t < 3
    assert outcome.stop_reason == "duration" and outcome.window_end is not None
    assert len(recs) == 2 and all(r.status == "cancelled" for r in recs)
    assert all(r.chunk_times for r in recs)  # tokens received before the stop are kept


async def test_open_loop_duration_window(server: ScriptedServer) -> None:
    point = LoadPoint("rate", 30, "constant")
    specs = [script_spec(f"r{i}", n=2) for i in range(200)]
    outcome, recs = await _run(target_for(server.url), specs, point, StopRule(duration_s=0.5))
    assert outcome.stop_reason == "duration" and outcome.window_end is not None
    measured = [r for r in recs if r.phase == "measure"]
    assert all(r.scheduled < outcome.window_end for r in measured)
    assert 14 <= len(measured) <= 16  # 30 req/s for 0.5 s, constant spacing


async def test_error_budget_stops_early(server: ScriptedServer) -> None:
    point = LoadPoint("concurrency", 2, "closed")
    specs = [script_spec(f"r{i}", mode="http500") for i in range(200)]
    stop = StopRule(requests=200, error_budget=0.1, error_min_requests=5)
    outcome, recs = await _run(target_for(server.url), specs, point, stop)
    assert outcome.stop_reason == "error_budget"
    assert 5 <= outcome.counts["http_error"] < 20 and len(recs) < 20


async def test_chat_history_and_think_time(server: ScriptedServer) -> None:
    first = script_spec("t1", n=2, text="R1 ")
    first = RequestSpec(**{**_fields(first), "session": "s", "turn": 0})
    second = script_spec("t2", n=1)
    second = RequestSpec(**{**_fields(second), "session": "s", "turn": 1, "history_from": "t1", "think_time": 0.1})
    outcome, recs = await _run(
        target_for(server.url), [first, second], LoadPoint("rate", 100, "constant"), StopRule()
    )
    by_id = {r.request_id: r for r in recs}
    assert by_id["t1"].ok and by_id["t2"].ok, (by_id["t1"].error, by_id["t2"].error)
    sent_msgs = server.bodies[1]["messages"]
    assert [m["role"] for m in sent_msgs] == ["user", "assistant", "user"]
    assert sent_msgs[1]["content"] == "R1 R1 "
    assert by_id["t2"].scheduled >= by_id["t1"].done + 0.1  # type: ignore[operator]


async def test_failed_parent_skips_the_next_turn(server: ScriptedServer) -> None:
    first = RequestSpec(**{**_fields(script_spec("t1", mode="http500")), "session": "s"})
    second = RequestSpec(**{**_fields(script_spec("t2")), "session": "s", "history_from": "t1"})
    _, recs = await _run(target_for(server.url), [first, second], LoadPoint("concurrency", 2, "closed"), StopRule())
    by_id = {r.request_id: r for r in recs}
    assert by_id["t1"].status == "http_error"
    assert by_id["t2"].status == "cancelled" and by_id["t2"].tags.get("skipped") == "parent_failed"
    assert len(server.bodies) == 1


def _fields(spec: RequestSpec) -> dict[str, object]:
    return {f: getattr(spec, f) for f in spec.__dataclass_fields__}


@pytest.mark.parametrize("concurrency", [1, 3])
async def test_counts_add_up(server: ScriptedServer, concurrency: int) -> None:
    specs = [script_spec(f"r{i}", n=2) for i in range(9)]
    outcome, recs = await _run(
        target_for(server.url), specs, LoadPoint("concurrency", concurrency, "closed"), StopRule()
    )
    assert outcome.counts["total"] == len(recs) == 9 == outcome.counts["ok"]
    assert outcome.started <= min(r.scheduled for r in recs) and outcome.ended >= max(r.done or 0 for r in recs)
