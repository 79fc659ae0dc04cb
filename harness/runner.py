"""Runs one load point: dispatches requests on the arrival schedule, marks phases, stops, and samples the client's CPU.

Open loop (a rate): request i is due at `start + send_times(point)[i]`, dispatched with no concurrency cap (a semaphore
would turn a backlog into a burst, vllm PR#45502) and no drift (each wake-up aims at an absolute deadline). When the
client is late the request is still sent at once and the lag is recorded (`sent - scheduled`); latency counts from
`scheduled`. Closed loop (a concurrency): N workers each send their next request when the previous one finished;
`scheduled` is the moment the slot became free.

Phases: the first `warmup` requests are `warmup`. The measurement window closes when `requests` measured requests have
been scheduled, when `duration_s` has passed since the first measured request was due, when the error budget is
spent, or when the specs run out. Requests scheduled after that are `cooldown` (at most `cooldown` of them, sent only
while warm-up / measured requests are still in flight, so those finish under the same load). Then:
- error budget spent, or a duration stop without cool-down: everything in flight is cancelled (status `cancelled`);
- otherwise: the runner waits for the warm-up and measured requests to finish, then cancels leftover cool-down ones.

Chat turns with `history_from` wait for that request's reply, extend its conversation with it as an assistant message,
pause `think_time`, and count as due from then. Every finished record goes to `sink` at once.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sized
from dataclasses import dataclass, field
from typing import Any, Literal

import aiohttp
import psutil

from harness.client import Target, execute, make_session, new_record, timeouts_for
from harness.records import Phase, RequestRecord
from workloads.arrival import LoadPoint, send_times
from workloads.spec import RequestSpec

__all__ = ["ClientCpu", "PointOutcome", "StopReason", "StopRule", "Target", "run_point"]

StopReason = Literal["requests", "duration", "error_budget", "specs_exhausted"]
CPU_INTERVAL_S = 0.5
CPU_SATURATED = 0.85  # mean utilisation of one core above which the client, not the server, may set the pace
_SCHEDULE_BLOCK = 4096


@dataclass(frozen=True)
class StopRule:
    """When a point stops. With neither `requests` nor `duration_s`, all specs are sent (a sized collection's last
    `cooldown` ones as cool-down). `error_budget` is a fraction of failed measured requests, judged once
    `error_min_requests` measured requests have finished."""

    requests: int | None = None
    duration_s: float | None = None
    error_budget: float | None = None
    warmup: int = 0
    cooldown: int = 0
    stall_timeout_s: float = 60.0
    request_timeout_s: float = 600.0
    error_min_requests: int = 10

    def __post_init__(self) -> None:
        from harness.errors import ConfigError

        if self.requests is not None and self.requests < 1:
            raise ConfigError(f"--requests must be >= 1, got {self.requests}")
        if self.duration_s is not None and self.duration_s <= 0:
            raise ConfigError(f"--duration must be > 0 seconds, got {self.duration_s}")
        if self.error_budget is not None and not 0 <= self.error_budget <= 1:
            raise ConfigError(f"--error-budget is a fraction 0..1, got {self.error_budget}")
        if self.warmup < 0 or self.cooldown < 0:
            raise ConfigError("--warmup and --cooldown are request counts >= 0")


@dataclass(frozen=True)
class ClientCpu:
    """CPU use of the client process(es) during the point, as a fraction of one core, sampled every `interval_s`."""

    samples: tuple[float, ...]
    interval_s: float = CPU_INTERVAL_S

    @property
    def mean_util(self) -> float:
        return sum(self.samples) / len(self.samples) if self.samples else 0.0

    @property
    def max_util(self) -> float:
        return max(self.samples, default=0.0)

    @property
    def saturated(self) -> bool:
        return self.mean_util >= CPU_SATURATED

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean_util": self.mean_util,
            "max_util": self.max_util,
            "saturated": self.saturated,
            "samples": len(self.samples),
            "interval_s": self.interval_s,
        }


@dataclass(frozen=True)
class PointOutcome:
    """How a point went; times are offsets from the run start. `counts` has `total`, each phase and each status."""

    point: LoadPoint
    started: float
    ended: float
    counts: dict[str, int]
    stop_reason: StopReason
    client_cpu: ClientCpu
    max_send_lag: float
    window_end: float | None = None
    processes: int = 1
    per_process_cpu: tuple[ClientCpu, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        return {
            "kind": "point_outcome",
            "point": self.point.id,
            "load": self.point.describe(),
            "started": self.started,
            "ended": self.ended,
            "window_end": self.window_end,
            "counts": dict(self.counts),
            "stop_reason": self.stop_reason,
            "client_cpu": self.client_cpu.to_dict(),
            "per_process_cpu": [c.to_dict() for c in self.per_process_cpu],
            "max_send_lag": self.max_send_lag,
            "processes": self.processes,
        }


async def sample_cpu(out: list[float], interval_s: float = CPU_INTERVAL_S) -> None:
    """Append this process's CPU utilisation (fraction of one core) every `interval_s` until cancelled; the last,
    partial interval is appended on cancellation when it is long enough to mean something."""
    proc = psutil.Process()

    def busy() -> float:
        t = proc.cpu_times()
        return float(t.user + t.system)

    last_wall, last_cpu = time.perf_counter(), busy()
    try:
        while True:
            await asyncio.sleep(interval_s)
            wall, cpu = time.perf_counter(), busy()
            out.append((cpu - last_cpu) / (wall - last_wall))
            last_wall, last_cpu = wall, cpu
    except asyncio.CancelledError:
        wall, cpu = time.perf_counter(), busy()
        if wall - last_wall >= interval_s / 5:
            out.append((cpu - last_cpu) / (wall - last_wall))
        raise


@dataclass
class _Turn:
    spec: RequestSpec  # as sent, with its history
    rec: RequestRecord


@dataclass
class _PointRun:
    target: Target
    specs: Iterator[RequestSpec]
    point: LoadPoint
    stop: StopRule
    sink: Callable[[RequestRecord], None]
    run_start: float
    requests: int | None
    session: aiohttp.ClientSession
    keep_text: bool = False
    schedule: Iterator[float] | None = None  # open loop: absolute perf_counter deadlines
    t0: float = 0.0
    window_start: float | None = None  # absolute
    window_end: float | None = None
    window_closed: bool = False
    stop_reason: StopReason | None = None
    stopping: bool = False
    dispatched: int = 0
    measured_dispatched: int = 0
    cooldown_dispatched: int = 0
    primary_inflight: int = 0
    measured_judged: int = 0
    measured_failed: int = 0
    max_lag: float = 0.0
    counts: Counter[str] = field(default_factory=Counter)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)
    turns: dict[str, asyncio.Future[_Turn]] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def __post_init__(self) -> None:
        self.timeout = timeouts_for(
            self.target.stream, self.stop.stall_timeout_s, self.stop.request_timeout_s
        )

    # -- dispatch decisions --------------------------------------------------------------------------------------
    def close_window(self, reason: StopReason) -> None:
        if not self.window_closed:
            self.window_closed, self.stop_reason = True, reason
            self.changed.set()

    def take(self, due: float) -> tuple[RequestSpec, Phase] | None:
        """The next spec and its phase for a request due at `due` (absolute), or None: stop dispatching."""
        if self.stopping:
            return None
        phase: Phase
        if self.dispatched < self.stop.warmup:
            phase = "warmup"
        else:
            if self.window_start is None:
                self.window_start = due
                if self.stop.duration_s is not None:
                    self.window_end = due + self.stop.duration_s
                    self.changed.set()
            if self.window_end is not None and due >= self.window_end:
                self.close_window("duration")
            phase = "cooldown" if self.window_closed else "measure"
        if phase == "cooldown" and (
            self.cooldown_dispatched >= self.stop.cooldown or self.primary_inflight == 0
        ):
            return None
        spec = next(self.specs, None)
        if spec is None:
            self.close_window("specs_exhausted")
            return None
        self.dispatched += 1
        if phase == "cooldown":
            self.cooldown_dispatched += 1
        else:
            self.primary_inflight += 1
            if phase == "measure":
                self.measured_dispatched += 1
                if self.requests is not None and self.measured_dispatched >= self.requests:
                    self.close_window("requests")
        return spec, phase

    # -- one request ---------------------------------------------------------------------------------------------
    async def one(self, spec: RequestSpec, phase: Phase, due: float, worker: int) -> None:
        rec = new_record(
            self.target, spec, point=self.point.id, phase=phase, scheduled=due - self.run_start, worker=worker
        )
        turn_fut: asyncio.Future[_Turn] | None = None
        if spec.session is not None:
            turn_fut = asyncio.get_running_loop().create_future()
            self.turns[spec.request_id] = turn_fut
        sent_spec = spec
        try:
            if spec.history_from is not None:
                sent_spec = await self.with_history(spec, rec)
            if rec.error is None:
                await execute(
                    self.session,
                    self.target,
                    sent_spec,
                    rec,
                    self.run_start,
                    self.timeout,
                    self.keep_text or turn_fut is not None,
                )
        except asyncio.CancelledError:
            if rec.status != "cancelled":
                rec.status, rec.error = "cancelled", "the run stopped before the request was sent"
        finally:
            self.finish(rec, phase)
            if turn_fut is not None and not turn_fut.done():
                turn_fut.set_result(_Turn(sent_spec, rec))

    async def with_history(self, spec: RequestSpec, rec: RequestRecord) -> RequestSpec:
        parent_fut = self.turns.get(spec.history_from or "")
        if parent_fut is None:
            rec.status, rec.error = (
                "stream_error",
                f"history_from {spec.history_from!r} was not sent before this turn",
            )
            return spec
        parent = await asyncio.shield(parent_fut)
        if not parent.rec.ok or parent.rec.output_text is None or parent.rec.done is None:
            rec.status = "cancelled"
            rec.error = f"skipped: the turn it continues ({spec.history_from}) ended {parent.rec.status}"
            rec.tags["skipped"] = "parent_failed"
            return spec
        due = max(rec.scheduled, parent.rec.done + spec.think_time)
        rec.scheduled = due
        delay = due + self.run_start - time.perf_counter()
        if delay > 0:
            await asyncio.sleep(delay)
        reply = parent.rec.output_text
        if spec.api == "chat":
            history = (*parent.spec.messages, {"role": "assistant", "content": reply})
            return dataclasses.replace(spec, messages=(*history, *spec.messages))
        return dataclasses.replace(spec, prompt=parent.spec.prompt + reply + spec.prompt)

    def finish(self, rec: RequestRecord, phase: Phase) -> None:
        self.counts["total"] += 1
        self.counts[phase] += 1
        self.counts[rec.status] += 1
        if rec.sent is not None:
            self.max_lag = max(self.max_lag, rec.sent - rec.scheduled)
        if phase != "cooldown":
            self.primary_inflight -= 1
        if phase == "measure" and rec.status != "cancelled":
            self.measured_judged += 1
            self.measured_failed += not rec.ok
            budget = self.stop.error_budget
            if (
                budget is not None
                and self.measured_judged >= self.stop.error_min_requests
                and self.measured_failed > budget * self.measured_judged
            ):
                self.close_window("error_budget")
        self.sink(rec)
        self.changed.set()

    # -- drivers -------------------------------------------------------------------------------------------------
    async def open_loop(self) -> None:
        assert self.schedule is not None
        clock, loop = time.perf_counter, asyncio.get_running_loop()
        for deadline in self.schedule:
            delay = deadline - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            item = self.take(deadline)
            if item is None:
                return
            task = loop.create_task(self.one(item[0], item[1], deadline, 0))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        self.close_window("specs_exhausted")

    async def closed_worker(self, worker: int) -> None:
        while not self.stopping:
            due = time.perf_counter()
            item = self.take(due)
            if item is None:
                return
            await self.one(item[0], item[1], due, worker)

    def should_end(self) -> bool:
        if not self.window_closed:
            return False
        if self.stop_reason == "error_budget" or (self.stop_reason == "duration" and self.stop.cooldown == 0):
            return True
        return self.primary_inflight == 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.t0 = time.perf_counter()
        drivers: list[asyncio.Task[None]]
        if self.point.closed_loop:
            drivers = [loop.create_task(self.closed_worker(w)) for w in range(self.point.concurrency)]
        else:
            self.schedule = _deadlines(self.point, self.t0)
            drivers = [loop.create_task(self.open_loop())]
        try:
            while True:
                self.changed.clear()
                if (
                    self.window_end is not None
                    and not self.window_closed
                    and time.perf_counter() >= self.window_end
                ):
                    self.close_window("duration")
                if self.should_end():
                    break
                if all(d.done() for d in drivers) and not self.tasks and self.primary_inflight == 0:
                    self.close_window("specs_exhausted")
                    break
                timeout = None
                if self.window_end is not None and not self.window_closed:
                    timeout = max(0.0, self.window_end - time.perf_counter())
                try:
                    async with asyncio.timeout(timeout):
                        await self.changed.wait()
                except TimeoutError:
                    pass
        finally:
            self.stopping = True
            pending = [*drivers, *self.tasks]
            for task in pending:
                task.cancel()
            await asyncio.gather(*pending, return_exceptions=True)


def _deadlines(point: LoadPoint, t0: float) -> Iterator[float]:
    """Absolute deadlines from the point's seeded schedule, in blocks (the prefix never depends on the block size)."""
    n = _SCHEDULE_BLOCK
    done = 0
    while True:
        offsets = send_times(point, n)
        for off in offsets[done:]:
            yield t0 + float(off)
        done, n = n, n * 4


