"""Installing Triton Inference Server from PyPI `nvidia-pytriton` for the `triton` engine (vLLM inside Triton, on CPU).

Layout under `<cache>/triton/` (`adapters.install` writes `ready.json` after `install_triton` returned):

    dist/pytriton/tritonserver/bin/tritonserver      the server binary, as the wheel ships it
    dist/pytriton/tritonserver/backends/python/      Triton's python backend, plus the stub for the vLLM venv's Python
    dist/nvidia_pytriton.libs/                        libtritonserver and the libraries the binaries' RUNPATH names
    venv/                                             the interpreter the python backend stub embeds (below)
    repository/<hash>/                                model repositories written at launch (`adapters.triton_native`)

Facts this relies on (read from nvidia-pytriton 0.7.0, `pytriton/triton.py` and `pytriton/server/triton_server.py`,
and seen on this machine 2026-12-07): the wheel bundles tritonserver 2.51.0 with one stub per Python version
(`python_backend_stubs/3.X/triton_python_backend_stub`) that PyTriton copies into `backends/python/`; the server needs
`LD_LIBRARY_PATH` to hold `nvidia_pytriton.libs`; the stub embeds the Python found first on `PATH` (PyTriton puts its
environment's `bin` first), so a virtual environment's `bin` on `PATH` makes the stub use that environment. The wheel
requires numpy < 2: with the vLLM venv's numpy 2.3 every BYTES tensor crossed between server and stub corrupted (the
length prefix of "hello there" arrived as 0x0b0b0b0b, outputs were refused with "output tensor shape does not match
size of output"); numpy 1.26.4 fixed both. So the stub gets its own venv holding numpy 1.26.4 whose `.pth` file then
adds the vLLM venv's site-packages: vLLM, torch and the rest come from there, unmodified, and vLLM 0.32 CPU runs on
numpy 1.26 (`import vllm` and serving checked). The stub links `libpython3.X.so.1.0`: the base interpreter's LIBDIR
goes on `LD_LIBRARY_PATH` first so stub and standard library are of one Python build.
"""

from __future__ import annotations

import json
import os
import shutil
import stat
import subprocess
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = [
    "PYTRITON_VERSION",
    "STUB_NUMPY",
    "TRITONSERVER_VERSION",
    "backends_dir",
    "launch_paths",
    "libs_dir",
    "repositories_dir",
    "stub_python",
    "triton_dir",
    "tritonserver_bin",
]

PYTRITON_VERSION = "0.7.0"
PYTRITON_WHEEL = f"nvidia-pytriton=={PYTRITON_VERSION}"
TRITONSERVER_VERSION = "2.51.0"  # GET /v2 of the bundled server ("version"), seen 2026-12-07
STUB_NUMPY = "numpy==1.26.4"  # nvidia-pytriton 0.7.0 METADATA: Requires-Dist numpy<2.0.0,>=1.21
_MEMBERS = ("pytriton/tritonserver/", "nvidia_pytriton.libs/")
_PTH = "zz-enginebench-vllm.pth"


def triton_dir() -> Path:
    from adapters.install import cache_root

    return cache_root() / "triton"


def tritonserver_bin() -> Path:
    return triton_dir() / "dist" / "pytriton" / "tritonserver" / "bin" / "tritonserver"


def backends_dir() -> Path:
    return triton_dir() / "dist" / "pytriton" / "tritonserver" / "backends"


def libs_dir() -> Path:
    return triton_dir() / "dist" / "nvidia_pytriton.libs"


def stub_python() -> Path:
    return triton_dir() / "venv" / "bin" / "python"


def repositories_dir() -> Path:
    return triton_dir() / "repository"


def launch_paths() -> dict[str, str]:
    """What a launch needs from the install's marker: the base Python's LIBDIR (libpython for the stub)."""
    try:
        data = json.loads((triton_dir() / "ready.json").read_text())
    except (OSError, ValueError):
        return {}
    paths = data.get("paths", {})
    return {k: str(v) for k, v in paths.items()} if isinstance(paths, dict) else {}


_PROBE = (
    "import json, sys, sysconfig; print(json.dumps({'version': '%d.%d' % sys.version_info[:2], "
    "'base_executable': getattr(sys, '_base_executable', sys.executable), 'libdir': sysconfig.get_config_var('LIBDIR'), "
    "'ldlibrary': sysconfig.get_config_var('INSTSONAME'), 'site': sysconfig.get_paths()['purelib']}))"
)
_CHECK = (
    "import json, numpy, vllm; print(json.dumps({'numpy': numpy.__version__, 'vllm': vllm.__version__, "
    "'numpy_from': numpy.__file__}))"
)


