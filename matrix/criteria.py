"""The criteria of the decision matrix, and how each raw value is taken from the measurements or the knowledge file.

Measured criteria read VALID points only (an INVALID point never enters the matrix). Latency criteria compare engines
at one common load — the highest load value at which every engine has a valid point on that workload — so nobody is
judged at a heavier load than the others; when no load is common, each engine's lightest valid point is used and
the note says so. Anything not measured is `None` (missing), never zero.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

from matrix.inputs import EngineInfo, Point, WorkloadRole
from matrix.knowledge import QUALITATIVE, Knowledge

__all__ = ["CRITERIA", "CRITERION_NAMES", "Criterion", "RawValue", "raw_values"]

Direction = Literal["higher", "lower"]


@dataclass(frozen=True, slots=True)
class Criterion:
    name: str
    kind: Literal["measured", "qualitative"]
    direction: Direction
    unit: str
    description: str


CRITERIA: tuple[Criterion, ...] = (
    Criterion(
        "goodput",
        "measured",
        "higher",
        "req/s",
        "highest goodput (requests/s meeting the per-request SLO) over the engine's valid general-workload points",
    ),
    Criterion("ttft_p95", "measured", "lower", "ms", "TTFT p95 at the common load on the general workload"),
    Criterion(
        "tpot_p95",
        "measured",
        "lower",
        "ms",
        "TPOT p95 at the common load on the general workload (ITL p95 when TPOT is absent)",
    ),
    Criterion(
        "long_context_ttft_p95",
        "measured",
        "lower",
        "ms",
        "TTFT p95 at the common load on long-context workloads",
    ),
    Criterion(
        "prefix_reuse_gain",
        "measured",
        "higher",
        "×",
        "TTFT p50 of control requests ÷ TTFT p50 of prefix-reusing requests (same point), at the lightest valid load",
    ),
    Criterion(
        "memory_per_request",
        "measured",
        "lower",
        "MiB",
        "peak memory divided by requests in flight, at the engine's most loaded valid point with telemetry",
    ),
    Criterion(
        "energy_per_token",
        "measured",
        "lower",
        "J/token",
        "GPU energy per output token (NVML power integrated over the point) at the common load on the general "
        "workload",
    ),
    Criterion(
        "cold_start", "measured", "lower", "s", "launch to ready (manifest engines[].cold_start_s; median)"
    ),
    Criterion(
        "error_rate",
        "measured",
        "lower",
        "fraction",
        "failed / measured requests over every valid point (request-weighted)",
    ),
    Criterion(
        "hardware_flexibility", "qualitative", "higher", "score", "how many kinds of hardware it runs on"
    ),
    Criterion(
        "operational_simplicity", "qualitative", "higher", "score", "install, configure, upgrade, operate"
    ),
    Criterion(
        "ecosystem", "qualitative", "higher", "score", "community, release cadence, maintenance status"
    ),
    Criterion("quantization", "qualitative", "higher", "score", "breadth of quantized formats served"),
)
CRITERION_NAMES: tuple[str, ...] = tuple(c.name for c in CRITERIA)
assert set(QUALITATIVE) <= set(CRITERION_NAMES)


@dataclass(frozen=True, slots=True)
class RawValue:
    """A criterion's raw value for one engine: `value` None means missing; `note` says where it came from."""

    value: float | None
    note: str = ""
    source: str = ""
    date: str = ""


def _valid(points: Sequence[Point]) -> list[Point]:
    return [p for p in points if p.valid]


def _common_load(points: Sequence[Point], engines: Sequence[str]) -> tuple[str, float] | None:
    loads: set[tuple[str, float]] | None = None
    for engine in engines:
        mine = {(p.load_kind, p.load_value) for p in points if p.engine == engine}
        if not mine:
            continue
        loads = mine if loads is None else loads & mine
    return max(loads, key=lambda kv: kv[1]) if loads else None


