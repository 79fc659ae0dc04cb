"""Any OpenAI-compatible server can be benchmarked (issue 20): one without `/tokenize`, one of unknown make, and
exact prompt lengths with `--tokenizer` (a tokenizer.json or a GGUF), checked against the server's usage counts.

Each run is a real `bench` process against a real HTTP server on loopback (tests/fakes/openai_server.py, an
ephemeral port), which like OpenAI's API refuses body fields the API does not define.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest

from adapters import install, registry
from harness.orchestrate import parse_engines
from harness.rundir import RunDir
from tests.fakes.openai_server import OPENAI_FIELDS, OpenAIServer
from workloads.spec import Api, RequestSpec
from workloads.text import VOCABULARY

BENCH = [sys.executable, "-m", "harness.cli"]
GGUF = Path("~/.cache/enginebench/model/SmolLM2-135M-Instruct.Q4_1.gguf").expanduser()
HF_FOLDER = GGUF.with_name("SmolLM2-135M-Instruct-hf")
LLAMA_TOKENIZE = install.llama_bin("llama-tokenize")
LLAMA_SERVER = install.llama_bin("llama-server")
INPUT = 100  # prompt tokens each request of these runs asks for
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def bench_run(
    url: str,
    out: Path,
    *extra: str,
    api: str = "completions",
    env: dict[str, str] | None = None,
    requests: int = 8,
) -> subprocess.CompletedProcess[str]:
    args = [
        "run", "--endpoint", url, "--workload", "synthetic", "--set", f"input_tokens={INPUT}", "--set", f"api={api}",
        "--set", "output_tokens=6", "--requests", str(requests), "--warmup", "1", "--concurrency", "2", "--out", str(out),
        *extra,
    ]  # fmt: skip
    return subprocess.run(
        [*BENCH, *args], capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})}
    )


def _summary_point(out: Path) -> dict[str, Any]:
    (point,) = orjson.loads((out / "summary.json").read_bytes())["points"]
    return dict(point)


def _events(out: Path, kind: str) -> list[dict[str, Any]]:
    return [dict(e) for e in RunDir.open(out).iter_events() if e.get("kind") == kind]


def _prompt_tokens(out: Path) -> list[int | None]:
    return [r.prompt_tokens for r in RunDir.open(out).iter_records() if r.status == "ok"]


# --------------------------------------------------------------------------------------------- no /tokenize


def test_a_plain_openai_server_without_tokenize_is_benchmarked(tmp_path: Path) -> None:
    """The issue's "done when": exit 0 with records and a summary; lengths approximate, said so, and the actual ones
    taken from the server's usage; nothing sent that OpenAI's API would refuse."""
    out = tmp_path / "run"
    with OpenAIServer() as srv:
        r = bench_run(srv.url, out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert srv.refused == [] and all(set(b) <= OPENAI_FIELDS for b in srv.bodies), srv.refused
    assert not any("ignore_eos" in b or "min_tokens" in b for b in srv.bodies)
    manifest = orjson.loads((out / "manifest.json").read_bytes())
    assert manifest["engines"][0]["adapter"] == registry.GENERIC

    counted = _prompt_tokens(out)
    assert len(counted) == 9  # 1 warm-up + 8 measured, every one answered
    assert sorted(counted) == sorted(srv.counted)  # type: ignore[type-var]  # the lengths are the server's
    (event,) = _events(out, "tokenizer")
    assert event["exact"] is False and "no tokenize endpoint" in event["why"]

    point = _summary_point(out)
    approx = point["checks"]["approximate_inputs"]
    measured = [r.prompt_tokens or 0 for r in RunDir.open(out).iter_records() if r.phase == "measure"]
    assert approx["counted"] == 8 and approx["target_mean"] == INPUT
    assert approx["server_mean"] == pytest.approx(sum(measured) / 8) and approx["server_mean"] != INPUT
    assert (approx["server_min"], approx["server_max"]) == (min(measured), max(measured))
    assert point["input_token_sources"] == {"server_usage": 8}
    (note,) = [n for n in point["verdict"]["notes"] if n.startswith("input lengths approximate")]
    assert "--tokenizer PATH" in note and f"asked for {INPUT} input tokens" in note
    assert f"the server counted {approx['server_mean']:.0f}" in note
    assert "input lengths approximate" in r.stdout


def test_an_engine_behind_a_proxy_without_tokenize_falls_back(tmp_path: Path) -> None:
    """A server that says it is vLLM (owned_by) but has no /tokenize (a gateway in front): its adapter is used, the
    tokenize probe's 404 sends the run to the stand-in instead of stopping it."""
    out = tmp_path / "run"
    with OpenAIServer(owned_by="vllm", accept=frozenset({"ignore_eos"})) as srv:
        r = bench_run(srv.url, out)
    assert r.returncode == 0, r.stdout + r.stderr
    assert orjson.loads((out / "manifest.json").read_bytes())["engines"][0]["adapter"] == "vllm"
    assert all(b.get("ignore_eos") is True for b in srv.bodies)  # the vLLM adapter pins output lengths
    (event,) = _events(out, "tokenizer")
    assert event["exact"] is False and "/tokenize is not there" in event["why"] and "404" in event["why"]


