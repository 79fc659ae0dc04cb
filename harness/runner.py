"""Runs one load point: dispatches requests on the arrival schedule, marks phases, stops, and samples the client's CPU.

Open loop (a rate): request i is due at `start + send_times(point)[i]`, dispatched with no concurrency cap (a semaphore
would turn a backlog into a burst, vllm PR#45502) and no drift (each wake-up aims at an absolute deadline, through a
timerfd on Linux: `PreciseWaker`, since asyncio's own timers wake up to 1 ms late). When the
client is late the request is still sent at once and the lag is recorded (`sent - scheduled`); latency counts from
`scheduled`. Closed loop (a concurrency): N workers each send their next request when the previous one finished;
`scheduled` is the moment the slot became free: the point's start, then the moment the client read the previous
request's end (`done_read`; its `done` is when those bytes arrived, from the kernel, and may be earlier when the
client read late: `summary.end_read_lag_ms`, and the `slot_idle` rule judges it). For streams the next request is
sent by the read callback that saw the previous stream end, on the keep-alive connection it frees or on a new
connection whose handshake completed in the connect call (`_PointRun._continue`, `client.send_on`); its record is
finished after. At 256 streams, where
dozens of streams end within a millisecond, this took the keep-alive send lag from 0.4 / 3.5 ms (p50 / p99, sent from
the slot's task behind every callback queued before it) to 0.03 / 0.1 ms (benchmarks/README.md). Chat turns that wait
for a reply, and connections that need the event loop to connect, are sent from the slot's task.

Phases: the first `warmup` requests are `warmup`. The measurement window closes when `requests` measured requests have
been scheduled, when `duration_s` has passed since the first measured request was due, when the error budget is
spent, or when the specs run out. Requests scheduled after that are `cooldown` (at most `cooldown` of them, sent only
while warm-up / measured requests are still in flight, so those finish under the same load). Then:
- error budget spent, or a duration stop without cool-down: everything in flight is cancelled (status `cancelled`);
- otherwise: the runner waits for the warm-up and measured requests to finish, then cancels leftover cool-down ones.

Chat turns with `history_from` wait for that request's reply, extend its conversation with it as an assistant message,
pause `think_time`, and count as due from then. Every finished record goes to `sink` at once. The client process's
CPU is sampled every 0.5 s (a saturated client inflates TTFT and ITL). Python's cyclic garbage collector is paused
for the point (`gc_paused`): its collections held the loop 1.5-12 ms at a time and collected nothing. Where reads
keep the kernel's arrival time (plain HTTP on Linux), the loop wakes at most once per read tick (`ReadPacer`, 0.5
ms): reads wait for the tick's end, their timestamps do not.
`run_point(..., processes=N)` splits the point across N OS processes sharing one start time
(`run_point_multiprocess`, at the end of this module).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import dataclasses
import gc
import itertools
import multiprocessing as mp
import os
import queue
import sys
import time
import traceback
import zlib
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import orjson
import psutil

from harness import kernel_time
from harness import loop as event_loop
from harness.client import (
    Handoff,
    Session,
    Target,
    Then,
    execute,
    make_session,
    new_record,
    send_on,
    timeouts_for,
)
from harness.loopwatch import LoopWatch
from harness.records import Phase, RequestRecord
from workloads.arrival import LoadPoint, send_times
from workloads.spec import RequestSpec, continued

__all__ = [
    "ClientCpu",
    "PointOutcome",
    "PreciseWaker",
    "StopReason",
    "StopRule",
    "Target",
    "execute_point",
    "run_point",
    "run_point_multiprocess",
    "sample_cpu",
]

StopReason = Literal["requests", "duration", "error_budget", "specs_exhausted", "aborted"]
CPU_INTERVAL_S = 0.5
# mean utilisation of one core above which the client, not the server, may set the pace: `bench calibrate` finds its
# ceiling by it; a run's verdict uses VerdictPolicy.max_client_cpu_util (the summary derives `saturated` from that)
CPU_SATURATED = 0.85
_SCHEDULE_BLOCK = 4096
GC_VALVE = 200_000  # containers a point keeps alive beyond those it freed, at which the paused collector runs


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for a load point, on again (and run) after it.

    Measured at 256 streams (benchmarks/README.md): a point collected no cyclic garbage at all, yet its automatic
    collections held the event loop 1.5-12 ms at a time (young generations of a few thousand coroutines, handles
    and records), and the reads they delayed were the TTFT error's p99. So: freeze what exists before the point (it
    is not traversed during it; no collection first, which in a large process takes long enough to shift the
    point's start), collect nothing during it, and collect everything after it. A long point that keeps `GC_VALVE`
    more containers alive than it frees gets a collection each time it does (`gc_valve`, called as each record is
    finished): memory stays bounded if some request path ever makes reference cycles."""
    was_enabled = gc.isenabled()
    gc.freeze()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
        gc.unfreeze()
        gc.collect()


