"""One record of engine facts: `bench engines` (adapters) and `bench decide` (matrix, via harness.decide) must see the
same hardware, maintenance status and on-device flag, each fact with a source and a date, in one hardware vocabulary.
Real files (the shipped YAML, user files in tmp_path), the real registry and the real `bench decide` library path."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import yaml

from adapters import registry
from adapters.base import HARDWARE
from adapters.knowledge import (
    ENGINE_FACTS,
    STATUSES,
    knowledge_document,
    normalize_hardware,
    normalize_status,
)
from harness.decide import DecideConfig, builtin_knowledge, decide, join_knowledge, load_knowledge
from harness.errors import ConfigError, SchemaError
from matrix.capacity import Traffic
from matrix.cost import parse_prices
from matrix.inputs import EngineInfo, Point
from matrix.plan import UseCase, make_plan
from tests.test_decide import _point, _write_run

SCORES_FILE = Path(__file__).parents[1] / "matrix" / "data" / "knowledge.yaml"
PRICES_FILE = SCORES_FILE.with_name("gpu_prices.yaml")
TEST_FAKES = {"scripted"}  # adapters that stand in for engines in tests: no upstream facts
ISO_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


def test_the_scores_file_states_no_facts_and_scores_exactly_the_engines_with_facts() -> None:
    doc = yaml.safe_load(SCORES_FILE.read_text(encoding="utf-8"))
    for name, entry in doc["engines"].items():
        assert set(entry) == {"scores"}, (
            name,
            sorted(entry),
        )  # hardware/status/on_device/aliases live elsewhere
    assert set(doc["engines"]) == set(ENGINE_FACTS)


def test_every_engine_adapter_takes_hardware_status_and_sources_from_the_facts() -> None:
    adapters = registry.adapters()
    assert set(adapters) - set(ENGINE_FACTS) == TEST_FAKES  # a new engine adapter needs an ENGINE_FACTS entry
    assert set(ENGINE_FACTS) <= set(adapters)
    for name, facts in ENGINE_FACTS.items():
        info = adapters[name].info
        assert info.hardware == facts.hardware, name
        assert info.maintenance == facts.maintenance, name
        assert info.sources == facts.sources, name


def test_bench_engines_and_bench_decide_see_the_same_facts() -> None:
    from harness.cli.engines import engines_table

    knowledge = builtin_knowledge()
    rows = {r["engine"]: r for r in engines_table() if r["engine"] not in TEST_FAKES}
    assert set(rows) == set(ENGINE_FACTS)
    for name, facts in ENGINE_FACTS.items():
        seen = knowledge.lookup(name)
        assert seen is not None, name
        assert tuple(rows[name]["hardware"]) == seen.hardware == facts.hardware, name
        assert rows[name]["maintenance"] == facts.maintenance, name
        assert seen.status == facts.status and seen.on_device == facts.on_device, name
        assert seen.hardware_source and seen.status_source == facts.status_fact.source, name
        assert set(seen.scores) == {
            "hardware_flexibility",
            "operational_simplicity",
            "ecosystem",
            "quantization",
        }
        for alias in facts.aliases:  # every alias finds the same entry
            assert knowledge.lookup(alias) is seen, (name, alias)


def test_every_fact_is_in_the_vocabulary_with_a_source_and_a_date() -> None:
    for name, facts in ENGINE_FACTS.items():
        assert facts.hardware and set(facts.hardware) <= set(HARDWARE), name
        assert len(set(facts.hardware)) == len(facts.hardware), name
        assert facts.status in STATUSES, name
        assert facts.hardware_facts, name
        for fact in (*facts.hardware_facts, facts.status_fact, *facts.facts):
            assert fact.claim and fact.source and ISO_DATE.match(fact.date), (name, fact)
    doc = knowledge_document()
    for name, entry in doc["engines"].items():
        assert entry["hardware_source"] and ISO_DATE.match(entry["hardware_date"]), name
        assert entry["status_source"] and ISO_DATE.match(entry["status_date"]), name


def test_disputed_facts_as_verified() -> None:
    """The disagreements between the two former records, settled from the sources cited in ENGINE_FACTS."""
    hw = {name: set(f.hardware) for name, f in ENGINE_FACTS.items()}
    assert hw["lmdeploy"] == {"nvidia", "amd", "ascend"}  # installation.md: ROCm and Ascend builds
    assert (
        "cpu" in hw["tgi"] and {"intel-gpu", "gaudi", "neuron"} <= hw["tgi"]
    )  # installation_intel: intel-cpu image
    assert hw["triton"] == {"nvidia", "cpu", "neuron"}  # backend matrix: vLLM back end on x86 CPU; Inferentia
    assert hw["trtllm"] == {"nvidia"}
    assert ENGINE_FACTS["mii"].status == "inactive" and ENGINE_FACTS["tgi"].status == "maintenance"
    assert {f.on_device for n, f in ENGINE_FACTS.items() if n in ("llamacpp", "ollama", "mlc")} == {True}


@pytest.mark.parametrize(
    ("given", "expected"),
    [("intel", "intel-gpu"), ("aws-neuron", "neuron"), ("AWS-Inferentia", "neuron"), ("arm", "cpu"),
     ("ROCm", "amd"), ("Ascend", "ascend"), ("nvidia", "nvidia"), ("intel_gpu", "intel-gpu")],
)  # fmt: skip
def test_other_spellings_map_onto_the_one_vocabulary(given: str, expected: str) -> None:
    assert normalize_hardware(given) == expected


def test_names_that_are_not_hardware_say_what_to_write_instead() -> None:
    with pytest.raises(ConfigError, match="name the GPUs"):
        normalize_hardware("vulkan")
    with pytest.raises(ConfigError, match="on_device: true"):
        normalize_hardware("android")
    with pytest.raises(ConfigError, match="use one of: cpu, nvidia"):
        normalize_hardware("fpga")
    assert normalize_status("Stale") == "inactive"
    with pytest.raises(ConfigError, match="unknown status 'dead'"):
        normalize_status("dead")


def test_a_scores_file_that_states_a_fact_or_an_unknown_engine_is_refused() -> None:
    score = {"score": 3, "source": "s", "date": "2026-11-24"}
    with pytest.raises(
        SchemaError, match=r"states hardware; engine facts live only in adapters/knowledge\.py"
    ):
        join_knowledge({"schema_version": 1, "engines": {"vllm": {"hardware": ["cpu"], "scores": {}}}})
    with pytest.raises(SchemaError, match="engine newengine has scores but no facts"):
        join_knowledge({"schema_version": 1, "engines": {"newengine": {"scores": {"ecosystem": score}}}})


def test_user_knowledge_file_overrides_facts_in_the_one_vocabulary(tmp_path: Path) -> None:
    mine = tmp_path / "mine.yaml"
    mine.write_text(
        "schema_version: 1\nengines:\n"
        "  lmdeploy: {hardware: [NVIDIA, Intel]}\n"
        "  deepspeed-mii: {status: stale}\n"
        "  llama.cpp: {scores: {ecosystem: {score: 2, source: my team, date: '2026-11-24'}}}\n"
    )
    k = load_knowledge(mine)
    lmdeploy, mii, llama = k.lookup("lmdeploy"), k.lookup("mii"), k.lookup("llamacpp")
    assert lmdeploy is not None and lmdeploy.hardware == ("nvidia", "intel-gpu")
    assert lmdeploy.hardware_source == str(mine)  # the user's file is the source of the overridden fact
    assert mii is not None and mii.status == "inactive"
    assert llama is not None and llama.scores["ecosystem"].score == 2
    assert llama.hardware == ENGINE_FACTS["llamacpp"].hardware  # untouched facts stay the built-in ones
    bad = tmp_path / "bad.yaml"
    bad.write_text("schema_version: 1\nengines:\n  mlc: {hardware: [webgpu]}\n")
    with pytest.raises(
        ConfigError, match=r"knowledge file .*bad.yaml, engine mlc: unknown hardware 'webgpu'"
    ):
        load_knowledge(bad)


def test_plan_hardware_constraint_uses_the_corrected_facts() -> None:
    """must_run_on: amd — LMDeploy qualifies (ROCm build), TensorRT-LLM does not; both measured alike."""
    points = [p for e in ("lmdeploy", "trtllm") for p in _points(e)]
    infos = {e: [EngineInfo(e, adapter=e, cold_start_s=1.0)] for e in ("lmdeploy", "trtllm")}
    uc = UseCase("amd-chat", "chat", {"ttft_p95_ms": 500}, Traffic(requests_per_s=1.0), must_run_on="amd")
    plan = make_plan(
        [uc], points, infos, builtin_knowledge(), parse_prices(yaml.safe_load(PRICES_FILE.read_text()))
    )
    (a,) = plan.assignments
    assert a.chosen is not None and a.chosen.engine == "lmdeploy"
    trt = next(o for o in a.options if o.engine == "trtllm")
    assert not trt.feasible and trt.reason.startswith("does not run on amd")


def _points(engine: str) -> list[Point]:
    return [
        Point(engine=engine, point=f"concurrency={c}", workload="chat", load_kind="concurrency",
              load_value=float(c), valid=True, measured_requests=100, requests_per_s=float(c), error_rate=0.0,
              latency_ms={"ttft": {"p95": 100.0 * c}, "e2e": {"mean": 1000.0}})
        for c in (1, 2, 4)
    ]  # fmt: skip


def test_bench_decide_maps_plan_and_override_spellings_and_flags_every_non_active_status(
    tmp_path: Path,
) -> None:
    runs = [
        _write_run(tmp_path / f"run-{e}", {e: 5.0}, [_point(e, 1, 100, 2.0), _point(e, 4, 300, 6.0)])
        for e in ("lmdeploy", "mii")
    ]
    plan = tmp_path / "plan.yaml"
    plan.write_text(
        "schema_version: 1\nuse_cases:\n"
        "  - {name: huawei, workload: chat, slo: {ttft_p95_ms: 500}, traffic: {requests_per_s: 1}, "
        "hardware: {must_run_on: Ascend}}\n"
        "  - {name: inferentia, workload: chat, slo: {ttft_p95_ms: 500}, traffic: {requests_per_s: 1}, "
        "hardware: {must_run_on: aws-inferentia}}\n"
    )
    d = decide(DecideConfig(run_dirs=tuple(runs), plan_file=plan))
    uses = {a["use_case"]["name"]: a for a in d["plan"]["assignments"]}
    assert uses["huawei"]["use_case"]["must_run_on"] == "ascend"
    assert uses["huawei"]["chosen"]["engine"] == "lmdeploy"  # MII is NVIDIA-only
    assert uses["inferentia"]["use_case"]["must_run_on"] == "neuron"
    assert uses["inferentia"]["status"] == "unservable"  # neither runs on AWS Neuron
    assert any(w.startswith("mii: upstream status is inactive") for w in d["warnings"])  # not only 'stale'
    assert d["inputs"]["knowledge"] == "adapters.knowledge+matrix/data/knowledge.yaml"
    bad_plan = tmp_path / "bad-plan.yaml"
    bad_plan.write_text(plan.read_text().replace("Ascend", "vulkan"))
    with pytest.raises(ConfigError, match="use case huawei: must_run_on: unknown hardware 'vulkan'"):
        decide(DecideConfig(run_dirs=tuple(runs), plan_file=bad_plan))
