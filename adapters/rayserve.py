"""Ray Serve LLM: launch (`ray.serve.llm.build_openai_app` + `serve.run`), talk (OpenAI API, vLLM underneath).

The documented launch is Python, not a CLI flag list (docs.ray.io/en/latest/serve/llm/quick-start.html, read
2026-11-24): an `LLMConfig` whose `engine_kwargs` are vLLM engine arguments, wrapped by `build_openai_app` and
started with `serve.run(app, blocking=True)`. `launch_argv` runs exactly that with `python3 -c`, the settings
embedded as JSON. Quirks: the vLLM engine honours `ignore_eos` / `min_tokens` and sends usage in the last chunk;
stream chunks are not batched by Ray (`stream_batching_interval_ms` 0); `/v1/models` answers once the app is up (Serve's own `/-/healthz` is on the same HTTP proxy); engine and Serve
metrics go to Ray's Prometheus exporter on the metrics-export port, not the HTTP port, hence `metrics_path=None`
(set `ENGINEBENCH_METRICS_RAYSERVE=http://host:port/metrics` for the live test).

On this machine (`default_config`: env RAYSERVE_ACCELERATOR=cpu) it runs for real: `bench engines install rayserve`
adds `ray[serve]` to the vLLM CPU venv, and `adapters/rayserve_driver.py`, run by that venv's python, starts a
loopback-only Ray, Serve's proxy on the engine port and Ray's Prometheus exporter on RAYSERVE_METRICS_PORT
(`metrics_url`), with `accelerator_config={"kind": "cpu"}`. It stops Ray's whole process tree with it, and by
itself when `bench` is killed.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
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

__all__ = [
    "ADAPTER",
    "CPU_ENV",
    "IMAGE",
    "INFO",
    "METRICS",
    "RayServeAdapter",
    "build",
    "container_argv",
    "default_config",
    "launch_argv",
    "launch_env",
    "llm_config",
    "metrics_url",
    "prepare_calls",
    "served_model",
]

IMAGE = "rayproject/ray-llm:latest"  # tag scheme {ray}-py311-cu128; pick a pinned tag for real runs
_FACTS = ENGINE_FACTS["rayserve"]

INFO = EngineInfo(
    name="rayserve",
    display_name="Ray Serve LLM",
    hardware=_FACTS.hardware,
    honours_ignore_eos=True,
    honours_min_tokens=True,
    usage_in_stream=True,
    # a running Serve app (--endpoint) batches stream chunks for `stream_batching_interval_ms` (default 50 ms, ray
    # 2.60.0 llm/_internal/serve/constants.py MODEL_RESPONSE_BATCH_TIMEOUT_MS), so one event carries several tokens;
    # the app EngineBench launches sets it to 0 (see `llm_config`)
    tokens_per_chunk="variable",
    tokenize_path=None,
    health_path="/v1/models",
    version_path=None,
    metrics_path=None,
    maintenance=_FACTS.maintenance,
    sources=_FACTS.sources,
    container_image=IMAGE,
)

# Ray re-exports the vLLM engine's metrics through Ray's exporter (LLMConfig.log_engine_metrics, default True, ray
# 2.60.0 llm/_internal/serve/core/configs/llm_config.py): vllm/v1/metrics/ray_wrappers.py turns every character
# outside [a-zA-Z0-9_] into "_" (`_get_sanitized_opentelemetry_name`) and Ray's exporter adds "ray_"; ray 2.60.0's own
# dashboard (dashboard/modules/metrics/dashboards/serve_llm_dashboard_panels.py) queries these names. `vllm:`
# spellings never reach Ray's exporter.
METRICS = MetricMap(
    names={
        "ray_vllm_num_requests_running": "requests_running",
        "ray_vllm_num_requests_waiting": "requests_waiting",
        "ray_vllm_kv_cache_usage_perc": "kv_cache_usage",
        "ray_vllm_prefix_cache_queries_total": "prefix_cache_queries_total",
        "ray_vllm_prefix_cache_hits_total": "prefix_cache_hits_total",
        "ray_vllm_prompt_tokens_total": "prompt_tokens_total",
        "ray_vllm_generation_tokens_total": "generation_tokens_total",
        "ray_vllm_request_success_total": "requests_finished_total",
        "ray_vllm_time_to_first_token_seconds": "ttft_seconds",
        "ray_vllm_inter_token_latency_seconds": "itl_seconds",
        "ray_vllm_e2e_request_latency_seconds": "e2e_seconds",
        "ray_vllm_request_queue_time_seconds": "queue_seconds",
    }
)

_SCRIPT = """
import json, sys
from ray import serve
from ray.serve.llm import LLMConfig, build_openai_app
spec = json.loads(sys.argv[1])
serve.start(http_options={"host": spec["host"], "port": spec["port"]})
app = build_openai_app({"llm_configs": [LLMConfig(**spec["llm_config"])]})
serve.run(app, blocking=True)
""".strip()


# The environment of a CPU launch (the vLLM CPU settings of adapters.vllm, Ray on loopback). Keys that only configure
# EngineBench's launch (RAYSERVE_*) are not passed on.
CPU_ENV = {
    "HF_HUB_OFFLINE": "1",
    "VLLM_TARGET_DEVICE": "cpu",
    "VLLM_HOST_IP": "127.0.0.1",
    "VLLM_CPU_KVCACHE_SPACE": "2",
    # ray 2.60.0 _private/ray_constants.py ENABLE_RAY_CLUSTER: off, the node address stays 127.0.0.1
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_USAGE_STATS_ENABLED": "0",  # no usage report attempted from a machine without internet
}
_RAY_SLOTS = 8  # Ray's logical CPUs on a CPU launch (see adapters/rayserve_driver.py)
_OWN_KEYS = ("RAYSERVE_ENGINE_KWARGS", "RAYSERVE_ACCELERATOR", "RAYSERVE_METRICS_PORT")


def _cpu(cfg: EngineConfig) -> bool:
    return cfg.env.get("RAYSERVE_ACCELERATOR") == "cpu"


def llm_config(cfg: EngineConfig) -> dict[str, Any]:
    """The `LLMConfig` fields for the normalized settings (engine_kwargs are vLLM engine arguments)."""
    require(cfg.tensor_parallel >= 1, f"rayserve: tensor_parallel must be >= 1, not {cfg.tensor_parallel}")
    require(cfg.threads is None, "rayserve: threads is not an LLMConfig setting; remove --threads")
    require(
        not cfg.extra_args,
        "rayserve: extra_args have no command line to go to; put vLLM arguments in env "
        "RAYSERVE_ENGINE_KWARGS as JSON",
    )
    kwargs: dict[str, Any] = {}
    pairs = {
        "tensor_parallel_size": cfg.tensor_parallel if cfg.tensor_parallel != 1 else None,
        "quantization": cfg.quantization,
        "kv_cache_dtype": cfg.kv_cache_dtype,
        "max_num_seqs": cfg.max_num_seqs,
        "enable_prefix_caching": cfg.prefix_caching,
        "max_model_len": cfg.max_context,
        "gpu_memory_utilization": cfg.gpu_memory_fraction,
        "dtype": cfg.dtype,
    }
    kwargs.update({k: v for k, v in pairs.items() if v is not None})
    kwargs.update(json.loads(cfg.env.get("RAYSERVE_ENGINE_KWARGS", "{}")))
    model_id = cfg.served_model_name or cfg.model
    # stream_batching_interval_ms 0: llm_server.py `_get_batch_interval_ms` -> utils/batcher.py `Batcher.stream`
    # yields each engine chunk on its own (ray 2.60.0); the default 50 ms window would make ITL Ray's batching window
    config: dict[str, Any] = {
        "model_loading_config": {"model_id": model_id, "model_source": cfg.model},
        "engine_kwargs": kwargs,
        "experimental_configs": {"stream_batching_interval_ms": 0},
    }
    if _cpu(cfg):
        require(
            cfg.gpu_memory_fraction is None,
            "rayserve: gpu_memory_fraction does nothing on CPU; size the KV cache with env VLLM_CPU_KVCACHE_SPACE",
        )
        # accelerator_config, not accelerator_type (ray 2.60.0 core/configs/llm_config.py
        # `_resolve_accelerator_config` defaults to GPUConfig; CPUConfig gives {"CPU": 1} bundles and vLLM's mp
        # executor, engines/vllm/vllm_models.py); eager like adapters.vllm on CPU (compiling takes minutes)
        config["accelerator_config"] = {"kind": "cpu"}
        kwargs.setdefault("enforce_eager", True)
    return config


def _spec(cfg: EngineConfig, host: str, model: str) -> str:
    config = llm_config(cfg)
    config["model_loading_config"]["model_source"] = model
    return json.dumps({"host": host, "port": cfg.port, "llm_config": config}, sort_keys=True)


def _metrics_port(cfg: EngineConfig) -> int | None:
    raw = cfg.env.get("RAYSERVE_METRICS_PORT")
    if raw is None:
        return None
    require(
        raw.isdigit() and 0 < int(raw) < 65536, f"rayserve: RAYSERVE_METRICS_PORT={raw} is not a port number"
    )
    return int(raw)


def launch_argv(cfg: EngineConfig) -> list[str]:
    if _cpu(cfg):
        from adapters import install

        port = _metrics_port(cfg)
        require(
            port is not None, "rayserve: a CPU launch needs env RAYSERVE_METRICS_PORT (Ray's metrics port)"
        )
        spec = {
            "host": cfg.host,
            "port": cfg.port,
            "metrics_port": port,
            "num_cpus": max(_RAY_SLOTS, os.cpu_count() or 1),
            "llm_config": llm_config(cfg),
        }
        # -P: the driver's folder (adapters/, which holds a vllm.py) must not shadow the vllm package
        driver = str(install.rayserve_driver())
        return [str(install.vllm_python()), "-P", driver, json.dumps(spec, sort_keys=True)]
    # build_openai_app({"llm_configs": [llm_config]}); serve.run(app, blocking=True):
    # docs.ray.io/en/latest/serve/llm/quick-start.html (read 2026-11-24)
    return ["python3", "-c", _SCRIPT, _spec(cfg, cfg.host, cfg.model)]


def launch_env(cfg: EngineConfig) -> dict[str, str]:
    own = {k: v for k, v in cfg.env.items() if k not in _OWN_KEYS}
    return {**CPU_ENV, **own} if _cpu(cfg) else own


def metrics_url(cfg: EngineConfig, base_url: str) -> str | None:
    """Ray's Prometheus exporter (engine `ray_vllm_*` and Serve's `ray_serve_*` series) on the metrics port the
    driver gave `ray.init(_metrics_export_port=...)`, on the engine's host; None where EngineBench did not set it."""
    port = _metrics_port(cfg)
    if port is None:
        return None
    return f"{base_url.rsplit(':', 1)[0]}:{port}/metrics"


