"""`bench decide`: the I/O around the matrix. Reads run directories, data files and user files; writes the decision.

Reading: manifests through `harness.rundir.RunDir`; `summary.json` as raw JSON (schema-checked), memory from each
point's `telemetry` block. Everything else is the pure
functions in `matrix/`. The decision JSON (`kind: "decision"`) is self-describing: inputs, criteria and rules,
weights, per-criterion raw value + score + rule, ranking, sensitivity, capacity, cost, plan and warnings.

Knowledge: engine facts (hardware, maintenance status, on-device, aliases, each with a source and a date) have one
record, `adapters.knowledge.ENGINE_FACTS`, which the adapters' `EngineInfo` (`bench engines`) reads too; the
qualitative scores are `matrix/data/knowledge.yaml`. `builtin_knowledge` joins the two and refuses a scores file that
states facts; a user's `--knowledge FILE` overrides either, its hardware and status spellings mapped onto the one
vocabulary (`adapters.knowledge.normalize_hardware` / `normalize_status`), as are plan files' `must_run_on`.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass, replace
from pathlib import Path
from typing import Any

import yaml

from harness.errors import BenchError, CompareError, ConfigError, SchemaError
from matrix.capacity import Capacity, Traffic, capacity, parse_slo, replicas_for
from matrix.cost import (
    EnergyPrice,
    HostShape,
    PriceTable,
    choose_instance,
    cost_of,
    energy_cost,
    energy_price,
    parse_prices,
)
from matrix.criteria import CRITERIA, raw_values
from matrix.inputs import EngineInfo, Point, classify_workload
from matrix.knowledge import Knowledge, merge_knowledge, parse_knowledge
from matrix.plan import make_plan, parse_plan
from matrix.profiles import parse_profiles, parse_weights
from matrix.scoring import RULES, score_all
from matrix.sensitivity import sensitivity

__all__ = [
    "DECISION_SCHEMA_VERSION",
    "DecideConfig",
    "builtin_knowledge",
    "decide",
    "decision_reasons",
    "host_notes",
    "join_knowledge",
    "load_knowledge",
    "load_run",
    "read_data_file",
    "render",
    "render_brief",
    "write_json",
]

DECISION_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class DecideConfig:
    run_dirs: tuple[Path, ...]
    profile: str | None = None
    weights_file: Path | None = None
    plan_file: Path | None = None
    json_out: Path | None = None
    knowledge_file: Path | None = None
    prices_file: Path | None = None
    instance: str | None = None
    target: Traffic | None = None
    tie_margin: float = 0.1
    usd_per_kwh: float | None = None  # prices the GPU energy (else the price table's `energy:` block)


def read_data_file(path: Path, what: str) -> Any:
    """A YAML or JSON file (JSON is YAML) → Python data; a clear one-line error when missing or malformed."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist; check the path") from None
    except OSError as e:
        raise ConfigError(f"{what} {path} cannot be read: {e.strerror}") from None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" at line {mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{what} {path} is not valid YAML/JSON{where}; fix the syntax") from None


def _builtin(name: str) -> Any:
    # Next to the matrix modules (not importlib.resources: an editable install can make `matrix` a namespace).
    import matrix.knowledge

    return yaml.safe_load(
        (Path(matrix.knowledge.__file__).parent / "data" / name).read_text(encoding="utf-8")
    )


_FACT_KEYS = ("hardware", "status", "on_device", "aliases", "hardware_source", "status_source")
_SCORES_FILE = "matrix/data/knowledge.yaml"


def join_knowledge(scores_doc: Any, origin: str = _SCORES_FILE) -> Knowledge:
    """The engine facts of `adapters.knowledge` with the scores of `scores_doc` (a parsed scores-only knowledge file).

    A scores file that states a fact, or scores an engine without facts, is refused: two records would drift apart."""
    from adapters.knowledge import knowledge_document

    facts = parse_knowledge(knowledge_document(), "adapters.knowledge")
    scores = parse_knowledge(scores_doc, origin)
    raw_engines = scores_doc.get("engines") or {}
    for name, entry in raw_engines.items():
        stated = [k for k in _FACT_KEYS if isinstance(entry, Mapping) and k in entry]
        if stated:
            raise SchemaError(
                f"{origin}: engine {name} states {stated[0]}; engine facts live only in adapters/knowledge.py "
                "(ENGINE_FACTS, with a source and a date): move it there"
            )
        if facts.lookup(str(name)) is None:
            raise SchemaError(
                f"{origin}: engine {name} has scores but no facts; add it to adapters/knowledge.py ENGINE_FACTS"
            )
    return merge_knowledge(facts, scores)


