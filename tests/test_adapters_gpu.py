"""The GPU-class adapters (SGLang, LMDeploy, TensorRT-LLM, TGI, Ollama, MLC-LLM, Triton, Ray Serve LLM, DeepSpeed-MII):
command lines for every normalized setting and every refusal, container command lines, request building, stream
parsing against real recorded streams and metric maps against real metric dumps (tests/fixtures/streams/,
tests/fixtures/metrics/; sources in tests/fixtures/streams/README.md), and the knowledge document."""

from __future__ import annotations

import random
import sys
from pathlib import Path

import orjson
import pytest

from adapters import (
    lmdeploy,
    mii,
    mlc,
    ollama,
    rayserve,
    registry,
    sglang,
    tgi,
    triton,
    triton_trtllm,
    trtllm,
)
from adapters.base import Adapter, EngineConfig, StreamDelta
from adapters.knowledge import ENGINE_FACTS, knowledge_document
from adapters.prometheus import Histogram, scrape
from harness.errors import ConfigError, EngineError
from harness.sse import SSEParser
from workloads.spec import RequestSpec

FIXTURES = Path(__file__).parent / "fixtures"
GPU_ENGINES = (
    "sglang",
    "lmdeploy",
    "trtllm",
    "tgi",
    "ollama",
    "mlc",
    "triton",
    "triton-openai",
    "triton-trtllm",
    "rayserve",
    "mii",
)
EVERY = EngineConfig(
    model="/models/m",
    served_model_name="m",
    dtype="bfloat16",
    quantization="awq",
    max_context=8192,
    max_num_seqs=64,
    prefix_caching=False,
    tensor_parallel=2,
    kv_cache_dtype="fp8_e5m2",
    gpu_memory_fraction=0.85,
    port=9001,
    extra_args=("--x", "1"),
)


def pairs(argv: list[str]) -> dict[str, str]:
    """flag -> the value after it (flags without a value map to "")."""
    out: dict[str, str] = {}
    for i, a in enumerate(argv):
        if a.startswith("--"):
            nxt = argv[i + 1] if i + 1 < len(argv) else ""
            out[a] = "" if nxt.startswith("--") else nxt
    return out


def payloads(raw: bytes, seed: int) -> list[bytes]:
    """The `data:` payloads of a recorded stream, fed to the harness SSE parser in random-sized reads."""
    rng = random.Random(seed)
    parser, out, i = SSEParser(), [], 0
    while i < len(raw):
        n = rng.randint(1, 40)
        out += parser.feed(raw[i : i + n])
        i += n
    return out + parser.close()


def parse_all(parse: object, raw: bytes) -> list[StreamDelta]:
    deltas = []
    for data in payloads(raw, seed=len(raw)):
        if data == b"[DONE]":
            continue
        d = parse(data)  # type: ignore[operator]
        if d is not None:
            deltas.append(d)
    return deltas


# ---------------------------------------------------------------- discovery, protocol, status


def test_registry_discovers_every_gpu_engine() -> None:
    found = registry.adapters()
    for name in GPU_ENGINES:
        assert name in found, f"{name} not discovered"
        assert isinstance(found[name], Adapter)
        assert found[name].info.name == name
        assert found[name].info.sources, f"{name} has no sources"
    assert registry.broken() == {}


@pytest.mark.skipif("nvidia" in registry.hardware_here(), reason="this machine has an NVIDIA GPU")
@pytest.mark.parametrize("name", GPU_ENGINES)
def test_local_status_says_why_and_how_to_attach(name: str) -> None:
    ok, why = registry.get(name).local_status()
    if ok:  # Ray Serve LLM runs on this machine's CPU once `bench engines install rayserve` added ray
        pytest.skip(f"{name} runs here: {why}")
    assert why.startswith(f"{name}: not runnable here (")
    assert (
        f"--endpoint {name}=http://HOST:PORT" in why
        and f"ENGINEBENCH_ENDPOINT_{name.upper().replace('-', '_')}" in why
    )


# ---------------------------------------------------------------- command lines: every setting


def test_sglang_every_setting() -> None:
    argv = sglang.launch_argv(EVERY)
    assert argv[:3] == ["python3", "-m", "sglang.launch_server"]
    assert pairs(argv) == {
        "--model-path": "/models/m", "--host": "127.0.0.1", "--port": "9001", "--enable-metrics": "",
        "--enable-cache-report": "", "--served-model-name": "m", "--dtype": "bfloat16", "--quantization": "awq",
        "--kv-cache-dtype": "fp8_e5m2", "--context-length": "8192", "--max-running-requests": "64",
        "--mem-fraction-static": "0.85", "--tp-size": "2", "--disable-radix-cache": "", "--x": "1",
    }  # fmt: skip


def test_sglang_defaults_leave_engine_defaults_alone() -> None:
    argv = sglang.launch_argv(EngineConfig(model="m"))
    assert argv == ["python3", "-m", "sglang.launch_server", "--model-path", "m", "--host", "127.0.0.1",
                    "--port", "8000", "--enable-metrics", "--enable-cache-report"]  # fmt: skip
    assert "--disable-radix-cache" not in sglang.launch_argv(EngineConfig(model="m", prefix_caching=True))


