"""The statistics of `bench gate`: is the candidate worse than the baseline by more than a threshold, and is that
change more than noise? Pure functions over samples, plus the policy and the result models; no I/O.

A regression needs both (asv `compare`): the change of a statistic is beyond the metric's threshold, and it is
significant at `alpha`.
- Latency metrics (`ttft`, `itl`, `tpot`, `e2e` × `mean`/`p50`/`p90`/`p95`/`p99`): per-request samples (per-token for
  ITL), pooled over repeats. Significance: one-sided Mann–Whitney U (a shift of the whole distribution) and/or a
  percentile bootstrap confidence interval (level 1 − 2·alpha) of the statistic's candidate/baseline ratio lying
  wholly on the worse side of 1 (catches tail-only changes). `GatePolicy.test` says which must hold.
- Rate metrics (`output_tokens_per_s`, ...): one value per repeat; with fewer than two repeats on a side, the repeat
  is cut into `throughput_batches` equal time windows (batch means). Significance: one-sided Welch t-test on the
  log values.
- `error_rate`: threshold on the absolute difference; significance by one-sided Fisher's exact test.

Points match on (engine, point id, workload fingerprint); the same (engine, point) with another fingerprint is
refused (`CompareError`): those results must never be compared.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, ConfigDict, Field, field_validator

from harness.errors import CompareError

__all__ = [
    "GATE_SCHEMA_VERSION",
    "LATENCY_METRICS",
    "LATENCY_STATS",
    "RATE_METRICS",
    "GatePolicy",
    "GateReport",
    "MetricResult",
    "MetricRule",
    "PointData",
    "PointResult",
    "compare_error_rate",
    "compare_latency",
    "compare_point",
    "compare_points",
    "compare_rate",
    "metric_kind",
    "window_rates",
]

GATE_SCHEMA_VERSION = 1
LATENCY_METRICS = ("ttft", "itl", "tpot", "e2e")
LATENCY_STATS = ("mean", "p50", "p90", "p95", "p99")
RATE_METRICS = ("output_tokens_per_s", "total_tokens_per_s", "input_tokens_per_s", "requests_per_s")
Verdict = Literal["regression", "improvement", "ok", "insufficient"]
Test = Literal["mann_whitney", "bootstrap", "either", "both"]
_LATENCY_RE = re.compile(rf"^({'|'.join(LATENCY_METRICS)})_({'|'.join(LATENCY_STATS)})$")


class MetricRule(BaseModel):
    """How much worse a metric may get: a fraction of the baseline (0.10 = 10 %), absolute for `error_rate`."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    threshold: float = Field(gt=0)
    enabled: bool = True


def _default_metrics() -> dict[str, MetricRule]:
    return {
        "ttft_p95": MetricRule(threshold=0.10),
        "tpot_p50": MetricRule(threshold=0.10),
        "e2e_p95": MetricRule(threshold=0.10),
        "output_tokens_per_s": MetricRule(threshold=0.05),
        "error_rate": MetricRule(threshold=0.01),
    }


