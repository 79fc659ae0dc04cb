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
import secrets
import time
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from adapters import registry
from adapters.base import Adapter, EngineConfig
from adapters.logwarnings import scan_log_file
from adapters.process import Endpoint, attached, launched
from harness import loop as event_loop
from harness.cache import block_tokens_from, reset_prefix_cache
from harness.client import Connection, Target
from harness.distributed import DistributedConfig, distributed_runner
from harness.errors import ConfigError, EndpointError, EngineError, EngineUnavailable, SchemaError
from harness.limits import ensure_open_files
from harness.progress import EngineWaiting, PointProgress, ProgressEvent
from harness.quality import ask_quality_prompts, variant_choices
from harness.records import RequestRecord
from harness.rundir import ClockAnchor, Manifest, RunDir
from harness.runner import PointOutcome, StopRule, run_point
from harness.slo import Slo
from harness.summary import Summary, rebuild_summary
from harness.supply import PromptSupply
from harness.telemetry import EngineTelemetry
from workloads.arrival import LoadPoint
from workloads.registry import Workload, load_workload
from workloads.spec import RequestSpec, continued
from workloads.tokenizer import (
    ChosenTokenizer,
    EngineTokenizer,
    LocalTokenizer,
    NoTokenizeRoute,
    SimpleTokenizer,
    Tokenizer,
)

__all__ = [
    "EngineChoice",
    "EngineOutcome",
    "ResumeState",
    "RunConfig",
    "RunResult",
    "execute",
    "parse_engines",
    "resume_config",
]

# plain message lines, and live progress as data (harness.progress: a point's requests, an engine's wait to be ready)
Progress = Callable[[ProgressEvent], None]
EXIT_OK, EXIT_ENGINE_FAILED, EXIT_NOTHING_RAN = 0, 3, 4
# a point stopped because its error budget was spent, or not one of its measured requests succeeded: the numbers
# are not a measurement of the engine, and a script must not take them for one (PITFALLS 8: exit 0 in a 500 storm)
EXIT_REQUESTS_FAILED = 5
# after an engine died, how long its in-flight requests get to fail on their own before the point is aborted
ENGINE_GONE_GRACE_S = 0.5


@dataclass(frozen=True)
class EngineChoice:
    """An engine of the run: `url` None means launch it here, else attach to the server at `url`."""

    name: str
    adapter: str
    url: str | None = None
    config: EngineConfig | None = None
    variant: str | None = None  # the quantized workload's precision variant this engine serves
    # the user's settings for a launched engine (`--engine-set NAME.FIELD=VALUE`), applied over its configuration
    settings: Mapping[str, Any] = field(default_factory=dict)


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
    # --resume (see "resume" below): re-send requests that failed or were cancelled; what earlier segments did
    resend_failed: bool = False
    prior: ResumeState | None = None
    # --distributed: each load point split across Locust workers (harness/distributed.py, docs/distributed.md)
    distributed: DistributedConfig | None = None
    # --engine-nice N: engines this run launches start N levels below the client's CPU priority (0: the same)
    engine_nice: int = 0
    # --tokenizer PATH: the served model's tokenizer (HF folder, tokenizer.json or GGUF) for every engine's prompts
    tokenizer: str | None = None
    # the words of the prompts (docs/workloads.md "Fresh prompts"): None, a new key per run (fresh for the engine);
    # `replay_of` names the run whose key this one replays (--replay-prompts RUN_DIR), and then a warm cache is
    # expected and not emptied
    prompt_key: str | None = None
    replay_of: str | None = None
    # --no-cache-reset: leave the engine's prefix cache as it is before each point (the warm-cache rule still judges)
    cache_reset: bool = True


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
        if any(_failed_point(p) for e in self.engines for p in e.points):
            return EXIT_REQUESTS_FAILED
        return EXIT_OK


def _failed_point(p: PointOutcome) -> bool:
    return p.stop_reason == "error_budget" or (p.counts.get("measure", 0) > 0 and p.counts.get("ok", 0) == 0)


def parse_engines(
    engines: str | None, endpoints: Sequence[str], engine_sets: Sequence[str] = ()
) -> tuple[EngineChoice, ...]:
    """`--engines vllm,llamacpp`, repeatable `--endpoint [NAME=]URL` and `--engine-set NAME.FIELD=VALUE` -> engine
    choices (names unique)."""
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
        if "@" in url.split("://", 1)[1].split("/", 1)[0]:
            # user:password@ would be written to the manifest and events with the URL; keys go in a header
            raise ConfigError(
                f"--endpoint {name}=...: credentials in the URL are not supported (they would be written to the run "
                "directory); give the key with --api-key-env NAME or --api-key-file PATH"
            )
        # a name that is no engine says nothing of the server's make: its /v1/models answer decides (`_engine`)
        adapter = name if name in known or name == registry.GENERIC else registry.IDENTIFY
        choices.append(EngineChoice(name, adapter, url))
    if not choices:
        raise ConfigError("nothing to benchmark: give --engines (e.g. vllm,llamacpp) or --endpoint NAME=URL")
    names = [c.name for c in choices]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(
            f"engine name {dupes[0]!r} given twice; name endpoints apart: --endpoint a=URL --endpoint b=URL"
        )
    return _with_settings(tuple(choices), engine_sets)


