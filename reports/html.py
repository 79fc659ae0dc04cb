"""The HTML decision report: run directories on disk → one self-contained HTML page a CTO reads top to bottom.

Order of the page: recommendation and hybrid plan; decision matrix with weights and sensitivity; capacity and cost;
per workload the latency–throughput curves, TTFT and ITL distributions, tokens/s, memory over time and server-side
metrics (or "not recorded"), sample requests; verdicts (INVALID points shown, excluded, and why); environment and the
exact commands to reproduce. Everything is rebuilt from the run directories (through `harness.api` and
`harness.decide`; the decision's rows come from `reports.decision_view`, charts from `reports.charts`); nothing is
fetched. The page has no script and no external reference: styles and SVG charts
are inline, and a Content-Security-Policy forbids any request or script, so it works offline.

Escaping: jinja2 autoescape is on for the whole template and every string from a run directory (engine names,
model output, error messages, commands) reaches it as plain text. The only markup marked safe is the SVG that
`reports.charts` generated, in which matplotlib escaped every label.
"""

from __future__ import annotations

import datetime as dt
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from markupsafe import Markup

from harness import api
from reports import charts
from reports.decision_view import (
    capacity_rows,
    fmt,
    matrix_view,
    plan_view,
    reasons_view,
    recommendation,
    sensitivity_rows,
)

if TYPE_CHECKING:
    import pandas as pd

__all__ = ["ReportConfig", "build_report", "render_report", "write_report"]

_SAMPLES_PER_ENGINE = 3
_TEXT_LIMIT = 240
_MAX_SERVER_CHARTS = 6


@dataclass(frozen=True)
class ReportConfig:
    """What `bench report` needs: the run directories and the decision options of `bench decide`."""

    run_dirs: tuple[Path, ...]
    out: Path = Path("report.html")
    profile: str | None = None
    weights_file: Path | None = None
    plan_file: Path | None = None
    knowledge_file: Path | None = None
    prices_file: Path | None = None
    instance: str | None = None
    title: str = "EngineBench decision report"


def _bytes(value: Any) -> str:
    if not isinstance(value, int | float):
        return "—"
    return f"{value / 2**30:.1f} GiB"


def _command(argv: Sequence[str]) -> str:
    """The manifest's argv as a shell line, with the entry point shown as `bench` (what a user types)."""
    if not argv:
        return ""
    head = str(argv[0])
    rest = [str(a) for a in argv[1:]]
    if head.endswith(("__main__.py", "/bench", "bench")) or head == "-m":
        return shlex.join(["bench", *rest])
    return shlex.join([head, *rest])


def _cache_cell(measured: Any, expected: Any) -> str:
    """The prefix cache's share of prompt tokens, the workload's expected share in brackets (docs/metrics.md)."""
    if measured is None or measured != measured:  # None or NaN: not measured
        return "–"
    return f"{measured:.0%}" + (f" ({expected:.0%})" if expected is not None and expected == expected else "")


def _latency_cdfs(
    records: pd.DataFrame, itl: pd.DataFrame, colors: Mapping[str, str], salt: str
) -> tuple[str | None, str | None]:
    import numpy as np

    ttft: dict[tuple[str, str], np.ndarray] = {}
    ok = records[records["ok"]] if len(records) else records
    for (engine, point), g in ok.groupby(["engine", "point"], sort=False):
        ttft[(str(engine), str(point))] = g["ttft_ms"].dropna().to_numpy(dtype=float)
    itls: dict[tuple[str, str], np.ndarray] = {}
    for (engine, point), g in itl.groupby(["engine", "point"], sort=False):
        itls[(str(engine), str(point))] = g["itl_ms"].to_numpy(dtype=float)
    ttft_svg = (
        charts.cdf_svg(ttft, "TTFT (ms)", "TTFT distribution (CDF)", f"{salt}-ttft", colors=colors)
        if any(v.size for v in ttft.values())
        else None
    )
    itl_svg = (
        charts.cdf_svg(itls, "ITL (ms, per token)", "ITL distribution (CDF)", f"{salt}-itl", colors=colors)
        if any(v.size for v in itls.values())
        else None
    )
    return ttft_svg, itl_svg


