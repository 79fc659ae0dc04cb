"""NVIDIA Triton through its OpenAI-compatible frontend (`python/openai/openai_frontend/main.py`, beta): the
`triton-openai` engine, for users with NVIDIA's image. Triton's native protocol with vLLM behind it, which also runs
on this CPU, is the `triton` engine (adapters/triton_native.py).

Engine settings live in the model repository, not on the command line: for the vLLM backend a `model.json` beside
`config.pbtxt` holds vLLM engine arguments (`vllm_model_json` builds it); the TensorRT-LLM backend reads
`config.pbtxt`. `EngineConfig.model` is the model repository; the tokenizer is `env["TRITON_TOKENIZER"]`.
Quirks (triton-inference-server/server python/openai, commit e1db8a60, 2026-08-19): `engine/utils/triton.py`
`_create_vllm_generate_request` forwards every sampling field, `ignore_eos` / `min_tokens` included, to the vLLM
backend, while `_create_trtllm_generate_request` builds its inputs field by field and drops both: this adapter is the
vLLM backend (the frontend's `--backend vllm` is passed), and `triton-trtllm` (adapters/triton_trtllm.py) the
TensorRT-LLM backend, which cannot pin output lengths. Usage in the last chunk with `stream_options.include_usage`;
readiness is `/health/ready`; `/metrics` carries Triton's `nv_inference_*`, and the vLLM backend adds its `vllm:*`
series only with `REPORT_CUSTOM_METRICS` set in the model's config.pbtxt (vllm_backend src/model.py, commit
8de0c148): the names of its src/utils/metrics.py, no running / waiting / KV-cache gauges. With several models in the
repository the frontend serves them all: set `served_model_name` to the one to benchmark.
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
from adapters.knowledge import ENGINE_FACTS, docker_gpu_run, local_gpu_status
from adapters.openai import build_openai, parse_openai_event, parse_openai_response
from workloads.spec import RequestSpec

__all__ = ["ADAPTER", "IMAGE", "INFO", "METRICS", "build", "container_argv", "launch_argv", "vllm_model_json"]

IMAGE = "nvcr.io/nvidia/tritonserver:26.07-vllm-python-py3"
FRONTEND = "/opt/tritonserver/python/openai/openai_frontend/main.py"
_FACTS = ENGINE_FACTS["triton-openai"]

INFO = EngineInfo(
    name="triton-openai",
    display_name="NVIDIA Triton (OpenAI frontend)",
    hardware=_FACTS.hardware,
    honours_ignore_eos=True,  # vLLM backend; the TensorRT-LLM backend does not
    honours_min_tokens=True,
    usage_in_stream=True,
    tokens_per_chunk="one",  # vLLM backend; TensorRT-LLM backend can send several
    tokenize_path=None,
    health_path="/health/ready",
    version_path=None,
    metrics_path="/metrics",
    maintenance=_FACTS.maintenance,
    sources=_FACTS.sources,
    container_image=IMAGE,
)

# Triton core metrics (docs/user_guide/metrics.md) and the vLLM backend's vllm:* series (vllm_backend
# src/utils/metrics.py, commit 8de0c148, 2026-01-09; only with REPORT_CUSTOM_METRICS). Its
# `vllm:time_per_output_token_seconds` is observed once per decoding step of each request (per token).
CORE_METRICS = {
    "nv_inference_pending_request_count": "requests_waiting",
    "nv_inference_request_success": "requests_finished_total",
}
METRICS = MetricMap(
    names={
        **CORE_METRICS,
        "vllm:prompt_tokens_total": "prompt_tokens_total",
        "vllm:generation_tokens_total": "generation_tokens_total",
        "vllm:time_to_first_token_seconds": "ttft_seconds",
        "vllm:time_per_output_token_seconds": "itl_seconds",
        "vllm:e2e_request_latency_seconds": "e2e_seconds",
    }
)

_IN_REPOSITORY = {
    "tensor_parallel": "tensor_parallel_size",
    "quantization": "quantization",
    "kv_cache_dtype": "kv_cache_dtype",
    "max_num_seqs": "max_num_seqs",
    "prefix_caching": "enable_prefix_caching",
    "max_context": "max_model_len",
    "gpu_memory_fraction": "gpu_memory_utilization",
    "dtype": "dtype",
}


def vllm_model_json(cfg: EngineConfig, hf_model: str) -> dict[str, Any]:
    """The vLLM backend's `model.json` (repository/<name>/1/model.json) for the normalized settings."""
    out: dict[str, Any] = {"model": hf_model}
    for field, key in _IN_REPOSITORY.items():
        value = getattr(cfg, field)
        if field == "tensor_parallel":
            value = None if value == 1 else value
        if value is not None:
            out[key] = value
    return out


