"""The quantized workload's two halves beyond speed: one engine per precision variant, and a quality check.

A quantized run launches the engine once per variant file (F16, Q8_0, Q4_1, Q4_0 ... made with llama-quantize),
each as its own engine name (`llamacpp-Q8_0`), runs the same load points on each, then asks each variant the fixed
greedy prompt set once, with log-probabilities, and keeps the answers in `RUN_DIR/quality/<engine>.jsonl`.
The summary compares every variant's answers with the reference variant's (greedy agreement, log-prob drift), so
the quality numbers are rebuilt from the run directory alone, like everything else.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from adapters.base import Adapter
from harness.errors import ConfigError
from harness.rundir import SCHEMA_VERSION, check_schema

__all__ = ["QUALITY_DIR", "ask_quality_prompts", "quality_summary", "variant_choices"]

QUALITY_DIR = "quality"


def variant_choices(workload: Any, choices: Sequence[Any], make_config: Any) -> tuple[Any, ...]:
    """Each launched engine choice becomes one choice per precision variant of the workload's model.

    `make_config(adapter_name)` gives the engine's default config; the variant's file replaces its model.
    """
    from workloads.quantized import variants

    if any(c.url is not None for c in choices):
        raise ConfigError(
            "the quantized workload launches the engine once per model file; it cannot switch an attached "
            "--endpoint's model: use --engines (e.g. --engines llamacpp)"
        )
    found = variants(workload)
    out = []
    for c in choices:
        base = c.config or make_config(c.adapter)
        for v in found:
            cfg = dataclasses.replace(base, model=str(v.path), quantization=v.file_type)
            out.append(dataclasses.replace(c, name=f"{c.name}-{v.name}", config=cfg, variant=v.name))
    return tuple(out)


async def ask_quality_prompts(
    run_path: Path, engine: str, variant: str, adapter: Adapter, base_url: str, model: str, workload: Any
) -> int:
    """Send the fixed greedy prompts once (not timed), asking for log-probs; keep every answer. Returns how many."""
    from workloads.quantized import output_from_openai, quality_requests

    folder = run_path / QUALITY_DIR
    folder.mkdir(exist_ok=True)
    lines: list[dict[str, Any]] = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
        for spec in quality_requests(workload):
            call = adapter.build(spec, model, False)
            body = {**(call.body or {}), "logprobs": True, "top_logprobs": 1}
            async with session.request(call.method, base_url + call.path, json=body) as resp:
                payload = await resp.read()
                if resp.status != 200:
                    error = payload[:200].decode("utf-8", "replace")
                    lines.append(
                        {"prompt_id": spec.tags["prompt_id"], "error": f"HTTP {resp.status}: {error}"}
                    )
                    continue
            out = output_from_openai(orjson.loads(payload))
            lines.append(
                {
                    "prompt_id": spec.tags["prompt_id"],
                    "text": out.text,
                    "tokens": list(out.tokens) if out.tokens is not None else None,
                    "logprobs": list(out.logprobs) if out.logprobs is not None else None,
                }
            )
    with open(folder / f"{engine}.jsonl", "wb") as f:
        for line in lines:
            f.write(
                orjson.dumps({"schema_version": SCHEMA_VERSION, "engine": engine, "variant": variant, **line})
            )
            f.write(b"\n")
    return len(lines)


def _read(path: Path) -> tuple[str | None, dict[str, Any]]:
    from workloads.quantized import QualityOutput

    variant = None
    outputs: dict[str, Any] = {}
    for i, raw in enumerate(path.read_bytes().splitlines(), start=1):
        obj = orjson.loads(raw)
        check_schema(obj, f"{path} line {i}")
        variant = obj.get("variant", variant)
        if "error" in obj:
            continue
        tokens, logprobs = obj.get("tokens"), obj.get("logprobs")
        outputs[obj["prompt_id"]] = QualityOutput(
            obj["text"], tuple(tokens) if tokens is not None else None, tuple(logprobs) if logprobs else None
        )
    return variant, outputs


def quality_summary(run_path: Path, workload: Mapping[str, Any]) -> dict[str, Any] | None:
    """Greedy agreement and log-prob drift of every variant against the reference one (per engine family)."""
    from workloads.quantized import quality_report

    folder = run_path / QUALITY_DIR
    if not folder.is_dir():
        return None
    reference = (workload.get("params") or {}).get("reference")
    by_engine = {p.stem: _read(p) for p in sorted(folder.glob("*.jsonl"))}
    refs = {name: outputs for name, (variant, outputs) in by_engine.items() if variant == reference}
    if not refs:
        return {"reference": reference, "note": f"no answers from the reference variant {reference!r}"}
    ref_engine, ref_outputs = next(iter(refs.items()))
    report = quality_report(ref_outputs, {name: outputs for name, (_, outputs) in by_engine.items()})
    return {"reference": reference, "reference_engine": ref_engine, **report}