def builtin_knowledge() -> Knowledge:
    """Engine facts (`adapters.knowledge`) joined with the built-in scores (`matrix/data/knowledge.yaml`)."""
    return join_knowledge(_builtin("knowledge.yaml"), _SCORES_FILE)


def _normalized(knowledge: Knowledge) -> Knowledge:
    """A user's knowledge with hardware and status names mapped onto EngineBench's vocabularies."""
    from adapters.knowledge import normalize_hardware, normalize_status

    engines = {}
    for name, e in knowledge.engines.items():
        where = f"knowledge file {knowledge.origin}, engine {name}"
        hardware = tuple(dict.fromkeys(normalize_hardware(h, where) for h in e.hardware))
        status = normalize_status(e.status, where) if e.status else ""
        engines[name] = replace(e, hardware=hardware, status=status)
    return replace(knowledge, engines=engines)


def load_knowledge(user_file: Path | None = None) -> Knowledge:
    """The built-in knowledge, overridden by `user_file` (YAML/JSON, same shape) when given."""
    knowledge = builtin_knowledge()
    if user_file is None:
        return knowledge
    user = parse_knowledge(read_data_file(user_file, "knowledge file"), str(user_file))
    return merge_knowledge(knowledge, _normalized(user))


def _read_summary(run_dir: Path) -> dict[str, Any]:
    """summary.json as a dict (swap for harness.rundir's reader once it carries every field the matrix reads)."""
    from harness.rundir import check_schema

    path = run_dir / "summary.json"
    try:
        obj = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BenchError(f"{path} is missing; run `bench summarize {run_dir}` first") from None
    except json.JSONDecodeError as e:
        raise SchemaError(
            f"{path} is not valid JSON ({e.msg} at line {e.lineno}); the file is damaged"
        ) from None
    check_schema(obj, str(path))
    if obj.get("kind") != "summary" or not isinstance(obj.get("points"), list):
        raise SchemaError(f"{path} is not a summary (kind {obj.get('kind')!r}, or no points list)")
    return obj


def _memory_peak(point: Mapping[str, Any]) -> float | None:
    """Peak memory of the engine during the point, from its telemetry (docs/telemetry.md): GPU memory where a GPU
    was sampled (the engine's own processes where NVML told them apart, else the device's), else the RSS of the
    engine's process tree (the figure that matters for CPU engines)."""
    telemetry = point.get("telemetry") or {}
    for key in ("gpu_memory_engine_peak_bytes", "gpu_memory_peak_bytes", "engine_rss_peak_bytes"):
        value = telemetry.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
    return None


def _platform(manifest: Mapping[str, Any]) -> str:
    host = manifest.get("host") or {}
    gpus = host.get("gpus") or manifest.get("gpus") or []
    if isinstance(gpus, list) and gpus and isinstance(gpus[0], Mapping):
        return str(gpus[0].get("vendor", "nvidia")).lower()
    return "cpu"


def _with_ttft_by_role(rd: Any, points: list[Point]) -> list[Point]:
    """Attach each point's TTFT p50 per request `role` tag (reuse / control), read from records.jsonl."""
    from harness.metrics import ttft

    samples: dict[tuple[str, str, str], list[float]] = defaultdict(list)
    for rec in rd.iter_records():
        role = rec.tags.get("role")
        value = ttft(rec) if rec.ok and rec.phase == "measure" and role else None
        if value is not None:
            samples[(rec.engine, rec.point, str(role))].append(value * 1000.0)
    out = []
    for p in points:
        by_role = {
            r: statistics.median(v) for (e, pt, r), v in samples.items() if e == p.engine and pt == p.point
        }
        out.append(replace(p, ttft_p50_by_role=by_role) if by_role else p)
    return out


