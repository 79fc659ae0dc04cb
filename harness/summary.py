"""Summaries: per load point statistics, goodput and verdict, rebuilt from a run directory's files alone.

`summarize_point` is pure (records + metadata + events in, `PointSummary` out); `summarize_run` reads a run
directory; `rebuild_summary` also writes `summary.json`; `render_table` draws the table `bench summarize` and
`bench run` print. Shape: docs/run-directory.md; definitions: docs/metrics.md.
"""

from __future__ import annotations

import warnings
from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from harness import metrics
from harness.breakdown import Breakdown, PrefixReuse, breakdowns, prefix_reuse
from harness.cache import CacheShare, cache_share
from harness.metrics import LatencyStats, stats_ms
from harness.quality import quality_summary
from harness.records import RequestRecord, latest_attempts
from harness.rundir import SCHEMA_VERSION, Manifest, RunDir
from harness.slo import Goodput, Slo, goodput
from harness.telemetry import TelemetrySummary, read_telemetry, summarize_telemetry, telemetry_path
from harness.verdict import ApproximateInputs, PointChecks, Verdict, VerdictPolicy, judge

if TYPE_CHECKING:
    from rich.table import Table

__all__ = [
    "ClientCpu",
    "LoadInfo",
    "PointMeta",
    "PointSummary",
    "RequestCounts",
    "Summary",
    "point_meta",
    "rebuild_summary",
    "render_table",
    "summarize_point",
    "summarize_run",
]


class LoadInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    kind: str  # "concurrency" | "rate" (open to new kinds)
    value: float | None = None
    arrival: str | None = None  # "closed", "poisson", "constant", "trace", ...
    closed_loop: bool
    burstiness: float | None = None
    seed: int | None = None


class PointMeta(BaseModel):
    """What a point was, besides its records: from the manifest and the point's events."""

    model_config = ConfigDict(frozen=True)

    engine: str
    point: str
    workload_fingerprint: str | None = None
    workload_kind: str | None = None
    load: LoadInfo
    # the run replays an earlier run's prompts (`bench run --replay-prompts`): a warm cache is expected
    prompts_replayed: bool = False


class RequestCounts(BaseModel):
    model_config = ConfigDict(frozen=True)

    total: int
    measured: int
    ok: int
    failed: int
    warmup: int
    cooldown: int


class ClientCpu(BaseModel):
    model_config = ConfigDict(frozen=True)

    mean_util: float | None = None  # fraction of one core
    max_util: float | None = None
    saturated: bool | None = None
    cpu_wait: float | None = None  # share of the point the client's loop waited for a CPU (schedstat)


class PointSummary(BaseModel):
    model_config = ConfigDict(frozen=True)

    engine: str
    point: str
    workload_fingerprint: str | None
    load: LoadInfo
    duration_s: float | None
    requests: RequestCounts
    errors: dict[str, int]
    error_rate: float | None
    ttft_ms: LatencyStats
    itl_ms: LatencyStats
    tpot_ms: LatencyStats
    e2e_ms: LatencyStats
    send_lag_ms: LatencyStats
    # how late, at most, the client read each successful measured request's first token (RequestRecord.read_stall);
    # empty where nothing watched the loop
    read_stall_ms: LatencyStats = Field(default_factory=LatencyStats)
    # how late the client read each successful measured stream's end after it arrived (done_read - done); empty
    # where the two are not known apart (no kernel arrival times, other clients, older runs)
    end_read_lag_ms: LatencyStats = Field(default_factory=LatencyStats)
    requests_per_s: float | None
    input_tokens_per_s: float | None
    output_tokens_per_s: float | None
    total_tokens_per_s: float | None
    goodput: Goodput | None
    token_sources: dict[str, int]
    input_token_sources: dict[str, int]
    client_cpu: ClientCpu | None
    stop_reason: str | None = None
    checks: PointChecks
    verdict: Verdict
    # GPU / engine memory, KV cache, engine counters and client-vs-engine reconciliation, from RUN_DIR/telemetry/
    telemetry: TelemetrySummary | None = None
    # what the workload exists to show: TTFT by chat turn, by input length, shared prefix vs control
    breakdowns: list[Breakdown] = Field(default_factory=list)
    prefix_reuse: PrefixReuse | None = None
    # share of prompt tokens the engine's prefix cache served, against the workload's design (harness.cache)
    cache: CacheShare | None = None


