"""SGLang: launch (`python -m sglang.launch_server`, image `lmsysorg/sglang`), talk (OpenAI API), read (`sglang:*`).

Quirks: honours `ignore_eos` and `min_tokens` as extra body fields; usage in streams with
`stream_options.include_usage`; one token per chunk by default (`--stream-interval 1`), several with speculative
decoding or a larger stream interval; metrics only with `--enable-metrics` and cached-token counts in usage
(`prompt_tokens_details.cached_tokens`) only with `--enable-cache-report` (both always added here; sglang 0.5.23
srt/arg_groups/fields/serving.py, srt/entrypoints/openai/usage_processor.py). The version is read from
`/server_info` (`/get_server_info` is its deprecated alias, srt/entrypoints/http_server.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adapters.base import (
    CacheReset,
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

__all__ = ["ADAPTER", "IMAGE", "INFO", "METRICS", "build", "container_argv", "launch_argv", "version_from"]

IMAGE = "lmsysorg/sglang:latest"
_FACTS = ENGINE_FACTS["sglang"]
KV_DTYPES = ("auto", "fp8_e4m3", "fp8_e5m2", "fp4_e2m1", "bf16", "bfloat16")

INFO = EngineInfo(
    name="sglang",
    display_name="SGLang",
    hardware=_FACTS.hardware,
    honours_ignore_eos=True,
    honours_min_tokens=True,
    usage_in_stream=True,
    tokens_per_chunk="variable",  # one by default; several with speculative decoding or --stream-interval > 1
    tokenize_path="/tokenize",
    health_path="/health",
    version_path="/server_info",
    metrics_path="/metrics",
    maintenance=_FACTS.maintenance,
    sources=_FACTS.sources,
    container_image=IMAGE,
    # sgl-project/sglang python/sglang/srt/entrypoints/http_server.py `@app.api_route("/flush_cache", methods=["GET",
    # "POST"])`: 200 when flushed, 400 while requests run or wait (read 2026-12-07)
    cache_reset=CacheReset("POST", "/flush_cache"),
)

# Names from the example dump in docs.sglang.io/references/production_metrics.html (read 2026-11-24).
METRICS = MetricMap(
    names={
        "sglang:num_running_reqs": "requests_running",
        "sglang:num_queue_reqs": "requests_waiting",
        "sglang:token_usage": "kv_cache_usage",
        "sglang:prompt_tokens_total": "prompt_tokens_total",
        "sglang:generation_tokens_total": "generation_tokens_total",
        "sglang:cached_tokens_total": "prompt_tokens_cached_total",
        "sglang:num_requests_total": "requests_finished_total",
        "sglang:time_to_first_token_seconds": "ttft_seconds",
        "sglang:inter_token_latency_seconds": "itl_seconds",
        "sglang:time_per_output_token_seconds": "itl_seconds",  # older releases
        "sglang:e2e_request_latency_seconds": "e2e_seconds",
        "sglang:queue_time_seconds": "queue_seconds",
    }
)


def _flags(cfg: EngineConfig, host: str, model: str) -> list[str]:
    require(cfg.tensor_parallel >= 1, f"sglang: tensor_parallel must be >= 1, not {cfg.tensor_parallel}")
    require(
        cfg.kv_cache_dtype is None or cfg.kv_cache_dtype in KV_DTYPES,
        f"sglang: kv_cache_dtype={cfg.kv_cache_dtype} is not supported (choose one of {', '.join(KV_DTYPES)})",
    )
    require(
        cfg.threads is None, "sglang: threads is not a server setting; pin CPU threads with taskset / OMP env"
    )
    # flags: docs.sglang.io/advanced_features/server_arguments.html, read 2026-11-24
    flags = ["--model-path", model, "--host", host, "--port", str(cfg.port), "--enable-metrics"]
    flags.append("--enable-cache-report")
    flags += optional_flag("--served-model-name", cfg.served_model_name)
    flags += optional_flag("--dtype", cfg.dtype)
    flags += optional_flag("--quantization", cfg.quantization)
    flags += optional_flag("--kv-cache-dtype", cfg.kv_cache_dtype)
    flags += optional_flag("--context-length", cfg.max_context)
    flags += optional_flag("--max-running-requests", cfg.max_num_seqs)
    flags += optional_flag("--mem-fraction-static", cfg.gpu_memory_fraction)
    if cfg.tensor_parallel != 1:
        flags += ["--tp-size", str(cfg.tensor_parallel)]
    if cfg.prefix_caching is False:  # RadixAttention prefix caching is on by default
        flags.append("--disable-radix-cache")
    return flags + list(cfg.extra_args)


def launch_argv(cfg: EngineConfig) -> list[str]:
    # `python -m sglang.launch_server --model-path M --tp 2`: docs.sglang.io/advanced_features/server_arguments.html
    # (read 2026-11-24)
    return ["python3", "-m", "sglang.launch_server", *_flags(cfg, cfg.host, cfg.model)]


def launch_env(cfg: EngineConfig) -> dict[str, str]:
    return dict(cfg.env)


def container_argv(cfg: EngineConfig, runtime: str = "docker") -> list[str]:
    # docker run --gpus all --ipc host --ulimit memlock=-1 --ulimit stack=67108864 -p 30000:30000 lmsysorg/sglang
    # python3 -m sglang.launch_server ...: docs.sglang.io/docs/get-started/install.md and docker/compose.yaml
    # (read 2026-11-24)
    extra = ("--ipc=host", "--ulimit", "memlock=-1", "--ulimit", "stack=67108864", "--shm-size", "32g")
    argv, model = docker_gpu_run(IMAGE, cfg, runtime=runtime, name="sglang", extra=extra)
    return [*argv, "python3", "-m", "sglang.launch_server", *_flags(cfg, "0.0.0.0", model)]


def build(spec: RequestSpec, model: str, stream: bool) -> HttpCall:
    return build_openai(spec, model, stream, pin_fields={"ignore_eos": True})


def version_from(payload: Mapping[str, Any]) -> str | None:
    version = payload.get("version")
    return str(version) if version else None


def tokenize_call(text: str, model: str, add_special: bool = False) -> HttpCall:
    return HttpCall(
        "POST", "/tokenize", {"model": model, "prompt": text, "add_special_tokens": add_special}, False
    )


def tokens_from(payload: Mapping[str, Any]) -> list[int]:
    return [int(t) for t in payload.get("tokens") or []]


def local_status() -> tuple[bool, str]:
    return local_gpu_status("sglang", modules=("sglang",))


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