def load_run(run_dir: Path) -> tuple[list[Point], list[EngineInfo], dict[str, Any], dict[str, Any]]:
    """(points, engines, slo, description) of one run directory."""
    from harness.rundir import RunDir

    rd = RunDir.open(run_dir)
    manifest = rd.load_manifest().model_dump(mode="json") if rd.has_manifest() else {}
    summary = _read_summary(run_dir)
    workload = manifest.get("workload") or {}
    wname = str(workload.get("name") or "unknown")
    role = classify_workload(wname, workload.get("params") or {})
    platform = _platform(manifest)
    points: list[Point] = []
    for p in summary["points"]:
        load = p.get("load") or {}
        verdict = p.get("verdict") or {}
        reasons = tuple(
            str(r.get("code", r) if isinstance(r, Mapping) else r) for r in (verdict.get("reasons") or [])
        )
        value = load.get("value")
        if value is None:  # e.g. an older summary: the point id "concurrency=8" still carries it
            try:
                value = float(str(p.get("point", "")).partition("=")[2])
            except ValueError:
                value = None
        points.append(
            Point(
                engine=str(p["engine"]),
                point=str(p["point"]),
                workload=wname,
                role=role,
                load_kind=str(load.get("kind", "concurrency")),
                load_value=float(value) if value is not None else math.nan,
                valid=verdict.get("status") == "VALID",
                invalid_reasons=reasons,
                run_id=str(summary.get("run_id", "")),
                workload_fingerprint=str(p.get("workload_fingerprint") or workload.get("fingerprint") or ""),
                measured_requests=(p.get("requests") or {}).get("measured"),
                requests_per_s=p.get("requests_per_s"),
                input_tokens_per_s=p.get("input_tokens_per_s"),
                output_tokens_per_s=p.get("output_tokens_per_s"),
                goodput_requests_per_s=(p.get("goodput") or {}).get("requests_per_s"),
                error_rate=p.get("error_rate"),
                latency_ms={
                    m: {k: v for k, v in (p.get(f"{m}_ms") or {}).items() if isinstance(v, int | float)}
                    for m in ("ttft", "tpot", "itl", "e2e")
                },
                memory_peak_bytes=_memory_peak(p),
                energy_per_output_token_j=(p.get("telemetry") or {}).get("energy_per_output_token_j"),
                closed_loop=bool(load.get("closed_loop", load.get("kind") == "concurrency")),
                cache_share=(p.get("cache") or {}).get("measured"),
                cache_expected_share=(p.get("cache") or {}).get("expected"),
            )
        )
    if role == "shared_prefix" and points:
        points = _with_ttft_by_role(rd, points)
    engines = [
        EngineInfo(
            name=str(e.get("name")),
            adapter=str(e.get("adapter") or e.get("name") or ""),
            cold_start_s=e.get("cold_start_s"),
            platform=platform,
            version=e.get("version"),
            config=e.get("config") or {},
        )
        for e in manifest.get("engines") or []
        if e.get("name")
    ]
    slo = dict(summary.get("slo") or manifest.get("slo") or {})
    description = {
        "dir": str(run_dir),
        "run_id": summary.get("run_id"),
        "workload": wname,
        "role": role,
        "fingerprint": workload.get("fingerprint"),
        "engines": sorted({p.engine for p in points}),
        "platform": platform,
        "slo": slo,
        "status": manifest.get("status"),
        "host": _host_facts(manifest),
        "engine_facts": _engine_facts(manifest),
        # per point, the prefix cache's share of prompt tokens beside TTFT p50 (what explains a fast TTFT)
        "cache_share": [
            {
                "engine": p.engine,
                "point": p.point,
                "ttft_p50_ms": p.latency("ttft", "p50"),
                "measured": p.cache_share,
                "expected": p.cache_expected_share,
            }
            for p in points
            if p.cache_share is not None
        ],
    }
    return points, engines, slo, description


def _host_facts(manifest: Mapping[str, Any]) -> dict[str, Any]:
    """What of the host a result depends on: architecture, cores, CPU model and instruction-set features, GPUs."""
    host = manifest.get("host") or {}
    gpus = host.get("gpus") or manifest.get("gpus") or []
    return {
        "machine": host.get("machine"),
        "cores": host.get("cores"),
        "cpu_model": host.get("cpu_model"),
        "cpu_features": list(host.get("cpu_features") or [])
        if host.get("cpu_features") is not None
        else None,
        "gpus": [str(g.get("name", g)) if isinstance(g, Mapping) else str(g) for g in gpus if g],
    }