class Summary(BaseModel):
    model_config = ConfigDict(frozen=True)

    schema_version: int = SCHEMA_VERSION
    kind: Literal["summary"] = "summary"
    run_id: str
    generated_by: str
    slo: dict[str, float] = Field(default_factory=dict)
    policy: VerdictPolicy = Field(default_factory=VerdictPolicy)
    points: list[PointSummary]
    notes: list[str] = Field(default_factory=list)
    # quantized workload: each precision variant's greedy answers against the reference variant's (harness.quality)
    quality: dict[str, Any] | None = None


def _rate(n: int, span: float | None) -> float | None:
    return n / span if span and span > 0 else None


def _span_rate(times: Sequence[float]) -> float | None:
    """Events per second over a sequence of times: (n − 1) / (last − first)."""
    if len(times) < 2:
        return None
    return _rate(len(times) - 1, max(times) - min(times))


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _input_tokens(rec: RequestRecord) -> tuple[int | None, str]:
    if rec.prompt_tokens is not None:
        return rec.prompt_tokens, rec.token_source if rec.token_source != "none" else "reported"
    if rec.expected_input_tokens is not None:
        return rec.expected_input_tokens, "workload"
    return None, "none"


def _client_cpu(raw: Mapping[str, Any] | None, policy: VerdictPolicy) -> ClientCpu | None:
    """The client's CPU over the point, saturated by the policy's bound on its mean use (the runner's own flag, from
    runs before this rule, is kept only where the mean is unknown)."""
    if not raw:
        return None
    cpu = ClientCpu.model_validate(raw)
    if cpu.mean_util is None:
        return cpu
    return cpu.model_copy(update={"saturated": cpu.mean_util > policy.max_client_cpu_util})