def _latency_at_common_load(
    points: Sequence[Point],
    roles: set[WorkloadRole],
    metric: str,
    stat: str,
    engines: Sequence[str],
    fallback_metric: str | None = None,
) -> dict[str, RawValue]:
    chosen = [p for p in _valid(points) if p.role in roles]
    common = _common_load(chosen, engines)
    out: dict[str, RawValue] = {}
    for engine in engines:
        mine = [p for p in chosen if p.engine == engine]
        if not mine:
            out[engine] = RawValue(None, "no valid point on this workload")
            continue
        if common is not None:
            at = [p for p in mine if (p.load_kind, p.load_value) == common]
            how = f"at common load {common[0]}={common[1]:g}"
        else:
            at = [min(mine, key=lambda p: p.load_value)]
            how = f"at its lightest valid point {at[0].point} (no load common to all engines)"
        values, used = [], metric
        for p in at:
            v = p.latency(metric, stat)
            if v is None and fallback_metric is not None:
                v, used = p.latency(fallback_metric, stat), fallback_metric
            if v is not None:
                values.append(v)
        if not values:
            out[engine] = RawValue(None, f"{metric} {stat} not in summary {how}")
        else:
            workloads = ", ".join(sorted({p.workload for p in at}))
            out[engine] = RawValue(statistics.median(values), f"{used} {stat} {how} ({workloads})")
    return out


def _goodput(points: Sequence[Point], engines: Sequence[str]) -> dict[str, RawValue]:
    out: dict[str, RawValue] = {}
    for engine in engines:
        mine = [p for p in _valid(points) if p.engine == engine and p.role == "general"]
        with_goodput = [p for p in mine if p.goodput_requests_per_s is not None]
        if not with_goodput:
            out[engine] = RawValue(None, "no valid general-workload point with goodput")
            continue
        best = max(with_goodput, key=lambda p: p.goodput_requests_per_s or 0.0)
        out[engine] = RawValue(best.goodput_requests_per_s, f"at {best.point} ({best.workload})")
    return out


def _prefix_gain_within_points(points: Sequence[Point], engine: str) -> RawValue | None:
    """Control and reuse requests interleaved in the same points (the shared-prefix workload): the same load."""
    mixed = [
        p for p in _valid(points)
        if p.engine == engine and p.role == "shared_prefix"
        and p.ttft_p50_by_role.get("reuse") and p.ttft_p50_by_role.get("control") is not None
    ]  # fmt: skip
    if not mixed:
        return None
    p = min(mixed, key=lambda q: q.load_value)
    gain = p.ttft_p50_by_role["control"] / p.ttft_p50_by_role["reuse"]
    return RawValue(gain, f"control/reuse TTFT p50 within {p.point} ({p.workload})")


def _prefix_gain(points: Sequence[Point], engines: Sequence[str]) -> dict[str, RawValue]:
    out: dict[str, RawValue] = {}
    for engine in engines:
        within = _prefix_gain_within_points(points, engine)
        if within is not None:
            out[engine] = within
            continue
        shared = [p for p in _valid(points) if p.engine == engine and p.role == "shared_prefix"]
        control = [p for p in _valid(points) if p.engine == engine and p.role == "shared_prefix_control"]
        if not shared or not control:
            out[engine] = RawValue(None, "needs valid shared-prefix and control points")
            continue
        common = {(p.load_kind, p.load_value) for p in shared} & {
            (p.load_kind, p.load_value) for p in control
        }
        if common:
            load = min(common, key=lambda kv: kv[1])
            s = [p for p in shared if (p.load_kind, p.load_value) == load]
            c = [p for p in control if (p.load_kind, p.load_value) == load]
            how = f"at {load[0]}={load[1]:g}"
        else:
            s = [min(shared, key=lambda p: p.load_value)]
            c = [min(control, key=lambda p: p.load_value)]
            how = "at each side's lightest point (no common load)"
        ts = [v for p in s if (v := p.latency("ttft", "p50")) is not None]
        tc = [v for p in c if (v := p.latency("ttft", "p50")) is not None]
        if not ts or not tc or statistics.median(ts) <= 0:
            out[engine] = RawValue(None, "TTFT p50 missing on shared-prefix or control points")
            continue
        out[engine] = RawValue(
            statistics.median(tc) / statistics.median(ts), f"control/shared TTFT p50 {how}"
        )
    return out


def _memory(points: Sequence[Point], engines: Sequence[str]) -> dict[str, RawValue]:
    out: dict[str, RawValue] = {}
    for engine in engines:
        mine = [
            p
            for p in _valid(points)
            if p.engine == engine and p.memory_peak_bytes is not None and (p.in_flight or 0) > 0
        ]
        if not mine:
            out[engine] = RawValue(None, "no memory telemetry in summary")
            continue
        p = max(mine, key=lambda q: q.in_flight or 0.0)
        assert p.memory_peak_bytes is not None and p.in_flight
        per = p.memory_peak_bytes / p.in_flight / 2**20
        out[engine] = RawValue(
            per, f"peak {p.memory_peak_bytes / 2**20:.0f} MiB / {p.in_flight:g} in flight at {p.point}"
        )
    return out


