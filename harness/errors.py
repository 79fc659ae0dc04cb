"""The exception tree of EngineBench, drawn once.

    BenchError                 a user-facing problem: one clear line naming the problem and the fix
    ├── ConfigError            bad options, bad workload / policy / weights files
    ├── EndpointError          endpoint unreachable, or not OpenAI-compatible
    ├── EngineError            an engine failed to install, launch, become ready, or died
    │   └── EngineUnavailable  the engine cannot run here (no GPU, not installed): a skip, not a crash
    ├── SchemaError            a file with an unknown or missing schema_version, or the wrong shape
    ├── WorkerError            a distributed-load worker failed or did not answer (docs/distributed.md)
    └── CompareError           results that must not be compared (different fingerprints, nothing matching)

A failing *request* is never an exception that escapes a run: it is a `status` on its record.
The CLI catches BenchError, prints its message on one line and exits non-zero, without a traceback.
"""

from __future__ import annotations

__all__ = [
    "BenchError",
    "CompareError",
    "ConfigError",
    "EndpointError",
    "EngineError",
    "EngineUnavailable",
    "SchemaError",
    "WorkerError",
]


class BenchError(Exception):
    """A problem the user can act on. The message is one line: what is wrong, and what to do."""

    exit_code = 2


class ConfigError(BenchError):
    pass


class EndpointError(BenchError):
    pass


class EngineError(BenchError):
    pass


class EngineUnavailable(EngineError):
    pass


class SchemaError(BenchError):
    pass


class CompareError(BenchError):
    pass


class WorkerError(BenchError):
    pass
