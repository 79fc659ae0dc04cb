"""The matrix's pure functions against synthetic measurements with answers known by hand."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import yaml

from harness.errors import ConfigError
from matrix.capacity import Traffic, capacity, check_slo, replicas_for
from matrix.cost import cost_of, parse_prices
from matrix.criteria import CRITERION_NAMES, raw_values
from matrix.inputs import EngineInfo, Point, classify_workload
from matrix.knowledge import QUALITATIVE, Knowledge, merge_knowledge, parse_knowledge
from matrix.plan import make_plan, parse_plan
from matrix.profiles import parse_profiles, parse_weights
from matrix.scoring import CriterionScore, EngineScore, normalize_weights, score_all, weighted_total
from matrix.sensitivity import flip_points, sensitivity

DATA = Path(__file__).resolve().parent.parent / "matrix" / "data"


def _data(name: str) -> object:
    return yaml.safe_load((DATA / name).read_text(encoding="utf-8"))


def _pt(
    engine: str, conc: float, ttft95: float, *, tpot95: float = 20.0, rps: float = 1.0, valid: bool = True,
    workload: str = "chat", goodput: float | None = None, err: float = 0.0, memory: float | None = None,
    e2e_mean: float = 1000.0, out_tps: float = 100.0, in_tps: float = 200.0,
) -> Point:  # fmt: skip
    return Point(
        engine=engine,
        point=f"concurrency={conc:g}",
        workload=workload,
        role=classify_workload(workload),
        load_kind="concurrency",
        load_value=conc,
        valid=valid,
        invalid_reasons=() if valid else ("too_few_requests",),
        measured_requests=100,
        requests_per_s=rps,
        input_tokens_per_s=in_tps,
        output_tokens_per_s=out_tps,
        goodput_requests_per_s=rps if goodput is None else goodput,
        error_rate=err,
        latency_ms={
            "ttft": {"p50": ttft95 / 2, "p95": ttft95},
            "tpot": {"p95": tpot95},
            "e2e": {"mean": e2e_mean, "p95": e2e_mean * 1.5},
        },
        memory_peak_bytes=memory,
    )


@pytest.fixture(scope="module")
def knowledge() -> Knowledge:
    # the built-in knowledge: engine facts (adapters.knowledge) joined with the scores file, as `bench decide` reads it
    from harness.decide import builtin_knowledge

    return builtin_knowledge()


@pytest.fixture(scope="module")
def profiles() -> dict:
    return parse_profiles(_data("profiles.yaml"))


# -- scoring ----------------------------------------------------------------------------------------------------


def test_clearly_faster_engine_wins_latency_profile(knowledge: Knowledge, profiles: dict) -> None:
    points = [
        _pt("fast", 1, 50, tpot95=20, rps=4),
        _pt("fast", 4, 80, tpot95=25, rps=12),
        _pt("slow", 1, 400, tpot95=60, rps=1),
        _pt("slow", 4, 900, tpot95=90, rps=3),
    ]
    weights = profiles["latency-critical-chatbot"].weights
    ranking = score_all(raw_values(points, {}, knowledge), weights)
    assert [r.engine for r in ranking] == ["fast", "slow"]
    fast, slow = ranking
    # common load is concurrency=4: TTFT 80 vs 900 → ratio 0.089 → 1; TPOT 25 vs 90 → 0.28 → 2
    assert fast.scores["ttft_p95"].raw == 80 and fast.scores["ttft_p95"].score == 5
    assert slow.scores["ttft_p95"].raw == 900 and slow.scores["ttft_p95"].score == 1
    assert slow.scores["tpot_p95"].score == 2
    assert fast.total is not None and slow.total is not None and fast.total - slow.total > 2


def test_missing_data_is_never_scored_as_zero(knowledge: Knowledge) -> None:
    points = [_pt("a", 2, 100, memory=200 * 2**20), _pt("b", 2, 100)]  # b has no memory telemetry
    weights = normalize_weights({"ttft_p95": 1, "memory_per_request": 1})
    ranking = {r.engine: r for r in score_all(raw_values(points, {}, knowledge), weights)}
    b = ranking["b"]
    assert b.scores["memory_per_request"].raw is None and b.scores["memory_per_request"].score is None
    assert b.missing == ("memory_per_request",)
    assert b.total == pytest.approx(5.0)  # renormalized over TTFT alone; a zero would give 2.5
    assert b.weight_used == pytest.approx(0.5)
    assert ranking["a"].scores["memory_per_request"].raw == pytest.approx(100.0)  # 200 MiB / 2 in flight


def test_invalid_points_are_ignored(knowledge: Knowledge) -> None:
    points = [
        _pt("a", 1, 100, rps=2),
        _pt("a", 8, 10, rps=500, valid=False),  # a miraculous INVALID point must not count anywhere
        _pt("b", 1, 100, rps=2),
        _pt("c", 1, 10, rps=900, valid=False),  # an engine with no VALID point is not ranked at all
    ]
    raw = raw_values(points, {}, knowledge)
    assert all("c" not in per for per in raw.values())
    assert raw["goodput"]["a"].value == 2
    assert raw["ttft_p95"]["a"].value == 100
    cap = capacity([p for p in points if p.engine == "a"], {"ttft_p95_ms": 1000})
    assert cap.sustained_load == 1 and cap.at_point == "concurrency=1"


def test_ratio_bands_and_error_rate_bands(knowledge: Knowledge) -> None:
    points = [_pt(e, 1, t, err=err) for e, t, err in [("a", 100, 0.0), ("b", 130, 0.015), ("c", 210, 0.2)]]
    scores = {
        r.engine: r.scores
        for r in score_all(raw_values(points, {}, knowledge), normalize_weights({"ttft_p95": 1}))
    }
    assert scores["b"]["ttft_p95"].score == 4  # 100/130 = 0.77
    assert scores["c"]["ttft_p95"].score == 2  # 100/210 = 0.48
    assert [scores[e]["error_rate"].score for e in "abc"] == [5, 3, 1]


def test_unknown_criterion_in_weights_is_named() -> None:
    with pytest.raises(ConfigError, match="'latency'"):
        parse_weights({"latency": 1, "goodput": 2}, "w.yaml")
    with pytest.raises(ConfigError, match="all weights are zero"):
        parse_weights({"weights": {"goodput": 0}}, "w.yaml")
    assert sum(parse_weights({"weights": {"goodput": 3, "ttft_p95": 1}}, "w.yaml").values()) == pytest.approx(
        1
    )


def test_profiles_cover_the_five_use_cases(profiles: dict) -> None:
    assert set(profiles) == {
        "latency-critical-chatbot", "batch-throughput", "cost-first", "heterogeneous-hardware", "edge-offline"
    }  # fmt: skip
    for p in profiles.values():
        assert set(p.weights) == set(CRITERION_NAMES) and sum(p.weights.values()) == pytest.approx(1.0)


# -- sensitivity ------------------------------------------------------------------------------------------------


def _engine(name: str, scores: dict[str, int | None], weights: dict[str, float]) -> EngineScore:
    per = {c: CriterionScore(c, None if s is None else float(s), "", s, "") for c, s in scores.items()}
    total, used = weighted_total(scores, weights)
    return EngineScore(name, per, total, tuple(c for c, s in scores.items() if s is None), used)


def test_sensitivity_finds_the_hand_computed_flip_point() -> None:
    # A = (5, 1), B = (2, 3), weights 0.5/0.5 → A 3.0, B 2.5.
    # Raise w2 by δ: (2.5 + (0.5+δ)) = (1 + 3(0.5+δ)) → δ = 0.25 (w2 0.5 → 0.75, +50 %, share 0.6).
    # Lower w1 by δ: 5(0.5+δ) + 0.5 = 2(0.5+δ) + 1.5 → δ = −1/6 (w1 0.5 → 1/3).
    w = {"k1": 0.5, "k2": 0.5}
    a, b = _engine("A", {"k1": 5, "k2": 1}, w), _engine("B", {"k1": 2, "k2": 3}, w)
    s = sensitivity([a, b], w)
    rows = {r.criterion: r for r in s.weights}
    assert s.winner == "A"
    up = rows["k2"].increase
    assert up is not None and up.challenger == "B"
    assert up.delta == pytest.approx(0.25, abs=1e-12)
    assert up.relative == pytest.approx(0.5) and up.share_after == pytest.approx(0.6)
    down = rows["k1"].decrease
    assert down is not None and down.delta == pytest.approx(-1 / 6, abs=1e-12)
    assert rows["k1"].increase is None and rows["k2"].decrease is None  # those moves only help A
    assert s.near_ties == ()


def test_sensitivity_with_missing_data_is_exact() -> None:
    # B has no score on k2: its weights renormalize differently from A's. Check each flip point by re-scoring just
    # below and just above it (the leader must change exactly there).
    w = {"k1": 0.3, "k2": 0.3, "k3": 0.4}
    sa: dict[str, int | None] = {"k1": 5, "k2": 3, "k3": 3}
    sb: dict[str, int | None] = {"k1": 3, "k2": None, "k3": 4}
    a, b = _engine("A", sa, w), _engine("B", sb, w)
    assert a.total == pytest.approx(3.6) and b.total == pytest.approx(2.5 / 0.7)
    for k in ("k2", "k3"):  # raising k2 pulls A toward its 3 (B stays 3.57); raising k3 pulls B toward 4
        up, _ = flip_points(a, b, w, k)
        assert up is not None, k
        for delta, a_leads in ((up * (1 - 1e-6), True), (up * (1 + 1e-6), False)):
            moved = {**w, k: w[k] + delta}
            ta, _ = weighted_total(sa, moved)
            tb, _ = weighted_total(sb, moved)
            assert ta is not None and tb is not None
            assert (ta > tb) == a_leads, (k, delta)
    # by hand for k2: (3.6 + 3δ)/(1 + δ) = 25/7 → δ = (3.6 − 25/7)/(25/7 − 3) = 0.05
    assert flip_points(a, b, w, "k2")[0] == pytest.approx(0.05)


def test_near_tie_is_called_out() -> None:
    w = {"k1": 1.0}
    s = sensitivity([_engine("A", {"k1": 5}, w), _engine("B", {"k1": 5}, w)], w, margin=0.1)
    assert s.near_ties == (("B", 0.0),)


# -- capacity and cost ------------------------------------------------------------------------------------------


def test_capacity_interpolates_between_measured_points_and_says_so() -> None:
    pts = [_pt("e", 1, 100, rps=1.0), _pt("e", 2, 200, rps=1.8), _pt("e", 4, 600, rps=3.0)]
    cap = capacity(pts, {"ttft_p95_ms": 400})
    # TTFT crosses 400 halfway between 200 (c=2) and 600 (c=4) → c=3, rps 1.8 + 0.5·1.2 = 2.4
    assert cap.sustained_load == pytest.approx(3.0)
    assert cap.requests_per_s == pytest.approx(2.4)
    assert cap.interpolated and cap.between == ("concurrency=2", "concurrency=4")
    assert cap.limited_by == "ttft_p95_ms" and not cap.lower_bound
    assert "interpolated" in cap.note


def test_capacity_rounds_concurrency_down_to_whole_requests() -> None:
    pts = [_pt("e", 4, 200, rps=6.0), _pt("e", 8, 800, rps=8.0)]
    at6 = capacity(pts, {"ttft_p95_ms": 500})  # crossing at 4 + 4·(300/600) = 6 exactly
    assert at6.sustained_load == 6 and at6.requests_per_s == pytest.approx(7.0) and at6.interpolated
    at4 = capacity(
        pts, {"ttft_p95_ms": 300}
    )  # crossing at 4.67 → 4 whole requests: the measured point itself
    assert at4.sustained_load == 4 and at4.requests_per_s == 6.0 and not at4.interpolated
    assert "4.67" in at4.note or "fails" in at4.note


def test_capacity_never_extrapolates_beyond_the_sweep() -> None:
    pts = [_pt("e", 1, 100, rps=1.0), _pt("e", 2, 150, rps=1.9)]
    cap = capacity(pts, {"ttft_p95_ms": 1000})
    assert cap.sustained_load == 2 and cap.lower_bound and not cap.interpolated
    assert "lower bound" in cap.note
    none = capacity(pts, {"ttft_p95_ms": 50})
    assert none.sustained_load is None and "every measured point" in none.note


def test_replicas_for_users_with_think_time_flag_linear_scaling() -> None:
    cap = capacity([_pt("e", 4, 100, rps=2.0, e2e_mean=1000.0)], {"ttft_p95_ms": 500})
    reps = replicas_for(cap, Traffic(concurrent_users=10_000, think_time_s=30.0))
    # 10,000 users / (30 s + 1 s) = 322.58 req/s; / 2 req/s per replica → 162 replicas
    assert reps.required_requests_per_s == pytest.approx(10_000 / 31)
    assert reps.replicas == 162 and reps.extrapolated and "linearly" in reps.note
    one = replicas_for(cap, Traffic(requests_per_s=1.5))
    assert one.replicas == 1 and not one.extrapolated


def test_cost_per_month_and_per_million_tokens() -> None:
    prices = parse_prices(_data("gpu_prices.yaml"))
    inst = prices.for_platform("cpu")
    cap = capacity([_pt("e", 4, 100, rps=2.0, out_tps=100.0, in_tps=300.0)], {"ttft_p95_ms": 500})
    cost = cost_of(cap, 3, inst, prices.hours_per_month)
    assert cost.usd_per_month == pytest.approx(3 * inst.usd_per_hour * 730)
    assert cost.usd_per_1m_output_tokens == pytest.approx(inst.usd_per_hour / (100 * 3600) * 1e6)
    assert cost.usd_per_1m_tokens == pytest.approx(inst.usd_per_hour / (400 * 3600) * 1e6)


# -- plan -------------------------------------------------------------------------------------------------------


def _plan_points() -> list[Point]:
    return [
        # llamacpp: much cheaper (high rps) but misses a 300 ms TTFT SLO everywhere
        _pt("llamacpp", 1, 350, rps=50), _pt("llamacpp", 8, 900, rps=200),
        # vllm: meets 300 ms at concurrency 1 and 4
        _pt("vllm", 1, 100, rps=2), _pt("vllm", 4, 250, rps=6), _pt("vllm", 8, 700, rps=8),
    ]  # fmt: skip


def _infos() -> dict[str, list[EngineInfo]]:
    return {e: [EngineInfo(e, adapter=e, cold_start_s=1.0)] for e in ("llamacpp", "vllm")}


def test_plan_never_assigns_an_engine_that_misses_the_slo(knowledge: Knowledge) -> None:
    prices = parse_prices(_data("gpu_prices.yaml"))
    ucs = parse_plan({"use_cases": [
        {"name": "chat", "workload": "chat", "slo": {"ttft_p95_ms": 300}, "traffic": {"requests_per_s": 20}},
        {"name": "batch", "workload": "chat", "slo": {"ttft_p95_ms": 2000}, "traffic": {"requests_per_s": 20}},
    ]})  # fmt: skip
    plan = make_plan(ucs, _plan_points(), _infos(), knowledge, prices)
    chat, batch = plan.assignments
    assert chat.status == "assigned" and chat.chosen is not None and chat.chosen.engine == "vllm"
    llama = next(o for o in chat.options if o.engine == "llamacpp")
    assert not llama.feasible and "misses the SLO" in llama.reason
    # vllm at concurrency=4 → 6 req/s → 4 replicas for 20 req/s
    assert chat.chosen.replicas is not None and chat.chosen.replicas.replicas == 4
    assert batch.chosen is not None and batch.chosen.engine == "llamacpp"  # cheaper, and meets the loose SLO
    assert batch.chosen.replicas is not None and batch.chosen.replicas.replicas == 1
    # only vllm serves both → best single = vllm for both; hybrid is cheaper
    assert plan.best_single is not None and plan.best_single.engine == "vllm"
    assert plan.hybrid_usd_per_month is not None and plan.savings_usd_per_month is not None
    assert plan.savings_usd_per_month > 0


def test_hardware_constraints_exclude_engines_and_unservable_is_reported(knowledge: Knowledge) -> None:
    prices = parse_prices(_data("gpu_prices.yaml"))
    ucs = parse_plan({"use_cases": [
        {"name": "tpu", "workload": "chat", "slo": {"ttft_p95_ms": 2000}, "traffic": {"requests_per_s": 1},
         "hardware": {"must_run_on": "tpu"}},
        {"name": "phone", "workload": "chat", "slo": {"ttft_p95_ms": 2000}, "traffic": {"concurrent_users": 1},
         "hardware": {"on_device": True}},
        {"name": "strict-phone", "workload": "chat", "slo": {"ttft_p95_ms": 300}, "traffic": {"concurrent_users": 1},
         "on_device": True},
    ]})  # fmt: skip
    plan = make_plan(ucs, _plan_points(), _infos(), knowledge, prices)
    tpu, phone, strict = plan.assignments
    assert tpu.chosen is not None and tpu.chosen.engine == "vllm"  # llama.cpp does not run on TPUs
    assert "does not run on tpu" in next(o for o in tpu.options if o.engine == "llamacpp").reason
    assert phone.chosen is not None and phone.chosen.engine == "llamacpp"
    assert "on-device" in next(o for o in phone.options if o.engine == "vllm").reason
    assert strict.status == "unservable" and strict.chosen is None
    assert plan.hybrid_usd_per_month is None and "cannot be served" in plan.note


def test_plan_budget_excludes_over_budget_engines(knowledge: Knowledge) -> None:
    prices = parse_prices(_data("gpu_prices.yaml"))
    ucs = parse_plan({"use_cases": [{"name": "x", "workload": "chat", "slo": {"ttft_p95_ms": 300},
                                     "traffic": {"requests_per_s": 600}, "max_usd_per_month": 10}]})  # fmt: skip
    plan = make_plan(ucs, _plan_points(), _infos(), knowledge, prices)
    assert plan.assignments[0].status == "unservable"
    assert "exceeds the budget" in next(o for o in plan.assignments[0].options if o.engine == "vllm").reason


def test_plan_file_errors_name_the_problem() -> None:
    with pytest.raises(ConfigError, match="unknown SLO key 'ttft_ms'"):
        parse_plan(
            {
                "use_cases": [
                    {"name": "a", "workload": "w", "slo": {"ttft_ms": 1}, "traffic": {"requests_per_s": 1}}
                ]
            }
        )
    with pytest.raises(ConfigError, match="traffic needs"):
        parse_plan({"use_cases": [{"name": "a", "workload": "w", "slo": {"ttft_p95_ms": 1}}]})


# -- data files -------------------------------------------------------------------------------------------------


def test_knowledge_file_covers_engines_with_sources_and_dates(knowledge: Knowledge) -> None:
    for name in (
        "vllm",
        "sglang",
        "lmdeploy",
        "trtllm",
        "tgi",
        "llamacpp",
        "ollama",
        "mlc",
        "triton",
        "rayserve",
        "mii",
    ):
        facts = knowledge.lookup(name)
        assert facts is not None, name
        assert set(facts.scores) == set(QUALITATIVE), name
        for fact in facts.scores.values():
            assert fact.source and fact.date and 1 <= fact.score <= 5
    tgi = knowledge.lookup("text-generation-inference")
    assert tgi is not None and tgi.status == "maintenance" and tgi.scores["ecosystem"].score == 1
    assert knowledge.lookup("llama.cpp") is knowledge.lookup("llamacpp")


def test_user_knowledge_overrides_single_scores(knowledge: Knowledge) -> None:
    user = parse_knowledge({"schema_version": 1, "engines": {"llama.cpp": {"scores": {
        "ecosystem": {"score": 2, "source": "my team", "date": "2026-11-24"}}}}}, "mine.yaml")  # fmt: skip
    merged = merge_knowledge(knowledge, user)
    facts = merged.lookup("llamacpp")
    assert facts is not None and facts.scores["ecosystem"].score == 2
    assert facts.scores["quantization"].score == 5 and "cpu" in facts.hardware
    with pytest.raises(ConfigError, match="lacks source"):
        parse_knowledge(
            {"schema_version": 1, "engines": {"x": {"scores": {"ecosystem": {"score": 3, "date": "d"}}}}}
        )


def test_price_table_has_sourced_dated_gpus_and_a_cpu_default() -> None:
    prices = parse_prices(_data("gpu_prices.yaml"))
    accelerators = {i.accelerator.split()[0] for i in prices.instances.values() if i.accelerator}
    assert {"H100", "A100", "L4", "L40S", "A10G", "MI300X"} <= accelerators
    assert prices.for_platform("cpu").platform == "cpu"
    assert all(i.source and i.date and i.usd_per_hour > 0 for i in prices.instances.values())
    assert math.isclose(prices.hours_per_month, 730)


def test_slo_check_never_counts_an_unmeasured_statistic_as_met() -> None:
    p = _pt("e", 1, 100)
    assert check_slo(p, {"ttft_p95_ms": 100}) == (True, [])  # at the limit meets it
    met, reasons = check_slo(p, {"itl_p95_ms": 50})  # no ITL in this point's stats
    assert not met and reasons == ["itl_p95_ms not measured"]
    assert not check_slo(_pt("e", 1, 100, valid=False), {"ttft_p95_ms": 1000})[0]
