"""The load-point runner against the scripted server on loopback: schedules, phases, stops, chat history."""

from __future__ import annotations

import asyncio
import gc
import itertools
import multiprocessing as mp
import time
import weakref
from dataclasses import replace
from typing import Any

import numpy as np
import pytest

from harness import runner as runner_mod
from harness.records import RequestRecord
from harness.runner import PointOutcome, StopRule, Target, run_point
from tests.test_client import ITL_MEAN_TOL_S, TTFT_TOL_S, ScriptedServer, script_spec, server, target_for
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
    outcome, recs = await _run(
        target_for(server.url), specs, point, StopRule(requests=20, warmup=3, cooldown=3)
    )
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
    # a request is due when its slot became free: all four at the point's start, then when the client read the end
    # of its slot's previous request (`done_read`; `done` is when that end arrived); the client's own time before
    # sending is send lag, not hidden in `scheduled`
    firsts = {min(r.scheduled for r in recs if r.worker == w) for w in range(4)}
    assert len(firsts) == 1, firsts
    for w in range(4):
        mine = sorted((r for r in recs if r.worker == w), key=lambda r: r.scheduled)
        for prev, nxt in itertools.pairwise(mine):
            assert prev.done is not None and prev.done_read is not None and prev.done <= prev.done_read
            assert nxt.scheduled == pytest.approx(prev.done_read, abs=1e-9)
            assert nxt.sent is not None and nxt.sent >= nxt.scheduled
    assert outcome.client_cpu.samples  # sampled at least once (final partial interval)


async def test_cooldown_after_requests(server: ScriptedServer) -> None:
    point = LoadPoint("concurrency", 2, "closed")
    specs = [script_spec(f"r{i}", n=2, itl=0.02) for i in range(40)]
    outcome, recs = await _run(
        target_for(server.url), specs, point, StopRule(requests=6, warmup=2, cooldown=4)
    )
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
    first = replace(script_spec("t1", n=2, text="R1 "), session="s", turn=0)
    second = replace(script_spec("t2", n=1), session="s", turn=1, history_from="t1", think_time=0.1)
    _outcome, recs = await _run(
        target_for(server.url), [first, second], LoadPoint("rate", 100, "constant"), StopRule()
    )
    by_id = {r.request_id: r for r in recs}
    assert by_id["t1"].ok and by_id["t2"].ok, (by_id["t1"].error, by_id["t2"].error)
    sent_msgs = server.bodies[1]["messages"]
    assert [m["role"] for m in sent_msgs] == ["user", "assistant", "user"]
    assert sent_msgs[1]["content"] == "R1 R1 "
    assert by_id["t2"].scheduled >= by_id["t1"].done + 0.1  # type: ignore[operator]


async def test_failed_parent_skips_the_next_turn(server: ScriptedServer) -> None:
    first = replace(script_spec("t1", mode="http500"), session="s")
    second = replace(script_spec("t2"), session="s", history_from="t1")
    _, recs = await _run(
        target_for(server.url), [first, second], LoadPoint("concurrency", 2, "closed"), StopRule()
    )
    by_id = {r.request_id: r for r in recs}
    assert by_id["t1"].status == "http_error"
    assert by_id["t2"].status == "cancelled" and by_id["t2"].tags.get("skipped") == "parent_failed"
    assert len(server.bodies) == 1


@pytest.mark.parametrize("concurrency", [1, 3])
async def test_counts_add_up(server: ScriptedServer, concurrency: int) -> None:
    specs = [script_spec(f"r{i}", n=2) for i in range(9)]
    outcome, recs = await _run(
        target_for(server.url), specs, LoadPoint("concurrency", concurrency, "closed"), StopRule()
    )
    assert outcome.counts["total"] == len(recs) == 9 == outcome.counts["ok"]
    assert outcome.started <= min(r.scheduled for r in recs) and outcome.ended >= max(
        r.done or 0 for r in recs
    )


