"""The hybrid deployment plan: for each use case, the engine and load point that meet its SLO at least cost.

A use case names a workload, an SLO, its traffic, hardware constraints (`must_run_on: amd|nvidia|cpu|...`,
`on_device: true`) and an optional budget. An engine is a candidate only if the knowledge file says it runs on the
required hardware, it has VALID points on that workload that meet the SLO, and it fits the budget; an engine that
misses the SLO is never assigned. Each exclusion is kept with its reason, and a use case no engine can serve says
so. The plan's total is compared with the cheapest single engine that serves every use case.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from harness.errors import ConfigError, SchemaError
from matrix.capacity import Capacity, Replicas, Traffic, capacity, parse_slo, replicas_for
from matrix.cost import Cost, PriceTable, cost_of
from matrix.inputs import EngineInfo, Point
from matrix.knowledge import Knowledge

__all__ = [
    "PLAN_SCHEMA_VERSION",
    "Assignment",
    "Option",
    "PlanResult",
    "SingleEngine",
    "UseCase",
    "make_plan",
    "parse_plan",
]

PLAN_SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class UseCase:
    name: str
    workload: str
    slo: Mapping[str, float]
    traffic: Traffic
    must_run_on: str | None = None
    on_device: bool = False
    max_usd_per_month: float | None = None


def _number(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or value < 0:
        raise ConfigError(f"{where} must be a number ≥ 0, got {value!r}")
    return float(value)


def parse_plan(data: Any, origin: str = "plan") -> list[UseCase]:
    if not isinstance(data, Mapping):
        raise SchemaError(f"plan file {origin} must be a mapping with schema_version and use_cases")
    if data.get("schema_version", PLAN_SCHEMA_VERSION) != PLAN_SCHEMA_VERSION:
        raise SchemaError(
            f"plan file {origin} has schema_version {data.get('schema_version')!r}; this EngineBench reads "
            f"{PLAN_SCHEMA_VERSION}"
        )
    raw = data.get("use_cases")
    if not isinstance(raw, list) or not raw:
        raise ConfigError(f"plan file {origin} needs a non-empty `use_cases` list")
    out: list[UseCase] = []
    for i, uc in enumerate(raw):
        where = f"plan file {origin}, use case {i + 1}"
        if not isinstance(uc, Mapping) or not uc.get("name") or not uc.get("workload"):
            raise ConfigError(f"{where} needs at least `name` and `workload`")
        where = f"plan file {origin}, use case {uc['name']}"
        slo = parse_slo(uc.get("slo") or {}, where)
        if not slo:
            raise ConfigError(f"{where} needs an `slo` (e.g. ttft_p95_ms: 500)")
        t = uc.get("traffic") or {}
        if not isinstance(t, Mapping):
            raise ConfigError(f"{where}: traffic must be a mapping")
        traffic = Traffic(
            requests_per_s=_number(t.get("requests_per_s"), f"{where}: traffic.requests_per_s"),
            concurrent_users=_number(t.get("concurrent_users"), f"{where}: traffic.concurrent_users"),
            think_time_s=_number(t.get("think_time_s"), f"{where}: traffic.think_time_s") or 0.0,
        )
        if traffic.requests_per_s is None and traffic.concurrent_users is None:
            raise ConfigError(f"{where}: traffic needs requests_per_s or concurrent_users")
        hw = uc.get("hardware") or {}
        if not isinstance(hw, Mapping):
            raise ConfigError(f"{where}: hardware must be a mapping")
        must = hw.get("must_run_on", uc.get("must_run_on"))
        out.append(
            UseCase(
                name=str(uc["name"]),
                workload=str(uc["workload"]),
                slo=slo,
                traffic=traffic,
                must_run_on=str(must).lower() if must else None,
                on_device=bool(hw.get("on_device", uc.get("on_device", False))),
                max_usd_per_month=_number(
                    uc.get("max_usd_per_month", uc.get("max_cost")), f"{where}: max_usd_per_month"
                ),
            )
        )
    names = [u.name for u in out]
    if len(set(names)) != len(names):
        raise ConfigError(f"plan file {origin}: use case names must be unique")
    return out


@dataclass(frozen=True, slots=True)
class Option:
    """One engine's answer to one use case; `feasible` False carries the reason it was excluded."""

    engine: str
    feasible: bool
    reason: str
    capacity: Capacity | None = None
    replicas: Replicas | None = None
    cost: Cost | None = None
    settings: Mapping[str, object] = field(default_factory=dict)

    @property
    def usd_per_month(self) -> float | None:
        return self.cost.usd_per_month if self.cost else (0.0 if self.feasible else None)


@dataclass(frozen=True, slots=True)
class Assignment:
    use_case: UseCase
    status: Literal["assigned", "unservable"]
    chosen: Option | None
    options: tuple[Option, ...]
    note: str


@dataclass(frozen=True, slots=True)
class SingleEngine:
    engine: str
    usd_per_month: float