def test_lmdeploy_every_setting() -> None:
    argv = lmdeploy.launch_argv(EVERY)
    assert argv[:4] == ["lmdeploy", "serve", "api_server", "/models/m"]
    assert pairs(argv) == {
        "--server-name": "127.0.0.1", "--server-port": "9001", "--backend": "turbomind", "--model-name": "m",
        "--dtype": "bfloat16", "--model-format": "awq", "--quant-policy": "17", "--session-len": "8192",
        "--max-batch-size": "64", "--cache-max-entry-count": "0.85", "--tp": "2", "--x": "1",
    }  # fmt: skip
    assert "--enable-prefix-caching" not in argv  # prefix_caching=False is LMDeploy's default
    on = lmdeploy.launch_argv(EngineConfig(model="m", prefix_caching=True, kv_cache_dtype="int8",
                                           env={"LMDEPLOY_BACKEND": "pytorch"}))  # fmt: skip
    assert (
        "--enable-prefix-caching" in on
        and pairs(on)["--quant-policy"] == "8"
        and pairs(on)["--backend"] == "pytorch"
    )
    assert "LMDEPLOY_BACKEND" not in lmdeploy.launch_env(
        EngineConfig(model="m", env={"LMDEPLOY_BACKEND": "pytorch"})
    )


def _yaml(tmp_path: Path, text: str, name: str = "extra.yml") -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


METRICS_YAML = "return_perf_metrics: true\nenable_iter_perf_stats: true\n"


def test_trtllm_every_flag_setting_and_yaml_settings(tmp_path: Path) -> None:
    config = _yaml(tmp_path, METRICS_YAML)
    cfg = EngineConfig(model="/models/m", max_context=8192, max_num_seqs=64, tensor_parallel=2,
                       gpu_memory_fraction=0.85, quantization="fp8", port=9001,
                       extra_args=("--config", config))  # fmt: skip
    argv = trtllm.launch_argv(cfg)
    assert argv[:2] == ["trtllm-serve", "/models/m"]
    assert pairs(argv) == {
        "--host": "127.0.0.1", "--port": "9001", "--backend": "pytorch", "--max_batch_size": "64",
        "--max_seq_len": "8192", "--kv_cache_free_gpu_memory_fraction": "0.85", "--tp_size": "2",
        "--config": config,
    }  # fmt: skip
    assert trtllm.yaml_needed(EVERY) == {
        "return_perf_metrics": True, "enable_iter_perf_stats": True,
        "kv_cache_config": {"enable_block_reuse": False, "dtype": "fp8_e5m2"}, "dtype": "bfloat16",
    }  # fmt: skip
    reuse = _yaml(tmp_path, METRICS_YAML + "kv_cache_config:\n  enable_block_reuse: false\n", "reuse.yml")
    with_yaml = EngineConfig(model="m", prefix_caching=False, extra_args=("--config", reuse))
    assert trtllm.launch_argv(with_yaml)[-2:] == ["--config", reuse]


def test_trtllm_needs_the_metrics_switches_in_its_yaml(tmp_path: Path) -> None:
    """/prometheus/metrics answers only with return_perf_metrics, its gauges need enable_iter_perf_stats: a launch
    without them is refused with the YAML to add; a YAML that sets one gets the other named."""
    with pytest.raises(
        ConfigError, match=r"put `\{return_perf_metrics: true, enable_iter_perf_stats: true\}`"
    ):
        trtllm.launch_argv(EngineConfig(model="m"))
    half = _yaml(tmp_path, "return_perf_metrics: true\n")
    with pytest.raises(ConfigError, match=r"add `\{enable_iter_perf_stats: true\}` to "):
        trtllm.launch_argv(EngineConfig(model="m", extra_args=("--config", half)))


def test_trtllm_refuses_a_memory_fraction_its_yaml_would_replace(tmp_path: Path) -> None:
    """A kv_cache_config in the YAML replaces the KvCacheConfig --kv_cache_free_gpu_memory_fraction builds."""
    config = _yaml(tmp_path, METRICS_YAML + "kv_cache_config:\n  enable_block_reuse: true\n")
    cfg = EngineConfig(model="m", gpu_memory_fraction=0.8, extra_args=("--config", config))
    with pytest.raises(ConfigError, match=r"set `free_gpu_memory_fraction: 0\.8` inside its kv_cache_config"):
        trtllm.launch_argv(cfg)
    without = _yaml(tmp_path, METRICS_YAML, "plain.yml")
    assert "--kv_cache_free_gpu_memory_fraction" in trtllm.launch_argv(
        EngineConfig(model="m", gpu_memory_fraction=0.8, extra_args=("--config", without))
    )


def test_tgi_every_setting_and_prefix_caching_env() -> None:
    cfg = EngineConfig(model="/models/m", quantization="awq", max_context=8192, max_num_seqs=64,
                       tensor_parallel=2, kv_cache_dtype="fp8_e5m2", gpu_memory_fraction=0.85, port=9001,
                       prefix_caching=False)  # fmt: skip
    argv = tgi.launch_argv(cfg)
    assert argv[0] == "text-generation-launcher"
    assert pairs(argv) == {
        "--model-id": "/models/m", "--hostname": "127.0.0.1", "--port": "9001", "--num-shard": "2",
        "--quantize": "awq", "--kv-cache-dtype": "fp8_e5m2", "--max-batch-size": "64",
        "--max-total-tokens": "8192", "--max-input-tokens": "8191", "--cuda-memory-fraction": "0.85",
    }  # fmt: skip
    assert tgi.launch_env(cfg)["PREFIX_CACHING"] == "0"
    assert "PREFIX_CACHING" not in tgi.launch_env(EngineConfig(model="m"))
    assert pairs(tgi.launch_argv(EngineConfig(model="m", dtype="bfloat16")))["--dtype"] == "bfloat16"


