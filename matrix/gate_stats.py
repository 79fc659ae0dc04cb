"""The statistics of `bench gate`: is the candidate worse than the baseline by more than a threshold, and is that
change more than noise? Pure functions over samples, plus the policy and the result models; no I/O.

A regression needs both (asv `compare`): the change of a value is beyond the metric's threshold, and it is
significant. Significance is judged on two levels:
- samples (always): latency metrics (`ttft`, `itl`, `tpot`, `e2e` × `mean`/`p50`/`p90`/`p95`/`p99`) on per-request
  samples (per-token for ITL) pooled over repeats, by a one-sided Mann–Whitney U (a shift of the distribution)
  and/or a percentile bootstrap confidence interval (level 1 − 2·alpha) of the statistic's candidate/baseline
  ratio lying wholly on the worse side of 1 (tail-only changes), as `GatePolicy.test` says; rates
  (`output_tokens_per_s`, ...) by a one-sided Welch t-test on the log of batch means (each repeat cut into
  `throughput_batches` equal time windows), at `alpha`;
- repeats (when both sides have `min_repeats`+ repeats): a one-sided Mann–Whitney U (exact; or Welch t on logs,
  `repeat_test`) on each repeat's value, at `repeat_alpha`. Requests within a run share the machine's state; repeats are the independent units,
  so only this level sees run-to-run noise (docs/gating.md measures how much there is).
The value compared for latency is, by default, the median over repeats of each repeat's statistic; for rates the
mean over repeats. `error_rate`: threshold on the absolute difference, one-sided Fisher's exact test.

Points match on (engine, point id, workload fingerprint); the same (engine, point) with another fingerprint is
refused (`CompareError`): those results must never be compared.
"""

from __future__ import annotations

import re
import warnings
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
    # the latency value compared: the statistic of the samples pooled over repeats, or the median over repeats of
    # each repeat's statistic (robust to one disturbed repeat; the same as pooled with a single repeat)
    aggregate: Literal["pooled", "median_of_repeats"] = "median_of_repeats"
    # with at least `min_repeats` repeats on both sides, a change must also be significant between repeats (the
    # independent units when the machine adds run-to-run noise): `repeat_test` on each repeat's value
    min_repeats: int = Field(default=4, ge=2)
    repeat_alpha: float = Field(default=0.10, gt=0, lt=0.5)
    # Mann–Whitney (exact; robust to one disturbed repeat, needs 4+ repeats a side to reach p < 0.05) or Welch t
    repeat_test: Literal["mann_whitney", "welch"] = "mann_whitney"
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
    raise ValueError(
        f"unknown gate metric {name!r}; known: {', '.join([*known, *RATE_METRICS, 'error_rate'])}"
    )


@dataclass(frozen=True)
class PointData:
    """What the gate needs of one load point of one run (all repeats)."""

    engine: str
    point: str
    workload_fingerprint: str | None
    valid: bool
    invalid_reasons: tuple[str, ...] = ()
    repeats: int = 1
    # ttft, itl, tpot, e2e: per-request (ITL: per-token) samples in seconds, one array per repeat
    latency_s: Mapping[str, tuple[npt.NDArray[np.float64], ...]] = field(default_factory=dict)
    rates: Mapping[str, float | None] = field(default_factory=dict)  # mean over repeats of each rate metric
    rate_repeats: Mapping[str, tuple[float, ...]] = field(default_factory=dict)  # one value per repeat
    rate_windows: Mapping[str, tuple[float, ...]] = field(
        default_factory=dict
    )  # per time window of each repeat
    failed: int = 0
    completed: int = 0  # measured requests that completed (ok + failed)


class MetricResult(BaseModel):
    model_config = ConfigDict(frozen=True)

    metric: str
    baseline: float | None
    candidate: float | None
    change: float | None  # relative (cand/base − 1); absolute difference for error_rate
    threshold: float  # allowed worsening: + for lower-is-better metrics, − for rates
    p_value: float | None  # the sample-level test (requests, or time windows for rates)
    p_repeats: float | None = None  # the repeat-level test (None below `min_repeats` repeats a side)
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


def _aggregate(
    pooled: npt.NDArray[np.float64], repeats: Sequence[npt.NDArray[np.float64]], stat: str, policy: GatePolicy
) -> float:
    if policy.aggregate == "pooled" or len(repeats) < 2:
        return float(_stat(pooled, stat))
    # the median over repeats of each repeat's statistic: one repeat hit by a stall of the machine moves it little
    return float(np.median([_stat(r, stat) for r in repeats if r.size]))


