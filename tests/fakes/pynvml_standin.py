"""A stand-in for `pynvml` (nvidia-ml-py) with scripted GPUs, to test the NVML path where no GPU exists.

It implements exactly the pynvml functions `harness.gpu` calls, with pynvml's shapes (memory info with
`total`/`free`/`used` bytes, utilization rates in percent, power in milliwatts, `NVMLError` with a `value`), and is
passed to the sampler as its NVML library (dependency injection; the real `pynvml` is never touched).
Each `nvmlDeviceGetMemoryInfo` call on a device returns the next value of its `memory_used` script (the last one
repeats), so a test knows the exact peak and mean the sampler must report; `power_mw` and `energy_mj` may be scripts
the same way (each call of their function takes the next value). `processes` lists (pid, bytes) pairs as
`nvmlDeviceGetComputeRunningProcesses` returns them (bytes None: NVML_VALUE_NOT_AVAILABLE, which nvidia-ml-py turns
into None); None makes the call raise "Not Supported", as on boards that do not list processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace

__all__ = ["FakeGpu", "NVMLError", "StandInNvml"]

NVML_ERROR_UNINITIALIZED, NVML_ERROR_NOT_SUPPORTED, NVML_ERROR_LIBRARY_NOT_FOUND = 1, 3, 12


class NVMLError(Exception):
    def __init__(self, value: int) -> None:
        super().__init__(value)
        self.value = value

    def __str__(self) -> str:
        names = {1: "Uninitialized", 3: "Not Supported", 12: "NVML Shared Library Not Found"}
        return names.get(self.value, f"NVML error {self.value}")


@dataclass
class FakeGpu:
    name: str = "NVIDIA Stand-in 80GB"
    total: int = 80 * 2**30
    memory_used: Sequence[int] = (2**30,)
    util_gpu: int = 50  # percent
    util_memory: int = 20
    power_mw: int | Sequence[int] | None = (
        250_000  # None: not supported (raises NVMLError, as some boards do)
    )
    energy_mj: Sequence[int] | None = None  # the energy counter's script; None: not supported (pre-Volta)
    processes: Sequence[tuple[int, int | None]] | None = ()
    calls: int = field(default=0, init=False)
    power_calls: int = field(default=0, init=False)
    energy_calls: int = field(default=0, init=False)


class StandInNvml:
    """`StandInNvml(gpus=[FakeGpu(...)])`, or `init_error=12` to behave like a host without the NVIDIA driver."""

    NVMLError = NVMLError

    def __init__(self, gpus: Sequence[FakeGpu] = (), init_error: int | None = None) -> None:
        self.gpus = list(gpus)
        self.init_error = init_error
        self.initialised = 0  # nvmlInit calls minus nvmlShutdown calls
        self.shutdowns = 0

    def _check(self) -> None:
        if self.initialised <= 0:
            raise NVMLError(NVML_ERROR_UNINITIALIZED)

    def nvmlInit(self) -> None:
        if self.init_error is not None:
            raise NVMLError(self.init_error)
        self.initialised += 1

    def nvmlShutdown(self) -> None:
        self._check()
        self.initialised -= 1
        self.shutdowns += 1

    def nvmlDeviceGetCount(self) -> int:
        self._check()
        return len(self.gpus)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeGpu:
        self._check()
        return self.gpus[index]

    def nvmlDeviceGetName(self, handle: FakeGpu) -> str:
        self._check()
        return handle.name

    def nvmlDeviceGetMemoryInfo(self, handle: FakeGpu) -> SimpleNamespace:
        self._check()
        used = handle.memory_used[min(handle.calls, len(handle.memory_used) - 1)]
        handle.calls += 1
        return SimpleNamespace(total=handle.total, used=used, free=handle.total - used)

    def nvmlDeviceGetUtilizationRates(self, handle: FakeGpu) -> SimpleNamespace:
        self._check()
        return SimpleNamespace(gpu=handle.util_gpu, memory=handle.util_memory)

    def nvmlDeviceGetPowerUsage(self, handle: FakeGpu) -> int:
        self._check()
        if handle.power_mw is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        if isinstance(handle.power_mw, int):
            return handle.power_mw
        value = handle.power_mw[min(handle.power_calls, len(handle.power_mw) - 1)]
        handle.power_calls += 1
        return value

    def nvmlDeviceGetTotalEnergyConsumption(self, handle: FakeGpu) -> int:
        self._check()
        if handle.energy_mj is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        value = handle.energy_mj[min(handle.energy_calls, len(handle.energy_mj) - 1)]
        handle.energy_calls += 1
        return value

    def nvmlDeviceGetComputeRunningProcesses(self, handle: FakeGpu) -> list[SimpleNamespace]:
        self._check()
        if handle.processes is None:
            raise NVMLError(NVML_ERROR_NOT_SUPPORTED)
        return [SimpleNamespace(pid=pid, usedGpuMemory=used) for pid, used in handle.processes]
