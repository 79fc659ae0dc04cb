"""The adapter contract: what EngineBench knows about one inference engine.

An adapter is data plus pure functions, never a clock:
- how to launch the engine from a normalized `EngineConfig` (argv lists, never shell strings), natively or as its
  official container image, and how to tell it is ready (`health_path`);
- a codec: `build(spec, model, stream)` -> `HttpCall`, `parse_event(data)` -> `StreamDelta | None` for one SSE `data:`
  payload, `parse_response(body)` -> `StreamDelta` for a non-streamed answer;
- what it honours (`ignore_eos`, usage in streams, tokenize endpoint), its hardware and maintenance status;
- a metrics map: the engine's Prometheus names -> EngineBench's canonical names (see `CANONICAL_METRICS`).

Process management (spawn, wait, stop the tree) is shared in `adapters.process`; timing belongs to `harness`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, get_args, runtime_checkable

from workloads.spec import RequestSpec

__all__ = [
    "CANONICAL_METRICS",
    "HARDWARE",
    "Adapter",
    "CacheReset",
    "EngineConfig",
    "EngineInfo",
    "FunctionAdapter",
    "Hardware",
    "HttpCall",
    "ListsModels",
    "MetricMap",
    "Prepares",
    "ScrapesElsewhere",
    "StreamDelta",
    "Tokenizes",
    "Usage",
]

# The one hardware vocabulary (engine facts, `bench engines`, knowledge files, plan `must_run_on`); other spellings
# are mapped onto it by `adapters.knowledge.normalize_hardware`. "ascend": Huawei Ascend NPUs (CANN).
Hardware = Literal["cpu", "nvidia", "amd", "intel-gpu", "apple", "tpu", "gaudi", "neuron", "ascend"]
HARDWARE: tuple[Hardware, ...] = get_args(Hardware)

# Canonical engine metric names. Gauges are instantaneous; *_total are counters; *_seconds are histograms.
CANONICAL_METRICS: Mapping[str, str] = {
    "requests_running": "gauge: requests being processed (in a batch / slot)",
    "requests_waiting": "gauge: requests queued, not yet scheduled",
    "kv_cache_usage": "gauge: fraction 0..1 of KV-cache in use",
    "prefix_cache_queries_total": "counter: prompt tokens looked up in the prefix cache",
    "prefix_cache_hits_total": "counter: prompt tokens found in the prefix cache",
    "prompt_tokens_cached_total": "counter: prompt tokens served from cache",
    "prompt_tokens_total": "counter: prompt (prefill) tokens processed",
    "generation_tokens_total": "counter: output tokens generated",
    "requests_finished_total": "counter: requests finished (any reason)",
    "preemptions_total": "counter: sequences preempted",
    "ttft_seconds": "histogram: server-side time to first token",
    "itl_seconds": "histogram: server-side inter-token latency",
    "e2e_seconds": "histogram: server-side end-to-end request latency",
    "queue_seconds": "histogram: time waiting in the engine's queue",
}


@dataclass(frozen=True)
class EngineConfig:
    """Normalized engine settings; each adapter maps these onto its own flags, refusing what it cannot do."""

    model: str  # a path (file or folder) or a hub id, as the engine expects
    served_model_name: str | None = None
    dtype: str | None = None  # "bfloat16", "float16", "auto", ...
    quantization: str | None = None  # "awq", "gptq", "fp8", "Q4_1" (GGUF file type), ...
    max_context: int | None = None
    max_num_seqs: int | None = None  # max concurrent sequences / slots
    prefix_caching: bool | None = None  # None: engine default
    tensor_parallel: int = 1
    kv_cache_dtype: str | None = None
    gpu_memory_fraction: float | None = None
    threads: int | None = None  # CPU threads (CPU engines)
    host: str = "127.0.0.1"
    port: int = 8000
    extra_args: tuple[str, ...] = ()
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class HttpCall:
    method: str
    path: str  # e.g. "/v1/chat/completions"
    body: Mapping[str, Any] | None
    stream: bool
    headers: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    cached_tokens: int | None = None


@dataclass(
    slots=True
)  # not frozen: one is built per streamed event, and frozen init costs 4x (0.9 vs 0.2 µs)
class StreamDelta:
    """What one SSE event (or a whole non-streamed body) carried.

    `tokens` is the number of output tokens in this event as far as the stream tells (one per content chunk for
    OpenAI-style streams unless the engine says otherwise); `tokens_exact` says whether the engine stated it.
    """

    text: str = ""
    tokens: int = 0
    tokens_exact: bool = False
    finish_reason: str | None = None
    usage: Usage | None = None
    error: str | None = None
    extra: Mapping[str, Any] | None = None  # engine specifics worth keeping (llama.cpp `timings`, ...)


@dataclass(frozen=True)
class MetricMap:
    """Engine metric name -> canonical name. `labels` selects series (e.g. {"finished_reason": ...} is summed)."""

    names: Mapping[str, str]
    # canonical -> multiplier (e.g. percent -> fraction)
    scale: Mapping[str, float] = field(default_factory=dict)
    # canonical -> other canonical names added to it, where the engine splits what the canonical name means
    # (llama.cpp counts prompt tokens without the cached ones: prompt_tokens_total += prompt_tokens_cached_total)
    plus: Mapping[str, tuple[str, ...]] = field(default_factory=dict)


@dataclass(frozen=True)
class CacheReset:
    """How to empty the engine's prefix cache over HTTP (`harness.cache.reset_prefix_cache` calls it between load
    points and engines). `path` may hold `{slot}`: then it is called once per slot, their count read from the JSON
    field `slots_field` of `slots_path`. `needs`: what the server must be started with for the route to answer;
    `leaves`: what a reset does not empty."""

    method: str
    path: str
    needs: str = ""
    leaves: str = ""
    slots_path: str | None = None
    slots_field: str | None = None

    @property
    def route(self) -> str:
        return f"{self.method} {self.path}"


@dataclass(frozen=True)
class EngineInfo:
    name: str
    display_name: str
    hardware: tuple[Hardware, ...]
    honours_ignore_eos: bool
    honours_min_tokens: bool
    usage_in_stream: bool
    tokens_per_chunk: str  # "one", "several", "variable": how output tokens arrive in stream chunks
    tokenize_path: str | None
    health_path: str
    version_path: str | None
    metrics_path: str | None
    maintenance: str  # e.g. "active", "maintenance mode since 2025-12 (source, date)"
    sources: tuple[str, ...] = ()
    container_image: str | None = None
    # False where the server closes the connection after a streamed response while advertising keep-alive: a
    # pooled connection then fails on reuse ("Can not write request body"), so the client opens one per request
    reuse_connections: bool = True
    # the request/response shapes of `tokenize_path`: "vllm" ({model, prompt} -> {tokens}) or "llamacpp"
    # ({content} -> {tokens}, plus /apply-template); None when the engine has no tokenize endpoint
    tokenize_dialect: str | None = None
    # how to empty its prefix cache between load points; None where it offers no way (the manifest says so)
    cache_reset: CacheReset | None = None


@runtime_checkable
class Adapter(Protocol):
    # read-only, so frozen dataclasses (FunctionAdapter) satisfy the protocol as well as plain attributes do
    @property
    def info(self) -> EngineInfo: ...

    @property
    def metrics(self) -> MetricMap: ...

    def launch_argv(self, cfg: EngineConfig) -> list[str]:
        """Argv to start the engine as a local process (raises ConfigError for unsupported settings)."""
        ...

    def launch_env(self, cfg: EngineConfig) -> dict[str, str]:
        """Extra environment for the local process."""
        ...

    def container_argv(self, cfg: EngineConfig, runtime: str = "docker") -> list[str]:
        """Argv to run the engine's official container image (docker run ...)."""
        ...

    def build(self, spec: RequestSpec, model: str, stream: bool) -> HttpCall: ...

    def parse_event(self, data: bytes) -> StreamDelta | None:
        """One SSE `data:` payload (without the prefix, not `[DONE]`) -> what it carried, or None to ignore."""
        ...

    def parse_response(self, body: bytes) -> StreamDelta:
        """A whole non-streamed response body -> text, usage, finish reason."""
        ...

    def version_from(self, payload: Mapping[str, Any]) -> str | None:
        """The engine version from the JSON at `info.version_path`."""
        ...

    def local_status(self) -> tuple[bool, str]:
        """(runnable here, why / where): installed binaries, hardware present."""
        ...


