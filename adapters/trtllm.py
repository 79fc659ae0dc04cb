"""TensorRT-LLM: launch (`trtllm-serve`, image `nvcr.io/nvidia/tensorrt-llm/release`), talk (OpenAI API), read.

Quirks: `ignore_eos` and `min_tokens` are fields of trtllm-serve's OpenAI request (PyTorch backend); the Triton
TensorRT-LLM backend lacks `ignore_eos` (PITFALLS 10). Stream chunks can carry several tokens (reported for
TRT-LLM in the project's brief and PITFALLS 3; not re-verified in its source here), so per-chunk token counts are
not trusted and usage decides. Prefix caching (`kv_cache_config.enable_block_reuse`), `dtype` and the KV-cache dtype
live in the `--config` YAML, not on the command line. `/metrics` is JSON iteration statistics
(docs/source/commands/trtllm-serve.rst); the Prometheus text of MetricsCollector (`trtllm_*` names, as documented by
NVIDIA Dynamo for TRT-LLM 1.1) is expected at `/prometheus/metrics`, a path not confirmed from TRT-LLM's own docs
(the live test takes ENGINEBENCH_METRICS_TRTLLM to override it).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import yaml

from adapters.base import (
    EngineConfig,
    EngineInfo,
    FunctionAdapter,
    HttpCall,
    MetricMap,
    no_tokenizer,
    optional_flag,
    require,
)
from adapters.knowledge import ENGINE_FACTS, docker_gpu_run, local_gpu_status
from adapters.openai import build_openai, parse_openai_event, parse_openai_response
from workloads.spec import RequestSpec

__all__ = ["ADAPTER", "IMAGE", "INFO", "METRICS", "build", "container_argv", "launch_argv", "yaml_needed"]

IMAGE = "nvcr.io/nvidia/tensorrt-llm/release:latest"
_FACTS = ENGINE_FACTS["trtllm"]
_CONFIG_FLAGS = ("--config", "--extra_llm_api_options")

INFO = EngineInfo(
    name="trtllm",
    display_name="TensorRT-LLM (trtllm-serve)",
    hardware=_FACTS.hardware,
    honours_ignore_eos=True,  # trtllm-serve; the Triton TRT-LLM backend does not (see triton adapter)
    honours_min_tokens=True,
    usage_in_stream=True,
    tokens_per_chunk="several",
    tokenize_path=None,
    health_path="/health",
    version_path="/version",
    metrics_path="/prometheus/metrics",
    maintenance=_FACTS.maintenance,
    sources=_FACTS.sources,
    container_image=IMAGE,
)

# MetricsCollector names as documented for TRT-LLM 1.1 (trtllm_ prefix; Dynamo's docs show `trtllm:` too).
METRICS = MetricMap(
    names={
        "trtllm_request_success_total": "requests_finished_total",
        "trtllm_time_to_first_token_seconds": "ttft_seconds",
        "trtllm_time_per_output_token_seconds": "itl_seconds",
        "trtllm_e2e_request_latency_seconds": "e2e_seconds",
        "trtllm_request_queue_time_seconds": "queue_seconds",
        "trtllm:request_success_total": "requests_finished_total",
        "trtllm:time_to_first_token_seconds": "ttft_seconds",
        "trtllm:time_per_output_token_seconds": "itl_seconds",
        "trtllm:e2e_request_latency_seconds": "e2e_seconds",
        "trtllm:request_queue_time_seconds": "queue_seconds",
    }
)


def yaml_needed(cfg: EngineConfig) -> dict[str, Any]:
    """The `--config` YAML keys the settings without a command-line flag need (LLM API argument names)."""
    out: dict[str, Any] = {}
    kv: dict[str, Any] = {}
    if cfg.prefix_caching is not None:
        kv["enable_block_reuse"] = cfg.prefix_caching
    if cfg.kv_cache_dtype is not None:
        kv["dtype"] = cfg.kv_cache_dtype
    if kv:
        out["kv_cache_config"] = kv
    if cfg.dtype is not None:
        out["dtype"] = cfg.dtype
    return out


def _flags(cfg: EngineConfig, host: str) -> list[str]:
    require(cfg.tensor_parallel >= 1, f"trtllm: tensor_parallel must be >= 1, not {cfg.tensor_parallel}")
    require(cfg.threads is None, "trtllm: threads is not a server setting; remove --threads")
    needs = yaml_needed(cfg)
    if needs and not any(f in cfg.extra_args for f in _CONFIG_FLAGS):
        settings = [k for k in ("prefix_caching", "kv_cache_dtype", "dtype") if getattr(cfg, k) is not None]
        snippet = yaml.safe_dump(needs, default_flow_style=True, sort_keys=False).strip()
        require(
            False,
            f"trtllm: {', '.join(settings)} has no trtllm-serve flag; put `{snippet}` in a YAML file and add "
            "`--config FILE` to the extra engine arguments",
        )
    # flags: tensorrt_llm/commands/serve.py (click options; read 2026-11-24)
    flags = ["--host", host, "--port", str(cfg.port), "--backend", cfg.env.get("TRTLLM_BACKEND", "pytorch")]
    flags += optional_flag("--max_batch_size", cfg.max_num_seqs)
    flags += optional_flag("--max_seq_len", cfg.max_context)
    flags += optional_flag("--kv_cache_free_gpu_memory_fraction", cfg.gpu_memory_fraction)
    if cfg.tensor_parallel != 1:
        flags += ["--tp_size", str(cfg.tensor_parallel)]
    # quantization: the PyTorch backend reads it from a ModelOpt-quantized checkpoint; there is no flag. The value
    # stays in EngineConfig as a declaration so the parity check can compare it.
    return flags + list(cfg.extra_args)


def launch_argv(cfg: EngineConfig) -> list[str]:
    # `trtllm-serve <model> [--backend pytorch --tp_size <tp> --host <host> --port <port>]`:
    # docs/source/commands/trtllm-serve.rst (read 2026-11-24)
    return ["trtllm-serve", cfg.model, *_flags(cfg, cfg.host)]


def launch_env(cfg: EngineConfig) -> dict[str, str]:
    return {k: v for k, v in cfg.env.items() if k != "TRTLLM_BACKEND"}


def container_argv(cfg: EngineConfig, runtime: str = "docker") -> list[str]:
    # docker run --rm -it --ipc host -p 8000:8000 --gpus all --ulimit memlock=-1 --ulimit stack=67108864
    # nvcr.io/nvidia/tensorrt-llm/release:<tag>: nvidia.github.io/TensorRT-LLM/1.2.0rc6/commands/trtllm-serve/
    # run-benchmark-with-trtllm-serve.html (read 2026-11-24)
    extra = ("--ipc=host", "--ulimit", "memlock=-1", "--ulimit", "stack=67108864")
    inner = replace(cfg, env=launch_env(cfg))
    argv, model = docker_gpu_run(IMAGE, inner, runtime=runtime, name="trtllm", extra=extra)
    return [*argv, "trtllm-serve", model, *_flags(cfg, "0.0.0.0")]


def build(spec: RequestSpec, model: str, stream: bool) -> HttpCall:
    return build_openai(spec, model, stream, pin_fields={"ignore_eos": True, "min_tokens": spec.max_tokens})


def version_from(payload: Mapping[str, Any]) -> str | None:
    version = payload.get("version")
    return str(version) if version else None


tokenize_call, tokens_from = no_tokenizer(
    "trtllm: trtllm-serve has no tokenize endpoint; count tokens from usage"
)


def local_status() -> tuple[bool, str]:
    return local_gpu_status("trtllm", binaries=("trtllm-serve",))


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
