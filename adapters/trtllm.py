"""TensorRT-LLM: launch (`trtllm-serve`, image `nvcr.io/nvidia/tensorrt-llm/release`), talk (OpenAI API), read.

Quirks: `ignore_eos` and `min_tokens` are fields of trtllm-serve's OpenAI request (PyTorch backend); the Triton
TensorRT-LLM backend lacks `ignore_eos` (PITFALLS 10). Stream chunks can carry several tokens (reported for
TRT-LLM in the project's brief and PITFALLS 3; not re-verified in its source here), so per-chunk token counts are
not trusted and usage decides. Prefix caching (`kv_cache_config.enable_block_reuse`), `dtype` and the KV-cache dtype
live in the `--config` YAML, not on the command line. `/metrics` is JSON iteration statistics
(docs/source/commands/trtllm-serve.rst); the Prometheus text of `tensorrt_llm/metrics/collector.py` MetricsCollector
(`trtllm_*` names, 2026 source) is served at `/prometheus/metrics`, and only with `return_perf_metrics: true` in the
`--config` YAML; its running / waiting / KV-cache gauges are filled from iteration statistics, which need
`enable_iter_perf_stats: true`. So a launch always takes a `--config` file that sets both (the refusal prints the
YAML). A `kv_cache_config` in that file replaces the one `--kv_cache_free_gpu_memory_fraction` builds, so the
fraction is refused there and must go into the file as `kv_cache_config.free_gpu_memory_fraction`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
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
_CONFIG_MOUNT = "/enginebench/trtllm-config"

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

# `tensorrt_llm/metrics/collector.py` MetricsCollector (NVIDIA/TensorRT-LLM, 2026 source: metric_prefix "trtllm_";
# its docstring lists every series). `trtllm_time_per_output_token_seconds` is one observation per request (its
# mean time per output token), not per token, so it is not an ITL histogram and is not mapped.
METRICS = MetricMap(
    names={
        "trtllm_num_requests_running": "requests_running",
        "trtllm_num_requests_waiting": "requests_waiting",
        "trtllm_kv_cache_utilization": "kv_cache_usage",
        "trtllm_prompt_tokens_total": "prompt_tokens_total",
        "trtllm_generation_tokens_total": "generation_tokens_total",
        "trtllm_prompt_cached_tokens_total": "prompt_tokens_cached_total",
        "trtllm_request_success_total": "requests_finished_total",
        "trtllm_time_to_first_token_seconds": "ttft_seconds",
        "trtllm_e2e_request_latency_seconds": "e2e_seconds",
        "trtllm_request_queue_time_seconds": "queue_seconds",
    }
)

# what the Prometheus endpoint needs in the --config YAML (LLM API argument names)
METRICS_YAML: Mapping[str, Any] = {"return_perf_metrics": True, "enable_iter_perf_stats": True}


def yaml_needed(cfg: EngineConfig) -> dict[str, Any]:
    """The `--config` YAML keys the settings without a command-line flag need (LLM API argument names)."""
    out: dict[str, Any] = dict(METRICS_YAML)
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


def _config_path(cfg: EngineConfig) -> str | None:
    args = list(cfg.extra_args)
    for i, arg in enumerate(args):
        for flag in _CONFIG_FLAGS:
            if arg == flag and i + 1 < len(args):
                return args[i + 1]
            if arg.startswith(flag + "="):
                return arg.split("=", 1)[1]
    return None


def _read_config(path: str) -> Mapping[str, Any]:
    try:
        with open(path, encoding="utf-8") as f:
            loaded = yaml.safe_load(f)
    except (OSError, yaml.YAMLError) as e:
        require(
            False, f"trtllm: cannot read the --config YAML {path} ({type(e).__name__}: {e}); fix the path"
        )
        return {}
    require(
        isinstance(loaded, Mapping), f"trtllm: the --config YAML {path} is not a mapping of LLM API arguments"
    )
    return loaded if isinstance(loaded, Mapping) else {}


def _missing(needs: Mapping[str, Any], have: Mapping[str, Any]) -> dict[str, Any]:
    """The keys of `needs` that `have` lacks or sets otherwise (nested one level, as kv_cache_config is)."""
    out: dict[str, Any] = {}
    for key, value in needs.items():
        got = have.get(key)
        if isinstance(value, Mapping):
            sub = _missing(value, got if isinstance(got, Mapping) else {})
            if sub:
                out[key] = sub
        elif got != value:
            out[key] = value
    return out


def _check_config(cfg: EngineConfig) -> None:
    """Every setting without a flag, and the metrics switches, must be in the --config YAML, which is read here."""
    needs = yaml_needed(cfg)
    path = _config_path(cfg)
    have = _read_config(path) if path is not None else {}
    missing = _missing(needs, have)
    if missing:
        snippet = yaml.safe_dump(missing, default_flow_style=True, sort_keys=False).strip()
        where = (
            f"add `{snippet}` to {path}"
            if path
            else f"put `{snippet}` in a YAML file and add `--extra_llm_api_options FILE`"
        )
        require(
            False,
            f"trtllm: its settings and Prometheus metrics (/prometheus/metrics) need LLM API options that have no "
            f"trtllm-serve flag; {where} to the extra engine arguments",
        )
    require(
        cfg.gpu_memory_fraction is None or "kv_cache_config" not in have,
        f"trtllm: gpu_memory_fraction={cfg.gpu_memory_fraction} would be replaced by the kv_cache_config of {path}; "
        f"set `free_gpu_memory_fraction: {cfg.gpu_memory_fraction}` inside its kv_cache_config and remove "
        "--gpu-memory-fraction",
    )


def _flags(cfg: EngineConfig, host: str, *, check: bool = True) -> list[str]:
    require(cfg.tensor_parallel >= 1, f"trtllm: tensor_parallel must be >= 1, not {cfg.tensor_parallel}")
    require(cfg.threads is None, "trtllm: threads is not a server setting; remove --threads")
    if check:  # a container's flags name the YAML where it is mounted, already read on the host
        _check_config(cfg)
    # flags: tensorrt_llm/commands/serve.py click options (NVIDIA/TensorRT-LLM 4c05a748, read 2026-12-07; tests/fixtures/
    # contracts/trtllm_serve_options.txt); `--config` is accepted as the YAML flag too (newer releases)
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
    extra: tuple[str, ...] = ("--ipc=host", "--ulimit", "memlock=-1", "--ulimit", "stack=67108864")
    _check_config(cfg)  # the YAML is read where it is, on the host
    args = list(cfg.extra_args)
    path = _config_path(cfg)
    if path is not None:  # the container reads it from a read-only mount of its folder
        host = Path(path).resolve()
        extra += ("-v", f"{host.parent}:{_CONFIG_MOUNT}:ro")
        args = [f"{_CONFIG_MOUNT}/{host.name}" if a == path else a.replace(path, f"{_CONFIG_MOUNT}/{host.name}")
                if a.startswith(_CONFIG_FLAGS) else a for a in args]  # fmt: skip
    inner = replace(cfg, env=launch_env(cfg))
    argv, model = docker_gpu_run(IMAGE, inner, runtime=runtime, name="trtllm", extra=extra)
    return [
        *argv,
        "trtllm-serve",
        model,
        *_flags(replace(cfg, extra_args=tuple(args)), "0.0.0.0", check=False),
    ]


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