def _welch_log(base: Sequence[float], cand: Sequence[float], worse: Literal["less", "greater"]) -> float:
    """One-sided Welch t-test on log values: is the candidate `worse` ("greater" for latency) than the baseline?"""
    from scipy import stats

    lb = np.log(np.asarray(base, dtype=float))
    lc = np.log(np.asarray(cand, dtype=float))
    if np.ptp(lb) == 0 and np.ptp(lc) == 0:  # no spread at all: t is undefined, the difference is exact
        moved = lc[0] > lb[0] if worse == "greater" else lc[0] < lb[0]
        return 0.0 if moved else 1.0
    with (
        warnings.catch_warnings()
    ):  # near-identical values (exact server timing) make scipy warn; p is still right
        warnings.simplefilter("ignore", RuntimeWarning)
        return float(stats.ttest_ind(lc, lb, equal_var=False, alternative=worse).pvalue)


def _repeat_p(
    base: Sequence[float], cand: Sequence[float], worse: Literal["less", "greater"], policy: GatePolicy
) -> float | None:
    b = [x for x in base if x > 0]
    c = [x for x in cand if x > 0]
    if min(len(b), len(c)) < policy.min_repeats:
        return None
    if policy.repeat_test == "welch":
        return _welch_log(b, c, worse)
    from scipy import stats

    return float(stats.mannwhitneyu(c, b, alternative=worse, method="auto").pvalue)


def _significant(p: float | None, ci_beyond: bool | None, test: Test, alpha: float) -> bool:
    mw = p is not None and p < alpha
    bs = bool(ci_beyond)
    return {"mann_whitney": mw, "bootstrap": bs, "either": mw or bs, "both": mw and bs}[test]


def _insufficient(metric: str, threshold: float, nb: int, nc: int, unit: str, why: str) -> MetricResult:
    return MetricResult(
        metric=metric, baseline=None, candidate=None, change=None, threshold=threshold, p_value=None,
        test="-", n_baseline=nb, n_candidate=nc, unit=unit, verdict="insufficient", reason=why,
    )  # fmt: skip


def _per_repeat(x: Any) -> list[npt.NDArray[np.float64]]:
    """Samples given as one flat sequence (one repeat) or as a sequence of per-repeat sequences."""
    items = list(x)
    if items and np.ndim(items[0]) == 0:
        items = [items]
    arrays = [np.asarray(a, dtype=float) for a in items]
    return [a[np.isfinite(a)] for a in arrays]


def compare_latency(
    metric: str,
    baseline_s: Sequence[Any] | npt.NDArray[np.float64],
    candidate_s: Sequence[Any] | npt.NDArray[np.float64],
    threshold: float,
    policy: GatePolicy,
) -> MetricResult:
    """A lower-is-better latency statistic (`metric` like "ttft_p95") from per-request samples in seconds, given
    flat (one repeat) or per repeat. The compared value is `policy.aggregate` of the statistic; the tests run on
    the samples pooled over repeats."""
    from scipy import stats

    stat = metric.rsplit("_", 1)[1]
    b_reps, c_reps = _per_repeat(baseline_s), _per_repeat(candidate_s)
    b = np.concatenate(b_reps) if b_reps else np.zeros(0)
    c = np.concatenate(c_reps) if c_reps else np.zeros(0)
    if min(b.size, c.size) < policy.min_samples:
        why = f"fewer than {policy.min_samples} samples (baseline {b.size}, candidate {c.size})"
        return _insufficient(metric, threshold, int(b.size), int(c.size), "ms", why)
    vb, vc = _aggregate(b, b_reps, stat, policy), _aggregate(c, c_reps, stat, policy)
    if vb <= 0:
        return _insufficient(metric, threshold, int(b.size), int(c.size), "ms", "baseline value is 0")
    ratio = vc / vb
    worse = ratio >= 1.0
    alternative: Literal["less", "greater"] = "greater" if worse else "less"
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
    per_b = [float(_stat(r, stat)) for r in b_reps if r.size]
    per_c = [float(_stat(r, stat)) for r in c_reps if r.size]
    p_rep = _repeat_p(per_b, per_c, alternative, policy)
    significant = significant and (p_rep is None or p_rep < policy.repeat_alpha)
    change = ratio - 1.0
    verdict: Verdict = "ok"
    if significant and change > threshold:
        verdict = "regression"
    elif significant and -change > threshold:
        verdict = "improvement"
    reason = _reason(verdict, change, threshold, significant, policy)
    return MetricResult(
        metric=metric, baseline=vb * 1000.0, candidate=vc * 1000.0, change=change, threshold=threshold,
        p_value=p, p_repeats=p_rep, ci=(lo, hi), test=f"mann_whitney+bootstrap ({policy.test})",
        n_baseline=int(b.size),
        n_candidate=int(c.size), unit="ms", verdict=verdict, reason=reason,
    )  # fmt: skip


