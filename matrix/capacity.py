"""Capacity under an SLO: the highest load one replica sustains, and how many replicas a target needs.

An SLO is a mapping of limits: `<metric>_<stat>_ms` (metric ttft/tpot/itl/e2e, stat p50/p90/p95/p99/mean/max) is a
latency ceiling, `error_rate` a ceiling on the failed fraction. Only VALID points count. The capacity is the highest
measured load that meets the SLO; when the next measured load fails on latency, the load where the binding metric
crosses its limit is interpolated linearly between the two (`interpolated: true`, both points named); a concurrency
is rounded down to whole requests, and throughput is interpolated at that load. Nothing is
extrapolated beyond the sweep: when the heaviest point still passes, the capacity is that point, marked a lower
bound. Scaling one replica's capacity to N replicas assumes linear scaling that was not measured: that is flagged
`extrapolated: true` with a sentence saying so.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace

from harness.errors import ConfigError
from matrix.inputs import Point

__all__ = [
    "Capacity",
    "Replicas",
    "Traffic",
    "capacity",
    "check_slo",
    "parse_slo",
    "replicas_for",
]

_LATENCY_KEY = re.compile(r"^(ttft|tpot|itl|e2e)_(p50|p90|p95|p99|mean|max)_ms$")


def parse_slo(slo: Mapping[str, object], origin: str = "slo") -> dict[str, float]:
    """Validate SLO keys and values; returns {key: limit}."""
    out: dict[str, float] = {}
    for key, value in slo.items():
        if not (_LATENCY_KEY.match(key) or key == "error_rate"):
            raise ConfigError(
                f"{origin}: unknown SLO key {key!r}; use <ttft|tpot|itl|e2e>_<p50|p90|p95|p99|mean|max>_ms "
                "or error_rate"
            )
        if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
            raise ConfigError(f"{origin}: SLO {key} must be a number ≥ 0, got {value!r}")
        out[key] = float(value)
    return out


def _observed(point: Point, key: str) -> float | None:
    if key == "error_rate":
        return point.error_rate
    m = _LATENCY_KEY.match(key)
    assert m is not None
    return point.latency(m.group(1), m.group(2))


def check_slo(point: Point, slo: Mapping[str, float]) -> tuple[bool, list[str]]:
    """(meets, reasons). A statistic the SLO needs but the summary lacks counts as not met."""
    reasons: list[str] = []
    if not point.valid:
        reasons.append("point is INVALID")
    for key, limit in slo.items():
        value = _observed(point, key)
        if value is None:
            reasons.append(f"{key} not measured")
        elif value > limit:
            reasons.append(f"{key} {value:g} > {limit:g}")
    return not reasons, reasons


@dataclass(frozen=True, slots=True)
class Capacity:
    engine: str
    workload: str
    load_kind: str
    slo: Mapping[str, float]
    sustained_load: float | None  # None: no valid point meets the SLO
    requests_per_s: float | None  # at the sustained load (interpolated when the load is)
    input_tokens_per_s: float | None
    output_tokens_per_s: float | None
    e2e_mean_ms: float | None
    at_point: str | None  # the measured point the capacity rests on (the passing one)
    interpolated: bool
    between: tuple[str, str] | None  # (passing point, failing point) when interpolated
    limited_by: str | None  # the SLO key that binds
    lower_bound: bool  # the heaviest measured point still met the SLO
    note: str


def _lerp(a: float | None, b: float | None, t: float) -> float | None:
    if a is None:
        return None
    if b is None:
        return a  # unknown at the failing point: keep the measured value (conservative for rates)
    return a + (b - a) * t


def capacity(points: Sequence[Point], slo: Mapping[str, float]) -> Capacity:
    """Capacity of one engine on one workload; `points` are that engine's points on that workload."""
    valid = sorted((p for p in points if p.valid), key=lambda p: p.load_value)
    engine = points[0].engine if points else ""
    workload = points[0].workload if points else ""
    kind = valid[0].load_kind if valid else (points[0].load_kind if points else "")
    if len({p.load_kind for p in valid}) > 1:
        raise ConfigError(
            f"{engine} on {workload}: points mix concurrency and rate loads; decide on one sweep kind"
        )
    checked = [(p, *check_slo(p, slo)) for p in valid]
    passing = [c for c in checked if c[1]]

    def empty(note: str) -> Capacity:
        return Capacity(
            engine,
            workload,
            kind,
            dict(slo),
            None,
            None,
            None,
            None,
            None,
            None,
            False,
            None,
            None,
            False,
            note,
        )

    if not valid:
        return empty("no VALID point: nothing to size from")
    if not passing:
        worst = "; ".join(checked[0][2])
        return empty(f"misses the SLO at every measured point (lightest {checked[0][0].point}: {worst})")
    top, _, _ = max(passing, key=lambda c: c[0].load_value)
    above = [c for c in checked if c[0].load_value > top.load_value]
    dips = [c[0].point for c in checked if not c[1] and c[0].load_value < top.load_value]
    dip_note = f" Note: {', '.join(dips)} failed at a lower load (non-monotone sweep)." if dips else ""
    base = replace(empty(""), at_point=top.point, e2e_mean_ms=top.latency("e2e", "mean"))
    if not above:
        return replace(
            base,
            sustained_load=top.load_value,
            requests_per_s=top.requests_per_s,
            input_tokens_per_s=top.input_tokens_per_s,
            output_tokens_per_s=top.output_tokens_per_s,
            interpolated=False,
            between=None,
            limited_by=None,
            lower_bound=True,
            note=f"meets the SLO at every load up to the heaviest measured ({top.point}); the real limit is "
            f"higher but was not measured, so this is a lower bound.{dip_note}",
        )
    nxt, _, reasons = above[0]
    # Interpolate on the latency keys that fail at the next point; other failures (errors, missing stats) pin to top.
    ts: list[tuple[float, str]] = []
    for key, limit in slo.items():
        va, vb = _observed(top, key), _observed(nxt, key)
        if vb is None or va is None or vb <= limit:
            continue
        if key == "error_rate":
            ts.append((0.0, key))
        else:
            ts.append(((limit - va) / (vb - va) if vb > va else 0.0, key))
    if not ts:
        return replace(
            base,
            sustained_load=top.load_value,
            requests_per_s=top.requests_per_s,
            input_tokens_per_s=top.input_tokens_per_s,
            output_tokens_per_s=top.output_tokens_per_s,
            interpolated=False,
            between=None,
            limited_by=None,
            lower_bound=False,
            note=f"meets the SLO at {top.point}; {nxt.point} fails ({'; '.join(reasons)}).{dip_note}",
        )
    t, key = min(ts)
    span = nxt.load_value - top.load_value
    limit = top.load_value + span * t
    load = limit
    if (
        kind == "concurrency"
    ):  # a replica runs whole requests: round the crossing down, never below the measured point
        load = max(top.load_value, float(math.floor(limit + 1e-9)))
        t = (load - top.load_value) / span
    interpolated = t > 0
    return replace(
        base,
        sustained_load=load,
        requests_per_s=_lerp(top.requests_per_s, nxt.requests_per_s, t),
        input_tokens_per_s=_lerp(top.input_tokens_per_s, nxt.input_tokens_per_s, t),
        output_tokens_per_s=_lerp(top.output_tokens_per_s, nxt.output_tokens_per_s, t),
        interpolated=interpolated,
        between=(top.point, nxt.point) if interpolated else None,
        limited_by=key,
        lower_bound=False,
        note=(
            f"{key} reaches its limit at {kind}≈{limit:.3g}, interpolated linearly between {top.point} (meets) and "
            f"{nxt.point} (fails); sized at {kind}={load:.3g}."
            if interpolated
            else f"meets the SLO at {top.point}; {nxt.point} fails on {key}."
        )
        + dip_note,
    )


