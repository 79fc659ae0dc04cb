"""LMDeploy: launch (`lmdeploy serve api_server`, image `openmmlab/lmdeploy`), talk (OpenAI API), read (`lmdeploy:*`).

Quirks (InternLM/lmdeploy snapshot of 2026-08-21): `ignore_eos` and `min_new_tokens` are request fields of its
OpenAI API; usage arrives in the last stream chunk only with `stream_options.include_usage`; no version endpoint;
`/v1/encode` tokenizes with the served tokenizer; metrics are on by default (`--disable-metrics` turns them off);
KV-cache quantization is `--quant-policy` (4 = int4, 8 = int8, 16 = fp8 e4m3, 17 = fp8 e5m2).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from adapters.base import (
    EngineConfig,
    EngineInfo,
    FunctionAdapter,
    HttpCall,
    MetricMap,
    optional_flag,
    require,
)
from adapters.knowledge import ENGINE_FACTS, docker_gpu_run, local_gpu_status
from adapters.openai import build_openai, parse_openai_event, parse_openai_response
from workloads.spec import RequestSpec

__all__ = ["ADAPTER", "IMAGE", "INFO", "METRICS", "build", "container_argv", "launch_argv"]

IMAGE = "openmmlab/lmdeploy:latest"
_FACTS = ENGINE_FACTS["lmdeploy"]
QUANT_POLICY = {"int4": 4, "int8": 8, "fp8": 16, "fp8_e4m3": 16, "fp8_e5m2": 17}
MODEL_FORMATS = (
    "hf",
    "awq",
    "gptq",
    "compressed-tensors",
    "fp8",
    "mxfp4",
)  # lmdeploy/cli/utils.py model_format

INFO = EngineInfo(
    name="lmdeploy",
    display_name="LMDeploy",
    hardware=_FACTS.hardware,
    honours_ignore_eos=True,
    honours_min_tokens=True,
    usage_in_stream=True,
    # lmdeploy 0.18.0 serve/core/async_engine.py `generate`: each output carries every token the engine produced
    # since the last read (`token_ids[ids_offset:]`), several under load
    tokens_per_chunk="variable",
    tokenize_path="/v1/encode",
    health_path="/health",
    version_path=None,
    metrics_path="/metrics",
    maintenance=_FACTS.maintenance,
    sources=_FACTS.sources,
    container_image=IMAGE,
)

# Names from lmdeploy/metrics/loggers.py (snapshot 2026-08-21).
METRICS = MetricMap(
    names={
        "lmdeploy:num_requests_running": "requests_running",
        "lmdeploy:num_requests_waiting": "requests_waiting",
        "lmdeploy:gpu_cache_usage_perc": "kv_cache_usage",  # a fraction: "1 means 100 percent usage"
        "lmdeploy:prompt_tokens_total": "prompt_tokens_total",
        "lmdeploy:generation_tokens_total": "generation_tokens_total",
        "lmdeploy:cached_tokens_total": "prompt_tokens_cached_total",
        "lmdeploy:request_success_total": "requests_finished_total",
        "lmdeploy:time_to_first_token_seconds": "ttft_seconds",
        "lmdeploy:time_per_output_token_seconds": "itl_seconds",
        "lmdeploy:e2e_request_latency_seconds": "e2e_seconds",
        "lmdeploy:request_queue_time_seconds": "queue_seconds",
    }
)


def _backend(cfg: EngineConfig) -> str:
    return cfg.env.get("LMDEPLOY_BACKEND", "turbomind")


def _flags(cfg: EngineConfig, host: str) -> list[str]:
    require(cfg.tensor_parallel >= 1, f"lmdeploy: tensor_parallel must be >= 1, not {cfg.tensor_parallel}")
    require(
        cfg.dtype in (None, "auto", "float16", "bfloat16"),
        f"lmdeploy: dtype={cfg.dtype} is not supported (auto, float16, bfloat16)",
    )
    require(
        cfg.kv_cache_dtype is None or cfg.kv_cache_dtype in QUANT_POLICY,
        f"lmdeploy: kv_cache_dtype={cfg.kv_cache_dtype} is not supported (one of {', '.join(QUANT_POLICY)})",
    )
    require(
        cfg.quantization is None or cfg.quantization in MODEL_FORMATS,
        f"lmdeploy: quantization={cfg.quantization} is not a --model-format it reads ({', '.join(MODEL_FORMATS)})",
    )
    require(cfg.threads is None, "lmdeploy: threads is not a server setting; remove --threads")
    # flags: lmdeploy/cli/serve.py + lmdeploy/cli/utils.py (InternLM/lmdeploy snapshot 2026-08-21, read 2026-11-24)
    flags = ["--server-name", host, "--server-port", str(cfg.port), "--backend", _backend(cfg)]
    flags += optional_flag("--model-name", cfg.served_model_name)
    flags += optional_flag("--dtype", cfg.dtype)
    flags += optional_flag("--model-format", cfg.quantization)
    if cfg.kv_cache_dtype is not None:
        flags += ["--quant-policy", str(QUANT_POLICY[cfg.kv_cache_dtype])]
    flags += optional_flag("--session-len", cfg.max_context)
    flags += optional_flag("--max-batch-size", cfg.max_num_seqs)
    # --cache-max-entry-count is the fraction of *free* GPU memory (after weights) given to the KV cache
    flags += optional_flag("--cache-max-entry-count", cfg.gpu_memory_fraction)
    if cfg.tensor_parallel != 1:
        flags += ["--tp", str(cfg.tensor_parallel)]
    if cfg.prefix_caching:  # off by default
        flags.append("--enable-prefix-caching")
    return flags + list(cfg.extra_args)


def launch_argv(cfg: EngineConfig) -> list[str]:
    # `lmdeploy serve api_server MODEL`: docs/en/llm/api_server.md (snapshot 2026-08-21, read 2026-11-24)
    return ["lmdeploy", "serve", "api_server", cfg.model, *_flags(cfg, cfg.host)]


def launch_env(cfg: EngineConfig) -> dict[str, str]:
    return {k: v for k, v in cfg.env.items() if k != "LMDEPLOY_BACKEND"}


def container_argv(cfg: EngineConfig, runtime: str = "docker") -> list[str]:
    # docker run --runtime nvidia --gpus all -p 23333:23333 --ipc=host openmmlab/lmdeploy:latest
    # lmdeploy serve api_server MODEL: docs/en/llm/api_server.md "Option 2" (snapshot 2026-08-21, read 2026-11-24)
    inner = replace(cfg, env=launch_env(cfg))
    argv, model = docker_gpu_run(
        IMAGE, inner, runtime=runtime, name="lmdeploy", extra=("--runtime", "nvidia", "--ipc=host")
    )
    return [*argv, "lmdeploy", "serve", "api_server", model, *_flags(cfg, "0.0.0.0")]


def build(spec: RequestSpec, model: str, stream: bool) -> HttpCall:
    return build_openai(spec, model, stream, pin_fields={"ignore_eos": True})


def version_from(payload: Mapping[str, Any]) -> str | None:
    return None  # LMDeploy has no version endpoint; the launcher records `lmdeploy --version`


def tokenize_call(text: str, model: str, add_special: bool = False) -> HttpCall:
    return HttpCall(
        "POST", "/v1/encode", {"input": text, "do_preprocess": False, "add_bos": add_special}, False
    )


def tokens_from(payload: Mapping[str, Any]) -> list[int]:
    return [int(t) for t in payload.get("input_ids") or []]


def local_status() -> tuple[bool, str]:
    return local_gpu_status("lmdeploy", binaries=("lmdeploy",))


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
