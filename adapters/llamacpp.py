"""llama.cpp's `llama-server`: launch (the binaries built here, or the official image), talk, read its metrics.

Quirks that matter for measurement (seen with build 11434, see tests/fixtures/streams/README.md):
- `-c` is the context of all slots together: each of the `-np` slots gets `-c / -np`, so `max_context` (per
  request) becomes `-c max_context*slots`;
- prompt caching is a per-request field `cache_prompt` whose default is the server flag
  `--cache-prompt/--no-cache-prompt`; `prefix_caching=False` launches with `--no-cache-prompt`;
- chat streams open with a chunk whose `content` is null; the usage chunk also carries `timings`
  (`cache_n`, `prompt_n`, `prompt_ms`, `predicted_n`, `predicted_ms`), kept in `StreamDelta.extra`;
- `llamacpp:prompt_tokens_total` excludes cached prompt tokens (the canonical counter adds them back), and there
  is no finished-requests counter;
- honours `ignore_eos`; serves the GGUF's own precision (no dtype switch; quantize a new file instead).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import orjson

from adapters.base import (
    CacheReset,
    EngineConfig,
    EngineInfo,
    FunctionAdapter,
    HttpCall,
    MetricMap,
    StreamDelta,
    Usage,
    optional_flag,
    require,
)
from adapters.knowledge import ENGINE_FACTS
from adapters.openai import build_openai, parse_openai_event, parse_openai_response
from workloads.spec import RequestSpec

__all__ = [
    "ADAPTER",
    "CPU_IMAGE",
    "CUDA_IMAGE",
    "INFO",
    "METRICS",
    "build",
    "container_argv",
    "launch_argv",
    "launch_env",
    "local_status",
    "parse_event",
    "parse_response",
    "tokenize_call",
    "tokens_from",
    "version_from",
]

CPU_IMAGE = "ghcr.io/ggml-org/llama.cpp:server"
CUDA_IMAGE = "ghcr.io/ggml-org/llama.cpp:server-cuda"
_GPU_FLAGS = ("-ngl", "--gpu-layers", "--n-gpu-layers")
# -ctk / -ctv values: common/arg.cpp `kv_cache_types` (build 11434), matched by ggml_type_name
KV_CACHE_TYPES = ("f32", "f16", "bf16", "q8_0", "q4_0", "q4_1", "iq4_nl", "q5_0", "q5_1")

# hardware, maintenance status, sources: one record (adapters.knowledge), shared with `bench decide`
_FACTS = ENGINE_FACTS["llamacpp"]

INFO = EngineInfo(
    name="llamacpp",
    display_name="llama.cpp (llama-server)",
    hardware=_FACTS.hardware,
    honours_ignore_eos=True,
    honours_min_tokens=False,
    usage_in_stream=True,
    tokens_per_chunk="one",
    tokenize_path="/tokenize",
    health_path="/health",
    version_path="/props",
    metrics_path="/metrics",
    maintenance=_FACTS.maintenance,
    sources=_FACTS.sources,
    container_image=CPU_IMAGE,
    # llama-server ends every streamed response by closing the connection although it says `Keep-Alive`
    # (tools/server/server-http.cpp returns false from the stream provider after sink.done(); cpp-httplib then
    # drops the connection). Seen here: 32 of 64 pooled requests failed on reuse, 0 of 64 with fresh connections.
    reuse_connections=False,
    tokenize_dialect="llamacpp",
    # build 11434 tools/server/server.cpp `POST /slots/:id_slot`, server-context.cpp handle_slots_erase: refused
    # (501) unless started with --slot-save-path; the slot count is /props `total_slots`. The host-memory prompt
    # cache (--cache-ram, default 8192 MiB) has no route to empty it
    cache_reset=CacheReset(
        "POST",
        "/slots/{slot}?action=erase",
        needs="llama-server started with --slot-save-path DIR",
        leaves="the host-memory prompt cache (--cache-ram; start with --cache-ram 0 for a complete reset)",
        slots_path="/props",
        slots_field="total_slots",
    ),
)

METRICS = MetricMap(
    names={
        "llamacpp:requests_processing": "requests_running",
        "llamacpp:requests_deferred": "requests_waiting",
        "llamacpp:prompt_tokens_total": "prompt_tokens_total",
        "llamacpp:prompt_tokens_cached_total": "prompt_tokens_cached_total",
        "llamacpp:tokens_predicted_total": "generation_tokens_total",
        "llamacpp:kv_cache_usage_ratio": "kv_cache_usage",  # older builds only
    },
    plus={"prompt_tokens_total": ("prompt_tokens_cached_total",)},
)


def _engine_flags(cfg: EngineConfig, model: str, host: str) -> list[str]:
    require(
        cfg.model.endswith(".gguf"),
        f"llama.cpp serves GGUF files; {cfg.model} is not one (`bench engines install llamacpp` provides one)",
    )
    require(
        cfg.tensor_parallel == 1,
        "llama.cpp has no tensor parallelism on CPU; set tensor_parallel to 1 (GPUs: --split-mode in extra_args)",
    )
    require(
        cfg.dtype in (None, "auto"),
        f"llama.cpp runs the GGUF's own precision, not dtype={cfg.dtype}; make a GGUF of that type with llama-quantize",
    )
    require(
        cfg.quantization is None or cfg.quantization.lower() in Path(cfg.model).name.lower(),
        f"quantization={cfg.quantization} does not match the GGUF {Path(cfg.model).name}; quantize a file to that type",
    )
    require(
        cfg.gpu_memory_fraction is None,
        "llama.cpp has no gpu_memory_fraction; offload layers with -ngl N in extra_args",
    )
    require(
        cfg.kv_cache_dtype is None or cfg.kv_cache_dtype in KV_CACHE_TYPES,
        f"llama.cpp: kv_cache_dtype={cfg.kv_cache_dtype} is not a cache type -ctk/-ctv take "
        f"({', '.join(KV_CACHE_TYPES)})",
    )
    flags = ["-m", model, "--host", host, "--port", str(cfg.port)]
    flags += optional_flag("--alias", cfg.served_model_name)
    flags += optional_flag("-t", cfg.threads)
    slots = cfg.max_num_seqs
    if cfg.max_context is not None:
        slots = slots or 1  # -c is shared by all slots: fix the slot count so each gets max_context
        flags += ["-c", str(cfg.max_context * slots)]
    flags += optional_flag("-np", slots)
    if cfg.kv_cache_dtype is not None:
        flags += ["-ctk", cfg.kv_cache_dtype, "-ctv", cfg.kv_cache_dtype]
    if cfg.prefix_caching is not None:
        flags.append("--cache-prompt" if cfg.prefix_caching else "--no-cache-prompt")
    flags += ["--metrics", "--no-ui"]
    return flags + list(cfg.extra_args)


def launch_argv(cfg: EngineConfig) -> list[str]:
    from adapters import install

    flags = _engine_flags(cfg, cfg.model, cfg.host)  # refuse bad settings before looking for the install
    return [str(install.llama_bin("llama-server")), *flags]


def launch_env(cfg: EngineConfig) -> dict[str, str]:
    return dict(cfg.env)


def container_argv(cfg: EngineConfig, runtime: str = "docker") -> list[str]:
    """`docker run` of the official image; the GGUF's folder is mounted read-only at /models."""
    gpu = any(flag in cfg.extra_args for flag in _GPU_FLAGS)
    argv = [runtime, "run", "--rm", "--name", f"enginebench-llamacpp-{cfg.port}"]
    argv += ["-p", f"{cfg.host}:{cfg.port}:{cfg.port}"]
    if gpu:
        argv += ["--gpus", "all"]
    model = Path(cfg.model)
    argv += ["-v", f"{model.resolve().parent}:/models:ro"]
    for key, value in sorted(cfg.env.items()):
        argv += ["-e", f"{key}={value}"]
    argv.append(CUDA_IMAGE if gpu else CPU_IMAGE)
    return argv + _engine_flags(cfg, f"/models/{model.name}", "0.0.0.0")