def _engine_facts(manifest: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Per engine of the run: the dtype it was launched with and why, and the log lines known to cost speed."""
    out: dict[str, dict[str, Any]] = {}
    for e in manifest.get("engines") or []:
        if not isinstance(e, Mapping) or not e.get("name"):
            continue
        out[str(e["name"])] = {
            "dtype_choice": e.get("dtype_choice"),
            "log_warnings": list(e.get("log_warnings") or []),
        }
    return out


# instruction-set features whose absence makes CPU engines slower (adapters.hostcpu: oneDNN's bf16 kernels)
_FAST_CPU_FEATURES = ("avx512f", "avx512_bf16", "amx_bf16")


def host_notes(runs: Sequence[Mapping[str, Any]]) -> list[str]:
    """ "This result depends on ..." sentences from the runs' host and engine facts (decision `notes`)."""
    notes: list[str] = []
    for run in runs:
        host = run.get("host") or {}
        where = f"{run.get('workload')} run {run.get('run_id')}" if len(runs) > 1 else "this run"
        cpu = " ".join(
            str(x)
            for x in (
                host.get("cpu_model"),
                f"({host['cores']} cores, {host.get('machine') or 'architecture unknown'})"
                if host.get("cores")
                else None,
            )
            if x
        )
        features = host.get("cpu_features")
        gpus = host.get("gpus") or []
        if run.get("platform") == "cpu" or not gpus:
            if features is not None:
                missing = [f for f in _FAST_CPU_FEATURES if f not in features]
                text = (
                    f"this result depends on the host CPU: {where} ran on {cpu or 'an unrecorded CPU'} with "
                )
                text += ", ".join(features) if features else "no recorded vector extensions"
                if missing:
                    text += (
                        f" and without {', '.join(missing)}; CPU engines use different kernels on CPUs that have "
                        "them, so the ranking may differ there"
                    )
                notes.append(text)
            elif cpu:
                notes.append(
                    f"this result depends on the host CPU: {where} ran on {cpu} (its instruction-set features "
                    "were not recorded)"
                )
        if gpus:
            notes.append(f"this result depends on the GPU: {where} ran on {', '.join(gpus)}")
        for engine, facts in sorted((run.get("engine_facts") or {}).items()):
            dtype = facts.get("dtype_choice") or {}
            if isinstance(dtype, Mapping) and dtype.get("dtype"):
                notes.append(
                    f"{engine} ran in {dtype['dtype']}"
                    + (f" ({dtype['reason']})" if dtype.get("reason") else "")
                )
            for w in facts.get("log_warnings") or []:
                count = f" ({w.get('count')} times)" if (w.get("count") or 1) > 1 else ""
                notes.append(f"{engine} logged {w.get('message') or w.get('line')!r}{count}: {w.get('cost')}")
    return notes


def _jsonable(obj: Any) -> Any:
    if is_dataclass(obj) and not isinstance(obj, type):
        return _jsonable(asdict(obj))
    if isinstance(obj, Mapping):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list | tuple):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _weights(config: DecideConfig, warnings: list[str]) -> tuple[dict[str, float], dict[str, Any]]:
    profiles_doc = _builtin("profiles.yaml")
    profiles = parse_profiles(profiles_doc)
    if config.weights_file is not None:
        if config.profile is not None:
            warnings.append(f"--weights {config.weights_file} given: profile {config.profile} ignored")
        weights = parse_weights(read_data_file(config.weights_file, "weights file"), str(config.weights_file))
        return weights, {"name": None, "weights_file": str(config.weights_file)}
    name = config.profile or str(profiles_doc.get("default", next(iter(profiles))))
    if name not in profiles:
        raise ConfigError(f"unknown profile {name!r}; choose one of: {', '.join(profiles)}")
    return dict(profiles[name].weights), {"name": name, "description": profiles[name].description}


def _energy_price(config: DecideConfig) -> EnergyPrice | None:
    """--usd-per-kwh, else the `energy:` block of the user's price table; None: energy is not priced."""
    if config.usd_per_kwh is not None:
        if config.usd_per_kwh < 0:
            raise ConfigError(f"--usd-per-kwh {config.usd_per_kwh:g}: a price must be ≥ 0 ($ per kWh)")
        return EnergyPrice(config.usd_per_kwh, "--usd-per-kwh")
    if config.prices_file is None:
        return None
    doc = read_data_file(config.prices_file, "price table")
    return energy_price(doc.get("energy") if isinstance(doc, Mapping) else None, str(config.prices_file))


def _energy_cost(
    cap: Capacity, pts: Sequence[Point], replicas: int, config: DecideConfig, hours_per_month: float
) -> dict[str, Any] | None:
    """The capacity's GPU energy priced at the stated $/kWh, at the energy per token of the point it rests on."""
    price = _energy_price(config)
    if price is None:
        return None
    at = next((p for p in pts if p.point == cap.at_point and p.energy_per_output_token_j is not None), None)
    if at is None or at.energy_per_output_token_j is None:
        return {"note": f"no GPU energy measured at {cap.at_point} (NVML power): not priced"}
    cost = energy_cost(cap, replicas, at.energy_per_output_token_j, at.point, price, hours_per_month)
    return dict(_jsonable(cost))