def _with_settings(choices: tuple[EngineChoice, ...], engine_sets: Sequence[str]) -> tuple[EngineChoice, ...]:
    settings: dict[str, dict[str, Any]] = {}
    launched = {c.name for c in choices if c.url is None}
    attached = {c.name for c in choices if c.url is not None}
    for raw in engine_sets:
        target, eq, value = raw.partition("=")
        name, dot, key = target.strip().partition(".")
        if not (eq and dot and name and key):
            raise ConfigError(
                f"--engine-set {raw!r}: write it as ENGINE.FIELD=VALUE, e.g. vllm.dtype=float32"
            )
        if name not in launched and not (name in attached and key.strip() == "model"):
            raise ConfigError(
                f"--engine-set {raw!r}: {name!r} is not an engine launched here (--engines); an attached endpoint "
                f"runs with the settings its server was started with (only {name}.model=ID, the served model its "
                "requests name, can be chosen)"
                if name in attached
                else f"--engine-set {raw!r}: no engine named {name!r} in this run"
            )
        settings.setdefault(name, {})[key.strip()] = value.strip()
    for name, values in settings.items():  # unknown fields and bad values are refused now, not at launch
        if name in launched:
            registry.apply_settings(name, EngineConfig(model=""), values)
    return tuple(dataclasses.replace(c, settings=settings.get(c.name, {})) for c in choices)


# ------------------------------------------------------------------------------------------------- tokenizers


def tokenizer_for(
    adapter: Adapter, endpoint: Endpoint, given: str | None = None, headers: Mapping[str, str] | None = None
) -> ChosenTokenizer:
    """The tokenizer an engine's prompts are built with: the one named with `--tokenizer`, else the served model's
    own (the engine's tokenize endpoint, or the model files it was launched from), else a stand-in whose lengths
    are approximate, said so in the `tokenizer` event and the verdict's notes (docs/workloads.md, "Tokenizers")."""
    if given:
        return ChosenTokenizer(LocalTokenizer(given), True, f"--tokenizer {given}")
    dialect, path = adapter.info.tokenize_dialect, adapter.info.tokenize_path
    missing = ""
    if dialect in ("vllm", "llamacpp") and path:
        engine = EngineTokenizer(endpoint.base_url, dialect, model=endpoint.model, headers=headers)  # type: ignore[arg-type]
        try:
            if endpoint.mode == "attached":  # a proxy or hosted API in front of the engine may not offer it
                engine.count_prompt("Hello")
        except NoTokenizeRoute as e:
            missing = f"{endpoint.base_url}{path} is not there ({str(e).split(': ', 1)[-1][:80]})"
        else:
            return ChosenTokenizer(engine, True, f"the engine's {path}")
    cfg = endpoint.config
    if cfg and (Path(cfg.model, "tokenizer.json").exists() or cfg.model.endswith(".gguf")):
        return ChosenTokenizer(LocalTokenizer(cfg.model), True, f"the model files it serves ({cfg.model})")
    stand_in = _stand_in_tokenizer()
    why = missing or f"{adapter.info.display_name} offers no tokenize endpoint EngineBench uses"
    return ChosenTokenizer(stand_in, False, f"{why}; prompts built with the stand-in {stand_in.name}")


def _stand_in_tokenizer() -> Tokenizer:
    """A real BPE tokenizer where one is installed (the shipped SmolLM2's, 49k tokens, from the engine cache), so
    prompt lengths are of the right order for English text; else the model-free test tokenizer. Either way the
    server's usage gives the actual lengths."""
    from adapters import install

    gguf = install.gguf_model_path()
    if gguf.is_file():
        with contextlib.suppress(ConfigError):
            tok = LocalTokenizer(gguf)
            tok.name = f"{tok.name} (the shipped SmolLM2's, not the served model's)"
            return tok
    return SimpleTokenizer()


def _prompt_salt(cfg: RunConfig, point: LoadPoint, repeat: int) -> str:
    """The words of a point's prompts: the run's key, the point and the repeat (each repeat and each point sends
    prompts of its own, so none finds what an earlier one left in the cache); every engine of the run gets the
    same. A run from before prompt keys (resumed) has the empty key: the seed's own words, as it sent."""
    return f"{cfg.prompt_key}/{point.id}/r{repeat}" if cfg.prompt_key else ""


def _points(workload: Workload, cfg: RunConfig) -> tuple[LoadPoint, ...]:
    """The load points: the sweep given, or for a trace workload one open-loop point replaying its timestamps."""
    if workload.kind != "trace":
        return cfg.points
    from workloads.traces import trace_times

    times = trace_times(workload, cfg.seed)
    if len(times) < 2 or times[-1] <= 0:
        raise ConfigError(
            f"trace workload {workload.name} selects {len(times)} requests; widen its sample or cap"
        )
    return (LoadPoint("rate", round(len(times) / times[-1], 4), "trace", seed=cfg.seed, times=tuple(times)),)


def _wanted(stop: StopRule, point: LoadPoint) -> int:
    if point.times is not None:
        return len(point.times)
    if stop.requests is not None:
        return stop.warmup + stop.requests + stop.cooldown
    assert stop.duration_s is not None
    rough = point.value * stop.duration_s if not point.closed_loop else point.value * 8
    return int(stop.warmup + stop.cooldown + rough)


# ------------------------------------------------------------------------------------------------- the run


