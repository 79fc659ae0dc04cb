"""MLC-LLM: launch (`mlc_llm serve`), talk (OpenAI API), read (its untyped `/metrics` text). No official image.

Settings are `--overrides "k=v;..."` fields of EngineConfigOverride (python/mlc_llm/cli/serve.py, snapshot
2026-07-23). The weights' quantization (e.g. q4f16_1) is compiled into the MLC model, named in its folder / hub id.
Quirks: `ignore_eos` exists only inside `debug_config`, which the server drops unless started with `--enable-debug`
(always added here; an attached server without it does not pin lengths); usage in the last chunk with
`stream_options.include_usage`; no health or version endpoint (`/v1/models` answers once the engine is up).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adapters.base import (
    EngineConfig,
    EngineInfo,
    FunctionAdapter,
    HttpCall,
    MetricMap,
    no_tokenizer,
    require,
)
from adapters.knowledge import ENGINE_FACTS, local_gpu_status
from adapters.openai import build_openai, parse_openai_event, parse_openai_response
from workloads.spec import RequestSpec

__all__ = ["ADAPTER", "INFO", "METRICS", "build", "container_argv", "launch_argv", "overrides"]

_FACTS = ENGINE_FACTS["mlc"]

INFO = EngineInfo(
    name="mlc",
    display_name="MLC-LLM",
    hardware=_FACTS.hardware,
    honours_ignore_eos=True,  # via debug_config, with --enable-debug (which launch_argv adds)
    honours_min_tokens=False,
    usage_in_stream=True,
    tokens_per_chunk="variable",  # one per step; several with speculative decoding (--speculative-mode)
    tokenize_path=None,
    health_path="/v1/models",
    version_path=None,
    metrics_path="/metrics",
    maintenance=_FACTS.maintenance,
    sources=_FACTS.sources,
    container_image=None,
)

# EngineMetrics.prometheus_text (python/mlc_llm/serve/engine_base.py) prints `key<TAB>value` for the engine
# metrics of cpp/serve/metrics.cc; only cumulative token counts map onto canonical names. Per cpp/serve/metrics.h
# (mlc-ai/mlc-llm, read 2026-11-24): `prompt_tokens_sum` / `completion_tokens_sum` are the finished requests'
# input / output tokens; `prefill_tokens_sum` excludes the prefix-cached length and `decode_tokens_sum` includes
# tokens rolled back later (speculative decoding), so neither is the canonical prompt / generation count.
METRICS = MetricMap(
    names={
        "prompt_tokens_sum": "prompt_tokens_total",
        "completion_tokens_sum": "generation_tokens_total",
    }
)


def overrides(cfg: EngineConfig) -> str:
    """The `--overrides` string for the normalized settings (empty when none apply)."""
    pairs: list[tuple[str, object]] = []
    if cfg.max_num_seqs is not None:
        pairs.append(("max_num_sequence", cfg.max_num_seqs))
    if cfg.max_context is not None:
        pairs.append(("context_window_size", cfg.max_context))
    if cfg.gpu_memory_fraction is not None:
        pairs.append(("gpu_memory_utilization", cfg.gpu_memory_fraction))
    if cfg.tensor_parallel != 1:
        pairs.append(("tensor_parallel_shards", cfg.tensor_parallel))
    return ";".join(f"{k}={v}" for k, v in pairs)


def launch_argv(cfg: EngineConfig) -> list[str]:
    require(cfg.tensor_parallel >= 1, f"mlc: tensor_parallel must be >= 1, not {cfg.tensor_parallel}")
    require(
        cfg.quantization is None or cfg.quantization.lower() in cfg.model.lower(),
        f"mlc: quantization={cfg.quantization} is compiled into the MLC model; serve a model built with it "
        f"(e.g. ...-{cfg.quantization}-MLC) instead of passing --quantization",
    )
    require(
        cfg.dtype is None, "mlc: dtype is part of the MLC quantization code (e.g. q4f16_1); remove --dtype"
    )
    require(
        cfg.kv_cache_dtype is None, "mlc: kv_cache_dtype is not supported (KV cache follows the model dtype)"
    )
    require(cfg.threads is None, "mlc: threads is not a server setting; remove --threads")
    # `mlc_llm serve MODEL [--mode MODE] [--overrides OVERRIDES] --host --port`: docs/deploy/rest.rst and
    # python/mlc_llm/cli/serve.py (snapshot 2026-07-23, read 2026-11-24)
    argv = ["mlc_llm", "serve", cfg.model, "--mode", "server", "--host", cfg.host, "--port", str(cfg.port)]
    argv.append("--enable-debug")  # accepts debug_config.ignore_eos, which pins output length
    if cfg.prefix_caching is not None:
        argv += ["--prefix-cache-mode", "radix" if cfg.prefix_caching else "disable"]
    extra = overrides(cfg)
    if extra:
        argv += ["--overrides", extra]
    return argv + list(cfg.extra_args)


def launch_env(cfg: EngineConfig) -> dict[str, str]:
    return dict(cfg.env)


def container_argv(cfg: EngineConfig, runtime: str = "docker") -> list[str]:
    require(False, "mlc: MLC-LLM publishes no official server image; run `mlc_llm serve` as a local process")
    return []


def build(spec: RequestSpec, model: str, stream: bool) -> HttpCall:
    return build_openai(spec, model, stream, pin_fields={"debug_config": {"ignore_eos": True}})


def version_from(payload: Mapping[str, Any]) -> str | None:
    return None


tokenize_call, tokens_from = no_tokenizer("mlc: no tokenize endpoint")


def local_status() -> tuple[bool, str]:
    return local_gpu_status("mlc", binaries=("mlc_llm",))


ADAPTER = FunctionAdapter(
    info=INFO,
    metrics=METRICS,
    launch_argv=launch_argv,
    launch_env=launch_env,
    container_argv=container_argv,
    build=build,
    parse_event=parse_openai_event,
    parse_response=parse_openai_response,
    version_from=version_from,
    local_status=local_status,
    tokenize_call=tokenize_call,
    tokens_from=tokens_from,
)