def test_tgi_one_shard_is_said_and_the_batch_cap_queues() -> None:
    """launcher/src/main.rs find_num_shards: no --num-shard shards across every visible GPU; the batch cap is
    --max-batch-size, while --max-concurrent-requests (HTTP 429 above it) keeps its default."""
    argv = tgi.launch_argv(EngineConfig(model="m", max_num_seqs=8))
    assert pairs(argv)["--num-shard"] == "1" and pairs(argv)["--max-batch-size"] == "8"
    assert "--max-concurrent-requests" not in argv


def test_ollama_settings_are_environment() -> None:
    cfg = EngineConfig(model="llama3.2:1b-instruct-q4_K_M", quantization="q4_K_M", max_context=8192,
                       max_num_seqs=4, kv_cache_dtype="q8_0", port=9001, env={"OLLAMA_KEEP_ALIVE": "-1"})  # fmt: skip
    assert ollama.launch_argv(cfg) == ["ollama", "serve"]
    assert ollama.launch_env(cfg) == {
        "OLLAMA_HOST": "127.0.0.1:9001", "OLLAMA_NUM_PARALLEL": "4", "OLLAMA_CONTEXT_LENGTH": "8192",
        "OLLAMA_KV_CACHE_TYPE": "q8_0", "OLLAMA_FLASH_ATTENTION": "1", "OLLAMA_KEEP_ALIVE": "-1",
    }  # fmt: skip


def test_mlc_every_setting_goes_to_overrides() -> None:
    cfg = EngineConfig(model="HF://mlc-ai/Llama-3-8B-Instruct-q4f16_1-MLC", quantization="q4f16_1",
                       max_context=8192, max_num_seqs=64, tensor_parallel=2, gpu_memory_fraction=0.85,
                       prefix_caching=False, port=9001)  # fmt: skip
    argv = mlc.launch_argv(cfg)
    assert argv[:3] == ["mlc_llm", "serve", cfg.model]
    assert pairs(argv) == {
        "--mode": "server", "--host": "127.0.0.1", "--port": "9001", "--enable-debug": "",
        "--prefix-cache-mode": "disable",
        "--overrides": "max_num_sequence=64;context_window_size=8192;gpu_memory_utilization=0.85;"
        "tensor_parallel_shards=2",
    }  # fmt: skip
    assert "--overrides" not in mlc.launch_argv(EngineConfig(model="m"))


def test_triton_settings_go_to_the_model_repository() -> None:
    cfg = EngineConfig(model="/repo", port=9001, env={"TRITON_TOKENIZER": "meta-llama/Llama-3.1-8B-Instruct"})
    argv = triton.launch_argv(cfg)
    assert argv[:2] == ["python3", triton.FRONTEND]
    assert pairs(argv) == {
        "--model-repository": "/repo", "--tokenizer": "meta-llama/Llama-3.1-8B-Instruct", "--backend": "vllm",
        "--host": "127.0.0.1", "--openai-port": "9001",
    }  # fmt: skip
    assert triton.launch_env(cfg) == {}
    assert triton.vllm_model_json(EVERY, "meta-llama/Llama-3.1-8B-Instruct") == {
        "model": "meta-llama/Llama-3.1-8B-Instruct", "tensor_parallel_size": 2, "quantization": "awq",
        "kv_cache_dtype": "fp8_e5m2", "max_num_seqs": 64, "enable_prefix_caching": False,
        "max_model_len": 8192, "gpu_memory_utilization": 0.85, "dtype": "bfloat16",
    }  # fmt: skip


def test_rayserve_llm_config_carries_every_setting() -> None:
    cfg = EngineConfig(**{**EVERY.__dict__, "extra_args": ()})
    argv = rayserve.launch_argv(cfg)
    assert (
        argv[:2] == ["python3", "-c"]
        and "build_openai_app" in argv[2]
        and "serve.run(app, blocking=True)" in argv[2]
    )
    spec = orjson.loads(argv[3])
    assert (spec["host"], spec["port"]) == ("127.0.0.1", 9001)
    assert spec["llm_config"] == {
        "model_loading_config": {"model_id": "m", "model_source": "/models/m"},
        "engine_kwargs": {
            "tensor_parallel_size": 2, "quantization": "awq", "kv_cache_dtype": "fp8_e5m2", "max_num_seqs": 64,
            "enable_prefix_caching": False, "max_model_len": 8192, "gpu_memory_utilization": 0.85,
            "dtype": "bfloat16",
        },
        # Ray's 50 ms stream batching window off: each engine chunk is sent on its own
        "experimental_configs": {"stream_batching_interval_ms": 0},
    }  # fmt: skip
    compile(argv[2], "<rayserve launcher>", "exec")  # the embedded launcher is valid Python


def test_mii_flags() -> None:
    argv = mii.launch_argv(EngineConfig(model="m", max_context=8192, tensor_parallel=2, port=9001))
    assert argv == ["python3", "-m", "mii.entrypoints.openai_api_server", "--model", "m", "--host", "127.0.0.1",
                    "--port", "9001", "--max-length", "8192", "--tensor-parallel", "2"]  # fmt: skip


# ---------------------------------------------------------------- command lines: refusals


