"""Calibration: how wrong is the harness's own timing, and where does the client saturate?

The scripted server (`harness.calibration`) runs in its own process; the harness's runner drives it at rising closed-
loop concurrency. For every request the client's record is matched (by request id) with the server's account of when
it really wrote each chunk. Both sides use CLOCK_MONOTONIC (`perf_counter` and `monotonic` on Linux), so errors are
per request and per chunk, not differences of percentiles:

- TTFT error = client TTFT − scripted TTFT − the server's lag on its first chunk (includes the client's send lag);
- ITL error, per ITL sample (harness definition: a chunk of k tokens arriving dt after the previous one gives k
  samples of dt/k) = (client dt − the server's achieved dt between the same chunks) / k;
- the "raw" errors do not subtract the server's lag (what a user of a peer tool would see).

A point is saturated when the client's mean CPU reaches `harness.runner.CPU_SATURATED` of a core, when its TTFT error
p50 exceeds `saturation_error_ms`, or when it achieves less than 90% of the ideal closed-loop request rate. The ceiling
is the throughput of the best unsaturated point and of the first saturated one.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

import numpy as np

from harness import loop as event_loop
from harness.calibration import (
    ScriptConfig,
    chunk_schedule,
    fetch_stats,
    reset_stats,
    serve_in_process,
)
from harness.client import Codec, Connection, Target
from harness.loopwatch import cpu_wait_s, machine_cpu_s
from harness.records import RequestRecord
from workloads.spec import RequestSpec

if TYPE_CHECKING:
    from harness.runner import PointOutcome

__all__ = [
    "CalibrationConfig",
    "CalibrationResult",
    "ErrorStats",
    "PointCalibration",
    "ServerCeilingPoint",
    "calibrate",
    "calibration_specs",
    "chunk_writes",
    "match_errors",
    "render_table",
    "run_calibration",
    "server_ceiling",
]


# a process runnable but waiting for a CPU this fraction of a point's time was starved by other processes: its
# timing errors are the machine's, not the harness's (short multi-ms stalls are common well below 25%)
STARVED = 0.10


@dataclass(frozen=True)
class CalibrationConfig:
    ttft: float = 0.05
    itl: float = 0.005
    output_tokens: int = 64
    tokens_per_chunk: int = 1
    concurrency: tuple[int, ...] = (1, 16, 64, 256)
    waves: int = 3  # measured requests per point = waves * concurrency (at least `min_requests`)
    min_requests: int = 20
    warmup_waves: int = 1
    connection: Connection = "fresh"
    saturation_error_ms: float = 2.0
    server_workers: int = 1
    processes: int = 1  # client processes (the runner's multi-process mode)
    # also measure the throughput ceiling as benchmarks/peers.py does: TTFT = ITL = 0, 256-token streamed answers,
    # closed loop at the highest concurrency (0: skip)
    ceiling_tokens: int = 256


@dataclass(frozen=True)
class ErrorStats:
    """Signed errors in milliseconds (positive: the client saw it later than it happened)."""

    count: int = 0
    p1: float | None = None
    p50: float | None = None
    p99: float | None = None
    max: float | None = None
    mean: float | None = None

    @classmethod
    def of(cls, seconds: Sequence[float] | np.ndarray) -> ErrorStats:
        x = np.asarray(seconds, dtype=float) * 1000.0
        if x.size == 0:
            return cls()
        p = np.percentile(x, (1, 50, 99))
        return cls(int(x.size), float(p[0]), float(p[1]), float(p[2]), float(x.max()), float(x.mean()))


@dataclass(frozen=True)
class PointCalibration:
    concurrency: int
    requests: int
    ok: int
    statuses: Mapping[str, int]
    ttft_error: ErrorStats  # minus truth minus server lag
    itl_error: ErrorStats
    ttft_error_raw: ErrorStats  # minus truth only
    itl_error_raw: ErrorStats
    server_lag: ErrorStats  # achieved - scripted, every chunk
    send_lag: ErrorStats
    request_path: ErrorStats  # server receipt - client send (same clock)
    response_path: ErrorStats  # client arrival - server write of the first chunk
    requests_per_s: float
    tokens_per_s: float
    ideal_requests_per_s: float
    client_cpu: float  # mean fraction of one core
    server_cpu_per_chunk_us: float | None
    client_cpu_wait: float | None  # fraction of the point's wall time the client was runnable but not running
    server_cpu_wait: float | None
    saturated: bool
    reasons: tuple[str, ...] = ()
    # the server's own delay reading a request after the kernel had it (part of its first-chunk lag, so subtracted)
    server_intake: ErrorStats = field(default_factory=ErrorStats)
    # share of the machine's CPUs that neither the client nor the server used but something else did (other
    # processes, or the hypervisor's other guests): a busy machine, not the harness, then made the tail
    others_cpu: float | None = None


@dataclass(frozen=True)
class CalibrationResult:
    config: CalibrationConfig
    points: tuple[PointCalibration, ...]
    ceiling_requests_per_s: float | None  # best unsaturated point
    ceiling_tokens_per_s: float | None
    saturated_at: int | None  # first saturated concurrency
    notes: tuple[str, ...] = field(default_factory=tuple)
    # TTFT = ITL = 0, `ceiling_tokens`-token answers, the highest concurrency: the number benchmarks/peers.py compares
    zero_delay_requests_per_s: float | None = None
    zero_delay_tokens_per_s: float | None = None
    zero_delay_client_cpu: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"schema_version": 1, "kind": "calibration", **asdict(self)}


def calibration_specs(prefix: str, n_tokens: int) -> Iterator[RequestSpec]:
    """Endless pinned chat requests `prefix-0`, `prefix-1`, ... asking for `n_tokens` each."""
    i = 0
    while True:
        msg = {"role": "user", "content": "calibrate the harness please"}
        yield RequestSpec(request_id=f"{prefix}-{i}", api="chat", max_tokens=n_tokens, messages=(msg,))
        i += 1


def chunk_writes(
    entry: Mapping[str, Any],
) -> tuple[list[tuple[float, int]], list[float], list[float]] | None:
    """One request of the scripted server's account (`/calibration/stats?detail=1`): its chunk schedule (offset,
    tokens), each chunk's lag (s) and when each was really written (perf_counter); None if it wrote fewer chunks
    than scheduled (a cut stream)."""
    sched = chunk_schedule(
        int(entry["n"]), float(entry["ttft"]), float(entry["itl"]), int(entry["tokens_per_chunk"])
    )
    lags = [x / 1000.0 for x in entry["lags_ms"]]
    if len(lags) < len(sched):
        return None
    t0 = float(entry["t0"]) + float(entry.get("shift", 0.0))
    return sched, lags, [t0 + off + lag for (off, _), lag in zip(sched, lags, strict=False)]


def match_errors(
    records: Sequence[RequestRecord], server: Mapping[str, Mapping[str, Any]], run_start: float
) -> dict[str, list[float]]:
    """Per-request / per-sample errors in seconds of ok records against the server's per-request account."""
    out: dict[str, list[float]] = {
        k: [] for k in ("ttft", "itl", "ttft_raw", "itl_raw", "req_path", "resp_path")
    }
    for rec in records:
        s = server.get(rec.request_id)
        if s is None or not rec.ok or not rec.chunk_times:
            continue
        truth = chunk_writes(s)
        if truth is None:
            continue
        sched, lags, writes = truth
        ends = np.cumsum([k for _, k in sched])  # cumulative tokens after each server chunk
        ttft = rec.chunk_times[0] - rec.scheduled
        out["ttft_raw"].append(ttft - sched[0][0])
        out["ttft"].append(ttft - sched[0][0] - lags[0])
        if rec.sent is not None:
            out["req_path"].append(float(s["t0"]) - (rec.sent + run_start))
        # which server chunk delivered the last token of each client chunk
        cum = np.cumsum(rec.chunk_tokens)
        idx = np.searchsorted(ends, cum, side="left")
        out["resp_path"].append(rec.chunk_times[0] + run_start - writes[int(idx[0])])
        for i in range(1, len(rec.chunk_times)):
            k = rec.chunk_tokens[i]
            a, b = int(idx[i - 1]), int(idx[i])
            if k <= 0 or b >= len(writes):
                continue
            dt = rec.chunk_times[i] - rec.chunk_times[i - 1]
            true_dt = writes[b] - writes[a]
            scripted_dt = sched[b][0] - sched[a][0]
            out["itl"].extend([(dt - true_dt) / k] * k)
            out["itl_raw"].extend([(dt - scripted_dt) / k] * k)
    return out


