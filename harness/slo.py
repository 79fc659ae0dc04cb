"""Service-level objectives: parsing `--slo`, judging one request against them, and goodput.

An SLO is a set of targets `<metric>_<stat>=<value><unit>`, e.g. `ttft_p95=200ms,tpot_p95=50ms,e2e_p99=2s`.
Definitions (request-level bounds, point-level targets, goodput) are in docs/metrics.md.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from harness import metrics
from harness.errors import ConfigError
from harness.metrics import LatencyStats
from harness.records import RequestRecord

__all__ = [
    "SLO_METRICS",
    "SLO_STATS",
    "Goodput",
    "Slo",
    "SloTarget",
    "TargetResult",
    "goodput",
    "parse_slo",
    "request_meets",
]

SloMetric = Literal["ttft", "tpot", "itl", "e2e"]
SLO_METRICS: tuple[SloMetric, ...] = ("ttft", "tpot", "itl", "e2e")
SLO_STATS = ("p50", "p90", "p95", "p99", "mean", "max")
# Metrics with one value per request, so a single request can be judged against them. ITL has one value per token:
# it is judged only at the point level (its percentile over all tokens).
REQUEST_LEVEL: tuple[SloMetric, ...] = ("ttft", "tpot", "e2e")
_UNITS_MS = {"us": 0.001, "µs": 0.001, "ms": 1.0, "s": 1000.0}
_ITEM = re.compile(r"^(?P<num>[0-9]*\.?[0-9]+(?:[eE][-+]?[0-9]+)?)\s*(?P<unit>[^\s0-9.]*)$")


class SloTarget(BaseModel):
    """One target: `stat` of `metric` over a load point must be at most `bound_ms`."""

    model_config = ConfigDict(frozen=True)

    metric: SloMetric
    stat: str
    bound_ms: float

    @property
    def name(self) -> str:
        return f"{self.metric}_{self.stat}"


class Slo(BaseModel):
    model_config = ConfigDict(frozen=True)

    targets: tuple[SloTarget, ...] = ()

    def __bool__(self) -> bool:
        return bool(self.targets)

    def request_bounds_ms(self) -> dict[str, float]:
        """Per-request bound of each request-level metric: the loosest bound given for it (see docs/metrics.md)."""
        bounds: dict[str, float] = {}
        for t in self.targets:
            if t.metric in REQUEST_LEVEL:
                bounds[t.metric] = max(bounds.get(t.metric, 0.0), t.bound_ms)
        return bounds

    def to_dict(self) -> dict[str, float]:
        """The manifest / summary form: {"ttft_p95_ms": 200.0, ...}."""
        return {f"{t.name}_ms": t.bound_ms for t in self.targets}

    @classmethod
    def from_dict(cls, d: Mapping[str, Any] | None) -> Slo:
        if not d:
            return cls()
        targets = []
        for key, value in d.items():
            if not key.endswith("_ms"):
                raise ConfigError(f"SLO key {key!r} must end in _ms (e.g. ttft_p95_ms)")
            targets.append(_target(key[: -len("_ms")], float(value), key))
        return cls(targets=tuple(targets))

    def __str__(self) -> str:
        return ",".join(f"{t.name}={t.bound_ms:g}ms" for t in self.targets)


def _target(name: str, bound_ms: float, part: str) -> SloTarget:
    metric, _, stat = name.partition("_")
    if metric not in SLO_METRICS:
        raise ConfigError(
            f"--slo: unknown metric in {part!r}; use one of {', '.join(SLO_METRICS)} (e.g. ttft_p95=200ms)"
        )
    if stat not in SLO_STATS:
        raise ConfigError(f"--slo: unknown statistic in {part!r}; use one of {', '.join(SLO_STATS)}")
    if bound_ms <= 0:
        raise ConfigError(f"--slo: bound in {part!r} must be positive")
    return SloTarget(metric=metric, stat=stat, bound_ms=bound_ms)


def parse_slo(text: str | None) -> Slo:
    """Parse `ttft_p95=200ms,tpot_p95=50ms,e2e_p99=2s`. Units: us, ms, s. Raises ConfigError naming the bad part."""
    if not text or not text.strip():
        return Slo()
    targets: dict[str, SloTarget] = {}
    for raw in text.split(","):
        part = raw.strip()
        if not part:
            continue
        name, eq, value = part.partition("=")
        if not eq:
            raise ConfigError(f"--slo: {part!r} is not name=value (e.g. ttft_p95=200ms)")
        m = _ITEM.match(value.strip())
        if m is None:
            raise ConfigError(f"--slo: bad value in {part!r}; write a number and a unit, e.g. 200ms or 2s")
        unit = m["unit"]
        if unit not in _UNITS_MS:
            hint = "missing unit" if not unit else f"unknown unit {unit!r}"
            raise ConfigError(f"--slo: {hint} in {part!r}; use us, ms or s (e.g. {m['num']}ms)")
        target = _target(name.strip(), float(m["num"]) * _UNITS_MS[unit], part)
        if target.name in targets:
            raise ConfigError(f"--slo: {target.name} given twice")
        targets[target.name] = target
    return Slo(targets=tuple(targets.values()))


def request_meets(rec: RequestRecord, bounds_ms: Mapping[str, float]) -> bool:
    """Whether one request is "good": it succeeded and meets every per-request bound.

    A request with no output token fails a TTFT bound; one without a TPOT (see `metrics.tpot`) passes that bound.
    """
    if not rec.ok:
        return False
    for metric, bound in bounds_ms.items():
        value = {"ttft": metrics.ttft, "tpot": metrics.tpot, "e2e": metrics.e2e}[metric](rec)
        if value is None:
            if metric == "tpot":
                continue
            return False
        if value * 1000.0 > bound:
            return False
    return True


class TargetResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    name: str
    bound_ms: float
    value_ms: float | None
    met: bool


class Goodput(BaseModel):
    """Goodput of a load point: good requests per second, their fraction of measured requests, and point targets."""

    model_config = ConfigDict(frozen=True)

    slo: dict[str, float]
    good: int
    requests_per_s: float | None
    fraction: float | None
    targets: list[TargetResult]
    met: bool


def goodput(
    measured: Iterable[RequestRecord],
    duration_s: float | None,
    slo: Slo,
    stats_ms: Mapping[str, LatencyStats],
) -> Goodput:
    """Good requests (see `request_meets`) per second of the point's duration, and whether each target is met.

    `measured` are the point's measured requests, failed ones included (they are never good); `stats_ms` maps
    ttft/tpot/itl/e2e to the point's statistics over successful requests.
    """
    records = list(measured)
    bounds = slo.request_bounds_ms()
    good = sum(1 for r in records if request_meets(r, bounds))
    results = []
    for t in slo.targets:
        stats = stats_ms.get(t.metric)
        value = stats.get(t.stat) if stats is not None else None
        results.append(
            TargetResult(
                name=t.name,
                bound_ms=t.bound_ms,
                value_ms=value,
                met=value is not None and value <= t.bound_ms,
            )
        )
    return Goodput(
        slo=slo.to_dict(),
        good=good,
        requests_per_s=good / duration_s if duration_s else None,
        fraction=good / len(records) if records else None,
        targets=results,
        met=all(r.met for r in results),
    )