REFUSALS = [
    (ollama.launch_argv, EngineConfig(model="llama3", tensor_parallel=2),
     "ollama: tensor_parallel=2 is not supported (Ollama splits layers across GPUs automatically); remove --tp"),
    (ollama.launch_argv, EngineConfig(model="llama3", gpu_memory_fraction=0.9), "ollama: gpu_memory_fraction"),
    (ollama.launch_argv, EngineConfig(model="llama3", prefix_caching=False), "ollama: prefix_caching=False"),
    (ollama.launch_argv, EngineConfig(model="llama3", kv_cache_dtype="fp8"), "ollama: kv_cache_dtype=fp8"),
    (ollama.launch_argv, EngineConfig(model="llama3:8b", quantization="q4_0"), "use a tag such as llama3:<size>-q4_0"),
    (ollama.launch_argv, EngineConfig(model="llama3", dtype="bfloat16"), "ollama: dtype is fixed by the GGUF"),
    (ollama.launch_env, EngineConfig(model="llama3", tensor_parallel=2), "ollama: tensor_parallel=2"),
    (sglang.launch_argv, EngineConfig(model="m", kv_cache_dtype="int8"), "sglang: kv_cache_dtype=int8"),
    (sglang.launch_argv, EngineConfig(model="m", threads=8), "sglang: threads"),
    (lmdeploy.launch_argv, EngineConfig(model="m", dtype="float32"), "lmdeploy: dtype=float32"),
    (lmdeploy.launch_argv, EngineConfig(model="m", kv_cache_dtype="fp4"), "lmdeploy: kv_cache_dtype=fp4"),
    (lmdeploy.launch_argv, EngineConfig(model="m", quantization="bitsandbytes"), "--model-format"),
    (trtllm.launch_argv, EngineConfig(model="m", prefix_caching=False),
     "enable_iter_perf_stats: true, kv_cache_config: {enable_block_reuse: false}}` in a YAML"),
    (trtllm.launch_argv, EngineConfig(model="m", dtype="float16"), "enable_iter_perf_stats: true, dtype: float16}`"),
    (tgi.launch_argv, EngineConfig(model="m", quantization="q4_0"), "tgi: quantization=q4_0 is not supported"),
    (tgi.launch_argv, EngineConfig(model="m", quantization="awq", dtype="float16"), "--dtype excludes --quantize"),
    (tgi.launch_argv, EngineConfig(model="m", kv_cache_dtype="int8"), "tgi: kv_cache_dtype=int8"),
    (tgi.launch_argv, EngineConfig(model="m", kv_cache_dtype="fp8"),
     "tgi: kv_cache_dtype=fp8 is not supported (--kv-cache-dtype takes fp8_e4m3fn, fp8_e5m2)"),
    (tgi.launch_argv, EngineConfig(model="m", dtype="float32"), "tgi: dtype=float32 is not supported (--dtype takes"),
    (mlc.launch_argv, EngineConfig(model="Llama-3-8B-q4f16_1-MLC", quantization="q0f16"), "compiled into the MLC"),
    (mlc.launch_argv, EngineConfig(model="m", kv_cache_dtype="fp8"), "mlc: kv_cache_dtype"),
    (mlc.launch_argv, EngineConfig(model="m", dtype="float16"), "mlc: dtype"),
    (triton.launch_argv, EngineConfig(model="/repo", tensor_parallel=2, env={"TRITON_TOKENIZER": "t"}),
     'triton: tensor_parallel=2 is set in the model repository, not on the command line; put "tensor_parallel_size"'),
    (triton.launch_argv, EngineConfig(model="/repo", max_context=4096, env={"TRITON_TOKENIZER": "t"}),
     '"max_model_len": 4096'),
    (triton.launch_argv, EngineConfig(model="/repo"), "triton: the OpenAI frontend needs a tokenizer"),
    (triton_trtllm.launch_argv, EngineConfig(model="/repo", max_context=4096, env={"TRITON_TOKENIZER": "t"}),
     "triton-trtllm: max_context=4096 is set in the model repository"),
    (rayserve.launch_argv, EngineConfig(model="m", extra_args=("--x",)), "rayserve: extra_args"),
    (mii.launch_argv, EngineConfig(model="m", prefix_caching=True), "mii: prefix_caching=True is not supported"),
    (mii.launch_argv, EngineConfig(model="m", quantization="awq"), "mii: quantization=awq"),
    (mii.container_argv, EngineConfig(model="m"), "mii: DeepSpeed-MII publishes no official container image"),
    (mlc.container_argv, EngineConfig(model="m"), "mlc: MLC-LLM publishes no official server image"),
]  # fmt: skip


@pytest.mark.parametrize(("fn", "cfg", "message"), REFUSALS)
def test_unsupported_settings_are_refused_in_one_line(fn: object, cfg: EngineConfig, message: str) -> None:
    with pytest.raises(ConfigError) as info:
        fn(cfg)  # type: ignore[operator]
    text = str(info.value)
    assert message in text and "\n" not in text


# ---------------------------------------------------------------- containers