async def _run_one_point(
    url: str, cfg: CalibrationConfig, codec: Codec, conc: int, run_start: float
) -> tuple[list[RequestRecord], PointOutcome, float]:
    from harness.runner import StopRule, run_point
    from workloads.arrival import LoadPoint

    target = Target("scripted", url, codec, "scripted", connection=cfg.connection)
    records: list[RequestRecord] = []
    measured = max(cfg.min_requests, cfg.waves * conc)
    stop = StopRule(requests=measured, warmup=cfg.warmup_waves * conc, cooldown=conc, stall_timeout_s=30.0)
    point = LoadPoint("concurrency", conc, "closed")
    t = time.perf_counter()
    specs = calibration_specs(f"c{conc}", cfg.output_tokens)
    outcome = await run_point(target, specs, point, stop, records.append, run_start, processes=cfg.processes)
    return records, outcome, time.perf_counter() - t


def _point(
    cfg: CalibrationConfig,
    conc: int,
    records: list[RequestRecord],
    outcome: PointOutcome,
    stats: Mapping[str, Any],
    server_cpu_s: float | None,
    waits: tuple[float | None, float | None],
    run_start: float,
) -> PointCalibration:
    measured = [r for r in records if r.phase == "measure"]
    ok = [r for r in measured if r.ok]
    per_req = stats.get("per_request", {})
    errs = match_errors(ok, per_req, run_start)
    statuses: dict[str, int] = {}
    for r in measured:
        statuses[r.status] = statuses.get(r.status, 0) + 1
    lags = [x / 1000.0 for r in ok if r.request_id in per_req for x in per_req[r.request_id]["lags_ms"]]
    send_lags = [r.sent - r.scheduled for r in measured if r.sent is not None]
    if ok:
        start = min(r.scheduled for r in ok)
        end = max(r.done or r.scheduled for r in ok)
        span = max(end - start, 1e-9)
        rps = len(ok) / span
        tps = sum(sum(r.chunk_tokens) for r in ok) / span
    else:
        rps = tps = 0.0
    sched = chunk_schedule(cfg.output_tokens, cfg.ttft, cfg.itl, cfg.tokens_per_chunk)
    ideal = conc / sched[-1][0]
    chunks = sum(len(per_req[r.request_id]["lags_ms"]) for r in records if r.request_id in per_req)
    cpu_per_chunk = server_cpu_s / chunks * 1e6 if server_cpu_s is not None and chunks else None
    ttft_err = ErrorStats.of(errs["ttft"])
    reasons = []
    client_cpu = float(outcome.client_cpu.mean_util)
    from harness.runner import CPU_SATURATED

    if client_cpu >= CPU_SATURATED:
        reasons.append(f"client CPU {client_cpu:.0%} of a core")
    if ttft_err.p50 is not None and ttft_err.p50 > cfg.saturation_error_ms:
        reasons.append(f"TTFT error p50 {ttft_err.p50:.2f} ms > {cfg.saturation_error_ms} ms")
    if rps < 0.9 * ideal:
        reasons.append(f"{rps:.1f} req/s < 90% of the ideal {ideal:.1f}")
    for who, wait in (("client", waits[0]), ("server", waits[1])):
        if wait is not None and wait > STARVED:
            reasons.append(
                f"{who} waited for a CPU {wait:.0%} of the time (other processes): timing is not judged"
            )
    if len(ok) < len(measured):
        reasons.append(f"{len(measured) - len(ok)} failed requests")
    return PointCalibration(
        concurrency=conc,
        requests=len(measured),
        ok=len(ok),
        statuses=statuses,
        ttft_error=ttft_err,
        itl_error=ErrorStats.of(errs["itl"]),
        ttft_error_raw=ErrorStats.of(errs["ttft_raw"]),
        itl_error_raw=ErrorStats.of(errs["itl_raw"]),
        server_lag=ErrorStats.of(lags),
        send_lag=ErrorStats.of(send_lags),
        request_path=ErrorStats.of(errs["req_path"]),
        response_path=ErrorStats.of(errs["resp_path"]),
        server_intake=ErrorStats.of(
            [
                float(ms) / 1000.0
                for r in ok
                if (ms := per_req.get(r.request_id, {}).get("intake_ms")) is not None
            ]
        ),
        requests_per_s=rps,
        tokens_per_s=tps,
        ideal_requests_per_s=ideal,
        client_cpu=client_cpu,
        server_cpu_per_chunk_us=cpu_per_chunk,
        client_cpu_wait=waits[0],
        server_cpu_wait=waits[1],
        saturated=bool(reasons),
        reasons=tuple(reasons),
    )