@pytest.mark.parametrize("owned_by", ["organization-owner", "vllm"])
def test_a_server_behind_an_api_key_is_asked_with_it(tmp_path: Path, owned_by: str) -> None:
    """A hosted API answers 401 without its key: the model listing, the make's question and the tokenize probe
    carry the key too, not only the requests."""
    with OpenAIServer(api_key="k-123", owned_by=owned_by, accept=frozenset({"ignore_eos"})) as srv:
        r = bench_run(srv.url, tmp_path / "run", "--api-key-env", "EB_TEST_KEY", env={"EB_TEST_KEY": "k-123"})
    assert r.returncode == 0, r.stdout + r.stderr
    assert len(srv.counted) == 9, srv.unauthorized
    # (an engine's own routes, e.g. vLLM's /metrics or /version, may still be asked without it: not OpenAI's API)
    assert not [p for p in srv.unauthorized if p.startswith("/v1/") or p == "/tokenize"], srv.unauthorized
    manifest = orjson.loads((tmp_path / "run" / "manifest.json").read_bytes())
    assert manifest["engines"][0]["adapter"] == ("vllm" if owned_by == "vllm" else registry.GENERIC)
    assert "k-123" not in (tmp_path / "run" / "manifest.json").read_text()
    assert not any("k-123" in p.read_text() for p in (tmp_path / "run").glob("*.jsonl"))


@pytest.mark.parametrize(
    ("owned_by", "adapter"),
    [
        ("vllm", "vllm"),
        ("sglang", "sglang"),
        ("llamacpp", "llamacpp"),
        ("lmdeploy", "lmdeploy"),
        ("deepspeed-mii", "mii"),
        ("tensorrt_llm", "trtllm"),
        ("openai", registry.GENERIC),  # OpenAI's own API
        ("organization-owner", registry.GENERIC),
        ("HuggingFaceTB/SmolLM2-135M-Instruct", registry.GENERIC),  # TGI puts the model id there
        (None, registry.GENERIC),
    ],
)
def test_the_server_names_its_make_or_gets_the_generic_adapter(owned_by: str | None, adapter: str) -> None:
    card = {"id": "m", "object": "model"} | ({"owned_by": owned_by} if owned_by else {})
    assert registry.adapter_for_models({"object": "list", "data": [card]}) == adapter
    assert (
        registry.adapter_for_models({"data": []}) == registry.adapter_for_models("junk") == registry.GENERIC
    )


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_the_generic_adapter_sends_only_openai_fields(api: Api) -> None:
    spec = RequestSpec(
        "r", api, 16, messages=({"role": "user", "content": "hi"},), prompt="hi", pin_output=True
    )
    generic = registry.get(registry.GENERIC)
    call = generic.build(spec, "m", True)
    assert call.body is not None and set(call.body) <= OPENAI_FIELDS, call.body
    assert not generic.info.honours_ignore_eos and not generic.info.honours_min_tokens  # lengths not pinned
    assert "ignore_eos" in (registry.get("vllm").build(spec, "m", True).body or {})  # what it no longer gets


def test_endpoint_names_choose_the_adapter() -> None:
    url = "http://127.0.0.1:9"
    chosen = parse_engines(None, [url, f"vllm={url}", f"openai={url}", f"gpu-box={url}"])
    assert [c.adapter for c in chosen] == [registry.IDENTIFY, "vllm", registry.GENERIC, registry.IDENTIFY]