@runtime_checkable
class Tokenizes(Protocol):
    """Optional extension: the engine tokenizes text at `info.tokenize_path` (its own tokenizer, exact counts)."""

    def tokenize_call(self, text: str, model: str, add_special: bool = False) -> HttpCall: ...

    def tokens_from(self, payload: Mapping[str, Any]) -> list[int]: ...


@runtime_checkable
class Prepares(Protocol):
    """Optional extension: HTTP calls made once the engine is ready and before anything is measured (Ollama pulls and
    loads the configured model), and the model id requests must name."""

    def prepare_calls(self, cfg: EngineConfig) -> list[HttpCall]: ...

    def served_model(self, cfg: EngineConfig) -> str: ...


@runtime_checkable
class ScrapesElsewhere(Protocol):
    """Optional extension: the engine's Prometheus metrics are not on its HTTP port (Ray's exporter has its own):
    the URL to scrape for the engine launched with `cfg` at `base_url`, None when unknown."""

    def metrics_url(self, cfg: EngineConfig, base_url: str) -> str | None: ...


@runtime_checkable
class ListsModels(Protocol):
    """Optional extension: the engine lists its models elsewhere than OpenAI's `GET /v1/models` (Triton's native
    `POST /v2/repository/index`): the call, and the ids of the models ready to serve in its answer."""

    def models_call(self) -> HttpCall: ...

    def model_ids_from(self, payload: Any) -> list[str]: ...