async def _calibrate_at(
    url: str, cfg: CalibrationConfig, codec: Codec, progress: Callable[[PointCalibration], None]
) -> list[PointCalibration]:
    run_start = time.perf_counter()
    points = []
    for conc in cfg.concurrency:
        await asyncio.to_thread(reset_stats, url)
        before = await asyncio.to_thread(fetch_stats, url)
        wait0, machine0, own0 = cpu_wait_s(), machine_cpu_s(), time.process_time()
        records, outcome, wall = await _run_one_point(url, cfg, codec, conc, run_start)
        wait1, machine1, own1 = cpu_wait_s(), machine_cpu_s(), time.process_time()
        stats = await asyncio.to_thread(fetch_stats, url, True)
        cpu = _delta(before.get("cpu_s"), stats.get("cpu_s"))
        server_wait = _delta(before.get("cpu_wait_s"), stats.get("cpu_wait_s"))
        waits = (
            None if wait0 is None or wait1 is None else (wait1 - wait0) / wall,
            None if server_wait is None else server_wait / wall,
        )
        pc = _point(cfg, conc, records, outcome, stats, cpu, waits, run_start)
        if machine0 is not None and machine1 is not None and cpu is not None:
            others = (machine1 - machine0) - (own1 - own0) - cpu
            pc = replace(pc, others_cpu=max(0.0, others) / (wall * (os.cpu_count() or 1)))
        progress(pc)
        points.append(pc)
    return points


