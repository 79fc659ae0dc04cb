"""The engines' own packages for the contract tests (tests/test_contracts.py): fetched, unpacked, and run.

Wheels come from PyPI with `pip download --no-deps` at a pinned version into `<engine cache>/contracts/wheels`
(never into the repository) and are unpacked beside it; the first run downloads them (sglang ~40 MB, lmdeploy
~110 MB, ray ~80 MB, deepspeed-mii 0.1 MB), later runs reuse them. Their code runs in the vLLM CPU environment that
`bench engines install vllm` makes (it has torch, transformers, pydantic and fastapi, which the parsers import),
with the unpacked wheel first on `sys.path`, through `tests/contract_probe.py`; anything else they import and that
is not installed there is stubbed only to reach the parser / protocol class (the probe reports which).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from adapters import install

# the versions every contract is checked against (the newest on PyPI when this was written, 2026-12-07)
PINS = {
    "sglang": "0.5.23",
    "lmdeploy": "0.18.0",
    "deepspeed-mii": "0.3.3",
    "deepspeed": "0.19.8",
    "ray": "2.60.0",
}
PROBE = Path(__file__).with_name("contract_probe.py")


def contracts_dir() -> Path:
    return Path(install.cache_root()) / "contracts"


def unpacked(dist: str) -> Path:
    """The pinned wheel of `dist`, unpacked (downloaded once); skips the test with the reason if PyPI cannot serve it."""
    version = PINS[dist]
    root = contracts_dir()
    target = root / "unpacked" / f"{dist}-{version}"
    if (target / ".complete").exists():
        return target
    wheels = root / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    stem = dist.replace("-", "_")
    found = sorted(wheels.glob(f"{stem}-{version}-*.whl"))
    if not found:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
               "3.11", "--disable-pip-version-check", "-q", f"{dist}=={version}", "-d", str(wheels)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        found = sorted(wheels.glob(f"{stem}-{version}-*.whl"))
        if done.returncode != 0 or not found:
            pytest.skip(f"cannot download {dist}=={version} from PyPI: {done.stderr.strip()[-300:]}")
    target.mkdir(parents=True, exist_ok=True)
    with zipfile.ZipFile(found[0]) as wheel:
        wheel.extractall(target)
    (target / ".complete").write_text(found[0].name)
    return target


def engine_python() -> Path:
    """The vLLM CPU environment's interpreter; skips with the reason when it is not installed."""
    python = Path(install.cache_root()) / "vllm" / "venv" / "bin" / "python"
    if not python.exists():
        pytest.skip(f"the contract tests run the engines' parsers in the vLLM CPU environment ({python} missing): "
                    "run `bench engines install vllm`")  # fmt: skip
    return python


def vllm_site_packages() -> Path:
    found = sorted((Path(install.cache_root()) / "vllm" / "venv" / "lib").glob("python3*/site-packages"))
    if not found or not (found[0] / "vllm").is_dir():
        pytest.skip("the vLLM CPU environment has no vllm package: run `bench engines install vllm`")
    return found[0]


def sdist_member(dist: str, member: str) -> Path:
    """One file of the pinned source distribution of `dist` (deepspeed publishes no wheel), extracted once."""
    import tarfile

    version = PINS[dist]
    root = contracts_dir()
    target = root / "unpacked" / f"{dist}-{version}" / member
    if target.exists():
        return target
    wheels = root / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    archive = wheels / f"{dist}-{version}.tar.gz"
    if not archive.exists():
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary=:all:", "--disable-pip-version-check",
               "-q", f"{dist}=={version}", "-d", str(wheels)]  # fmt: skip
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=900, check=False)
        if done.returncode != 0 or not archive.exists():
            pytest.skip(f"cannot download {dist}=={version} from PyPI: {done.stderr.strip()[-300:]}")
    with tarfile.open(archive) as tar:
        data = tar.extractfile(f"{dist}-{version}/{member}")
        assert data is not None, f"{member} not in {archive.name}"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data.read())
    return target


def probe(calls: list[tuple[str, list[Any]]], *dists: str) -> tuple[list[Any], list[str]]:
    """Run each (op, args) of tests/contract_probe.py in one process of the engine environment, with the unpacked
    wheels of `dists` first on sys.path. Returns (results, the modules it had to stub)."""
    python = engine_python()
    paths = [str(unpacked(d)) for d in dists]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop("VIRTUAL_ENV", None)
    done = subprocess.run(
        [str(python), str(PROBE)], input=json.dumps(calls), capture_output=True, text=True, env=env,
        timeout=300, check=False,
    )  # fmt: skip
    line = next((ln for ln in done.stdout.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise AssertionError(
            f"contract probe {[op for op, _ in calls]} failed (exit {done.returncode}):\n{done.stderr[-3000:]}"
        )
    out = json.loads(line[len("RESULT ") :])
    return out["results"], out["stubbed"]
