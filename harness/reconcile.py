"""Client vs engine: do the client's records of a load point agree with the engine's own counters and histograms?

Pure functions: the point's records (every phase: warm-up, measure and cool-down requests all reached the engine while
the point ran, so the engine's counter deltas cover all of them) and the change of the engine's canonical metrics
between the scrapes at the point's start and end (`adapters.prometheus.delta`) in, a `Reconciliation` out.

- Counts (output tokens vs `generation_tokens_total`, prompt tokens vs `prompt_tokens_total`, finished requests vs
  `requests_finished_total`) must agree exactly; a difference is reported with the likeliest reason (requests that
  failed mid-way, counts that are client estimates rather than the server's usage, traffic from elsewhere).
- TTFT: a Prometheus histogram only resolves an observation to its bucket, so the client's p50/p90, taken at the
  rank the histogram uses (the ceil(q·n)-th smallest TTFT), is set against the bucket interval [lower, upper] that
  holds the engine's p50/p90 (not when that rank is the last: the slowest single request is no quantile).
  Inside it: agree. Above it: time the engine's histogram never sees (the client's queueing and late reads, the
  engine's own HTTP server, tokenizing, detokenizing and writing the stream, the network), so up to `ttft_tolerance`
  above still agrees and the excess is reported. More is split by side: each request's client part is its send lag
  plus how late, at most, it read the first token (`RequestRecord.read_stall`, an upper bound). When even the TTFT
  less every client part stays beyond the tolerance, the client is not why: the server's side spent the time outside
  its histogram, `outside_engine`, a finding, not a measuring error (the client's number is what users wait). When
  the client's part can account for it, the harness may be the bottleneck: `client_delayed`, which the verdict's
  send-lag and read-stall rules judge. Without read stalls (other clients, older runs) it is `disagree`: which side is
  unknown. Below the bucket beyond the tolerance is a disagreement too (the client cannot see a token before the
  engine made it): the two measure different things.
Definitions: docs/telemetry.md.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from adapters.prometheus import Histogram, Value
from harness import metrics
from harness.records import RequestRecord

__all__ = [
    "CountCheck",
    "ReconcilePolicy",
    "Reconciliation",
    "TtftCheck",
    "Verdict",
    "bucket_interval",
    "reconcile",
]

# TTFT above the engine's bucket beyond the tolerance, by side: outside_engine, more than the client's own delays can
# explain (the server's time outside its histogram); client_delayed, the client's delays can account for it (the
# send-lag and read-stall verdict rules judge those); disagree when the client did not watch its loop
Verdict = Literal["agree", "disagree", "outside_engine", "client_delayed", "unavailable"]


@dataclass(frozen=True)
class ReconcilePolicy:
    """How far outside the engine's TTFT bucket the client may fall and still agree: max(abs, rel × client)."""

    ttft_tolerance_ms: float = 25.0
    # 20 %: the engine's TTFT starts after its API server parsed and tokenized the request and ends before the token
    # is serialised and written out; on busy CPUs (vLLM's API server shares 2 cores with the engine and the client)
    # that adds 10-12 % of TTFT (seen: client p50 562 ms against the engine's [250, 500] ms bucket)
    ttft_tolerance_rel: float = 0.20
    quantiles: tuple[float, ...] = (0.5, 0.9)

    def tolerance_ms(self, client_ms: float) -> float:
        return max(self.ttft_tolerance_ms, self.ttft_tolerance_rel * abs(client_ms))


class CountCheck(BaseModel):
    model_config = ConfigDict(frozen=True)

    metric: str  # the engine's canonical counter
    client: float | None
    engine: float | None
    difference: float | None  # client − engine
    verdict: Verdict
    reason: str = ""


class TtftCheck(BaseModel):
    """The client's TTFT quantile against the engine histogram's bucket holding the same quantile (ms)."""

    model_config = ConfigDict(frozen=True)

    quantile: float
    client_ms: float | None
    engine_low_ms: float | None
    engine_high_ms: float | None  # None: the +Inf bucket (only a lower bound is known)
    engine_estimate_ms: float | None  # linear interpolation within the bucket, as PromQL's histogram_quantile
    outside_ms: float | None  # >0: client above the bucket by this much; <0: below it; 0: inside
    tolerance_ms: float | None
    verdict: Verdict
    reason: str = ""


class Reconciliation(BaseModel):
    model_config = ConfigDict(frozen=True)

    status: Verdict  # the first of disagree, outside_engine, client_delayed, agree any check has; else unavailable
    requests: int  # records of the point (all phases)
    failed: int
    counts: list[CountCheck]
    ttft: list[TtftCheck]
    engine_ttft_count: float | None = None
    client_ttft_count: int = 0