def _delta(a: Any, b: Any) -> float | None:
    return None if a is None or b is None else float(b) - float(a)


def calibrate(
    url: str,
    cfg: CalibrationConfig,
    codec: Codec,
    progress: Callable[[PointCalibration], None] = lambda p: None,
) -> CalibrationResult:
    """Calibrate against a scripted server already serving at `url` (configured like `cfg`), talking to it with
    `codec` (the composition root passes `adapters.scripted.make_adapter()`: harness/ knows no engine)."""
    points = event_loop.run(_calibrate_at(url, cfg, codec, progress))
    good = [p for p in points if not p.saturated]
    bad = [p for p in points if p.saturated]
    best = max(good, key=lambda p: p.tokens_per_s, default=None)
    notes = []
    if not bad:
        notes.append("the client never saturated: raise --concurrency (or lower --itl) to find its ceiling")
    return CalibrationResult(
        config=cfg,
        points=tuple(points),
        ceiling_requests_per_s=best.requests_per_s if best else None,
        ceiling_tokens_per_s=best.tokens_per_s if best else None,
        saturated_at=bad[0].concurrency if bad else None,
        notes=tuple(notes),
    )


def run_calibration(
    cfg: CalibrationConfig, codec: Codec, progress: Callable[[PointCalibration], None] = lambda p: None
) -> CalibrationResult:
    """Start the scripted server in its own process, calibrate against it, stop it."""
    script = ScriptConfig(
        ttft=cfg.ttft,
        itl=cfg.itl,
        output_tokens=cfg.output_tokens,
        tokens_per_chunk=cfg.tokens_per_chunk,
        max_tracked=max(10_000, 8 * max(cfg.concurrency) * (cfg.waves + 2)),
        workers=cfg.server_workers,
    )
    with serve_in_process(script) as url:
        result = calibrate(url, cfg, codec, progress)
    if cfg.ceiling_tokens <= 0:
        return result
    zero = ScriptConfig(ttft=0.0, itl=0.0, output_tokens=cfg.ceiling_tokens, max_tracked=10_000)
    zero = replace(zero, workers=cfg.server_workers)
    with serve_in_process(zero) as url:
        rps, tps, cpu = event_loop.run(_zero_delay_ceiling(url, cfg, codec))
    note = (
        f"throughput ceiling (TTFT = ITL = 0, {cfg.ceiling_tokens}-token streamed answers, {max(cfg.concurrency)} "
        f"streams, as benchmarks/peers.py measures it): {rps:.1f} req/s, {tps:,.0f} tok/s, client CPU {cpu:.0%}"
    )
    return replace(
        result,
        zero_delay_requests_per_s=rps,
        zero_delay_tokens_per_s=tps,
        zero_delay_client_cpu=cpu,
        notes=(*result.notes, note),
    )


