"""Workload generators: determinism, shapes, exact token counts, tokenizers, file validation, quantized variants."""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from harness.errors import ConfigError
from workloads.model import Geometric, LogNormal, sample
from workloads.quantized import (
    QualityOutput,
    gguf_file_type,
    output_from_openai,
    quality_report,
    quality_requests,
    variants,
)
from workloads.registry import builtin_names, list_workloads, load_workload
from workloads.spec import Api
from workloads.text import PromptBuilder, TextBuilder
from workloads.tokenizer import EngineTokenizer, LocalTokenizer, SimpleTokenizer, Tokenizer

REPO = Path(__file__).resolve().parent.parent
HF_FOLDER = Path("~/.cache/enginebench/model/SmolLM2-135M-Instruct-hf").expanduser()
GGUF = Path("~/.cache/enginebench/model/SmolLM2-135M-Instruct.Q4_1.gguf").expanduser()
AZURE = REPO.parent / "shared/data/traces/AzureLLMInferenceTrace_conv.csv"
TOK = SimpleTokenizer()
GENERATED = ["synthetic", "chat", "long-context", "shared-prefix", "quantized"]


def digest(requests: list[Any]) -> str:
    return hashlib.sha256(repr(requests).encode()).hexdigest()


# --------------------------------------------------------------------------------------------- determinism


@pytest.mark.parametrize("name", GENERATED)
def test_same_seed_same_requests_other_seed_other(name: str) -> None:
    w = load_workload(name)
    a, b = w.generate(6, 3, tokenizer=TOK), w.generate(6, 3, tokenizer=TOK)
    assert a == b and len(a) == 6
    assert w.fingerprint_for(3) == load_workload(name).fingerprint_for(3)
    c = w.generate(6, 4, tokenizer=TOK)
    assert [r.prompt or r.messages for r in c] != [r.prompt or r.messages for r in a]
    assert w.fingerprint_for(4) != w.fingerprint_for(3)
    assert w.fingerprint == w.fingerprint_for(w.seed)


def test_requests_are_identical_across_processes() -> None:
    """No dependence on hash randomization or call order: a fresh interpreter builds the same requests."""
    code = (
        "import hashlib;from workloads.registry import load_workload;from workloads.tokenizer import SimpleTokenizer;"
        "r=load_workload('chat').generate(5,7,tokenizer=SimpleTokenizer());"
        "print(hashlib.sha256(repr(r).encode()).hexdigest())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=REPO, check=True
    )
    assert out.stdout.strip() == digest(load_workload("chat").generate(5, 7, tokenizer=TOK))


def test_generation_is_prefix_stable() -> None:
    for name in ("chat", "shared-prefix"):
        w = load_workload(name)
        assert w.generate(7, tokenizer=TOK)[:4] == w.generate(4, tokenizer=TOK)


def test_overrides_change_the_fingerprint() -> None:
    w = load_workload("synthetic")
    w2 = w.with_overrides({"input_tokens": 100})
    assert w2.fingerprint != w.fingerprint
    assert {r.input_tokens for r in w2.generate(3, tokenizer=TOK)} == {100}


def test_builtins_all_load_and_describe_themselves() -> None:
    names = builtin_names()
    assert {
        "synthetic",
        "chat",
        "long-context",
        "shared-prefix",
        "quantized",
        "trace-azure",
        "trace-mooncake",
    } <= set(names)
    for w in list_workloads():
        assert w.description and "\n" not in w.description
        assert w.version >= 1


# --------------------------------------------------------------------------------------------- exact lengths


@pytest.mark.parametrize("n", [1, 2, 3, 5, 17, 64, 255, 1000, 3000])
def test_text_has_exactly_n_tokens(n: int) -> None:
    text = TextBuilder(TOK).text(n, ("t", n))
    assert len(TOK.encode(text)) == n