class GatePolicy(BaseModel):
    """Thresholds and tests of the gate. A policy file's `metrics` are merged over the defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    alpha: float = Field(default=0.01, gt=0, lt=0.5)
    test: Test = "either"
    bootstrap_resamples: int = Field(default=2000, ge=100)
    min_samples: int = Field(default=20, ge=2)
    throughput_batches: int = Field(default=5, ge=2)
    seed: int = 0
    metrics: dict[str, MetricRule] = Field(default_factory=_default_metrics)
    # VerdictPolicy fields used to judge each point's validity (None: the policy in the run's summary.json)
    verdict: dict[str, Any] | None = None

    @field_validator("metrics", mode="before")
    @classmethod
    def _merge_defaults(cls, value: Any) -> Any:
        if not isinstance(value, Mapping):
            return value
        merged: dict[str, Any] = dict(_default_metrics())
        for name, rule in value.items():
            if rule is None or rule is False:
                rule = {"threshold": 1.0, "enabled": False}
            elif isinstance(rule, int | float) and not isinstance(rule, bool):
                rule = {"threshold": rule}
            merged[str(name)] = rule
        for name in merged:
            metric_kind(name)
        return merged

    def enabled(self) -> list[tuple[str, MetricRule]]:
        return [(name, rule) for name, rule in self.metrics.items() if rule.enabled]


def metric_kind(name: str) -> Literal["latency", "rate", "error_rate"]:
    if _LATENCY_RE.match(name):
        return "latency"
    if name in RATE_METRICS:
        return "rate"
    if name == "error_rate":
        return "error_rate"
    known = [f"{m}_{{{','.join(LATENCY_STATS)}}}" for m in LATENCY_METRICS]
    raise ValueError(f"unknown gate metric {name!r}; known: {', '.join([*known, *RATE_METRICS, 'error_rate'])}")


@dataclass(frozen=True)
class PointData:
    """What the gate needs of one load point of one run (all repeats)."""

    engine: str
    point: str
    workload_fingerprint: str | None
    valid: bool
    invalid_reasons: tuple[str, ...] = ()
    repeats: int = 1
    latency_s: Mapping[str, npt.NDArray[np.float64]] = field(default_factory=dict)  # ttft, itl, tpot, e2e
    rates: Mapping[str, float | None] = field(default_factory=dict)  # mean over repeats of each rate metric
    rate_repeats: Mapping[str, tuple[float, ...]] = field(default_factory=dict)  # one value per repeat
    rate_windows: Mapping[str, tuple[float, ...]] = field(default_factory=dict)  # per time window of each repeat
    failed: int = 0
    completed: int = 0  # measured requests that completed (ok + failed)


class MetricResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    metric: str
    baseline: float | None
    candidate: float | None
    change: float | None  # relative (cand/base − 1); absolute difference for error_rate
    threshold: float  # allowed worsening: + for lower-is-better metrics, − for rates
    p_value: float | None
    ci: tuple[float, float] | None = None  # bootstrap CI of the cand/base ratio (latency)
    test: str
    n_baseline: int
    n_candidate: int
    unit: str
    verdict: Verdict
    reason: str = ""


class PointResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    engine: str
    point: str
    workload_fingerprint: str | None
    baseline_repeats: int
    candidate_repeats: int
    candidate_valid: bool
    candidate_invalid_reasons: list[str] = Field(default_factory=list)
    metrics: list[MetricResult]
    status: Literal["pass", "regression", "invalid"]


class GateReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    schema_version: int = GATE_SCHEMA_VERSION
    kind: Literal["gate"] = "gate"
    status: Literal["pass", "regression", "error"]
    exit_code: int
    reason: str = ""  # why the gate could not compare (status "error")
    baseline: dict[str, Any] = Field(default_factory=dict)  # path, run_id, git_sha, ...
    candidate: dict[str, Any] = Field(default_factory=dict)
    policy: GatePolicy = Field(default_factory=GatePolicy)
    points: list[PointResult] = Field(default_factory=list)
    baseline_only: list[str] = Field(default_factory=list)  # "engine point" with no candidate match
    candidate_only: list[str] = Field(default_factory=list)
    skipped: list[str] = Field(default_factory=list)  # matched but not compared, with the reason
    notes: list[str] = Field(default_factory=list)


# ----------------------------------------------------------------------------------------------- statistics


def _stat(x: npt.NDArray[np.float64], stat: str, axis: int = -1) -> Any:
    if stat == "mean":
        return np.mean(x, axis=axis)
    return np.percentile(x, float(stat[1:]), axis=axis, method="linear")


def _significant(p: float | None, ci_beyond: bool | None, test: Test, alpha: float) -> bool:
    mw = p is not None and p < alpha
    bs = bool(ci_beyond)
    return {"mann_whitney": mw, "bootstrap": bs, "either": mw or bs, "both": mw and bs}[test]


def _insufficient(metric: str, threshold: float, nb: int, nc: int, unit: str, why: str) -> MetricResult:
    return MetricResult(
        metric=metric, baseline=None, candidate=None, change=None, threshold=threshold, p_value=None,
        test="-", n_baseline=nb, n_candidate=nc, unit=unit, verdict="insufficient", reason=why,
    )  # fmt: skip


def compare_latency(
    metric: str,
    baseline_s: Sequence[float] | npt.NDArray[np.float64],
    candidate_s: Sequence[float] | npt.NDArray[np.float64],
    threshold: float,
    policy: GatePolicy,
) -> MetricResult:
    """A lower-is-better latency statistic (`metric` like "ttft_p95") from per-request samples in seconds."""
    from scipy import stats

    stat = metric.rsplit("_", 1)[1]
    b = np.asarray(baseline_s, dtype=float)
    c = np.asarray(candidate_s, dtype=float)
    b, c = b[np.isfinite(b)], c[np.isfinite(c)]
    if min(b.size, c.size) < policy.min_samples:
        why = f"fewer than {policy.min_samples} samples (baseline {b.size}, candidate {c.size})"
        return _insufficient(metric, threshold, int(b.size), int(c.size), "ms", why)
    vb, vc = float(_stat(b, stat)), float(_stat(c, stat))
    if vb <= 0:
        return _insufficient(metric, threshold, int(b.size), int(c.size), "ms", "baseline value is 0")
    ratio = vc / vb
    worse = ratio >= 1.0
    alternative = "greater" if worse else "less"
    p = float(stats.mannwhitneyu(c, b, alternative=alternative).pvalue)

    def ratio_stat(x: Any, y: Any, axis: int = -1) -> Any:
        return _stat(y, stat, axis) / _stat(x, stat, axis)

    res = stats.bootstrap(
        (b, c),
        ratio_stat,
        n_resamples=policy.bootstrap_resamples,
        confidence_level=1.0 - 2.0 * policy.alpha,
        method="percentile",
        vectorized=True,
        batch=max(1, min(policy.bootstrap_resamples, 20_000_000 // (b.size + c.size))),
        rng=np.random.default_rng(policy.seed),
    )
    lo, hi = float(res.confidence_interval.low), float(res.confidence_interval.high)
    beyond_ci = lo > 1.0 if worse else hi < 1.0
    significant = _significant(p, beyond_ci, policy.test, policy.alpha)
    change = ratio - 1.0
    verdict: Verdict = "ok"
    if significant and change > threshold:
        verdict = "regression"
    elif significant and -change > threshold:
        verdict = "improvement"
    reason = _reason(verdict, change, threshold, significant, policy)
    return MetricResult(
        metric=metric, baseline=vb * 1000.0, candidate=vc * 1000.0, change=change, threshold=threshold,
        p_value=p, ci=(lo, hi), test=f"mann_whitney+bootstrap ({policy.test})", n_baseline=int(b.size),
        n_candidate=int(c.size), unit="ms", verdict=verdict, reason=reason,
    )  # fmt: skip


def compare_rate(
    metric: str,
    baseline_value: float | None,
    candidate_value: float | None,
    baseline_samples: Sequence[float],
    candidate_samples: Sequence[float],
    threshold: float,
    policy: GatePolicy,
    method: str = "repeats",
) -> MetricResult:
    """A higher-is-better rate: the point values compared, per-repeat (or per-window) values tested."""
    from scipy import stats

    b = np.asarray([x for x in baseline_samples if x is not None and x > 0], dtype=float)
    c = np.asarray([x for x in candidate_samples if x is not None and x > 0], dtype=float)
    unit = "/s"
    if not baseline_value or not candidate_value or b.size < 2 or c.size < 2:
        why = f"needs a value and 2+ {method} per side (baseline {b.size}, candidate {c.size})"
        return _insufficient(metric, -threshold, int(b.size), int(c.size), unit, why)
    change = candidate_value / baseline_value - 1.0
    alternative = "less" if change <= 0 else "greater"
    lb, lc = np.log(b), np.log(c)
    if np.ptp(lb) == 0 and np.ptp(lc) == 0:  # no spread at all: the t statistic is undefined
        p = 0.0 if lb[0] != lc[0] else 1.0
    else:
        p = float(stats.ttest_ind(lc, lb, equal_var=False, alternative=alternative).pvalue)
    significant = p < policy.alpha
    verdict: Verdict = "ok"
    if significant and -change > threshold:
        verdict = "regression"
    elif significant and change > threshold:
        verdict = "improvement"
    reason = _reason(verdict, -change, threshold, significant, policy)
    return MetricResult(
        metric=metric, baseline=baseline_value, candidate=candidate_value, change=change, threshold=-threshold,
        p_value=p, test=f"welch_t (log, {method})", n_baseline=int(b.size), n_candidate=int(c.size),
        unit=unit, verdict=verdict, reason=reason,
    )  # fmt: skip


def compare_error_rate(
    baseline_failed: int,
    baseline_completed: int,
    candidate_failed: int,
    candidate_completed: int,
    threshold: float,
    policy: GatePolicy,
) -> MetricResult:
    """Absolute increase of the failed fraction; one-sided Fisher's exact test on the 2×2 table."""
    from scipy import stats

    if baseline_completed == 0 or candidate_completed == 0:
        why = "no completed requests on one side"
        return _insufficient("error_rate", threshold, baseline_completed, candidate_completed, "", why)
    rb = baseline_failed / baseline_completed
    rc = candidate_failed / candidate_completed
    table = [
        [candidate_failed, candidate_completed - candidate_failed],
        [baseline_failed, baseline_completed - baseline_failed],
    ]
    p = float(stats.fisher_exact(table, alternative="greater" if rc >= rb else "less").pvalue)
    change = rc - rb
    significant = p < policy.alpha
    verdict: Verdict = "ok"
    if significant and change > threshold:
        verdict = "regression"
    elif significant and -change > threshold:
        verdict = "improvement"
    reason = _reason(verdict, change, threshold, significant, policy, absolute=True)
    return MetricResult(
        metric="error_rate", baseline=rb, candidate=rc, change=change, threshold=threshold, p_value=p,
        test="fisher_exact", n_baseline=baseline_completed, n_candidate=candidate_completed, unit="",
        verdict=verdict, reason=reason,
    )  # fmt: skip


