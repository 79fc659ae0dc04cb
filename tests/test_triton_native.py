"""The `triton` engine's codec, model repository and launch, against real output of the engine on this machine.

Fixtures (tests/fixtures/streams/README.md): tritonserver 2.51.0 (nvidia-pytriton 0.7.0) serving vLLM CPU through
adapters/triton_vllm_model.py, recorded 2026-12-07 with the request `build` makes
(`triton/native_generate_stream_request.json`): its SSE stream, the non-streamed answer, `POST /v2/repository/index`
and the metrics port's dump.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

import pytest

from adapters import install, triton_native, triton_vllm_model
from adapters.base import EngineConfig, ListsModels, ScrapesElsewhere
from adapters.prometheus import scrape
from harness.sse import SSEParser
from workloads.spec import RequestSpec
from workloads.tokenizer import LocalTokenizer

STREAMS = Path(__file__).parent / "fixtures" / "streams" / "triton"
METRICS = Path(__file__).parent / "fixtures" / "metrics" / "triton_native.txt"
QUESTION = ({"role": "user", "content": "What is the capital of France?"},)


def payloads(raw: bytes, seed: int) -> list[bytes]:
    rng, parser, out, i = random.Random(seed), SSEParser(), [], 0
    while i < len(raw):
        n = rng.randint(1, 40)
        out += parser.feed(raw[i : i + n])
        i += n
    return out + parser.close()


@pytest.mark.parametrize("seed", range(5))
def test_recorded_stream_gives_each_token_its_count_and_the_end(seed: int) -> None:
    deltas = [
        triton_native.parse_event(p)
        for p in payloads((STREAMS / "native_generate_stream.sse").read_bytes(), seed)
    ]
    assert all(d is not None and d.error is None for d in deltas)
    assert "".join(d.text for d in deltas if d) == "The capital of France is Paris"
    assert [d.tokens for d in deltas if d] == [1] * 6 and all(d.tokens_exact for d in deltas if d)
    assert [d.finish_reason for d in deltas if d] == [None] * 5 + [
        "length"
    ]  # "None" until the FINAL response
    assert [d.usage.prompt_tokens if d and d.usage else None for d in deltas] == [None] * 5 + [37]


def test_recorded_answer_and_error_event() -> None:
    d = triton_native.parse_response((STREAMS / "native_generate.json").read_bytes())
    assert (d.text, d.tokens, d.finish_reason) == ("The capital of France is Paris", 6, "length")
    assert d.usage is not None and (d.usage.prompt_tokens, d.usage.completion_tokens) == (37, 6)
    # the server's own error event (seen when the stub died: "Stub process '...' is not healthy.")
    err = triton_native.parse_event(b'{"error":"Stub process \'SmolLM2-135M-Instruct_0_0\' is not healthy."}')
    assert err is not None and err.error and "not healthy" in err.error


def test_request_is_the_one_recorded_chat_template_applied_client_side() -> None:
    if not install.status("model-hf").installed:
        pytest.skip("the shipped model's Hugging Face folder is not installed: `bench engines install vllm`")
    spec = RequestSpec("c0", "chat", 6, messages=QUESTION)
    call = triton_native.build(spec, "SmolLM2-135M-Instruct", True)
    assert (call.method, call.path, call.stream) == (
        "POST",
        "/v2/models/SmolLM2-135M-Instruct/generate_stream",
        True,
    )
    assert call.body == json.loads((STREAMS / "native_generate_stream_request.json").read_text())
    prompt = LocalTokenizer(install.hf_model_dir()).chat_prompt(QUESTION)
    assert (
        call.body is not None
        and call.body["text_input"] == prompt
        and prompt.endswith("<|im_start|>assistant\n")
    )
    # 37 prefill tokens in the recording: what the client counts for these messages
    assert LocalTokenizer(install.hf_model_dir()).count_chat(QUESTION) == 37


def test_output_length_is_pinned_only_when_asked() -> None:
    pinned = RequestSpec("p", "completions", 9, prompt="Once upon a time")
    free = RequestSpec("f", "completions", 9, prompt="Once upon a time", pin_output=False)
    body = triton_native.build(pinned, "m", False).body
    assert body is not None and body["text_input"] == "Once upon a time"
    assert json.loads(body["sampling_parameters"]) == {
        "max_tokens": 9,
        "temperature": 0.0,
        "ignore_eos": True,
        "min_tokens": 9,
    }
    free_body = triton_native.build(free, "m", False).body
    assert free_body is not None and json.loads(free_body["sampling_parameters"]) == {
        "max_tokens": 9,
        "temperature": 0.0,
    }
    assert triton_native.build(free, "m", False).path == "/v2/models/m/generate"
    # every sampling field sent is one the model turns into SamplingParams
    assert triton_vllm_model.sampling_fields(body["sampling_parameters"]) == {
        "max_tokens": 9, "temperature": 0.0, "ignore_eos": True, "min_tokens": 9,
    }  # fmt: skip


def test_model_reads_sampling_parameters_like_the_vllm_backend() -> None:
    assert triton_vllm_model.sampling_fields('{"max_tokens": "5", "ignore_eos": "true", "stop": "x"}') == {
        "max_tokens": 5, "ignore_eos": True, "stop": ["x"],
    }  # fmt: skip
    with pytest.raises(ValueError, match="unknown field 'lora_name'"):
        triton_vllm_model.sampling_fields('{"lora_name": "a"}')


def test_config_declares_every_input_the_model_reads_and_every_output_it_sends() -> None:
    config = triton_native.config_pbtxt("m")
    inputs = re.findall(r'name: "(\w+)" data_type: \w+ dims: \[ 1 \]', config.split("output [")[0])
    outputs = re.findall(r'name: "(\w+)"', config.split("output [")[1])
    source = triton_native.MODEL_SOURCE.read_text()
    read = set(re.findall(r'first\("(\w+)"\)', source)) | set(triton_vllm_model._FLAGS)
    sent = set(re.findall(r'pb\.Tensor\("(\w+)"', source))
    assert set(inputs) == read | {"text_input"} and sent == set(outputs), (inputs, read, outputs, sent)
    assert "decoupled: true" in config and 'backend: "python"' in config and "max_batch_size: 0" in config
    # the body the adapter sends names inputs only
    body = triton_native.build(RequestSpec("x", "completions", 1, prompt="a"), "m", True).body
    assert body is not None and set(body) <= set(inputs)


def test_metrics_and_models_from_the_recorded_server() -> None:
    got = scrape(METRICS.read_text(), triton_native.METRICS)
    assert got == {"requests_finished_total": 11.0, "requests_waiting": 0.0}
    adapter = triton_native.ADAPTER
    assert isinstance(adapter, ListsModels) and isinstance(adapter, ScrapesElsewhere)
    index = json.loads((STREAMS / "native_repository_index.json").read_text())
    assert adapter.model_ids_from(index) == ["SmolLM2-135M-Instruct"]
    assert adapter.model_ids_from([{"name": "m", "state": "UNAVAILABLE"}]) == []
    cfg = EngineConfig(model="/m", port=8000, env={"TRITON_METRICS_PORT": "9102"})
    assert adapter.metrics_url(cfg, "http://127.0.0.1:8000") == "http://127.0.0.1:9102/metrics"
    assert (
        adapter.metrics_url(EngineConfig(model="/m"), "http://gpu-box:8000") == "http://gpu-box:8002/metrics"
    )


def test_launch_is_loopback_without_grpc_and_writes_the_repository(tmp_path: Path) -> None:
    cfg = EngineConfig(model="/models/m", served_model_name="m", dtype="bfloat16", max_context=4096,
                       max_num_seqs=8, port=8123, env={"TRITON_METRICS_PORT": "8124", "X": "1"})  # fmt: skip
    argv = triton_native.launch_argv(cfg)
    server = argv[argv.index("--") + 1 :]
    flags = dict(zip(server[1::2], server[2::2], strict=False))
    assert argv[1:3] == ["-m", "adapters.triton_native"] and server[0].endswith("/bin/tritonserver")
    assert flags["--http-address"] == flags["--metrics-address"] == "127.0.0.1"
    assert (flags["--http-port"], flags["--metrics-port"], flags["--allow-grpc"]) == ("8123", "8124", "false")
    env = triton_native.launch_env(cfg)
    assert env["VLLM_HOST_IP"] == "127.0.0.1" and env["X"] == "1" and "TRITON_METRICS_PORT" not in env
    assert (
        env["PATH"].split(":")[0].endswith("/triton/venv/bin")
    )  # the stub embeds the Python found first on PATH
    assert triton_native.launch_argv(cfg) == argv  # the repository is named by its content
    spec = json.loads(argv[argv.index("--") - 1])
    assert spec["engine_args"] == {
        "model": "/models/m", "served_model_name": "m", "dtype": "bfloat16", "max_model_len": 4096,
        "max_num_seqs": 8, "enforce_eager": True, "disable_log_stats": True,
    }  # fmt: skip
    repo = tmp_path / "repo"
    triton_native._write_repository(repo, spec["name"], spec["engine_args"])
    assert (repo / "m" / "config.pbtxt").read_text() == triton_native.config_pbtxt("m")
    assert json.loads((repo / "m" / "1" / "model.json").read_text()) == spec["engine_args"]
    assert (repo / "m" / "1" / "model.py").read_bytes() == triton_native.MODEL_SOURCE.read_bytes()
    wide = triton_native.launch_argv(EngineConfig(model="/m", host="0.0.0.0", port=1))
    assert wide.count("0.0.0.0") == 2  # HTTP and metrics, when told