@dataclass(frozen=True)
class FunctionAdapter:
    """An `Adapter` (and `Tokenizes`) assembled from plain functions: compose `adapters.openai` with quirks."""

    info: EngineInfo
    metrics: MetricMap
    launch_argv: Callable[[EngineConfig], list[str]]
    launch_env: Callable[[EngineConfig], dict[str, str]]
    container_argv: Callable[..., list[str]]
    build: Callable[[RequestSpec, str, bool], HttpCall]
    parse_event: Callable[[bytes], StreamDelta | None]
    parse_response: Callable[[bytes], StreamDelta]
    version_from: Callable[[Mapping[str, Any]], str | None]
    local_status: Callable[[], tuple[bool, str]]
    tokenize_call: Callable[..., HttpCall]
    tokens_from: Callable[[Mapping[str, Any]], list[int]]


def require(flag: bool, message: str) -> None:
    """Adapter helper: refuse a setting the engine does not support with a ConfigError."""
    if not flag:
        from harness.errors import ConfigError

        raise ConfigError(message)


def optional_flag(flag: str, value: object | None) -> Sequence[str]:
    return [] if value is None else [flag, str(value)]


def no_tokenizer(reason: str) -> tuple[Callable[..., HttpCall], Callable[[Mapping[str, Any]], list[int]]]:
    """(`tokenize_call`, `tokens_from`) for an engine without a tokenize endpoint: asking for one raises `reason`."""

    def tokenize_call(text: str, model: str, add_special: bool = False) -> HttpCall:
        from harness.errors import EngineError

        raise EngineError(reason)

    def tokens_from(payload: Mapping[str, Any]) -> list[int]:
        return []

    return tokenize_call, tokens_from