def _reason(
    verdict: Verdict, worse_by: float, threshold: float, significant: bool, policy: GatePolicy, absolute: bool = False
) -> str:
    def fmt(x: float) -> str:
        return f"{x:+.4f}" if absolute else f"{x:+.1%}"

    if verdict == "regression":
        return f"worse by {fmt(worse_by)} (allowed {fmt(threshold)}), significant at alpha={policy.alpha}"
    if verdict == "improvement":
        return f"better by {fmt(-worse_by)}, significant at alpha={policy.alpha}"
    if worse_by > threshold and not significant:
        return f"worse by {fmt(worse_by)} but not significant at alpha={policy.alpha}: noise cannot be ruled out"
    if significant and worse_by > 0:
        return f"significantly worse by {fmt(worse_by)}, within the allowed {fmt(threshold)}"
    return "within threshold"


def window_rates(
    start: float, done: Sequence[float], amounts: Sequence[float], windows: int
) -> list[float | None]:
    """Batch means of a rate: [start, last done] cut into `windows` equal spans, each span's amount (tokens or
    requests, counted at completion) over its length. None for a window when the span is empty."""
    if not done:
        return [None] * windows
    end = max(done)
    if end <= start:
        return [None] * windows
    edges = np.linspace(start, end, windows + 1)
    idx = np.clip(np.searchsorted(edges, np.asarray(done, dtype=float), side="left") - 1, 0, windows - 1)
    totals = np.bincount(idx, weights=np.asarray(amounts, dtype=float), minlength=windows)
    width = (end - start) / windows
    return [float(t / width) for t in totals]


