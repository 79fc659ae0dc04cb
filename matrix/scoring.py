"""Scores 1–5 per criterion by stated rules, weighted totals with missing data renormalized, and the ranking.

Rules (also in docs/decision.md):
- `ratio` (measured criteria): r = value / best for higher-is-better, best / value for lower-is-better, where best is
  the best value any engine measured; r ≥ 0.90 → 5, ≥ 0.75 → 4, ≥ 0.50 → 3, ≥ 0.25 → 2, else 1.
- `error_rate` (absolute bands): ≤ 0.1 % → 5, ≤ 1 % → 4, ≤ 2 % → 3, ≤ 5 % → 2, else 1.
- `knowledge` (qualitative criteria): the 1–5 score in the knowledge file, with its source and date.
A missing raw value has score None: it is left out of the weighted sum, the remaining weights are renormalized, and
the engine is flagged. It is never scored as zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from harness.errors import ConfigError
from matrix.criteria import CRITERIA, CRITERION_NAMES, RawValue

__all__ = [
    "RATIO_BANDS",
    "RULES",
    "CriterionScore",
    "EngineScore",
    "normalize_weights",
    "score_all",
    "score_value",
    "weighted_total",
]

RATIO_BANDS: tuple[tuple[float, int], ...] = ((0.90, 5), (0.75, 4), (0.50, 3), (0.25, 2))
ERROR_BANDS: tuple[tuple[float, int], ...] = ((0.001, 5), (0.01, 4), (0.02, 3), (0.05, 2))
RULES: dict[str, str] = {
    "ratio": "ratio to the best engine measured (value/best, or best/value when lower is better): "
    "≥0.90→5, ≥0.75→4, ≥0.50→3, ≥0.25→2, else 1",
    "error_rate": "absolute: ≤0.1%→5, ≤1%→4, ≤2%→3, ≤5%→2, else 1",
    "knowledge": "1–5 from the knowledge file entry (source and date given)",
}


@dataclass(frozen=True, slots=True)
class CriterionScore:
    criterion: str
    raw: float | None
    unit: str
    score: int | None
    rule: str
    note: str = ""
    source: str = ""
    date: str = ""


@dataclass(frozen=True, slots=True)
class EngineScore:
    engine: str
    scores: Mapping[str, CriterionScore]
    total: float | None
    missing: tuple[str, ...]  # criteria with weight > 0 and no data
    weight_used: float  # share of the total weight that had data (1.0 = nothing missing)


def _ratio_score(ratio: float) -> int:
    for bound, score in RATIO_BANDS:
        if ratio >= bound:
            return score
    return 1


def score_value(criterion: str, value: float | None, best: float | None) -> tuple[int | None, str]:
    """The score of one raw value and the rule key used."""
    spec = next(c for c in CRITERIA if c.name == criterion)
    if spec.kind == "qualitative":
        return (None if value is None else round(value)), "knowledge"
    if criterion == "error_rate":
        if value is None:
            return None, "error_rate"
        for bound, score in ERROR_BANDS:
            if value <= bound:
                return score, "error_rate"
        return 1, "error_rate"
    if value is None or best is None:
        return None, "ratio"
    if spec.direction == "higher":
        ratio = value / best if best > 0 else 1.0
    else:
        ratio = best / value if value > 0 else 1.0
    return _ratio_score(ratio), "ratio"


def normalize_weights(weights: Mapping[str, float], origin: str = "weights") -> dict[str, float]:
    """Every criterion's weight, summing to 1. Unknown criteria and negative or all-zero weights are errors."""
    unknown = sorted(set(weights) - set(CRITERION_NAMES))
    if unknown:
        raise ConfigError(
            f"{origin}: unknown criterion {unknown[0]!r}; known criteria: {', '.join(CRITERION_NAMES)}"
        )
    for name, w in weights.items():
        if not isinstance(w, int | float) or isinstance(w, bool) or w < 0:
            raise ConfigError(f"{origin}: weight of {name} must be a number ≥ 0, got {w!r}")
    total = float(sum(weights.values()))
    if total <= 0:
        raise ConfigError(f"{origin}: all weights are zero; give at least one criterion a positive weight")
    return {c: float(weights.get(c, 0.0)) / total for c in CRITERION_NAMES}


def weighted_total(
    scores: Mapping[str, int | None], weights: Mapping[str, float]
) -> tuple[float | None, float]:
    """(Σ w·s / Σ w over criteria with a score, Σ w over those criteria)."""
    num = sum(weights.get(c, 0.0) * s for c, s in scores.items() if s is not None)
    den = sum(weights.get(c, 0.0) for c, s in scores.items() if s is not None)
    return (num / den if den > 0 else None), den


def score_all(raw: Mapping[str, Mapping[str, RawValue]], weights: Mapping[str, float]) -> list[EngineScore]:
    """Score every engine; ranked best first (engines with no usable data last)."""
    engines = sorted({e for per in raw.values() for e in per})
    best: dict[str, float | None] = {}
    for spec in CRITERIA:
        values = [v.value for v in raw.get(spec.name, {}).values() if v.value is not None]
        best[spec.name] = (max(values) if spec.direction == "higher" else min(values)) if values else None
    total_weight = sum(weights.values()) or 1.0
    results: list[EngineScore] = []
    for engine in engines:
        per: dict[str, CriterionScore] = {}
        for spec in CRITERIA:
            rv = raw.get(spec.name, {}).get(engine, RawValue(None, "not measured"))
            score, rule = score_value(spec.name, rv.value, best[spec.name])
            per[spec.name] = CriterionScore(
                spec.name, rv.value, spec.unit, score, RULES[rule], rv.note, rv.source, rv.date
            )
        total, used = weighted_total({c: s.score for c, s in per.items()}, weights)
        missing = tuple(c for c, s in per.items() if s.score is None and weights.get(c, 0.0) > 0)
        results.append(EngineScore(engine, per, total, missing, used / total_weight))
    results.sort(key=lambda r: (r.total is None, -(r.total or 0.0), r.engine))
    return results
