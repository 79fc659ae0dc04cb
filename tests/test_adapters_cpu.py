"""The vLLM and llama.cpp adapters without running them: argv for every EngineConfig setting, refusals, request
bodies, tokenizer calls, the registry, `bench engines`, and the codecs and metric maps against real recorded streams
and /metrics dumps (tests/fixtures/streams/, tests/fixtures/metrics/; see their README for how they were captured)."""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import orjson
import pytest

from adapters import llamacpp, registry, vllm
from adapters.base import Adapter, EngineConfig, StreamDelta, Tokenizes, Usage
from adapters.prometheus import Histogram, delta, scrape
from harness.errors import ConfigError, EngineUnavailable
from harness.sse import SSEParser
from workloads.spec import RequestSpec

FIXTURES = Path(__file__).parent / "fixtures"
HF = "/models/SmolLM2-135M-Instruct-hf"
GGUF = "/models/SmolLM2-135M-Instruct.Q4_1.gguf"


def flags(argv: list[str]) -> list[str]:
    """argv without the binary (its path depends on the install location)."""
    return argv[1:]


# -- vLLM argv ---------------------------------------------------------------------------------------------------
def test_vllm_minimal_argv_and_cpu_env() -> None:
    cfg = EngineConfig(model=HF, port=8123)
    argv = vllm.launch_argv(cfg)
    assert Path(argv[0]).name == "vllm"
    assert flags(argv) == [
        "serve", HF, "--served-model-name", "SmolLM2-135M-Instruct-hf", "--host", "127.0.0.1", "--port", "8123",
        "--enforce-eager", "--enable-prompt-tokens-details",
    ]  # fmt: skip
    assert vllm.launch_env(cfg) == {
        "HF_HUB_OFFLINE": "1",
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_HOST_IP": "127.0.0.1",
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "VLLM_SERVER_DEV_MODE": "1",  # registers POST /reset_prefix_cache (issue 21)
    }


def test_vllm_every_setting() -> None:
    cfg = EngineConfig(
        model=HF,
        served_model_name="smol",
        dtype="bfloat16",
        quantization="fp8",
        max_context=4096,
        max_num_seqs=8,
        prefix_caching=False,
        tensor_parallel=2,
        kv_cache_dtype="fp8",
        threads=2,
        host="0.0.0.0",
        port=9000,
        extra_args=("--seed", "1"),
        env={"VLLM_CPU_KVCACHE_SPACE": "4"},
    )
    assert flags(vllm.launch_argv(cfg)) == [
        "serve", HF, "--served-model-name", "smol", "--host", "0.0.0.0", "--port", "9000", "--dtype", "bfloat16",
        "--quantization", "fp8", "--max-model-len", "4096", "--max-num-seqs", "8", "--no-enable-prefix-caching",
        "--tensor-parallel-size", "2", "--kv-cache-dtype", "fp8", "--enforce-eager", "--enable-prompt-tokens-details",
        "--seed", "1",
    ]  # fmt: skip
    env = vllm.launch_env(cfg)
    assert env["VLLM_CPU_KVCACHE_SPACE"] == "4"  # the config's env wins over the defaults
    assert env["VLLM_CPU_OMP_THREADS_BIND"] == "0-1"
    assert "--enable-prefix-caching" in vllm.launch_argv(replace(cfg, prefix_caching=True))