def test_containers_publish_the_port_and_mount_a_local_model(tmp_path: Path) -> None:
    model = tmp_path / "weights"
    model.mkdir()
    cfg = EngineConfig(model=str(model), port=9001, env={"HF_HUB_OFFLINE": "1"})
    sg = sglang.container_argv(cfg)
    assert sg[:2] == ["docker", "run"] and "--gpus" in sg and sg[sg.index("--gpus") + 1] == "all"
    assert sg[sg.index("-p") + 1] == "127.0.0.1:9001:9001" and f"{model}:/model:ro" in sg
    assert "HF_HUB_OFFLINE=1" in sg
    image_at = sg.index(sglang.IMAGE)
    assert sg[image_at + 1 : image_at + 4] == ["python3", "-m", "sglang.launch_server"]
    assert pairs(sg[image_at:])["--model-path"] == "/model" and pairs(sg[image_at:])["--host"] == "0.0.0.0"

    t = tgi.container_argv(cfg, runtime="podman")
    assert t[0] == "podman" and t[t.index("-p") + 1] == "127.0.0.1:9001:80" and f"{model}:/data:ro" in t
    assert pairs(t[t.index(tgi.IMAGE) :]) | {} == {
        "--model-id": "/data",
        "--hostname": "0.0.0.0",
        "--port": "80",
        "--num-shard": "1",
    }

    lm = lmdeploy.container_argv(
        EngineConfig(model="internlm/internlm2_5-7b-chat", env={"LMDEPLOY_BACKEND": "pytorch"})
    )
    assert "LMDEPLOY_BACKEND=pytorch" not in lm and lm[lm.index(lmdeploy.IMAGE) + 1 :][:4] == [
        "lmdeploy", "serve", "api_server", "internlm/internlm2_5-7b-chat"]  # fmt: skip
    assert pairs(lm)["--backend"] == "pytorch"

    config = _yaml(tmp_path, METRICS_YAML)
    tr = trtllm.container_argv(EngineConfig(model=str(model), port=9001, extra_args=("--config", config)))
    assert "memlock=-1" in tr and "stack=67108864" in tr and tr[tr.index(trtllm.IMAGE) + 1] == "trtllm-serve"
    # the YAML is read on the host and mounted read-only; the flag names it where the container sees it
    assert f"{tmp_path}:/enginebench/trtllm-config:ro" in tr
    assert pairs(tr[tr.index(trtllm.IMAGE) :])["--config"] == "/enginebench/trtllm-config/extra.yml"

    ol = ollama.container_argv(EngineConfig(model="llama3", port=9001, max_num_seqs=4))
    assert ol[-1] == ollama.IMAGE and "OLLAMA_HOST=0.0.0.0:11434" in ol and "OLLAMA_NUM_PARALLEL=4" in ol
    assert ol[ol.index("-p") + 1] == "127.0.0.1:9001:11434"

    tri = triton.container_argv(EngineConfig(model=str(model), port=9001, env={"TRITON_TOKENIZER": "t"}))
    assert f"{model}:/models:ro" in tri and "TRITON_TOKENIZER=t" not in tri
    assert pairs(tri[tri.index(triton.IMAGE) :])["--model-repository"] == "/models"

    ray = rayserve.container_argv(EngineConfig(model=str(model), port=9001))
    assert orjson.loads(ray[-1])["llm_config"]["model_loading_config"]["model_source"] == "/model"


# ---------------------------------------------------------------- request building


def spec(pin: bool = True, api: str = "chat") -> RequestSpec:
    if api == "chat":
        return RequestSpec("r1", "chat", 32, messages=({"role": "user", "content": "hi"},), pin_output=pin)
    return RequestSpec("r1", "completions", 32, prompt="Once", pin_output=pin)


@pytest.mark.parametrize(
    ("adapter", "pin_fields"),
    [
        (sglang.ADAPTER, {"ignore_eos": True}),
        (lmdeploy.ADAPTER, {"ignore_eos": True}),
        (trtllm.ADAPTER, {"ignore_eos": True, "min_tokens": 32}),
        (triton.ADAPTER, {"ignore_eos": True}),
        (rayserve.ADAPTER, {"ignore_eos": True}),
        (mlc.ADAPTER, {"debug_config": {"ignore_eos": True}}),
        (mii.ADAPTER, {"min_tokens": 32 + mii.prompt_token_bound(spec())}),
        (triton_trtllm.ADAPTER, {}),
        (tgi.ADAPTER, {}),
        (ollama.ADAPTER, {}),
    ],
)
def test_pinning_fields_follow_what_each_engine_honours(
    adapter: Adapter, pin_fields: dict[str, object]
) -> None:
    pinned = adapter.build(spec(), "m", True).body or {}
    free = adapter.build(spec(pin=False), "m", True).body or {}
    assert {k: pinned[k] for k in pin_fields} == pin_fields
    assert not set(pin_fields) & set(free)
    assert pinned["stream_options"] == {"include_usage": True} and pinned["max_tokens"] == 32
    honours = adapter.info.honours_ignore_eos or adapter.info.honours_min_tokens
    assert honours == bool(pin_fields)


def test_tgi_native_generate_stream_request() -> None:
    call = tgi.build_native(spec(api="completions"), "m", True)
    assert (call.method, call.path, call.stream) == ("POST", "/generate_stream", True)
    assert call.body == {
        "inputs": "Once",
        "parameters": {"max_new_tokens": 32, "do_sample": False, "details": True},
    }
    assert tgi.build_native(spec(), "m", False).path == "/generate"


