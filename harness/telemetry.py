"""Telemetry on the run timeline: what the engine and its host did while each load point ran.

Owns the sampler, the `RUN_DIR/telemetry/<engine>.jsonl` time series (writing and reading) and the per-point
telemetry summary. Line shapes and definitions: docs/telemetry.md. Every line carries `schema_version`, `kind`,
`point` and `t` (seconds since the run's start on the records' clock: `perf_counter() - run start`).

- `EngineTelemetry` (one per engine of a run) holds the sources: NVML (injected library, `harness.gpu`), the
  engine's process tree (psutil: RSS summed across the tree, CPU in cores) and its Prometheus `/metrics` read
  through the adapter's `MetricMap`. A source that is not there (no GPU, an attached endpoint has no local process,
  no metrics path) is skipped and its reason written once (a `source_skipped` line and a `telemetry_skipped` event).
- `PointSampler` (`await EngineTelemetry.start_point(...)`, then `await sampler.stop()`, or `async with
  telemetry.point(...)`) scrapes `/metrics` whole at the point's start and end (exact counter and histogram deltas;
  the end scrape waits for the engine's counters to settle), and between them samples every `interval_s` in an
  asyncio task. Periodic scrapes keep only the gauge and counter lines before parsing (a vLLM scrape is ~60 kB of
  mostly histogram buckets, ~10 ms to parse whole here), so the sampler does not stall the client's event loop. The
  sampler times its own CPU (`thread_time` around its synchronous work) and writes it in the point's `sampler` line.
- `summarize_telemetry` turns one point's lines (and its records, for `harness.reconcile`) into `TelemetrySummary`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import math
import os
import re
import time
import warnings
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import orjson
from pydantic import BaseModel, ConfigDict, Field

from adapters.base import MetricMap, ScrapesElsewhere
from adapters.prometheus import Histogram, Value, delta, kind_of, scrape
from harness import metrics
from harness.gpu import Nvml, open_nvml
from harness.reconcile import ReconcilePolicy, Reconciliation, reconcile
from harness.rundir import SCHEMA_VERSION, TruncatedLineWarning, check_schema

if TYPE_CHECKING:
    import aiohttp
    import psutil

    from adapters.base import Adapter
    from adapters.process import Endpoint
    from harness.records import RequestRecord
    from harness.rundir import RunDir

__all__ = [
    "DEFAULT_INTERVAL_S",
    "TELEMETRY_DIR",
    "EngineTelemetry",
    "GpuEnergy",
    "GpuMemoryShare",
    "PointSampler",
    "TelemetrySummary",
    "decode_values",
    "encode_values",
    "energy_line",
    "gpu_energy",
    "gpu_memory_share",
    "point_delta",
    "point_windows",
    "read_telemetry",
    "summarize_telemetry",
    "telemetry_path",
]

TELEMETRY_DIR = "telemetry"
DEFAULT_INTERVAL_S = 0.5
TREE_REFRESH_S = 5.0  # how often the engine's process tree is walked again (new or exited members)
ProcessSource = Callable[[], "Sequence[psutil.Process]"]
EventSink = Callable[[Mapping[str, Any]], None]


def telemetry_path(run_path: Path, engine: str) -> Path:
    safe = re.sub(r"[^A-Za-z0-9._=-]", "_", engine) or "engine"
    return Path(run_path) / TELEMETRY_DIR / f"{safe}.jsonl"


# ----------------------------------------------------------------------------------------------- values on disk


def encode_values(values: Mapping[str, Value]) -> dict[str, Any]:
    """Canonical metrics -> JSON: numbers stay numbers, a histogram is {buckets: [[le, cumulative]], sum, count}
    with le null for +Inf (JSON has no infinity)."""
    out: dict[str, Any] = {}
    for name, v in values.items():
        if isinstance(v, Histogram):
            buckets = [[None if math.isinf(le) else le, c] for le, c in v.buckets]
            out[name] = {"buckets": buckets, "sum": v.sum, "count": v.count}
        else:
            out[name] = v
    return out


def decode_values(obj: Mapping[str, Any]) -> dict[str, Value]:
    out: dict[str, Value] = {}
    for name, v in obj.items():
        if isinstance(v, dict):
            buckets = tuple((math.inf if le is None else float(le), float(c)) for le, c in v["buckets"])
            out[name] = Histogram(buckets, float(v["sum"]), float(v["count"]))
        elif isinstance(v, int | float):
            out[name] = float(v)
    return out


class _Appender:
    """One JSONL file, one `write(2)` per line on an O_APPEND descriptor (as `RunDir` appends records)."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path = path
        self._fd: int | None = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, obj: Mapping[str, Any]) -> None:
        if self._fd is None:
            return
        data = orjson.dumps({"schema_version": SCHEMA_VERSION, **obj}, option=orjson.OPT_SERIALIZE_NUMPY)
        view = memoryview(data + b"\n")
        while view:
            view = view[os.write(self._fd, view) :]

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None