def test_simple_tokenizer_merges_at_boundaries_and_round_trips() -> None:
    assert len(TOK.encode("ab")) + len(TOK.encode("cd")) == 2 and len(TOK.encode("abcd")) == 1
    text = " hello wonderful world\n  x"
    assert TOK.decode(TOK.encode(text)) == text


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_synthetic_prompts_measure_exactly_the_target(api: str) -> None:
    w = load_workload("synthetic").with_overrides({"api": api, "input_tokens": 300, "output_tokens": 7})
    for r in w.generate(5, tokenizer=TOK):
        measured = TOK.count_chat(r.messages) if api == "chat" else TOK.count_prompt(r.prompt)
        assert measured == r.input_tokens == 300
        assert r.max_tokens == 7 and r.pin_output
        # the templated prompt is longer than what the workload wrote (the template's own tokens)
        assert int(r.tags["content_tokens"]) < 300 if api == "chat" else int(r.tags["content_tokens"]) == 300


# --------------------------------------------------------------------------------------------- chat


def _chat(**overrides: Any) -> Any:
    return load_workload("chat").with_overrides(overrides)


def test_chat_sessions_grow_turn_by_turn() -> None:
    requests = _chat().generate(60, tokenizer=TOK)
    sessions: dict[str, list[Any]] = {}
    for r in requests:
        assert r.session is not None and r.turn is not None
        sessions.setdefault(r.session, []).append(r)
    assert len(sessions) > 5
    for turns in sessions.values():
        assert [r.turn for r in turns] == list(range(1, len(turns) + 1))
        assert turns[0].history_from is None and turns[0].think_time == 0.0
        for prev, cur in itertools.pairwise(turns):
            assert cur.history_from == prev.request_id
            assert cur.think_time > 0
            assert len(cur.messages) == 1 and cur.messages[0]["role"] == "user"
            assert cur.input_tokens is not None and prev.input_tokens is not None
            # the history (previous prompt + reply) comes along: the prompt grows by more than the reply
            assert cur.input_tokens > prev.input_tokens + prev.max_tokens
            assert cur.tags["input_tokens_exact"] == "false" and cur.tags["turn"] == str(cur.turn)
        assert turns[0].tags["input_tokens_exact"] == "true"
        assert TOK.count_chat(turns[0].messages) == turns[0].input_tokens
        assert all((r.input_tokens or 0) + r.max_tokens <= 2048 for r in turns)


def test_chat_turn_count_follows_the_truncated_geometric() -> None:
    fixed = {"dist": "constant", "value": 4}
    w = _chat(user_tokens=fixed, reply_tokens=fixed, max_context=100_000)
    requests = w.generate(1200, tokenizer=TOK)
    per_session: dict[str, int] = {}
    for r in requests:
        per_session[str(r.session)] = int(r.turn or 0)
    counts = list(per_session.values())[:-1]  # the last session may be cut by n
    p = 1 / 3  # mean 3, max 6
    expected = sum(k * p * (1 - p) ** (k - 1) for k in range(1, 6)) + 6 * (1 - p) ** 5  # 2.7366
    assert max(counts) <= 6 and min(counts) >= 1
    assert abs(np.mean(counts) - expected) < 0.15  # sd ~1.6 over ~440 sessions: 5 standard errors


def test_chat_sessions_end_when_the_context_is_full() -> None:
    w = _chat(max_context=300, turns={"dist": "constant", "value": 6})
    for r in w.generate(40, tokenizer=TOK):
        assert (r.input_tokens or 0) + r.max_tokens <= 300


def test_lognormal_sampling_matches_its_parameters() -> None:
    d = LogNormal(dist="lognormal", mu=6.633, sigma=0.985, scale=0.125)
    x = sample(d, np.random.default_rng(1), 20_000, integer=False)
    assert np.median(x) == pytest.approx(math.exp(6.633) * 0.125, rel=0.03)
    assert np.std(np.log(x)) == pytest.approx(0.985, rel=0.03)
    g = sample(Geometric(dist="geometric", mean=3, max=6), np.random.default_rng(1), 10, integer=True)
    assert g.dtype == np.int64 and g.max() <= 6 and g.min() >= 1