def gc_valve() -> None:
    """The paused collector's safety valve: collect when the point has allocated `GC_VALVE` containers."""
    if not gc.isenabled() and gc.get_count()[0] >= GC_VALVE:
        gc.collect()


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
    # share of the point its loop thread was runnable but had no CPU (LoopWatch)
    cpu_wait: float | None = None

    @property
    def mean_util(self) -> float:
        return sum(self.samples) / len(self.samples) if self.samples else 0.0

    @property
    def max_util(self) -> float:
        return max(self.samples, default=0.0)

    @property
    def saturated(self) -> bool:
        return self.mean_util >= CPU_SATURATED

    @classmethod
    def busiest(cls, cpus: Sequence[ClientCpu]) -> ClientCpu:
        """Several client processes as one: the busiest one's use, the longest any waited for a CPU."""
        if not cpus:
            return cls(())
        waits = [c.cpu_wait for c in cpus if c.cpu_wait is not None]
        return dataclasses.replace(max(cpus, key=lambda c: c.mean_util), cpu_wait=max(waits, default=None))

    def to_dict(self) -> dict[str, Any]:
        return {
            "mean_util": self.mean_util,
            "max_util": self.max_util,
            "saturated": self.saturated,
            "samples": len(self.samples),
            "interval_s": self.interval_s,
            "cpu_wait": self.cpu_wait,
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


class _Timespec(ctypes.Structure):
    _fields_ = [("tv_sec", ctypes.c_long), ("tv_nsec", ctypes.c_long)]


class _Itimerspec(ctypes.Structure):
    _fields_ = [("it_interval", _Timespec), ("it_value", _Timespec)]


def read_tick_s(target: Target) -> float:
    """The read tick (`harness.loop.read_tick_s`) where reads keep the kernel's arrival time; 0 elsewhere (TLS, other
    systems), since there a later read would be a later timestamp."""
    tick = event_loop.read_tick_s()
    return tick if kernel_time.ENABLED and target.base_url.startswith("http://") else 0.0


class ReadPacer:
    """At most one wake-up of the event loop per `tick_s`: the loop runs, then this callback sleeps out the rest of
    the tick, and the next iteration handles every socket that became readable meanwhile, in one `epoll_wait`.

    Reads keep the kernel's arrival time (`harness.kernel_time.StampedTransport`), so reading up to a tick later
    changes no timestamp; what it saves is a wake-up per read: at 64 streams of 5 ms ITL (12,800 reads/s) the
    client's CPU fell by a quarter to a third at 0.5 ms, by half at 1 ms, timing errors unchanged
    (benchmarks/README.md item 16). What it costs, each kept honest: a closed loop's slot frees when the client
    read the end (`done_read`, so `slot_idle` counts the wait); chunks of one stream less than a tick apart share a
    read (and its time, that of the later one); the loop's own timers may fire up to a tick late. An open loop's
    next deadline is not slept past: `PreciseWaker` sets `wake_by`. A loop busier than a tick never sleeps."""

    def __init__(self, tick_s: float) -> None:
        self.tick_s = tick_s
        self.wake_by: float | None = None  # perf_counter of the next open-loop send
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last = 0.0
        self._stopped = False
        self._kicked = False
        self._reads = 0
        self._passed = False  # let work through once since the last sleep

    def start(self) -> None:
        if self.tick_s > 0:
            self._loop = asyncio.get_running_loop()
            self._last = time.perf_counter()
            self._loop.call_soon(self._pace)

    def stop(self) -> None:
        self._stopped = True

    def kick(self) -> None:
        """Work was queued for the loop's next pass (an open-loop request's task): do not sleep before it runs."""
        self._kicked = True

    def _pace(self) -> None:
        if self._stopped or self._loop is None:
            return
        # this runs first in the loop's pass over its ready callbacks: the tasks that the reads just done woke up
        # come after it. So once per tick, when reads came in, let them run before sleeping; an open-loop send
        # (`kick`) always goes first
        reads = kernel_time.reads
        if self._kicked or (reads != self._reads and not self._passed):
            self._kicked, self._reads, self._passed = False, reads, True
            self._loop.call_soon(self._pace)
            return
        self._reads = reads
        now = time.perf_counter()
        wake = self._last + self.tick_s
        if self.wake_by is not None and self.wake_by < wake:
            wake = self.wake_by
        if wake > now:
            time.sleep(wake - now)
            now = time.perf_counter()
        self._last, self._passed = now, False
        self._loop.call_soon(self._pace)


class PreciseWaker:
    """Sleeps until an absolute `time.perf_counter()` deadline with sub-millisecond precision.

    asyncio's timers wake late: epoll takes its timeout in whole milliseconds (rounded up) and a timer counts as due
    only within the clock's resolution, so an open-loop request was sent 0.9 ms late at p50 (100 req/s, loopback).
    On Linux a timerfd armed on CLOCK_MONOTONIC (the clock behind `perf_counter`) at the absolute deadline makes
    epoll itself wake on time, with no busy-waiting and on any event loop that has `add_reader` (uvloop too).
    Elsewhere, or if the timerfd cannot be made, it falls back to `asyncio.sleep`.
    """

    def __init__(self, pacer: ReadPacer | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        self._pacer = pacer  # told each deadline, so it does not sleep past it
        self._fut: asyncio.Future[None] | None = None
        self._fd = -1
        self._settime: Any = None
        if sys.platform != "linux":
            return
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            fd = libc.timerfd_create(1, os.O_NONBLOCK | os.O_CLOEXEC)  # CLOCK_MONOTONIC
            libc.prctl(29, 1000)  # PR_SET_TIMERSLACK: 1 µs, not the default 50 µs, for this process
            if fd < 0:
                return
            self._loop.add_reader(fd, self._fired)
        except (OSError, AttributeError, NotImplementedError):
            return
        self._fd, self._settime = fd, libc.timerfd_settime

    def _fired(self) -> None:
        with contextlib.suppress(BlockingIOError, InterruptedError):
            os.read(self._fd, 8)
        fut = self._fut
        if fut is not None and not fut.done():
            fut.set_result(None)

    async def sleep_until(self, deadline: float) -> None:
        delay = deadline - time.perf_counter()
        if delay <= 0:
            return
        if self._pacer is not None:
            self._pacer.wake_by = deadline
        try:
            await self._sleep_until(deadline, delay)
        finally:
            if self._pacer is not None:
                self._pacer.wake_by = None

    async def _sleep_until(self, deadline: float, delay: float) -> None:
        if self._fd < 0:
            await asyncio.sleep(delay)
            return
        sec = int(deadline)
        spec = _Itimerspec(_Timespec(0, 0), _Timespec(sec, int((deadline - sec) * 1e9)))
        if self._settime(self._fd, 1, ctypes.byref(spec), None) != 0:  # TFD_TIMER_ABSTIME
            await asyncio.sleep(delay)
            return
        self._fut = self._loop.create_future()
        try:
            await self._fut
        finally:
            self._fut = None

    def close(self) -> None:
        if self._fd >= 0:
            with contextlib.suppress(Exception):
                self._loop.remove_reader(self._fd)
            os.close(self._fd)
            self._fd = -1


@dataclass
class _Turn:
    spec: RequestSpec  # as sent, with its history
    rec: RequestRecord


@dataclass
class _Next:
    """A closed-loop slot's next request, taken (and, on a keep-alive stream, written: `handoff`) by the read
    callback of the slot's previous request the moment its stream ended."""

    spec: RequestSpec
    phase: Phase
    due: float  # absolute
    rec: RequestRecord | None = None
    handoff: Handoff | None = None
    settled: bool = False  # counted in `ended_unrecorded` (it ended; its record is finished later)


@dataclass
class _PointRun:
    target: Target
    specs: Iterator[RequestSpec]
    point: LoadPoint
    stop: StopRule
    sink: Callable[[RequestRecord], None]
    run_start: float
    requests: int | None
    session: Session
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
    # of those, streams that ended but whose records are not finished yet (`_continue`)
    ended_unrecorded: int = 0
    measured_judged: int = 0
    measured_failed: int = 0
    max_lag: float = 0.0
    counts: Counter[str] = field(default_factory=Counter)
    tasks: set[asyncio.Task[Any]] = field(default_factory=set)
    turns: dict[str, asyncio.Future[_Turn]] = field(default_factory=dict)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    # multi-process children: a fixed start, a precomputed open-loop plan (offset from t0, spec, phase), and the
    # measurement window's end / stop reason decided by the parent for the whole point
    t0_fixed: float | None = None
    plan: list[tuple[float, RequestSpec, Phase]] | None = None
    plan_reason: StopReason = "requests"
    plan_window_end: float | None = None  # offset from t0
    worker_base: int = 0
    workers: int | None = None  # closed loop: this process's share of the point's concurrency
    fatal: Exception | None = None  # the sink failed
    shared_budget: Any = None  # multiprocessing Array('q', [judged, failed]) shared by worker processes
    # set by the caller: stop now, cancel what is in flight, return normally
    abort: asyncio.Event | None = None
    watch: LoopWatch | None = None  # how long the loop was held up: each record's read_stall

    def __post_init__(self) -> None:
        self.timeout = timeouts_for(
            self.target.stream, self.stop.stall_timeout_s, self.stop.request_timeout_s
        )
        self.pacer = ReadPacer(read_tick_s(self.target))

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
            self.cooldown_dispatched >= self.stop.cooldown or self.primary_inflight == self.ended_unrecorded
        ):
            return None
        spec = next(self.specs, None)
        if spec is None:
            self.close_window("specs_exhausted")
            return None
        return self.admit(spec, phase)

    def take_planned(self, spec: RequestSpec, phase: Phase) -> tuple[RequestSpec, Phase] | None:
        if self.stopping:
            return None
        if phase == "cooldown":
            self.close_window(self.plan_reason)
            if self.cooldown_dispatched >= self.stop.cooldown or self.primary_inflight == 0:
                return None
        return self.admit(spec, phase)

    def admit(self, spec: RequestSpec, phase: Phase) -> tuple[RequestSpec, Phase]:
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
    async def one(
        self,
        spec: RequestSpec,
        phase: Phase,
        due: float,
        worker: int,
        ahead: _Next | None = None,
        then: Then | None = None,
    ) -> RequestRecord:
        rec = ahead.rec if ahead is not None and ahead.rec is not None else None
        if rec is None:
            rec = new_record(
                self.target,
                spec,
                point=self.point.id,
                phase=phase,
                scheduled=due - self.run_start,
                worker=worker,
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
                    handoff=ahead.handoff if ahead is not None else None,
                    then=then,
                )
        except asyncio.CancelledError:
            if rec.status != "cancelled":
                rec.status, rec.error = "cancelled", "the run stopped before the request was sent"
        finally:
            self.finish(rec, phase, settled=ahead is not None and ahead.settled)
            if turn_fut is not None and not turn_fut.done():
                turn_fut.set_result(_Turn(sent_spec, rec))
        return rec

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
        return continued(spec, parent.spec, parent.rec.output_text)

    def finish(self, rec: RequestRecord, phase: Phase, settled: bool = False) -> None:
        if self.watch is not None and rec.read_stall is None and rec.sent is not None and rec.chunk_times:
            rec.read_stall = self.watch.read_delay(
                rec.sent + self.run_start, rec.chunk_times[0] + self.run_start
            )
        self.counts["total"] += 1
        self.counts[phase] += 1
        self.counts[rec.status] += 1
        if rec.sent is not None:
            self.max_lag = max(self.max_lag, rec.sent - rec.scheduled)
        if phase != "cooldown":
            self.primary_inflight -= 1
            self.ended_unrecorded -= settled
        if phase == "measure" and rec.status != "cancelled":
            self.measured_judged += 1
            self.measured_failed += not rec.ok
            judged, failed = self.measured_judged, self.measured_failed
            if self.shared_budget is not None:  # worker processes judge the budget on the whole point
                with self.shared_budget.get_lock():
                    self.shared_budget[0] += 1
                    self.shared_budget[1] += not rec.ok
                    judged, failed = self.shared_budget[0], self.shared_budget[1]
            budget = self.stop.error_budget
            if budget is not None and judged >= self.stop.error_min_requests and failed > budget * judged:
                self.close_window("error_budget")
        gc_valve()
        try:
            self.sink(rec)
        except Exception as e:  # the records file cannot take more: stop the point, then say why
            self.fatal = self.fatal or e
            self.close_window("aborted")
        self.changed.set()

    # -- drivers -------------------------------------------------------------------------------------------------
    async def open_loop(self) -> None:
        assert self.schedule is not None
        loop, waker = asyncio.get_running_loop(), PreciseWaker(self.pacer)
        try:
            await self._open_loop(loop, waker)
        finally:
            waker.close()

    async def _open_loop(self, loop: asyncio.AbstractEventLoop, waker: PreciseWaker) -> None:
        assert self.schedule is not None
        for deadline in self.schedule:
            await waker.sleep_until(deadline)
            item = self.take(deadline)
            if item is None:
                return
            task = loop.create_task(self.one(item[0], item[1], deadline, 0))
            self.pacer.kick()
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        self.close_window("specs_exhausted")

    async def open_loop_planned(self) -> None:
        loop, waker = asyncio.get_running_loop(), PreciseWaker(self.pacer)
        try:
            await self._open_loop_planned(loop, waker)
        finally:
            waker.close()

    async def _open_loop_planned(self, loop: asyncio.AbstractEventLoop, waker: PreciseWaker) -> None:
        assert self.plan is not None
        for offset, spec, phase in self.plan:
            deadline = self.t0 + offset
            await waker.sleep_until(deadline)
            item = self.take_planned(spec, phase)
            if item is None:
                return
            task = loop.create_task(self.one(spec, phase, deadline, self.worker_base))
            self.pacer.kick()
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)
        self.close_window(self.plan_reason)

    async def closed_worker(self, worker: int, free_at: float) -> None:
        """One slot of a closed loop. A request is due when its slot became free: at the point's start for every
        slot's first request, then when the client read the slot's previous request's end (`done_read`, or `done`
        where the two are one). Whatever the client spends after that before sending (the start-up burst of a high
        concurrency, writing the record) is send lag, inside the latency, never hidden in a later `scheduled`
        (PITFALLS 1 and 5); how late it read the end is `done_read - done`, kept on the record and judged by the
        `slot_idle` rule (a slot waiting for the client is concurrency the engine never saw).

        The next request is sent from the read callback that saw the previous stream end (`_continue`): on the
        keep-alive connection that just became free, or on a new connection when the handshake completes inside the
        connect call (loopback); the previous request's record is finished after. Otherwise (a chat turn that waits
        for a reply, a remote fresh connection, a non-streamed request) the slot's task sends it once the previous
        request's task has resumed, behind every callback and task the loop had queued: at 256 streams, whose ends
        arrive in bursts, milliseconds."""
        w = self.worker_base + worker
        ahead: _Next | None = None
        box: list[_Next | None] = []
        try:
            while not self.stopping:
                if ahead is None:
                    item = self.take(free_at)
                    if item is None:
                        return
                    ahead = _Next(item[0], item[1], free_at)
                current, ahead, box = ahead, None, []
                then = self._continue(w, current, box) if self.can_continue else None
                rec = await self.one(current.spec, current.phase, current.due, w, current, then)
                if box:  # the read callback took the next request already
                    ahead, box = box[0], []
                    if ahead is None:
                        return
                    continue
                now = time.perf_counter()
                end = rec.done if rec.done_read is None else rec.done_read
                free_at = now if end is None else min(now, self.run_start + end)
        finally:
            left = ahead or (box[0] if box else None)
            if left is not None:  # taken (perhaps written), then the run stopped before its task ran
                self._cancel_taken(left, w)

    def _cancel_taken(self, nxt: _Next, worker: int) -> None:
        rec = nxt.rec
        if rec is None:
            rec = new_record(
                self.target,
                nxt.spec,
                point=self.point.id,
                phase=nxt.phase,
                scheduled=nxt.due - self.run_start,
                worker=worker,
            )
            rec.error = "the run stopped before the request was sent"
        else:
            rec.error = "the run stopped before the request finished"
            rec.done = time.perf_counter() - self.run_start
        if nxt.handoff is not None and nxt.handoff.conn is not None:
            nxt.handoff.conn.abort()
        elif nxt.handoff is not None and nxt.handoff.sock is not None:
            nxt.handoff.sock.close()
        rec.status = "cancelled"
        self.finish(rec, nxt.phase)

    @property
    def can_continue(self) -> bool:
        """Whether a slot's next request may be sent from its predecessor's read callback: streams (`send_on` says
        per request whether a connection can take it at once)."""
        return self.target.stream

    def _continue(self, worker: int, current: _Next, box: list[_Next | None]) -> Then:
        """The read callback's part for `current`: take the slot's next request into `box` (None: stop) and, unless
        it is a chat turn, send it: on the connection `current` just freed, or on a new one."""

        def then(conn: Any | None, seen: float) -> None:
            if self.stopping or box:
                return
            # `current` has ended; its record is finished later (for `take`'s cool-down rule it is over now)
            if current.phase != "cooldown":
                self.ended_unrecorded += 1
                current.settled = True
            due = self.run_start + seen
            item = self.take(due)
            if item is None:
                box.append(None)
                return
            spec, phase = item
            nxt = _Next(spec, phase, due)
            box.append(nxt)
            if spec.session is not None or spec.history_from is not None:
                return  # a chat turn: its task sends it (it may wait for a reply and a think time)
            rec = new_record(
                self.target, spec, point=self.point.id, phase=phase, scheduled=seen, worker=worker
            )
            handoff = send_on(conn, self.session, self.target, spec, rec, self.run_start)
            if handoff is not None:
                nxt.rec, nxt.handoff = rec, handoff

        return then

    async def watch_abort(self, abort: asyncio.Event) -> None:
        await abort.wait()
        self.close_window("aborted")

    def should_end(self) -> bool:
        if not self.window_closed:
            return False
        if self.stop_reason in ("error_budget", "aborted") or (
            self.stop_reason == "duration" and self.stop.cooldown == 0
        ):
            return True
        return self.primary_inflight == 0

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self.t0 = time.perf_counter() if self.t0_fixed is None else self.t0_fixed
        drivers: list[asyncio.Task[None]]
        if self.plan is not None:
            if self.plan_window_end is not None:
                self.window_end = self.t0 + self.plan_window_end
            drivers = [loop.create_task(self.open_loop_planned())]
        elif self.point.closed_loop:
            await asyncio.sleep(max(0.0, self.t0 - time.perf_counter()))
            start = time.perf_counter()  # every slot is free now
            n_workers = self.workers if self.workers is not None else self.point.concurrency
            drivers = [loop.create_task(self.closed_worker(w, start)) for w in range(n_workers)]
        else:
            self.schedule = _deadlines(self.point, self.t0)
            drivers = [loop.create_task(self.open_loop())]
        senders = list(drivers)
        if self.abort is not None:
            drivers.append(loop.create_task(self.watch_abort(self.abort)))
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
                if all(d.done() for d in senders) and not self.tasks and self.primary_inflight == 0:
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
        if self.fatal is not None:
            raise self.fatal