def _counter_rates(frame: pd.DataFrame) -> pd.DataFrame:
    """Cumulative counters → per-second rates between consecutive samples of one (engine, point)."""
    import pandas as pd

    parts = []
    for (_engine, _point, metric), g in frame.groupby(["engine", "point", "metric"], sort=False):
        g = g.sort_values("t_s")
        dt_s = g["t_s"].diff()
        rate = g["value"].diff() / dt_s
        ok = dt_s > 0
        if ok.any():
            name = str(metric).removesuffix("_total")
            parts.append(g[ok].assign(value=rate[ok], metric=f"{name} per s", group="server"))
    return pd.concat(parts, ignore_index=True) if parts else frame.iloc[0:0]


def _telemetry(
    tele: pd.DataFrame, skipped: pd.DataFrame, colors: Mapping[str, str], salt: str
) -> dict[str, Any]:
    """Memory-over-time and server-metric charts from a workload's telemetry samples, and why any are missing."""
    import pandas as pd

    def series(frame: pd.DataFrame, scale: float, by_metric: bool) -> dict[str, tuple[Any, Any]]:
        out: dict[str, tuple[Any, Any]] = {}
        for (engine, metric), g in frame.groupby(["engine", "metric"], sort=False):
            g = g.sort_values("t_s")
            label = f"{engine} · {metric}" if by_metric else str(engine)
            out[label] = (g["t_s"].to_numpy(dtype=float), g["value"].to_numpy(dtype=float) / scale)
        return out

    memory = None
    server: list[Markup] = []
    omitted: list[str] = []
    if not tele.empty:
        mem = tele[tele["group"] == "memory"]
        if not mem.empty:
            metrics = list(dict.fromkeys(mem["metric"]))
            title = "Memory over time" + (f" ({metrics[0]})" if len(metrics) == 1 else "")
            memory = Markup(
                charts.timeseries_svg(
                    series(mem, 2**20, len(metrics) > 1), "MiB", title, f"{salt}-mem", colors=colors
                )
            )
        srv = pd.concat([tele[tele["group"] == "server"], _counter_rates(tele[tele["group"] == "counter"])])
        names = list(dict.fromkeys(srv["metric"]))
        for i, metric in enumerate(names[:_MAX_SERVER_CHARTS]):
            part = srv[srv["metric"] == metric]
            server.append(
                Markup(
                    charts.timeseries_svg(
                        series(part, 1.0, False), metric, metric, f"{salt}-srv{i}", colors=colors, wide=False
                    )
                )
            )
        omitted = names[_MAX_SERVER_CHARTS:]

    def reasons(sources: tuple[str, ...]) -> list[dict[str, str]]:
        return [
            {"engine": str(r.engine), "source": str(r.source), "reason": str(r.reason)}
            for r in skipped.itertuples()
            if r.source in sources
        ]

    return {
        "memory": memory,
        "server": server,
        "omitted": omitted,
        "recorded": not tele.empty,
        "memory_skipped": reasons(("process", "gpu")),
        "server_skipped": reasons(("engine_metrics",)),
    }


def _samples(records: pd.DataFrame) -> list[dict[str, Any]]:
    rows: list[dict[str, Any]] = []
    if records.empty:
        return rows
    for _engine, g in records.groupby("engine", sort=False):
        picked = list(g[g["ok"]].head(_SAMPLES_PER_ENGINE).itertuples()) + list(
            g[~g["ok"]].head(2).itertuples()
        )
        for r in picked:
            text = getattr(r, "output_text", None)
            text = text if isinstance(text, str) else None
            rows.append(
                {
                    "engine": r.engine,
                    "point": r.point,
                    "request_id": r.request_id,
                    "status": r.status,
                    "ttft_ms": fmt(r.ttft_ms),
                    "e2e_ms": fmt(r.e2e_ms),
                    "output_tokens": r.output_tokens,
                    "text": None
                    if text is None
                    else text[:_TEXT_LIMIT] + ("…" if len(text) > _TEXT_LIMIT else ""),
                    "error": r.error if isinstance(r.error, str) else "",
                }
            )
    return rows