def _capacity_rows(
    points: Sequence[Point],
    infos: Mapping[str, Sequence[EngineInfo]],
    slos: Mapping[str, Mapping[str, float]],
    prices: PriceTable,
    config: DecideConfig,
    hosts: Mapping[str, HostShape] | None = None,
) -> list[dict[str, Any]]:
    groups: dict[tuple[str, str, str], list[Point]] = defaultdict(list)
    for p in points:
        groups[(p.engine, p.workload, p.load_kind)].append(p)
    rows: list[dict[str, Any]] = []
    for (engine, workload, _), pts in sorted(groups.items()):
        slo = slos.get(workload, {})
        cap: Capacity = capacity(pts, slo)
        row: dict[str, Any] = {
            "capacity": _jsonable(cap),
            "replicas": None,
            "cost": None,
            "extrapolated": False,
        }
        if not slo:
            row["note"] = "no SLO in this run: capacity is the heaviest valid point"
        if cap.requests_per_s:
            platform = infos[engine][0].platform if infos.get(engine) else "cpu"
            peaks = [p.memory_peak_bytes for p in pts if p.valid and p.memory_peak_bytes is not None]
            choice = choose_instance(
                prices, platform, (hosts or {}).get(engine), max(peaks) if peaks else None, config.instance
            )
            reps = replicas_for(cap, config.target) if config.target else None
            n = reps.replicas if reps and reps.replicas else 1
            row["cost"] = _jsonable(cost_of(cap, n, choice.instance, prices.hours_per_month, choice.why))
            energy = _energy_cost(cap, pts, n, config, prices.hours_per_month)
            if energy is not None:
                row["energy_cost"] = energy
            if reps is not None:
                row["replicas"] = _jsonable(reps)
                row["extrapolated"] = reps.extrapolated
        rows.append(row)
    return rows