async def _models_answer(url: str, api_key: str | None, timeout: float = 10.0) -> Any:
    """The server's `GET /v1/models` JSON, or None (attaching then reports why it cannot be reached)."""
    import aiohttp

    base = url.rstrip("/").removesuffix("/v1")
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(f"{base}/v1/models", headers=headers) as r,
        ):
            return await r.json(content_type=None) if r.status == 200 else None
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return None


@contextlib.asynccontextmanager
async def _engine(
    choice: EngineChoice, run: RunDir, cfg: RunConfig, progress: Progress
) -> AsyncIterator[tuple[Adapter, Endpoint, dict[str, Any]]]:
    """The engine's adapter, its endpoint, and what the manifest should add to its entry (the dtype choice)."""
    if choice.url is not None:
        name = choice.adapter
        if name == registry.IDENTIFY:  # `--endpoint URL`: the server's own /v1/models answer says what it is
            name = registry.adapter_for_models(await _models_answer(choice.url, cfg.api_key))
            known = f"it says it is {name}" if name != registry.GENERIC else "its make is unknown"
            progress(f"{choice.name}: {known}; talking to it with the {name} adapter")
        adapter = registry.get(name)
        auth = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        model = choice.settings.get("model")
        async with attached(adapter, choice.url, name=choice.name, headers=auth, model=model) as ep:
            yield adapter, ep, {}
        return
    adapter = registry.require_runnable(choice.adapter)
    engine_cfg = choice.config or registry.default_config(choice.adapter)
    engine_cfg = registry.apply_settings(choice.name, engine_cfg, dict(choice.settings))
    extra: dict[str, Any] = {}
    dtype = registry.cpu_dtype_choice(choice.adapter, engine_cfg, user_set="dtype" in choice.settings)
    if dtype is not None:
        extra["dtype_choice"] = dtype.to_dict()
        progress(f"{choice.name}: dtype {dtype.dtype} ({dtype.reason})")
        if dtype.warning:
            progress(f"{choice.name}: warning: {dtype.warning}")
            run.append_event({"kind": "engine_warning", "engine": choice.name, "warning": dtype.warning})
    (run.path / "engines").mkdir(exist_ok=True)
    async with launched(
        adapter,
        engine_cfg,
        run.path / "engines" / f"{choice.name}.log",
        cfg.ready_timeout_s,
        name=choice.name,
        nice=cfg.engine_nice,
        on_wait=lambda waited, line: progress(EngineWaiting(choice.name, waited, cfg.ready_timeout_s, line)),
    ) as ep:
        yield adapter, ep, extra


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
        async with _engine(choice, run, cfg, progress) as (adapter, ep, extra):
            entry = {**ep.manifest_entry(adapter.info.name), **extra}
            entry.update(await _cache_facts(adapter, ep, cfg))
            run.append_event({"kind": "engine_ready", "engine": choice.name, **entry})
            _add_engine_to_manifest(run, entry)
            cold = f" (cold start {ep.cold_start_s:.1f} s)" if ep.cold_start_s is not None else ""
            progress(f"{choice.name}: ready at {ep.base_url}, model {ep.model}, version {ep.version}{cold}")
            headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
            chosen = tokenizer_for(adapter, ep, cfg.tokenizer, headers)
            tokenizer = chosen.tokenizer
            run.append_event({"kind": "tokenizer", "engine": choice.name, "tokenizer": tokenizer.name,
                              "exact": chosen.exact, "why": chosen.why})  # fmt: skip
            if not chosen.exact:
                progress(f"{choice.name}: input lengths approximate: {chosen.why} (exact: --tokenizer PATH)")
            # telemetry (docs/telemetry.md): GPU, process tree and /metrics sampled around every load point
            telemetry = EngineTelemetry.for_endpoint(run, choice.name, ep, adapter, anchor.perf)
            connection: Connection = "keepalive" if adapter.info.reuse_connections else "fresh"
            target = Target(choice.name, ep.base_url, adapter, ep.model, headers, cfg.stream, connection)
            for point in _points(workload, cfg):
                for repeat in range(1, cfg.repeat + 1):
                    if not ep.alive():
                        break
                    if _resumed_done(cfg, choice.name, point, repeat):
                        progress(f"{choice.name} {point.id}: finished before the resume; not run again")
                        continue
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
            if workload.kind == "quantized" and ep.alive():
                progress(f"{choice.name}: asking the quality prompts (greedy, with log-probs)")
                await ask_quality_prompts(
                    run.path,
                    choice.name,
                    choice.variant or choice.name,
                    adapter,
                    ep.base_url,
                    ep.model,
                    workload,
                )
            if not ep.alive():
                reason = ep.death_reason() or "the engine process exited"
                outcome.status, outcome.reason = "failed", f"{reason}; its last log lines:\n{ep.log_tail()}"
                run.append_event({"kind": "engine_died", "engine": choice.name, "reason": outcome.reason})
    except EngineUnavailable as e:
        outcome.status, outcome.reason = "skipped", str(e)
        run.append_event({"kind": "engine_skipped", "engine": choice.name, "reason": str(e)})
    except (EngineError, EndpointError, ConfigError) as e:
        outcome.status, outcome.reason = "failed", str(e)
        run.append_event({"kind": "engine_failed", "engine": choice.name, "reason": str(e)})
    if choice.url is None:
        _record_log_warnings(run, choice, progress)
    return outcome