async def _zero_delay_ceiling(url: str, cfg: CalibrationConfig, codec: Codec) -> tuple[float, float, float]:
    """Requests/s and streamed tokens/s of ok measured requests, and the client's mean CPU (fraction of a core)."""
    from harness.runner import StopRule, run_point
    from workloads.arrival import LoadPoint

    conc = max(cfg.concurrency)
    target = Target("scripted", url, codec, "scripted", connection=cfg.connection)
    records: list[RequestRecord] = []
    stop = StopRule(requests=max(cfg.min_requests, cfg.waves * conc), warmup=conc, stall_timeout_s=30.0)
    outcome = await run_point(
        target,
        calibration_specs(f"z{conc}", cfg.ceiling_tokens),
        LoadPoint("concurrency", conc, "closed"),
        stop,
        records.append,
        time.perf_counter(),
        processes=cfg.processes,
    )
    ok = [r for r in records if r.phase == "measure" and r.ok]
    if not ok:
        return 0.0, 0.0, outcome.client_cpu.mean_util
    span = max(max(r.done or r.scheduled for r in ok) - min(r.scheduled for r in ok), 1e-9)
    return len(ok) / span, sum(sum(r.chunk_tokens) for r in ok) / span, outcome.client_cpu.mean_util


def render_table(result: CalibrationResult) -> Any:
    """A rich Table: per concurrency, the harness's timing error and throughput, and whether it saturated."""
    from rich.table import Table

    def pair(e: ErrorStats) -> str:
        return "-" if e.p50 is None or e.p99 is None else f"{e.p50:.2f} / {e.p99:.2f}"

    def frac(x: float | None) -> str:
        return "-" if x is None else f"{x:.0%}"

    cfg = result.config
    t = Table(
        title=f"Harness timing error vs the scripted server (TTFT {cfg.ttft * 1e3:g} ms, ITL {cfg.itl * 1e3:g} ms, "
        f"{cfg.output_tokens} tokens, {cfg.tokens_per_chunk}/chunk, {cfg.connection} connections); "
        "errors in ms, p50 / p99"
    )
    columns = (
        *("conc", "ok/req", "TTFT err", "ITL err", "TTFT raw", "ITL raw", "server lag", "srv intake"),
        *(
            "send lag",
            "resp path",
            "req/s (ideal)",
            "tok/s",
            "client CPU",
            "CPU wait c/s",
            "srv µs/chunk",
            "judged",
        ),
    )
    for col in columns:
        t.add_column(col, justify="right")
    for p in result.points:
        t.add_row(
            str(p.concurrency),
            f"{p.ok}/{p.requests}",
            pair(p.ttft_error),
            pair(p.itl_error),
            pair(p.ttft_error_raw),
            pair(p.itl_error_raw),
            pair(p.server_lag),
            pair(p.server_intake),
            pair(p.send_lag),
            pair(p.response_path),
            f"{p.requests_per_s:.1f} ({p.ideal_requests_per_s:.1f})",
            f"{p.tokens_per_s:,.0f}",
            frac(p.client_cpu),
            f"{frac(p.client_cpu_wait)} / {frac(p.server_cpu_wait)}",
            "-" if p.server_cpu_per_chunk_us is None else f"{p.server_cpu_per_chunk_us:.1f}",
            "saturated" if p.saturated else "ok",
        )
    return t