def decide(config: DecideConfig) -> dict[str, Any]:
    """The whole decision as a JSON-ready dict (and written to `config.json_out` when set)."""
    if not config.run_dirs:
        raise ConfigError("no run directory given; pass one or more directories written by `bench run`")
    warnings: list[str] = []
    weights, profile = _weights(config, warnings)
    knowledge = load_knowledge(config.knowledge_file)
    prices = parse_prices(_builtin("gpu_prices.yaml"), "builtin prices")
    if config.prices_file is not None:
        prices = parse_prices(read_data_file(config.prices_file, "price table"), str(config.prices_file))
    use_cases = None
    if config.plan_file:
        from adapters.knowledge import normalize_hardware

        use_cases = [
            replace(
                uc,
                must_run_on=normalize_hardware(
                    uc.must_run_on, f"plan file {config.plan_file}, use case {uc.name}: must_run_on"
                ),
            )
            if uc.must_run_on
            else uc
            for uc in parse_plan(read_data_file(config.plan_file, "plan file"), str(config.plan_file))
        ]

    points: list[Point] = []
    infos: dict[str, list[EngineInfo]] = defaultdict(list)
    slos: dict[str, dict[str, float]] = {}
    runs: list[dict[str, Any]] = []
    hosts: dict[str, HostShape] = {}
    fingerprints: dict[str, tuple[str, str]] = {}
    for run_dir in config.run_dirs:
        pts, engines, slo, desc = load_run(Path(run_dir))
        fp = str(desc.get("fingerprint") or "")
        seen = fingerprints.get(desc["workload"])
        if seen and fp and seen[0] and seen[0] != fp:
            raise CompareError(
                f"workload {desc['workload']!r} has fingerprint {fp} in {run_dir} but {seen[0]} in {seen[1]}: "
                "results of different workload versions are never compared; decide on runs of one version"
            )
        fingerprints.setdefault(desc["workload"], (fp, str(run_dir)))
        points.extend(pts)
        for e in engines:
            infos[e.name].append(e)
        if slo:
            slos.setdefault(desc["workload"], parse_slo(slo, f"SLO of {run_dir}"))
        host = desc["host"]
        for engine in desc["engines"]:
            hosts.setdefault(
                engine,
                HostShape(
                    str(host.get("machine") or ""), host.get("cores"), str(host.get("cpu_model") or "")
                ),
            )
        runs.append(desc)
    for engine in sorted({p.engine for p in points}):
        bad = [p for p in points if p.engine == engine and not p.valid]
        if bad:
            why = sorted({r for p in bad for r in p.invalid_reasons}) or ["no reason given"]
            warnings.append(f"{engine}: {len(bad)} INVALID point(s) ignored ({', '.join(why)})")
    for engine in sorted({p.engine for p in points} - {p.engine for p in points if p.valid}):
        warnings.append(f"{engine}: no VALID point: left out of the ranking (and never assigned in a plan)")
    if not any(p.valid for p in points):
        warnings.append("no VALID point in any run: measured criteria are all missing")

    raw = raw_values(points, infos, knowledge)
    ranking = score_all(raw, weights)
    for r in ranking:
        if r.missing:
            warnings.append(
                f"{r.engine}: no data for {', '.join(r.missing)}; left out of its total and the remaining weights "
                f"renormalized ({r.weight_used:.0%} of the weight had data)"
            )
        facts = knowledge.lookup(*(i.adapter for i in infos.get(r.engine, ())), r.engine)
        if facts and facts.status and facts.status != "active":
            eco = facts.scores.get("ecosystem")
            warnings.append(
                f"{r.engine}: upstream status is {facts.status}" + (f" ({eco.why})" if eco else "")
            )
    sens = sensitivity(ranking, weights, config.tie_margin)
    plan_instance = config.instance
    if plan_instance is None and use_cases and all(r["platform"] == "cpu" for r in runs) and hosts:
        # the plan prices CPU engines on the instance that matches the host, as the capacity rows do
        plan_instance = choose_instance(prices, "cpu", next(iter(hosts.values()))).instance.name
    plan = make_plan(use_cases, points, infos, knowledge, prices, plan_instance) if use_cases else None
    if plan is not None:
        for a in plan.assignments:
            if a.status == "unservable":
                warnings.append(f"use case {a.use_case.name}: {a.note}")
    decision: dict[str, Any] = {
        "schema_version": DECISION_SCHEMA_VERSION,
        "kind": "decision",
        "generated_at": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "inputs": {
            "runs": runs,
            "knowledge": knowledge.origin,
            "prices": prices.origin,
            "energy_price": _jsonable(_energy_price(config)),
            "plan": str(config.plan_file) if config.plan_file else None,
            "instance": config.instance,
            "target": _jsonable(config.target) if config.target else None,
        },
        "criteria": [_jsonable(c) for c in CRITERIA],
        "rules": RULES,
        "profile": profile,
        "weights": weights,
        "scores": [
            {
                "engine": r.engine,
                "total": r.total,
                "missing": list(r.missing),
                "weight_used": r.weight_used,
                "renormalized": bool(r.missing),
                "criteria": {c: _jsonable(s) for c, s in r.scores.items()},
            }
            for r in ranking
        ],
        "ranking": [r.engine for r in ranking if r.total is not None],
        "winner": sens.winner,
        "sensitivity": _jsonable(sens),
        "capacity": _capacity_rows(points, infos, slos, prices, config, hosts),
        "prices": {n: _jsonable(i) for n, i in prices.instances.items()},
        "plan": _jsonable(plan) if plan is not None else None,
        "warnings": warnings,
        "notes": host_notes(runs),
    }
    if config.json_out is not None:
        write_json(decision, config.json_out)
    return decision


def write_json(decision: Mapping[str, Any], path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(
            json.dumps(decision, indent=2, ensure_ascii=False, allow_nan=False) + "\n", encoding="utf-8"
        )
    except OSError as e:
        raise ConfigError(f"cannot write {path}: {e.strerror}") from None


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:.{digits}g}"
    return str(value)


