"""NVIDIA Triton with the TensorRT-LLM backend, through the same OpenAI-compatible frontend as `adapters.triton`.

A separate engine because what it honours differs from the vLLM backend's (triton-inference-server/server
python/openai/openai_frontend/engine/utils/triton.py, commit e1db8a60, 2026-08-19): `_create_trtllm_generate_request`
builds the backend's inputs field by field (`max_tokens`, `stop_words`, `top_p`, `temperature`, `seed`, ...) and
drops `ignore_eos` and `min_tokens`, so output lengths end at EOS (PITFALLS 10) and none are sent. The frontend is
launched with `--backend tensorrtllm`; engine settings live in the TensorRT-LLM engine build and the model's
`config.pbtxt`. Stream chunks can carry several tokens. `/metrics` has Triton's `nv_inference_*` counters.
"""

from __future__ import annotations

from dataclasses import replace

from adapters import triton
from adapters.base import EngineConfig, FunctionAdapter, HttpCall, MetricMap
from adapters.knowledge import ENGINE_FACTS, docker_gpu_run, local_gpu_status
from adapters.openai import build_openai
from workloads.spec import RequestSpec

__all__ = ["ADAPTER", "IMAGE", "INFO", "METRICS", "build", "container_argv", "launch_argv"]

IMAGE = "nvcr.io/nvidia/tritonserver:26.07-trtllm-python-py3"

INFO = replace(
    triton.INFO,
    name="triton-trtllm",
    display_name="NVIDIA Triton, TensorRT-LLM backend (OpenAI frontend)",
    honours_ignore_eos=False,
    honours_min_tokens=False,
    tokens_per_chunk="variable",
    container_image=IMAGE,
    hardware=ENGINE_FACTS["triton-trtllm"].hardware,
    maintenance=ENGINE_FACTS["triton-trtllm"].maintenance,
    sources=ENGINE_FACTS["triton-trtllm"].sources,
)

METRICS = MetricMap(names=dict(triton.CORE_METRICS))


def launch_argv(cfg: EngineConfig) -> list[str]:
    frontend = cfg.env.get("TRITON_OPENAI_FRONTEND", triton.FRONTEND)
    return ["python3", frontend, *triton._flags(cfg, cfg.host, cfg.model, backend="tensorrtllm")]


def container_argv(cfg: EngineConfig, runtime: str = "docker") -> list[str]:
    inner = replace(cfg, env=triton.launch_env(cfg))
    argv, repository = docker_gpu_run(
        IMAGE, inner, runtime=runtime, name="triton-trtllm", extra=(), model_mount="/models"
    )
    return [
        *argv,
        "python3",
        triton.FRONTEND,
        *triton._flags(cfg, "0.0.0.0", repository, backend="tensorrtllm"),
    ]


def build(spec: RequestSpec, model: str, stream: bool) -> HttpCall:
    return build_openai(spec, model, stream)  # no pin fields: the frontend drops them for this backend


def local_status() -> tuple[bool, str]:
    return local_gpu_status("triton-trtllm", binaries=("tritonserver",), modules=("tritonserver",))


ADAPTER = FunctionAdapter(
    info=INFO,
    metrics=METRICS,
    launch_argv=launch_argv,
    launch_env=triton.launch_env,
    container_argv=container_argv,
    build=build,
    parse_event=triton.ADAPTER.parse_event,
    parse_response=triton.ADAPTER.parse_response,
    version_from=triton.version_from,
    local_status=local_status,
    tokenize_call=triton.tokenize_call,
    tokens_from=triton.tokens_from,
)