def _record_log_warnings(run: RunDir, choice: EngineChoice, progress: Progress) -> None:
    """The engine log's lines known to cost speed (adapters.logwarnings), into its manifest entry once it stopped."""
    found = scan_log_file(run.path / "engines" / f"{choice.name}.log", choice.adapter)
    manifest = run.load_manifest()
    if not found or not any(e.get("name") == choice.name for e in manifest.engines):
        return
    for w in found:
        progress(f"{choice.name}: its log says {w['message']!r} ({w['count']}×): {w['cost']}")
    engines = [{**e, "log_warnings": found} if e.get("name") == choice.name else e for e in manifest.engines]
    run.write_manifest(manifest.model_copy(update={"engines": engines}))


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
    # every repeat: the same seed, so the same distribution and fingerprint; prompts of its own (`_prompt_salt`),
    # built ahead of need and off the event loop (harness.supply)
    salt = _prompt_salt(cfg, point, repeat)
    specs = PromptSupply(lambda: workload.requests(cfg.seed, tokenizer, salt), wanted)
    await asyncio.to_thread(specs.prepare)
    fingerprint = workload.fingerprint_for(cfg.seed)
    await _reset_cache(target, ep, point, cfg, run, progress, _repeat_fields(cfg, repeat))
    rep = _repeat_fields(cfg, repeat)
    run.append_event(
        {
            "kind": "point_start",
            "engine": target.engine,
            "point": point.id,
            "load": point.describe(),
            "workload_fingerprint": fingerprint,
            "tokenizer": tokenizer.name,
            **rep,
        }
    )
    done = 0
    tally = {"ok": 0, "failed": 0, "cancelled": 0}
    key = (target.engine, point.id, str(repeat))
    skip, stop = _resume_filter(cfg, key)
    prior_turns = (cfg.prior.replies.get(key), cfg.prior.failed.get(key)) if cfg.prior else (None, None)

    def not_sent(spec: RequestSpec, reason: str) -> None:
        line = f"{target.engine} {point.id}: {spec.request_id} not sent on resume: {reason}"
        run.append_event({"kind": "resume_not_sent", "request_id": spec.request_id, "reason": reason,
                          "engine": target.engine, "point": point.id, "summary_note": line})  # fmt: skip
        progress(line)

    def sink(rec: RequestRecord) -> None:
        nonlocal done
        if rec.status != "ok" and (not ep.alive() or _engine_exiting(ep)):
            rec.error = f"{rec.error or rec.status}; engine died: {ep.death_reason() or 'process exited'}"
        if rep:
            rec.tags["repeat"] = str(repeat)
        if cfg.prior is not None:
            rec.tags["segment"] = str(cfg.prior.segment)
        run.append_record(rec)
        done += 1
        tally["ok" if rec.ok else "cancelled" if rec.status == "cancelled" else "failed"] += 1
        progress(point_progress())

    def point_progress(finished: bool = False) -> PointProgress:
        return PointProgress(
            target.engine,
            point.id,
            done,
            wanted if stop.duration_s is None else None,
            time.perf_counter() - started,
            stop.duration_s,
            finished=finished,
            **tally,
        )

    progress(f"{target.engine} {point.id}: running")
    started = time.perf_counter()
    sampler = await telemetry.start_point(point.id, repeat if rep else None) if telemetry else None
    watch = asyncio.get_running_loop().create_task(_watch_engine(ep))
    abort = asyncio.Event()
    point_runner = (
        run_point
        if cfg.distributed is None
        else distributed_runner(cfg.distributed, run.append_event, target.engine)
    )
    specs.start()
    task = asyncio.ensure_future(
        point_runner(
            target,
            _skipping(_repeat_specs(specs, repeat), skip, *prior_turns, not_sent=not_sent),
            point,
            stop,
            sink,
            anchor.perf,
            keep_text=True,
            abort=abort,
        )
    )
    try:
        await asyncio.wait({task, watch}, return_when=asyncio.FIRST_COMPLETED)
        if watch.done() and not task.done():
            # the engine is gone: in-flight requests fail on their own within moments (their sockets close); what
            # is left is aborted cleanly: run_point returns with stop reason "aborted", leftovers `cancelled`
            await asyncio.wait({task}, timeout=ENGINE_GONE_GRACE_S)
            abort.set()
        outcome = await task
    finally:
        for t in (watch, task):
            if not t.done():
                t.cancel()
        await asyncio.gather(watch, task, return_exceptions=True)
        specs.stop()
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
            # prompts built before the point and, by the supply's worker, while it ran; sends that waited for one
            **specs.stats(),
            **rep,
        }
    )
    progress(point_progress(finished=True))
    progress(f"{target.engine} {point.id}: done, {done} requests ({outcome.stop_reason})")
    return outcome


# -- `--repeat N` (used by `bench gate`) -----------------------------------------------------------------------
# Each load point runs N times back to back under the same point id, every repeat with the same seed (the same
# lengths, sessions and arrivals: one workload fingerprint) and prompts of its own (`_prompt_salt`: the prefix cache
# the previous repeat warmed finds nothing, sglang#8285), so the summary pools them (more samples per point) and
# `bench gate` splits them again by `tags["repeat"]` (per-repeat throughput). Request ids of repeat r >= 2 get the suffix "#r<r>" (chat turns keep pointing at their own repeat's
# previous turn), so ids stay unique within the run. With N = 1 nothing changes: no tag, no event field, same ids.