def test_vllm_enforce_eager_can_be_turned_off_and_gpu_device_differs() -> None:
    argv = vllm.launch_argv(EngineConfig(model=HF, extra_args=("--no-enforce-eager",)))
    assert "--enforce-eager" not in argv and argv[-1] == "--no-enforce-eager"
    gpu = EngineConfig(model=HF, gpu_memory_fraction=0.85, env={"VLLM_TARGET_DEVICE": "cuda"})
    argv = vllm.launch_argv(gpu)
    assert argv[-3:-1] == ["--gpu-memory-utilization", "0.85"] and "--enforce-eager" not in argv
    assert "VLLM_CPU_KVCACHE_SPACE" not in vllm.launch_env(gpu)


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (EngineConfig(model=GGUF), "vLLM cannot serve a GGUF file on CPU"),
        (EngineConfig(model=HF, gpu_memory_fraction=0.9), "gpu_memory_fraction does nothing on vLLM CPU"),
        (EngineConfig(model=HF, tensor_parallel=0), "tensor_parallel must be >= 1"),
    ],
)
def test_vllm_refuses(cfg: EngineConfig, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        vllm.launch_argv(cfg)


def test_vllm_container_argv(tmp_path: Path) -> None:
    model = tmp_path / "smol-hf"
    model.mkdir()
    argv = vllm.container_argv(EngineConfig(model=str(model), max_context=4096, port=8100))
    assert argv[:6] == ["docker", "run", "--rm", "--name", "enginebench-vllm-8100", "-p"]
    assert argv[6] == "127.0.0.1:8100:8100"
    assert f"{model}:/model:ro" in argv and "--shm-size=4g" in argv
    assert "VLLM_HOST_IP=127.0.0.1" not in argv and "VLLM_CPU_KVCACHE_SPACE=2" in argv
    image = argv.index(vllm.CPU_IMAGE)
    assert argv[image + 1 :][:7] == [
        "--model",
        "/model",
        "--served-model-name",
        "smol-hf",
        "--host",
        "0.0.0.0",
        "--port",
    ]
    gpu = vllm.container_argv(
        EngineConfig(model="Qwen/Qwen3-0.6B", env={"VLLM_TARGET_DEVICE": "cuda"}), "podman"
    )
    assert gpu[0] == "podman" and "--gpus" in gpu and "--ipc=host" in gpu and vllm.GPU_IMAGE in gpu
    assert gpu[gpu.index(vllm.GPU_IMAGE) + 2] == "Qwen/Qwen3-0.6B"


# -- llama.cpp argv ----------------------------------------------------------------------------------------------
def test_llamacpp_argv_context_is_per_slot_times_slots() -> None:
    cfg = EngineConfig(
        model=GGUF, served_model_name="smol", max_context=4096, max_num_seqs=8, threads=2, port=8200
    )
    argv = llamacpp.launch_argv(cfg)
    assert Path(argv[0]).name == "llama-server"
    assert flags(argv) == [
        "-m", GGUF, "--host", "127.0.0.1", "--port", "8200", "--alias", "smol", "-t", "2", "-c", "32768",
        "-np", "8", "--metrics", "--no-ui",
    ]  # fmt: skip
    one_slot = flags(llamacpp.launch_argv(EngineConfig(model=GGUF, max_context=2048)))
    assert one_slot[one_slot.index("-c") + 1] == "2048" and one_slot[one_slot.index("-np") + 1] == "1"
    default = flags(llamacpp.launch_argv(EngineConfig(model=GGUF)))
    assert "-c" not in default and "-np" not in default  # the engine's own defaults
    assert llamacpp.launch_env(EngineConfig(model=GGUF, env={"A": "1"})) == {"A": "1"}


def test_llamacpp_kv_dtype_prefix_cache_and_extra() -> None:
    cfg = EngineConfig(model=GGUF, kv_cache_dtype="q8_0", prefix_caching=False, extra_args=("-fa", "on"))
    argv = flags(llamacpp.launch_argv(cfg))
    assert argv[argv.index("-ctk") : argv.index("-ctk") + 4] == ["-ctk", "q8_0", "-ctv", "q8_0"]
    assert "--no-cache-prompt" in argv and argv[-2:] == ["-fa", "on"]
    assert "--cache-prompt" in llamacpp.launch_argv(replace(cfg, prefix_caching=True))
    assert "--cache-prompt" not in llamacpp.launch_argv(replace(cfg, prefix_caching=None))
    assert "-ctk" in llamacpp.launch_argv(replace(cfg, quantization="q4_1"))  # matches the file name


@pytest.mark.parametrize(
    ("cfg", "message"),
    [
        (EngineConfig(model=HF), "llama.cpp serves GGUF files"),
        (EngineConfig(model=GGUF, tensor_parallel=2), "no tensor parallelism on CPU"),
        (EngineConfig(model=GGUF, dtype="float16"), "runs the GGUF's own precision"),
        (EngineConfig(model=GGUF, quantization="Q8_0"), "does not match the GGUF"),
        (EngineConfig(model=GGUF, gpu_memory_fraction=0.5), "no gpu_memory_fraction"),
        # common/arg.cpp kv_cache_types (build 11434): "fp8" is no ggml type name, llama-server would exit at start
        (
            EngineConfig(model=GGUF, kv_cache_dtype="fp8"),
            r"kv_cache_dtype=fp8 is not a cache type -ctk/-ctv take",
        ),
    ],
)
def test_llamacpp_refuses(cfg: EngineConfig, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        llamacpp.launch_argv(cfg)


def test_llamacpp_container_argv() -> None:
    argv = llamacpp.container_argv(EngineConfig(model=GGUF, max_context=4096, max_num_seqs=2, port=8300))
    assert argv[:7] == [
        "docker",
        "run",
        "--rm",
        "--name",
        "enginebench-llamacpp-8300",
        "-p",
        "127.0.0.1:8300:8300",
    ]
    assert "/models:/models:ro" in argv and "--gpus" not in argv
    i = argv.index(llamacpp.CPU_IMAGE)
    assert argv[i + 1 : i + 7] == [
        "-m",
        "/models/SmolLM2-135M-Instruct.Q4_1.gguf",
        "--host",
        "0.0.0.0",
        "--port",
        "8300",
    ]
    gpu = llamacpp.container_argv(EngineConfig(model=GGUF, extra_args=("-ngl", "99")))
    assert llamacpp.CUDA_IMAGE in gpu and "--gpus" in gpu


# -- requests, tokenizer, versions -------------------------------------------------------------------------------
CHAT = RequestSpec("r1", "chat", 16, messages=({"role": "user", "content": "Hi"},))


@pytest.mark.parametrize("adapter", [vllm.ADAPTER, llamacpp.ADAPTER], ids=["vllm", "llamacpp"])
def test_build_pins_output_only_when_asked(adapter: Adapter) -> None:
    call = adapter.build(CHAT, "smol", True)
    assert call.path == "/v1/chat/completions" and call.stream
    assert call.body is not None and call.body["ignore_eos"] is True
    assert call.body["stream_options"] == {"include_usage": True}
    loose = adapter.build(replace(CHAT, pin_output=False), "smol", False)
    assert loose.body is not None and "ignore_eos" not in loose.body and "stream_options" not in loose.body
    assert isinstance(adapter, Adapter) and isinstance(adapter, Tokenizes)


def test_tokenizer_calls_and_versions() -> None:
    v = vllm.tokenize_call("Hello world", "smol")
    assert (v.method, v.path, v.body) == (
        "POST",
        "/tokenize",
        {"model": "smol", "prompt": "Hello world", "add_special_tokens": False},
    )
    assert vllm.tokens_from({"count": 2, "max_model_len": 4096, "tokens": [19556, 905]}) == [19556, 905]
    ll = llamacpp.tokenize_call("Hello world", "smol", add_special=True)
    assert ll.body == {"content": "Hello world", "add_special": True}
    assert llamacpp.tokens_from({"tokens": [19556, {"id": 905, "piece": " world"}]}) == [19556, 905]
    assert vllm.version_from({"version": "0.32.0+cpu"}) == "0.32.0+cpu"
    assert llamacpp.version_from({"build_info": "b11434-abc"}) == "b11434-abc"
    assert llamacpp.version_from({}) is None


# -- registry and `bench engines` ---------------------------------------------------------------------------------
def test_registry_discovers_and_refuses_unknown() -> None:
    found = registry.adapters()
    assert found["vllm"] is vllm.ADAPTER and found["llamacpp"] is llamacpp.ADAPTER
    with pytest.raises(ConfigError, match=r"unknown engine 'nope'; known engines: .*llamacpp"):
        registry.get("nope")


@pytest.mark.skipif("nvidia" in registry.hardware_here(), reason="this machine has an NVIDIA GPU")
def test_gpu_only_engine_is_unavailable_with_a_way_out() -> None:
    tgi = replace(vllm.ADAPTER, info=replace(vllm.INFO, name="tgi", display_name="TGI", hardware=("nvidia",)))
    avail = registry.availability(tgi)
    assert not avail.runnable and not avail.hardware_ok
    assert avail.reason == (
        "tgi needs an NVIDIA GPU; none here. To benchmark a remote TGI: --endpoint tgi=http://HOST:PORT"
    )


def test_uninstalled_engine_is_unavailable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENGINEBENCH_CACHE", str(tmp_path))
    with pytest.raises(EngineUnavailable, match="run `bench engines install vllm`"):
        registry.require_runnable("vllm")


def test_default_configs() -> None:
    v, ll = registry.default_config("vllm"), registry.default_config("llamacpp")
    assert v.model.endswith("SmolLM2-135M-Instruct-hf") and ll.model.endswith(
        "SmolLM2-135M-Instruct.Q4_1.gguf"
    )
    for cfg in (v, ll):
        assert (cfg.max_context, cfg.max_num_seqs, cfg.port, cfg.served_model_name) == (
            4096, 8, 0, "SmolLM2-135M-Instruct",
        )  # fmt: skip
    assert "-c" in llamacpp.launch_argv(replace(ll, port=1)) and "--max-model-len" in vllm.launch_argv(v)


def test_bench_engines_lists_every_adapter(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from harness.cli import _register
    from harness.cli._app import app
    from harness.cli.engines import engines_table

    monkeypatch.setenv("ENGINEBENCH_CACHE", str(tmp_path))
    registry.record_live_test("llamacpp", True, "b11434-test", "3 requests")
    rows = {r["engine"]: r for r in engines_table()}
    assert rows["llamacpp"]["live_tested"]["version"] == "b11434-test" and rows["vllm"]["live_tested"] is None
    assert not rows["vllm"]["installed"] and "bench engines install vllm" in rows["vllm"]["reason"]
    _register()
    result = CliRunner().invoke(app, ["engines"], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    assert "vllm" in result.output and "llamacpp" in result.output and "passed" in result.output
    # what each adapter was checked against (issue 20): the pinned package, or the source and commit
    assert rows["sglang"]["checked_against"].startswith("sglang 0.5.23 (PyPI)")
    assert "commit db931fcf" in rows["tgi"]["checked_against"]
    assert all(r["checked_against"] != "nothing yet" for r in rows.values() if r["engine"] != "scripted")
    assert "checked against" in result.output


# -- Prometheus --------------------------------------------------------------------------------------------------
SYNTHETIC = """\
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="m"} 2.0
vllm:num_requests_running{engine="1",model_name="m"} 3.0
# TYPE vllm:kv_cache_usage_perc gauge
vllm:kv_cache_usage_perc{engine="0",model_name="m"} 0.2
vllm:kv_cache_usage_perc{engine="1",model_name="m"} 0.4
# TYPE vllm:request_success_total counter
vllm:request_success_total{finished_reason="stop",model_name="m"} 7.0
vllm:request_success_total{finished_reason="length",model_name="m"} 5.0
vllm:request_success_created{finished_reason="stop",model_name="m"} 1.7e9
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{le="0.1",model_name="m"} 2.0
vllm:time_to_first_token_seconds_bucket{le="0.5",model_name="m"} 6.0
vllm:time_to_first_token_seconds_bucket{le="+Inf",model_name="m"} 10.0
vllm:time_to_first_token_seconds_sum{model_name="m"} 3.0
vllm:time_to_first_token_seconds_count{model_name="m"} 10.0
"""


def test_scrape_sums_label_sets_and_keeps_histograms() -> None:
    got = scrape(SYNTHETIC, vllm.METRICS)
    assert got["requests_running"] == 5.0
    assert got["kv_cache_usage"] == pytest.approx(0.3)  # a fraction: averaged, not summed
    assert got["requests_finished_total"] == 12.0  # `_created` samples are not counts
    ttft = got["ttft_seconds"]
    assert isinstance(ttft, Histogram)
    assert (
        ttft.buckets == ((0.1, 2.0), (0.5, 6.0), (math.inf, 10.0)) and ttft.count == 10 and ttft.mean == 0.3
    )
    assert ttft.quantile(0.4) == pytest.approx(0.3)  # rank 4 of 10: halfway from 0.1 to 0.5
    assert ttft.quantile(0.99) == 0.5  # in the +Inf bucket: the highest finite bound


def test_delta_subtracts_counters_and_histograms() -> None:
    before = scrape(SYNTHETIC, vllm.METRICS)
    after = scrape(
        SYNTHETIC.replace("} 7.0", "} 9.0").replace('le="+Inf",model_name="m"} 10.0', 'le="+Inf",model_name="m"} 12.0')
        .replace("_sum{model_name=\"m\"} 3.0", "_sum{model_name=\"m\"} 5.0")
        .replace("_count{model_name=\"m\"} 10.0", "_count{model_name=\"m\"} 12.0"),
        vllm.METRICS,
    )  # fmt: skip
    d = delta(before, after)
    assert d["requests_finished_total"] == 2.0 and d["requests_running"] == 5.0
    h = d["ttft_seconds"]
    assert isinstance(h, Histogram) and (h.count, h.sum) == (2.0, 2.0) and h.buckets[-1] == (math.inf, 2.0)
    assert delta(after, before)["requests_finished_total"] == 12.0  # a reset counts from zero


# -- real recorded streams and metrics ----------------------------------------------------------------------------
def events(path: Path) -> list[bytes]:
    parser = SSEParser()
    out = parser.feed(path.read_bytes()) + parser.close()
    return [e for e in out if e != b"[DONE]"]


def fold(adapter: Adapter, payloads: list[bytes]) -> tuple[str, int, list[StreamDelta]]:
    deltas = [d for d in map(adapter.parse_event, payloads) if d is not None]
    return "".join(d.text for d in deltas), sum(d.tokens for d in deltas), deltas


def load_expect(name: str) -> dict[str, object]:
    data: dict[str, object] = orjson.loads((FIXTURES / "streams" / "expected.json").read_bytes())[name]
    return data


def test_install_refuses_engines_it_cannot_install() -> None:
    from harness.cli.engines import InstallConfig, run_install

    with pytest.raises(
        ConfigError, match="cannot install tgi here: `bench engines install` knows vllm, llamacpp"
    ):
        run_install(InstallConfig(("vllm", "tgi")))


STREAMS = FIXTURES / "streams"
CPU_ENGINES = {"vllm": vllm.ADAPTER, "llamacpp": llamacpp.ADAPTER}


def recorded(engine: str) -> dict[str, object]:
    expected = orjson.loads((STREAMS / "expected.json").read_bytes())
    if engine not in expected:
        pytest.fail(f"no recording of {engine}: run tests/fixtures/streams/capture.py {engine}")
    facts: dict[str, object] = expected[engine]
    return facts


@pytest.mark.parametrize("engine", list(CPU_ENGINES))
def test_real_chat_stream(engine: str) -> None:
    adapter, facts = CPU_ENGINES[engine], recorded(engine)
    payloads = events(STREAMS / f"{engine}_chat_stream.sse")
    text, tokens, deltas = fold(adapter, payloads)
    nostream = facts["chat_nostream"]
    assert isinstance(nostream, dict)
    # known truth from outside this file: the non-streamed answer (temperature 0) and the engine's tokenizer
    assert text == nostream["text"]
    assert abs(nostream["tokenizer_count"] - 24) <= 1  # re-tokenizing decoded text may merge a pair
    assert tokens == 24  # pinned with ignore_eos: one token per content chunk
    assert deltas[0].tokens == 0 and deltas[0].text == ""  # role chunk (vLLM "" / llama.cpp null)
    usage = [d.usage for d in deltas if d.usage is not None]
    assert len(usage) == 1 and usage[0].completion_tokens == 24
    assert usage[0].prompt_tokens == nostream["usage"]["prompt_tokens"]
    assert usage[0].cached_tokens == 0  # nothing cached on the first request
    assert [d.finish_reason for d in deltas if d.finish_reason] == ["length"]
    whole = adapter.parse_response((STREAMS / f"{engine}_chat_nostream.json").read_bytes())
    assert (whole.text, whole.tokens, whole.tokens_exact) == (text, 24, True)


@pytest.mark.parametrize("engine", list(CPU_ENGINES))
def test_real_completions_and_unpinned_streams(engine: str) -> None:
    adapter = CPU_ENGINES[engine]
    text, tokens, deltas = fold(adapter, events(STREAMS / f"{engine}_completions_stream.sse"))
    last_usage = next(d.usage for d in reversed(deltas) if d.usage)
    assert tokens == 24 == last_usage.completion_tokens and text.strip()
    text, tokens, deltas = fold(adapter, events(STREAMS / f"{engine}_chat_stream_unpinned.sse"))
    last_usage = next(d.usage for d in reversed(deltas) if d.usage)
    finish = [d.finish_reason for d in deltas if d.finish_reason]
    # unpinned, max_tokens 64: the model did not stop early in these recordings (see README)
    assert finish == ["length"] and tokens == last_usage.completion_tokens == 64


@pytest.mark.parametrize("engine", list(CPU_ENGINES))
def test_real_metrics_agree_with_the_recorded_streams(engine: str) -> None:
    """Between the two dumps exactly the four recorded requests ran: the counters must say so."""
    adapter = CPU_ENGINES[engine]
    metrics = FIXTURES / "metrics"
    before = scrape((metrics / f"{engine}_before.prom").read_text(), adapter.metrics)
    after = scrape((metrics / f"{engine}_after.prom").read_text(), adapter.metrics)
    d = delta(before, after)
    usages: list[Usage] = []
    for name in ("chat_stream", "completions_stream", "chat_stream_unpinned"):
        deltas = fold(adapter, events(STREAMS / f"{engine}_{name}.sse"))[2]
        usages += [x.usage for x in deltas if x.usage]
    whole = adapter.parse_response((STREAMS / f"{engine}_chat_nostream.json").read_bytes()).usage
    assert whole is not None and len(usages) == 3
    usages.append(whole)
    completions = [u.completion_tokens or 0 for u in usages]
    assert d["generation_tokens_total"] == sum(completions)
    assert d["prompt_tokens_total"] == sum(u.prompt_tokens or 0 for u in usages)
    assert after["requests_running"] == 0 and after["requests_waiting"] == 0
    if engine == "vllm":
        assert d["requests_finished_total"] == 4
        for name in ("ttft_seconds", "itl_seconds", "e2e_seconds", "queue_seconds"):
            h = d[name]
            assert isinstance(h, Histogram) and h.buckets[-1][0] == math.inf
            assert h.count == (4 if name != "itl_seconds" else sum(c - 1 for c in completions))
        assert 0 <= after["kv_cache_usage"] <= 1  # type: ignore[operator]
