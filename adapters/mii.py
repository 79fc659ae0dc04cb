"""DeepSpeed-MII: launch (`python -m mii.entrypoints.openai_api_server`), talk (OpenAI API). No official image.

Inactive (last release 0.3.3, 2025-03-25; last commit 2025-06-30). Quirks read in the deepspeed-mii 0.3.3 wheel:
- mii/entrypoints/openai_api_server.py hard-codes `ignore_eos: False` and `do_sample: True` (PITFALLS 10: outputs
  are sampled, never greedy) and passes `temperature` on when the request has one;
- mii/config.py `GenerateParamsConfig.temperature` is `Field(None, gt=0)`: `temperature: 0` fails every request,
  so no temperature is sent (the request model's default, 0.7, applies);
- mii/batching/data_classes.py `Request.is_done` compares `seq_length` (prompt + output tokens) with
  `min_new_tokens`, so `min_tokens = max_tokens` pins nothing once the prompt is `max_tokens` long. `min_tokens` is
  sent as `max_tokens` plus a bound on the prompt's tokens (its UTF-8 bytes + `_TEMPLATE_TOKENS`): EOS is then
  ignored until `max_new_tokens` ends the request (`stop_generation`, finish reason "length");
- stream chunks carry no usage; a role-only first chunk; no metrics endpoint; `/health` only.
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

__all__ = ["ADAPTER", "INFO", "METRICS", "build", "container_argv", "launch_argv", "prompt_token_bound"]

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


# tokens a chat template may add around the messages (role markers, BOS, generation prompt); generous on purpose:
# a `min_tokens` above prompt + output only keeps EOS off until `max_new_tokens` stops the request
_TEMPLATE_TOKENS = 1024


def prompt_token_bound(spec: RequestSpec) -> int:
    """An upper bound on the prompt's tokens as MII counts them (`seq_length` before output): each token of a
    byte-level or byte-fallback tokenizer covers at least one UTF-8 byte, and the template adds at most
    `_TEMPLATE_TOKENS`."""
    if spec.api == "chat":
        text = "".join(str(m.get("content", "")) + str(m.get("role", "")) for m in spec.messages)
    else:
        text = spec.prompt
    return len(text.encode()) + _TEMPLATE_TOKENS


def build(spec: RequestSpec, model: str, stream: bool) -> HttpCall:
    pin = {"min_tokens": spec.max_tokens + prompt_token_bound(spec)}
    return build_openai(spec, model, stream, pin_fields=pin, temperature=None)


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