def install_triton(say: Callable[[str], None]) -> dict[str, Any]:
    """Unpack the server from the wheel, give the python backend the stub and the environment it runs vLLM in, check
    that both start; the marker's content."""
    from adapters.install import InstallError, _pip_download, _pip_env, _run, vllm_python

    base = triton_dir()
    fix = f"delete {base} and run `bench engines install triton` again"
    wheel = _pip_download(PYTRITON_WHEEL, [], say)
    dist = base / "dist"
    tmp = base / f".dist.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    say(f"unpacking tritonserver from {wheel.name}")
    try:
        with zipfile.ZipFile(wheel) as zf:
            for info in zf.infolist():
                if info.is_dir() or not info.filename.startswith(_MEMBERS):
                    continue
                target = tmp / info.filename
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, target.open("wb") as dst:
                    shutil.copyfileobj(src, dst, 1 << 20)
                mode = (info.external_attr >> 16) & 0o777
                target.chmod(mode or 0o644)
    except (zipfile.BadZipFile, OSError) as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        wheel.unlink(missing_ok=True)
        raise InstallError(f"cannot unpack {wheel} ({exc}); run the install again to fetch it anew") from exc
    shutil.rmtree(dist, ignore_errors=True)
    os.replace(tmp, dist)

    py = json.loads(
        _run([vllm_python(), "-c", _PROBE], None, "probing the vLLM venv's Python", fix).splitlines()[-1]
    )
    stubs = dist / "pytriton" / "tritonserver" / "python_backend_stubs"
    stub_src = stubs / py["version"] / "triton_python_backend_stub"
    if not stub_src.is_file():
        have = ", ".join(sorted(p.name for p in stubs.iterdir())) if stubs.is_dir() else "none"
        raise InstallError(
            f"nvidia-pytriton {PYTRITON_VERSION} has no python backend stub for Python {py['version']} (has {have}); "
            "install the vLLM venv with one of those Pythons"
        )
    stub = backends_dir() / "python" / "triton_python_backend_stub"
    shutil.copy2(stub_src, stub)
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)

    venv = base / "venv"
    shutil.rmtree(venv, ignore_errors=True)
    say(f"creating the python backend's environment {venv} (numpy < 2, then the vLLM venv's packages)")
    _run(
        [py["base_executable"], "-m", "venv", "--without-pip", venv],
        say,
        "python -m venv",
        "check that python3-venv works",
    )
    site = Path(
        _run(
            [venv / "bin" / "python", "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            None,
            "locating the stub venv's site-packages",
            fix,
        ).strip()
    )
    _run(
        [vllm_python(), "-m", "pip", "install", "--no-deps", "--target", site, STUB_NUMPY],
        say,
        f"pip install {STUB_NUMPY}",
        fix,
        env=_pip_env(),
    )
    # appended after the venv's own site-packages: its numpy 1.26 wins, everything else is the vLLM venv's
    (site / _PTH).write_text(f"import site; site.addsitedir({py['site']!r})\n")
    env = launch_env_paths(str(py["libdir"]))
    checked = json.loads(
        _run(
            [venv / "bin" / "python", "-c", _CHECK],
            None,
            "importing numpy and vllm in the stub's environment",
            fix,
            env={**os.environ, **env},
        ).splitlines()[-1]
    )
    if not checked["numpy"].startswith("1.") or not checked["numpy_from"].startswith(str(site)):
        raise InstallError(
            f"the stub's environment imports numpy {checked['numpy']} from {checked['numpy_from']}; {fix}"
        )
    out = _run(
        [tritonserver_bin(), "--help"],
        None,
        "tritonserver --help",
        fix,
        env={**os.environ, **env},
        ok_codes=(0, 1),
    )
    if "Usage: tritonserver" not in out:
        raise InstallError(f"tritonserver --help printed no usage; {fix}", out)
    ldd = subprocess.run(
        ["ldd", str(stub)], capture_output=True, text=True, env={**os.environ, **env}, check=False
    )
    missing = [ln.strip() for ln in ldd.stdout.splitlines() if "not found" in ln]
    if missing:
        raise InstallError(f"the python backend stub lacks libraries: {'; '.join(missing)}; {fix}")
    say(
        f"tritonserver {TRITONSERVER_VERSION}; stub for Python {py['version']}; vllm {checked['vllm']} on numpy {checked['numpy']}"
    )
    return {
        "versions": {
            "nvidia-pytriton": PYTRITON_VERSION,
            "tritonserver": TRITONSERVER_VERSION,
            "stub-numpy": checked["numpy"],
            "vllm": checked["vllm"],
        },
        "paths": {
            "tritonserver": str(tritonserver_bin()),
            "backends": str(backends_dir()),
            "libs": str(libs_dir()),
            "stub_python": str(stub_python()),
            "python_libdir": str(py["libdir"]),
            "vllm_site": str(py["site"]),
        },
    }


def launch_env_paths(python_libdir: str | None) -> dict[str, str]:
    """PATH and LD_LIBRARY_PATH for tritonserver and its stub (the stub venv first on PATH: the stub embeds it)."""
    libs = [str(libs_dir())] + ([python_libdir] if python_libdir else [])
    old_ld = os.environ.get("LD_LIBRARY_PATH")
    return {
        "PATH": os.pathsep.join([str(stub_python().parent), os.environ.get("PATH", "/usr/bin:/bin")]),
        "LD_LIBRARY_PATH": os.pathsep.join([*libs, *([old_ld] if old_ld else [])]),
    }