def _deadlines(point: LoadPoint, t0: float) -> Iterator[float]:
    """Absolute deadlines from the point's seeded schedule, in blocks (the prefix never depends on the block size)."""
    n = _SCHEDULE_BLOCK
    done = 0
    while True:
        offsets = send_times(point, n)
        for off in offsets[done:]:
            yield t0 + float(off)
        if len(offsets) < n:  # a finite schedule (a replayed trace) has ended
            return
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
    processes: int = 1,
    abort: asyncio.Event | None = None,
) -> PointOutcome:
    """Run one load point against `target`; every finished record goes to `sink`; returns how the point went.

    `processes > 1` splits the point across that many OS processes (see `run_point_multiprocess`). Setting `abort`
    (e.g. the engine died) ends the point at once: in-flight requests are recorded as cancelled and the outcome says
    `aborted`; cancelling the task instead propagates CancelledError after the same clean-up."""
    if processes > 1:
        if abort is not None:
            raise ValueError("abort is not supported with processes > 1; cancel the task instead")
        return await run_point_multiprocess(
            target, specs, point, stop, sink, run_start, processes=processes, keep_text=keep_text
        )
    requests = stop.requests
    if requests is None and stop.duration_s is None and isinstance(specs, Sized):
        requests = max(1, len(specs) - stop.warmup - stop.cooldown)
    return await execute_point(
        target, iter(specs), point, stop, sink, run_start, requests, keep_text=keep_text, abort=abort
    )