@pytest.mark.skipif(not AZURE.is_file(), reason=f"Azure trace not at {AZURE}")
def test_chat_length_parameters_are_the_azure_fit() -> None:
    """The lognormal parameters in chat.yaml are log-mean / log-sd of the Azure conversation trace."""
    from workloads.traces import read_azure

    rows = read_azure(AZURE)
    spec = yaml.safe_load((REPO / "workloads/builtin/chat.yaml").read_text())
    for field, values in (
        ("user_tokens", [r.input_tokens for r in rows]),
        ("reply_tokens", [r.output_tokens for r in rows]),
    ):
        logs = np.log(np.array(values, dtype=float))
        assert spec[field]["mu"] == pytest.approx(logs.mean(), abs=0.001)
        assert spec[field]["sigma"] == pytest.approx(logs.std(), abs=0.001)


# --------------------------------------------------------------------------------------------- long context


def test_long_context_inputs_are_fractions_of_the_window() -> None:
    w = load_workload("long-context").with_overrides({"max_context": 1000, "output_tokens": 16})
    requests = w.generate(6, tokenizer=TOK)
    assert [r.tags["fraction"] for r in requests] == ["0.25", "0.5", "0.9"] * 2
    assert [r.input_tokens for r in requests] == [250, 500, 900] * 2
    assert all(TOK.count_prompt(r.prompt) == r.input_tokens for r in requests)
    assert len({r.prompt for r in requests}) == 6  # no two alike: nothing for a prefix cache
    full = load_workload("long-context").with_overrides({"max_context": 400, "fractions": [1.0]})
    r = full.generate(1, tokenizer=TOK)[0]
    assert r.input_tokens == 400 - 16 and r.tags["input_tokens"] == "384"


# --------------------------------------------------------------------------------------------- shared prefix


@pytest.mark.parametrize("api", ["completions", "chat"])
def test_shared_prefix_groups_share_and_controls_do_not(api: str) -> None:
    w = load_workload("shared-prefix").with_overrides({"api": api, "prefix_tokens": 300, "groups": 3})
    requests = w.generate(20, tokenizer=TOK)
    assert [r.tags["role"] for r in requests[:3]] == ["warm"] * 3
    assert [r.tags["group"] for r in requests[:3]] == ["g0", "g1", "g2"]

    def prefix_ids(r: Any) -> list[int]:
        text = r.prompt if api == "completions" else r.messages[0]["content"]
        return TOK.encode(text)[:300]

    by_group: dict[str, list[list[int]]] = {}
    for r in requests:
        by_group.setdefault(r.tags["group"], []).append(prefix_ids(r))
        assert r.tags["shared"] == ("false" if r.tags["group"] == "control" else "true")
    assert set(by_group) == {"g0", "g1", "g2", "control"}
    for group, prefixes in by_group.items():
        distinct = {tuple(p) for p in prefixes}
        assert len(distinct) == (len(prefixes) if group == "control" else 1), group
    firsts = [tuple(p[0]) for g, p in by_group.items() if g != "control"] + [
        tuple(p) for p in by_group["control"]
    ]
    assert len(set(firsts)) == len(firsts)  # groups and controls all differ
    # the suffixes differ inside a group
    g0 = [r for r in requests if r.tags["group"] == "g0"]
    assert len({r.prompt or r.messages[1]["content"] for r in g0}) == len(g0)
    if api == "completions":
        assert {r.input_tokens for r in requests} == {316}
        assert all(TOK.count_prompt(r.prompt) == 316 for r in requests)


def test_shared_prefix_must_span_two_cache_blocks() -> None:
    with pytest.raises(
        ConfigError, match=r"field `\(top level\)`.*prefix_tokens \(200\) must be >= 2 cache blocks"
    ):
        load_workload("shared-prefix").with_overrides({"prefix_tokens": 200})


# --------------------------------------------------------------------------------------------- invalid files


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"turns": {"dist": "geometric", "mean": 0}}, "workload chat.yaml: field `turns.mean`: must be >= 1"),
        ({"turns": {"dist": "gaussian", "mean": 2}}, "workload chat.yaml: field `turns`: must be one of"),
        ({"max_context": -5}, "workload chat.yaml: field `max_context`: must be > 0 (got -5)"),
        ({"user_token": 3}, "workload chat.yaml: field `user_token`: is not a known field"),
        ({"kind": "chatty"}, "workload chat.yaml: field `kind`: must be one of"),
        ({"reply_tokens": None}, "workload chat.yaml: field `reply_tokens`:"),
    ],
)
def test_invalid_workload_file_names_the_field(tmp_path: Path, edit: dict[str, Any], message: str) -> None:
    data = yaml.safe_load((REPO / "workloads/builtin/chat.yaml").read_text())
    data.update(edit)
    path = tmp_path / "chat.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(ConfigError) as e:
        load_workload(str(path))
    assert str(e.value).startswith(message)
    assert "\n" not in str(e.value)


