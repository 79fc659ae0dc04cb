"""Engine `/metrics` text -> EngineBench's canonical metrics, and the change between two scrapes.

Parsing is `prometheus_client`'s (never by hand). An adapter's `MetricMap` names the engine's series; every label
set of a series is combined (summed; `kv_cache_usage` averaged), because the numbers EngineBench compares are
per engine, not per label (`finished_reason`, `engine` index, `model_name`). Histograms keep their cumulative
buckets, sum and count, so a server-side TTFT can be set beside the client's (PITFALLS 6).

Whether a canonical metric is a gauge, a counter or a histogram comes from `adapters.base.CANONICAL_METRICS`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal

from prometheus_client.parser import text_string_to_metric_families

from adapters.base import CANONICAL_METRICS, MetricMap

__all__ = ["Histogram", "MetricKind", "Value", "delta", "kind_of", "scrape"]

MetricKind = Literal["gauge", "counter", "histogram"]


@dataclass(frozen=True, slots=True)
class Histogram:
    """A Prometheus histogram: `buckets` are (upper bound `le`, cumulative count), ascending, ending at +Inf."""

    buckets: tuple[tuple[float, float], ...]
    sum: float
    count: float

    @property
    def mean(self) -> float | None:
        return self.sum / self.count if self.count else None

    def minus(self, earlier: Histogram) -> Histogram:
        """Observations made since `earlier` (a restart that reset the counts gives this histogram whole)."""
        if self.count < earlier.count:
            return self
        before = dict(earlier.buckets)
        return Histogram(
            tuple((le, c - before.get(le, 0.0)) for le, c in self.buckets),
            self.sum - earlier.sum,
            self.count - earlier.count,
        )

    def quantile(self, q: float) -> float | None:
        """Linear interpolation within the bucket, as PromQL's `histogram_quantile`; None when empty."""
        if not self.count or not self.buckets:
            return None
        rank = q * self.count
        prev_le, prev_c = 0.0, 0.0
        for le, c in self.buckets:
            if c >= rank:
                if math.isinf(le):
                    return prev_le  # the highest finite bound is all a histogram can say
                if c == prev_c:
                    return le
                return prev_le + (le - prev_le) * (rank - prev_c) / (c - prev_c)
            prev_le, prev_c = le, c
        return prev_le


Value = float | Histogram


def kind_of(canonical: str) -> MetricKind:
    description = CANONICAL_METRICS.get(canonical, "")
    if description.startswith("histogram"):
        return "histogram"
    if description.startswith("counter"):
        return "counter"
    return "gauge"


def _canonical_for(family: str, names: Mapping[str, str]) -> tuple[str, str] | None:
    """The map key and canonical name for a parsed family (the parser strips `_total` from counters)."""
    for key in (family, f"{family}_total"):
        if key in names:
            return key, names[key]
    return None


def _histogram(samples: list[tuple[str, dict[str, str], float]], family: str) -> Histogram:
    buckets: dict[float, float] = defaultdict(float)
    total = count = 0.0
    for name, labels, value in samples:
        if name == f"{family}_bucket":
            buckets[float(labels["le"])] += value
        elif name == f"{family}_sum":
            total += value
        elif name == f"{family}_count":
            count += value
    return Histogram(tuple(sorted(buckets.items())), total, count)


def scrape(text: str, metric_map: MetricMap) -> dict[str, Value]:
    """Canonical name -> value (gauges, counters) or `Histogram`, for every mapped series present in `text`.

    When several engine names map to one canonical name (names that changed across engine versions), the first
    one in the map that is present wins."""
    found: dict[str, tuple[int, Value]] = {}
    order = {key: i for i, key in enumerate(metric_map.names)}
    for fam in text_string_to_metric_families(text):
        hit = _canonical_for(fam.name, metric_map.names)
        if hit is None:
            continue
        key, canonical = hit
        samples = [(s.name, dict(s.labels), float(s.value)) for s in fam.samples]
        value: Value
        if fam.type == "histogram":
            value = _histogram(samples, fam.name)
        else:
            wanted = f"{fam.name}_total" if fam.type == "counter" else fam.name
            values = [v for n, _, v in samples if n == wanted or (n == fam.name and fam.type != "counter")]
            if not values:
                continue
            agg = sum(values) / len(values) if canonical == "kv_cache_usage" else sum(values)
            value = agg * metric_map.scale.get(canonical, 1.0)
        rank = order[key]
        if canonical not in found or rank < found[canonical][0]:
            found[canonical] = (rank, value)
    out = {name: v for name, (_, v) in found.items()}
    for canonical, addends in metric_map.plus.items():
        base = out.get(canonical)
        if isinstance(base, float):
            out[canonical] = base + sum(v for a in addends if isinstance(v := out.get(a), float))
    return out


def delta(before: Mapping[str, Value], after: Mapping[str, Value]) -> dict[str, Value]:
    """What happened between two scrapes: counters and histograms subtract (a reset counts from zero), gauges
    keep their later value. Names missing from `before` count from zero; names missing from `after` are dropped."""
    out: dict[str, Value] = {}
    for name, now in after.items():
        then = before.get(name)
        if isinstance(now, Histogram):
            out[name] = now.minus(then) if isinstance(then, Histogram) else now
        elif kind_of(name) == "counter" and isinstance(then, float | int) and now >= then:
            out[name] = now - then
        else:
            out[name] = now
    return out
