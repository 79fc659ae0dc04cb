"""Per-request metrics derived from a RequestRecord, and the percentile statistics over them.

Pure functions, no I/O. Every metric is defined once here and in docs/metrics.md; times in a record are seconds
(monotonic offsets from the run start), statistics are reported in milliseconds. Latency counts from `scheduled`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from harness.records import RequestRecord

__all__ = [
    "PERCENTILES",
    "LatencyStats",
    "OutputTokenSource",
    "TokenCount",
    "e2e",
    "itl_array",
    "itl_samples",
    "output_tokens",
    "percentile",
    "send_lag",
    "stats_ms",
    "tpot",
    "ttft",
]

PERCENTILES = (50, 90, 95, 99)
# Where an output-token count came from: what the record says (server usage, engine or client tokenizer), or, when it
# says nothing, the number of tokens the client saw in the stream ("client_count", a flagged fallback).
OutputTokenSource = Literal["server_usage", "engine_tokenizer", "client_estimate", "client_count"]


@dataclass(frozen=True, slots=True)
class TokenCount:
    value: int
    source: OutputTokenSource


def ttft(rec: RequestRecord) -> float | None:
    """Time to first token: arrival of the first chunk that carried output tokens, minus `scheduled`."""
    if not rec.chunk_times:
        return None
    return rec.chunk_times[0] - rec.scheduled


def e2e(rec: RequestRecord) -> float | None:
    """End-to-end latency: `done` minus `scheduled`."""
    if rec.done is None:
        return None
    return rec.done - rec.scheduled


def send_lag(rec: RequestRecord) -> float | None:
    """How late the client sent the request: `sent` minus `scheduled` (the client's own queueing delay)."""
    if rec.sent is None:
        return None
    return rec.sent - rec.scheduled


def itl_samples(rec: RequestRecord) -> list[float]:
    """Inter-token latencies of one request, one sample per output token after the first chunk.

    A chunk carrying k tokens that arrives dt after the previous token-carrying chunk contributes k samples of dt/k
    (the gap is shared by the tokens it delivered). The first chunk's tokens contribute none: their wait is TTFT.
    """
    return [float(x) for x in itl_array(rec)]


def itl_array(rec: RequestRecord) -> np.ndarray:
    """`itl_samples` as a numpy array (what summaries use: no Python loop per token)."""
    times = np.asarray(rec.chunk_times, dtype=float)
    if times.size < 2:
        return np.empty(0)
    k = np.ones(times.size - 1, dtype=np.int64)
    given = rec.chunk_tokens[1 : times.size]
    k[: len(given)] = given
    keep = k > 0
    dt = np.diff(times)[keep]
    return np.repeat(dt / k[keep], k[keep])


def output_tokens(rec: RequestRecord) -> TokenCount:
    """The request's output-token count: the record's own count with its source, else the stream's chunk count.

    The fallback is flagged `client_count`: it is only as good as the adapter's tokens-per-chunk knowledge.
    """
    if rec.output_tokens is not None and rec.token_source != "none":
        return TokenCount(rec.output_tokens, rec.token_source)
    return TokenCount(rec.client_output_tokens or sum(rec.chunk_tokens), "client_count")


def tpot(rec: RequestRecord) -> float | None:
    """Time per output token after the first: (last token − first token) / (output_tokens − 1).

    None below 2 tokens, and when fewer than 2 chunks carried tokens (a non-streamed answer): no decode time was seen.
    """
    n = output_tokens(rec).value
    if n < 2 or len(rec.chunk_times) < 2:
        return None
    return (rec.chunk_times[-1] - rec.chunk_times[0]) / (n - 1)


class LatencyStats(BaseModel):
    """Summary statistics of one latency metric, in milliseconds; all None when there are no samples."""

    model_config = ConfigDict(frozen=True)

    count: int = 0
    mean: float | None = None
    p50: float | None = None
    p90: float | None = None
    p95: float | None = None
    p99: float | None = None
    max: float | None = None

    def get(self, stat: str) -> float | None:
        value = getattr(self, stat)
        return None if value is None else float(value)


def percentile(samples: Sequence[float] | np.ndarray, q: float) -> float:
    """The q-th percentile (0..100) with linear interpolation between closest ranks (numpy's default, "linear")."""
    return float(np.percentile(np.asarray(samples, dtype=float), q, method="linear"))


def stats_ms(samples_s: Iterable[float | None] | np.ndarray) -> LatencyStats:
    """Count, mean, p50/p90/p95/p99 (linear interpolation) and max of samples given in seconds, reported in ms."""
    if isinstance(samples_s, np.ndarray):
        arr = samples_s.astype(float) * 1000.0
    else:
        arr = np.asarray([s for s in samples_s if s is not None], dtype=float) * 1000.0
    if arr.size == 0:
        return LatencyStats()
    p = np.percentile(arr, PERCENTILES, method="linear")
    return LatencyStats(
        count=int(arr.size),
        mean=float(arr.mean()),
        p50=float(p[0]),
        p90=float(p[1]),
        p95=float(p[2]),
        p99=float(p[3]),
        max=float(arr.max()),
    )
