"""What `bench workloads` shows: the built-in workloads, one workload's parameters, and a preview of its requests.

Data only (lists of dicts); the CLI renders them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import yaml

from harness.errors import BenchError, ConfigError
from workloads.model import QuantizedSpec
from workloads.registry import Workload, list_workloads, load_workload
from workloads.tokenizer import tokenizer_from

__all__ = [
    "WorkloadsConfig",
    "expected_cache",
    "parse_overrides",
    "preview",
    "workload_detail",
    "workloads_table",
]


@dataclass(frozen=True)
class WorkloadsConfig:
    target: str | None = None  # a built-in name or a YAML path; None lists the built-ins
    overrides: Mapping[str, Any] = field(default_factory=dict)
    preview: int = 0
    seed: int | None = None
    tokenizer: str = "simple"


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """`key=value` pairs (values read as YAML scalars: 2048, 0.5, true, chat; dotted keys reach nested fields)."""
    out: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {item!r}: write FIELD=VALUE, e.g. --set max_context=4096")
        out[key.strip()] = yaml.safe_load(value)
    return out


def workloads_table() -> list[dict[str, str]]:
    rows = []
    for w in list_workloads():
        try:
            fingerprint = w.fingerprint[:19]
        except BenchError as e:  # a trace not present here: still list the workload
            fingerprint = f"({e})"[:40]
        rows.append(
            {"name": w.name, "kind": w.kind, "version": str(w.version), "fingerprint": fingerprint,
             "description": w.description}
        )  # fmt: skip
    return rows


def workload_detail(config: WorkloadsConfig) -> tuple[Workload, dict[str, Any]]:
    assert config.target is not None
    w = load_workload(config.target, config.overrides or None)
    seed = w.seed if config.seed is None else config.seed
    info = {
        "name": w.name,
        "kind": w.kind,
        "version": w.version,
        "source": w.source,
        "seed": seed,
        "fingerprint": w.fingerprint_for(seed),
        "params": w.params.model_dump(mode="json", exclude={"name", "version", "kind", "seed"}),
        "expected_cache": expected_cache(w),
    }
    return w, info


def expected_cache(w: Workload) -> str:
    """What share of prompt tokens the workload means the engine's prefix cache to serve (per request: the tag
    `cache_expected_tokens`; docs/workloads.md "Expected cache share")."""
    spec = w.params
    kind = spec.base.kind if isinstance(spec, QuantizedSpec) else spec.kind
    fmt = getattr(spec.base if isinstance(spec, QuantizedSpec) else spec, "format", None)
    if kind == "shared-prefix":
        return (
            "the shared prefix of each reuse request (warm-ups and controls: none), plus the template tokens"
        )
    if kind == "chat":
        return "the history of each later turn (the previous prompt and reply), plus the template tokens"
    if kind == "trace" and fmt == "mooncake":
        return "the leading blocks of each row that an earlier row had (equal hash ids), plus the template tokens"
    return "none: fresh prompts share only the template tokens"


def preview(w: Workload, config: WorkloadsConfig) -> list[dict[str, Any]]:
    tokenizer = tokenizer_from(config.tokenizer)
    rows = []
    for r in w.generate(config.preview, config.seed, tokenizer=tokenizer):
        text = r.prompt or (r.messages[-1]["content"] if r.messages else "")
        rows.append(
            {
                "request_id": r.request_id,
                "api": r.api,
                "input_tokens": r.input_tokens,
                "max_tokens": r.max_tokens,
                "turn": r.turn,
                "history_from": r.history_from,
                "think_time": round(r.think_time, 2),
                "tags": dict(r.tags),
                "text": text[:60],
                "tokenizer": tokenizer.name,
            }
        )
    return rows