async def execute_point(
    target: Target,
    specs: Iterator[RequestSpec],
    point: LoadPoint,
    stop: StopRule,
    sink: Callable[[RequestRecord], None],
    run_start: float,
    requests: int | None,
    *,
    keep_text: bool = False,
    connections: int | None = None,
    **child: Any,
) -> PointOutcome:
    """The engine room of `run_point`; `child` carries a worker process's share (see `run_point_multiprocess`)."""
    specs = _codec_warmed(target, specs)
    cpu: list[float] = []
    if connections is None:
        connections = point.concurrency if point.closed_loop else 0
    with gc_paused():
        async with make_session(target, connections) as session:
            state = _PointRun(
                target, specs, point, stop, sink, run_start, requests, session, keep_text, **child
            )
            state.watch = LoopWatch()
            state.watch.start()
            state.pacer.start()
            sampler = asyncio.get_running_loop().create_task(sample_cpu(cpu))
            try:
                await state.run()
            finally:
                state.pacer.stop()
                state.watch.stop()
                sampler.cancel()
                await asyncio.gather(sampler, return_exceptions=True)
    ended = time.perf_counter() - run_start
    return PointOutcome(
        point=point,
        started=state.t0 - run_start,
        ended=ended,
        counts=dict(state.counts),
        stop_reason=state.stop_reason or "specs_exhausted",
        client_cpu=ClientCpu(tuple(cpu), cpu_wait=state.watch.cpu_wait),
        max_send_lag=state.max_lag,
        window_end=None if state.window_end is None else state.window_end - run_start,
    )