def compare_rate(
    metric: str,
    baseline_value: float | None,
    candidate_value: float | None,
    baseline_windows: Sequence[float],
    candidate_windows: Sequence[float],
    threshold: float,
    policy: GatePolicy,
    baseline_repeats: Sequence[float] = (),
    candidate_repeats: Sequence[float] = (),
) -> MetricResult:
    """A higher-is-better rate: the point values (means over repeats) compared; the sample-level test on the
    per-time-window values, the repeat-level test on the per-repeat values."""
    b = [float(x) for x in baseline_windows if x is not None and x > 0]
    c = [float(x) for x in candidate_windows if x is not None and x > 0]
    unit = "/s"
    if not baseline_value or not candidate_value or min(len(b), len(c)) < 2:
        why = f"needs a value and 2+ time windows per side (baseline {len(b)}, candidate {len(c)})"
        return _insufficient(metric, -threshold, len(b), len(c), unit, why)
    change = candidate_value / baseline_value - 1.0
    alternative: Literal["less", "greater"] = "less" if change <= 0 else "greater"
    p = _welch_log(b, c, alternative)
    p_rep = _repeat_p(baseline_repeats, candidate_repeats, alternative, policy)
    significant = p < policy.alpha and (p_rep is None or p_rep < policy.repeat_alpha)
    verdict: Verdict = "ok"
    if significant and -change > threshold:
        verdict = "regression"
    elif significant and change > threshold:
        verdict = "improvement"
    reason = _reason(verdict, -change, threshold, significant, policy)
    return MetricResult(
        metric=metric, baseline=baseline_value, candidate=candidate_value, change=change, threshold=-threshold,
        p_value=p, p_repeats=p_rep, test="welch_t (log; time windows, repeats)", n_baseline=len(b),
        n_candidate=len(c), unit=unit, verdict=verdict, reason=reason,
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
    verdict: Verdict,
    worse_by: float,
    threshold: float,
    significant: bool,
    policy: GatePolicy,
    absolute: bool = False,
) -> str:
    def fmt(x: float) -> str:
        return f"{x:+.4f}" if absolute else f"{x:+.1%}"

    if verdict == "regression":
        return f"worse by {fmt(worse_by)} (allowed {fmt(threshold)}), significant at alpha={policy.alpha}"
    if verdict == "improvement":
        return f"better by {fmt(-worse_by)}, significant at alpha={policy.alpha}"
    if worse_by > threshold and not significant:
        return (
            f"worse by {fmt(worse_by)} but not significant at alpha={policy.alpha}: noise cannot be ruled out"
        )
    if significant and worse_by > 0:
        return f"significantly worse by {fmt(worse_by)}, within the allowed {fmt(threshold)}"
    return "within threshold"


def window_rates(
    times: Sequence[float], amounts: Sequence[float], windows: int, start: float, end: float
) -> list[float | None]:
    """Batch means of a rate: [start, end] cut into `windows` equal spans; each span's amount (tokens at the
    time their chunk arrived, requests at completion) over the span's length. All None for an empty span."""
    if not times or end <= start:
        return [None] * windows
    edges = np.linspace(start, end, windows + 1)
    idx = np.clip(np.searchsorted(edges, np.asarray(times, dtype=float), side="right") - 1, 0, windows - 1)
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
            results.append(
                compare_latency(
                    name,
                    base.latency_s.get(metric, ()),
                    cand.latency_s.get(metric, ()),
                    rule.threshold,
                    policy,
                )
            )
        elif kind == "rate":
            results.append(
                compare_rate(
                    name,
                    base.rates.get(name),
                    cand.rates.get(name),
                    base.rate_windows.get(name, ()),
                    cand.rate_windows.get(name, ()),
                    rule.threshold,
                    policy,
                    base.rate_repeats.get(name, ()),
                    cand.rate_repeats.get(name, ()),
                )
            )
        else:
            results.append(
                compare_error_rate(
                    base.failed, base.completed, cand.failed, cand.completed, rule.threshold, policy
                )
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
        unmatched = (
            f" (baseline: {', '.join(baseline_only) or '-'}; candidate: {', '.join(candidate_only) or '-'})"
        )
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