def test_tokenizer_calls_and_versions() -> None:
    assert sglang.tokenize_call("ab", "m").body == {"model": "m", "prompt": "ab", "add_special_tokens": False}
    assert lmdeploy.tokenize_call("ab", "m", True).body == {
        "input": "ab",
        "do_preprocess": False,
        "add_bos": True,
    }
    assert lmdeploy.tokens_from({"input_ids": [1, 2], "length": 2}) == [1, 2]
    assert tgi.tokens_from([{"id": 7, "text": "a", "start": 0, "stop": 1}]) == [7]
    with pytest.raises(EngineError, match="no tokenize endpoint"):
        ollama.tokenize_call("ab", "m")
    # /info (TGI openapi Info.version), /api/version (Ollama), /version (trtllm-serve), /server_info (SGLang)
    assert tgi.version_from({"model_id": "x", "version": "3.3.5"}) == "3.3.5"
    assert ollama.version_from({"version": "0.12.3"}) == "0.12.3"
    assert trtllm.version_from({"version": "1.2.0"}) == "1.2.0"
    assert sglang.version_from({"version": "0.5.4"}) == "0.5.4" and lmdeploy.version_from({}) is None


# ---------------------------------------------------------------- real recorded streams


def test_tgi_messages_stream_recorded() -> None:
    """TGI integration-test snapshot test_flash_llama_completion_stream_usage (max_tokens=10, include_usage)."""
    raw = (FIXTURES / "streams/tgi/chat_stream_usage.sse").read_bytes()
    deltas = parse_all(tgi.ADAPTER.parse_event, raw)
    content = [d for d in deltas if d.tokens]
    assert len(deltas) == 11 and len(content) == 10
    assert "".join(d.text for d in deltas).startswith("**Deep Learning:")
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["length"]
    usage = deltas[-1].usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (40, 10)
    # one token per event: the per-chunk count agrees exactly with the server's usage
    assert sum(d.tokens for d in deltas) == usage.completion_tokens


def test_tgi_generate_stream_recorded_event() -> None:
    """The `/generate_stream` event quoted in TGI's docs (basic_tutorials/visual_language_models.md)."""
    raw = (FIXTURES / "streams/tgi/generate_stream_last_event.sse").read_bytes()
    (delta,) = parse_all(tgi.parse_native_event, raw)
    assert (delta.text, delta.tokens, delta.tokens_exact, delta.finish_reason, delta.usage) == (
        ".", 1, True, None, None,
    )  # fmt: skip
    last = b'{"index":3,"token":{"id":2,"text":"</s>","logprob":-0.1,"special":true},"generated_text":"a b",'
    last += b'"details":{"finish_reason":"eos_token","generated_tokens":3,"input_length":5}}'
    d = tgi.parse_native_event(last)
    assert d is not None and d.text == "" and d.tokens == 1 and d.finish_reason == "eos_token"
    assert d.usage is not None and (d.usage.prompt_tokens, d.usage.completion_tokens) == (5, 3)


def test_ollama_stream_recorded() -> None:
    """Five chunks of an Ollama (qwen2.5-coder:32b) /v1/chat/completions stream, single-LF separated."""
    raw = (FIXTURES / "streams/ollama/chat_stream_head.sse").read_bytes()
    deltas = [ollama.ADAPTER.parse_event(line[len(b"data: ") :]) for line in raw.splitlines() if line]
    assert [d.text for d in deltas if d] == ["H", "ig", "ress", " 是", "一个"]
    assert all(d is not None and d.tokens == 1 and not d.tokens_exact for d in deltas)


def test_sglang_stream_recorded() -> None:
    """SGLang chunks: sglang#3743 (finish_reason "" mid-stream) and a Qwen3 stream ending in stop + [DONE]."""
    (old,) = parse_all(
        sglang.ADAPTER.parse_event, (FIXTURES / "streams/sglang/chat_chunk_issue3743.sse").read_bytes()
    )
    assert (old.text, old.tokens, old.finish_reason) == ("。", 1, None)  # "" is not a finish reason
    raw = (FIXTURES / "streams/sglang/chat_stream_end.sse").read_bytes()
    assert payloads(raw, 1)[-1] == b"[DONE]"
    deltas = parse_all(sglang.ADAPTER.parse_event, raw)
    assert [(d.text, d.tokens, d.finish_reason) for d in deltas] == [("abc", 1, None), ("", 0, "stop")]


def test_trtllm_documented_nonstreamed_response() -> None:
    """trtllm-serve's example response in TensorRT-LLM's Kimi-K2-Thinking deployment guide (max_tokens=128)."""
    body = (FIXTURES / "streams/trtllm/chat_nostream_kimi_k2_guide.json").read_bytes()
    d = trtllm.ADAPTER.parse_response(body)
    # the thinking text arrives in `content` (reasoning_content is ""), and it still counts as output
    assert d.text.startswith("<think> The user is asking") and d.text.endswith("Pennsylvania, Connecticut")
    assert (d.finish_reason, d.tokens, d.tokens_exact, d.error) == ("length", 128, True, None)
    assert d.usage is not None
    assert (d.usage.prompt_tokens, d.usage.completion_tokens, d.usage.cached_tokens) == (12, 128, 0)