def summarize_point(
    records: Iterable[RequestRecord],
    meta: PointMeta,
    events: Iterable[Mapping[str, Any]] = (),
    *,
    slo: Slo | None = None,
    policy: VerdictPolicy | None = None,
    telemetry: TelemetrySummary | None = None,
) -> PointSummary:
    """Statistics, goodput and verdict of one load point. Only `phase == "measure"` records enter statistics."""
    recs = list(records)
    measured = [r for r in recs if r.phase == "measure"]
    ok = [r for r in measured if r.ok]
    failed = [r for r in measured if not r.ok]
    errors: dict[str, int] = dict(Counter(str(r.status) for r in failed))
    cancelled = errors.get("cancelled", 0)
    completed = len(measured) - cancelled
    error_rate = (len(failed) - cancelled) / completed if completed else None

    starts = [r.scheduled for r in measured]
    ends = [r.done for r in measured if r.done is not None]
    duration = max(ends) - min(starts) if starts and ends and max(ends) > min(starts) else None

    out_counts = [metrics.output_tokens(r) for r in ok]
    out_tokens = sum(c.value for c in out_counts)
    inputs = [_input_tokens(r) for r in ok]
    in_tokens = sum(n for n, _ in inputs if n is not None)

    lat = {
        "ttft": stats_ms(metrics.ttft(r) for r in ok),
        "itl": stats_ms(np.concatenate([metrics.itl_array(r) for r in ok]) if ok else np.empty(0)),
        "tpot": stats_ms(metrics.tpot(r) for r in ok),
        "e2e": stats_ms(metrics.e2e(r) for r in ok),
    }
    send_lag = stats_ms(metrics.send_lag(r) for r in measured)
    read_stall = stats_ms(r.read_stall for r in ok)
    end_reads = [
        (r.done_read - r.done, r.done_read - r.scheduled)
        for r in ok
        if r.done_read is not None and r.done is not None
    ]
    end_read_lag = stats_ms(lag for lag, _ in end_reads)
    slot_time = sum(cycle for _, cycle in end_reads)

    end_event: Mapping[str, Any] = {}
    for ev in events:
        if (
            ev.get("kind") == "point_end"
            and ev.get("engine") == meta.engine
            and ev.get("point") == meta.point
        ):
            end_event = ev
    cpu = _client_cpu(end_event.get("client_cpu"), policy or VerdictPolicy())

    server = [
        (r.output_tokens, r.client_output_tokens or sum(r.chunk_tokens))
        for r in ok
        if r.token_source == "server_usage" and r.output_tokens
    ]
    pinned = [
        (c.value, r.expected_output_tokens)
        for r, c in zip(ok, out_counts, strict=True)
        if r.expected_output_tokens
    ]
    found = breakdowns(recs, meta.workload_kind)
    cache = _cache(recs, meta, events, telemetry)
    checks = PointChecks(
        measured=completed,
        duration_s=duration,
        closed_loop=meta.load.closed_loop,
        scheduled_rate_per_s=_span_rate(starts),
        achieved_rate_per_s=_span_rate([r.sent for r in measured if r.sent is not None]),
        send_lag_p99_ms=send_lag.p99,
        read_stall_p99_ms=read_stall.p99,
        slot_idle_share=sum(lag for lag, _ in end_reads) / slot_time if slot_time > 0 else None,
        ttft_p50_ms=lat["ttft"].p50,
        client_cpu_util=cpu.mean_util if cpu else None,
        client_cpu_saturated=cpu.saturated if cpu else None,
        client_cpu_wait=cpu.cpu_wait if cpu else None,
        error_rate=error_rate,
        token_count_mismatch=_mean([abs(s - c) / s for s, c in server]),
        output_length_mismatch=_mean([abs(a - e) / e for a, e in pinned]),
        output_length_mismatched=sum(1 for a, e in pinned if a != e),
        engine_disagreements=_disagreements(telemetry),
        engine_notes=_engine_notes(telemetry) + _cache_notes(cache),
        cache_share=cache.measured,
        cache_expected_share=cache.expected,
        cache_replayed=cache.replayed,
        approximate_inputs=_approximate_inputs(ok, events, meta.engine),
    )
    return PointSummary(
        engine=meta.engine,
        point=meta.point,
        workload_fingerprint=meta.workload_fingerprint,
        load=meta.load,
        duration_s=duration,
        requests=RequestCounts(
            total=len(recs),
            measured=len(measured),
            ok=len(ok),
            failed=len(failed),
            warmup=sum(1 for r in recs if r.phase == "warmup"),
            cooldown=sum(1 for r in recs if r.phase == "cooldown"),
        ),
        errors=errors,
        error_rate=error_rate,
        ttft_ms=lat["ttft"],
        itl_ms=lat["itl"],
        tpot_ms=lat["tpot"],
        e2e_ms=lat["e2e"],
        send_lag_ms=send_lag,
        read_stall_ms=read_stall,
        end_read_lag_ms=end_read_lag,
        requests_per_s=_rate(len(ok), duration),
        input_tokens_per_s=_rate(in_tokens, duration),
        output_tokens_per_s=_rate(out_tokens, duration),
        total_tokens_per_s=_rate(in_tokens + out_tokens, duration),
        goodput=goodput([r for r in measured if r.status != "cancelled"], duration, slo, lat)
        if slo
        else None,
        token_sources=dict(Counter(c.source for c in out_counts)),
        input_token_sources=dict(Counter(src for _, src in inputs)),
        client_cpu=cpu,
        stop_reason=end_event.get("stop_reason"),
        checks=checks,
        verdict=judge(checks, policy),
        telemetry=telemetry,
        breakdowns=found,
        prefix_reuse=prefix_reuse(found),
        cache=cache,
    )


def _cache(
    recs: list[RequestRecord],
    meta: PointMeta,
    events: Iterable[Mapping[str, Any]],
    telemetry: TelemetrySummary | None,
) -> CacheShare:
    """The point's cache share; the block size from its engine's `engine_ready` event, the reset from its
    `cache_reset` event (the last one before the point)."""
    block, reset = None, None
    for ev in events:
        if ev.get("engine") != meta.engine:
            continue
        if ev.get("kind") == "engine_ready" and ev.get("cache_block_tokens"):
            block = int(ev["cache_block_tokens"])
        elif ev.get("kind") == "cache_reset" and ev.get("point") == meta.point:
            reset = (
                f"emptied before the point ({ev.get('route')})"
                if ev.get("ok")
                else f"not emptied: {ev.get('reason')}"
            )
    counters = telemetry.engine_counters if telemetry else None
    return cache_share(recs, counters, block_tokens=block, replayed=meta.prompts_replayed, reset=reset)