def _line_filter(metric_map: MetricMap) -> frozenset[str]:
    """Series names (as they appear in exposition lines) of the map's gauges and counters: periodic scrapes keep
    only these lines, so histogram buckets are not parsed every tick."""
    names: set[str] = set()
    for engine_name, canonical in metric_map.names.items():
        if kind_of(canonical) == "histogram":
            continue
        base = engine_name.removesuffix("_total")
        names |= {engine_name, base, f"{base}_total"}
    return frozenset(names)


def _select_lines(text: str, keep: frozenset[str]) -> str:
    out = []
    for line in text.splitlines():
        if line.startswith("#"):
            parts = line.split(None, 3)
            name = parts[2] if len(parts) > 2 else ""
        else:
            name = line.split("{", 1)[0].split(None, 1)[0] if line.strip() else ""
        if name in keep:
            out.append(line)
    return "\n".join(out) + "\n"


# ------------------------------------------------------------------------------------------------------ sources


@dataclass(frozen=True)
class _Sources:
    metrics_url: str | None
    metric_map: MetricMap | None
    processes: ProcessSource | None
    nvml_lib: Any
    use_gpu: bool


class EngineTelemetry:
    """The telemetry sources of one engine for a whole run. Each point opens (and closes) its own HTTP session and
    NVML handle; reasons a source is missing are noted once per engine."""

    def __init__(
        self,
        run_path: Path,
        engine: str,
        zero: float,
        *,
        metrics_url: str | None = None,
        metric_map: MetricMap | None = None,
        processes: ProcessSource | None = None,
        no_process_reason: str = "no local engine process to read",
        no_metrics_reason: str = "the engine exposes no Prometheus metrics",
        nvml_lib: Any = None,
        gpu: bool = True,
        interval_s: float = DEFAULT_INTERVAL_S,
        settle_s: float = 3.0,
        on_event: EventSink | None = None,
    ) -> None:
        if interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        self.engine, self.zero, self.interval_s, self.settle_s = engine, zero, interval_s, settle_s
        self.path = telemetry_path(run_path, engine)
        self._sources = _Sources(metrics_url, metric_map, processes, nvml_lib, gpu)
        self._on_event = on_event
        self._noted: set[str] = set()
        self._pending: list[tuple[str, str]] = []
        if processes is None:
            self._pending.append(("process", no_process_reason))
        if metrics_url is None or metric_map is None:
            self._pending.append(("engine_metrics", no_metrics_reason))
        if not gpu:
            self._pending.append(("gpu", "GPU telemetry turned off"))

    @classmethod
    def for_endpoint(
        cls, run: RunDir, engine: str, ep: Endpoint, adapter: Adapter, zero: float, **kw: Any
    ) -> EngineTelemetry:
        """Sources from an endpoint: its process tree when launched here, `/metrics` when the adapter names one."""
        proc = ep.process
        path = adapter.info.metrics_path
        url = f"{ep.base_url.rstrip('/')}{path}" if path else None
        if url is None and isinstance(adapter, ScrapesElsewhere) and ep.config is not None:
            url = adapter.metrics_url(
                ep.config, ep.base_url
            )  # Ray Serve LLM: Ray's exporter has its own port
        return cls(
            run.path,
            engine,
            zero,
            metrics_url=url,
            metric_map=adapter.metrics if url else None,
            processes=proc.tree if proc is not None else None,
            no_process_reason=f"{engine} is an attached endpoint ({ep.base_url}): no local process tree to read",
            no_metrics_reason=f"the {adapter.info.name} adapter names no metrics path",
            on_event=run.append_event,
            **kw,
        )

    def note_skipped(self, out: _Appender, source: str, reason: str, point: str, t: float) -> None:
        if source in self._noted:
            return
        self._noted.add(source)
        out.append({"kind": "source_skipped", "source": source, "reason": reason, "point": point, "t": t})
        if self._on_event is not None:
            self._on_event(
                {"kind": "telemetry_skipped", "engine": self.engine, "source": source, "reason": reason}
            )

    async def start_point(self, point: str, repeat: int | None = None) -> PointSampler:
        """Scrape the engine at the point's start and begin sampling; `stop()` the result when the point ends."""
        sampler = PointSampler(self, point, repeat)
        await sampler.start()
        return sampler

    @contextlib.asynccontextmanager
    async def point(self, point: str, repeat: int | None = None) -> AsyncIterator[PointSampler]:
        sampler = await self.start_point(point, repeat)
        try:
            yield sampler
        finally:
            await sampler.stop()