@pytest.mark.parametrize(
    ("name", "text", "object_kind"),
    [
        ("chat_nostream_readme_vllm.json", "This is only a test.", "chat"),
        ("completions_nostream_readme_vllm.json", " a field of computer science that focuses on developing "
         "algorithms that allow computers to learn from", "completions"),
        ("chat_nostream_readme_trtllm.json", "It looks like you're testing the system!", "chat"),
    ],
)  # fmt: skip
def test_triton_2024_responses_without_usage_count_no_tokens(name: str, text: str, object_kind: str) -> None:
    """Example outputs of Triton's python/openai/README.md as recorded in 2024 (frontend before usage support,
    triton-inference-server/server#8264, 2025-07): `"usage": null`, so the count of output tokens is unknown, flagged
    as not stated by the engine, never 0 tokens stated."""
    body = (FIXTURES / "streams/triton" / name).read_bytes()
    assert (
        orjson.loads(body)["object"]
        == {"chat": "chat.completion", "completions": "text_completion"}[object_kind]
    )
    d = triton.ADAPTER.parse_response(body)
    assert (d.text, d.finish_reason, d.usage, d.error) == (text, "stop", None, None)
    assert d.tokens == 0 and not d.tokens_exact


@pytest.mark.parametrize(
    ("name", "text", "usage"),
    [
        ("chat_nostream_readme_vllm_usage.json", "This is only a test.", (42, 7)),
        ("completions_nostream_readme_vllm_usage.json", " an amazing field that can truly understand the hidden "
         "patterns that exist in the data,", (4, 16)),
    ],
)  # fmt: skip
def test_triton_current_responses_carry_usage(name: str, text: str, usage: tuple[int, int]) -> None:
    """The same README at commit e1db8a60 (2026-08-19): the vLLM backend's responses now report usage
    (engine/utils/triton.py `_get_usage_from_response`), and the output count is the engine's own."""
    d = triton.ADAPTER.parse_response((FIXTURES / "streams/triton" / name).read_bytes())
    assert d.text == text and d.usage is not None
    assert (d.usage.prompt_tokens, d.usage.completion_tokens) == usage
    assert d.tokens == usage[1] and d.tokens_exact


# ---------------------------------------------------------------- real metric dumps


def test_sglang_metrics_from_the_documented_dump() -> None:
    got = scrape((FIXTURES / "metrics/sglang.txt").read_text(), sglang.METRICS)
    assert got == {
        "prompt_tokens_total": 8128902.0,
        "generation_tokens_total": 7557572.0,
        "kv_cache_usage": 0.28,
    }


def test_trtllm_metrics_from_the_documented_dump() -> None:
    got = scrape((FIXTURES / "metrics/trtllm.txt").read_text(), trtllm.METRICS)
    assert got["requests_finished_total"] == 155.0  # stop 150 + length 5, summed over finished_reason
    ttft = got["ttft_seconds"]
    assert isinstance(ttft, Histogram) and (ttft.count, ttft.sum) == (150.0, 8.75)
    assert ttft.buckets == ((0.01, 0.0), (0.05, 12.0))
    # trtllm_time_per_output_token_seconds (one per-request mean per request) is not an ITL histogram
    assert set(got) == {"requests_finished_total", "ttft_seconds", "e2e_seconds", "queue_seconds"}


def test_triton_metrics_from_the_documented_dump() -> None:
    got = scrape((FIXTURES / "metrics/triton.txt").read_text(), triton.METRICS)
    assert got == {"requests_finished_total": 161.0}


def test_metric_maps_only_name_canonical_metrics() -> None:
    from adapters.base import CANONICAL_METRICS

    for name in GPU_ENGINES:
        adapter = registry.get(name)
        assert set(adapter.metrics.names.values()) <= set(CANONICAL_METRICS), name
        elsewhere = name in ("rayserve", "triton")  # metrics on a port of their own (ScrapesElsewhere)
        assert bool(adapter.metrics.names) == (adapter.info.metrics_path is not None or elsewhere), name


# ---------------------------------------------------------------- knowledge


def test_knowledge_document_reads_as_matrix_knowledge() -> None:
    from matrix.knowledge import parse_knowledge

    doc = knowledge_document()
    assert doc["schema_version"] == 1
    knowledge = parse_knowledge(doc, origin="adapters.knowledge")
    assert set(knowledge.engines) == {*GPU_ENGINES, "vllm", "llamacpp"}  # every engine's facts, one record
    tgi_facts = knowledge.lookup("text-generation-inference")
    assert tgi_facts is not None and tgi_facts.status == "maintenance"
    for name, entry in doc["engines"].items():
        assert entry["facts"], name
        for fact in entry["facts"]:
            assert fact["source"] and fact["date"] in ("2026-11-24", "2026-12-07"), (name, fact)
    for name in GPU_ENGINES:  # EngineInfo carries the same maintenance line and sources
        info = registry.get(name).info
        assert (
            info.maintenance == ENGINE_FACTS[name].maintenance and info.sources == ENGINE_FACTS[name].sources
        )


# ---------------------------------------------------------------- issue 20: defects found against the engines' source