def _workloads(
    runs: Sequence[api.Run], colors: Mapping[str, str]
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    points = api.points_frame(runs)
    records = api.records_frame(runs)
    itl = api.itl_frame(runs, max_per_point=5000)
    raw = {
        (r.run_id, str(p.get("engine")), str(p.get("point"))): p
        for r in runs
        for p in r.summary.get("points") or []
    }
    quality = {r.run_id: ((r.summary.get("quality") or {}).get("variants") or {}) for r in runs}
    tele = api.telemetry_frame(runs)
    skipped = api.telemetry_skipped(runs)
    out = []
    for i, workload in enumerate(dict.fromkeys(r.workload for r in runs)):
        salt = f"w{i}"
        pts = points[points["workload"] == workload]
        recs = records[records["workload"] == workload] if len(records) else records
        itls = itl[itl["workload"] == workload]
        wruns = [r for r in runs if r.workload == workload]
        tel = tele[tele["workload"] == workload]
        skip = skipped[skipped["run_id"].isin([r.run_id for r in wruns])]
        ttft_svg, itl_svg = _latency_cdfs(recs, itls, colors, salt)
        lt = charts.latency_throughput_svg(pts, f"{salt}-lt", colors=colors) if len(pts) else None
        tp = charts.throughput_svg(pts, f"{salt}-tp", colors=colors) if len(pts) else None
        table = [
            {
                "engine": p.engine,
                "point": p.point,
                "verdict": p.verdict,
                "measured": p.measured,
                **_counts_memory(raw.get((p.run_id, p.engine, p.point)) or {}),
                **_quality_cells((quality.get(p.run_id) or {}).get(p.engine)),
                "rps": fmt(p.requests_per_s),
                "out_tps": fmt(p.output_tokens_per_s),
                "ttft_p50": fmt(p.ttft_p50_ms),
                "ttft_p95": fmt(p.ttft_p95_ms),
                "cache": _cache_cell(
                    getattr(p, "cache_share", None), getattr(p, "cache_expected_share", None)
                ),
                "itl_p50": fmt(p.itl_p50_ms),
                "tpot_p95": fmt(p.tpot_p95_ms),
                "e2e_p95": fmt(p.e2e_p95_ms),
                "goodput": fmt(p.goodput_requests_per_s),
            }
            for p in pts.itertuples()
        ]
        fingerprints = sorted(
            {str((r.manifest.get("workload") or {}).get("fingerprint") or "—") for r in wruns}
        )
        out.append(
            {
                "name": workload,
                "anchor": f"workload-{i}",
                "has_quality": any(quality.get(r.run_id) for r in wruns),
                "fingerprints": fingerprints,
                "description": str(
                    ((wruns[0].manifest.get("workload") or {}).get("params") or {}).get("description") or ""
                ),
                "table": table,
                "latency_throughput": Markup(lt) if lt else None,
                "throughput": Markup(tp) if tp else None,
                "ttft_cdf": Markup(ttft_svg) if ttft_svg else None,
                "itl_cdf": Markup(itl_svg) if itl_svg else None,
                "telemetry": _telemetry(tel, skip, colors, salt),
                "energy": _energy_rows(wruns),
                "samples": _samples(recs),
            }
        )
    verdicts = [
        {
            "workload": p.workload,
            "run_id": p.run_id,
            "engine": p.engine,
            "point": p.point,
            "verdict": p.verdict,
            "reasons": p.reasons,
            "recommendation": p.recommendation,
            "notes": p.notes,
            "duration": fmt(p.duration_s),
            "measured": p.measured,
            "error_rate": fmt(p.error_rate),
        }
        for p in points.itertuples()
    ]
    return out, verdicts


def _counts_memory(point: Mapping[str, Any]) -> dict[str, Any]:
    """ok / failed / cancelled apart (a duration window's in-flight requests are cancelled by design), and the
    engine's memory peak (GPU memory where sampled, else its process tree's RSS)."""
    req = point.get("requests") or {}
    cancelled = int((point.get("errors") or {}).get("cancelled", 0) or 0)
    tele = point.get("telemetry") or {}
    gpu, rss = tele.get("gpu_memory_peak_bytes"), tele.get("engine_rss_peak_bytes")
    peak = gpu if gpu is not None else rss
    return {
        "ok": req.get("ok"),
        "failed": (req.get("failed") or 0) - cancelled,
        "cancelled": cancelled,
        "memory_peak": "—"
        if peak is None
        else f"{peak / 2**20:,.0f} MiB" + (" GPU" if gpu is not None else " RSS"),
    }


def _quality_cells(q: Mapping[str, Any] | None) -> dict[str, str]:
    q = q or {}

    def share(v: Any) -> str:
        return f"{v:.0%}" if isinstance(v, int | float) and not isinstance(v, bool) else "—"

    return {
        "agreement": share(q.get("agreement")),
        "exact_match": share(q.get("exact_match")),
        "logprob_drift": fmt(q.get("logprob_drift_mean_abs")),
    }


def _engine_facts(e: Mapping[str, Any]) -> tuple[str, list[str]]:
    dtype = e.get("dtype_choice") or {}
    choice = ""
    if isinstance(dtype, Mapping) and dtype.get("dtype"):
        choice = str(dtype["dtype"]) + (f" ({dtype['reason']})" if dtype.get("reason") else "")
    warnings = [
        f"{w.get('message') or w.get('line')}"
        + (f" ({w.get('count')}×)" if (w.get("count") or 1) > 1 else "")
        + f" — {w.get('cost')}"
        for w in e.get("log_warnings") or []
        if isinstance(w, Mapping)
    ]
    return choice, warnings


def _energy_rows(runs: Sequence[api.Run]) -> list[dict[str, Any]]:
    """Per load point with GPU telemetry: energy per output token and per request, mean and peak power, and the
    engine's GPU memory apart from other tenants' where NVML told them apart (docs/telemetry.md)."""
    rows = []
    for r in runs:
        for p in r.summary.get("points") or []:
            t = p.get("telemetry") or {}
            if t.get("gpu_energy_j") is None and t.get("gpu_memory_peak_bytes") is None:
                continue
            engine_mem = t.get("gpu_memory_engine_peak_bytes")
            rows.append(
                {
                    "engine": str(p.get("engine")),
                    "point": str(p.get("point")),
                    "j_token": fmt(t.get("energy_per_output_token_j")),
                    "j_request": fmt(t.get("energy_per_request_j")),
                    "power_mean": fmt(t.get("gpu_power_mean_w")),
                    "power_peak": fmt(t.get("gpu_power_peak_w")),
                    "energy": fmt(t.get("gpu_energy_j")),
                    "window": fmt(t.get("gpu_energy_window_s")),
                    "interval": fmt(t.get("gpu_power_sample_interval_s")),
                    "counter": fmt(t.get("gpu_energy_counter_j")),
                    "memory": _bytes(
                        engine_mem if engine_mem is not None else t.get("gpu_memory_peak_bytes")
                    ),
                    "memory_basis": "engine's processes" if engine_mem is not None else "device total",
                    "memory_why": t.get("gpu_memory_basis_reason") or "",
                    "others": _bytes(t.get("gpu_memory_others_peak_bytes")),
                }
            )
    return rows


def _environment(runs: Sequence[api.Run]) -> list[dict[str, Any]]:
    out = []
    for r in runs:
        m = r.manifest
        host = m.get("host") or {}
        out.append(
            {
                "run_id": r.run_id,
                "dir": str(r.path),
                "status": m.get("status") or "no manifest",
                "started_at": m.get("started_at"),
                "finished_at": m.get("finished_at"),
                "harness_version": m.get("harness_version"),
                "git_sha": m.get("git_sha"),
                "host": {
                    "hostname": host.get("hostname"),
                    "os": host.get("os"),
                    "python": host.get("python"),
                    "cpu_model": host.get("cpu_model"),
                    "cores": host.get("cores"),
                    "memory": _bytes(host.get("memory_bytes")),
                    "gpus": ", ".join(
                        str(g.get("name", g)) if isinstance(g, Mapping) else str(g)
                        for g in host.get("gpus") or []
                        if g
                    )
                    or "none",
                    "machine": host.get("machine"),
                    "cpu_features": (
                        " ".join(host["cpu_features"]) or "none of the tracked ones"
                        if host.get("cpu_features") is not None
                        else "not recorded"
                    ),
                },
                "engines": [
                    {
                        "name": e.get("name"),
                        "adapter": e.get("adapter"),
                        "mode": e.get("mode"),
                        "endpoint": e.get("endpoint"),
                        "version": e.get("version"),
                        "model": e.get("model"),
                        "cold_start_s": fmt(e.get("cold_start_s")),
                        "launch": shlex.join(str(a) for a in e.get("launch_argv") or []) or "— (attached)",
                        "config": ", ".join(f"{k}={v}" for k, v in (e.get("config") or {}).items()),
                        "dtype": _engine_facts(e)[0],
                        "warnings": _engine_facts(e)[1],
                    }
                    for e in m.get("engines") or []
                ],
                "workload": m.get("workload") or {},
                "load": ", ".join(f"{k}={v}" for k, v in (m.get("load") or {}).items()),
                "slo": ", ".join(f"{k}={v}" for k, v in (m.get("slo") or {}).items()) or "none",
                "command": _command(m.get("command") or []),
                "summary_rebuilt": r.summary_rebuilt,
                "policy": _policy(r.summary),
                "notes": list(r.summary.get("notes") or []),
            }
        )
    return out


def _rebuild_command(config: ReportConfig) -> str:
    argv = ["bench", "report", *map(str, config.run_dirs), "-o", str(config.out)]
    for flag, value in (
        ("--profile", config.profile),
        ("--weights", config.weights_file),
        ("--plan", config.plan_file),
        ("--knowledge", config.knowledge_file),
        ("--prices", config.prices_file),
        ("--instance", config.instance),
    ):
        if value is not None:
            argv += [flag, str(value)]
    return shlex.join(argv)


def _policy(summary: Mapping[str, Any]) -> str:
    """The verdict thresholds that differ from the defaults, e.g. "min_duration_s=0.9 (default 10.0)"."""
    from harness.verdict import VerdictPolicy

    used = summary.get("policy") or {}
    default = VerdictPolicy().model_dump()
    return ", ".join(
        f"{k}={v} (default {default[k]})" for k, v in used.items() if k in default and v != default[k]
    )


def build_report(config: ReportConfig) -> dict[str, Any]:
    """Everything the page shows, as template context (strings are raw: the template escapes them)."""
    if not config.run_dirs:
        from harness.errors import ConfigError

        raise ConfigError("no run directory given; pass one or more directories written by `bench run`")
    runs = api.load_runs(config.run_dirs)
    decision = api.decision(
        config.run_dirs,
        profile=config.profile,
        weights=config.weights_file,
        plan=config.plan_file,
        knowledge=config.knowledge_file,
        prices=config.prices_file,
        instance=config.instance,
    )
    engines = list(decision.get("ranking") or [])
    for r in runs:
        engines += [str(p.get("engine")) for p in r.summary.get("points") or []]
    colors = charts.palette(engines)
    workloads, verdicts = _workloads(runs, colors)
    ranked_totals = {
        s["engine"]: s["total"] for s in decision.get("scores") or [] if s.get("total") is not None
    }
    profile = decision.get("profile") or {}
    return {
        "title": config.title,
        "generated_at": decision.get("generated_at") or dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "profile": profile.get("name") or profile.get("weights_file") or "custom",
        "profile_description": profile.get("description") or "",
        "recommendation": recommendation(decision),
        "reasons": reasons_view(decision),
        "notes": list(decision.get("notes") or []),
        "totals_chart": (
            Markup(
                charts.bar_svg(
                    ranked_totals, "weighted total (1–5)", "Weighted totals", "totals", colors=colors
                )
            )
            if ranked_totals
            else None
        ),
        "plan": plan_view(decision),
        "matrix": matrix_view(decision),
        "sensitivity": sensitivity_rows(decision),
        "capacity": capacity_rows(decision),
        "warnings": list(decision.get("warnings") or []),
        "workloads": workloads,
        "verdicts": verdicts,
        "invalid_count": sum(1 for v in verdicts if v["verdict"] != "VALID"),
        "environment": _environment(runs),
        "inputs": decision.get("inputs") or {},
        "rebuild_command": _rebuild_command(config),
        "text_limit": _TEXT_LIMIT,
    }


def _environment_jinja() -> Any:
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    env = Environment(
        loader=FileSystemLoader(Path(__file__).parent / "templates"),
        autoescape=True,
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters["fmt"] = fmt
    return env


def render_report(context: Mapping[str, Any]) -> str:
    return str(_environment_jinja().get_template("report.html.j2").render(**context))


def write_report(config: ReportConfig) -> Path:
    """Build the report of `config.run_dirs` and write it to `config.out`; returns the path written."""
    from harness.errors import ConfigError

    html = render_report(build_report(config))
    try:
        config.out.parent.mkdir(parents=True, exist_ok=True)
        config.out.write_text(html, encoding="utf-8")
    except OSError as e:
        raise ConfigError(f"cannot write {config.out}: {e.strerror}; choose another -o") from None
    return config.out