def test_a_tokenizer_path_that_is_not_one_is_refused_in_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    for bad in (tmp_path / "missing", tmp_path / "empty"):
        r = bench_run("http://127.0.0.1:9", tmp_path / "run", "--tokenizer", str(bad))
        assert r.returncode != 0 and "Traceback" not in r.stderr
        lines = [ln for ln in (r.stdout + r.stderr).splitlines() if ln.strip()]
        assert len(lines) == 1 and str(bad) in lines[0] and "tokenizer.json" in lines[0], lines
    broken = tmp_path / "tokenizer.json"
    broken.write_text("{}")
    r = bench_run("http://127.0.0.1:9", tmp_path / "run", "--tokenizer", str(broken))
    assert r.returncode != 0 and "not a tokenizer" in r.stdout + r.stderr


# --------------------------------------------------------------------------------------------- --tokenizer


def _trained_tokenizer(folder: Path) -> Path:
    """A byte-level BPE trained here on the workload's own words, small enough (600 tokens) that words split and
    merges matter, with a BOS post-processor and a ChatML template beside it (tokenizer_config.json)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=["<s>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([" " + " ".join(VOCABULARY)] * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
    )
    folder.mkdir()
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({"bos_token": "<s>", "chat_template": CHATML}))
    return folder / "tokenizer.json"


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_a_tokenizer_json_makes_lengths_exact(tmp_path: Path, api: str) -> None:
    from tokenizers import Tokenizer

    path = _trained_tokenizer(tmp_path / "tok")
    truth = Tokenizer.from_file(str(path))

    def chat(messages: Any) -> int:  # the template rendered by hand: what a server applying it prefills
        text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
        return len(truth.encode(text + "<|im_start|>assistant\n", add_special_tokens=False).ids)

    with OpenAIServer(count_prompt=lambda p: len(truth.encode(p).ids), count_chat=chat) as srv:
        exact = bench_run(srv.url, tmp_path / "exact", "--tokenizer", str(path), api=api)
        approx = bench_run(srv.url, tmp_path / "approx", api=api)
    assert exact.returncode == 0 and approx.returncode == 0, exact.stdout + exact.stderr + approx.stderr
    assert _prompt_tokens(tmp_path / "exact") == [INPUT] * 9
    (event,) = _events(tmp_path / "exact", "tokenizer")
    assert event["exact"] is True and event["tokenizer"] == "local:tok/tokenizer.json"
    manifest = orjson.loads((tmp_path / "exact" / "manifest.json").read_bytes())
    assert manifest["settings"]["run_config"]["tokenizer"] == str(
        path
    )  # `bench run --resume` builds with it too
    point = _summary_point(tmp_path / "exact")
    assert point["checks"]["approximate_inputs"] is None
    assert not any("approximate" in n for n in point["verdict"]["notes"])
    # without it the stand-in's prompts are not this tokenizer's 100 tokens: the check above can fail
    assert any(n != INPUT for n in _prompt_tokens(tmp_path / "approx"))


def _llama_tokenize(text: str) -> int:
    ids = subprocess.run(
        [str(LLAMA_TOKENIZE), "-m", str(GGUF), "--stdin", "--ids", "--log-disable"],
        input=text,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return len(json.loads(ids.strip().splitlines()[-1]))


def _hf_folder_count(text: str) -> int:
    from tokenizers import Tokenizer

    return len(Tokenizer.from_file(str(HF_FOLDER / "tokenizer.json")).encode(text).ids)


@pytest.mark.parametrize("truth", ["llama-tokenize", "hf-folder"])
def test_the_shipped_gguf_makes_lengths_exact(tmp_path: Path, truth: str) -> None:
    """--tokenizer GGUF (EngineBench rebuilds the tokenizer the file embeds) against a server counting with
    llama.cpp's own tokenizer (llama-tokenize) or the Hugging Face folder transformers made from that GGUF."""
    if not GGUF.is_file():
        pytest.skip(f"no shipped model at {GGUF} (bench engines install llamacpp)")
    source = LLAMA_TOKENIZE if truth == "llama-tokenize" else HF_FOLDER
    if not source.exists():
        pytest.skip(f"no {truth} at {source} to count with (bench engines install llamacpp / vllm)")
    count = _llama_tokenize if truth == "llama-tokenize" else _hf_folder_count
    with OpenAIServer(count_prompt=count) as srv:
        r = bench_run(srv.url, tmp_path / "run", "--tokenizer", str(GGUF))
    assert r.returncode == 0, r.stdout + r.stderr
    assert srv.counted == [INPUT] * 9 and _prompt_tokens(tmp_path / "run") == [INPUT] * 9
    (event,) = _events(tmp_path / "run", "tokenizer")
    assert event["exact"] is True and event["tokenizer"] == f"local:{GGUF.name}"