def _codec_warmed(target: Target, specs: Iterator[RequestSpec]) -> Iterator[RequestSpec]:
    """`specs` unchanged, after building its first request once off the clock: a codec's first build can load files
    (Triton's native codec renders the chat template client-side and reads the model's tokenizer, ~0.1 s), and
    on the send path that made the point's first eight sends 110-240 ms late."""
    try:
        first = next(specs)
    except StopIteration:
        return specs
    with contextlib.suppress(
        Exception
    ):  # a request that cannot be built fails as its own record, with the reason
        target.adapter.build(first, target.model, target.stream)
    return itertools.chain([first], specs)


# -- several OS processes ---------------------------------------------------------------------------------------
# One Python process tops out at a few thousand streamed events per second of client CPU; past that its own queueing
# inflates TTFT and ITL. The parent splits the point's work before it starts, every child runs its share against the
# same absolute start (perf_counter is CLOCK_MONOTONIC, one clock for every process on Linux), and records stream back
# to the parent, which hands each to `sink`: the records are exactly the union of the children's.


@dataclass(frozen=True)
class _ChildJob:
    index: int
    target: Target
    point: LoadPoint
    stop: StopRule
    run_start: float
    keep_text: bool
    specs: tuple[RequestSpec, ...] = ()  # closed loop: this child's specs, in order
    requests: int | None = None
    workers: int = 0
    worker_base: int = 0
    plan: tuple[tuple[float, RequestSpec, Phase], ...] | None = None  # open loop
    plan_reason: StopReason = "requests"
    plan_window_end: float | None = None


