"""The run directory on disk: creating it, appending records and events as they happen, reading it back.

Layout and field meanings are in docs/run-directory.md. Guarantees:
- every JSON file and every JSONL line carries `schema_version`; readers refuse other versions (`SchemaError`);
- `append_record` / `append_event` hand each line to the kernel in one unbuffered `write` before returning, so a
  process killed (even SIGKILL) right after keeps every record already appended (not a power loss: no fsync);
- JSON files are written atomically (temporary file + rename), so a reader never sees half a manifest;
- a JSONL file cut off mid-line by a kill is read up to its last complete line, with a warning.
"""

from __future__ import annotations

import datetime as dt
import os
import platform
import socket
import subprocess
import time
import warnings
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from adapters.hostcpu import cpu_flags, isa_features
from harness.errors import BenchError, ConfigError, SchemaError
from harness.records import RECORD_SCHEMA_VERSION, RequestRecord

if TYPE_CHECKING:
    from harness.summary import Summary

__all__ = [
    "SCHEMA_VERSION",
    "ClockAnchor",
    "HostInfo",
    "Manifest",
    "RunDir",
    "RunStatus",
    "TruncatedLineWarning",
    "check_schema",
    "git_sha",
    "host_info",
]

SCHEMA_VERSION = 1
MANIFEST, RECORDS, EVENTS, SUMMARY = "manifest.json", "records.jsonl", "events.jsonl", "summary.json"
RunStatus = Literal["running", "complete", "failed", "interrupted"]


class TruncatedLineWarning(UserWarning):
    """A JSONL file ended in a partial line (the writer was killed mid-write); that line was skipped."""


def check_schema(obj: Any, where: str, expected: int = SCHEMA_VERSION) -> None:
    """Refuse anything not written with this EngineBench's schema_version, saying where and what to do."""
    version = obj.get("schema_version") if isinstance(obj, dict) else None
    if version == expected:
        return
    if version is None:
        raise SchemaError(f"{where} has no schema_version; it was not written by EngineBench (or is damaged)")
    if isinstance(version, int) and version > expected:
        raise SchemaError(
            f"{where} was written by schema_version {version}; this EngineBench reads {expected}; "
            "upgrade EngineBench"
        )
    raise SchemaError(
        f"{where} was written by schema_version {version!r}; this EngineBench reads {expected}; "
        "read it with the EngineBench version that wrote it"
    )


class ClockAnchor(BaseModel):
    """One wall-clock reading paired with the monotonic clock, taken at the run's start (record times are offsets)."""

    model_config = ConfigDict(frozen=True)

    wall: float
    perf: float

    @classmethod
    def now(cls) -> ClockAnchor:
        return cls(wall=time.time(), perf=time.perf_counter())


class HostInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    hostname: str
    os: str
    python: str
    cpu_model: str | None
    cores: int | None
    memory_bytes: int | None
    event_loop: str | None = None  # the client's event loop (harness.loop), e.g. "uvloop 0.23.0"
    # the instruction-set features that change an engine's speed (adapters.hostcpu.ISA_FLAGS), e.g. avx2, avx512_bf16
    cpu_features: list[str] | None = None
    machine: str | None = None  # platform.machine(): x86_64, aarch64, ...
    # the GPUs NVML sees (harness.gpu.gpu_models): index, model name, vendor, memory; [] on a host without any
    gpus: list[dict[str, Any]] | None = None


class Manifest(BaseModel):
    """What was run, where and how. The blocks owned by other parts (engines, workload, load...) stay open dicts."""

    model_config = ConfigDict(extra="allow")

    schema_version: int = SCHEMA_VERSION
    kind: Literal["manifest"] = "manifest"
    run_id: str
    started_at: str
    clock_anchor: ClockAnchor
    finished_at: str | None = None
    status: RunStatus = "running"
    command: list[str] = Field(default_factory=list)
    harness_version: str | None = None
    git_sha: str | None = None
    host: HostInfo | None = None
    engines: list[dict[str, Any]] = Field(default_factory=list)
    workload: dict[str, Any] = Field(default_factory=dict)
    load: dict[str, Any] = Field(default_factory=dict)
    slo: dict[str, float] = Field(default_factory=dict)
    settings: dict[str, Any] = Field(default_factory=dict)


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith(("model name", "hardware", "cpu model")):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def host_info(gpu_lib: Any = None) -> HostInfo:
    """This host as the manifest records it; `gpu_lib` is an NVML module to read the GPUs with (default pynvml)."""
    import psutil

    from harness.gpu import gpu_models
    from harness.loop import loop_name

    return HostInfo(
        hostname=socket.gethostname(),
        os=platform.platform(),
        python=platform.python_version(),
        cpu_model=_cpu_model(),
        cores=os.cpu_count(),
        memory_bytes=int(psutil.virtual_memory().total),
        event_loop=loop_name(),
        cpu_features=isa_features(cpu_flags()),
        machine=platform.machine() or None,
        gpus=gpu_models(gpu_lib),
    )