@dataclass(frozen=True, slots=True)
class Traffic:
    """A target: `requests_per_s`, or `concurrent_users` each sending a request then thinking `think_time_s`."""

    requests_per_s: float | None = None
    concurrent_users: float | None = None
    think_time_s: float = 0.0

    def rate(self, e2e_s: float | None) -> float | None:
        """Requests/s this traffic sends: users / (think time + response time)."""
        if self.requests_per_s is not None:
            return self.requests_per_s
        if self.concurrent_users is None:
            return None
        cycle = self.think_time_s + (e2e_s or 0.0)
        return self.concurrent_users / cycle if cycle > 0 else None


@dataclass(frozen=True, slots=True)
class Replicas:
    required_requests_per_s: float | None
    replicas: int | None
    extrapolated: bool
    note: str


def replicas_for(cap: Capacity, traffic: Traffic) -> Replicas:
    """Replicas of the measured configuration needed for `traffic` at the capacity's SLO."""
    e2e_s = cap.e2e_mean_ms / 1000.0 if cap.e2e_mean_ms is not None else None
    need = traffic.rate(e2e_s)
    if need is None:
        return Replicas(None, None, False, "traffic gives neither requests/s nor concurrent users")
    if cap.requests_per_s is None or cap.requests_per_s <= 0:
        return Replicas(need, None, False, "no load meets the SLO: no number of replicas serves this traffic")
    n = max(1, math.ceil(need / cap.requests_per_s - 1e-9))
    if n == 1:
        return Replicas(
            need, 1, False, f"one replica sustains {cap.requests_per_s:.3g} req/s ≥ {need:.3g} needed"
        )
    return Replicas(
        need,
        n,
        True,
        f"{n} replicas assume throughput scales linearly across independent replicas "
        f"({need:.3g} req/s ÷ {cap.requests_per_s:.3g} req/s per replica); only one replica was measured.",
    )