# --------------------------------------------------------------------------------------------- a real engine


@pytest.fixture(scope="module")
def llama_url() -> Iterator[str]:
    """llama-server with the shipped GGUF on an ephemeral port (2 threads, 2 slots), for this module."""
    if not (LLAMA_SERVER.is_file() and GGUF.is_file()):
        pytest.skip(f"needs {LLAMA_SERVER} and {GGUF} (bench engines install llamacpp)")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    argv = [
        str(LLAMA_SERVER),
        "-m",
        str(GGUF),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "-t",
        "2",
        "-c",
        "4096",
    ]
    proc = subprocess.Popen([*argv, "-np", "2"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        while True:
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.skip("llama-server did not become ready")
            time.sleep(0.3)
        yield url
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.live
def test_llama_cpp_at_a_bare_url_is_known_by_its_own_answer(llama_url: str, tmp_path: Path) -> None:
    """`--endpoint URL`: llama-server's /v1/models says owned_by llamacpp, so its adapter and /tokenize are used."""
    r = bench_run(llama_url, tmp_path / "run", requests=4)
    assert r.returncode == 0, r.stdout + r.stderr
    assert (
        orjson.loads((tmp_path / "run" / "manifest.json").read_bytes())["engines"][0]["adapter"] == "llamacpp"
    )
    (event,) = _events(tmp_path / "run", "tokenizer")
    assert event["exact"] is True and event["why"] == "the engine's /tokenize"
    assert _prompt_tokens(tmp_path / "run") == [INPUT] * 5  # llama.cpp's own usage


@pytest.mark.live
@pytest.mark.parametrize("api", ["completions", "chat"])
def test_the_gguf_tokenizer_gives_llama_cpp_exact_lengths(llama_url: str, tmp_path: Path, api: str) -> None:
    """`--tokenizer GGUF` wins over the engine's /tokenize, and every prompt is exactly what llama.cpp's usage
    counts, chat template included. (The engine is not taken as one of unknown make with `openai=URL` here:
    llama-server closes a streamed response's connection while advertising keep-alive, which its own adapter
    knows and the generic one cannot.)"""
    r = bench_run(llama_url, tmp_path / "run", "--tokenizer", str(GGUF), api=api, requests=4)
    assert r.returncode == 0, r.stdout + r.stderr
    (event,) = _events(tmp_path / "run", "tokenizer")
    assert event["exact"] is True and event["why"] == f"--tokenizer {GGUF}"
    assert _prompt_tokens(tmp_path / "run") == [INPUT] * 5


def test_the_note_says_when_the_server_gave_no_counts() -> None:
    """A server that streams no usage: the lengths are the stand-in's, and the note says so rather than invent
    the server's; the note never makes a point INVALID."""
    from harness.verdict import ApproximateInputs, PointChecks, judge

    def checks(approximate: ApproximateInputs | None = None) -> PointChecks:
        return PointChecks(measured=40, duration_s=20.0, closed_loop=True, approximate_inputs=approximate)

    none = ApproximateInputs(tokenizer="t", why="no /tokenize", target_mean=100.0)
    some = none.model_copy(update={"server_mean": 93.5, "server_min": 90, "server_max": 97, "counted": 40})
    (silent,) = judge(checks(none)).notes
    assert "reported no prompt token counts" in silent and "the server counted" not in silent
    verdict = judge(checks(some))
    assert verdict.status == "VALID" and "counted 94 (min 90, max 97) over 40 requests" in verdict.notes[0]
    assert judge(checks()).notes == []