def render(decision: Mapping[str, Any], console: Any) -> None:
    """Rich tables: scores, sensitivity, capacity and cost, plan, warnings."""
    from rich.markup import escape
    from rich.table import Table

    profile = decision["profile"].get("name") or decision["profile"].get("weights_file")
    t = Table(title=f"Decision matrix — profile {profile}  (score 1–5, raw value below; — = missing)")
    t.add_column("engine")
    t.add_column("total", justify="right")
    shown = [c["name"] for c in decision["criteria"] if decision["weights"].get(c["name"], 0) > 0]
    for c in shown:
        t.add_column(f"{c}\nw={decision['weights'][c]:.2f}", justify="right")
    for row in decision["scores"]:
        cells = [row["engine"] + (" *" if row["renormalized"] else ""), _fmt(row["total"])]
        for c in shown:
            s = row["criteria"][c]
            cells.append(f"{_fmt(s['score'])}\n[dim]{_fmt(s['raw'])}[/]")
        t.add_row(*cells)
    console.print(t)
    if any(r["renormalized"] for r in decision["scores"]):
        console.print(
            "[dim]* some criteria missing: excluded from the total, remaining weights renormalized[/]"
        )
    sens = decision["sensitivity"]
    if sens["winner"]:
        st = Table(title=f"Sensitivity — how far each weight must move before {sens['winner']} loses the top")
        for col in ("criterion", "weight", "raise by", "→ challenger", "lower by", "→ challenger"):
            st.add_column(col)
        for w in sens["weights"]:
            up, down = w["increase"], w["decrease"]
            st.add_row(
                w["criterion"],
                f"{w['weight']:.3f}",
                f"+{up['delta']:.3f} ({_fmt(up['relative'] and up['relative'] * 100, 3)}%)"
                if up
                else "never",
                up["challenger"] if up else "",
                f"{down['delta']:.3f} ({_fmt(down['relative'] and down['relative'] * 100, 3)}%)"
                if down
                else "never",
                down["challenger"] if down else "",
            )
        console.print(st)
        for engine, gap in sens["near_ties"]:
            console.print(
                f"[yellow]near tie:[/] {engine} is {gap:.3f} behind {sens['winner']} (margin {sens['margin']})"
            )
    ct = Table(title="Capacity under the run's SLO (one replica) and cost")
    for col in (
        "engine", "workload", "sustained", "req/s", "how", "replicas", "instance", "$/month", "$/1M out tok",
    ):  # fmt: skip
        ct.add_column(col)
    for row in decision["capacity"]:
        cap, cost, reps = row["capacity"], row["cost"], row["replicas"]
        how = "interpolated" if cap["interpolated"] else ("lower bound" if cap["lower_bound"] else "measured")
        ct.add_row(
            cap["engine"],
            cap["workload"],
            f"{cap['load_kind']}={_fmt(cap['sustained_load'])}"
            if cap["sustained_load"] is not None
            else "misses SLO",
            _fmt(cap["requests_per_s"]),
            how,
            _fmt(reps and reps["replicas"]) + (" (extrapolated)" if row["extrapolated"] else ""),
            _fmt(cost and cost["instance"]),
            _fmt(cost and cost["usd_per_month"], 4),
            _fmt(cost and cost["usd_per_1m_output_tokens"]),
        )
    console.print(ct)
    plan = decision.get("plan")
    if plan:
        pt = Table(title="Hybrid plan")
        for col in ("use case", "engine", "settings", "replicas", "instance", "$/month", "note"):
            pt.add_column(col)
        for a in plan["assignments"]:
            ch = a["chosen"]
            if ch is None:
                pt.add_row(a["use_case"]["name"], "[red]none[/]", "", "", "", "", a["note"])
                continue
            settings = f"{ch['settings'].get('load_kind')}={_fmt(ch['settings'].get('load_per_replica'))}"
            pt.add_row(
                a["use_case"]["name"],
                ch["engine"],
                settings,
                _fmt(ch["replicas"] and ch["replicas"]["replicas"]),
                _fmt(ch["cost"] and ch["cost"]["instance"]),
                _fmt(ch["cost"]["usd_per_month"] if ch["cost"] else 0.0, 4),
                ch["reason"],
            )
        console.print(pt)
        console.print(plan["note"])
    for w in decision["warnings"]:
        console.print(f"[yellow]warning:[/] {w}", highlight=False)
    for note in decision.get("notes") or []:
        console.print(f"[cyan]note:[/] {escape(note)}", highlight=False)
    if decision["winner"]:
        console.print(f"[bold]winner:[/] {decision['winner']}")


def decision_reasons(decision: Mapping[str, Any], limit: int = 3) -> list[dict[str, Any]]:
    """The criteria that decided the ranking: where the winner's weighted score leads the runner-up's the most
    (with both raw values); with one engine ranked, its heaviest-weighted scored criteria."""
    ranked = [s for s in decision.get("scores") or [] if s.get("total") is not None]
    if not ranked:
        return []
    weights = decision.get("weights") or {}
    top = ranked[0]
    second = ranked[1] if len(ranked) > 1 else None
    units = {c["name"]: c.get("unit", "") for c in decision.get("criteria") or []}
    rows = []
    for name, cell in (top.get("criteria") or {}).items():
        w = float(weights.get(name, 0.0) or 0.0)
        if w <= 0 or cell.get("score") is None:
            continue
        other = (second.get("criteria") or {}).get(name) if second else None
        if second is not None and (other is None or other.get("score") is None):
            continue
        lead = w * (cell["score"] - (other["score"] if other else 0))
        rows.append(
            {
                "criterion": name,
                "weight": w,
                "unit": units.get(name) or cell.get("unit") or "",
                "winner": top["engine"],
                "winner_raw": cell.get("raw"),
                "winner_score": cell["score"],
                "other": second["engine"] if second else None,
                "other_raw": other.get("raw") if other else None,
                "other_score": other.get("score") if other else None,
                "lead": lead,
            }
        )
    rows.sort(key=lambda r: -r["lead"])
    if second is not None:
        rows = [r for r in rows if r["lead"] > 0] or rows
    return rows[:limit]