class PointSampler:
    """Samples one load point (see the module docstring). Never raises into the run: a failing source is noted."""

    def __init__(self, owner: EngineTelemetry, point: str, repeat: int | None) -> None:
        self.owner, self.point = owner, point
        self._tags: dict[str, Any] = {"point": point} | ({"repeat": repeat} if repeat is not None else {})
        self._out = _Appender(owner.path)
        self._task: asyncio.Task[None] | None = None
        self._session: aiohttp.ClientSession | None = None
        self._nvml: Nvml | None = None
        self._cpu_seen: dict[int, float] = {}
        self._procs: list[psutil.Process] = []
        self._tree_at = -math.inf
        self._cpu_at: float | None = None
        self._keep = _line_filter(owner._sources.metric_map) if owner._sources.metric_map else frozenset()
        self.ticks = 0
        self.cpu_s = 0.0  # CPU this sampler spent in its own synchronous work
        self._started = 0.0
        self._stopped = False

    def _t(self) -> float:
        return time.perf_counter() - self.owner.zero

    def _skip(self, source: str, reason: str) -> None:
        self.owner.note_skipped(self._out, source, reason, self.point, self._t())

    async def start(self) -> None:
        import aiohttp

        src = self.owner._sources
        for source, reason in self.owner._pending:
            self._skip(source, reason)
        c0 = time.thread_time()
        if src.use_gpu:
            self._nvml, why = open_nvml(src.nvml_lib)
            if why is not None:
                self._skip("gpu", why)
        self.cpu_s += time.thread_time() - c0
        if src.metrics_url is not None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5.0))
        self._started = time.perf_counter()
        # telemetry must never end the run (e.g. an exposition text that does not parse): failures are noted
        try:
            await self._scrape_whole("start")
        except Exception as e:
            self._skip("sampler", f"the start scrape failed: {type(e).__name__}: {e}")
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        if self._stopped:
            return
        self._stopped = True
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
        try:
            # one last sample as the point ends: the power integral then spans the whole point, not up to the
            # last tick (up to interval_s short)
            try:
                await self._tick()
            except Exception as e:
                self._skip("sampler", f"telemetry sampling failed: {type(e).__name__}: {e}")
            try:
                await self._settled_end()
            except Exception as e:
                self._skip("sampler", f"the end scrape failed: {type(e).__name__}: {e}")
            wall = time.perf_counter() - self._started
            self._out.append(
                {
                    "kind": "sampler",
                    **self._tags,
                    "t": self._t(),
                    "interval_s": self.owner.interval_s,
                    "ticks": self.ticks,
                    "cpu_s": self.cpu_s,
                    "wall_s": wall,
                    "overhead": self.cpu_s / wall if wall > 0 else None,
                }
            )
        finally:
            if self._session is not None:
                await self._session.close()
            if self._nvml is not None:
                self._nvml.close()
            self._out.close()

    # -- the loop ----------------------------------------------------------------------------------------------
    async def _loop(self) -> None:
        interval = self.owner.interval_s
        next_at = time.perf_counter()
        while True:
            try:
                await self._tick()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # a sampler must never end the run
                self._skip("sampler", f"telemetry sampling failed: {type(e).__name__}: {e}")
            next_at += interval
            now = time.perf_counter()
            if next_at < now:  # fell behind (a slow scrape): skip the missed ticks, do not burst
                next_at = now + interval - (now - next_at) % interval
            await asyncio.sleep(next_at - now)

    async def _tick(self) -> None:
        text = await self._fetch() if self._session is not None else None
        c0 = time.thread_time()
        line: dict[str, Any] = {"kind": "sample", **self._tags, "t": self._t()}
        proc = self._process()
        if self._nvml is not None:
            # each GPU process is marked as the engine's or not (pids of the tree walked by _process)
            pids = frozenset(p.pid for p in self._procs) if self.owner._sources.processes else None
            try:
                line["gpus"] = [g.to_dict(pids) for g in self._nvml.read()]
            except Exception as e:
                self._skip("gpu", f"reading the GPUs failed: {e}")
                self._nvml.close()
                self._nvml = None
        if proc is not None:
            line["process"] = proc
        if text is not None and self.owner._sources.metric_map is not None:
            values = scrape(_select_lines(text, self._keep), self.owner._sources.metric_map)
            line["engine"] = {k: v for k, v in values.items() if not isinstance(v, Histogram)}
        self._out.append(line)
        self.ticks += 1
        self.cpu_s += time.thread_time() - c0

    def _process(self) -> dict[str, Any] | None:
        source = self.owner._sources.processes
        if source is None:
            return None
        import psutil

        now = time.perf_counter()
        rss = 0
        cpu = 0.0
        seen: dict[int, float] = {}
        if now - self._tree_at >= TREE_REFRESH_S or not self._procs:
            # walking the tree scans every process of the host (~2 ms per member here): not every tick
            self._procs, self._tree_at = list(source()), now
        procs = [p for p in self._procs if p.is_running()]
        for p in procs:
            with contextlib.suppress(psutil.Error):
                with p.oneshot():
                    rss += p.memory_info().rss
                    times = p.cpu_times()
                    used = times.user + times.system
                seen[p.pid] = used
                cpu += used - self._cpu_seen.get(p.pid, used)
        span = now - self._cpu_at if self._cpu_at is not None else None
        self._cpu_seen, self._cpu_at = seen, now
        if not procs:
            return {"rss_bytes": 0, "cpu_cores": None, "processes": 0}
        return {
            "rss_bytes": rss,
            "cpu_cores": cpu / span if span else None,
            "processes": len(procs),
        }

    async def _fetch(self) -> str | None:
        import aiohttp

        assert self._session is not None and self.owner._sources.metrics_url is not None
        try:
            async with self._session.get(self.owner._sources.metrics_url) as r:
                if r.status != 200:
                    self._skip("engine_metrics", f"GET {r.url} answered HTTP {r.status}")
                    return None
                return await r.text()
        except (aiohttp.ClientError, TimeoutError, OSError) as e:
            self._skip("engine_metrics", f"scraping {self.owner._sources.metrics_url} failed: {e!r}")
            return None

    async def _scrape_whole(self, at: str) -> None:
        """The point's start or end line: every mapped metric (histograms too), the tree's RSS and its PSS (which
        counts pages shared between the tree's processes once; too slow to read every tick)."""
        have_metrics = self._session is not None and self.owner._sources.metric_map is not None
        text = await self._fetch() if have_metrics else None
        c0 = time.thread_time()
        line: dict[str, Any] = {"kind": "scrape", "at": at, **self._tags, "t": self._t()}
        if text is not None and self.owner._sources.metric_map is not None:
            line["metrics"] = encode_values(scrape(text, self.owner._sources.metric_map))
        proc = self._process()
        if proc is not None:
            line["process"] = proc | {"pss_bytes": self._pss()}
        if "metrics" in line or "process" in line:
            self._out.append(line)
        self.cpu_s += time.thread_time() - c0

    def _pss(self) -> int | None:
        import psutil

        total = 0
        try:
            for p in self._procs:
                total += int(getattr(p.memory_full_info(), "pss", 0))
        except psutil.AccessDenied:
            return None
        except psutil.Error:
            pass  # a member exited: the others still count
        return total

    async def _settled_end(self) -> None:
        """The end scrape, once the engine's counters stop moving (they can lag the last response a little) and
        nothing is running, or after `settle_s`."""
        deadline = time.perf_counter() + self.owner.settle_s
        previous: dict[str, float] | None = None
        while self._session is not None and self.owner._sources.metric_map is not None:
            text = await self._fetch()
            if text is None:
                break
            values = scrape(_select_lines(text, self._keep), self.owner._sources.metric_map)
            counters = {
                k: float(v)
                for k, v in values.items()
                if kind_of(k) == "counter" and not isinstance(v, Histogram)
            }
            idle = not values.get("requests_running") and not values.get("requests_waiting")
            if (previous == counters and idle) or time.perf_counter() >= deadline:
                break
            previous = counters
            await asyncio.sleep(0.1)
        await self._scrape_whole("end")