async def run_point(
    target: Target,
    specs: Iterable[RequestSpec],
    point: LoadPoint,
    stop: StopRule,
    sink: Callable[[RequestRecord], None],
    run_start: float,
    *,
    keep_text: bool = False,
) -> PointOutcome:
    """Run one load point against `target`; every finished record goes to `sink`; returns how the point went."""
    requests = stop.requests
    if requests is None and stop.duration_s is None and isinstance(specs, Sized):
        requests = max(1, len(specs) - stop.warmup - stop.cooldown)
    cpu: list[float] = []
    connections = point.concurrency if point.closed_loop else 0
    async with make_session(target, connections) as session:
        state = _PointRun(target, iter(specs), point, stop, sink, run_start, requests, session, keep_text)
        sampler = asyncio.get_running_loop().create_task(sample_cpu(cpu))
        try:
            await state.run()
        finally:
            sampler.cancel()
            await asyncio.gather(sampler, return_exceptions=True)
    ended = time.perf_counter() - run_start
    return PointOutcome(
        point=point,
        started=state.t0 - run_start,
        ended=ended,
        counts=dict(state.counts),
        stop_reason=state.stop_reason or "specs_exhausted",
        client_cpu=ClientCpu(tuple(cpu)),
        max_send_lag=state.max_lag,
        window_end=None if state.window_end is None else state.window_end - run_start,
    )