def default_config() -> EngineConfig:
    """Ray Serve LLM on this CPU: vLLM's CPU settings (adapters.registry's for vLLM), the shipped model's HF folder
    under the served name every engine here uses, Ray's metrics on a free port."""
    from adapters import install
    from adapters.hostcpu import choose_cpu_dtype, cpu_flags
    from adapters.process import free_port
    from adapters.registry import SERVED_MODEL

    return EngineConfig(
        model=str(install.hf_model_dir()),
        served_model_name=SERVED_MODEL,
        dtype=choose_cpu_dtype(cpu_flags()).dtype,
        max_context=4096,
        max_num_seqs=8,
        port=0,
        env={"RAYSERVE_ACCELERATOR": "cpu", "RAYSERVE_METRICS_PORT": str(free_port())},
    )


def container_argv(cfg: EngineConfig, runtime: str = "docker") -> list[str]:
    # No `docker run` line for Ray Serve LLM was found in Ray's docs (read 2026-11-24); the image name follows
    # Ray's rayproject/* naming and is not verified: pin a tag you have pulled.
    inner = replace(cfg, env=launch_env(cfg))
    argv, model = docker_gpu_run(IMAGE, inner, runtime=runtime, name="rayserve", extra=("--shm-size", "10g"))
    return [*argv, "python3", "-c", _SCRIPT, _spec(cfg, "0.0.0.0", model)]