def test_missing_field_and_bad_yaml(tmp_path: Path) -> None:
    path = tmp_path / "w.yaml"
    path.write_text("kind: synthetic\nname: w\ndescription: d\noutput_tokens: 5\n")
    with pytest.raises(ConfigError, match=r"^workload w.yaml: field `input_tokens`: is required$"):
        load_workload(str(path))
    path.write_text("kind: synthetic\n  name: [w\n")
    with pytest.raises(ConfigError, match=r"^workload w.yaml: not valid YAML at line \d+"):
        load_workload(str(path))
    with pytest.raises(ConfigError, match="neither a built-in"):
        load_workload(str(tmp_path / "absent.yaml"))


def test_user_file_loads_and_cli_reports_errors_on_one_line(tmp_path: Path) -> None:
    good = tmp_path / "mine.yaml"
    good.write_text(
        "kind: synthetic\nname: mine\ndescription: my test\ninput_tokens: 32\noutput_tokens: 8\nseed: 5\n"
    )
    w = load_workload(str(good))
    assert w.name == "mine" and w.seed == 5 and w.source == str(good)
    bench = Path(sys.executable).parent / "bench"
    ok = subprocess.run(
        [bench, "workloads", "--workload", str(good), "--preview", "2"], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stderr
    assert w.fingerprint in ok.stdout and "mine-5-000001" in ok.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(good.read_text().replace("input_tokens: 32", "input_tokens: 0"))
    out = subprocess.run([bench, "workloads", str(bad)], capture_output=True, text=True)
    assert out.returncode == 2
    assert out.stderr.strip() == "error: workload bad.yaml: field `input_tokens`: must be > 0 (got 0)"
    listing = subprocess.run([bench, "workloads"], capture_output=True, text=True)
    assert listing.returncode == 0 and all(name in listing.stdout for name in builtin_names())


# --------------------------------------------------------------------------------------------- tokenizers


def _real_tokenizer(source: Path) -> LocalTokenizer:
    pytest.importorskip("tokenizers", reason="the local tokenizer needs the `tokenizers` package")
    if not source.exists():
        pytest.skip(f"no model tokenizer at {source} (made by the model install step)")
    return LocalTokenizer(source)


@pytest.mark.parametrize("source", [HF_FOLDER, GGUF], ids=["hf-folder", "gguf"])
def test_exact_counts_with_the_real_model_tokenizer(source: Path) -> None:
    real = _real_tokenizer(source)
    texts = TextBuilder(real)
    for n in (1, 7, 128, 1000):
        assert len(real.encode(texts.text(n, ("real", n)))) == n
    builder = PromptBuilder(real)
    apis: tuple[Api, ...] = ("completions", "chat")
    for api in apis:
        built = builder.prompt(200, api, ("real", api))
        measured = real.count_chat(built.messages) if api == "chat" else real.count_prompt(built.prompt)
        assert measured == built.input_tokens == 200
    # the chat template adds tokens the content does not show (evalscope PR#1289): SmolLM2's ChatML template
    # with its default system prompt
    msgs = ({"role": "user", "content": texts.text(50, ("real", "chat"))},)
    assert real.count_chat(msgs) > 50 + 20
    assert "<|im_start|>system" in real.chat_prompt(msgs)
    # shared-prefix groups share their first prefix_tokens model tokens
    w = load_workload("shared-prefix").with_overrides({"prefix_tokens": 256, "groups": 2, "control_every": 0})
    requests = w.generate(4, tokenizer=real)
    heads = [tuple(real.encode(r.prompt)[:256]) for r in requests]
    assert heads[0] == heads[2] and heads[1] == heads[3] and heads[0] != heads[1]
    assert {r.input_tokens for r in requests} == {256 + 16}


def test_gguf_and_folder_tokenizers_agree() -> None:
    """On the texts workloads write. (They differ on some numeric characters such as "½": the folder made by
    transformers from the GGUF lacks llama.cpp's digit-splitting pre-tokenizer; the GGUF rebuild has it.)"""
    folder, gguf = _real_tokenizer(HF_FOLDER), _real_tokenizer(GGUF)
    samples = [
        " Hello world",
        "x = 12345 + 67",
        "über naïve café\n\n  tabs\tand spaces",
        "<|im_start|>user\nhi",
    ]
    samples.append(TextBuilder(folder).text(500, ("agree",)))
    for text in samples:
        assert folder.encode(text) == gguf.encode(text), text
    msgs = ({"role": "user", "content": "What is 2+2?"},)
    assert folder.count_chat(msgs) == gguf.count_chat(msgs)


class _EngineLike(BaseHTTPRequestHandler):
    """A scripted engine on loopback: llama.cpp's and vLLM's tokenize endpoints backed by the simple tokenizer."""

    calls: list[str] = []  # noqa: RUF012 - shared with the test on purpose

    def log_message(self, *args: Any) -> None:
        pass

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.calls.append(self.path)
        if self.path == "/tokenize" and "content" in body:  # llama.cpp
            answer: dict[str, Any] = {"tokens": TOK.encode(body["content"])}
        elif self.path == "/tokenize" and "messages" in body:  # vLLM chat
            n = TOK.count_chat(body["messages"])
            answer = {"tokens": list(range(n)), "count": n}
        elif self.path == "/tokenize":  # vLLM prompt
            answer = {"tokens": TOK.encode(body["prompt"]), "count": 0}
        elif self.path == "/detokenize":
            text = TOK.decode(body["tokens"])
            answer = {"prompt": text} if "model" in body else {"content": text}
        elif self.path == "/apply-template":
            rendered = "".join(
                f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in body["messages"]
            )
            answer = {"prompt": rendered + "<|im_start|>assistant\n"}
        else:
            self.send_response(404)
            self.end_headers()
            return
        data = json.dumps(answer).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


@pytest.fixture
def engine_url() -> Iterator[str]:
    _EngineLike.calls.clear()
    server = ThreadingHTTPServer(("127.0.0.1", 0), _EngineLike)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("dialect", ["llamacpp", "vllm"])
def test_engine_tokenizer_over_http_builds_exact_prompts(engine_url: str, dialect: str) -> None:
    tok: Tokenizer = EngineTokenizer(engine_url, dialect, model="m")  # type: ignore[arg-type]
    assert tok.decode(tok.encode(" some words here")) == " some words here"
    w = load_workload("synthetic").with_overrides({"input_tokens": 120, "api": "chat"})
    requests = w.generate(2, tokenizer=tok)
    assert [r.input_tokens for r in requests] == [120, 120]
    assert all(TOK.count_chat(r.messages) == 120 for r in requests)
    assert ("/apply-template" in _EngineLike.calls) == (dialect == "llamacpp")


def test_engine_tokenizer_errors_name_the_endpoint(engine_url: str) -> None:
    from harness.errors import EndpointError

    tok = EngineTokenizer(engine_url + "/nothing", "llamacpp")
    with pytest.raises(EndpointError, match=r"HTTP 404.*/tokenize"):
        tok.encode("x")
    with pytest.raises(EndpointError, match="is the engine running"):
        EngineTokenizer("http://127.0.0.1:9", "llamacpp", timeout=2).encode("x")


# --------------------------------------------------------------------------------------------- quantized


def _write_gguf(path: Path, file_type: int) -> None:
    """A minimal GGUF v3 header: an array (skipped), a string, then general.file_type."""

    def key(name: str) -> bytes:
        return struct.pack("<Q", len(name)) + name.encode()

    body = struct.pack("<4sIQQ", b"GGUF", 3, 0, 3)
    body += key("tokenizer.ggml.scores") + struct.pack("<IIQ", 9, 6, 3) + struct.pack("<3f", 0.1, 0.2, 0.3)
    body += key("general.name") + struct.pack("<IQ", 8, 5) + b"small"
    body += key("general.file_type") + struct.pack("<II", 4, file_type)
    path.write_bytes(body)


def test_variants_are_made_once_and_cached(tmp_path: Path) -> None:
    source = tmp_path / "model.Q4_1.gguf"
    _write_gguf(source, 3)
    assert gguf_file_type(source) == "Q4_1"
    # a stand-in for llama-quantize with its argv: --allow-requantize IN OUT TYPE THREADS
    fake = tmp_path / "llama-quantize"
    log = tmp_path / "calls.txt"
    fake.write_text(f'#!/bin/sh\n[ "$1" = --allow-requantize ] || exit 3\necho "$4" >> {log}\ncp "$2" "$3"\n')
    fake.chmod(0o755)
    w = load_workload("quantized").with_overrides({"source_model": str(source)})
    made = variants(w, out_dir=tmp_path / "out", quantize_bin=fake)
    assert [(v.name, v.file_type) for v in made] == [
        ("F16", "F16"),
        ("Q8_0", "Q8_0"),
        ("Q4_1", "Q4_1"),
        ("Q4_0", "Q4_0"),
    ]
    assert made[2].path == source  # the source's own type is the source itself
    assert all(v.path.is_file() for v in made)
    assert log.read_text().split() == ["F16", "Q8_0", "Q4_0"]
    variants(w, out_dir=tmp_path / "out", quantize_bin=fake)
    assert log.read_text().split() == ["F16", "Q8_0", "Q4_0"]  # cached: nothing ran again
    broken = tmp_path / "broken"
    broken.write_text("#!/bin/sh\necho 'bad type' >&2\nexit 1\n")
    broken.chmod(0o755)
    from harness.errors import EngineError

    with pytest.raises(EngineError, match="llama-quantize F16 failed \\(exit 1\\): bad type"):
        variants(w, out_dir=tmp_path / "out2", quantize_bin=broken)
    assert not list((tmp_path / "out2").glob("*.gguf"))


def test_quality_prompts_and_report() -> None:
    w = load_workload("quantized")
    prompts = quality_requests(w)
    assert len(prompts) == 20 and all(not r.pin_output and r.max_tokens == 32 for r in prompts)
    ref = {
        "a": QualityOutput(
            "Paris is the capital", ("Paris", " is", " the", " capital"), (-0.1, -0.2, -0.3, -0.4)
        ),
        "b": QualityOutput("Seven days", ("Seven", " days"), (-0.5, -0.5)),
    }
    same: dict[str, QualityOutput | str] = dict(ref)
    drifted: dict[str, QualityOutput | str] = {
        "a": QualityOutput("Paris is a city", ("Paris", " is", " a", " city"), (-0.2, -0.4, -1.0, -1.0)),
        "b": "Seven days",  # text only: compared in words
    }
    report = quality_report(ref, {"same": same, "drifted": drifted, "empty": {}})
    s, d, e = (report["variants"][k] for k in ("same", "drifted", "empty"))
    assert s["exact_match"] == 1.0 and s["agreement"] == 1.0 and s["logprob_drift_mean_abs"] == 0.0
    assert d["exact_match"] == 0.5
    assert d["agreement"] == pytest.approx((2 / 4 + 2 / 2) / 2)
    assert d["logprob_tokens"] == 2 and d["logprob_drift_mean_abs"] == pytest.approx(0.15)
    assert d["logprob_drift_max_abs"] == pytest.approx(0.2)
    assert e["prompts_scored"] == 0 and e["prompts_missing"] == 2 and e["agreement"] is None


def test_output_from_an_openai_response_with_logprobs() -> None:
    body = {
        "choices": [
            {
                "message": {"role": "assistant", "content": "Paris."},
                "logprobs": {
                    "content": [
                        {"id": 1, "token": "Paris", "logprob": -0.01, "top_logprobs": []},
                        {"id": 2, "token": ".", "logprob": -0.5, "top_logprobs": []},
                    ]
                },
            }
        ]
    }
    out = output_from_openai(body)
    assert out == QualityOutput("Paris.", ("Paris", "."), (-0.01, -0.5))
    assert output_from_openai({"choices": [{"text": "x"}]}) == QualityOutput("x")


# --------------------------------------------------------------------------------------------- live llama.cpp

LLAMA_SERVER = Path(
    os.environ.get("ENGINEBENCH_LLAMA_SERVER", "~/.cache/enginebench/llamacpp/11434/bin/llama-server")
).expanduser()


def _post(url: str, body: dict[str, Any]) -> dict[str, Any]:
    import urllib.request

    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        answer: dict[str, Any] = json.loads(resp.read())
    return answer


@pytest.fixture(scope="module")
def llama_url() -> Iterator[str]:
    import socket
    import time
    import urllib.request

    if not (LLAMA_SERVER.is_file() and GGUF.is_file()):
        pytest.skip(f"needs {LLAMA_SERVER} and {GGUF}")
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
        "2048",
    ]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
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
        proc.wait(timeout=20)


