"""An attached server that serves several models is never benchmarked on a guessed one: the run is refused with the
models it lists, and `--engine-set NAME.model=ID` chooses which one the requests name (a real `bench` process
against a real HTTP server on loopback)."""

from __future__ import annotations

from pathlib import Path

import orjson

from tests.fakes.openai_server import OpenAIServer
from tests.test_tokenizer_fallback import bench_run


def test_several_models_and_none_chosen_is_refused(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with OpenAIServer(model="llama3", also_serves=("qwen3", "mistral")) as srv:
        r = bench_run(f"x={srv.url}", out, requests=2)
    assert r.returncode != 0
    assert "serves several models (llama3, qwen3, mistral)" in r.stderr + r.stdout
    assert "--engine-set x.model=ID" in r.stderr + r.stdout
    assert srv.bodies == []  # nothing was measured on a guess


def test_the_chosen_model_is_the_one_requests_name(tmp_path: Path) -> None:
    out = tmp_path / "run"
    with OpenAIServer(model="llama3", also_serves=("qwen3",)) as srv:
        r = bench_run(f"x={srv.url}", out, "--engine-set", "x.model=qwen3", requests=2)
        assert r.returncode == 0, r.stdout + r.stderr
        assert srv.bodies and {b["model"] for b in srv.bodies} == {"qwen3"}
        missing = bench_run(f"x={srv.url}", tmp_path / "missing", "--engine-set", "x.model=gpt-9", requests=2)
    assert missing.returncode != 0 and "does not serve 'gpt-9'" in missing.stderr + missing.stdout
    manifest = orjson.loads((out / "manifest.json").read_bytes())
    assert manifest["engines"][0]["model"] == "qwen3"
