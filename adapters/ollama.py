"""Ollama: launch (`ollama serve`, image `ollama/ollama`), talk (its OpenAI API `/v1/chat/completions`).

Server settings are environment variables (envconfig/config.go, snapshot 2026-08-21): OLLAMA_HOST,
OLLAMA_NUM_PARALLEL (concurrent requests), OLLAMA_CONTEXT_LENGTH, OLLAMA_KV_CACHE_TYPE (f16, q8_0, q4_0). The
quantization is part of the model tag (e.g. `llama3.2:1b-instruct-q4_K_M`). Quirks: no `ignore_eos`, no
`min_tokens`; usage in the last chunk with `stream_options.include_usage`; no Prometheus endpoint; layers are
split across GPUs automatically (no tensor parallelism); prefix (KV) reuse per slot cannot be turned off.

`ollama serve` starts with no model: once it is ready the launcher pulls the configured model (`POST /api/pull`,
`"stream": false`) and loads it (`POST /api/generate` with no prompt answers `done_reason: "load"` once it is in
memory; server/routes.go GenerateHandler, ollama fb307609, 2026-08-21), so no measured request pays the load; requests
name that model, never merely the first id of `/v1/models` (`prepare_calls`, `served_model`).
"""

from __future__ import annotations

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
from adapters.knowledge import ENGINE_FACTS, local_gpu_status
from adapters.openai import build_openai, parse_openai_event, parse_openai_response
from workloads.spec import RequestSpec

__all__ = [
    "ADAPTER",
    "IMAGE",
    "INFO",
    "METRICS",
    "OllamaAdapter",
    "build",
    "container_argv",
    "launch_argv",
    "launch_env",
    "prepare_calls",
    "served_model",
]

IMAGE = "ollama/ollama:latest"
_FACTS = ENGINE_FACTS["ollama"]
KV_TYPES = ("f16", "q8_0", "q4_0")

INFO = EngineInfo(
    name="ollama",
    display_name="Ollama",
    hardware=_FACTS.hardware,
    honours_ignore_eos=False,
    honours_min_tokens=False,
    usage_in_stream=True,
    tokens_per_chunk="variable",  # pieces are held back at stop-sequence / UTF-8 boundaries and sent together
    tokenize_path=None,
    health_path="/",
    version_path="/api/version",
    metrics_path=None,
    maintenance=_FACTS.maintenance,
    sources=_FACTS.sources,
    container_image=IMAGE,
)

METRICS = MetricMap(names={})  # Ollama exposes no Prometheus metrics (server/routes.go has no /metrics route)


def _check(cfg: EngineConfig) -> None:
    require(
        cfg.tensor_parallel == 1,
        f"ollama: tensor_parallel={cfg.tensor_parallel} is not supported (Ollama splits layers across GPUs "
        "automatically); remove --tp",
    )
    require(
        cfg.gpu_memory_fraction is None,
        "ollama: gpu_memory_fraction is not supported (it sizes offload itself; OLLAMA_GPU_OVERHEAD reserves bytes); "
        "remove --gpu-memory-fraction",
    )
    require(cfg.dtype is None, "ollama: dtype is fixed by the GGUF model; remove --dtype")
    require(
        cfg.prefix_caching is not False,
        "ollama: prefix_caching=False is not supported (each slot reuses its KV prefix); remove --no-prefix-caching",
    )
    require(
        cfg.kv_cache_dtype is None or cfg.kv_cache_dtype in KV_TYPES,
        f"ollama: kv_cache_dtype={cfg.kv_cache_dtype} is not supported (OLLAMA_KV_CACHE_TYPE takes f16, q8_0, q4_0)",
    )
    require(
        cfg.quantization is None or cfg.quantization.lower() in cfg.model.lower(),
        f"ollama: quantization={cfg.quantization} is chosen by the model tag, not a flag; use a tag such as "
        f"{cfg.model.split(':')[0]}:<size>-{cfg.quantization}",
    )
    require(cfg.threads is None, "ollama: threads is a per-request option (num_thread), not a server setting")
    require(
        not cfg.extra_args, "ollama: `ollama serve` takes no extra arguments; set OLLAMA_* variables via env"
    )


def launch_argv(cfg: EngineConfig) -> list[str]:
    _check(cfg)
    # `OLLAMA_CONTEXT_LENGTH=8192 ollama serve`: docs/faq.mdx (ollama snapshot 2026-08-21, read 2026-11-24)
    return ["ollama", "serve"]  # everything else is environment


def launch_env(cfg: EngineConfig) -> dict[str, str]:
    _check(cfg)
    env = {"OLLAMA_HOST": f"{cfg.host}:{cfg.port}"}
    if cfg.max_num_seqs is not None:
        env["OLLAMA_NUM_PARALLEL"] = str(cfg.max_num_seqs)
    if cfg.max_context is not None:
        env["OLLAMA_CONTEXT_LENGTH"] = str(cfg.max_context)
    if cfg.kv_cache_dtype is not None:
        env["OLLAMA_KV_CACHE_TYPE"] = cfg.kv_cache_dtype
        env["OLLAMA_FLASH_ATTENTION"] = "1"  # a quantized KV cache needs flash attention (docs/faq.mdx)
    env.update(cfg.env)
    return env


def container_argv(cfg: EngineConfig, runtime: str = "docker") -> list[str]:
    # docker run -d --gpus=all -v ollama:/root/.ollama -p 11434:11434 --name ollama ollama/ollama
    # (docs/docker.mdx, ollama snapshot 2026-08-21, read 2026-11-24)
    env = launch_env(replace(cfg, host="0.0.0.0", port=11434))
    argv = [runtime, "run", "--rm", "--name", f"enginebench-ollama-{cfg.port}", "--gpus=all"]
    argv += ["-v", "ollama:/root/.ollama", "-p", f"{cfg.host}:{cfg.port}:11434"]
    for key, value in sorted(env.items()):
        argv += ["-e", f"{key}={value}"]
    return [*argv, IMAGE]


def build(spec: RequestSpec, model: str, stream: bool) -> HttpCall:
    return build_openai(spec, model, stream)  # no pin fields: Ollama's OpenAI API has neither


def version_from(payload: Mapping[str, Any]) -> str | None:
    version = payload.get("version")
    return str(version) if version else None


tokenize_call, tokens_from = no_tokenizer("ollama: no tokenize endpoint; token counts come from usage")


def local_status() -> tuple[bool, str]:
    return local_gpu_status("ollama", binaries=("ollama",), needs_gpu=False)


def served_model(cfg: EngineConfig) -> str:
    """The tag requests name: Ollama lists a tag without `:` as `<name>:latest` (types/model/name.go)."""
    return cfg.model if ":" in cfg.model else f"{cfg.model}:latest"


def prepare_calls(cfg: EngineConfig) -> list[HttpCall]:
    """Pull the configured model, then load it (keep_alive -1: it stays loaded for the whole run)."""
    model = served_model(cfg)
    return [
        HttpCall("POST", "/api/pull", {"model": model, "stream": False}, False),
        HttpCall("POST", "/api/generate", {"model": model, "keep_alive": -1}, False),
    ]


@dataclass(frozen=True)
class OllamaAdapter(FunctionAdapter):
    """A FunctionAdapter that also `Prepares` (adapters.base): Ollama serves no model until one is pulled and loaded."""

    prepare_calls: Callable[[EngineConfig], list[HttpCall]] = prepare_calls
    served_model: Callable[[EngineConfig], str] = served_model


ADAPTER = OllamaAdapter(
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
