"""Hugging Face TGI: launch (`text-generation-launcher`, image `ghcr.io/huggingface/text-generation-inference`),
talk (Messages API `/v1/chat/completions` and the native `/generate_stream`), read (`tgi_*`).

Maintenance mode since 2025-12-11 (README banner; see adapters.knowledge). Quirks: no `ignore_eos` and no
`min_tokens` (PITFALLS 10: outputs end at EOS, so pin lengths are not honoured); usage in the last stream chunk with
`stream_options.include_usage`; one event per token, but with speculation (`--speculate`) the tokens of one step are
sent as a burst of events (`tgi_request_skipped_tokens` counts them); prefix caching is the `PREFIX_CACHING`
environment variable; the native stream's last event carries `details.generated_tokens` (exact).

Requests go to the Messages API, whose last chunk's usage already gives exact counts; the native `/generate_stream`
codec (`build_native`, `parse_native_event`) is not a request path of the harness: the live test uses it to
cross-check those counts against TGI's own `details` (issue 20 item 10, refused as a second request path).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import orjson

from adapters.base import (
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
from adapters.knowledge import ENGINE_FACTS, docker_gpu_run, local_gpu_status
from adapters.openai import build_openai, parse_openai_event, parse_openai_response
from workloads.spec import RequestSpec

__all__ = [
    "ADAPTER",
    "IMAGE",
    "INFO",
    "METRICS",
    "build",
    "build_native",
    "container_argv",
    "launch_argv",
    "parse_native_event",
    "parse_native_response",
]

IMAGE = "ghcr.io/huggingface/text-generation-inference:3.3.5"
_FACTS = ENGINE_FACTS["tgi"]
QUANTIZE = (
    "awq",
    "compressed-tensors",
    "eetq",
    "exl2",
    "gptq",
    "marlin",
    "bitsandbytes",
    "bitsandbytes-nf4",
    "bitsandbytes-fp4",
    "fp8",
)
# launcher/src/main.rs (TGI db931fcf, 2026-01-08): `enum KVCacheDtype` (clap names fp8_e4m3fn, fp8_e5m2; no
# plain "fp8") and `enum Dtype` (float16, bfloat16)
KV_DTYPES = ("fp8_e4m3fn", "fp8_e5m2")
DTYPES = ("float16", "bfloat16")

INFO = EngineInfo(
    name="tgi",
    display_name="Hugging Face TGI",
    hardware=_FACTS.hardware,
    honours_ignore_eos=False,
    honours_min_tokens=False,
    usage_in_stream=True,
    tokens_per_chunk="one",  # one per event; bursts of events per step with --speculate
    tokenize_path="/tokenize",
    health_path="/health",
    version_path="/info",
    metrics_path="/metrics",
    maintenance=_FACTS.maintenance,
    sources=_FACTS.sources,
    container_image=IMAGE,
)

# router/src (TGI db931fcf, 2026-01-08): `metrics::gauge!` / `counter!` / `histogram!` names; the
# metrics-exporter-prometheus crate exposes counters without a `_total` suffix. `tgi_request_mean_time_per_token_duration`
# is recorded once per request with that request's mean (router/src/server.rs), not once per token, so it is not an
# ITL histogram and is not mapped (as TensorRT-LLM's per-request time per output token is not).
METRICS = MetricMap(
    names={
        "tgi_batch_current_size": "requests_running",
        "tgi_queue_size": "requests_waiting",
        "tgi_request_success": "requests_finished_total",
        "tgi_request_duration": "e2e_seconds",
        "tgi_request_queue_duration": "queue_seconds",
    }
)


def _flags(cfg: EngineConfig, host: str, model: str, port: int) -> list[str]:
    require(cfg.tensor_parallel >= 1, f"tgi: tensor_parallel must be >= 1, not {cfg.tensor_parallel}")
    require(
        cfg.quantization is None or cfg.quantization in QUANTIZE,
        f"tgi: quantization={cfg.quantization} is not supported (--quantize takes {', '.join(QUANTIZE)})",
    )
    require(
        cfg.dtype is None or cfg.quantization is None,
        f"tgi: dtype={cfg.dtype} cannot be combined with quantization={cfg.quantization} (--dtype excludes "
        "--quantize); remove one",
    )
    require(
        cfg.kv_cache_dtype is None or cfg.kv_cache_dtype in KV_DTYPES,
        f"tgi: kv_cache_dtype={cfg.kv_cache_dtype} is not supported (--kv-cache-dtype takes {', '.join(KV_DTYPES)})",
    )
    require(
        cfg.dtype is None or cfg.dtype in DTYPES,
        f"tgi: dtype={cfg.dtype} is not supported (--dtype takes {', '.join(DTYPES)})",
    )
    require(cfg.threads is None, "tgi: threads is not a launcher setting; remove --threads")
    # flags: launcher/src/main.rs `struct Args` (TGI db931fcf, 2026-01-08). `--num-shard` always: without it
    # `find_num_shards` shards across every visible GPU (num_cuda_devices()). The batch cap is `--max-batch-size`;
    # `--max-concurrent-requests` (default 128) answers HTTP 429 above its limit instead of queueing, so it is
    # left at its default.
    flags = ["--model-id", model, "--hostname", host, "--port", str(port)]
    flags += ["--num-shard", str(cfg.tensor_parallel)]
    flags += optional_flag("--quantize", cfg.quantization)
    flags += optional_flag("--dtype", cfg.dtype)
    flags += optional_flag("--kv-cache-dtype", cfg.kv_cache_dtype)
    flags += optional_flag("--max-batch-size", cfg.max_num_seqs)
    flags += optional_flag("--max-total-tokens", cfg.max_context)
    if cfg.max_context is not None:
        flags += ["--max-input-tokens", str(cfg.max_context - 1)]
    flags += optional_flag("--cuda-memory-fraction", cfg.gpu_memory_fraction)
    return flags + list(cfg.extra_args)


def launch_argv(cfg: EngineConfig) -> list[str]:
    # `text-generation-launcher --model-id mistralai/Mistral-7B-Instruct-v0.2` (README "Run locally", TGI snapshot
    # 2026-01-08, read 2026-11-24)
    return ["text-generation-launcher", *_flags(cfg, cfg.host, cfg.model, cfg.port)]


def launch_env(cfg: EngineConfig) -> dict[str, str]:
    env = dict(cfg.env)
    if cfg.prefix_caching is not None:  # launcher/src/main.rs reads PREFIX_CACHING
        env["PREFIX_CACHING"] = "1" if cfg.prefix_caching else "0"
    return env


def container_argv(cfg: EngineConfig, runtime: str = "docker") -> list[str]:
    # docker run --gpus all --shm-size 1g -p 8080:80 -v $volume:/data
    # ghcr.io/huggingface/text-generation-inference:3.3.5 --model-id $model (README, read 2026-11-24)
    inner = replace(cfg, env=launch_env(cfg))
    argv, model = docker_gpu_run(
        IMAGE,
        inner,
        runtime=runtime,
        name="tgi",
        container_port=80,
        extra=("--shm-size", "1g"),
        model_mount="/data",
    )
    return [*argv, *_flags(cfg, "0.0.0.0", model, 80)]


def build(spec: RequestSpec, model: str, stream: bool) -> HttpCall:
    return build_openai(spec, model, stream)  # no pin fields: TGI ignores ignore_eos / min_tokens


def build_native(spec: RequestSpec, model: str, stream: bool) -> HttpCall:
    """`/generate_stream` (or `/generate`): the raw prompt, no chat template; `details` gives exact token counts."""
    if spec.api == "chat":
        prompt = "\n".join(str(m.get("content", "")) for m in spec.messages)
    else:
        prompt = spec.prompt
    params: dict[str, Any] = {"max_new_tokens": spec.max_tokens, "do_sample": False, "details": True}
    return HttpCall(
        "POST",
        "/generate_stream" if stream else "/generate",
        {"inputs": prompt, "parameters": params},
        stream,
    )


def parse_native_event(data: bytes) -> StreamDelta | None:
    """One `data:` payload of `/generate_stream`: a token, and on the last event `generated_text` + `details`."""
    obj = orjson.loads(data)
    if not isinstance(obj, dict):
        return StreamDelta(error=f"unexpected SSE payload: {data[:200]!r}")
    if "error" in obj and "token" not in obj:
        return StreamDelta(error=str(obj.get("error")))
    token = obj.get("token") or {}
    text = "" if token.get("special") else str(token.get("text") or "")
    details = obj.get("details")
    usage = None
    finish = None
    if isinstance(details, Mapping):
        finish = details.get("finish_reason")
        usage = Usage(details.get("input_length"), details.get("generated_tokens"))
    return StreamDelta(
        text=text, tokens=1 if token else 0, tokens_exact=bool(token), finish_reason=finish, usage=usage
    )


def parse_native_response(body: bytes) -> StreamDelta:
    obj = orjson.loads(body)
    if isinstance(obj, list) and obj:
        obj = obj[0]
    if not isinstance(obj, dict):
        return StreamDelta(error=f"unexpected response body: {body[:200]!r}")
    if "error" in obj:
        return StreamDelta(error=str(obj["error"]))
    details = obj.get("details") or {}
    generated = details.get("generated_tokens")
    usage = Usage(None, generated) if generated is not None else None
    return StreamDelta(
        text=str(obj.get("generated_text") or ""),
        tokens=generated or 0,
        tokens_exact=generated is not None,
        finish_reason=details.get("finish_reason"),
        usage=usage,
    )


def version_from(payload: Mapping[str, Any]) -> str | None:
    version = payload.get("version")
    return str(version) if version else None


def tokenize_call(text: str, model: str, add_special: bool = False) -> HttpCall:
    return HttpCall("POST", "/tokenize", {"inputs": text, "add_special_tokens": add_special}, False)


def tokens_from(payload: Mapping[str, Any] | list[Any]) -> list[int]:
    items = payload if isinstance(payload, list) else payload.get("tokens") or []
    return [int(t["id"]) for t in items if isinstance(t, Mapping) and "id" in t]


def local_status() -> tuple[bool, str]:
    return local_gpu_status("tgi", binaries=("text-generation-launcher",))


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