# ---- the scripted server's own ceiling --------------------------------------------------------------------------
@dataclass(frozen=True)
class ServerCeilingPoint:
    streams: int
    chunks_per_s: float  # chunk writes the server achieved
    scripted_chunks_per_s: float  # what the script asks for: streams / itl
    lag: ErrorStats  # achieved - scripted, every chunk
    server_cpu: float  # fraction of one core
    server_cpu_wait: float | None


async def _raw_streams(host: str, port: int, streams: int, tokens: int, duration_s: float) -> int:
    """A minimal keep-alive load: `streams` connections each asking for stream after stream, reading raw bytes."""
    body = (
        b'{"prompt":"x","stream":true,"ignore_eos":true,"max_tokens":%d}' % tokens  # no SSE parsing: cheap
    )
    request = b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n%b" % (len(body), body)
    end = time.perf_counter() + duration_s
    done = 0

    async def one() -> None:
        nonlocal done
        reader, writer = await asyncio.open_connection(host, port)
        while time.perf_counter() < end:
            writer.write(request)
            tail = b""
            while not tail.endswith(b"\r\n0\r\n\r\n"):
                data = await reader.read(1 << 16)
                if not data:
                    return
                tail = (tail + data)[-16:]
            done += 1
        writer.close()

    await asyncio.gather(*(one() for _ in range(streams)))
    return done


def _raw_load_process(url: str, streams: int, tokens: int, duration_s: float) -> None:
    host, port = url.rsplit("//", 1)[1].split(":")
    asyncio.run(_raw_streams(host, int(port), streams, tokens, duration_s))


def server_ceiling(
    streams: Sequence[int] = (64, 256, 512),
    itl: float = 0.005,
    duration_s: float = 3.0,
    load_processes: int = 2,
) -> list[ServerCeilingPoint]:
    """Drive the scripted server (its own process) with a raw byte-counting load (`load_processes` processes) and
    report, per number of streams, the chunk rate it achieved, its lag and its CPU: its ceiling is where the lag
    grows or its CPU reaches a core."""
    import multiprocessing as mp

    out = []
    ctx = mp.get_context("spawn")
    with serve_in_process(ScriptConfig(ttft=itl, itl=itl, output_tokens=64, max_tracked=1000)) as url:
        for n in streams:
            shares = [n // load_processes + (i < n % load_processes) for i in range(load_processes)]
            procs = [
                ctx.Process(target=_raw_load_process, args=(url, k, 64, duration_s + 30)) for k in shares if k
            ]
            for p in procs:
                p.start()
            give_up = time.perf_counter() + 60.0
            while fetch_stats(url, brief=True)["requests"] < 2 * n:  # every stream connected and streaming
                if time.perf_counter() > give_up or not any(p.is_alive() for p in procs):
                    raise RuntimeError(f"the raw load of {n} streams did not get going within 60 s")
                time.sleep(0.05)
            reset_stats(url)  # the window starts with the load in full swing
            before = fetch_stats(url, brief=True)
            t = time.perf_counter()
            time.sleep(duration_s)
            wall = time.perf_counter() - t
            stats = fetch_stats(url)
            for p in procs:
                p.terminate()
                p.join()
            lag = stats["lag_ms"]
            cpu = _delta(before.get("cpu_s"), stats.get("cpu_s")) or 0.0
            wait = _delta(before.get("cpu_wait_s"), stats.get("cpu_wait_s"))
            out.append(
                ServerCeilingPoint(
                    streams=n,
                    chunks_per_s=lag["count"] / wall,
                    scripted_chunks_per_s=n / itl,
                    lag=ErrorStats(lag["count"], None, lag["p50"], lag["p99"], lag["max"], lag["mean"]),
                    server_cpu=cpu / wall,
                    server_cpu_wait=None if wait is None else wait / wall,
                )
            )
    return out
