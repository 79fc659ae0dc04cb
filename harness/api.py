"""The public Python API for notebooks and reports: run directories → pandas DataFrames, and the decision.

Everything here reads run directories through the existing readers (`harness.rundir.RunDir`, `summary.json` or
`harness.summary.summarize_run` when it is missing, `harness.metrics` for per-request metrics,
`harness.decide.decide` for the decision) and reshapes what they return; no number is computed twice. Latencies
in the frames are milliseconds (columns end in `_ms`), rates are per second.

    from harness import api
    runs = api.load_runs(["runs/a", "runs/b"])
    points = api.points_frame(runs)          # one row per (run, engine, load point), with the verdict
    records = api.records_frame(runs)        # one row per measured request, with ttft_ms, tpot_ms, e2e_ms ...
    decision = api.decision(["runs/a", "runs/b"], profile="batch-throughput")
    api.matrix_frame(decision), api.plan_frame(decision)
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from harness.errors import SchemaError
from harness.rundir import RunDir, check_schema

if TYPE_CHECKING:
    import pandas as pd

__all__ = [
    "LATENCY_METRICS",
    "Run",
    "decision",
    "itl_frame",
    "load_run",
    "load_runs",
    "matrix_frame",
    "plan_frame",
    "points_frame",
    "records_frame",
    "sensitivity_frame",
    "telemetry_frame",
    "telemetry_skipped",
]

LATENCY_METRICS = ("ttft", "itl", "tpot", "e2e")
_STATS = ("mean", "p50", "p90", "p95", "p99", "max")

PathLike = str | Path


@dataclass(frozen=True)
class Run:
    """One run directory as read from disk: its manifest and summary as JSON-ready dicts."""

    path: Path
    manifest: Mapping[str, Any]
    summary: Mapping[str, Any]
    summary_rebuilt: bool  # summary.json was missing: rebuilt in memory from records.jsonl

    @property
    def run_id(self) -> str:
        return str(self.summary.get("run_id") or self.manifest.get("run_id") or self.path.name)

    @property
    def workload(self) -> str:
        return str((self.manifest.get("workload") or {}).get("name") or "unknown")

    def rundir(self) -> RunDir:
        return RunDir.open(self.path)


def _read_summary(path: Path) -> dict[str, Any] | None:
    # Raw JSON (schema-checked), not the strict model: fields added later (telemetry `memory`) stay visible.
    f = path / "summary.json"
    if not f.exists():
        return None
    try:
        obj = json.loads(f.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise SchemaError(
            f"{f} is not valid JSON ({e.msg} at line {e.lineno}); the file is damaged"
        ) from None
    check_schema(obj, str(f))
    return dict(obj)


def load_run(path: PathLike) -> Run:
    """Read one run directory (refused with a clear error when it is not one)."""
    from harness.summary import summarize_run

    rd = RunDir.open(path)
    manifest = rd.load_manifest().model_dump(mode="json") if rd.has_manifest() else {}
    summary = _read_summary(rd.path)
    rebuilt = summary is None
    if summary is None:
        summary = summarize_run(rd.path).model_dump(mode="json")
    return Run(path=rd.path, manifest=manifest, summary=summary, summary_rebuilt=rebuilt)


def load_runs(paths: Iterable[PathLike | Run]) -> list[Run]:
    return [p if isinstance(p, Run) else load_run(p) for p in paths]


def _num(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def _point_row(run: Run, p: Mapping[str, Any]) -> dict[str, Any]:
    load = p.get("load") or {}
    req = p.get("requests") or {}
    verdict = p.get("verdict") or {}
    reasons = verdict.get("reasons") or []
    goodput = p.get("goodput") or {}
    row: dict[str, Any] = {
        "run_id": run.run_id,
        "run_dir": str(run.path),
        "workload": run.workload,
        "engine": str(p.get("engine")),
        "point": str(p.get("point")),
        "load_kind": load.get("kind"),
        "load_value": _num(load.get("value")),
        "closed_loop": load.get("closed_loop"),
        "verdict": verdict.get("status"),
        "valid": verdict.get("status") == "VALID",
        "reason_codes": ", ".join(str(r.get("code", "")) for r in reasons if isinstance(r, Mapping)),
        "reasons": "; ".join(str(r.get("message", r)) if isinstance(r, Mapping) else str(r) for r in reasons),
        "recommendation": "; ".join(
            str(r.get("recommendation", "")) for r in reasons if isinstance(r, Mapping)
        ),
        "notes": "; ".join(str(n) for n in verdict.get("notes") or []),
        "duration_s": _num(p.get("duration_s")),
        "measured": req.get("measured"),
        "ok": req.get("ok"),
        "failed": req.get("failed"),
        "error_rate": _num(p.get("error_rate")),
        "requests_per_s": _num(p.get("requests_per_s")),
        "input_tokens_per_s": _num(p.get("input_tokens_per_s")),
        "output_tokens_per_s": _num(p.get("output_tokens_per_s")),
        "total_tokens_per_s": _num(p.get("total_tokens_per_s")),
        "goodput_requests_per_s": _num(goodput.get("requests_per_s")),
        "goodput_fraction": _num(goodput.get("fraction")),
        # the prefix cache's share of prompt tokens, and the workload's expected share (docs/metrics.md)
        "cache_share": _num((p.get("cache") or {}).get("measured")),
        "cache_expected_share": _num((p.get("cache") or {}).get("expected")),
    }
    for m in (*LATENCY_METRICS, "send_lag"):
        stats = p.get(f"{m}_ms") or {}
        for s in _STATS:
            row[f"{m}_{s}_ms"] = _num(stats.get(s))
    return row


def points_frame(runs: Iterable[PathLike | Run]) -> pd.DataFrame:
    """One row per (run, engine, load point): load, verdict and reasons, counts, rates, latency statistics."""
    import pandas as pd

    rows = [_point_row(run, p) for run in load_runs(runs) for p in run.summary.get("points") or []]
    return pd.DataFrame(rows, columns=list(rows[0]) if rows else ["run_id", "workload", "engine", "point"])


def _load_values(run: Run) -> dict[tuple[str, str], float | None]:
    return {
        (str(p.get("engine")), str(p.get("point"))): _num((p.get("load") or {}).get("value"))
        for p in run.summary.get("points") or []
    }


def records_frame(
    runs: Iterable[PathLike | Run], *, phases: Sequence[str] = ("measure",), text: bool = True
) -> pd.DataFrame:
    """One row per request (measured ones by default) with metrics derived by `harness.metrics`.

    Columns: identity (run, workload, engine, point, load_value, request_id, phase, status, error), `ttft_ms`,
    `tpot_ms`, `e2e_ms`, `send_lag_ms`, `itl_p50_ms` / `itl_max_ms` (over the request's per-token ITL samples),
    `prompt_tokens`, `output_tokens` + `output_token_source`, `chunks`, and `output_text` when kept (`text`).
    """
    import numpy as np
    import pandas as pd

    from harness import metrics

    def ms(v: float | None) -> float | None:
        return None if v is None else v * 1000.0

    rows: list[dict[str, Any]] = []
    for run in load_runs(runs):
        loads = _load_values(run)
        for rec in run.rundir().iter_records():
            if rec.phase not in phases:
                continue
            itl = metrics.itl_array(rec)
            out = metrics.output_tokens(rec)
            row: dict[str, Any] = {
                "run_id": run.run_id,
                "workload": run.workload,
                "engine": rec.engine,
                "point": rec.point,
                "load_value": loads.get((rec.engine, rec.point)),
                "request_id": rec.request_id,
                "phase": rec.phase,
                "status": rec.status,
                "ok": rec.ok,
                "error": rec.error,
                "scheduled_s": rec.scheduled,
                "ttft_ms": ms(metrics.ttft(rec)),
                "tpot_ms": ms(metrics.tpot(rec)),
                "e2e_ms": ms(metrics.e2e(rec)),
                "send_lag_ms": ms(metrics.send_lag(rec)),
                "itl_p50_ms": float(np.median(itl)) * 1000.0 if itl.size else None,
                "itl_max_ms": float(itl.max()) * 1000.0 if itl.size else None,
                "prompt_tokens": rec.prompt_tokens,
                "output_tokens": out.value,
                "output_token_source": out.source,
                "chunks": len(rec.chunk_times),
                "finish_reason": rec.finish_reason,
            }
            if text:
                row["output_text"] = rec.output_text
            rows.append(row)
    return pd.DataFrame(rows)


def itl_frame(runs: Iterable[PathLike | Run], *, max_per_point: int | None = None) -> pd.DataFrame:
    """Every per-token ITL sample (ms) of successful measured requests: columns engine, point, workload, itl_ms.

    `max_per_point` keeps an evenly spaced subset per (run, engine, point) for plotting very large runs.
    """
    import numpy as np
    import pandas as pd

    from harness import metrics

    frames: list[pd.DataFrame] = []
    for run in load_runs(runs):
        loads = _load_values(run)
        samples: dict[tuple[str, str], list[np.ndarray]] = {}
        for rec in run.rundir().iter_records():
            if rec.phase == "measure" and rec.ok:
                samples.setdefault((rec.engine, rec.point), []).append(metrics.itl_array(rec))
        for (engine, point), parts in samples.items():
            arr = np.concatenate(parts) * 1000.0 if parts else np.empty(0)
            if max_per_point and arr.size > max_per_point:
                arr = np.sort(arr)[np.linspace(0, arr.size - 1, max_per_point).astype(int)]
            frames.append(
                pd.DataFrame(
                    {
                        "run_id": run.run_id,
                        "workload": run.workload,
                        "engine": engine,
                        "point": point,
                        "load_value": loads.get((engine, point)),
                        "itl_ms": arr,
                    }
                )
            )
    if not frames:
        return pd.DataFrame(columns=["run_id", "workload", "engine", "point", "load_value", "itl_ms"])
    return pd.concat(frames, ignore_index=True)


def _engine_names(run: Run) -> dict[str, str]:
    """Telemetry file stem -> engine name (the writer sanitises names into file names)."""
    from harness.telemetry import telemetry_path

    names = [str(e.get("name")) for e in run.manifest.get("engines") or [] if e.get("name")]
    names += [str(p.get("engine")) for p in run.summary.get("points") or []]
    return {telemetry_path(run.path, n).stem: n for n in names}


def _sample_rows(line: Mapping[str, Any]) -> Iterator[tuple[str, str, float, str]]:
    """(group, metric, value, unit) of one telemetry line: memory, engine CPU/GPU, and the engine's own metrics."""
    from adapters.prometheus import kind_of

    proc = line.get("process") or {}
    if _num(proc.get("rss_bytes")) is not None and proc.get("processes"):
        yield "memory", "engine RSS", float(proc["rss_bytes"]), "bytes"
    if _num(proc.get("cpu_cores")) is not None:
        yield "server", "engine CPU (cores)", float(proc["cpu_cores"]), "cores"
    gpus = [g for g in line.get("gpus") or [] if isinstance(g, Mapping)]
    used = [_num(g.get("memory_used_bytes")) for g in gpus]
    if gpus and all(u is not None for u in used):
        yield "memory", "GPU memory used", float(sum(u for u in used if u is not None)), "bytes"
    util = [u for u in (_num(g.get("util_gpu")) for g in gpus) if u is not None]
    if util:
        yield "server", "GPU utilization", sum(util) / len(util), "fraction"
    power = [w for w in (_num(g.get("power_w")) for g in gpus) if w is not None]
    if power:
        yield "server", "GPU power (W)", float(sum(power)), "W"
    for name, value in (line.get("engine") or {}).items():
        v = _num(value)
        if v is not None:
            yield "counter" if kind_of(str(name)) == "counter" else "server", str(name), v, ""


def telemetry_frame(runs: Iterable[PathLike | Run]) -> pd.DataFrame:
    """The periodic telemetry samples of every run (`harness.telemetry.read_telemetry`), one row per value.

    Columns: run_id, workload, engine, point, `t_s` (seconds since the run's start, the records' clock), group
    (`memory`: engine RSS / GPU memory used in bytes; `server`: engine CPU, GPU utilization and power, the engine's
    own gauges; `counter`: the engine's counters, cumulative), metric, value, unit. Empty when nothing was sampled.
    """
    import pandas as pd

    from harness.telemetry import read_telemetry

    cols = ["run_id", "workload", "engine", "point", "t_s", "group", "metric", "value", "unit"]
    rows: list[tuple[Any, ...]] = []
    for run in load_runs(runs):
        names = _engine_names(run)
        for stem, lines in read_telemetry(run.path).items():
            engine = names.get(stem, stem)
            for line in lines:
                if line.get("kind") != "sample" or _num(line.get("t")) is None:
                    continue
                for group, metric, value, unit in _sample_rows(line):
                    rows.append(
                        (
                            run.run_id,
                            run.workload,
                            engine,
                            line.get("point"),
                            line["t"],
                            group,
                            metric,
                            value,
                            unit,
                        )
                    )
    return pd.DataFrame(rows, columns=cols)


def telemetry_skipped(runs: Iterable[PathLike | Run]) -> pd.DataFrame:
    """Why a telemetry source was not recorded: one row per (run, engine, source) with the sampler's reason."""
    import pandas as pd

    from harness.telemetry import read_telemetry

    rows: dict[tuple[str, str, str], str] = {}
    for run in load_runs(runs):
        names = _engine_names(run)
        for stem, lines in read_telemetry(run.path).items():
            for line in lines:
                if line.get("kind") == "source_skipped":
                    key = (run.run_id, names.get(stem, stem), str(line.get("source")))
                    rows.setdefault(key, str(line.get("reason") or ""))
    return pd.DataFrame([(*k, v) for k, v in rows.items()], columns=["run_id", "engine", "source", "reason"])


def decision(
    run_dirs: Iterable[PathLike],
    *,
    profile: str | None = None,
    weights: PathLike | None = None,
    plan: PathLike | None = None,
    knowledge: PathLike | None = None,
    prices: PathLike | None = None,
    instance: str | None = None,
    tie_margin: float = 0.1,
) -> dict[str, Any]:
    """The decision JSON of `bench decide` (same function, same files) for these run directories."""
    from harness.decide import DecideConfig
    from harness.decide import decide as run_decide

    def p(x: PathLike | None) -> Path | None:
        return None if x is None else Path(x)

    return run_decide(
        DecideConfig(
            run_dirs=tuple(Path(d) for d in run_dirs),
            profile=profile,
            weights_file=p(weights),
            plan_file=p(plan),
            knowledge_file=p(knowledge),
            prices_file=p(prices),
            instance=instance,
            tie_margin=tie_margin,
        )
    )


def matrix_frame(decision: Mapping[str, Any], *, raw: bool = False) -> pd.DataFrame:
    """The decision matrix: one row per engine (best first), `total` then one column per criterion.

    Scores 1–5 (None = no data), or the raw measured/known values with `raw=True`. `DataFrame.attrs["weights"]`
    holds the normalized weights.
    """
    import pandas as pd

    criteria = [c["name"] for c in decision.get("criteria") or []]
    rows = []
    for s in decision.get("scores") or []:
        row: dict[str, Any] = {"engine": s["engine"], "total": s.get("total")}
        for c in criteria:
            cell = (s.get("criteria") or {}).get(c) or {}
            row[c] = cell.get("raw" if raw else "score")
        rows.append(row)
    frame = pd.DataFrame(rows, columns=["engine", "total", *criteria]).set_index("engine")
    frame.attrs["weights"] = dict(decision.get("weights") or {})
    return frame


def sensitivity_frame(decision: Mapping[str, Any]) -> pd.DataFrame:
    """Per weight: how far it must rise or fall before the winner loses the top, and to whom (None = never)."""
    import pandas as pd

    rows = []
    for w in (decision.get("sensitivity") or {}).get("weights") or []:
        up, down = w.get("increase"), w.get("decrease")
        rows.append(
            {
                "criterion": w["criterion"],
                "weight": w["weight"],
                "raise_by": up and up.get("delta"),
                "raise_challenger": up and up.get("challenger"),
                "lower_by": down and down.get("delta"),
                "lower_challenger": down and down.get("challenger"),
            }
        )
    return pd.DataFrame(
        rows, columns=["criterion", "weight", "raise_by", "raise_challenger", "lower_by", "lower_challenger"]
    )


def plan_frame(decision: Mapping[str, Any]) -> pd.DataFrame:
    """The hybrid plan: one row per use case with the chosen engine, settings, replicas and $/month."""
    import pandas as pd

    cols = [
        "use_case",
        "status",
        "engine",
        "load_kind",
        "load_per_replica",
        "replicas",
        "usd_per_month",
        "note",
    ]
    plan = decision.get("plan") or {}
    rows = []
    for a in plan.get("assignments") or []:
        ch = a.get("chosen") or {}
        settings = ch.get("settings") or {}
        reps = ch.get("replicas") or {}
        cost = ch.get("cost") or {}
        rows.append(
            {
                "use_case": (a.get("use_case") or {}).get("name"),
                "status": a.get("status"),
                "engine": ch.get("engine"),
                "load_kind": settings.get("load_kind"),
                "load_per_replica": settings.get("load_per_replica"),
                "replicas": reps.get("replicas"),
                "usd_per_month": cost.get("usd_per_month") if ch else None,
                "note": a.get("note") or ch.get("reason"),
            }
        )
    return pd.DataFrame(rows, columns=cols)
