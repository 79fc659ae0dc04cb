"""The scripted server (`harness.calibration`): EngineBench's own calibration target, as an adapter.

It speaks vLLM's OpenAI dialect exactly, honours `ignore_eos` (the pinned output length is exact), and every output
token is the same text (`TOKEN_TEXT` unless configured otherwise), so the codec counts the tokens of a multi-token
chunk exactly. `build` also sends the spec's `request_id` in the body, which the server uses to key the delays it
reports at `/calibration/stats`, so client-measured timing can be matched to the server's achieved timing.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from functools import partial
from typing import Any

from adapters.base import EngineConfig, EngineInfo, FunctionAdapter, HttpCall, MetricMap, StreamDelta
from adapters.openai import build_openai, parse_openai_event, parse_openai_response
from workloads.spec import RequestSpec

__all__ = ["ADAPTER", "INFO", "METRICS", "TOKEN_TEXT", "default_config", "make_adapter", "parse_event"]

TOKEN_TEXT = " the"

INFO = EngineInfo(
    name="scripted",
    display_name="Scripted server (calibration)",
    hardware=("cpu",),
    honours_ignore_eos=True,
    honours_min_tokens=True,
    usage_in_stream=True,
    tokens_per_chunk="variable",
    tokenize_path="/tokenize",
    tokenize_dialect="vllm",
    health_path="/health",
    version_path="/version",
    metrics_path="/metrics",
    maintenance="built in (harness/calibration.py)",
)

METRICS = MetricMap(
    names={
        "scripted:num_requests_running": "requests_running",
        "scripted:num_requests_waiting": "requests_waiting",
        "scripted:prompt_tokens_total": "prompt_tokens_total",
        "scripted:generation_tokens_total": "generation_tokens_total",
        "scripted:request_success_total": "requests_finished_total",
    }
)


def launch_argv(cfg: EngineConfig) -> list[str]:
    argv = [sys.executable, "-m", "harness.calibration", "--host", cfg.host, "--port", str(cfg.port)]
    return [*argv, "--model", cfg.served_model_name or cfg.model, *cfg.extra_args]


def launch_env(cfg: EngineConfig) -> dict[str, str]:
    return dict(cfg.env)


def container_argv(cfg: EngineConfig, runtime: str = "docker") -> list[str]:
    from harness.errors import ConfigError

    raise ConfigError(
        "the scripted server has no container image; run it natively (python -m harness.calibration)"
    )


def build(spec: RequestSpec, model: str, stream: bool) -> HttpCall:
    return build_openai(
        spec, model, stream, pin_fields={"ignore_eos": True}, extra={"request_id": spec.request_id}
    )


def version_from(payload: Mapping[str, Any]) -> str | None:
    version = payload.get("version")
    return str(version) if version else None


def local_status() -> tuple[bool, str]:
    return True, "built in: python -m harness.calibration"


def tokenize_call(text: str, model: str, add_special: bool = False) -> HttpCall:
    return HttpCall("POST", "/tokenize", {"model": model, "prompt": text}, stream=False)


def tokens_from(payload: Mapping[str, Any]) -> list[int]:
    return [int(t) for t in payload.get("tokens") or []]


def parse_event(data: bytes, token_text: str = TOKEN_TEXT) -> StreamDelta | None:
    """OpenAI parsing, with the chunk's tokens counted exactly (every token is `token_text`)."""
    return parse_openai_event(data, token_text)


def default_config() -> EngineConfig:
    """How `bench` launches it by default (port 0: a free one); extra_args can set `--ttft`, `--itl`, ..."""
    return EngineConfig(model="scripted", served_model_name="scripted", port=0)


def make_adapter(token_text: str = TOKEN_TEXT) -> FunctionAdapter:
    """The adapter for a server whose every token is `token_text` (ScriptConfig.token_text); it pickles, so the
    runner's worker processes can use it."""
    return FunctionAdapter(
        info=INFO,
        metrics=METRICS,
        launch_argv=launch_argv,
        launch_env=launch_env,
        container_argv=container_argv,
        build=build,
        parse_event=partial(parse_openai_event, token_text=token_text),  # no wrapper call per event
        parse_response=parse_openai_response,
        version_from=version_from,
        local_status=local_status,
        tokenize_call=tokenize_call,
        tokens_from=tokens_from,
    )


ADAPTER = make_adapter()