def _repeat_fields(cfg: RunConfig, repeat: int) -> dict[str, int]:
    return {"repeat": repeat, "repeats": cfg.repeat} if cfg.repeat > 1 else {}


def _repeat_specs(specs: Iterable[RequestSpec], repeat: int) -> Iterable[RequestSpec]:
    if repeat == 1:
        return specs

    def renamed() -> Iterator[RequestSpec]:
        for s in specs:
            hist = f"{s.history_from}#r{repeat}" if s.history_from else None
            yield dataclasses.replace(s, request_id=f"{s.request_id}#r{repeat}", history_from=hist)

    return renamed()


# -- fresh prompts, replayed prompts, and the engine's prefix cache (docs/workloads.md, docs/metrics.md) ---------


def _with_prompt_key(cfg: RunConfig, workload: Workload) -> RunConfig:
    """A new run's prompt key: fresh, or (--replay-prompts RUN_DIR) that run's, which must have run this workload
    with this seed (its fingerprint) for its prompts to be the same."""
    if cfg.replay_of is None:
        return cfg if cfg.prompt_key else dataclasses.replace(cfg, prompt_key=secrets.token_hex(8))
    path = Path(cfg.replay_of)
    if not (path / "manifest.json").is_file():
        raise ConfigError(
            f"--replay-prompts {path}: no manifest.json there; give a run directory written by `bench run`"
        )
    earlier = RunDir.open(path).load_manifest().workload
    key = (earlier.get("prompts") or {}).get("key")
    if not key:
        raise ConfigError(
            f"--replay-prompts {path}: that run records no prompt key (an older EngineBench wrote it); its prompts "
            "cannot be rebuilt"
        )
    mine = workload.fingerprint_for(cfg.seed)
    if earlier.get("fingerprint") != mine:
        raise ConfigError(
            f"--replay-prompts {path}: that run sent workload {earlier.get('name')} with seed {earlier.get('seed')} "
            f"(another fingerprint); give the same --workload, --set and --seed to replay its prompts"
        )
    return dataclasses.replace(cfg, prompt_key=str(key), replay_of=str(path.resolve()))


async def _cache_facts(adapter: Adapter, ep: Endpoint, cfg: RunConfig) -> dict[str, Any]:
    """For the engine's manifest entry: how its prefix cache is emptied between points (or that it cannot be), and
    its cache block size where its metrics state one (vLLM `cache_config_info`)."""
    import aiohttp

    reset = adapter.info.cache_reset
    facts: dict[str, Any] = {
        "cache_reset": None if reset is None else reset.route,
        "cache_reset_needs": None if reset is None else (reset.needs or None),
    }
    if reset is None:
        facts["cache_reset_none"] = (
            f"{adapter.info.display_name} offers no route to empty its prefix cache: fresh prompts keep points "
            "apart, and the cache share per point shows what it served"
        )
    block = None
    if adapter.info.metrics_path:
        headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
        with contextlib.suppress(aiohttp.ClientError, TimeoutError, OSError, UnicodeDecodeError):
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10), headers=headers) as session,
                session.get(ep.base_url + adapter.info.metrics_path) as r,
            ):
                block = block_tokens_from(await r.text()) if r.status == 200 else None
    facts["cache_block_tokens"] = block
    return facts


async def _reset_cache(
    target: Target,
    ep: Endpoint,
    point: LoadPoint,
    cfg: RunConfig,
    run: RunDir,
    progress: Progress,
    rep: Mapping[str, int],
) -> None:
    """Empty the engine's prefix cache before a point (so before each engine's first too), as a `cache_reset`
    event; not when the run replays an earlier one's prompts (a warm cache is what it asks for)."""
    import aiohttp

    event: dict[str, Any] = {"kind": "cache_reset", "engine": target.engine, "point": point.id, **rep}
    info = getattr(target.adapter, "info", None)
    if cfg.replay_of is not None or not cfg.cache_reset:
        why = "replayed prompts: the cache is kept" if cfg.replay_of is not None else "--no-cache-reset"
        run.append_event({**event, "ok": False, "skipped": True, "reason": why})
        return
    if info is None:
        return
    async with aiohttp.ClientSession(
        timeout=aiohttp.ClientTimeout(total=30), headers=dict(target.headers)
    ) as session:
        out = await reset_prefix_cache(session, ep.base_url, info)
    run.append_event({**event, **out})
    # once per engine (its first point); none offered: the manifest's entry says so
    first = point.id == cfg.points[0].id and rep.get("repeat", 1) == 1
    if not out.get("ok") and info.cache_reset is not None and first:
        progress(
            f"{target.engine}: prefix cache not emptied before its points: {out.get('reason')} (fresh prompts keep "
            "them apart; the cache share per point shows what it served)"
        )