def _cache_notes(cache: CacheShare) -> list[str]:
    notes = []
    if cache.replayed and cache.measured is not None:
        expected = "" if cache.expected is None else f"; fresh prompts would take {cache.expected:.0%}"
        notes.append(
            f"replayed prompts: {cache.measured:.0%} of prompt tokens came from the engine's cache (a warm cache "
            f"is expected{expected})"
        )
    if cache.reconciled == "disagree":
        notes.append(f"cached prompt tokens: {cache.reconcile_note}")
    return notes


def _disagreements(telemetry: TelemetrySummary | None) -> list[str]:
    rec = telemetry.reconciliation if telemetry else None
    if rec is None:
        return []
    # with failed requests in the point the counts are expected to differ (the error-rate rule judges those)
    counts = [f"{c.metric}: {c.reason}" for c in rec.counts if c.verdict == "disagree" and not rec.failed]
    ttft = [f"TTFT p{c.quantile * 100:g}: {c.reason}" for c in rec.ttft if c.verdict == "disagree"]
    return counts + ttft


def _approximate_inputs(
    ok: Sequence[RequestRecord], events: Iterable[Mapping[str, Any]], engine: str
) -> ApproximateInputs | None:
    """Where the engine's prompts were built with a stand-in tokenizer (the run's `tokenizer` event says so): the
    lengths asked for against those the server counted."""
    chosen: Mapping[str, Any] | None = None
    for ev in events:
        if ev.get("kind") == "tokenizer" and ev.get("engine") == engine:
            chosen = ev
    if chosen is None or chosen.get("exact", True):
        return None
    counted = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    return ApproximateInputs(
        tokenizer=str(chosen.get("tokenizer")),
        why=str(chosen.get("why") or ""),
        target_mean=_mean([r.expected_input_tokens for r in ok if r.expected_input_tokens is not None]),
        server_mean=_mean(counted),
        server_min=min(counted, default=None),
        server_max=max(counted, default=None),
        counted=len(counted),
    )


def _engine_notes(telemetry: TelemetrySummary | None) -> list[str]:
    # TTFT beyond the engine's bucket that is not a disagreement: the server's time outside its histogram, or the
    # client's own delays (which the send-lag and read-stall rules judge)
    rec = telemetry.reconciliation if telemetry else None
    if rec is None:
        return []
    sides = ("outside_engine", "client_delayed")
    return [f"TTFT p{c.quantile * 100:g}: {c.reason}" for c in rec.ttft if c.verdict in sides]


def _parse_point_id(point: str) -> tuple[str | None, float | None]:
    kind, eq, value = point.partition("=")
    if not eq:
        return None, None
    try:
        return kind.strip(), float(value)
    except ValueError:
        return kind.strip(), None


def point_meta(
    manifest: Manifest | None, engine: str, point: str, events: Iterable[Mapping[str, Any]] = ()
) -> PointMeta:
    """A point's metadata: its id ("rate=4"), the manifest's load and workload, and its `point_start` event."""
    load = dict(manifest.load) if manifest else {}
    fingerprint = manifest.workload.get("fingerprint") if manifest else None
    kind, value = _parse_point_id(point)
    info: dict[str, Any] = {
        "kind": kind or load.get("kind") or "unknown",
        "value": value,
        "arrival": load.get("arrival"),
    }
    for ev in events:
        if ev.get("kind") == "point_start" and ev.get("engine") == engine and ev.get("point") == point:
            info.update({k: v for k, v in (ev.get("load") or {}).items() if k in LoadInfo.model_fields})
            fingerprint = ev.get("workload_fingerprint", fingerprint)
    if info.get("closed_loop") is None:
        info["closed_loop"] = info["kind"] == "concurrency" or info.get("arrival") == "closed"
    kind = manifest.workload.get("kind") if manifest else None
    prompts = (manifest.workload.get("prompts") if manifest else None) or {}
    return PointMeta(
        engine=engine,
        point=point,
        workload_fingerprint=fingerprint,
        workload_kind=kind,
        load=LoadInfo(**info),
        prompts_replayed=bool(prompts.get("replayed_from")),
    )


def _generated_by() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return f"enginebench {version('enginebench')}"
    except PackageNotFoundError:
        return "enginebench"


