"""A server of unknown make that speaks the OpenAI API: proxies, hosted APIs, gateways, engines not identified.

`bench run --endpoint URL` (or NAME=URL with a NAME that is no engine) asks the server's `GET /v1/models` who it is
(`adapters.registry.adapter_for_models`); when its answer names no engine, this adapter talks to it. It sends only
fields of the OpenAI Chat Completions / Completions APIs (`model`, `messages` | `prompt`, `max_tokens`,
`temperature`, `stream`, `stream_options`): no `ignore_eos` / `min_tokens`, which OpenAI's own API refuses as
unrecognized arguments, so output lengths are not pinned (the verdict shows where they differ). It has no tokenize
endpoint, metrics or version route: prompts are built with `--tokenizer` or a stated stand-in, and the actual input
lengths come from the server's usage. It is not discovered as an engine (`bench engines` lists engines); the
registry hands it out under the name `openai`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from adapters.base import (
    HARDWARE,
    EngineConfig,
    EngineInfo,
    FunctionAdapter,
    HttpCall,
    MetricMap,
    no_tokenizer,
)
from adapters.openai import build_openai, parse_openai_event, parse_openai_response
from harness.errors import ConfigError
from workloads.spec import RequestSpec

__all__ = ["ADAPTER_NAME", "GENERIC_ADAPTER", "INFO", "build"]

ADAPTER_NAME = "openai"

INFO = EngineInfo(
    name=ADAPTER_NAME,
    display_name="OpenAI-compatible server (make unknown)",
    hardware=HARDWARE,
    honours_ignore_eos=False,
    honours_min_tokens=False,
    usage_in_stream=True,  # asked for with stream_options.include_usage; a server that ignores it sends none
    tokens_per_chunk="variable",
    tokenize_path=None,
    health_path="/v1/models",
    version_path=None,
    metrics_path=None,
    maintenance="n/a (any OpenAI-compatible server)",
)


def _attach_only(cfg: EngineConfig, runtime: str = "docker") -> list[str]:
    raise ConfigError(
        "a server of unknown make cannot be launched by EngineBench; attach to it: --endpoint NAME=http://HOST:PORT"
    )


def build(spec: RequestSpec, model: str, stream: bool) -> HttpCall:
    return build_openai(spec, model, stream)  # no pin fields: standard OpenAI fields only


def launch_env(cfg: EngineConfig) -> dict[str, str]:
    return {}


def version_from(payload: Mapping[str, Any]) -> str | None:
    return None


def local_status() -> tuple[bool, str]:
    return False, "attach only: --endpoint URL"


_tokenize_call, _tokens_from = no_tokenizer(
    "an OpenAI-compatible server of unknown make has no known tokenize endpoint"
)

GENERIC_ADAPTER = FunctionAdapter(
    info=INFO,
    metrics=MetricMap(names={}),
    launch_argv=_attach_only,
    launch_env=launch_env,
    container_argv=_attach_only,
    build=build,
    parse_event=parse_openai_event,
    parse_response=parse_openai_response,
    version_from=version_from,
    local_status=local_status,
    tokenize_call=_tokenize_call,
    tokens_from=_tokens_from,
)