# ----------------------------------------------------------------------------------------------- matching


def _key(p: PointData) -> tuple[str, str]:
    return p.engine, p.point


def compare_point(base: PointData, cand: PointData, policy: GatePolicy) -> PointResult:
    results: list[MetricResult] = []
    for name, rule in policy.enabled():
        kind = metric_kind(name)
        if kind == "latency":
            metric = name.rsplit("_", 1)[0]
            empty = np.zeros(0)
            results.append(
                compare_latency(
                    name, base.latency_s.get(metric, empty), cand.latency_s.get(metric, empty), rule.threshold, policy
                )
            )
        elif kind == "rate":
            # per-repeat values when both sides have 2+ repeats; else batch means over time windows
            use_repeats = min(base.repeats, cand.repeats) >= 2
            pick = (lambda d: d.rate_repeats) if use_repeats else (lambda d: d.rate_windows)
            results.append(
                compare_rate(
                    name,
                    base.rates.get(name),
                    cand.rates.get(name),
                    pick(base).get(name, ()),
                    pick(cand).get(name, ()),
                    rule.threshold,
                    policy,
                    "repeats" if use_repeats else "windows",
                )
            )
        else:
            results.append(
                compare_error_rate(base.failed, base.completed, cand.failed, cand.completed, rule.threshold, policy)
            )
    regressed = any(r.verdict == "regression" for r in results)
    status: Literal["pass", "regression", "invalid"] = (
        "invalid" if not cand.valid else "regression" if regressed else "pass"
    )
    return PointResult(
        engine=cand.engine,
        point=cand.point,
        workload_fingerprint=cand.workload_fingerprint,
        baseline_repeats=base.repeats,
        candidate_repeats=cand.repeats,
        candidate_valid=cand.valid,
        candidate_invalid_reasons=list(cand.invalid_reasons),
        metrics=results,
        status=status,
    )


