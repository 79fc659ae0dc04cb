"""Charts of the HTML report: matplotlib figures rendered to inline SVG strings (no files, no pyplot state).

Each function takes plain data (DataFrames from `harness.api`, arrays) and returns one `<svg>` element as text,
ready to embed: no XML prolog, text kept as text (`svg.fonttype: none`, the browser's own sans-serif; no font
files), element ids salted per chart so several charts in one page never share an id. Labels that come from users
(engine names) are passed as plain text: matplotlib escapes them in the SVG, and `$` is escaped so a name is never
read as mathtext.
"""

from __future__ import annotations

import io
import math
import re
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    import pandas as pd
    from matplotlib.axes import Axes
    from matplotlib.figure import Figure

__all__ = [
    "bar_svg",
    "cdf_svg",
    "latency_throughput_svg",
    "palette",
    "throughput_svg",
    "timeseries_svg",
]

_PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b", "#e377c2", "#7f7f7f")
_PROLOG = re.compile(r"^.*?(?=<svg)", re.S)


def _label(text: object) -> str:
    return str(text).replace("$", r"\$")


def _figure(width: float, height: float, ncols: int = 1) -> tuple[Figure, list[Axes]]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, ncols, squeeze=False)[0]
    for ax in axes:
        ax.grid(True, color="#e5e5e5", linewidth=0.6)
        ax.set_axisbelow(True)
        for side in ("top", "right"):
            ax.spines[side].set_visible(False)
    return fig, list(axes)


def _svg(fig: Figure, salt: str) -> str:
    import matplotlib

    buf = io.StringIO()
    with matplotlib.rc_context(
        {
            "svg.fonttype": "none",
            "svg.hashsalt": salt,
            "font.family": "sans-serif",
            "axes.formatter.useoffset": False,
        }
    ):
        fig.savefig(buf, format="svg", bbox_inches="tight", metadata={"Date": None, "Creator": None})
    text = _unique_ids(_PROLOG.sub("", buf.getvalue(), count=1), re.sub(r"[^A-Za-z0-9_-]", "_", salt))
    # scale with the page: drop the fixed pt size, keep the viewBox
    return re.sub(r'<svg([^>]*?) width="[^"]*" height="[^"]*"', r'<svg\1 class="chart"', text, count=1)


def _unique_ids(svg: str, prefix: str) -> str:
    """Prefix every id (and every reference to one) so many charts inline in one page never share an id."""
    ids = set(re.findall(r'\bid="([^"]+)"', svg))
    if not ids:
        return svg

    def ref(m: re.Match[str]) -> str:
        name = m.group(2)
        return f"{m.group(1)}{prefix}-{name}" if name in ids else m.group(0)

    svg = re.sub(r'(\bid=")([^"]+)', ref, svg)
    return re.sub(r'((?:url\(|href=")#)([^)"]+)', ref, svg)


def palette(names: Sequence[str]) -> dict[str, str]:
    """A fixed colour per name (engine), so one engine has one colour in every chart of a report."""
    return {n: _PALETTE[i % len(_PALETTE)] for i, n in enumerate(dict.fromkeys(names))}


def _colors(names: Sequence[str], given: Mapping[str, str] | None) -> dict[str, str]:
    out = dict(given or {})
    for n in names:
        out.setdefault(n, _PALETTE[len(out) % len(_PALETTE)])
    return out


def _legend(fig: Figure, ax: Axes) -> None:
    # below the axes, never over the data; constrained layout makes room for it
    handles, labels = ax.get_legend_handles_labels()
    if handles:
        ncol = 2 if max(len(label) for label in labels) <= 36 else 1
        fig.legend(handles, labels, loc="outside lower center", ncol=ncol, fontsize=8, frameon=False)