FAKE_OLLAMA = """
import json, sys
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, calls = int(sys.argv[1]), sys.argv[2]
models = ["other:latest"]  # another model already pulled: it is listed first


class H(BaseHTTPRequestHandler):
    def log_message(self, *a):
        pass

    def answer(self, obj, status=200):
        body = json.dumps(obj).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        if self.path == "/":
            return self.answer("Ollama is running")
        if self.path == "/v1/models":
            return self.answer({"object": "list", "data": [{"id": m, "object": "model"} for m in models]})
        self.answer({"error": "not found"}, 404)

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with open(calls, "a") as f:
            f.write(json.dumps([self.path, req]) + "\\n")
        if self.path == "/api/pull":
            if req["model"] == "missing:latest":
                return self.answer({"error": "pull model manifest: file does not exist"}, 500)
            models.append(req["model"])
            return self.answer({"status": "success"})
        if self.path == "/api/generate" and req["model"] in models and "prompt" not in req:
            return self.answer({"model": req["model"], "done": True, "done_reason": "load"})
        self.answer({"error": "model not found"}, 404)


ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""


def _fake_ollama(tmp_path: Path) -> tuple[Adapter, Path]:
    from dataclasses import replace

    script, calls = tmp_path / "fake_ollama.py", tmp_path / "calls.jsonl"
    script.write_text(FAKE_OLLAMA)

    def argv(cfg: EngineConfig) -> list[str]:
        return [sys.executable, str(script), str(cfg.port), str(calls)]

    return replace(ollama.ADAPTER, launch_argv=argv, launch_env=lambda cfg: {}), calls


async def test_ollama_pulls_and_loads_the_configured_model_before_the_run(tmp_path: Path) -> None:
    """`ollama serve` starts empty: the configured model is pulled and loaded before anything is measured, and the
    requests name it even though /v1/models lists another model first."""
    from adapters.process import launched

    adapter, calls = _fake_ollama(tmp_path)
    cfg = EngineConfig(model="llama3.2:1b", port=0)
    async with launched(adapter, cfg, tmp_path / "ollama.log", ready_timeout=30) as ep:
        assert ep.model == "llama3.2:1b"
        sent = [orjson.loads(line) for line in calls.read_text().splitlines()]
    assert sent == [
        ["/api/pull", {"model": "llama3.2:1b", "stream": False}],
        ["/api/generate", {"model": "llama3.2:1b", "keep_alive": -1}],
    ]
    # a tag without ":" is what Ollama lists as "<name>:latest"
    assert ollama.served_model(EngineConfig(model="llama3")) == "llama3:latest"


async def test_ollama_pull_failure_stops_the_launch_with_the_engine_answer(tmp_path: Path) -> None:
    from adapters.process import launched

    adapter, _ = _fake_ollama(tmp_path)
    with pytest.raises(
        EngineError, match=r"POST /api/pull before the run gave HTTP 500: .*file does not exist"
    ):
        async with launched(
            adapter, EngineConfig(model="missing", port=0), tmp_path / "o.log", ready_timeout=30
        ):
            pass


def test_a_launched_engine_serves_the_configured_model_not_the_first_listed() -> None:
    from adapters.process import pick_model

    assert pick_model(["a", "b"], "b", "triton") == "b"
    assert pick_model(["only"], None, "triton") == "only"
    with pytest.raises(EngineError, match=r"triton serves several models \(a, b\) and none is configured"):
        pick_model(["a", "b"], None, "triton")
    with pytest.raises(EngineError, match=r"does not serve the configured model 'c'; /v1/models lists a, b"):
        pick_model(["a", "b"], "c", "triton")


def test_mii_sends_no_temperature_and_a_min_tokens_above_prompt_plus_output() -> None:
    """MII rejects temperature 0 (GenerateParamsConfig.temperature gt=0) and compares min_new_tokens with prompt +
    output tokens (Request.is_done): min_tokens must exceed the prompt's tokens plus max_tokens."""
    long_prompt = "word " * 400  # 2,000 bytes: far more tokens than max_tokens
    body = mii.build(RequestSpec("r", "completions", 32, prompt=long_prompt), "m", True).body or {}
    assert "temperature" not in body
    assert body["min_tokens"] >= 32 + len(long_prompt.encode()) and body["max_tokens"] == 32
    assert "min_tokens" not in (mii.build(RequestSpec("r", "completions", 32, prompt="x", pin_output=False), "m",
                                          True).body or {})  # fmt: skip


def test_rayserve_metrics_are_the_sanitized_ray_names() -> None:
    """Ray's exporter turns `vllm:x` into `ray_vllm_x`; no `:` spelling can appear."""
    assert rayserve.METRICS.names and all(n.startswith("ray_vllm_") for n in rayserve.METRICS.names)
    assert rayserve.INFO.tokens_per_chunk == "variable"  # an attached app batches chunks for 50 ms by default


def test_triton_metric_map_names_only_what_its_backends_export() -> None:
    """The vLLM backend exports no running / waiting / KV gauges (vllm_backend src/utils/metrics.py); the TRT-LLM
    flavour maps Triton's core counters only, and is launched with --backend tensorrtllm."""
    assert "requests_running" not in triton.METRICS.names.values()
    assert "kv_cache_usage" not in triton.METRICS.names.values()
    assert set(triton_trtllm.METRICS.names) == {
        "nv_inference_pending_request_count",
        "nv_inference_request_success",
    }
    argv = triton_trtllm.launch_argv(EngineConfig(model="/repo", env={"TRITON_TOKENIZER": "t"}))
    assert pairs(argv)["--backend"] == "tensorrtllm"
    assert not triton_trtllm.INFO.honours_ignore_eos and not triton_trtllm.INFO.honours_min_tokens


def test_sglang_reads_its_version_from_server_info() -> None:
    assert sglang.INFO.version_path == "/server_info"  # /get_server_info is a deprecated alias


def test_lmdeploy_chunks_can_carry_several_tokens() -> None:
    assert (
        lmdeploy.INFO.tokens_per_chunk == "variable"
    )  # every token since the last read (async_engine.generate)