def git_sha(path: Path | None = None) -> str | None:
    """The commit of the EngineBench checkout (None when not a git checkout or git is absent)."""
    where = path or Path(__file__).resolve().parent
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=where, capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    sha = out.stdout.strip()
    return sha if out.returncode == 0 and len(sha) == 40 else None


def _harness_version() -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("enginebench")
    except PackageNotFoundError:
        return None


def _now_iso() -> str:
    return dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


def _ends_with_partial_line(path: Path) -> bool:
    if not path.exists() or path.stat().st_size == 0:
        return False
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) != b"\n"


class RunDir:
    """One run directory. `create` it to write a run, `open` it to read one."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._fds: dict[str, int] = {}

    # -- writing -----------------------------------------------------------------------------------------------
    @classmethod
    def create(cls, path: Path | str, *, resume: bool = False) -> RunDir:
        """A new run directory (must not exist or be empty), or, with `resume`, an existing one to append to."""
        p = Path(path)
        if p.exists() and not p.is_dir():
            raise ConfigError(f"{p} exists and is not a directory; choose another --out")
        if p.exists() and any(p.iterdir()):
            if not resume:
                raise ConfigError(
                    f"run directory {p} is not empty; choose a new --out, or pass --resume to continue that run"
                )
            if not (p / MANIFEST).exists():
                raise ConfigError(f"cannot resume {p}: it has no {MANIFEST}, so it is not a run directory")
            rd = cls(p)
            rd.load_manifest()  # refuses another schema_version before anything is appended
            for name in (RECORDS, EVENTS):
                rd._drop_partial_line(p / name)
            return rd
        p.mkdir(parents=True, exist_ok=True)
        return cls(p)

    def _drop_partial_line(self, path: Path) -> None:
        # A kill mid-write leaves a partial last line; appending after it would corrupt the next line too.
        if not _ends_with_partial_line(path):
            return
        with open(path, "r+b") as f:
            end = f.seek(0, os.SEEK_END)
            pos = end
            while pos > 0:  # scan back for the last newline, a block at a time
                start = max(0, pos - 65536)
                f.seek(start)
                i = f.read(pos - start).rfind(b"\n")
                if i >= 0:
                    f.truncate(start + i + 1)
                    return
                pos = start
            f.truncate(0)

    def start(
        self,
        run_id: str,
        *,
        command: list[str] | None = None,
        anchor: ClockAnchor | None = None,
        **blocks: Any,
    ) -> Manifest:
        """Write the initial manifest (status "running") with host info and git sha; `blocks` fill the other fields."""
        manifest = Manifest(
            run_id=run_id,
            started_at=_now_iso(),
            clock_anchor=anchor or ClockAnchor.now(),
            command=list(command or []),
            harness_version=_harness_version(),
            git_sha=git_sha(),
            host=host_info(),
            **blocks,
        )
        self.write_manifest(manifest)
        return manifest

    def write_manifest(self, manifest: Manifest) -> None:
        _atomic_write(
            self.path / MANIFEST, orjson.dumps(manifest.model_dump(mode="json"), option=orjson.OPT_INDENT_2)
        )

    def finish(self, status: RunStatus, **updates: Any) -> Manifest:
        """Mark the run finished: status, finished_at, and any other manifest fields to update."""
        current = self.load_manifest().model_dump()
        manifest = Manifest.model_validate(
            {**current, "status": status, "finished_at": _now_iso(), **updates}
        )
        self.write_manifest(manifest)
        return manifest

    def _append(self, name: str, obj: Any) -> None:
        fd = self._fds.get(name)
        if fd is None:
            fd = os.open(self.path / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
            self._fds[name] = fd
        # One write(2) per line, O_APPEND: the line is in the kernel when we return, and concurrent appenders
        # (several client processes) do not interleave within a line.
        _write_all(fd, orjson.dumps(obj, option=orjson.OPT_SERIALIZE_NUMPY) + b"\n")

    def append_record(self, rec: RequestRecord | Mapping[str, Any]) -> None:
        if isinstance(rec, RequestRecord):
            # orjson serialises the dataclass natively (schema_version is a field): ~20x cheaper than asdict()
            self._append(RECORDS, rec)
        else:
            self._append(RECORDS, {"schema_version": RECORD_SCHEMA_VERSION, **rec})

    def append_event(self, event: Mapping[str, Any]) -> None:
        """Append one event; it must have a `kind`. `schema_version` and a wall-clock `at` are added if missing."""
        if "kind" not in event:
            raise ValueError("an event needs a 'kind'")
        d = {"schema_version": SCHEMA_VERSION, "at": _now_iso(), **event}
        self._append(EVENTS, d)

    def write_summary(self, summary: Summary | Mapping[str, Any]) -> None:
        data = summary if isinstance(summary, Mapping) else summary.model_dump(mode="json")
        _atomic_write(self.path / SUMMARY, orjson.dumps(data, option=orjson.OPT_INDENT_2))

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> RunDir:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- reading -----------------------------------------------------------------------------------------------
    @classmethod
    def open(cls, path: Path | str) -> RunDir:
        """An existing run directory to read; a clear error when `path` is not one."""
        p = Path(path)
        if not p.is_dir():
            raise BenchError(f"{p} is not a directory; pass a run directory written by `bench run`")
        if not (p / MANIFEST).exists() and not (p / RECORDS).exists():
            raise BenchError(
                f"{p} is not a run directory (no {MANIFEST} or {RECORDS}); pass a directory written by `bench run`"
            )
        return cls(p)

    def _load_json(self, name: str) -> dict[str, Any]:
        path = self.path / name
        try:
            obj = orjson.loads(path.read_bytes())
        except FileNotFoundError:
            raise BenchError(f"{path} is missing; is {self.path} a complete run directory?") from None
        except orjson.JSONDecodeError as e:
            raise SchemaError(f"{path} is not valid JSON ({e}); the file is damaged") from None
        check_schema(obj, str(path))
        return obj

    def load_manifest(self) -> Manifest:
        obj = self._load_json(MANIFEST)
        try:
            return Manifest.model_validate(obj)
        except ValueError as e:
            raise SchemaError(f"{self.path / MANIFEST} has the wrong shape: {_first_error(e)}") from None

    def has_manifest(self) -> bool:
        return (self.path / MANIFEST).exists()

    def load_summary(self) -> Summary:
        from harness.summary import Summary

        obj = self._load_json(SUMMARY)
        try:
            return Summary.model_validate(obj)
        except ValueError as e:
            raise SchemaError(f"{self.path / SUMMARY} has the wrong shape: {_first_error(e)}") from None

    def _iter_jsonl(self, name: str, expected: int = SCHEMA_VERSION) -> Iterator[tuple[int, dict[str, Any]]]:
        path = self.path / name
        if not path.exists():
            return
        with open(path, "rb") as f:
            for i, line in enumerate(f, start=1):
                if not line.strip():
                    continue
                complete = line.endswith(b"\n")  # only the last line can lack its newline: a write cut off
                try:
                    obj = orjson.loads(line)
                except orjson.JSONDecodeError:
                    obj = None
                if not isinstance(obj, dict):
                    if not complete:
                        warnings.warn(
                            f"{path}: skipped a truncated last line (line {i}, {len(line)} bytes): "
                            "the run was stopped while writing it",
                            TruncatedLineWarning,
                            stacklevel=3,
                        )
                        return
                    raise SchemaError(f"{path} line {i} is not a JSON object; the file is damaged")
                check_schema(obj, f"{path} line {i}", expected)
                yield i, obj

    def iter_records(self) -> Iterator[RequestRecord]:
        """Every complete record in order; a truncated last line is skipped with a TruncatedLineWarning."""
        for i, obj in self._iter_jsonl(RECORDS, RECORD_SCHEMA_VERSION):
            try:
                yield RequestRecord.from_dict(obj)
            except TypeError as e:
                raise SchemaError(f"{self.path / RECORDS} line {i} is not a request record: {e}") from None

    def iter_events(self) -> Iterator[dict[str, Any]]:
        for _, obj in self._iter_jsonl(EVENTS):
            yield obj


def _first_error(e: Exception) -> str:
    errors = getattr(e, "errors", None)
    if callable(errors):
        first = errors()[0]
        return f"{'.'.join(str(x) for x in first['loc'])}: {first['msg']}"
    return str(e)