def bucket_interval(h: Histogram, q: float) -> tuple[float, float] | None:
    """The (lower, upper) bounds in the histogram's unit of the bucket holding its q-quantile; upper may be +Inf."""
    if not h.count or not h.buckets:
        return None
    rank = q * h.count
    prev = 0.0
    for le, cumulative in h.buckets:
        if cumulative >= rank and cumulative > 0:
            return prev, le
        prev = le
    return prev, math.inf


def _counter(delta: Mapping[str, Value], name: str) -> float | None:
    v = delta.get(name)
    return float(v) if isinstance(v, int | float) and not isinstance(v, bool) else None


def _count_check(
    metric: str, client: float | None, engine: float | None, explain: list[str], missing: str
) -> CountCheck:
    if engine is None:
        return CountCheck(
            metric=metric,
            client=client,
            engine=None,
            difference=None,
            verdict="unavailable",
            reason=f"the engine does not expose {metric}",
        )
    if client is None:
        return CountCheck(
            metric=metric, client=None, engine=engine, difference=None, verdict="unavailable", reason=missing
        )
    diff = client - engine
    if diff == 0:
        return CountCheck(metric=metric, client=client, engine=engine, difference=0.0, verdict="agree")
    side = "fewer" if diff < 0 else "more"
    why = "; ".join(explain) or (
        "no failed requests explain it: other traffic reached the engine during the point, or its counters "
        "lag its responses"
    )
    return CountCheck(
        metric=metric,
        client=client,
        engine=engine,
        difference=diff,
        verdict="disagree",
        reason=f"the client counted {abs(diff):g} {side} than the engine: {why}",
    )


def _counts(recs: list[RequestRecord], delta: Mapping[str, Value]) -> list[CountCheck]:
    ok = [r for r in recs if r.ok]
    failed = [r for r in recs if not r.ok]
    explain = []
    if failed:
        explain.append(
            f"{len(failed)} request(s) did not finish normally; the engine may have processed tokens the client "
            "never received (or never counted)"
        )
    out_counts = [metrics.output_tokens(r) for r in ok]
    estimated = sum(1 for c in out_counts if c.source != "server_usage")
    out_explain = list(explain)
    if estimated:
        out_explain.append(f"{estimated} output count(s) are not the server's usage but client-side counts")
    client_out = sum(c.value for c in out_counts) + sum(
        r.client_output_tokens or sum(r.chunk_tokens) for r in failed
    )
    prompts = [r.prompt_tokens for r in ok if r.prompt_tokens is not None]
    prompt_explain = list(explain)
    if len(prompts) < len(ok):
        prompt_explain.append(f"{len(ok) - len(prompts)} successful request(s) carry no prompt-token usage")
    return [
        _count_check(
            "generation_tokens_total",
            float(client_out),
            _counter(delta, "generation_tokens_total"),
            out_explain,
            "no output tokens recorded",
        ),
        _count_check(
            "prompt_tokens_total",
            float(sum(prompts)) if prompts else None,
            _counter(delta, "prompt_tokens_total"),
            prompt_explain,
            "no request carries the server's prompt-token usage",
        ),
        _count_check(
            "requests_finished_total",
            float(len(ok)),
            _counter(delta, "requests_finished_total"),
            explain,
            "no finished requests",
        ),
    ]


