"""Per-scenario breakdowns of one load point: the numbers each workload exists to show.

- chat: TTFT by turn number (later turns carry the growing history);
- long-context: TTFT and prefill tokens/s by input length (fraction of the context window);
- shared-prefix: TTFT and cached prompt fraction for requests reusing a shared prefix vs the no-sharing control,
  and the TTFT speed-up between them.

Pure: successful measured records in, pydantic models out. Groups come from request tags the workloads set.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from pydantic import BaseModel, ConfigDict

from harness import metrics
from harness.metrics import LatencyStats, stats_ms
from harness.records import RequestRecord

__all__ = [
    "BREAKDOWN_TAGS",
    "Breakdown",
    "GroupStats",
    "PrefixReuse",
    "breakdowns",
    "describe",
    "prefix_reuse",
]

# workload kind -> the request tags its results are broken down by
BREAKDOWN_TAGS: dict[str, tuple[str, ...]] = {
    "chat": ("turn",),
    "long-context": ("fraction",),
    "shared-prefix": ("role",),
}


class GroupStats(BaseModel):
    model_config = ConfigDict(frozen=True)

    requests: int
    ttft_ms: LatencyStats
    input_tokens_mean: float | None
    # prompt tokens / TTFT per request (median): prefill speed as the client sees it, queueing included
    prefill_tokens_per_s_p50: float | None
    # sum(cached prompt tokens) / sum(prompt tokens), where the engine reports cached tokens in usage
    cached_fraction: float | None


class Breakdown(BaseModel):
    model_config = ConfigDict(frozen=True)

    tag: str
    groups: dict[str, GroupStats]


class PrefixReuse(BaseModel):
    """Shared-prefix workload: requests that reuse a cached prefix against the control that shares nothing."""

    model_config = ConfigDict(frozen=True)

    ttft_p50_reuse_ms: float | None
    ttft_p50_control_ms: float | None
    ttft_speedup: float | None  # control p50 / reuse p50: > 1 means the prefix cache helped
    cached_fraction_reuse: float | None
    cached_fraction_control: float | None


def _group_stats(recs: Sequence[RequestRecord]) -> GroupStats:
    prompt = [r.prompt_tokens if r.prompt_tokens is not None else r.expected_input_tokens for r in recs]
    known = [p for p in prompt if p is not None]
    speeds = []
    for r, p in zip(recs, prompt, strict=True):
        ttft = metrics.ttft(r)
        if p and ttft and ttft > 0:
            speeds.append(p / ttft)
    cached = [
        (r.cached_tokens, r.prompt_tokens) for r in recs if r.cached_tokens is not None and r.prompt_tokens
    ]
    return GroupStats(
        requests=len(recs),
        ttft_ms=stats_ms(metrics.ttft(r) for r in recs),
        input_tokens_mean=sum(known) / len(known) if known else None,
        prefill_tokens_per_s_p50=metrics.percentile(speeds, 50) if speeds else None,
        cached_fraction=sum(c for c, _ in cached) / sum(p for _, p in cached if p) if cached else None,
    )


def _sort_key(value: str) -> tuple[int, float | str]:
    try:
        return (0, float(value))
    except ValueError:
        return (1, value)


def breakdowns(records: Iterable[RequestRecord], workload_kind: str | None) -> list[Breakdown]:
    """Stats of the successful measured requests grouped by each tag the workload kind is broken down by."""
    tags = BREAKDOWN_TAGS.get(workload_kind or "", ())
    ok = [r for r in records if r.phase == "measure" and r.ok]
    out = []
    for tag in tags:
        groups: dict[str, list[RequestRecord]] = {}
        for r in ok:
            if tag in r.tags:
                groups.setdefault(r.tags[tag], []).append(r)
        if groups:
            ordered = sorted(groups, key=_sort_key)
            out.append(Breakdown(tag=tag, groups={k: _group_stats(groups[k]) for k in ordered}))
    return out


def prefix_reuse(found: Sequence[Breakdown]) -> PrefixReuse | None:
    by_role = next((b for b in found if b.tag == "role"), None)
    if by_role is None or "reuse" not in by_role.groups or "control" not in by_role.groups:
        return None
    reuse, control = by_role.groups["reuse"], by_role.groups["control"]
    a, b = reuse.ttft_ms.p50, control.ttft_ms.p50
    return PrefixReuse(
        ttft_p50_reuse_ms=a,
        ttft_p50_control_ms=b,
        ttft_speedup=b / a if a and b else None,
        cached_fraction_reuse=reuse.cached_fraction,
        cached_fraction_control=control.cached_fraction,
    )


def describe(engine: str, point: str, found: Sequence[Breakdown], reuse: PrefixReuse | None) -> list[str]:
    """One line per breakdown for the terminal, e.g. `vllm concurrency=4: TTFT p50 by turn: 1: 51 ms (12) | ...`."""
    lines = []
    for b in found:
        parts = []
        for value, g in b.groups.items():
            ttft = "–" if g.ttft_ms.p50 is None else f"{g.ttft_ms.p50:,.0f} ms"
            extra = ""
            if b.tag == "fraction" and g.prefill_tokens_per_s_p50 is not None:
                extra = f", {g.input_tokens_mean or 0:,.0f} tok at {g.prefill_tokens_per_s_p50:,.0f} tok/s"
            if b.tag == "role" and g.cached_fraction is not None:
                extra = f", {g.cached_fraction:.0%} cached"
            parts.append(f"{value}: {ttft} (n={g.requests}{extra})")
        lines.append(f"{engine} {point}: TTFT p50 by {b.tag}: " + " | ".join(parts))
    if reuse is not None and reuse.ttft_speedup is not None:
        lines.append(f"{engine} {point}: shared-prefix TTFT speed-up vs control: {reuse.ttft_speedup:.2f}x")
    return lines
