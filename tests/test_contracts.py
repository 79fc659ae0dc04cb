"""Contracts: each adapter judged by the engine's own code at a pinned version (tests/contract_env.py PINS).

- launch command lines, for a spread of configurations, parsed by the engine's own argument parser (SGLang
  `ServerArgs.add_cli_args`, LMDeploy's `lmdeploy serve api_server` parser, vLLM's `make_arg_parser`, the argparse
  block of DeepSpeed-MII's openai_api_server.py), each flag read back as the value the adapter meant; settings the
  adapter refuses are refused by the engine's parser too; Ray Serve LLM's launch config is built into its
  `LLMConfig`, and the vLLM engine arguments in it (and in Triton's model.json) are fields of vLLM's
  `AsyncEngineArgs`;
- request bodies, pinned and not, chat and completions, streamed and not, validated by the engine's own request
  model, and every field a codec sends is a declared field there (pydantic would drop an unknown one silently);
- metric maps: every name is registered in the engine's source with the type its canonical name says, or the test
  names the one that is gone. Engines the registries do not ship (TensorRT-LLM: PyPI holds only a stub that
  downloads from pypi.nvidia.com; Triton's vLLM backend) are checked against the names copied from their source
  files in tests/fixtures/metrics/ (file and commit in each).

The engines' packages are fetched into the engine cache by the tests themselves (first run: a few minutes).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest

from adapters import (
    lmdeploy,
    mii,
    ollama,
    rayserve,
    registry,
    sglang,
    tgi,
    triton,
    triton_trtllm,
    trtllm,
    vllm,
)
from adapters.base import CANONICAL_METRICS, Adapter, EngineConfig, MetricMap
from tests import contract_env as env
from workloads.spec import RequestSpec

FIXTURES = Path(__file__).parent / "fixtures"

# ---------------------------------------------------------------------------------------------------- helpers


def specs() -> list[RequestSpec]:
    chat = ({"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a river."})
    out = []
    for pin in (True, False):
        out.append(RequestSpec("c", "chat", 32, messages=chat, pin_output=pin))
        out.append(RequestSpec("p", "completions", 32, prompt="Once upon a time", pin_output=pin))
    return out


def bodies(adapter: Adapter) -> list[tuple[str, dict[str, Any]]]:
    """(chat | completions, body) for every spec, streamed and not."""
    out = []
    for spec in specs():
        for stream in (True, False):
            call = adapter.build(spec, "m", stream)
            out.append(("chat" if spec.api == "chat" else "completions", dict(call.body or {})))
    return out


def allowed_unknown(adapter: Adapter) -> set[str]:
    # an engine that sends no usage in streams ignores stream_options; nothing is read from it
    return set() if adapter.info.usage_in_stream else {"stream_options"}


def kind_of(canonical: str) -> str:
    return CANONICAL_METRICS[canonical].split(":", 1)[0]  # "gauge" | "counter" | "histogram"


def registered(source: str, prefix: str) -> dict[str, str]:
    """Exposed metric name -> "gauge" | "counter" | "histogram" for every `Gauge(name=...)`, `Counter(name=...)`,
    `Histogram(name=...)` (also vLLM's `_gauge_cls(name=...)`) in `source`. prometheus_client exposes a counter
    as `<name>_total`."""
    out: dict[str, str] = {}
    pattern = (
        r"(Gauge|Counter|Histogram|_gauge_cls|_counter_cls|_histogram_cls)\(\s*name=['\"]("
        + prefix
        + r"[a-z_0-9]+)"
    )
    for cls, name in re.findall(pattern, source):
        kind = cls.strip("_").replace("_cls", "").lower()
        if kind == "counter" and not name.endswith("_total"):
            name += "_total"
        out[name] = kind
    return out


def check_map(metrics: MetricMap, names: dict[str, str], legacy: set[str]) -> None:
    """Every mapped name is registered with its canonical type; those that are not are exactly `legacy` (names of
    older releases kept for servers that still run them)."""
    gone = {n for n in metrics.names if n not in names}
    assert gone == legacy, (
        f"not registered in the engine's source: {sorted(gone - legacy)}; back again: {sorted(legacy - gone)}"
    )
    wrong = {
        n: (names[n], kind_of(c)) for n, c in metrics.names.items() if n in names and names[n] != kind_of(c)
    }
    assert not wrong, f"registered with another type (source, canonical): {wrong}"


# ---------------------------------------------------------------------------------------------------- SGLang

SGLANG_CONFIGS = [
    EngineConfig(model="m"),
    EngineConfig(model="/models/m", served_model_name="s", dtype="bfloat16", quantization="awq",
                 kv_cache_dtype="fp8_e5m2", max_context=8192, max_num_seqs=64, gpu_memory_fraction=0.85,
                 tensor_parallel=2, prefix_caching=False, port=9001),
    EngineConfig(model="m", kv_cache_dtype="fp8_e4m3", prefix_caching=True, dtype="float16"),
]  # fmt: skip
SGLANG_DESTS = {
    "model_path": "model", "host": "host", "port": "port", "served_model_name": "served_model_name",
    "dtype": "dtype", "quantization": "quantization", "kv_cache_dtype": "kv_cache_dtype",
    "context_length": "max_context", "max_running_requests": "max_num_seqs",
    "mem_fraction_static": "gpu_memory_fraction", "tp_size": "tensor_parallel",
}  # fmt: skip


@pytest.fixture(scope="module")
def sglang_probe() -> tuple[list[Any], list[str]]:
    dests = [*SGLANG_DESTS, "enable_metrics", "enable_cache_report", "disable_radix_cache"]
    calls: list[tuple[str, list[Any]]] = [
        ("sglang_args", [sglang.launch_argv(c)[3:], dests]) for c in SGLANG_CONFIGS
    ]
    calls.append(("sglang_args", [["--model-path", "m", "--kv-cache-dtype", "int8"], ["kv_cache_dtype"]]))
    calls += [("sglang_body", [kind, body]) for kind, body in bodies(sglang.ADAPTER)]
    return env.probe(calls, "sglang")


def test_sglang_server_args_read_back_every_setting(sglang_probe: tuple[list[Any], list[str]]) -> None:
    results, _ = sglang_probe
    for cfg, got in zip(SGLANG_CONFIGS, results, strict=False):
        assert "error" not in got, got
        values = got["values"]
        for dest, field in SGLANG_DESTS.items():
            want = getattr(cfg, field)
            if want is not None and not (field == "tensor_parallel" and want == 1):
                assert values[dest] == want, (dest, values[dest], want)
        assert values["enable_metrics"] is True and values["enable_cache_report"] is True  # issue 20 item 8
        assert values["disable_radix_cache"] is (cfg.prefix_caching is False)
    # the adapter refuses kv_cache_dtype=int8 (test_adapters_gpu REFUSALS); ServerArgs refuses it too
    assert "invalid choice: 'int8'" in results[len(SGLANG_CONFIGS)]["error"]


def test_sglang_protocol_accepts_every_field_sent(sglang_probe: tuple[list[Any], list[str]]) -> None:
    results, _ = sglang_probe
    for got in results[len(SGLANG_CONFIGS) + 1 :]:
        assert got == {"unknown": [], "error": None}


def test_sglang_metric_names_are_registered() -> None:
    source = (env.unpacked("sglang") / "sglang/srt/observability/metrics_collector.py").read_text()
    # sglang:time_per_output_token_seconds: releases before the inter_token_latency rename
    check_map(sglang.METRICS, registered(source, "sglang:"), {"sglang:time_per_output_token_seconds"})


# ---------------------------------------------------------------------------------------------------- LMDeploy

LMDEPLOY_CONFIGS = [
    EngineConfig(model="m"),
    EngineConfig(model="/models/m", served_model_name="s", dtype="bfloat16", quantization="awq",
                 kv_cache_dtype="fp8_e5m2", max_context=8192, max_num_seqs=64, gpu_memory_fraction=0.85,
                 tensor_parallel=2, prefix_caching=True, port=9001, env={"LMDEPLOY_BACKEND": "pytorch"}),
    EngineConfig(model="m", kv_cache_dtype="int4", quantization="gptq", dtype="float16"),
]  # fmt: skip


@pytest.fixture(scope="module")
def lmdeploy_probe() -> tuple[list[Any], list[str]]:
    dests = ["model_path", "server_name", "server_port", "backend", "model_name", "dtype", "model_format",
             "quant_policy", "session_len", "max_batch_size", "cache_max_entry_count", "tp", "enable_prefix_caching"]  # fmt: skip
    calls: list[tuple[str, list[Any]]] = [
        ("lmdeploy_args", [lmdeploy.launch_argv(c)[1:], dests]) for c in LMDEPLOY_CONFIGS
    ]
    refused = [
        ["serve", "api_server", "m", "--dtype", "float32"],
        ["serve", "api_server", "m", "--model-format", "bitsandbytes"],
    ]
    calls += [("lmdeploy_args", [argv, ["dtype"]]) for argv in refused]
    calls += [("lmdeploy_body", [kind, body]) for kind, body in bodies(lmdeploy.ADAPTER)]
    return env.probe(calls, "lmdeploy")


def test_lmdeploy_parser_reads_back_every_setting(lmdeploy_probe: tuple[list[Any], list[str]]) -> None:
    results, _ = lmdeploy_probe
    for cfg, got in zip(LMDEPLOY_CONFIGS, results, strict=False):
        assert "error" not in got, got
        v = got["values"]
        assert v["model_path"] == cfg.model and v["server_port"] == cfg.port
        assert v["backend"] == cfg.env.get("LMDEPLOY_BACKEND", "turbomind")
        assert v["enable_prefix_caching"] is bool(cfg.prefix_caching)
        if cfg.kv_cache_dtype:
            assert v["quant_policy"] == lmdeploy.QUANT_POLICY[cfg.kv_cache_dtype]
        for dest, want in (("dtype", cfg.dtype), ("model_format", cfg.quantization), ("session_len", cfg.max_context),
                           ("max_batch_size", cfg.max_num_seqs), ("cache_max_entry_count", cfg.gpu_memory_fraction),
                           ("model_name", cfg.served_model_name)):  # fmt: skip
            if want is not None:
                assert v[dest] == want, (dest, v[dest], want)
        assert v["tp"] == cfg.tensor_parallel
    # what the adapter refuses (dtype=float32, quantization=bitsandbytes), LMDeploy's parser refuses
    for got in results[len(LMDEPLOY_CONFIGS) : len(LMDEPLOY_CONFIGS) + 2]:
        assert "invalid choice" in got["error"], got


def test_lmdeploy_protocol_accepts_every_field_sent(lmdeploy_probe: tuple[list[Any], list[str]]) -> None:
    results, _ = lmdeploy_probe
    for got in results[len(LMDEPLOY_CONFIGS) + 2 :]:
        assert got == {"unknown": [], "error": None}


def test_lmdeploy_metric_names_are_registered() -> None:
    source = (env.unpacked("lmdeploy") / "lmdeploy/metrics/loggers.py").read_text()
    check_map(lmdeploy.METRICS, registered(source, "lmdeploy:"), set())


# ---------------------------------------------------------------------------------------------------- vLLM

VLLM_CONFIGS = [
    EngineConfig(model="m"),
    EngineConfig(model="m", served_model_name="s", dtype="bfloat16", max_context=4096, max_num_seqs=8,
                 prefix_caching=False, kv_cache_dtype="fp8", port=9001),
    EngineConfig(model="m", quantization="fp8", prefix_caching=True, tensor_parallel=2, gpu_memory_fraction=0.9,
                 env={"VLLM_TARGET_DEVICE": "cuda"}),
]  # fmt: skip
VLLM_DESTS = ["model_tag", "served_model_name", "host", "port", "dtype", "quantization", "max_model_len", "max_num_seqs",
              "enable_prefix_caching", "tensor_parallel_size", "kv_cache_dtype", "gpu_memory_utilization",
              "enforce_eager", "enable_prompt_tokens_details"]  # fmt: skip


RAY_CONFIGS = [
    EngineConfig(model="m"),
    EngineConfig(model="/models/m", served_model_name="s", max_num_seqs=8, prefix_caching=True, max_context=4096,
                 dtype="bfloat16"),
]  # fmt: skip


@pytest.fixture(scope="module")
def vllm_and_ray() -> tuple[list[Any], list[Any]]:
    """vLLM's and Ray Serve LLM's checks in one process (Ray's code imports vLLM's: one import of each)."""
    env.vllm_site_packages()
    vllm_calls: list[tuple[str, list[Any]]] = [
        ("vllm_args", [[c.model, *vllm._engine_flags(c, c.host)], VLLM_DESTS]) for c in VLLM_CONFIGS
    ]
    vllm_calls += [("vllm_body", [kind, body]) for kind, body in bodies(vllm.ADAPTER)]
    vllm_calls.append(("vllm_engine_fields", []))
    vllm_calls.append(("vllm_sanitized", [list(vllm.METRICS.names)]))
    ray_calls: list[tuple[str, list[Any]]] = [("ray_config", [rayserve.llm_config(c)]) for c in RAY_CONFIGS]
    ray_calls += [("ray_body", [kind, body]) for kind, body in bodies(rayserve.ADAPTER)]
    results, _ = env.probe(vllm_calls + ray_calls, "ray")
    return results[: len(vllm_calls)], results[len(vllm_calls) :]


@pytest.fixture(scope="module")
def vllm_probe(vllm_and_ray: tuple[list[Any], list[Any]]) -> tuple[list[Any], list[str]]:
    return vllm_and_ray[0], []


def test_vllm_parser_reads_back_every_setting(vllm_probe: tuple[list[Any], list[str]]) -> None:
    results, _ = vllm_probe
    for cfg, got in zip(VLLM_CONFIGS, results, strict=False):
        assert "error" not in got, got
        v = got["values"]
        assert v["model_tag"] == cfg.model and v["served_model_name"] == [cfg.served_model_name or cfg.model]
        for dest, want in (("dtype", cfg.dtype), ("quantization", cfg.quantization), ("max_model_len", cfg.max_context),
                           ("max_num_seqs", cfg.max_num_seqs), ("enable_prefix_caching", cfg.prefix_caching),
                           ("kv_cache_dtype", cfg.kv_cache_dtype), ("gpu_memory_utilization", cfg.gpu_memory_fraction)):  # fmt: skip
            if want is not None:
                assert v[dest] == want, (dest, v[dest], want)
        assert v["tensor_parallel_size"] == cfg.tensor_parallel
        assert v["enable_prompt_tokens_details"] is True
        assert v["enforce_eager"] is (cfg.env.get("VLLM_TARGET_DEVICE", "cpu") == "cpu")


def test_vllm_protocol_accepts_every_field_sent(vllm_probe: tuple[list[Any], list[str]]) -> None:
    results, _ = vllm_probe
    for got in results[len(VLLM_CONFIGS) : -2]:
        assert got == {"unknown": [], "error": None}


def test_vllm_metric_names_are_registered() -> None:
    source = (env.vllm_site_packages() / "vllm/v1/metrics/loggers.py").read_text()
    # vllm:gpu_cache_usage_perc (before 0.10) and vllm:time_per_output_token_seconds (before 0.11): kept for
    # servers that still run those releases
    legacy = {"vllm:gpu_cache_usage_perc", "vllm:time_per_output_token_seconds"}
    check_map(vllm.METRICS, registered(source, "vllm:"), legacy)


def test_vllm_engine_arguments_of_ray_and_triton_are_vllm_fields(
    vllm_probe: tuple[list[Any], list[str]],
) -> None:
    """Ray Serve LLM's engine_kwargs and Triton's model.json are handed to vLLM's AsyncEngineArgs."""
    fields = set(vllm_probe[0][-2])
    every = EngineConfig(model="m", dtype="bfloat16", quantization="awq", max_context=8192, max_num_seqs=64,
                         prefix_caching=False, tensor_parallel=2, kv_cache_dtype="fp8", gpu_memory_fraction=0.9)  # fmt: skip
    assert set(rayserve.llm_config(every)["engine_kwargs"]) <= fields
    assert set(triton.vllm_model_json(every, "hf/model")) <= fields


# ---------------------------------------------------------------------------------------------------- Ray Serve LLM


@pytest.fixture(scope="module")
def ray_probe(vllm_and_ray: tuple[list[Any], list[Any]]) -> tuple[list[Any], list[str]]:
    return vllm_and_ray[1], []


def test_ray_llm_config_takes_the_launch_config_without_stream_batching(
    ray_probe: tuple[list[Any], list[str]],
) -> None:
    """LLMConfig (ray 2.60.0) validates the config; LLMServer._get_batch_interval_ms then gives 0: each engine
    chunk is its own event (issue 20 item 5), and engine metrics go to Ray's exporter (log_engine_metrics)."""
    for got in ray_probe[0][:2]:
        assert got["error"] is None, got
        assert got["batch_interval_ms"] == 0 and got["log_engine_metrics"] is True
    assert ray_probe[0][1]["engine_kwargs"] == {
        "max_num_seqs": 8, "enable_prefix_caching": True, "max_model_len": 4096, "dtype": "bfloat16",
    }  # fmt: skip


def test_ray_protocol_accepts_every_field_sent(ray_probe: tuple[list[Any], list[str]]) -> None:
    for got in ray_probe[0][2:]:
        assert got == {"unknown": [], "error": None}


def test_ray_metric_names_are_vllms_as_rays_exporter_names_them(
    vllm_probe: tuple[list[Any], list[str]],
) -> None:
    """ray_ + vLLM's name sanitized by vLLM's own Ray wrapper; counters exposed with _total."""
    source = (env.vllm_site_packages() / "vllm/v1/metrics/loggers.py").read_text()
    names = registered(source, "vllm:")
    sanitized = vllm_probe[0][-1]
    assert sanitized["vllm:num_requests_running"] == "vllm_num_requests_running"
    ray_names = {"ray_" + n.replace(":", "_"): kind for n, kind in names.items()}
    assert all("ray_" + sanitized[n] in ray_names for n in sanitized if n in names)
    check_map(rayserve.METRICS, ray_names, set())


# ---------------------------------------------------------------------------------------------------- DeepSpeed-MII


@pytest.fixture(scope="module")
def mii_probe() -> tuple[list[Any], list[str]]:
    config_utils = str(env.sdist_member("deepspeed", "deepspeed/runtime/config_utils.py"))
    source = str(env.unpacked("deepspeed-mii") / "mii/entrypoints/openai_api_server.py")
    argv = mii.launch_argv(EngineConfig(model="m", max_context=8192, tensor_parallel=2, port=9001))[3:]
    long = RequestSpec("l", "completions", 32, prompt="word " * 300)  # ~300 tokens: far above max_tokens
    calls: list[tuple[str, list[Any]]] = [
        ("mii_deepspeed", [config_utils]),
        ("mii_args", [argv, ["model", "host", "port", "max_length", "tensor_parallel"], source]),
        ("mii_body", ["completions", dict(mii.build(long, "m", True).body or {}), 301, 8192]),
        # what the adapter sent before issue 20: temperature 0 and min_tokens = max_tokens
        (
            "mii_body",
            ["completions", {"model": "m", "prompt": "x", "max_tokens": 32, "temperature": 0.0}, 301, 8192],
        ),
        (
            "mii_body",
            ["completions", {"model": "m", "prompt": "x", "max_tokens": 32, "min_tokens": 32}, 301, 8192],
        ),
    ]
    calls += [("mii_body", [kind, body, 20, 8192]) for kind, body in bodies(mii.ADAPTER)]
    return env.probe(calls, "deepspeed-mii")


def test_mii_parser_reads_back_every_setting(mii_probe: tuple[list[Any], list[str]]) -> None:
    got = mii_probe[0][1]
    assert got == {
        "values": {"model": "m", "host": "127.0.0.1", "port": 9001, "max_length": 8192, "tensor_parallel": 2}
    }


def test_mii_requests_pass_its_config_and_run_to_max_tokens(mii_probe: tuple[list[Any], list[str]]) -> None:
    """MII's own GenerateParamsConfig and Request stop logic, EOS offered at every step: the adapter's request runs
    to exactly max_tokens (finish "length") even with a prompt 10x longer than that; the old request fails
    (temperature 0) or stops at the first EOS (min_tokens compared with prompt + output)."""
    results = mii_probe[0]
    fixed, zero, old = results[2], results[3], results[4]
    assert fixed["error"] is None and (fixed["generated"], fixed["finish"]) == (
        32,
        "GenerationFinishReason.LENGTH",
    )
    assert "temperature" in zero["error"] and "greater than 0" in zero["error"]
    assert (old["generated"], old["finish"]) == (1, "GenerationFinishReason.STOP")
    for got in results[5:]:
        assert got["error"] is None and set(got["unknown"]) <= allowed_unknown(mii.ADAPTER), got


# ---------------------------------------------------------------------------------------------------- not on PyPI


def fixture_names(path: Path) -> dict[str, str]:
    """`name type` lines of a names fixture (comments name the source file and commit)."""
    out = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, kind = line.split()
            out[name] = kind
    return out


def test_trtllm_metric_names_are_its_collectors() -> None:
    check_map(trtllm.METRICS, fixture_names(FIXTURES / "metrics/trtllm_collector_names.txt"), set())


def test_triton_metric_names_are_its_backends() -> None:
    names = fixture_names(FIXTURES / "metrics/triton_vllm_backend_names.txt")
    check_map(triton.METRICS, names, set())


def test_every_adapter_is_checked_against_something() -> None:
    """`bench engines` says per adapter what it was checked against (adapters.contracts.CHECKED)."""
    from adapters.contracts import CHECKED

    engines = {name for name in registry.adapters() if name != "scripted"}
    assert engines <= set(CHECKED), sorted(engines - set(CHECKED))


def recorded_options(name: str) -> dict[str, tuple[str, set[str]]]:
    """option -> ("flag" | "value", its choices) from a fixture copied from the engine's CLI source."""
    out: dict[str, tuple[str, set[str]]] = {}
    for line in (FIXTURES / "contracts" / name).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            option, kind, *choices = line.split()
            out[option] = (kind, set(choices[0].split(",")) if choices else set())
    return out


def check_flags(argv: list[str], options: dict[str, tuple[str, set[str]]]) -> None:
    """Every `--flag` in argv is an option of the engine's CLI, followed by a value exactly when it takes one, and
    that value is among its choices where the CLI restricts them."""
    for i, arg in enumerate(argv):
        if not arg.startswith("--"):
            continue
        assert arg in options, f"{arg} is no option of the engine's CLI"
        kind, choices = options[arg]
        value = argv[i + 1] if i + 1 < len(argv) and not argv[i + 1].startswith("--") else None
        assert (kind == "value") == (value is not None), (arg, kind, value)
        assert not choices or value in choices, (arg, value, sorted(choices))


def test_trtllm_serve_flags_are_its_click_options(tmp_path: Path) -> None:
    """tensorrt_llm/commands/serve.py (commit 4c05a748): every flag the adapter emits is a trtllm-serve option."""
    config = tmp_path / "extra.yml"
    config.write_text("return_perf_metrics: true\nenable_iter_perf_stats: true\n")
    cfg = EngineConfig(model="/models/m", max_context=8192, max_num_seqs=64, tensor_parallel=2,
                       gpu_memory_fraction=0.85, port=9001, extra_args=("--extra_llm_api_options", str(config)))  # fmt: skip
    argv = trtllm.launch_argv(cfg)
    assert argv[:2] == ["trtllm-serve", "/models/m"]
    check_flags(argv[2:], recorded_options("trtllm_serve_options.txt"))
    assert argv[argv.index("--backend") + 1] in ("pytorch", "tensorrt", "trt", "_autodeploy")


def test_tgi_launcher_flags_are_its_clap_options() -> None:
    """launcher/src/main.rs `struct Args` (commit db931fcf): every flag is a launcher option, and the adapter's
    dtype / KV dtype / quantization lists are exactly the launcher's value enums."""
    options = recorded_options("tgi_launcher_options.txt")
    for cfg in (
        EngineConfig(model="m"),
        EngineConfig(model="/models/m", quantization="awq", max_context=8192, max_num_seqs=64, tensor_parallel=2,
                     kv_cache_dtype="fp8_e5m2", gpu_memory_fraction=0.85, port=9001),
        EngineConfig(model="m", dtype="bfloat16", kv_cache_dtype="fp8_e4m3fn"),
    ):  # fmt: skip
        check_flags(tgi.launch_argv(cfg)[1:], options)
    assert set(tgi.KV_DTYPES) == options["--kv-cache-dtype"][1]
    assert set(tgi.DTYPES) == options["--dtype"][1]
    assert set(tgi.QUANTIZE) == options["--quantize"][1]


def test_triton_frontend_flags_are_its_argparse_options() -> None:
    """python/openai/openai_frontend/main.py (commit e1db8a60): both Triton adapters' flags are frontend options,
    `--backend` one of its choices."""
    options = recorded_options("triton_frontend_options.txt")
    cfg = EngineConfig(model="/repo", port=9001, env={"TRITON_TOKENIZER": "t"})
    for adapter in (triton, triton_trtllm):
        check_flags(adapter.launch_argv(cfg)[2:], options)


def test_ollama_environment_is_what_ollama_serve_reads() -> None:
    """envconfig/config.go AsMap (commit fb307609): every variable the adapter sets is one `ollama serve` reads."""
    lines = (FIXTURES / "contracts/ollama_env_vars.txt").read_text().splitlines()
    known = {line.strip() for line in lines if line.strip() and not line.startswith("#")}
    cfg = EngineConfig(
        model="llama3.2:1b", max_context=8192, max_num_seqs=4, kv_cache_dtype="q8_0", port=9001
    )
    assert set(ollama.launch_env(cfg)) <= known, sorted(set(ollama.launch_env(cfg)) - known)


@pytest.mark.parametrize("adapter", [triton.ADAPTER, triton_trtllm.ADAPTER], ids=["triton", "triton-trtllm"])
def test_triton_frontend_declares_every_field_sent(adapter: Adapter) -> None:
    """schemas/openai.py (commit e1db8a60) declares its request models with extra="forbid": a field it does not
    declare is an HTTP 400, so every field the codec sends must be one of them."""
    declared = {}
    for line in (FIXTURES / "contracts/triton_request_fields.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            api, fields = line.split()
            declared[api] = set(fields.split(","))
    for kind, body in bodies(adapter):
        assert set(body) <= declared[kind], (kind, sorted(set(body) - declared[kind]))


def test_tgi_metric_names_are_its_routers() -> None:
    """Every mapped name is registered by TGI's router with its canonical type (counters exposed without _total)."""
    check_map(tgi.METRICS, fixture_names(FIXTURES / "metrics/tgi_router_names.txt"), set())