def _engine_exiting(ep: Endpoint, reap_wait_s: float = 0.2) -> bool:
    """True when a launched engine is dying: its sockets close (so its requests fail) before its exit can be seen
    with waitpid, so `alive()` alone mislabels the first failures. Linux sets PF_EXITING (0x4 in /proc/PID/stat's
    flags) at the start of exit, before the sockets close; then wait briefly so `death_reason()` can say how."""
    if ep.pid is None:
        return False
    try:
        stat = Path(f"/proc/{ep.pid}/stat").read_bytes()
        flags = int(stat.rsplit(b")", 1)[1].split()[6])
    except (OSError, ValueError, IndexError):
        return False
    if not flags & 0x4:
        return False
    end = time.monotonic() + reap_wait_s
    while ep.alive() and time.monotonic() < end:
        time.sleep(0.005)
    return True


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


def _start(run: RunDir, cfg: RunConfig, workload: Workload, anchor: ClockAnchor) -> None:
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
            # the prompts' key: `--replay-prompts` of this run directory sends the same prompts again
            "prompts": {"key": cfg.prompt_key, "replayed_from": cfg.replay_of},
        },
        load=_load_block(cfg),
        slo=cfg.slo.to_dict(),
        settings={
            "requested": {"engines": [_choice_dict(e) for e in cfg.engines]},
            "effective": {
                "stream": cfg.stream,
                "ready_timeout_s": cfg.ready_timeout_s,
                "engine_nice": cfg.engine_nice,
            },
            # everything `bench run --resume` needs to carry on with the same settings (never the API key)
            "run_config": _config_block(cfg),
        },
    )


async def execute_async(cfg: RunConfig, progress: Progress) -> RunResult:
    if not cfg.points:
        raise ConfigError("no load points: give --concurrency or --rate")
    if cfg.repeat < 1:
        raise ConfigError(f"--repeat {cfg.repeat}: give a whole number >= 1 (times to run each load point)")
    workload = load_workload(cfg.workload)
    if cfg.overrides:
        workload = workload.with_overrides(cfg.overrides)
    _raise_file_limit(cfg, progress)
    if not cfg.resume:
        cfg = _with_prompt_key(cfg, workload)
    run = RunDir.create(cfg.out, resume=cfg.resume)
    if cfg.resume and run.has_manifest():
        cfg, anchor = _begin_resume(run, cfg, progress)
    else:
        anchor = ClockAnchor.now()
        _start(run, cfg, workload, anchor)
    progress(f"run directory: {run.path}")
    outcomes: list[EngineOutcome] = []
    status: Literal["complete", "failed", "interrupted"] = "complete"
    engines = cfg.engines
    if workload.kind == "quantized":  # one engine per precision variant of the model
        engines = variant_choices(workload, engines, registry.default_config)
        progress(
            "precision variants: " + ", ".join(f"{c.name} ({c.config.model})" for c in engines if c.config)
        )
    try:
        for choice in engines:
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


# -- open files ---------------------------------------------------------------------------------------------------


def _raise_file_limit(cfg: RunConfig, progress: Progress) -> None:
    """One socket per concurrent stream: raise the soft open-files limit before anything is written (harness.limits)."""
    closed = [int(p.value) for p in cfg.points if p.closed_loop]
    if not closed:
        return
    limit = ensure_open_files(max(closed))
    if limit.raised:
        progress(
            f"open-files limit raised from {limit.soft_before} to {limit.soft} for concurrency {max(closed)}"
        )


# -- `bench run --resume DIR` ---------------------------------------------------------------------------------------
# The manifest keeps the run's settings (`settings.run_config`); a resumed run re-uses them, never the API key (given
# again). Clock: the manifest's anchor stays the run's anchor. The resumed segment's run start is re-based through
# the wall clock (run_start_perf = perf_now - (wall_now - anchor.wall)), so every record's offsets are seconds since
# the run's original start, growing across the gap; the segment's own anchor is in its `resume` event, and its
# records carry tags["segment"] = "2", "3", ... (records of the first segment have no tag).
# An (engine, point, repeat) whose `point_end` says it finished is not run again. In the others, request ids that
# already have a record are skipped (with `resend_failed`, only those that ended ok), warm-up runs again (the engine
# is new), and the measured quota counts the measured records kept (a `--duration` point: the measurement window's
# time the earlier segments spent, first measured request due to last one ended, per segment). A chat session cut off between two turns goes on
# where it stopped: the next turn is sent with the conversation rebuilt from the kept records (`_skipping`).

_FINISHED_REASONS = frozenset({"requests", "duration", "specs_exhausted", "error_budget"})
Key = tuple[str, str, str]  # (engine, point id, repeat)


@dataclass(frozen=True)
class ResumeState:
    """What the earlier segments of a resumed run did."""

    segment: int
    skip: Mapping[Key, frozenset[str]] = field(default_factory=dict)
    measured: Mapping[Key, int] = field(default_factory=dict)
    finished: frozenset[Key] = frozenset()
    # of the kept records: the reply of each one that ended ok, the status of each one that did not
    replies: Mapping[Key, Mapping[str, str]] = field(default_factory=dict)
    failed: Mapping[Key, Mapping[str, str]] = field(default_factory=dict)
    # seconds of measurement window the earlier segments ran (a `--duration` point's time already spent)
    measured_s: Mapping[Key, float] = field(default_factory=dict)