def _child_clock(q: mp.Queue[float]) -> None:
    q.put(time.perf_counter())


def test_perf_counter_is_one_clock_across_processes() -> None:
    """Offsets from one run start are comparable between processes only if perf_counter is system-wide."""
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    before = time.perf_counter()
    p = ctx.Process(target=_child_clock, args=(q,))
    p.start()
    child = q.get(timeout=60)
    p.join(10)
    after = time.perf_counter()
    assert before < child < after


async def test_multiprocess_open_loop_is_the_same_plan(server: ScriptedServer) -> None:
    point = LoadPoint("rate", 60, "constant")
    specs = [script_spec(f"r{i}", n=2) for i in range(60)]
    records: list[RequestRecord] = []
    stop = StopRule(requests=30, warmup=4)
    outcome = await run_point(
        target_for(server.url), specs, point, stop, records.append, time.perf_counter(), processes=2
    )
    assert outcome.processes == 2 and len(outcome.per_process_cpu) == 2
    assert sorted(r.request_id for r in records) == sorted(f"r{i}" for i in range(34))
    assert all(r.ok for r in records), [r.error for r in records if not r.ok]
    by_index = sorted(records, key=lambda r: int(r.request_id[1:]))
    assert [r.phase for r in by_index] == ["warmup"] * 4 + ["measure"] * 30
    assert np.allclose([r.scheduled - outcome.started for r in by_index], send_times(point, 34), atol=1e-9)
    assert {r.worker for r in records} == {0, 1}
    assert outcome.counts["total"] == 34 and outcome.stop_reason == "requests"


async def test_multiprocess_closed_loop(server: ScriptedServer) -> None:
    point = LoadPoint("concurrency", 4, "closed")
    specs = [script_spec(f"r{i}", n=3, itl=0.01) for i in range(20)]
    records: list[RequestRecord] = []
    outcome = await run_point(
        target_for(server.url),
        specs,
        point,
        StopRule(warmup=2),
        records.append,
        time.perf_counter(),
        processes=2,
    )
    assert sorted(r.request_id for r in records) == sorted(s.request_id for s in specs)
    assert outcome.counts["warmup"] == 2 and outcome.counts["measure"] == 18
    assert server.max_inflight == 4 and {r.worker for r in records} == {0, 1, 2, 3}


async def test_a_failing_sink_stops_the_point_and_raises(server: ScriptedServer) -> None:
    seen: list[RequestRecord] = []

    def sink(rec: RequestRecord) -> None:
        seen.append(rec)
        if len(seen) == 3:
            raise OSError("disk full")

    specs = [script_spec(f"r{i}", n=2) for i in range(50)]
    with pytest.raises(OSError, match="disk full"):
        await run_point(
            target_for(server.url),
            specs,
            LoadPoint("concurrency", 2, "closed"),
            StopRule(),
            sink,
            time.perf_counter(),
        )
    assert 3 <= len(seen) < 10


@pytest.mark.parametrize(("connection", "connections"), [("keepalive", 1), ("fresh", 6)])
async def test_closed_loop_writes_the_next_request_from_the_read_callback(
    server: ScriptedServer, connection: str, connections: int
) -> None:
    """A slot's next request is sent by the read callback that saw the previous stream end, before the previous
    record is finished: a sink that holds the loop 0.2 s per record is not inside the next request's send lag.
    Keep-alive: on the connection that just became free. Fresh: on a new connection per request (loopback
    completes the handshake inside the connect call)."""
    records: list[RequestRecord] = []

    def slow_sink(rec: RequestRecord) -> None:
        records.append(rec)
        time.sleep(0.2)

    specs = [script_spec(f"r{i}", n=3, itl=0.005) for i in range(6)]
    outcome = await run_point(
        target_for(server.url, connection=connection),
        specs,
        LoadPoint("concurrency", 1, "closed"),
        StopRule(),
        slow_sink,
        time.perf_counter(),
    )
    assert outcome.counts["ok"] == len(records) == 6
    records.sort(key=lambda r: r.scheduled)
    for prev, nxt in itertools.pairwise(records):
        assert prev.done_read is not None and nxt.scheduled == pytest.approx(prev.done_read, abs=1e-9)
    lags = [r.sent - r.scheduled for r in records[1:] if r.sent is not None]
    assert len(lags) == 5 and max(lags) < 0.1, lags  # sent before the 0.2 s sink of the request before it
    assert len(set(server.peers)) == connections


