"""DeepSpeed-MII: launch (`python -m mii.entrypoints.openai_api_server`), talk (OpenAI API). No official image.

Inactive (last release 0.3.3, 2025-03-25; last commit 2025-06-30). Quirks from mii/entrypoints/openai_api_server.py:
`ignore_eos` is hard-coded False (PITFALLS 10) but `min_tokens` is honoured, so lengths are pinned with
`min_tokens = max_tokens`; `do_sample=True` is hard-coded (temperature 0 is passed through as given); stream chunks
carry no usage; a role-only first chunk; no metrics endpoint; `/health` only.
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
    optional_flag,
    require,
)
from adapters.knowledge import ENGINE_FACTS, local_gpu_status
from adapters.openai import build_openai, parse_openai_event, parse_openai_response
from workloads.spec import RequestSpec

__all__ = ["ADAPTER", "INFO", "METRICS", "build", "container_argv", "launch_argv"]

_FACTS = ENGINE_FACTS["mii"]

INFO = EngineInfo(
    name="mii",
    display_name="DeepSpeed-MII",
    hardware=_FACTS.hardware,
    honours_ignore_eos=False,
    honours_min_tokens=True,
    usage_in_stream=False,
    tokens_per_chunk="one",
    tokenize_path=None,
    health_path="/health",
    version_path=None,
    metrics_path=None,
    maintenance=_FACTS.maintenance,
    sources=_FACTS.sources,
    container_image=None,
)

METRICS = MetricMap(names={})


def launch_argv(cfg: EngineConfig) -> list[str]:
    unsupported = {
        "quantization": cfg.quantization,
        "kv_cache_dtype": cfg.kv_cache_dtype,
        "max_num_seqs": cfg.max_num_seqs,
        "prefix_caching": cfg.prefix_caching,
        "gpu_memory_fraction": cfg.gpu_memory_fraction,
        "dtype": cfg.dtype,
        "threads": cfg.threads,
    }
    for key, value in unsupported.items():
        require(value is None, f"mii: {key}={value} is not supported by its OpenAI server; remove it")
    require(cfg.tensor_parallel >= 1, f"mii: tensor_parallel must be >= 1, not {cfg.tensor_parallel}")
    # argparse flags of mii/entrypoints/openai_api_server.py (DeepSpeed-MII snapshot 2025-06-30, read 2026-11-24)
    argv = ["python3", "-m", "mii.entrypoints.openai_api_server", "--model", cfg.model]
    argv += ["--host", cfg.host, "--port", str(cfg.port)]
    argv += optional_flag("--max-length", cfg.max_context)
    if cfg.tensor_parallel != 1:
        argv += ["--tensor-parallel", str(cfg.tensor_parallel)]
    return argv + list(cfg.extra_args)


def launch_env(cfg: EngineConfig) -> dict[str, str]:
    return dict(cfg.env)


def container_argv(cfg: EngineConfig, runtime: str = "docker") -> list[str]:
    require(False, "mii: DeepSpeed-MII publishes no official container image; run it as a local process")
    return []


def build(spec: RequestSpec, model: str, stream: bool) -> HttpCall:
    return build_openai(spec, model, stream, pin_fields={"min_tokens": spec.max_tokens})


def version_from(payload: Mapping[str, Any]) -> str | None:
    return None


tokenize_call, tokens_from = no_tokenizer("mii: no tokenize endpoint")


def local_status() -> tuple[bool, str]:
    return local_gpu_status("mii", modules=("mii",))


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