def _shares(total: int, weights: list[int]) -> list[int]:
    """Split `total` in proportion to `weights` exactly (largest remainder)."""
    wsum = sum(weights)
    raw = [total * w / wsum for w in weights]
    out = [int(r) for r in raw]
    for i in sorted(range(len(raw)), key=lambda i: raw[i] - out[i], reverse=True)[: total - sum(out)]:
        out[i] += 1
    return out


def _owner(spec: RequestSpec, index: int, n: int) -> int:
    """Which process sends `spec`: every turn of a chat session in the same one (its history lives there)."""
    if spec.session is not None:
        return zlib.crc32(spec.session.encode()) % n
    return index % n


def _open_plan(
    specs: list[RequestSpec], point: LoadPoint, stop: StopRule
) -> tuple[list[tuple[float, RequestSpec, Phase]], StopReason, float | None]:
    """The whole point's open-loop plan: (offset, spec, phase) for every request that may be sent."""
    offsets = send_times(point, len(specs))
    w = min(stop.warmup, len(specs))
    plan: list[tuple[float, RequestSpec, Phase]] = [(float(offsets[i]), specs[i], "warmup") for i in range(w)]
    window_end: float | None = None
    reason: StopReason = "requests"
    if stop.requests is not None:
        n_measure = min(stop.requests, len(specs) - w)
        if n_measure < stop.requests:
            reason = "specs_exhausted"
    elif stop.duration_s is not None:
        if w >= len(specs):
            n_measure = 0
        else:
            window_end = float(offsets[w]) + stop.duration_s
            n_measure = int(np.searchsorted(offsets[w:], window_end, side="left"))
        reason = "duration" if w + n_measure < len(specs) else "specs_exhausted"
    else:
        n_measure = min(len(specs) - w, max(1, len(specs) - w - stop.cooldown))
    plan += [(float(offsets[i]), specs[i], "measure") for i in range(w, w + n_measure)]
    end = min(len(specs), w + n_measure + stop.cooldown)
    plan += [(float(offsets[i]), specs[i], "cooldown") for i in range(w + n_measure, end)]
    return plan, reason, window_end


