"""`bench gate`: read a baseline and a candidate run directory, compare their matching load points, write the
verdict as Markdown (CI job summary), JUnit XML and JSON. Exit 0 pass, 1 regression, 2 could not compare.

This module owns the I/O and the extraction of per-request samples from records (`harness.metrics` definitions);
the statistics are `matrix.gate_stats`, the rendering `reports.gate`. How to read the verdict: docs/gating.md.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from harness import metrics
from harness.errors import BenchError, CompareError, ConfigError
from harness.records import RequestRecord, latest_attempts
from harness.rundir import Manifest, RunDir
from harness.slo import Slo
from harness.summary import PointSummary, point_meta, summarize_point
from harness.verdict import VerdictPolicy
from matrix.gate_stats import RATE_METRICS, GatePolicy, GateReport, PointData, compare_points, window_rates

__all__ = ["GateConfig", "load_gate_policy", "load_points", "point_data", "run_gate", "write_outputs"]


@dataclass(frozen=True)
class GateConfig:
    baseline: Path
    candidate: Path
    policy: Path | None = None
    markdown: Path | None = None
    junit: Path | None = None
    json: Path | None = None


def load_gate_policy(path: Path | None) -> GatePolicy:
    """The gate policy from a YAML (or JSON) file; defaults when `path` is None. Unknown keys are refused."""
    if path is None:
        return GatePolicy()
    import yaml
    from pydantic import ValidationError

    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(
            f"cannot read gate policy {path}: {e}; pass a YAML file (see docs/gating.md)"
        ) from None
    if not isinstance(data, dict):
        raise ConfigError(f"gate policy {path} must be a mapping of settings (see docs/gating.md)")
    try:
        policy = GatePolicy.model_validate(data)
        if policy.verdict is not None:
            VerdictPolicy.model_validate(policy.verdict)
    except (ValidationError, ValueError) as e:
        errors = getattr(e, "errors", None)
        if callable(errors):
            first = errors()[0]
            where = ".".join(str(x) for x in first["loc"])
            raise ConfigError(f"gate policy {path}: {where}: {first['msg']} (see docs/gating.md)") from None
        raise ConfigError(f"gate policy {path}: {e}") from None
    return policy


# ----------------------------------------------------------------------------------------------- reading


def _verdict_policy(rd: RunDir, policy: GatePolicy) -> VerdictPolicy:
    if policy.verdict is not None:
        return VerdictPolicy.model_validate(policy.verdict)
    if (rd.path / "summary.json").exists():
        return rd.load_summary().policy
    return VerdictPolicy()


def _input_tokens(rec: RequestRecord) -> int:
    if rec.prompt_tokens is not None:
        return rec.prompt_tokens
    return rec.expected_input_tokens or 0


def _windows(recs: Sequence[RequestRecord], batches: int) -> dict[str, list[float | None]]:
    """Rates per time window of one repeat: output tokens counted when their chunk arrived (scaled to the
    request's output-token count), input tokens at the first chunk, requests at completion."""
    measured = [r for r in recs if r.phase == "measure"]
    ok = [r for r in measured if r.ok and r.done is not None]
    if not ok:
        return {m: [] for m in RATE_METRICS}
    start = min(r.scheduled for r in measured)
    end = max(float(r.done) for r in ok if r.done is not None)
    out_t: list[float] = []
    out_n: list[float] = []
    in_t: list[float] = []
    in_n: list[float] = []
    for r in ok:
        total = metrics.output_tokens(r).value
        seen = sum(r.chunk_tokens[: len(r.chunk_times)]) or len(r.chunk_times)
        for i, t in enumerate(r.chunk_times):
            k = r.chunk_tokens[i] if i < len(r.chunk_tokens) else 1
            out_t.append(t)
            out_n.append(total * k / seen if seen else 0.0)
        in_t.append(r.chunk_times[0] if r.chunk_times else float(r.done or start))
        in_n.append(float(_input_tokens(r)))
    done = [float(r.done) for r in ok if r.done is not None]
    out = window_rates(out_t, out_n, batches, start, end)
    inp = window_rates(in_t, in_n, batches, start, end)
    return {
        "output_tokens_per_s": out,
        "input_tokens_per_s": inp,
        "total_tokens_per_s": [
            None if a is None or b is None else a + b for a, b in zip(out, inp, strict=True)
        ],
        "requests_per_s": window_rates(done, [1.0] * len(done), batches, start, end),
    }


def _samples(values: Iterable[float | None]) -> np.ndarray:
    return np.asarray([v for v in values if v is not None], dtype=float)


def point_data(
    recs: Sequence[RequestRecord],
    manifest: Manifest | None,
    events: Sequence[Mapping[str, Any]],
    slo: Slo,
    verdict_policy: VerdictPolicy,
    batches: int,
) -> tuple[PointData, PointSummary]:
    """One point of one run (all its repeats): validity, per-request samples, per-repeat and per-window rates."""
    engine, point = recs[0].engine, recs[0].point
    meta = point_meta(manifest, engine, point, events)
    pooled = summarize_point(recs, meta, events, slo=slo, policy=verdict_policy)
    by_repeat: dict[str, list[RequestRecord]] = {}
    for r in recs:
        by_repeat.setdefault(r.tags.get("repeat", "1"), []).append(r)
    per_repeat = [
        summarize_point(sub, meta, (), slo=slo, policy=verdict_policy) for sub in by_repeat.values()
    ]
    rate_repeats: dict[str, tuple[float, ...]] = {}
    rates: dict[str, float | None] = {}
    for m in RATE_METRICS:
        values = [v for v in (getattr(s, m) for s in per_repeat) if v is not None]
        rate_repeats[m] = tuple(float(v) for v in values)
        rates[m] = float(np.mean(values)) if values else None
    rate_windows: dict[str, list[float]] = {m: [] for m in RATE_METRICS}
    for sub in by_repeat.values():
        for m, vals in _windows(sub, batches).items():
            rate_windows[m].extend(v for v in vals if v is not None)
    ok_by_repeat = [[r for r in sub if r.phase == "measure" and r.ok] for sub in by_repeat.values()]
    cancelled = pooled.errors.get("cancelled", 0)
    data = PointData(
        engine=engine,
        point=point,
        workload_fingerprint=pooled.workload_fingerprint,
        valid=pooled.verdict.status == "VALID",
        invalid_reasons=tuple(r.message for r in pooled.verdict.reasons),
        repeats=len(by_repeat),
        latency_s={
            "ttft": tuple(_samples(metrics.ttft(r) for r in ok) for ok in ok_by_repeat),
            "tpot": tuple(_samples(metrics.tpot(r) for r in ok) for ok in ok_by_repeat),
            "e2e": tuple(_samples(metrics.e2e(r) for r in ok) for ok in ok_by_repeat),
            "itl": tuple(_samples(s for r in ok for s in metrics.itl_samples(r)) for ok in ok_by_repeat),
        },
        rates=rates,
        rate_repeats=rate_repeats,
        rate_windows={m: tuple(v) for m, v in rate_windows.items()},
        failed=pooled.requests.failed - cancelled,
        completed=pooled.checks.measured,
    )
    return data, pooled


def load_points(path: Path | str, policy: GatePolicy) -> tuple[list[PointData], dict[str, Any]]:
    """Every load point of a run directory, and a description of the run (path, run id, git sha, engines)."""
    rd = RunDir.open(path)
    manifest = rd.load_manifest() if rd.has_manifest() else None
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        records = list(rd.iter_records())
        events = list(rd.iter_events())
    if not records:
        raise CompareError(f"{rd.path} has no request records; pass a run directory written by `bench run`")
    records, _ = latest_attempts(records)  # as the summary counts them
    slo = Slo.from_dict(manifest.slo) if manifest else Slo()
    vpolicy = _verdict_policy(rd, policy)
    groups: dict[tuple[str, str], list[RequestRecord]] = {}
    for r in records:
        groups.setdefault((r.engine, r.point), []).append(r)
    points = [
        point_data(recs, manifest, events, slo, vpolicy, policy.throughput_batches)[0]
        for recs in groups.values()
    ]
    info: dict[str, Any] = {"path": str(rd.path), "run_id": manifest.run_id if manifest else rd.path.name}
    if manifest is not None:
        info |= {
            "status": manifest.status,
            "started_at": manifest.started_at,
            "git_sha": manifest.git_sha,
            "harness_version": manifest.harness_version,
            "workload": manifest.workload.get("name"),
            "engines": [
                {k: e.get(k) for k in ("name", "version", "model", "endpoint")} for e in manifest.engines
            ],
        }
    info["notes"] = [str(w.message) for w in caught]
    return points, info


# ----------------------------------------------------------------------------------------------- writing


def write_outputs(report: GateReport, cfg: GateConfig) -> None:
    from reports.gate import render_json, render_junit, render_markdown

    doc = report.model_dump(mode="json")
    for path, render in ((cfg.markdown, render_markdown), (cfg.junit, render_junit), (cfg.json, render_json)):
        if path is None:
            continue
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            Path(path).write_text(render(doc))
        except OSError as e:
            raise ConfigError(f"cannot write {path}: {e.strerror}; check the path") from None


def run_gate(cfg: GateConfig) -> GateReport:
    """Compare and write the outputs. A run that cannot be compared still gets its outputs (status "error",
    exit_code 2, the reason) before the `CompareError` is raised on to the caller."""
    policy = load_gate_policy(cfg.policy)
    try:
        base_points, base_info = load_points(cfg.baseline, policy)
        cand_points, cand_info = load_points(cfg.candidate, policy)
        report = compare_points(
            base_points, cand_points, policy, baseline_info=base_info, candidate_info=cand_info
        )
    except BenchError as e:  # not comparable, not a run directory, unreadable schema: all "could not compare"
        failed = GateReport(
            status="error",
            exit_code=2,
            reason=str(e),
            baseline={"path": str(cfg.baseline)},
            candidate={"path": str(cfg.candidate)},
            policy=policy,
        )
        write_outputs(failed, cfg)
        raise
    notes = [f"baseline: {n}" for n in base_info.pop("notes", [])]
    notes += [f"candidate: {n}" for n in cand_info.pop("notes", [])]
    report = report.model_copy(update={"notes": notes, "baseline": base_info, "candidate": cand_info})
    write_outputs(report, cfg)
    return report
