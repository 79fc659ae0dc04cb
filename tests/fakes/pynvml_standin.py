"""A stand-in for `pynvml` (nvidia-ml-py) with scripted GPUs, to test the NVML path where no GPU exists.

It implements exactly the pynvml functions `harness.gpu` calls, with pynvml's shapes (memory info with
`total`/`free`/`used` bytes, utilization rates in percent, power in milliwatts, `NVMLError` with a `value`), and is
passed to the sampler as its NVML library (dependency injection; the real `pynvml` is never touched).
Each `nvmlDeviceGetMemoryInfo` call on a device returns the next value of its `memory_used` script (the last one
repeats), so a test knows the exact peak and mean the sampler must report.
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
    power_mw: int | None = 250_000  # None: not supported (raises NVMLError, as some boards do)
    calls: int = field(default=0, init=False)


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
        return handle.power_mw