def compare_points(
    baseline: Sequence[PointData],
    candidate: Sequence[PointData],
    policy: GatePolicy,
    *,
    baseline_info: Mapping[str, Any] | None = None,
    candidate_info: Mapping[str, Any] | None = None,
) -> GateReport:
    """Match points and compare each; `CompareError` for a fingerprint mismatch or when nothing matches."""
    base = {_key(p): p for p in baseline}
    cand = {_key(p): p for p in candidate}
    for key in base.keys() & cand.keys():
        fb, fc = base[key].workload_fingerprint, cand[key].workload_fingerprint
        if fb != fc:
            raise CompareError(
                f"{key[0]} {key[1]}: workload fingerprints differ (baseline {fb}, candidate {fc}); "
                "run both with the same workload, --set overrides and --seed"
            )
    matched = [k for k in base if k in cand]
    baseline_only = [f"{e} {p}" for e, p in base if (e, p) not in cand]
    candidate_only = [f"{e} {p}" for e, p in cand if (e, p) not in base]
    skipped: list[str] = []
    points: list[PointResult] = []
    for key in matched:
        b = base[key]
        if not b.valid:
            skipped.append(f"{key[0]} {key[1]}: baseline point is INVALID ({'; '.join(b.invalid_reasons)})")
            continue
        points.append(compare_point(b, cand[key], policy))
    if not points:
        why = "; ".join(skipped) if skipped else "no load point of the candidate matches the baseline"
        unmatched = f" (baseline: {', '.join(baseline_only) or '-'}; candidate: {', '.join(candidate_only) or '-'})"
        raise CompareError(f"nothing to compare: {why}{unmatched if not skipped else ''}")
    failed = any(p.status != "pass" for p in points)
    return GateReport(
        status="regression" if failed else "pass",
        exit_code=1 if failed else 0,
        baseline=dict(baseline_info or {}),
        candidate=dict(candidate_info or {}),
        policy=policy,
        points=points,
        baseline_only=baseline_only,
        candidate_only=candidate_only,
        skipped=skipped,
        notes=[],
    )