def _resume_state(run: RunDir, resend_failed: bool) -> ResumeState:
    skip: dict[Key, set[str]] = {}
    measured: Counter[Key] = Counter()
    replies: dict[Key, dict[str, str]] = {}
    failed: dict[Key, dict[str, str]] = {}
    windows: dict[tuple[Key, str], tuple[float, float]] = {}  # per segment: first measured due, last end
    for rec in run.iter_records():
        key = (rec.engine, rec.point, rec.tags.get("repeat", "1"))
        if rec.phase == "measure":
            seg = (key, rec.tags.get("segment", "1"))
            lo, hi = windows.get(seg, (rec.scheduled, rec.scheduled))
            windows[seg] = (min(lo, rec.scheduled), max(hi, rec.done or rec.scheduled))
        if rec.ok or not resend_failed:
            skip.setdefault(key, set()).add(rec.request_id)
            measured[key] += rec.phase == "measure" and rec.status != "cancelled"
            if rec.ok and rec.output_text is not None:
                replies.setdefault(key, {})[rec.request_id] = rec.output_text
            elif not rec.ok:
                failed.setdefault(key, {})[rec.request_id] = rec.status
    measured_s: dict[Key, float] = {}
    for (key, _), (lo, hi) in windows.items():
        measured_s[key] = measured_s.get(key, 0.0) + hi - lo
    finished: set[Key] = set()
    segment = 1
    for ev in run.iter_events():
        if ev.get("kind") == "point_end" and ev.get("stop_reason") in _FINISHED_REASONS:
            finished.add((str(ev.get("engine")), str(ev.get("point")), str(ev.get("repeat", 1))))
        elif ev.get("kind") == "resume":
            segment = max(segment, int(ev.get("segment", 1)))
    return ResumeState(
        segment + 1,
        {k: frozenset(v) for k, v in skip.items()},
        dict(measured),
        frozenset(finished),
        replies,
        failed,
        measured_s,
    )


def _resumed_done(cfg: RunConfig, engine: str, point: LoadPoint, repeat: int) -> bool:
    if cfg.prior is None:
        return False
    key = (engine, point.id, str(repeat))
    if key in cfg.prior.finished:
        return True
    if cfg.stop.duration_s is not None and cfg.prior.measured_s.get(key, 0.0) >= cfg.stop.duration_s:
        return True
    return cfg.stop.requests is not None and cfg.prior.measured.get(key, 0) >= cfg.stop.requests


def _resume_filter(cfg: RunConfig, key: Key) -> tuple[frozenset[str], StopRule]:
    if cfg.prior is None:
        return frozenset(), cfg.stop
    stop = cfg.stop
    if stop.requests is not None:
        stop = dataclasses.replace(stop, requests=max(1, stop.requests - cfg.prior.measured.get(key, 0)))
    if stop.duration_s is not None:  # the window's time the earlier segments spent is not run again
        left = stop.duration_s - cfg.prior.measured_s.get(key, 0.0)
        stop = dataclasses.replace(stop, duration_s=max(left, 1e-3))
    return cfg.prior.skip.get(key, frozenset()), stop


def _skipping(
    specs: Iterable[RequestSpec],
    skip: frozenset[str],
    replies: Mapping[str, str] | None = None,
    failed: Mapping[str, str] | None = None,
    not_sent: Callable[[RequestSpec, str], None] | None = None,
) -> Iterable[RequestSpec]:
    """What a resumed segment sends: the specs without a kept record (`skip`), in order.

    A chat turn that continues a kept turn is sent as it would have been: the conversation that turn was sent with
    (rebuilt the same way down its session), its recorded reply (`replies`) and its own messages, with nothing left
    to wait for. One that continues a kept failure (`failed`: status by request id) is not sent, nor are the turns
    after it; `not_sent(spec, reason)` hears of each (the first segment would have cancelled them)."""
    if not skip:
        return specs
    replies, failed = replies or {}, failed or {}

    def filtered() -> Iterator[RequestSpec]:
        # kept session turns that ended ok, as sent, until their next turn comes; turns whose conversation cannot go
        # on, and why
        kept: dict[str, RequestSpec] = {}
        dead: dict[str, str] = {}
        for spec in specs:
            parent, rid = spec.history_from, spec.request_id
            if parent is not None and parent in dead:
                if rid in skip:  # its record is kept: an earlier segment cancelled it
                    dead[rid] = f"ended {failed.get(rid, 'without a recorded reply')} in an earlier segment"
                else:
                    dead[rid] = "was not sent either"
                    if not_sent is not None:
                        not_sent(spec, f"the turn it continues ({parent}) {dead[parent]}")
                continue
            sent = spec
            if parent is not None and parent in kept:
                sent = continued(spec, kept.pop(parent), replies[parent])
            if rid in skip:
                if spec.session is not None:
                    if rid in replies:
                        kept[rid] = sent
                    else:
                        dead[rid] = (
                            f"ended {failed.get(rid, 'without a recorded reply')} in an earlier segment"
                        )
                continue
            yield sent if sent is spec else dataclasses.replace(sent, history_from=None, think_time=0.0)

    return filtered()


