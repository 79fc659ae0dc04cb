"""The matrix's view of measurements: load points and engines, built by the caller from run directories.

The matrix never reads files. `harness/decide.py` turns `summary.json` + `manifest.json` into these frozen records;
tests build them directly. Only the fields the decision needs are kept, with `None` for anything not measured.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Literal

__all__ = ["EngineInfo", "Point", "WorkloadRole", "classify_workload"]

WorkloadRole = Literal["general", "long_context", "shared_prefix", "shared_prefix_control"]


def classify_workload(name: str, params: Mapping[str, object] | None = None) -> WorkloadRole:
    """The role a workload plays in the criteria: a `role` param wins; otherwise the name decides.

    `*prefix*control*` → shared_prefix_control, `*prefix*` → shared_prefix, `*long*` → long_context, else general.
    """
    role = (params or {}).get("role")
    if role in ("general", "long_context", "shared_prefix", "shared_prefix_control"):
        return role
    n = name.lower().replace("_", "-")
    if "prefix" in n and "control" in n:
        return "shared_prefix_control"
    if "prefix" in n:
        return "shared_prefix"
    if "long" in n:
        return "long_context"
    return "general"


@dataclass(frozen=True, slots=True)
class Point:
    """One load point of one engine on one workload, as summarised in summary.json (latencies in ms)."""

    engine: str
    point: str
    workload: str
    load_kind: str  # "concurrency" | "rate"
    load_value: float
    valid: bool
    role: WorkloadRole = "general"
    run_id: str = ""
    workload_fingerprint: str = ""
    invalid_reasons: tuple[str, ...] = ()
    measured_requests: int | None = None
    requests_per_s: float | None = None
    input_tokens_per_s: float | None = None
    output_tokens_per_s: float | None = None
    goodput_requests_per_s: float | None = None
    error_rate: float | None = None
    # {"ttft": {"p50": .., "p95": ..}, "tpot": {...}, "itl": {...}, "e2e": {...}}
    latency_ms: Mapping[str, Mapping[str, float]] = field(default_factory=dict)
    memory_peak_bytes: float | None = None
    # GPU energy per output token of the point's successful requests (NVML power integrated; docs/telemetry.md)
    energy_per_output_token_j: float | None = None
    closed_loop: bool = True
    # TTFT p50 (ms) of the point's measured ok requests grouped by their `role` tag (shared-prefix workload:
    # "reuse" and "control"); empty when the caller did not read the records
    ttft_p50_by_role: Mapping[str, float] = field(default_factory=dict)
    # share of the prompt tokens the engine's prefix cache served, and the share the workload meant it to (summary
    # `cache`, docs/metrics.md "Cache share"): it explains a TTFT
    cache_share: float | None = None
    cache_expected_share: float | None = None

    def latency(self, metric: str, stat: str) -> float | None:
        value = self.latency_ms.get(metric, {}).get(stat)
        return float(value) if value is not None else None

    @property
    def in_flight(self) -> float | None:
        """Requests in flight: the concurrency of a closed loop, else Little's law (rate × mean E2E)."""
        if self.load_kind == "concurrency":
            return self.load_value
        e2e = self.latency("e2e", "mean")
        if self.requests_per_s is None or e2e is None:
            return None
        return self.requests_per_s * e2e / 1000.0


@dataclass(frozen=True, slots=True)
class EngineInfo:
    """What the manifests say about an engine: adapter (the knowledge key), cold start, the platform it ran on."""

    name: str
    adapter: str = ""
    cold_start_s: float | None = None
    platform: str = "cpu"  # "cpu" | "nvidia" | "amd" | ...
    version: str | None = None
    config: Mapping[str, object] = field(default_factory=dict)
