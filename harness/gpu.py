"""GPU readings through NVML (the `pynvml` module of PyPI `nvidia-ml-py`): memory used/total, utilization, power,
the energy counter, and the compute processes on each GPU with their memory.

The library is injected: `Nvml.open(lib)` takes any module (or object) with the pynvml functions used here, so tests
pass a stand-in with scripted readings and no GPU; `lib=None` imports the real `pynvml`. No GPU, no driver or no
`pynvml` is not an error: `open_nvml` returns the reason instead, for the caller to record once.

Functions used: nvmlInit, nvmlShutdown, nvmlDeviceGetCount, nvmlDeviceGetHandleByIndex, nvmlDeviceGetName,
nvmlDeviceGetMemoryInfo, nvmlDeviceGetUtilizationRates, nvmlDeviceGetPowerUsage (milliwatts),
nvmlDeviceGetTotalEnergyConsumption (millijoules since the driver loaded; Volta and newer),
nvmlDeviceGetComputeRunningProcesses (objects with `pid` and `usedGpuMemory` in bytes, None where NVML cannot say:
nvidia-ml-py 13.615 maps NVML_VALUE_NOT_AVAILABLE to None), and the NVMLError exception. The pids NVML gives are the
host's: inside a container with its own PID namespace they match no local process, which the caller must detect.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

__all__ = ["GpuProcess", "GpuReading", "GpuUnavailable", "Nvml", "gpu_models", "open_nvml"]


class GpuUnavailable(Exception):
    """NVML cannot be used here; the message says why (no pynvml, no driver, no GPU)."""


@dataclass(frozen=True, slots=True)
class GpuProcess:
    """A compute process on a GPU: its pid (as NVML sees it) and the GPU memory it holds (None: NVML cannot say)."""

    pid: int
    used_bytes: int | None


@dataclass(frozen=True, slots=True)
class GpuReading:
    """One GPU at one instant. Fractions are 0..1; a field the GPU does not report is None."""

    index: int
    name: str
    memory_used_bytes: int
    memory_total_bytes: int
    util_gpu: float | None  # fraction of the last sample period a kernel ran
    util_memory: float | None  # fraction of it the memory was read or written
    power_w: float | None
    energy_mj: int | None = None  # NVML's energy counter: millijoules since the driver loaded
    processes: tuple[GpuProcess, ...] | None = None  # None: NVML does not list them on this GPU

    def to_dict(self, engine_pids: frozenset[int] | None = None) -> dict[str, Any]:
        """The line written per GPU. With `engine_pids` each process says whether it belongs to the engine."""
        out: dict[str, Any] = {
            "index": self.index,
            "name": self.name,
            "memory_used_bytes": self.memory_used_bytes,
            "memory_total_bytes": self.memory_total_bytes,
            "util_gpu": self.util_gpu,
            "util_memory": self.util_memory,
            "power_w": self.power_w,
            "energy_mj": self.energy_mj,
        }
        if self.processes is not None:
            out["processes"] = [
                {"pid": p.pid, "used_bytes": p.used_bytes}
                | ({"engine": p.pid in engine_pids} if engine_pids is not None else {})
                for p in self.processes
            ]
        return out


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class Nvml:
    """An initialised NVML with the handles of every GPU. `close` it (idempotent) to shut NVML down."""

    def __init__(self, lib: Any, handles: list[Any], names: list[str]) -> None:
        self._lib = lib
        self._handles = handles
        self.names = names
        self._open = True

    @classmethod
    def open(cls, lib: Any = None) -> Nvml:
        """Initialise NVML from `lib` (default: the real `pynvml`); raises GpuUnavailable with the reason."""
        if lib is None:
            try:
                import pynvml as lib  # type: ignore[no-redef]
            except ImportError:
                raise GpuUnavailable(
                    "pynvml is not installed (pip install nvidia-ml-py): no GPU telemetry"
                ) from None
        try:
            lib.nvmlInit()
        except lib.NVMLError as e:
            raise GpuUnavailable(f"NVML did not initialise ({e}): no NVIDIA driver or GPU here") from None
        try:
            count = int(lib.nvmlDeviceGetCount())
            if count == 0:
                raise GpuUnavailable("NVML found no GPU")
            handles = [lib.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
            names = [_text(lib.nvmlDeviceGetName(h)) for h in handles]
        except (lib.NVMLError, GpuUnavailable) as e:
            with contextlib.suppress(lib.NVMLError):
                lib.nvmlShutdown()
            if isinstance(e, GpuUnavailable):
                raise
            raise GpuUnavailable(f"NVML could not list the GPUs ({e})") from None
        return cls(lib, handles, names)

    @property
    def count(self) -> int:
        return len(self._handles)

    def read(self) -> list[GpuReading]:
        """Every GPU now. A field NVML refuses for one GPU (power on some boards) is None, not an error."""
        lib = self._lib
        out = []
        for i, h in enumerate(self._handles):
            mem = lib.nvmlDeviceGetMemoryInfo(h)
            util_gpu = util_mem = power = None
            energy: int | None = None
            procs: tuple[GpuProcess, ...] | None = None
            with contextlib.suppress(lib.NVMLError):
                rates = lib.nvmlDeviceGetUtilizationRates(h)
                util_gpu, util_mem = rates.gpu / 100.0, rates.memory / 100.0
            with contextlib.suppress(lib.NVMLError):
                power = lib.nvmlDeviceGetPowerUsage(h) / 1000.0  # milliwatts
            with contextlib.suppress(lib.NVMLError, AttributeError):  # AttributeError: a pynvml without it
                energy = int(lib.nvmlDeviceGetTotalEnergyConsumption(h))
            with contextlib.suppress(lib.NVMLError, AttributeError):
                procs = tuple(
                    GpuProcess(int(p.pid), None if p.usedGpuMemory is None else int(p.usedGpuMemory))
                    for p in lib.nvmlDeviceGetComputeRunningProcesses(h)
                )
            out.append(
                GpuReading(
                    i, self.names[i], int(mem.used), int(mem.total), util_gpu, util_mem, power, energy, procs
                )
            )
        return out

    def close(self) -> None:
        if self._open:
            self._open = False
            with contextlib.suppress(self._lib.NVMLError):
                self._lib.nvmlShutdown()


def gpu_models(lib: Any = None) -> list[dict[str, Any]]:
    """The GPUs NVML sees, for the manifest's `host.gpus`: index, model name and memory; [] where there are none,
    or no driver or pynvml (CPU hosts)."""
    nvml, _ = open_nvml(lib)
    if nvml is None:
        return []
    try:
        return [
            {"index": r.index, "name": r.name, "vendor": "nvidia", "memory_total_bytes": r.memory_total_bytes}
            for r in nvml.read()
        ]
    finally:
        nvml.close()


def open_nvml(lib: Any = None) -> tuple[Nvml | None, str | None]:
    """(NVML, None) where GPUs can be read, else (None, why not)."""
    try:
        return Nvml.open(lib), None
    except GpuUnavailable as e:
        return None, str(e)