def latency_throughput_svg(
    points: pd.DataFrame, salt: str, *, colors: Mapping[str, str] | None = None
) -> str:
    """TTFT p95 and TPOT p95 against output tokens/s, one line per engine across its load points.

    Filled markers are VALID points, hollow ones INVALID (shown, excluded from the decision); each marker is
    labelled with its load value.
    """
    fig, (left, right) = _figure(9.5, 3.6, 2)
    engines = list(dict.fromkeys(points["engine"]))
    colors = _colors(engines, colors)
    for engine in engines:
        pts = points[points["engine"] == engine].sort_values("load_value")
        for ax, col in ((left, "ttft_p95_ms"), (right, "tpot_p95_ms")):
            x, y = pts["output_tokens_per_s"].astype(float), pts[col].astype(float)
            ax.plot(x, y, "-", color=colors[engine], linewidth=1.5, label=_label(engine))
            valid = pts["valid"].astype(bool)
            ax.scatter(x[valid], y[valid], color=colors[engine], s=28, zorder=3)
            ax.scatter(x[~valid], y[~valid], facecolors="white", edgecolors=colors[engine], s=36, zorder=3)
            for xv, yv, lv in zip(x, y, pts["load_value"], strict=True):
                if np.isfinite(xv) and np.isfinite(yv) and lv is not None and math.isfinite(lv):
                    ax.annotate(f"{lv:g}", (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=7)
    left.set(xlabel="output tokens/s", ylabel="TTFT p95 (ms)", title="TTFT p95 vs throughput")
    right.set(xlabel="output tokens/s", ylabel="TPOT p95 (ms)", title="TPOT p95 vs throughput")
    for ax in (left, right):
        ax.title.set_fontsize(10)
        ax.set_ylim(bottom=0)
        ax.set_xlim(left=0)
    _legend(fig, left)
    return _svg(fig, salt)


def throughput_svg(points: pd.DataFrame, salt: str, *, colors: Mapping[str, str] | None = None) -> str:
    """Output tokens/s and requests/s against the load value, one line per engine (hollow markers: INVALID)."""
    fig, (left, right) = _figure(9.5, 3.2, 2)
    engines = list(dict.fromkeys(points["engine"]))
    colors = _colors(engines, colors)
    kind = str(points["load_kind"].dropna().iloc[0]) if points["load_kind"].notna().any() else "load"
    for engine in engines:
        pts = points[points["engine"] == engine].sort_values("load_value")
        valid = pts["valid"].astype(bool)
        for ax, col in ((left, "output_tokens_per_s"), (right, "requests_per_s")):
            x, y = pts["load_value"].astype(float), pts[col].astype(float)
            ax.plot(x, y, "-", color=colors[engine], linewidth=1.5, label=_label(engine))
            ax.scatter(x[valid], y[valid], color=colors[engine], s=28, zorder=3)
            ax.scatter(x[~valid], y[~valid], facecolors="white", edgecolors=colors[engine], s=36, zorder=3)
    loads = sorted({float(v) for v in points["load_value"].dropna()})
    left.set(xlabel=kind, ylabel="output tokens/s", title="Output tokens/s by load")
    right.set(xlabel=kind, ylabel="requests/s", title="Requests/s by load")
    for ax in (left, right):
        ax.title.set_fontsize(10)
        ax.set_ylim(bottom=0)
        if 0 < len(loads) <= 12:
            ax.set_xticks(loads, [f"{v:g}" for v in loads])
    _legend(fig, left)
    return _svg(fig, salt)


def cdf_svg(
    samples: Mapping[tuple[str, str], np.ndarray],
    xlabel: str,
    title: str,
    salt: str,
    *,
    colors: Mapping[str, str] | None = None,
    log: bool = False,
) -> str:
    """Empirical CDFs, one line per (engine, load point): colour by engine, dash style by the point's order."""
    fig, (ax,) = _figure(5.4, 3.6)
    cmap = _colors([engine for engine, _ in samples], colors)
    styles = ("-", "--", ":", "-.")
    seen: dict[str, int] = {}
    for (engine, point), arr in samples.items():
        values = np.sort(np.asarray(arr, dtype=float))
        values = values[np.isfinite(values)]
        k = seen[engine] = seen.get(engine, -1) + 1
        if values.size == 0:
            continue
        y = np.arange(1, values.size + 1) / values.size
        ax.step(
            values,
            y,
            where="post",
            color=cmap[engine],
            linestyle=styles[k % len(styles)],
            linewidth=1.4,
            label=_label(f"{engine} · {point} (n={values.size})"),
        )
    if log:
        ax.set_xscale("log")
    ax.set(xlabel=xlabel, ylabel="fraction of samples ≤ x", title=title, ylim=(0, 1.02))
    ax.title.set_fontsize(10)
    _legend(fig, ax)
    return _svg(fig, salt)


def bar_svg(
    values: Mapping[str, float],
    xlabel: str,
    title: str,
    salt: str,
    *,
    colors: Mapping[str, str] | None = None,
) -> str:
    """One horizontal bar per label, first on top (e.g. weighted totals per engine, best first)."""
    names = list(values)
    fig, (ax,) = _figure(6.0, 0.9 + 0.38 * len(names))
    cmap = _colors(names, colors)
    y = list(range(len(names)))[::-1]
    ax.barh(y, [values[n] for n in names], color=[cmap[n] for n in names], height=0.6)
    ax.set_yticks(y, [_label(n) for n in names], fontsize=8)
    for yi, n in zip(y, names, strict=True):
        ax.annotate(
            f"{values[n]:.2f}",
            (values[n], yi),
            xytext=(3, 0),
            textcoords="offset points",
            va="center",
            fontsize=8,
        )
    ax.set(xlabel=xlabel, title=title)
    ax.title.set_fontsize(10)
    return _svg(fig, salt)


def timeseries_svg(
    series: Mapping[str, tuple[np.ndarray, np.ndarray]],
    ylabel: str,
    title: str,
    salt: str,
    *,
    spans: Sequence[tuple[float, float, str]] = (),
    colors: Mapping[str, str] | None = None,
    wide: bool = True,
) -> str:
    """Lines of value against seconds since the run's start; `spans` shades load points (start, end, label)."""
    fig, (ax,) = _figure(9.5, 3.0) if wide else _figure(5.4, 3.0)
    cmap = _colors(list(series), colors)
    for i, (start, end, label) in enumerate(spans):
        ax.axvspan(start, end, color="#f0f0f0" if i % 2 else "#e8eef7", linewidth=0)
        ax.annotate(
            _label(label), (start, 1.0), xycoords=("data", "axes fraction"), fontsize=6, va="top", rotation=90
        )
    lowest = math.inf
    for name, (t, v) in series.items():
        values = np.asarray(v, dtype=float)
        ax.plot(np.asarray(t, dtype=float), values, color=cmap[name], label=_label(name))
        if values.size:
            lowest = min(lowest, float(np.nanmin(values)))
    if lowest >= 0:  # counts, bytes, rates: start at zero so small wiggles do not look like swings
        ax.set_ylim(bottom=0)
    ax.set(xlabel="seconds since run start", ylabel=ylabel, title=title)
    ax.title.set_fontsize(10)
    _legend(fig, ax)
    return _svg(fig, salt)
