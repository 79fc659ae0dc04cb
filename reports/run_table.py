"""The table `bench run` ends with: one row per load point, and a footer naming the host facts the numbers depend on.

Columns: requests ok / failed / cancelled (a `--duration` window's in-flight requests are cancelled by design, not
failures), latency percentiles, throughput, goodput, the engine's memory peak (GPU memory where a GPU was sampled, else
the RSS of its process tree), the quality columns of the quantized workload (greedy agreement with the reference
variant), and the verdict. The footer: CPU model, cores and instruction-set features, GPUs, the dtype each engine ran
in, and engine log lines known to cost speed (`adapters.logwarnings`). Pure: a summary and a manifest in, a rich Table
out.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from rich.table import Table

    from harness.summary import PointSummary, Summary

__all__ = ["counts", "footer_lines", "memory_peak_bytes", "run_table"]


def counts(p: PointSummary) -> tuple[int, int, int]:
    """(ok, failed, cancelled) of a point's measured requests; `failed` excludes the cancelled ones."""
    cancelled = int(p.errors.get("cancelled", 0))
    return p.requests.ok, p.requests.failed - cancelled, cancelled


def memory_peak_bytes(p: PointSummary) -> tuple[float | None, str]:
    """The engine's memory peak during the point and what it is ("GPU" or "RSS")."""
    t = p.telemetry
    if t is None:
        return None, ""
    if t.gpu_memory_peak_bytes is not None:
        return float(t.gpu_memory_peak_bytes), "GPU"
    if t.engine_rss_peak_bytes is not None:
        return float(t.engine_rss_peak_bytes), "RSS"
    return None, ""


def _f(value: float | None, digits: int = 1) -> str:
    return "–" if value is None else f"{value:,.{digits}f}"


def _mib(value: float | None) -> str:
    return "–" if value is None else f"{value / 2**20:,.0f}"


def _share(value: Any) -> str:
    return f"{value:.0%}" if isinstance(value, int | float) and not isinstance(value, bool) else "–"


def _cache_cell(cache: Any) -> str:
    if cache is None or cache.measured is None:
        return "–"
    expected = "" if cache.expected is None else f" ({cache.expected:.0%})"
    return f"{cache.measured:.0%}{expected}"


def footer_lines(manifest: Mapping[str, Any] | None) -> list[str]:
    """What the numbers depend on: host CPU and features, GPUs, each engine's dtype and log warnings."""
    if not manifest:
        return []
    lines = []
    host = manifest.get("host") or {}
    cpu = host.get("cpu_model") or "CPU not recorded"
    shape = ", ".join(
        str(x) for x in (f"{host['cores']} cores" if host.get("cores") else None, host.get("machine")) if x
    )
    features = host.get("cpu_features")
    feat = (
        "features " + (" ".join(features) if features else "none of the tracked ones")
        if features is not None
        else "features not recorded"
    )
    gpus = [str(g.get("name", g)) if isinstance(g, Mapping) else str(g) for g in host.get("gpus") or [] if g]
    lines.append(
        f"host: {cpu}" + (f" ({shape})" if shape else "") + f"; {feat}; GPU: {', '.join(gpus) or 'none'}"
    )
    for e in manifest.get("engines") or []:
        if not isinstance(e, Mapping):
            continue
        dtype = e.get("dtype_choice")
        if isinstance(dtype, Mapping) and dtype.get("dtype"):
            lines.append(
                f"{e.get('name')}: dtype {dtype['dtype']}"
                + (f" ({dtype['reason']})" if dtype.get("reason") else "")
            )
        for w in e.get("log_warnings") or []:
            times = f" ({w.get('count')}×)" if (w.get("count") or 1) > 1 else ""
            lines.append(
                f'{e.get("name")} logged "{w.get("message") or w.get("line")}"{times}: {w.get("cost")}'
            )
    return lines


def run_table(summary: Summary, manifest: Mapping[str, Any] | None = None) -> Table:
    from rich.markup import escape
    from rich.table import Table

    quality = ((summary.quality or {}).get("variants") or {}) if summary.quality else {}
    caches = [getattr(p, "cache", None) for p in summary.points]  # harness.cache.CacheShare, where summarized
    show_cache = any(c is not None and (c.measured is not None or (c.expected or 0) > 0) for c in caches)
    table = Table(title=f"run {summary.run_id}", header_style="bold", pad_edge=False)
    table.add_column("engine", no_wrap=True)
    table.add_column("point", no_wrap=True)
    headers = ["ok/\nfailed/\ncancelled", "TTFT\np50", "TTFT\np95", "TTFT\np99"]
    headers += ["cache\nshare"] if show_cache else []
    headers += ["ITL\np50", "TPOT\np50", "E2E\np95"]
    headers += ["out\ntok/s", "good-\nput/s", "mem\npeak\nMiB"]
    if quality:
        headers += ["agree-\nment", "exact\nmatch", "logprob\ndrift"]
    for name in headers:
        table.add_column(name, justify="right", no_wrap=True)
    table.add_column("verdict", no_wrap=True)
    kinds = set()
    for p, cache in zip(summary.points, caches, strict=True):
        ok, failed, cancelled = counts(p)
        good = "–" if p.goodput is None else _f(p.goodput.requests_per_s, 2)
        verdict = "[green]VALID[/]" if p.verdict.status == "VALID" else "[red]INVALID[/]"
        mem, kind = memory_peak_bytes(p)
        if kind:
            kinds.add(kind)
        cells = [
            escape(p.engine),
            escape(p.point),
            f"{ok}/{failed}/{cancelled}",
            _f(p.ttft_ms.p50),
            _f(p.ttft_ms.p95),
            _f(p.ttft_ms.p99),
            *([_cache_cell(cache)] if show_cache else []),
            _f(p.itl_ms.p50),
            _f(p.tpot_ms.p50),
            _f(p.e2e_ms.p95),
            _f(p.output_tokens_per_s),
            good,
            _mib(mem),
        ]
        if quality:
            q = quality.get(p.engine) or {}
            drift = q.get("logprob_drift_mean_abs")
            cells += [
                _share(q.get("agreement")),
                _share(q.get("exact_match")),
                _f(drift, 3) if drift is not None else "–",
            ]
        table.add_row(*cells, verdict)
    caption = [
        "latencies in ms over successful measured requests; goodput in good requests/s; cancelled = in flight when "
        "the measurement window closed (by design, not a failure)"
    ]
    if show_cache:
        caption.append(
            "cache share: prompt tokens served from the engine's prefix cache (the workload's expected share)"
        )
    if kinds:
        caption.append(
            "memory peak: "
            + " / ".join(sorted({"GPU": "GPU memory", "RSS": "engine process tree RSS"}[k] for k in kinds))
        )
    if quality:
        ref = (summary.quality or {}).get("reference")
        caption.append(
            f"quality against the reference variant {ref}: agreement = mean common-prefix share of the greedy "
            "answers, exact match = share answered identically, logprob drift = mean |Δ log-prob|"
        )
    caption += [escape(line) for line in footer_lines(manifest)]
    table.caption = "\n".join(caption)
    table.caption_justify = "left"
    return table