# ------------------------------------------------------------------------------------------------------ reading


def read_telemetry(run_path: Path | str) -> dict[str, list[dict[str, Any]]]:
    """Engine name (file stem) -> its telemetry lines in order. A truncated last line is skipped with a warning;
    another schema_version is refused (SchemaError)."""
    root = Path(run_path) / TELEMETRY_DIR
    out: dict[str, list[dict[str, Any]]] = {}
    if not root.is_dir():
        return out
    for path in sorted(root.glob("*.jsonl")):
        out[path.stem] = list(_iter_lines(path))
    return out


def _iter_lines(path: Path) -> Iterator[dict[str, Any]]:
    from harness.errors import SchemaError

    with open(path, "rb") as f:
        for i, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError:
                obj = None
            if not isinstance(obj, dict):
                if not line.endswith(b"\n"):
                    warnings.warn(
                        f"{path}: skipped a truncated last line (line {i}): the run was stopped while writing it",
                        TruncatedLineWarning,
                        stacklevel=3,
                    )
                    return
                raise SchemaError(f"{path} line {i} is not a JSON object; the file is damaged")
            check_schema(obj, f"{path} line {i}")
            yield obj


# ------------------------------------------------------------------------------------------------------ summary


class TelemetrySummary(BaseModel):
    """One load point's telemetry (pooled over repeats). None where the source was missing; see `skipped`."""

    model_config = ConfigDict(frozen=True)

    samples: int
    interval_s: float | None = None
    skipped: dict[str, str] = Field(default_factory=dict)  # source -> reason
    gpu_count: int | None = None
    gpu_memory_total_bytes: int | None = None
    gpu_memory_peak_bytes: int | None = None  # summed over GPUs
    gpu_memory_mean_bytes: float | None = None
    gpu_util_mean: float | None = None  # fraction, mean over GPUs and samples
    gpu_power_mean_w: float | None = (
        None  # summed over GPUs; time-weighted (energy / window) where integrated
    )
    gpu_power_peak_w: float | None = None  # the highest sample, summed over GPUs
    # energy: NVML power integrated over the point (trapezoid per GPU between consecutive samples), see GpuEnergy
    gpu_energy_j: float | None = None  # summed over GPUs
    gpu_energy_by_gpu_j: list[float] = Field(default_factory=list)
    gpu_energy_window_s: float | None = None  # the time integrated over (first to last sample, repeats added)
    gpu_power_sample_interval_s: float | None = None  # mean spacing of the power samples actually taken
    gpu_energy_counter_j: float | None = (
        None  # NVML's own energy counter over the same window, as a cross-check
    )
    energy_per_output_token_j: float | None = None  # gpu_energy_j / output tokens of the successful requests
    energy_per_request_j: float | None = None  # gpu_energy_j / successful requests
    energy_output_tokens: int | None = None  # the divisors: successful requests sent in the window, and their
    energy_requests: int | None = (
        None  # output tokens (warm-up and cool-down too: the GPU drew power for them)
    )
    # GPU memory of the engine's own processes (nvmlDeviceGetComputeRunningProcesses) and of every other process
    gpu_memory_basis: str | None = None  # "process" (engine told apart) or "device" (totals only; see reason)
    gpu_memory_basis_reason: str | None = None
    gpu_memory_engine_peak_bytes: int | None = None
    gpu_memory_engine_mean_bytes: float | None = None
    gpu_memory_others_peak_bytes: int | None = None  # other tenants' compute processes, summed over GPUs
    engine_rss_peak_bytes: int | None = None  # summed over the engine's process tree
    engine_rss_mean_bytes: float | None = None
    engine_cpu_mean_cores: float | None = None
    engine_cpu_peak_cores: float | None = None
    engine_processes: int | None = None
    engine_pss_bytes: int | None = (
        None  # proportional set size of the tree (shared pages once), max of start/end
    )
    kv_cache_usage_peak: float | None = None
    kv_cache_usage_mean: float | None = None
    requests_running_peak: float | None = None
    requests_waiting_peak: float | None = None
    prefix_cache_hit_rate: float | None = None
    prefix_cache_hit_rate_basis: str | None = None
    preemptions: float | None = None
    engine_counters: dict[str, float] = Field(default_factory=dict)  # counter deltas over the point
    sampler_cpu_s: float | None = None
    sampler_overhead: float | None = None  # the sampler's CPU as a fraction of one core over the point
    reconciliation: Reconciliation | None = None