@pytest.mark.live
def test_prompts_built_here_are_what_llama_cpp_prefills(llama_url: str) -> None:
    """Pitfall 2 end to end: the engine's usage.prompt_tokens equals the input_tokens the workload recorded."""
    engine, local = EngineTokenizer(llama_url, "llamacpp"), _real_tokenizer(GGUF)
    for text in (
        " Hello world",
        "x = 12345 + 67",
        "über naïve café\n\n  tabs\tand",
        "ied 4 ½ months",
        TextBuilder(local).text(300, ("x",)),
    ):
        assert engine.encode(text) == local.encode(text)
    for api in ("chat", "completions"):
        w = load_workload("synthetic").with_overrides({"api": api, "input_tokens": 150})
        for tok in (engine, local):
            r = w.generate(1, tokenizer=tok)[0]
            body: dict[str, Any] = {"max_tokens": 1, "temperature": 0}
            if api == "chat":
                body["messages"] = [dict(m) for m in r.messages]
                answer = _post(llama_url + "/v1/chat/completions", body)
            else:
                answer = _post(llama_url + "/v1/completions", {**body, "prompt": r.prompt})
            assert answer["usage"]["prompt_tokens"] == r.input_tokens == 150, (api, tok.name)


@pytest.mark.live
def test_llama_cpp_returns_logprobs_for_the_quality_check(llama_url: str) -> None:
    q = quality_requests(load_workload("quantized"))[0]
    body = {"messages": [dict(m) for m in q.messages], "max_tokens": 8, "temperature": 0, "logprobs": True}
    out = output_from_openai(_post(llama_url + "/v1/chat/completions", {**body, "top_logprobs": 2}))
    assert out.text and out.tokens is not None and out.logprobs is not None
    assert len(out.tokens) == len(out.logprobs) > 0 and all(lp <= 0 for lp in out.logprobs)
    assert "".join(out.tokens) == out.text
    again = output_from_openai(_post(llama_url + "/v1/chat/completions", {**body, "top_logprobs": 2}))
    report = quality_report({"q": out}, {"same": {"q": again}})
    assert report["variants"]["same"]["exact_match"] == 1.0  # greedy decoding is repeatable


LLAMA_QUANTIZE = LLAMA_SERVER.with_name("llama-quantize")


@pytest.mark.live
def test_real_llama_quantize_makes_a_variant(tmp_path: Path) -> None:
    if not (LLAMA_QUANTIZE.is_file() and GGUF.is_file()):
        pytest.skip(f"needs {LLAMA_QUANTIZE} and {GGUF}")
    w = load_workload("quantized").with_overrides(
        {
            "source_model": str(GGUF),
            "reference": "Q4_1",
            "variants": [{"name": "Q4_1", "file_type": "Q4_1"}, {"name": "Q4_0", "file_type": "Q4_0"}],
        }
    )
    made = variants(w, out_dir=tmp_path, quantize_bin=LLAMA_QUANTIZE)
    assert made[0].path == GGUF
    assert made[1].path.parent == tmp_path and gguf_file_type(made[1].path) == "Q4_0"
    assert 0.5 < made[1].path.stat().st_size / GGUF.stat().st_size < 1.1