def _begin_resume(run: RunDir, cfg: RunConfig, progress: Progress) -> tuple[RunConfig, ClockAnchor]:
    manifest = run.load_manifest()
    prior = _resume_state(run, cfg.resend_failed)
    now = ClockAnchor.now()
    anchor = ClockAnchor(
        wall=manifest.clock_anchor.wall, perf=now.perf - (now.wall - manifest.clock_anchor.wall)
    )
    entry = {"segment": prior.segment, "at": dt.datetime.now(dt.UTC).isoformat(timespec="milliseconds")}
    resumes = [*(manifest.model_extra or {}).get("resumes", []), {**entry, "command": list(cfg.command)}]
    run.write_manifest(
        Manifest.model_validate(
            {**manifest.model_dump(), "status": "running", "finished_at": None, "resumes": resumes}
        )
    )
    run.append_event(
        {
            "kind": "resume",
            "segment": prior.segment,
            "clock_anchor": now.model_dump(),
            "run_start_perf": anchor.perf,
            "resend_failed": cfg.resend_failed,
            "skipped_requests": sum(len(v) for v in prior.skip.values()),
            "finished_points": [list(k) for k in sorted(prior.finished)],
        }
    )
    progress(
        f"resuming {run.path} as segment {prior.segment}: {sum(len(v) for v in prior.skip.values())} finished "
        f"requests kept and skipped, {len(prior.finished)} finished points not run again"
    )
    return dataclasses.replace(cfg, prior=prior), anchor


def _choice_dict(choice: EngineChoice) -> dict[str, Any]:
    d = dataclasses.asdict(choice)
    if choice.config is not None:  # secret-looking environment values never reach the manifest
        d["config"]["env"] = {k: "***" if _secret_name(k) else v for k, v in choice.config.env.items()}
        d["config"]["extra_args"] = list(choice.config.extra_args)
    return d


def _secret_name(name: str) -> bool:
    return any(w in name.upper() for w in ("TOKEN", "KEY", "SECRET", "PASSWORD"))


def _config_block(cfg: RunConfig) -> dict[str, Any]:
    workload = cfg.workload
    if Path(workload).is_file():  # a resume may start from another directory
        workload = str(Path(workload).resolve())
    return {
        "engines": [_choice_dict(e) for e in cfg.engines],
        "workload": workload,
        "overrides": dict(cfg.overrides),
        "points": [dataclasses.asdict(p) for p in cfg.points],
        "stop": dataclasses.asdict(cfg.stop),
        "seed": cfg.seed,
        "slo": cfg.slo.to_dict(),
        "stream": cfg.stream,
        "ready_timeout_s": cfg.ready_timeout_s,
        "repeat": cfg.repeat,
        "engine_nice": cfg.engine_nice,
        "tokenizer": cfg.tokenizer,
        "prompt_key": cfg.prompt_key,
        "replay_of": cfg.replay_of,
        "cache_reset": cfg.cache_reset,
    }


def _choice_from(d: Mapping[str, Any]) -> EngineChoice:
    raw = d.get("config")
    config = None
    if isinstance(raw, Mapping):
        config = EngineConfig(**{**raw, "extra_args": tuple(raw.get("extra_args") or ())})
    settings = d.get("settings")
    return EngineChoice(
        str(d["name"]),
        str(d["adapter"]),
        d.get("url"),
        config,
        settings=dict(settings) if isinstance(settings, Mapping) else {},
    )


def resume_config(
    path: Path, *, api_key: str | None = None, command: Sequence[str] = (), resend_failed: bool = False
) -> RunConfig:
    """The RunConfig that continues the run in `path` with its own settings (`bench run --resume DIR`)."""
    p = Path(path)
    if not (p / "manifest.json").is_file():
        raise ConfigError(
            f"--resume {p}: no manifest.json there; give a run directory written by `bench run`"
        )
    manifest = RunDir.open(p).load_manifest()
    if manifest.status == "complete":
        raise ConfigError(
            f"--resume {p}: that run is complete; nothing to resume (start a new one with --out)"
        )
    block = manifest.settings.get("run_config")
    if not isinstance(block, Mapping):
        raise ConfigError(
            f"--resume {p}: its manifest has no settings.run_config (an older EngineBench wrote it); start a new run"
        )
    try:
        return RunConfig(
            engines=tuple(_choice_from(e) for e in block["engines"]),
            workload=str(block["workload"]),
            points=tuple(LoadPoint(**pt) for pt in block["points"]),
            stop=StopRule(**block["stop"]),
            out=p,
            seed=int(block["seed"]),
            slo=Slo.from_dict(block["slo"]),
            overrides=dict(block["overrides"]),
            stream=bool(block["stream"]),
            ready_timeout_s=float(block["ready_timeout_s"]),
            api_key=api_key,
            command=tuple(command),
            resume=True,
            repeat=int(block["repeat"]),
            resend_failed=resend_failed,
            engine_nice=int(block.get("engine_nice", 0)),
            tokenizer=block.get("tokenizer"),
            prompt_key=str(block.get("prompt_key") or ""),
            replay_of=block.get("replay_of"),
            cache_reset=bool(block.get("cache_reset", True)),
        )
    except (KeyError, TypeError, ValueError) as e:
        raise SchemaError(
            f"--resume {p}: settings.run_config in its manifest is damaged ({e}); start a new run"
        ) from None


def execute(cfg: RunConfig, progress: Progress) -> RunResult:
    """Run the benchmark. Records are on disk as each request ends, so an interrupted run keeps them."""
    if cfg.tokenizer:
        LocalTokenizer(cfg.tokenizer)  # a path it cannot read is refused before anything starts
    started = time.perf_counter()
    try:
        return event_loop.run(execute_async(cfg, progress))
    finally:
        progress(f"took {time.perf_counter() - started:.0f} s")