def build(spec: RequestSpec, model: str, stream: bool) -> HttpCall:
    return build_openai(spec, model, stream, pin_fields={"ignore_eos": True})


def _with_cache_n(delta: StreamDelta, timings: Any) -> StreamDelta:
    """Fill `cached_tokens` from `timings.cache_n` when the usage does not state it."""
    if delta.usage is None or delta.usage.cached_tokens is not None or not isinstance(timings, Mapping):
        return delta
    cache_n = timings.get("cache_n")
    if cache_n is None:
        return delta
    usage = Usage(delta.usage.prompt_tokens, delta.usage.completion_tokens, int(cache_n))
    return replace(delta, usage=usage)


def parse_event(data: bytes) -> StreamDelta | None:
    delta = parse_openai_event(data)
    if delta is None or not delta.extra:
        return delta
    return _with_cache_n(delta, delta.extra.get("timings"))


def parse_response(body: bytes) -> StreamDelta:
    delta = parse_openai_response(body)
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError:
        return delta
    if isinstance(obj, dict) and "timings" in obj:
        delta = replace(delta, extra={"timings": obj["timings"]})
        return _with_cache_n(delta, obj["timings"])
    return delta


def version_from(payload: Mapping[str, Any]) -> str | None:
    """`/props` carries `build_info`, e.g. "b11434-<commit>"."""
    info = payload.get("build_info")
    return str(info) if info else None


def tokenize_call(text: str, model: str, add_special: bool = False) -> HttpCall:
    return HttpCall("POST", "/tokenize", {"content": text, "add_special": add_special}, stream=False)


def tokens_from(payload: Mapping[str, Any]) -> list[int]:
    out: list[int] = []
    for t in payload.get("tokens") or []:
        out.append(int(t["id"]) if isinstance(t, Mapping) else int(t))  # with_pieces gives {"id", "piece"}
    return out


def local_status() -> tuple[bool, str]:
    from adapters import install

    engine = install.status("llamacpp")
    model = install.status("model")
    if not engine.installed:
        return False, f"llama-server not built ({engine.detail}); run `bench engines install llamacpp`"
    if not model.installed:
        return False, f"GGUF model missing ({model.detail}); run `bench engines install llamacpp`"
    return True, f"llama-server: {engine.detail}"


ADAPTER = FunctionAdapter(
    info=INFO,
    metrics=METRICS,
    launch_argv=launch_argv,
    launch_env=launch_env,
    container_argv=container_argv,
    build=build,
    parse_event=parse_event,
    parse_response=parse_response,
    version_from=version_from,
    local_status=local_status,
    tokenize_call=tokenize_call,
    tokens_from=tokens_from,
)