def _split_jobs(
    target: Target,
    specs: Iterable[RequestSpec],
    point: LoadPoint,
    stop: StopRule,
    run_start: float,
    processes: int,
    keep_text: bool,
) -> list[_ChildJob]:
    from harness.errors import ConfigError

    if isinstance(specs, Sized):
        spec_list = list(specs)
    elif stop.requests is not None:
        spec_list = list(itertools.islice(specs, stop.warmup + stop.requests + stop.cooldown))
    elif stop.duration_s is not None and not point.closed_loop:
        bound = stop.warmup + stop.cooldown + int(point.value * stop.duration_s * 3) + 100
        spec_list = list(itertools.islice(specs, bound))
    else:
        raise ConfigError("a multi-process closed-loop point needs --requests or a finite workload")
    if point.closed_loop:
        processes = min(processes, point.concurrency)
        workers = _shares(point.concurrency, [1] * processes)
        mine: list[list[RequestSpec]] = [[] for _ in range(processes)]
        for i, spec in enumerate(spec_list):
            mine[_owner(spec, i, processes)].append(spec)
        warm, cool = _shares(stop.warmup, workers), _shares(stop.cooldown, workers)
        reqs = _shares(stop.requests, workers) if stop.requests is not None else [None] * processes
        jobs = []
        for k in range(processes):
            n_req = reqs[k]
            if n_req is None and stop.duration_s is None:
                n_req = max(1, len(mine[k]) - warm[k] - cool[k])
            child_stop = dataclasses.replace(stop, warmup=warm[k], cooldown=cool[k], requests=reqs[k])
            jobs.append(
                _ChildJob(
                    k, target, point, child_stop, run_start, keep_text, tuple(mine[k]), n_req,
                    workers[k], sum(workers[:k]),
                )
            )  # fmt: skip
        return jobs
    plan, reason, window_end = _open_plan(spec_list, point, stop)
    parts: list[list[tuple[float, RequestSpec, Phase]]] = [[] for _ in range(processes)]
    for i, item in enumerate(plan):
        parts[_owner(item[1], i, processes)].append(item)
    return [
        _ChildJob(k, target, point, stop, run_start, keep_text, worker_base=k, plan=tuple(parts[k]),
                  plan_reason=reason, plan_window_end=window_end)
        for k in range(processes)
    ]  # fmt: skip


