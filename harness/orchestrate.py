"""One `bench run`: get each engine (launch or attach), build the workload's requests with the served model's
tokenizer, run every load point, keep every record as it ends, then summarize and judge.

Data flows one way: workload spec -> request specs -> records.jsonl -> summary.json. An engine that cannot run here
is skipped with its reason; an engine that dies mid-run ends its points with every finished record kept, the
unfinished ones marked with the reason (and the engine's log tail), and the run's exit code says so.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime as dt
import time
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from adapters import registry
from adapters.base import Adapter, EngineConfig
from adapters.process import Endpoint, attached, launched
from harness.client import Target
from harness.errors import ConfigError, EndpointError, EngineError, EngineUnavailable
from harness.records import RequestRecord
from harness.rundir import ClockAnchor, RunDir
from harness.runner import PointOutcome, StopRule, run_point
from harness.slo import Slo
from harness.summary import Summary, rebuild_summary
from harness.telemetry import EngineTelemetry
from workloads.arrival import LoadPoint
from workloads.registry import Workload, load_workload
from workloads.spec import RequestSpec
from workloads.tokenizer import EngineTokenizer, LocalTokenizer, SimpleTokenizer, Tokenizer

__all__ = ["EngineChoice", "EngineOutcome", "RunConfig", "RunResult", "execute", "parse_engines"]

Progress = Callable[[str], None]
EXIT_OK, EXIT_ENGINE_FAILED, EXIT_NOTHING_RAN = 0, 3, 4


@dataclass(frozen=True)
class EngineChoice:
    """An engine of the run: `url` None means launch it here, else attach to the server at `url`."""

    name: str
    adapter: str
    url: str | None = None
    config: EngineConfig | None = None


@dataclass(frozen=True)
class RunConfig:
    engines: tuple[EngineChoice, ...]
    workload: str
    points: tuple[LoadPoint, ...]
    stop: StopRule
    out: Path
    seed: int = 0
    slo: Slo = field(default_factory=Slo)
    overrides: Mapping[str, Any] = field(default_factory=dict)
    stream: bool = True
    ready_timeout_s: float = 600.0
    api_key: str | None = None
    command: tuple[str, ...] = ()
    resume: bool = False
    # --repeat N: run each load point N times back to back (see `_repeat_specs`); records carry tags["repeat"]
    repeat: int = 1


@dataclass
class EngineOutcome:
    name: str
    status: Literal["ran", "skipped", "failed"]
    reason: str = ""
    points: list[PointOutcome] = field(default_factory=list)


@dataclass
class RunResult:
    run_dir: Path
    summary: Summary | None
    engines: list[EngineOutcome]

    @property
    def exit_code(self) -> int:
        if any(e.status == "failed" for e in self.engines):
            return EXIT_ENGINE_FAILED
        if not any(e.status == "ran" for e in self.engines):
            return EXIT_NOTHING_RAN
        return EXIT_OK


def parse_engines(engines: str | None, endpoints: Sequence[str]) -> tuple[EngineChoice, ...]:
    """`--engines vllm,llamacpp` and repeatable `--endpoint [NAME=]URL` -> engine choices (names unique)."""
    known = registry.adapters()
    choices: list[EngineChoice] = []
    for raw in (engines or "").split(","):
        name = raw.strip()
        if not name:
            continue
        if name not in known:
            raise ConfigError(
                f"unknown engine {name!r}; known: {', '.join(sorted(known))} (see `bench engines`)"
            )
        choices.append(EngineChoice(name, name))
    for raw in endpoints:
        name, eq, url = raw.partition("=")
        if not eq:
            name, url = "endpoint", raw
        name, url = name.strip(), url.strip().rstrip("/")
        if not url.startswith(("http://", "https://")):
            raise ConfigError(
                f"--endpoint {raw!r}: the URL must start with http:// or https:// (NAME=http://HOST:PORT)"
            )
        adapter = name if name in known else _generic_adapter(known)
        choices.append(EngineChoice(name, adapter, url))
    if not choices:
        raise ConfigError("nothing to benchmark: give --engines (e.g. vllm,llamacpp) or --endpoint NAME=URL")
    names = [c.name for c in choices]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(
            f"engine name {dupes[0]!r} given twice; name endpoints apart: --endpoint a=URL --endpoint b=URL"
        )
    return tuple(choices)


def _generic_adapter(known: Mapping[str, Adapter]) -> str:
    # An endpoint of unknown make speaks plain OpenAI: the vLLM codec is the reference OpenAI-compatible one.
    return "vllm" if "vllm" in known else next(iter(known))


# ------------------------------------------------------------------------------------------------- tokenizers

_TOKENIZE_DIALECTS = {"vllm": "vllm", "llamacpp": "llamacpp", "scripted": "vllm"}


def tokenizer_for(adapter: Adapter, endpoint: Endpoint) -> Tokenizer:
    """The served model's own tokenizer: the engine's tokenize endpoint where it has one, else the model's
    tokenizer.json on disk, else (flagged in the manifest) a model-free stand-in."""
    dialect = _TOKENIZE_DIALECTS.get(adapter.info.name)
    if dialect and adapter.info.tokenize_path:
        return EngineTokenizer(endpoint.base_url, dialect, model=endpoint.model)  # type: ignore[arg-type]
    cfg = endpoint.config
    if cfg and Path(cfg.model, "tokenizer.json").exists():
        return LocalTokenizer(cfg.model)
    return SimpleTokenizer()


class _Specs:
    """The point's request specs, generated before the point starts (prompt building talks to the tokenizer and
    must not steal time from the run). Should a duration-bound point use them all, more are generated in growing
    blocks (generation is prefix-stable) rather than repeating a prompt, which would hit the prefix cache."""

    def __init__(self, workload: Workload, seed: int, tokenizer: Tokenizer, first: int) -> None:
        self.workload, self.seed, self.tokenizer = workload, seed, tokenizer
        self.ready = workload.generate(max(1, first), seed, tokenizer=tokenizer)
        self.topped_up = 0

    def __iter__(self) -> Iterator[RequestSpec]:
        specs = self.ready
        made = 0
        while len(specs) > made:
            yield from specs[made:]
            made = len(specs)
            specs = self.workload.generate(made * 2, self.seed, tokenizer=self.tokenizer)
            self.topped_up += len(specs) - made


def _wanted(stop: StopRule, point: LoadPoint) -> int:
    if stop.requests is not None:
        return stop.warmup + stop.requests + stop.cooldown
    assert stop.duration_s is not None
    rough = point.value * stop.duration_s if not point.closed_loop else point.value * 8
    return int(stop.warmup + stop.cooldown + rough)


# ------------------------------------------------------------------------------------------------- the run


@contextlib.asynccontextmanager
async def _engine(
    choice: EngineChoice, run: RunDir, cfg: RunConfig
) -> AsyncIterator[tuple[Adapter, Endpoint]]:
    if choice.url is not None:
        adapter = registry.get(choice.adapter)
        async with attached(adapter, choice.url, name=choice.name) as ep:
            yield adapter, ep
        return
    adapter = registry.require_runnable(choice.adapter)
    engine_cfg = choice.config or registry.default_config(choice.adapter)
    (run.path / "engines").mkdir(exist_ok=True)
    async with launched(
        adapter,
        engine_cfg,
        run.path / "engines" / f"{choice.name}.log",
        cfg.ready_timeout_s,
        name=choice.name,
    ) as ep:
        yield adapter, ep


async def _run_engine(
    choice: EngineChoice,
    workload: Workload,
    cfg: RunConfig,
    run: RunDir,
    anchor: ClockAnchor,
    progress: Progress,
) -> EngineOutcome:
    outcome = EngineOutcome(choice.name, "ran")
    progress(f"{choice.name}: {'attaching to ' + choice.url if choice.url else 'launching'}")
    try:
        async with _engine(choice, run, cfg) as (adapter, ep):
            entry = ep.manifest_entry(choice.adapter)
            run.append_event({"kind": "engine_ready", "engine": choice.name, **entry})
            _add_engine_to_manifest(run, entry)
            cold = f" (cold start {ep.cold_start_s:.1f} s)" if ep.cold_start_s is not None else ""
            progress(f"{choice.name}: ready at {ep.base_url}, model {ep.model}, version {ep.version}{cold}")
            tokenizer = tokenizer_for(adapter, ep)
            # telemetry (docs/telemetry.md): GPU, process tree and /metrics sampled around every load point
            telemetry = EngineTelemetry.for_endpoint(run, choice.name, ep, adapter, anchor.perf)
            headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
            target = Target(choice.name, ep.base_url, adapter, ep.model, headers, cfg.stream)
            for point in cfg.points:
                for repeat in range(1, cfg.repeat + 1):
                    if not ep.alive():
                        break
                    outcome.points.append(
                        await _run_point(
                            target,
                            ep,
                            workload,
                            tokenizer,
                            point,
                            cfg,
                            run,
                            anchor,
                            progress,
                            repeat,
                            telemetry,
                        )
                    )
            if not ep.alive():
                reason = ep.death_reason() or "the engine process exited"
                outcome.status, outcome.reason = "failed", f"{reason}; its last log lines:\n{ep.log_tail()}"
                run.append_event({"kind": "engine_died", "engine": choice.name, "reason": outcome.reason})
    except EngineUnavailable as e:
        outcome.status, outcome.reason = "skipped", str(e)
        run.append_event({"kind": "engine_skipped", "engine": choice.name, "reason": str(e)})
    except (EngineError, EndpointError) as e:
        outcome.status, outcome.reason = "failed", str(e)
        run.append_event({"kind": "engine_failed", "engine": choice.name, "reason": str(e)})
    return outcome


async def _run_point(
    target: Target,
    ep: Endpoint,
    workload: Workload,
    tokenizer: Tokenizer,
    point: LoadPoint,
    cfg: RunConfig,
    run: RunDir,
    anchor: ClockAnchor,
    progress: Progress,
    repeat: int = 1,
    telemetry: EngineTelemetry | None = None,
) -> PointOutcome:
    wanted = _wanted(cfg.stop, point)
    progress(f"{target.engine} {point.id}: preparing {wanted} requests with tokenizer {tokenizer.name}")
    specs = _Specs(workload, cfg.seed, tokenizer, wanted)
    fingerprint = workload.fingerprint_for(cfg.seed)
    rep = _repeat_fields(cfg, repeat)
    run.append_event(
        {
            "kind": "point_start",
            "engine": target.engine,
            "point": point.id,
            "load": point.describe(),
            "workload_fingerprint": fingerprint,
            **rep,
        }
    )
    done = 0

    def sink(rec: RequestRecord) -> None:
        nonlocal done
        if rec.status != "ok" and not ep.alive():
            rec.error = f"{rec.error or rec.status}; engine died: {ep.death_reason() or 'process exited'}"
        if rep:
            rec.tags["repeat"] = str(repeat)
        run.append_record(rec)
        done += 1
        if done % 10 == 0:
            progress(f"{target.engine} {point.id}: {done} requests finished")

    progress(f"{target.engine} {point.id}: running")
    sampler = await telemetry.start_point(point.id, repeat if rep else None) if telemetry else None
    watch = asyncio.get_running_loop().create_task(_watch_engine(ep))
    try:
        task = asyncio.ensure_future(
            run_point(
                target, _repeat_specs(specs, repeat), point, cfg.stop, sink, anchor.perf, keep_text=True
            )
        )
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if watch.done() and not task.done():
            # the engine is gone: give in-flight requests a moment to fail on their own, then stop the point
            await asyncio.wait({task}, timeout=5.0)
            if not task.done():
                task.cancel()
        outcome = await task
    finally:
        watch.cancel()
        await asyncio.gather(watch, return_exceptions=True)
        if sampler is not None:
            await sampler.stop()
    run.append_event(
        {
            "kind": "point_end",
            "engine": target.engine,
            "point": point.id,
            **{k: v for k, v in outcome.to_dict().items() if k not in ("kind", "point")},
            "max_send_lag_s": outcome.max_send_lag,
            "engine_rss_bytes": ep.rss_bytes(),
            # requests built while the point ran (its pre-built ones ran out): that work competed with the client
            "specs_built_during_point": specs.topped_up,
            **rep,
        }
    )
    progress(f"{target.engine} {point.id}: done, {done} requests ({outcome.stop_reason})")
    return outcome


# -- `--repeat N` (used by `bench gate`) -----------------------------------------------------------------------
# Each load point runs N times back to back under the same point id, every repeat with the same prompts, so the
# summary pools them (more samples per point) and `bench gate` splits them again by `tags["repeat"]` (per-repeat
# throughput). Request ids of repeat r >= 2 get the suffix "#r<r>" (chat turns keep pointing at their own repeat's
# previous turn), so ids stay unique within the run. With N = 1 nothing changes: no tag, no event field, same ids.


def _repeat_fields(cfg: RunConfig, repeat: int) -> dict[str, int]:
    return {"repeat": repeat, "repeats": cfg.repeat} if cfg.repeat > 1 else {}


def _repeat_specs(specs: _Specs, repeat: int) -> Iterable[RequestSpec]:
    if repeat == 1:
        return specs

    def renamed() -> Iterator[RequestSpec]:
        for s in specs:
            hist = f"{s.history_from}#r{repeat}" if s.history_from else None
            yield dataclasses.replace(s, request_id=f"{s.request_id}#r{repeat}", history_from=hist)

    return renamed()


async def _watch_engine(ep: Endpoint) -> None:
    while ep.alive():
        await asyncio.sleep(0.25)


def _add_engine_to_manifest(run: RunDir, entry: Mapping[str, Any]) -> None:
    manifest = run.load_manifest()
    engines = [e for e in manifest.engines if e.get("name") != entry.get("name")] + [dict(entry)]
    run.write_manifest(manifest.model_copy(update={"engines": engines}))


def _load_block(cfg: RunConfig) -> dict[str, Any]:
    first = cfg.points[0]
    return {
        "kind": first.kind,
        "arrival": first.arrival,
        "values": [p.value for p in cfg.points],
        "points": [p.id for p in cfg.points],
        "warmup": cfg.stop.warmup,
        "cooldown": cfg.stop.cooldown,
        "requests": cfg.stop.requests,
        "duration": cfg.stop.duration_s,
        "error_budget": cfg.stop.error_budget,
        "seed": cfg.seed,
        "stream": cfg.stream,
        "repeat": cfg.repeat,
    }


def default_out(workload: str) -> Path:
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{Path(workload).stem}"


async def execute_async(cfg: RunConfig, progress: Progress) -> RunResult:
    if not cfg.points:
        raise ConfigError("no load points: give --concurrency or --rate")
    if cfg.repeat < 1:
        raise ConfigError(f"--repeat {cfg.repeat}: give a whole number >= 1 (times to run each load point)")
    workload = load_workload(cfg.workload)
    if cfg.overrides:
        workload = workload.with_overrides(cfg.overrides)
    run = RunDir.create(cfg.out, resume=cfg.resume)
    anchor = ClockAnchor.now()
    run.start(
        run_id=run.path.name,
        command=list(cfg.command),
        anchor=anchor,
        workload={
            "name": workload.name,
            "kind": workload.kind,
            "version": workload.version,
            "source": workload.source,
            "fingerprint": workload.fingerprint_for(cfg.seed),
            "seed": cfg.seed,
            "params": workload.params.model_dump(mode="json"),
        },
        load=_load_block(cfg),
        slo=cfg.slo.to_dict(),
        settings={
            "requested": {"engines": [dataclasses.asdict(e) for e in cfg.engines]},
            "effective": {"stream": cfg.stream, "ready_timeout_s": cfg.ready_timeout_s},
        },
    )
    progress(f"run directory: {run.path}")
    outcomes: list[EngineOutcome] = []
    status: Literal["complete", "failed", "interrupted"] = "complete"
    try:
        for choice in cfg.engines:
            outcome = await _run_engine(choice, workload, cfg, run, anchor, progress)
            outcomes.append(outcome)
            if outcome.status != "ran":
                progress(f"{choice.name}: {outcome.status}: {outcome.reason.splitlines()[0]}")
    except (asyncio.CancelledError, KeyboardInterrupt):
        status = "interrupted"
        raise
    except BaseException:
        status = "failed"
        raise
    finally:
        if status == "complete" and any(o.status == "failed" for o in outcomes):
            status = "failed"
        summary = rebuild_summary(run.path) if (run.path / "records.jsonl").exists() else None
        run.finish(
            status,
            engine_outcomes=[{"name": o.name, "status": o.status, "reason": o.reason} for o in outcomes],
        )
        run.close()
    return RunResult(run.path, summary, outcomes)


def execute(cfg: RunConfig, progress: Progress) -> RunResult:
    """Run the benchmark. Records are on disk as each request ends, so an interrupted run keeps them."""
    started = time.perf_counter()
    try:
        return asyncio.run(execute_async(cfg, progress))
    finally:
        progress(f"took {time.perf_counter() - started:.0f} s")