async def test_a_chat_turn_is_sent_by_its_slot_task(server: ScriptedServer) -> None:
    """A turn that continues a conversation needs the reply it continues: the read callback leaves it to the slot's
    task, which sends it after the record before it was finished (here: after a 0.2 s sink)."""
    records: list[RequestRecord] = []

    def slow_sink(rec: RequestRecord) -> None:
        records.append(rec)
        time.sleep(0.2)

    first = replace(script_spec("t1", n=2, text="R1 "), session="s", turn=0)
    second = replace(script_spec("t2", n=1), session="s", turn=1, history_from="t1")
    await run_point(
        target_for(server.url),
        [first, second],
        LoadPoint("concurrency", 1, "closed"),
        StopRule(),
        slow_sink,
        time.perf_counter(),
    )
    by_id = {r.request_id: r for r in records}
    assert by_id["t1"].ok and by_id["t2"].ok
    assert server.bodies[1]["messages"][1]["content"] == "R1 R1 "
    t2 = by_id["t2"]
    assert t2.sent is not None and t2.sent - t2.scheduled >= 0.2


@pytest.mark.parametrize(
    ("duration_s", "connection"), [(0.2, "keepalive"), (0.33, "keepalive"), (0.47, "fresh")]
)
async def test_a_stopped_closed_loop_keeps_a_record_of_every_request_it_wrote(
    server: ScriptedServer, duration_s: float, connection: str
) -> None:
    """Short answers at 16 streams, stopped mid-flight without cool-down: requests written from read callbacks
    whose slot task had not run yet are recorded too (cancelled), none twice, and the counts add up."""
    specs = (script_spec(f"r{i}", n=1) for i in itertools.count())
    records: list[RequestRecord] = []
    outcome = await run_point(
        target_for(server.url, connection=connection),
        specs,
        LoadPoint("concurrency", 16, "closed"),
        StopRule(duration_s=duration_s),
        records.append,
        time.perf_counter(),
    )
    ids = [r.request_id for r in records]
    assert len(ids) == len(set(ids)) == outcome.counts["total"]
    assert outcome.counts["ok"] > 16  # slots went round more than once
    written = sum(r.sent is not None for r in records)
    assert len(server.bodies) <= written  # every request the server read has a record
    assert all(r.error for r in records if r.status == "cancelled")


@pytest.mark.parametrize("connection", ["keepalive", "fresh"])
async def test_a_request_written_from_the_read_callback_is_recorded_when_its_slot_is_cancelled(
    server: ScriptedServer, monkeypatch: pytest.MonkeyPatch, connection: str
) -> None:
    """The narrowest stop: the slot's task is cancelled right after the read callback wrote its next request,
    before the task resumed. The written request still gets its record (cancelled, saying so), its connection is
    dropped, and the point ends instead of waiting for a request nobody reads."""
    slot_tasks: list[asyncio.Task[Any]] = []
    real_worker, real_continue = runner_mod._PointRun.closed_worker, runner_mod._PointRun._continue

    async def worker(self: Any, worker: int, free_at: float) -> None:
        slot_tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        await real_worker(self, worker, free_at)

    def cont(self: Any, worker: int, current: Any, box: list[Any]) -> Any:
        then = real_continue(self, worker, current, box)

        def stop() -> None:  # what `_PointRun.run` does at a stop
            self.stopping = True
            slot_tasks[0].cancel()

        def cancel_after(conn: Any, done: float) -> None:
            then(conn, done)
            if box and box[0] is not None and box[0].handoff is not None:
                asyncio.get_running_loop().call_soon(stop)

        return cancel_after

    monkeypatch.setattr(runner_mod._PointRun, "closed_worker", worker)
    monkeypatch.setattr(runner_mod._PointRun, "_continue", cont)
    records: list[RequestRecord] = []
    specs = [
        script_spec(f"r{i}", n=3, ttft=0.02, itl=0.02) for i in range(5)
    ]  # the end arrives as its task waits
    async with asyncio.timeout(10):
        await run_point(
            target_for(server.url, connection=connection),
            specs,
            LoadPoint("concurrency", 1, "closed"),
            StopRule(),
            records.append,
            time.perf_counter(),
        )
    by_id = {r.request_id: r for r in records}
    assert set(by_id) == {"r0", "r1"}
    assert by_id["r1"].sent is not None and by_id["r1"].status == "cancelled"
    assert by_id["r1"].error == "the run stopped before the request finished"