def _child_main(job: _ChildJob, out: Any, go: Any, t0: Any, budget: Any) -> None:
    """A worker process: say ready, wait for the common start, run the share, stream records back."""
    try:
        out.put(("ready", job.index, time.perf_counter()))
        go.wait()

        def sink(rec: RequestRecord) -> None:
            out.put(("rec", orjson.dumps(rec.to_dict())))

        child: dict[str, Any] = {
            "t0_fixed": t0.value,
            "worker_base": job.worker_base,
            "shared_budget": budget,
        }
        if job.plan is not None:
            child.update(
                plan=list(job.plan), plan_reason=job.plan_reason, plan_window_end=job.plan_window_end
            )
            connections = 0
        else:
            child["workers"] = job.workers
            connections = job.workers
        outcome = event_loop.run(
            execute_point(
                job.target, iter(job.specs), job.point, job.stop, sink, job.run_start, job.requests,
                keep_text=job.keep_text, connections=connections, **child,
            )
        )  # fmt: skip
        out.put(("outcome", job.index, outcome))
    except BaseException:
        out.put(("error", job.index, traceback.format_exc()))


_REASON_ORDER: tuple[StopReason, ...] = ("aborted", "error_budget", "duration", "requests", "specs_exhausted")


async def run_point_multiprocess(
    target: Target,
    specs: Iterable[RequestSpec],
    point: LoadPoint,
    stop: StopRule,
    sink: Callable[[RequestRecord], None],
    run_start: float,
    *,
    processes: int,
    keep_text: bool = False,
    start_timeout_s: float = 60.0,
) -> PointOutcome:
    """`run_point` split across `processes` OS processes started with `spawn` (the target's adapter must pickle).

    Open loop: the parent computes the whole plan (send time and phase of every request, the measurement window) and
    deals it out; closed loop: the concurrency, the specs and the warm-up / request / cool-down counts are split in
    proportion. All turns of a chat session go to one process. The error budget is judged on the counts of all
    processes together (shared counters); each process stops at its next finished request once it is spent.
    """
    jobs = _split_jobs(target, specs, point, stop, run_start, processes, keep_text)
    ctx = mp.get_context("spawn")
    out, go, t0, budget = ctx.Queue(), ctx.Event(), ctx.Value("d", 0.0), ctx.Array("q", 2)
    procs = [ctx.Process(target=_child_main, args=(job, out, go, t0, budget), daemon=True) for job in jobs]
    outcomes: dict[int, PointOutcome] = {}
    errors: list[str] = []

    def drain(wait_s: float) -> list[tuple[Any, ...]]:
        try:
            msgs = [out.get(timeout=wait_s)]
        except queue.Empty:
            return []
        with contextlib.suppress(queue.Empty):
            while len(msgs) < 1000:
                msgs.append(out.get_nowait())
        return msgs

    try:
        for p in procs:
            p.start()
        ready, deadline = 0, time.perf_counter() + start_timeout_s
        while ready < len(procs) and not errors:
            if time.perf_counter() > deadline:
                raise RuntimeError(f"worker processes not ready within {start_timeout_s}s")
            for msg in await asyncio.to_thread(drain, 0.5):
                if msg[0] == "ready":
                    ready += 1
                elif msg[0] == "error":
                    errors.append(msg[2])
        t0.value = time.perf_counter() + 0.05
        go.set()
        while len(outcomes) + len(errors) < len(procs):
            msgs = await asyncio.to_thread(drain, 0.5)
            for msg in msgs:
                if msg[0] == "rec":
                    sink(RequestRecord.from_dict(orjson.loads(msg[1])))
                elif msg[0] == "outcome":
                    outcomes[msg[1]] = msg[2]
                elif msg[0] == "error":
                    errors.append(msg[2])
            if not msgs and not all(p.is_alive() for p in procs) and out.empty():
                dead = [p.exitcode for p in procs if not p.is_alive()]
                if len(dead) > len(outcomes) + len(errors):
                    raise RuntimeError(f"a worker process died (exit codes {dead}) before reporting")
        if errors:
            raise RuntimeError(f"a worker process failed:\n{errors[0]}")
    finally:
        go.set()
        for p in procs:
            p.join(timeout=5)
            if p.is_alive():
                p.kill()
    parts = [outcomes[k] for k in sorted(outcomes)]
    counts: Counter[str] = Counter()
    for o in parts:
        counts.update(o.counts)
    cpus = tuple(o.client_cpu for o in parts)
    return PointOutcome(
        point=point,
        started=t0.value - run_start,
        ended=max(o.ended for o in parts),
        counts=dict(counts),
        stop_reason=min((o.stop_reason for o in parts), key=_REASON_ORDER.index),
        client_cpu=ClientCpu.busiest(cpus),
        max_send_lag=max(o.max_send_lag for o in parts),
        window_end=next((o.window_end for o in parts if o.window_end is not None), None),
        processes=len(parts),
        per_process_cpu=cpus,
    )