def _ttft_check(
    q: float,
    client_s: list[float],
    client_part_s: list[float] | None,
    h: Histogram | None,
    send_lag_ms: float | None,
    policy: ReconcilePolicy,
) -> TtftCheck:
    # the client's value at the rank the histogram picks its bucket by (the ceil(q·n)-th smallest), not an
    # interpolated percentile: with few requests the two conventions land on different requests (7 requests, p90:
    # interpolation mixes the 6th and the slow 7th, the histogram's bucket holds the 7th alone)
    client_ms = float(np.percentile(client_s, q * 100, method="inverted_cdf")) * 1000.0 if client_s else None
    interval = bucket_interval(h, q) if h is not None else None
    n = len(client_s)
    why = None
    if client_ms is None:
        why = "no client TTFT (no successful streamed request)"
    elif h is None:
        why = "the engine has no TTFT histogram"
    elif interval is None:
        why = "the engine observed no TTFT in this point"
    elif n > 1 and q < 1 and math.ceil(q * n) >= n:
        # a quantile at the last rank is the slowest single request, not a quantile: one request the API server
        # kept before the engine saw it (a freshly started vLLM's first request, 600 ms against 110-130 ms) would
        # decide it
        need = next(k for k in itertools.count(2) if math.ceil(q * k) < k)
        why = f"with {n} requests the p{q * 100:g} is the slowest single request; comparing it needs at least {need}"
    if why is not None:
        return TtftCheck(
            quantile=q,
            client_ms=client_ms,
            engine_low_ms=None,
            engine_high_ms=None,
            engine_estimate_ms=None,
            outside_ms=None,
            tolerance_ms=None,
            verdict="unavailable",
            reason=why,
        )
    assert client_ms is not None and h is not None and interval is not None
    low, high = interval[0] * 1000.0, interval[1] * 1000.0
    estimate = h.quantile(q)
    tol = policy.tolerance_ms(client_ms)
    outside = client_ms - high if client_ms > high else (client_ms - low if client_ms < low else 0.0)
    label = f"client p{q * 100:g} {client_ms:.1f} ms"
    bucket = f"the engine's bucket [{low:g}, {'+Inf' if math.isinf(high) else f'{high:g}'}] ms"
    lag = f", client send lag p50 {send_lag_ms:.1f} ms" if send_lag_ms is not None else ""
    verdict: Verdict = "agree"
    if outside == 0.0:
        reason = f"{label} is inside {bucket}"
    elif outside > 0 and outside <= tol:
        reason = f"{label} is {outside:.1f} ms above {bucket}, within {tol:.1f} ms (time outside the engine)"
    elif outside > 0:
        verdict = "disagree"
        reason = (
            f"{label} is {outside:.1f} ms above {bucket}, more than the {tol:.1f} ms the histogram's resolution "
            "and the way to the engine allow"
        )
        if client_part_s is None:
            reason += (
                f": time spent outside the engine (client queueing{lag}, network, HTTP and SSE handling, a busy "
                "client; this client did not watch its own loop, so which side is unknown)"
            )
        else:
            # the same quantile of TTFT less each request's client part: what is left if the client took the most
            # it can have taken
            served = [t - c for t, c in zip(client_s, client_part_s, strict=True)]
            served_ms = float(np.percentile(served, q * 100, method="inverted_cdf")) * 1000.0
            part_ms = float(np.percentile(client_part_s, q * 100, method="inverted_cdf")) * 1000.0
            if served_ms - high > tol:
                verdict = "outside_engine"
                reason += (
                    f"; the client is not why (its send lag and late reads of the first token, "
                    f"p{q * 100:g} {part_ms:.1f} ms, leave {served_ms - high:.1f} ms above the bucket): the engine's "
                    "server spent it outside its own histogram (HTTP, tokenizing, detokenizing, writing the "
                    "stream) or something between client and engine did (a proxy, the network)"
                )
            else:
                verdict = "client_delayed"
                reason += (
                    f"; the client's own delays can account for it (send lag and late reads of the first token, "
                    f"p{q * 100:g} {part_ms:.1f} ms): the harness, not the engine, may be the "
                    "bottleneck"
                )
    elif -outside <= tol:
        reason = f"{label} is {-outside:.1f} ms below {bucket}, within {tol:.1f} ms"
    else:
        verdict = "disagree"
        reason = (
            f"{label} is {-outside:.1f} ms below {bucket}: the client saw the first token before the engine says "
            "it made it, so the two measure different things (the engine's TTFT may include work the client does "
            "not time, or the histogram holds requests from elsewhere)"
        )
    if len(client_s) != h.count:
        reason += f"; the engine observed {h.count:g} TTFTs, the client {len(client_s)}"
    return TtftCheck(
        quantile=q,
        client_ms=client_ms,
        engine_low_ms=low,
        engine_high_ms=None if math.isinf(high) else high,
        engine_estimate_ms=None if estimate is None else estimate * 1000.0,
        outside_ms=outside,
        tolerance_ms=tol,
        verdict=verdict,
        reason=reason,
    )


def reconcile(
    records: Iterable[RequestRecord],
    engine_delta: Mapping[str, Value],
    policy: ReconcilePolicy | None = None,
) -> Reconciliation:
    """Set every record of one load point (all phases) beside the engine's metric changes over that point."""
    policy = policy or ReconcilePolicy()
    recs = list(records)
    counts = _counts(recs, engine_delta)
    timed = [(r, t) for r in recs if r.ok and (t := metrics.ttft(r)) is not None]
    client_ttft = [t for _, t in timed]
    # each request's client part: its send lag plus how late, at most, it read its first token
    parts = [(metrics.send_lag(r) or 0.0) + r.read_stall for r, _ in timed if r.read_stall is not None]
    client_part = parts if len(parts) == len(timed) else None
    lags = [lag for r in recs if (lag := metrics.send_lag(r)) is not None]
    lag_ms = metrics.percentile(lags, 50) * 1000.0 if lags else None
    h = engine_delta.get("ttft_seconds")
    hist = h if isinstance(h, Histogram) else None
    ttft = [_ttft_check(q, client_ttft, client_part, hist, lag_ms, policy) for q in policy.quantiles]
    verdicts = {c.verdict for c in counts} | {t.verdict for t in ttft}
    status: Verdict = next(
        (v for v in ("disagree", "outside_engine", "client_delayed", "agree") if v in verdicts), "unavailable"
    )
    return Reconciliation(
        status=status,
        requests=len(recs),
        failed=sum(1 for r in recs if not r.ok),
        counts=counts,
        ttft=ttft,
        engine_ttft_count=hist.count if hist is not None else None,
        client_ttft_count=len(client_ttft),
    )