def _peak(values: Sequence[float]) -> float | None:
    return max(values) if values else None


def _avg(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def _add(total: dict[str, Value], more: Mapping[str, Value]) -> None:
    """Pool deltas of several repeats: counters and histograms add (buckets by bound)."""
    for name, v in more.items():
        have = total.get(name)
        if isinstance(v, Histogram) and isinstance(have, Histogram):
            mine = dict(have.buckets)
            buckets = tuple(sorted((le, mine.get(le, 0.0) + c) for le, c in v.buckets))
            total[name] = Histogram(buckets, have.sum + v.sum, have.count + v.count)
        elif isinstance(v, float) and isinstance(have, float) and kind_of(name) == "counter":
            total[name] = have + v
        else:
            total[name] = v


def point_windows(
    lines: Iterable[Mapping[str, Any]],
) -> tuple[dict[str, Value] | None, list[tuple[float, float]]]:
    """The engine's metric changes over a point (end scrape minus start scrape, summed over repeats) and the
    (start, end) run-clock times of the scrape pairs they cover. A start without an end (a killed run) is dropped."""
    starts: dict[Any, tuple[float, dict[str, Value]]] = {}
    total: dict[str, Value] | None = None
    windows: list[tuple[float, float]] = []
    for line in lines:
        if line.get("kind") != "scrape" or "metrics" not in line:
            continue
        key = line.get("repeat")
        values = decode_values(line.get("metrics") or {})
        if line.get("at") == "start":
            starts[key] = (float(line["t"]), values)
        elif line.get("at") == "end" and key in starts:
            t0, before = starts.pop(key)
            total = {} if total is None else total
            _add(total, delta(before, values))
            windows.append((t0, float(line["t"])))
    return total, windows


def point_delta(lines: Iterable[Mapping[str, Any]]) -> dict[str, Value] | None:
    """The engine's metric changes over a point: end scrape minus start scrape, summed over repeats."""
    return point_windows(lines)[0]


@dataclass(frozen=True)
class GpuEnergy:
    """NVML power integrated over a point's samples.

    Per GPU, the trapezoid rule between consecutive samples that both carry that GPU's power: Σ (Pᵢ + Pᵢ₊₁)/2 ·
    (tᵢ₊₁ − tᵢ). Samples of different repeats are separate segments (the gap between repeats is not integrated).
    `window_s` is the time from first to last sample, segments added; `interval_s` the mean spacing of the samples
    (the sampler's `interval_s` is the one asked for); `coverage` the smallest share of the window any GPU's
    readings span (below 1 when a GPU's power was missing at the window's edges). `counter_j` is NVML's energy
    counter (nvmlDeviceGetTotalEnergyConsumption) over the same samples where every GPU has one.
    """

    by_gpu_j: tuple[float, ...]
    window_s: float
    interval_s: float | None
    coverage: float
    peak_w: float | None
    counter_j: float | None
    windows: tuple[tuple[float, float], ...]

    @property
    def total_j(self) -> float:
        return sum(self.by_gpu_j)

    @property
    def mean_w(self) -> float | None:
        return self.total_j / self.window_s if self.window_s > 0 else None


def _segments(samples: Iterable[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    by_repeat: dict[Any, list[Mapping[str, Any]]] = {}
    for s in samples:
        if s.get("kind", "sample") == "sample" and s.get("gpus"):
            by_repeat.setdefault(s.get("repeat"), []).append(s)
    return [sorted(seg, key=lambda s: float(s["t"])) for seg in by_repeat.values()]


def gpu_energy(samples: Iterable[Mapping[str, Any]]) -> GpuEnergy | None:
    """The energy of a point's `sample` lines (see GpuEnergy); None when no GPU reported power in two samples."""
    segments = [seg for seg in _segments(samples) if len(seg) >= 2]
    if not segments:
        return None
    indexes = sorted({int(g["index"]) for seg in segments for s in seg for g in s["gpus"]})
    energy = dict.fromkeys(indexes, 0.0)
    covered = dict.fromkeys(indexes, 0.0)
    counter: dict[int, float] | None = dict.fromkeys(indexes, 0.0)
    window = 0.0
    gaps: list[float] = []
    peaks: list[float] = []
    for seg in segments:
        t = [float(s["t"]) for s in seg]
        window += t[-1] - t[0]
        gaps += [b - a for a, b in itertools.pairwise(t)]
        for s in seg:
            powers = [g.get("power_w") for g in s["gpus"]]
            if powers and all(p is not None for p in powers):
                peaks.append(float(sum(powers)))
        for i in indexes:
            readings = [
                (float(s["t"]), g)
                for s in seg
                for g in s["gpus"]
                if int(g["index"]) == i and g.get("power_w") is not None
            ]
            for (t0, g0), (t1, g1) in itertools.pairwise(readings):
                energy[i] += (float(g0["power_w"]) + float(g1["power_w"])) / 2.0 * (t1 - t0)
            if len(readings) >= 2:
                covered[i] += readings[-1][0] - readings[0][0]
            marks = [g["energy_mj"] for _, g in readings if g.get("energy_mj") is not None]
            if counter is not None and len(marks) == len(readings) and len(marks) >= 2:
                counter[i] += (float(marks[-1]) - float(marks[0])) / 1000.0
            else:
                counter = None
    if not any(covered.values()):
        return None
    return GpuEnergy(
        by_gpu_j=tuple(energy[i] for i in indexes),
        window_s=window,
        interval_s=sum(gaps) / len(gaps) if gaps else None,
        coverage=min(covered.values()) / window if window > 0 else 0.0,
        peak_w=max(peaks) if peaks else None,
        counter_j=sum(counter.values()) if counter is not None else None,
        windows=tuple((float(seg[0]["t"]), float(seg[-1]["t"])) for seg in segments),
    )


@dataclass(frozen=True)
class GpuMemoryShare:
    """GPU memory of the engine's processes against everyone's, from the per-GPU process lists of the samples."""

    basis: str  # "process" | "device"
    reason: str | None
    engine_peak_bytes: int | None
    engine_mean_bytes: float | None
    others_peak_bytes: int | None


def gpu_memory_share(samples: Iterable[Mapping[str, Any]]) -> GpuMemoryShare | None:
    """Per-process GPU memory where NVML listed the processes and some are the engine's; else the device totals,
    with the reason. None when no sample has a GPU."""
    with_gpus = [s for s in samples if s.get("kind", "sample") == "sample" and s.get("gpus")]
    if not with_gpus:
        return None

    def device(reason: str) -> GpuMemoryShare:
        return GpuMemoryShare("device", reason, None, None, None)

    listed = [s for s in with_gpus if all("processes" in g for g in s["gpus"])]
    if not listed and not any("energy_mj" in g for s in with_gpus for g in s["gpus"]):
        return device("recorded before EngineBench read GPU processes: device totals only")
    if not listed:
        return device("NVML does not list the compute processes on these GPUs: device totals only")
    procs = [p for s in listed for g in s["gpus"] for p in g["processes"]]
    if not any("engine" in p for p in procs):
        return device("no local engine process tree (an attached endpoint): device totals only")
    mine = [p for p in procs if p.get("engine")]
    if not mine:
        return device(
            f"NVML listed {len({p['pid'] for p in procs})} GPU processes, none in the engine's process tree "
            "(a container's own PID namespace shows other pids than the host's): device totals only"
        )
    if any(p.get("used_bytes") is None for p in mine):
        return device(
            "NVML cannot tell the engine's processes' GPU memory (not available): device totals only"
        )
    engine = [
        float(sum(p["used_bytes"] for g in s["gpus"] for p in g["processes"] if p.get("engine")))
        for s in listed
    ]
    others = [
        float(sum(p["used_bytes"] or 0 for g in s["gpus"] for p in g["processes"] if not p.get("engine")))
        for s in listed
    ]
    return GpuMemoryShare("process", None, int(max(engine)), sum(engine) / len(engine), int(max(others)))


def _energy_divisors(
    records: Iterable[RequestRecord], windows: Sequence[tuple[float, float]]
) -> tuple[int, int]:
    """(successful requests, their output tokens) among the requests scheduled inside the energy windows."""
    ok = [r for r in records if r.ok and any(a <= r.scheduled <= b for a, b in windows)]
    return len(ok), sum(metrics.output_tokens(r).value for r in ok)


def energy_line(engine: str, point: str, t: TelemetrySummary | None) -> str | None:
    """One line for `bench run`'s table footer: energy per token and request, mean and peak power (None: no GPU
    power was integrated)."""
    if t is None or t.gpu_energy_j is None:
        return None
    per_token = "–" if t.energy_per_output_token_j is None else f"{t.energy_per_output_token_j:.3g} J/token"
    per_req = "–" if t.energy_per_request_j is None else f"{t.energy_per_request_j:.3g} J/request"
    mean = "–" if t.gpu_power_mean_w is None else f"{t.gpu_power_mean_w:.0f} W"
    peak = "–" if t.gpu_power_peak_w is None else f"{t.gpu_power_peak_w:.0f} W"
    spacing = (
        ""
        if t.gpu_power_sample_interval_s is None
        else f", samples every {t.gpu_power_sample_interval_s:.2f} s"
    )
    return (
        f"{engine} {point} energy: {per_token}, {per_req}; power mean {mean}, peak {peak} "
        f"({t.gpu_energy_j:.0f} J over {t.gpu_energy_window_s or 0:.1f} s on {t.gpu_count or 0} GPU(s){spacing})"
    )


def summarize_telemetry(
    lines: Iterable[Mapping[str, Any]],
    point: str,
    records: Iterable[RequestRecord] = (),
    *,
    policy: ReconcilePolicy | None = None,
) -> TelemetrySummary | None:
    """One point's telemetry from its engine's telemetry lines (None when the point has none)."""
    every = list(lines)
    mine = [ln for ln in every if ln.get("point") == point]
    if not mine:
        return None
    skipped = {str(ln["source"]): str(ln["reason"]) for ln in every if ln.get("kind") == "source_skipped"}
    samples = [ln for ln in mine if ln.get("kind") == "sample"]
    gpu_mem: list[float] = []
    gpu_util: list[float] = []
    gpu_power: list[float] = []
    gpu_total: list[float] = []
    gpu_n: list[int] = []
    rss: list[float] = []
    cpu: list[float] = []
    nproc: list[float] = []
    kv: list[float] = []
    running: list[float] = []
    waiting: list[float] = []
    for s in samples:
        gpus = s.get("gpus")
        if gpus:
            gpu_n.append(len(gpus))
            gpu_mem.append(float(sum(g["memory_used_bytes"] for g in gpus)))
            gpu_total.append(float(sum(g["memory_total_bytes"] for g in gpus)))
            gpu_util += [g["util_gpu"] for g in gpus if g.get("util_gpu") is not None]
            if all(g.get("power_w") is not None for g in gpus):
                gpu_power.append(float(sum(g["power_w"] for g in gpus)))
        p = s.get("process")
        if p and p.get("processes"):
            rss.append(float(p["rss_bytes"]))
            nproc.append(float(p["processes"]))
            if p.get("cpu_cores") is not None:
                cpu.append(float(p["cpu_cores"]))
        e = s.get("engine") or {}
        for name, into in (
            ("kv_cache_usage", kv),
            ("requests_running", running),
            ("requests_waiting", waiting),
        ):
            if isinstance(e.get(name), int | float):
                into.append(float(e[name]))
    pss = [
        int(ln["process"]["pss_bytes"])
        for ln in mine
        if ln.get("kind") == "scrape" and (ln.get("process") or {}).get("pss_bytes") is not None
    ]
    d, windows = point_windows(mine)
    counters = {k: float(v) for k, v in (d or {}).items() if kind_of(k) == "counter" and isinstance(v, float)}
    hit_rate, basis = None, None
    if counters.get("prefix_cache_queries_total"):
        hit_rate = counters.get("prefix_cache_hits_total", 0.0) / counters["prefix_cache_queries_total"]
        basis = "prefix_cache_hits_total / prefix_cache_queries_total"
    elif counters.get("prompt_tokens_total") and "prompt_tokens_cached_total" in counters:
        hit_rate = counters["prompt_tokens_cached_total"] / counters["prompt_tokens_total"]
        basis = "prompt_tokens_cached_total / prompt_tokens_total"
    sampler = [ln for ln in mine if ln.get("kind") == "sampler"]
    cpu_s = sum(float(ln.get("cpu_s") or 0.0) for ln in sampler) if sampler else None
    wall = sum(float(ln.get("wall_s") or 0.0) for ln in sampler)
    # only requests sent between a start and an end scrape are in the engine's deltas (a resumed point's earlier
    # requests are not)
    all_recs = list(records)
    recs = [r for r in all_recs if any(a <= r.scheduled <= b for a, b in windows)]
    energy = gpu_energy(samples)
    share = gpu_memory_share(samples)
    n_req = n_tok = None
    if energy is not None:
        n_req, n_tok = _energy_divisors(all_recs, energy.windows)
    power_mean = energy.mean_w if energy is not None and energy.coverage >= 1.0 else _avg(gpu_power)
    return TelemetrySummary(
        samples=len(samples),
        interval_s=sampler[0].get("interval_s") if sampler else None,
        skipped=skipped,
        gpu_count=max(gpu_n) if gpu_n else None,
        gpu_memory_total_bytes=int(max(gpu_total)) if gpu_total else None,
        gpu_memory_peak_bytes=int(max(gpu_mem)) if gpu_mem else None,
        gpu_memory_mean_bytes=_avg(gpu_mem),
        gpu_util_mean=_avg(gpu_util),
        gpu_power_mean_w=power_mean,
        gpu_power_peak_w=_peak(gpu_power),
        gpu_energy_j=energy.total_j if energy else None,
        gpu_energy_by_gpu_j=list(energy.by_gpu_j) if energy else [],
        gpu_energy_window_s=energy.window_s if energy else None,
        gpu_power_sample_interval_s=energy.interval_s if energy else None,
        gpu_energy_counter_j=energy.counter_j if energy else None,
        energy_per_output_token_j=energy.total_j / n_tok if energy and n_tok else None,
        energy_per_request_j=energy.total_j / n_req if energy and n_req else None,
        energy_output_tokens=n_tok,
        energy_requests=n_req,
        gpu_memory_basis=share.basis if share else None,
        gpu_memory_basis_reason=share.reason if share else None,
        gpu_memory_engine_peak_bytes=share.engine_peak_bytes if share else None,
        gpu_memory_engine_mean_bytes=share.engine_mean_bytes if share else None,
        gpu_memory_others_peak_bytes=share.others_peak_bytes if share else None,
        engine_rss_peak_bytes=int(max(rss)) if rss else None,
        engine_rss_mean_bytes=_avg(rss),
        engine_cpu_mean_cores=_avg(cpu),
        engine_cpu_peak_cores=_peak(cpu),
        engine_processes=int(max(nproc)) if nproc else None,
        engine_pss_bytes=max(pss) if pss else None,
        kv_cache_usage_peak=_peak(kv),
        kv_cache_usage_mean=_avg(kv),
        requests_running_peak=_peak(running),
        requests_waiting_peak=_peak(waiting),
        prefix_cache_hit_rate=hit_rate,
        prefix_cache_hit_rate_basis=basis,
        preemptions=counters.get("preemptions_total"),
        engine_counters=counters,
        sampler_cpu_s=cpu_s,
        sampler_overhead=cpu_s / wall if cpu_s is not None and wall > 0 else None,
        reconciliation=reconcile(recs, d, policy) if d is not None and recs else None,
    )