def build(spec: RequestSpec, model: str, stream: bool) -> HttpCall:
    return build_openai(spec, model, stream, pin_fields={"ignore_eos": True})


def version_from(payload: Mapping[str, Any]) -> str | None:
    return None


tokenize_call, tokens_from = no_tokenizer("rayserve: the OpenAI ingress has no tokenize endpoint")


def local_status() -> tuple[bool, str]:
    from adapters import install

    ray = install.status("rayserve")
    if ray.installed:
        model = install.status("model-hf")
        if not model.installed:
            return False, f"model folder missing ({model.detail}); run `bench engines install rayserve`"
        return True, f"ray[serve] in the vLLM CPU venv: {ray.detail}"
    ok, why = local_gpu_status("rayserve", modules=("ray",))
    return ok, why if ok else f"{why}; or on this CPU: `bench engines install rayserve`"


def served_model(cfg: EngineConfig) -> str:
    return cfg.served_model_name or cfg.model


def prepare_calls(cfg: EngineConfig) -> list[HttpCall]:
    """One completion of one token: the ingress answers /v1/models from its config as soon as its own replica runs,
    minutes before the LLM server has loaded the model (ray 2.60.0 core/ingress/ingress.py `models`; seen here: 200
    at 23:27:31, app ready at 23:30:33, and the first requests stalled). A completion waits in Serve's router
    until the LLM server runs (RAY_SERVE_LLM_ROUTER_HTTP_TIMEOUT, 600 s), so the engine is ready when it returns."""
    body = {"model": served_model(cfg), "prompt": "Hello", "max_tokens": 1, "temperature": 0.0}
    return [HttpCall("POST", "/v1/completions", body, False)]


@dataclass(frozen=True)
class RayServeAdapter(FunctionAdapter):
    """The function adapter plus where Ray's exporter is (adapters.base.ScrapesElsewhere) and the first completion
    that says it is ready (adapters.base.Prepares; `ready_after_prepare`: adapters.process counts it in the cold
    start)."""

    prepare_calls: Callable[[EngineConfig], list[HttpCall]] = prepare_calls
    served_model: Callable[[EngineConfig], str] = served_model
    ready_after_prepare: bool = True

    def metrics_url(self, cfg: EngineConfig, base_url: str) -> str | None:
        return metrics_url(cfg, base_url)


ADAPTER = RayServeAdapter(
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