def _flags(cfg: EngineConfig, host: str, repository: str, backend: str = "vllm") -> list[str]:
    name = "triton" if backend == "vllm" else "triton-trtllm"
    for field, key in _IN_REPOSITORY.items():
        value = getattr(cfg, field)
        default = 1 if field == "tensor_parallel" else None
        where = (
            f'"{key}": {value!r} in {repository}/<model>/1/model.json (adapters.triton.vllm_model_json)'
            if backend == "vllm"
            else f"the TensorRT-LLM engine build and {repository}/<model>/config.pbtxt"
        )
        require(
            value == default,
            f"{name}: {field}={value} is set in the model repository, not on the command line; put {where} and "
            "remove it",
        )
    require(cfg.threads is None, f"{name}: threads is not a frontend setting; remove --threads")
    tokenizer = cfg.env.get("TRITON_TOKENIZER")
    require(
        tokenizer is not None,
        f"{name}: the OpenAI frontend needs a tokenizer; set env TRITON_TOKENIZER=<hf id or path>",
    )
    # `python3 openai_frontend/main.py --model-repository R --tokenizer T` (python/openai/README.md, snapshot
    # 2026-08-19, read 2026-11-24); --host / --openai-port from main.py's argparse
    flags = [
        "--model-repository",
        repository,
        "--tokenizer",
        str(tokenizer),
        "--backend",
        backend,
        "--host",
        host,
    ]
    return [*flags, "--openai-port", str(cfg.port), *cfg.extra_args]


def launch_argv(cfg: EngineConfig) -> list[str]:
    frontend = cfg.env.get("TRITON_OPENAI_FRONTEND", FRONTEND)
    return ["python3", frontend, *_flags(cfg, cfg.host, cfg.model)]


def launch_env(cfg: EngineConfig) -> dict[str, str]:
    return {k: v for k, v in cfg.env.items() if not k.startswith("TRITON_")}


def container_argv(cfg: EngineConfig, runtime: str = "docker") -> list[str]:
    # docker run -it --net=host --gpus all --rm -v ${HOME}/.cache/huggingface:/root/.cache/huggingface -e HF_TOKEN
    # nvcr.io/nvidia/tritonserver:26.07-vllm-python-py3; then python3 openai_frontend/main.py ... (python/openai/README.md
    # steps 1-2, snapshot 2026-08-19, read 2026-11-24)
    from dataclasses import replace

    inner = replace(cfg, env=launch_env(cfg))
    argv, repository = docker_gpu_run(
        IMAGE, inner, runtime=runtime, name="triton", extra=(), model_mount="/models"
    )
    return [*argv, "python3", FRONTEND, *_flags(cfg, "0.0.0.0", repository)]


def build(spec: RequestSpec, model: str, stream: bool) -> HttpCall:
    return build_openai(spec, model, stream, pin_fields={"ignore_eos": True})


def version_from(payload: Mapping[str, Any]) -> str | None:
    return None


tokenize_call, tokens_from = no_tokenizer("triton: the OpenAI frontend has no tokenize endpoint")


def local_status() -> tuple[bool, str]:
    return local_gpu_status("triton-openai", binaries=("tritonserver",), modules=("tritonserver",))


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