def _raw(value: Any, unit: str) -> str:
    if value is None:
        return "—"
    if isinstance(value, int | float):
        v = float(value)
        text = f"{v:,.0f}" if abs(v) >= 1000 else f"{v:.3g}"
    else:
        text = str(value)
    return f"{text} {unit}".strip() if unit and unit not in ("score", "1-5") else text


def render_brief(decision: Mapping[str, Any], console: Any, report: Path | None = None) -> None:
    """The answer in a few lines: the recommendation and the criteria that decided it (with numbers), capacity and
    cost per engine with the instance that prices it, what the result depends on, and where the report is."""
    from rich.markup import escape

    profile = decision["profile"].get("name") or decision["profile"].get("weights_file")
    winner = decision.get("winner")
    scores = {s["engine"]: s.get("total") for s in decision.get("scores") or []}
    console.rule("[bold]Recommendation", style="dim")
    if winner:
        ranked = [e for e in decision.get("ranking") or [] if scores.get(e) is not None]
        others = ", ".join(f"{escape(e)} {scores[e]:.2f}" for e in ranked if e != winner)
        console.print(
            f"[bold green]Run {escape(winner)}[/] for this workload on this machine "
            f"(weighted score {scores[winner]:.2f} of 5, profile {escape(str(profile))}"
            + (f"; {others}" if others else "")
            + ").",
            highlight=False,
        )
        reasons = decision_reasons(decision)
        if reasons:
            console.print("Why:", highlight=False)
        for r in reasons:
            line = f"  • {r['criterion']} (weight {r['weight']:.2f}): {escape(r['winner'])} {_raw(r['winner_raw'], r['unit'])}"
            if r["other"]:
                line += f" vs {escape(r['other'])} {_raw(r['other_raw'], r['unit'])}"
            line += f" — score {r['winner_score']}" + (f" vs {r['other_score']}" if r["other"] else "")
            console.print(line, highlight=False)
        for engine, gap in (decision.get("sensitivity") or {}).get("near_ties") or []:
            console.print(
                f"  [yellow]near tie:[/] {escape(engine)} is only {gap:.2f} behind: the choice is close",
                highlight=False,
            )
    else:
        console.print(
            "[red]No recommendation:[/] no engine has a VALID measurement to rank (see the warnings below).",
            highlight=False,
        )
    if decision.get("capacity"):
        console.print("Capacity of one replica under the run's SLO, and its cost:", highlight=False)
    for row in decision.get("capacity") or []:
        cap, cost = row["capacity"], row.get("cost")
        sustained = (
            f"{cap['load_kind']}={_fmt(cap['sustained_load'])}"
            if cap.get("sustained_load") is not None
            else None
        )
        line = f"  {escape(str(cap['engine']))}: "
        if sustained is None:
            line += "no VALID load point" + (" within the SLO" if cap.get("slo") else "")
        else:
            line += f"{_fmt(cap.get('requests_per_s'))} req/s, {_fmt(cap.get('output_tokens_per_s'))} output tok/s"
            line += f" at {sustained}" + (" (lower bound)" if cap.get("lower_bound") else "")
        if cost:
            line += (
                f"; on {escape(str(cost['instance']))} (${cost['usd_per_hour']:.4g}/h): "
                f"${_fmt(cost['usd_per_month'], 4)}/month, "
                f"${_fmt(cost.get('usd_per_1m_output_tokens'))} per 1M output tokens"
            )
        console.print(line, highlight=False)
        if cost and cost.get("why"):
            console.print(f"    [dim]instance: {escape(cost['why'])}[/]", highlight=False)
        if row.get("note"):
            console.print(f"    [dim]{escape(row['note'])}[/]", highlight=False)
    for w in decision.get("warnings") or []:
        console.print(f"[yellow]warning:[/] {escape(w)}", highlight=False)
    for note in decision.get("notes") or []:
        console.print(f"[cyan]note:[/] {escape(note)}", highlight=False)
    if report is not None:
        console.print(f"decision report: {report}", highlight=False, soft_wrap=True)