async def test_duration_with_cooldown_lets_measured_requests_finish(server: ScriptedServer) -> None:
    point = LoadPoint("concurrency", 2, "closed")
    specs = [script_spec(f"r{i}", n=4, itl=0.05) for i in range(40)]  # 0.15 s each
    outcome, recs = await _run(target_for(server.url), specs, point, StopRule(duration_s=0.25, cooldown=4))
    assert outcome.stop_reason == "duration"
    measured = [r for r in recs if r.phase == "measure"]
    assert measured and all(r.ok for r in measured)  # finished under cool-down load, not cancelled
    assert all(r.scheduled < outcome.window_end for r in measured)  # type: ignore[operator]
    assert 1 <= outcome.counts.get("cooldown", 0) <= 4


async def test_abort_ends_the_point_and_returns(server: ScriptedServer) -> None:
    abort = asyncio.Event()
    specs = [script_spec(f"r{i}", n=100, itl=0.05) for i in range(10)]
    records: list[RequestRecord] = []
    asyncio.get_running_loop().call_later(0.3, abort.set)
    outcome = await run_point(
        target_for(server.url),
        specs,
        LoadPoint("concurrency", 2, "closed"),
        StopRule(),
        records.append,
        time.perf_counter(),
        abort=abort,
    )
    assert outcome.stop_reason == "aborted" and len(records) == 2
    assert all(r.status == "cancelled" for r in records)