def _energy(points: Sequence[Point], engines: Sequence[str]) -> dict[str, RawValue]:
    """J per output token at the highest general-workload load where every engine with energy has a valid point
    (energy per token falls as batches grow, so engines are compared at one load, as latencies are)."""
    chosen = [p for p in _valid(points) if p.role == "general" and p.energy_per_output_token_j is not None]
    common = _common_load(chosen, engines)
    out: dict[str, RawValue] = {}
    for engine in engines:
        mine = [p for p in chosen if p.engine == engine]
        if not mine:
            out[engine] = RawValue(None, "no GPU power measured (NVML) at a valid general-workload point")
            continue
        if common is not None:
            at = [p for p in mine if (p.load_kind, p.load_value) == common]
            how = f"at common load {common[0]}={common[1]:g}"
        else:
            at = [min(mine, key=lambda p: p.load_value)]
            how = f"at its lightest valid point {at[0].point} (no load common to all engines)"
        values = [p.energy_per_output_token_j for p in at if p.energy_per_output_token_j is not None]
        out[engine] = RawValue(statistics.median(values), f"GPU J per output token {how}")
    return out


def _error_rate(points: Sequence[Point], engines: Sequence[str]) -> dict[str, RawValue]:
    out: dict[str, RawValue] = {}
    for engine in engines:
        mine = [p for p in _valid(points) if p.engine == engine and p.error_rate is not None]
        if not mine:
            out[engine] = RawValue(None, "no valid point with an error rate")
            continue
        weights = [float(p.measured_requests or 1) for p in mine]
        rate = sum(w * (p.error_rate or 0.0) for w, p in zip(weights, mine, strict=True)) / sum(weights)
        out[engine] = RawValue(rate, f"request-weighted over {len(mine)} valid points")
    return out


def _cold_start(infos: Mapping[str, Sequence[EngineInfo]], engines: Sequence[str]) -> dict[str, RawValue]:
    out: dict[str, RawValue] = {}
    for engine in engines:
        values = [i.cold_start_s for i in infos.get(engine, ()) if i.cold_start_s is not None]
        out[engine] = (
            RawValue(statistics.median(values), f"median of {len(values)} launches")
            if values
            else RawValue(None, "not launched by EngineBench (attached), or not recorded")
        )
    return out


def _qualitative(
    knowledge: Knowledge, infos: Mapping[str, Sequence[EngineInfo]], engines: Sequence[str], criterion: str
) -> dict[str, RawValue]:
    out: dict[str, RawValue] = {}
    for engine in engines:
        adapters = [i.adapter for i in infos.get(engine, ())]
        facts = knowledge.lookup(*adapters, engine)
        fact = facts.scores.get(criterion) if facts else None
        out[engine] = (
            RawValue(float(fact.score), fact.why, fact.source, fact.date)
            if fact
            else RawValue(None, f"no {criterion} entry in knowledge file ({knowledge.origin})")
        )
    return out


def raw_values(
    points: Sequence[Point], infos: Mapping[str, Sequence[EngineInfo]], knowledge: Knowledge
) -> dict[str, dict[str, RawValue]]:
    """criterion → engine → raw value, for every engine with at least one VALID point.

    An engine with no valid measurement is left out entirely: ranking it on qualitative facts alone would let an
    engine that never produced a usable number win.
    """
    engines = sorted({p.engine for p in points if p.valid})
    general: set[WorkloadRole] = {"general"}
    out: dict[str, dict[str, RawValue]] = {
        "goodput": _goodput(points, engines),
        "ttft_p95": _latency_at_common_load(points, general, "ttft", "p95", engines),
        "tpot_p95": _latency_at_common_load(points, general, "tpot", "p95", engines, fallback_metric="itl"),
        "long_context_ttft_p95": _latency_at_common_load(points, {"long_context"}, "ttft", "p95", engines),
        "prefix_reuse_gain": _prefix_gain(points, engines),
        "memory_per_request": _memory(points, engines),
        "energy_per_token": _energy(points, engines),
        "cold_start": _cold_start(infos, engines),
        "error_rate": _error_rate(points, engines),
    }
    for criterion in QUALITATIVE:
        out[criterion] = _qualitative(knowledge, infos, engines, criterion)
    return out