@dataclass(frozen=True, slots=True)
class PlanResult:
    assignments: tuple[Assignment, ...]
    hybrid_usd_per_month: float | None  # None when some use case is unservable
    best_single: SingleEngine | None
    single_candidates: tuple[SingleEngine, ...]
    savings_usd_per_month: float | None
    note: str


def _option(
    uc: UseCase,
    engine: str,
    points: Sequence[Point],
    infos: Sequence[EngineInfo],
    knowledge: Knowledge,
    prices: PriceTable,
    instance: str | None,
) -> Option:
    facts = knowledge.lookup(*(i.adapter for i in infos), engine)
    if uc.must_run_on or uc.on_device:
        if facts is None:
            return Option(engine, False, "hardware support unknown (no knowledge entry)")
        if uc.must_run_on and uc.must_run_on not in facts.hardware:
            return Option(
                engine, False, f"does not run on {uc.must_run_on} (runs on {', '.join(facts.hardware)})"
            )
        if uc.on_device and not facts.on_device:
            return Option(engine, False, "not an on-device engine")
    mine = [p for p in points if p.engine == engine and p.workload == uc.workload]
    if not mine:
        return Option(engine, False, f"not measured on workload {uc.workload}")
    # A concurrency sweep and a rate sweep are sized separately; the one sustaining more req/s is used.
    caps = [
        capacity([p for p in mine if p.load_kind == k], uc.slo) for k in sorted({p.load_kind for p in mine})
    ]
    cap = max(caps, key=lambda c: (c.sustained_load is not None, c.requests_per_s or 0.0))
    if cap.sustained_load is None:
        return Option(engine, False, cap.note, capacity=cap)
    settings: dict[str, object] = {
        "load_kind": cap.load_kind,
        "load_per_replica": cap.sustained_load,
        "at_point": cap.at_point,
        "interpolated": cap.interpolated,
    }
    if infos and infos[0].config:
        settings["engine_config"] = dict(infos[0].config)
    reps = replicas_for(cap, uc.traffic)
    if uc.on_device:
        return Option(
            engine,
            True,
            "meets the SLO on the measured hardware; runs on users' devices (no serving cost)",
            capacity=cap,
            settings=settings,
        )
    if reps.replicas is None:
        return Option(engine, False, reps.note, capacity=cap, replicas=reps)
    platform = infos[0].platform if infos else "cpu"
    inst = prices.for_platform(platform, instance)
    cost = cost_of(cap, reps.replicas, inst, prices.hours_per_month)
    if uc.max_usd_per_month is not None and cost.usd_per_month > uc.max_usd_per_month:
        return Option(
            engine,
            False,
            f"${cost.usd_per_month:,.0f}/month exceeds the budget ${uc.max_usd_per_month:,.0f}",
            capacity=cap,
            replicas=reps,
            cost=cost,
            settings=settings,
        )
    return Option(engine, True, "meets the SLO", capacity=cap, replicas=reps, cost=cost, settings=settings)


def make_plan(
    use_cases: Sequence[UseCase],
    points: Sequence[Point],
    infos: Mapping[str, Sequence[EngineInfo]],
    knowledge: Knowledge,
    prices: PriceTable,
    instance: str | None = None,
) -> PlanResult:
    engines = sorted({p.engine for p in points})
    assignments: list[Assignment] = []
    for uc in use_cases:
        options = tuple(
            _option(uc, e, points, infos.get(e, ()), knowledge, prices, instance) for e in engines
        )
        feasible = [o for o in options if o.feasible]
        if not feasible:
            assignments.append(
                Assignment(
                    uc,
                    "unservable",
                    None,
                    options,
                    f"no engine can serve {uc.name}: every candidate was excluded",
                )
            )
            continue
        chosen = min(
            feasible,
            key=lambda o: (
                o.usd_per_month or 0.0,
                -(o.capacity.requests_per_s or 0.0) if o.capacity else 0.0,
                o.engine,
            ),
        )
        assignments.append(
            Assignment(uc, "assigned", chosen, options, f"{chosen.engine}: least cost meeting the SLO")
        )
    served = all(a.status == "assigned" for a in assignments)
    hybrid = sum((a.chosen.usd_per_month or 0.0) for a in assignments if a.chosen) if served else None
    singles: list[SingleEngine] = []
    for engine in engines:
        opts = [next(o for o in a.options if o.engine == engine) for a in assignments]
        if all(o.feasible for o in opts):
            singles.append(SingleEngine(engine, sum(o.usd_per_month or 0.0 for o in opts)))
    singles.sort(key=lambda s: (s.usd_per_month, s.engine))
    best = singles[0] if singles else None
    savings = best.usd_per_month - hybrid if (best is not None and hybrid is not None) else None
    if not served:
        note = "some use cases cannot be served by any measured engine; the plan is incomplete"
    elif best is None:
        note = "no single engine serves every use case: the hybrid plan is the only complete deployment"
    elif savings is not None and savings > 0:
        note = f"hybrid saves ${savings:,.2f}/month over the best single engine ({best.engine})"
    else:
        note = f"one engine ({best.engine}) serves every use case as cheaply as the hybrid plan"
    return PlanResult(tuple(assignments), hybrid, best, tuple(singles), savings, note)