async def test_ttft_and_itl_at_concurrency_8(server: ScriptedServer) -> None:
    """Known truth: the server answers each request after 50 ms, then a token every 5 ms (absolute deadlines)."""
    specs = [script_spec(f"r{i}", n=21, ttft=0.05, itl=0.005) for i in range(24)]
    outcome, recs = await _run(
        target_for(server.url), specs, LoadPoint("concurrency", 8, "closed"), StopRule(warmup=8)
    )
    measured = [r for r in recs if r.phase == "measure"]
    assert len(measured) == 16 and all(r.ok for r in measured), [
        (r.request_id, r.status, r.error) for r in recs if not r.ok
    ]
    ttfts = sorted(r.chunk_times[0] - r.scheduled for r in measured)
    assert ttfts[0] >= 0.05 and ttfts[len(ttfts) // 2] <= 0.05 + TTFT_TOL_S
    for r in measured:
        mean_itl = (r.chunk_times[-1] - r.chunk_times[0]) / (sum(r.chunk_tokens) - r.chunk_tokens[0])
        assert abs(mean_itl - 0.005) <= ITL_MEAN_TOL_S
    assert server.max_inflight == 8 and outcome.counts["warmup"] == 8


async def test_multiprocess_error_budget_counts_all_processes(server: ScriptedServer) -> None:
    specs = [script_spec(f"r{i}", mode="http500") for i in range(400)]
    records: list[RequestRecord] = []
    stop = StopRule(requests=400, error_budget=0.1, error_min_requests=6)
    outcome = await run_point(
        target_for(server.url),
        specs,
        LoadPoint("concurrency", 2, "closed"),
        stop,
        records.append,
        time.perf_counter(),
        processes=2,
    )
    assert outcome.stop_reason == "error_budget" and len(records) < 40


async def test_precise_waker_never_wakes_early_and_works_without_a_timerfd() -> None:
    from harness.runner import PreciseWaker

    waker = PreciseWaker()
    late = []
    try:
        for _ in range(15):
            deadline = time.perf_counter() + 0.003
            await waker.sleep_until(deadline)
            late.append(time.perf_counter() - deadline)
        await waker.sleep_until(time.perf_counter() - 1.0)  # a deadline in the past returns at once
    finally:
        waker.close()
    assert min(late) >= 0.0
    waker = PreciseWaker()
    waker.close()  # the fallback (no timerfd): asyncio.sleep
    deadline = time.perf_counter() + 0.003
    await waker.sleep_until(deadline)
    assert time.perf_counter() >= deadline


@pytest.mark.bench
async def test_precise_waker_is_closer_to_the_deadline_than_asyncio_sleep() -> None:
    """Same run, alternating: the timerfd's median lateness is below asyncio.sleep's (which epoll rounds up to ms)."""
    from harness.runner import PreciseWaker

    waker = PreciseWaker()
    precise, plain = [], []
    try:
        for i in range(60):
            deadline = time.perf_counter() + 0.0023
            if i % 2:
                await waker.sleep_until(deadline)
                precise.append(time.perf_counter() - deadline)
            else:
                await asyncio.sleep(deadline - time.perf_counter())
                plain.append(time.perf_counter() - deadline)
    finally:
        waker.close()
    assert float(np.median(precise)) < float(np.median(plain)), (np.median(precise), np.median(plain))


class _Cycle:
    def __init__(self) -> None:
        self.me = self


def test_the_garbage_collector_is_paused_for_a_point_with_a_valve(monkeypatch: pytest.MonkeyPatch) -> None:
    """Paused inside `gc_paused` (cyclic garbage stays), collected by the valve once enough containers live, and
    enabled again after."""
    assert gc.isenabled()
    monkeypatch.setattr(runner_mod, "GC_VALVE", 5_000)
    gc.collect()  # the young generation's count starts from 0
    with runner_mod.gc_paused():
        assert not gc.isenabled()
        ref = weakref.ref(_Cycle())
        runner_mod.gc_valve()
        assert ref() is not None  # garbage, but nothing collects it yet
        kept: list[list[int]] = [[] for _ in range(6_000)]  # live containers past the valve
        runner_mod.gc_valve()
        assert ref() is None
        del kept
    assert gc.isenabled()


async def test_a_point_runs_with_the_collector_paused_and_restores_it(server: ScriptedServer) -> None:
    states: list[bool] = []

    def sink(rec: RequestRecord) -> None:
        states.append(gc.isenabled())

    specs = [script_spec(f"r{i}", n=2) for i in range(4)]
    await run_point(
        target_for(server.url),
        specs,
        LoadPoint("concurrency", 2, "closed"),
        StopRule(),
        sink,
        time.perf_counter(),
    )
    assert states == [False] * 4 and gc.isenabled()


def _paced_point(monkeypatch: pytest.MonkeyPatch, tick_ms: str, point: LoadPoint, n: int) -> Any:
    """`n` requests of 10 tokens 10 ms apart (TTFT 20 ms) against the scripted server in its own process, the
    client's read tick set to `tick_ms`; the records, the server's account of each request, and the run's start."""
    from adapters.scripted import make_adapter
    from harness import loop as event_loop
    from harness.calibrate import calibration_specs
    from harness.calibration import ScriptConfig, fetch_stats, serve_in_process

    monkeypatch.setenv(event_loop.READ_TICK_ENV, tick_ms)
    with serve_in_process(ScriptConfig(ttft=0.02, itl=0.01, output_tokens=10)) as url:
        target = Target("scripted", url, make_adapter(), "scripted")
        specs = list(itertools.islice(calibration_specs(f"tick{tick_ms}", 10), n))
        records: list[RequestRecord] = []
        run_start = time.perf_counter()
        event_loop.run(run_point(target, specs, point, StopRule(), records.append, run_start))
        truth = fetch_stats(url, detail=True)["per_request"]
    assert len(records) == n and all(r.ok for r in records), [r.error for r in records if not r.ok]
    return records, truth, run_start


def test_the_read_tick_delays_reads_not_timestamps(monkeypatch: pytest.MonkeyPatch) -> None:
    """With a 4 ms read tick the client reads up to 4 ms after bytes arrive, yet times every token by its arrival
    (the kernel's): TTFT and ITL against the server's own write times stay within a millisecond. The late reads
    show where they belong, as the gap between a stream's end arriving and the client reading it (`done_read`)."""
    from harness.calibrate import match_errors

    records, truth, run_start = _paced_point(monkeypatch, "4", LoadPoint("concurrency", 8, "closed"), 32)
    errs = match_errors(records, truth, run_start)
    assert len(errs["ttft"]) == 32 and errs["itl"]
    assert np.median(np.abs(errs["ttft"])) < 0.001 and np.median(np.abs(errs["itl"])) < 0.001, (
        np.percentile(errs["ttft"], [50, 100]),
        np.percentile(errs["itl"], [50, 100]),
    )
    late = [r.done_read - r.done for r in records if r.done_read is not None and r.done is not None]
    assert len(late) == 32 and 0.0005 < float(np.median(late)) < 0.0045, np.percentile(late, [0, 50, 100])


def test_an_open_loop_is_not_paced_past_its_send_times(monkeypatch: pytest.MonkeyPatch) -> None:
    """A read tick of 4 ms, requests due every 10 ms: the pacer wakes for each send time (`PreciseWaker` tells it),
    so requests leave on time rather than up to a tick late."""
    records, _, _ = _paced_point(monkeypatch, "4", LoadPoint("rate", 100.0, "constant"), 40)
    lags = [r.sent - r.scheduled for r in records if r.sent is not None]
    assert len(lags) == 40 and float(np.percentile(lags, 90)) < 0.0015, np.percentile(lags, [50, 90, 100])


class _SlowFirstBuild:
    """A codec whose first build loads something (as Triton's client-side chat template reads the model's tokenizer):
    0.2 s, once. Every other call goes to the real codec."""

    def __init__(self, codec: Any) -> None:
        self._codec, self.loaded = codec, False

    def build(self, *args: Any) -> Any:
        if not self.loaded:
            time.sleep(0.2)
            self.loaded = True
        return self._codec.build(*args)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._codec, name)


async def test_a_codecs_first_build_is_off_the_clock(server: ScriptedServer) -> None:
    """The point builds its first request once before it starts: a slow first build does not make the first sends
    late (without it the first four left ~200 ms late)."""
    base = target_for(server.url)
    target = replace(base, adapter=_SlowFirstBuild(base.adapter))
    point = LoadPoint("concurrency", 4, "closed")
    specs = [script_spec(f"r{i}", n=2, ttft=0.01, itl=0.005) for i in range(8)]
    outcome, recs = await _run(target, specs, point, StopRule())
    assert all(r.ok for r in recs)
    lags = [r.sent - r.scheduled for r in recs if r.sent is not None]
    if max(lags) >= 0.05 and outcome.client_cpu.cpu_wait and outcome.client_cpu.cpu_wait > 0.1:
        pytest.skip(
            f"the client waited for a CPU {outcome.client_cpu.cpu_wait:.0%} of the point; max lag {max(lags)}"
        )
    assert max(lags) < 0.05, sorted(lags)