def summarize_run(
    path: Path | str, *, slo: Slo | None = None, policy: VerdictPolicy | None = None
) -> Summary:
    """The summary of a run directory, from records.jsonl (+ manifest.json and events.jsonl when present).

    `slo` defaults to the manifest's; a truncated last line (a killed run) is skipped and noted in `notes`.
    """
    rd = RunDir.open(path)
    notes: list[str] = []
    manifest = rd.load_manifest() if rd.has_manifest() else None
    if manifest is None:
        notes.append("no manifest.json: load kind and workload fingerprint inferred from point ids")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = list(rd.iter_records())
        events = list(rd.iter_events())
        telemetry = read_telemetry(rd.path)
    notes.extend(str(w.message) for w in caught)
    # an event may carry a line for the summary (e.g. `worker_lost` from harness/distributed.py)
    notes.extend(str(ev["summary_note"]) for ev in events if ev.get("summary_note"))
    if not records:
        notes.append(f"no request records in {rd.path / 'records.jsonl'}: nothing to summarize")
    if slo is None:
        slo = Slo.from_dict(manifest.slo) if manifest else Slo()
    policy = policy or VerdictPolicy()

    records, superseded = latest_attempts(records)
    if superseded:
        notes.append(
            f"{superseded} failed requests were sent again on resume (--resend-failed): each counts once, as its "
            "latest attempt; the earlier failures stay in records.jsonl"
        )
    groups: dict[tuple[str, str], list[RequestRecord]] = {}
    for r in records:
        groups.setdefault((r.engine, r.point), []).append(r)
    points = [
        summarize_point(
            recs,
            point_meta(manifest, engine, point, events),
            events,
            slo=slo,
            policy=policy,
            telemetry=summarize_telemetry(
                telemetry.get(telemetry_path(rd.path, engine).stem, ()), point, recs
            ),
        )
        for (engine, point), recs in groups.items()
    ]
    return Summary(
        run_id=manifest.run_id if manifest else rd.path.name,
        generated_by=_generated_by(),
        slo=slo.to_dict(),
        policy=policy,
        points=points,
        notes=notes,
        quality=quality_summary(rd.path, manifest.workload) if manifest else None,
    )


def rebuild_summary(
    path: Path | str, *, slo: Slo | None = None, policy: VerdictPolicy | None = None
) -> Summary:
    """`summarize_run`, then write it as the directory's summary.json."""
    summary = summarize_run(path, slo=slo, policy=policy)
    RunDir(Path(path)).write_summary(summary)
    return summary


def _f(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _cache_cell(cache: CacheShare | None) -> str:
    if cache is None or cache.measured is None:
        return "–"
    expected = "" if cache.expected is None else f" ({cache.expected:.0%})"
    return f"{cache.measured:.0%}{expected}"


def render_table(summary: Summary) -> Table:
    """One row per load point: requests, latency percentiles (ms), throughput, goodput and verdict."""
    from rich.table import Table

    table = Table(title=f"run {summary.run_id}", header_style="bold", pad_edge=False)
    table.add_column("engine", overflow="fold")
    table.add_column("point", overflow="fold")
    headers = (
        "ok/\nfailed",
        "TTFT\np50",
        "TTFT\np95",
        "TTFT\np99",
        "cache\nshare",
        "ITL\np50",
        "TPOT\np50",
        "E2E\np95",
    )
    for name in (*headers, "out\ntok/s", "good-\nput/s"):
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    for p in summary.points:
        good = "–" if p.goodput is None else _f(p.goodput.requests_per_s, 2)
        verdict = "[green]VALID[/]" if p.verdict.status == "VALID" else "[red]INVALID[/]"
        table.add_row(
            p.engine,
            p.point,
            f"{p.requests.ok}/{p.requests.failed}",
            _f(p.ttft_ms.p50),
            _f(p.ttft_ms.p95),
            _f(p.ttft_ms.p99),
            _cache_cell(p.cache),
            _f(p.itl_ms.p50),
            _f(p.tpot_ms.p50),
            _f(p.e2e_ms.p95),
            _f(p.output_tokens_per_s),
            good,
            verdict,
        )
    table.caption = (
        "latencies in ms over successful measured requests; goodput in good requests/s; cache share: prompt tokens "
        "the engine's prefix cache served (expected in brackets)"
    )
    return table
