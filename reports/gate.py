"""Renderings of a `bench gate` result: Markdown for a CI job summary, JUnit XML for test reporters, JSON.

Pure functions of the gate document (the JSON `bench gate --json` writes: `{schema_version, kind: "gate", ...}`,
see docs/gating.md), so any of them can be rebuilt from that file alone.
"""

from __future__ import annotations

import math
import xml.etree.ElementTree as ET
from collections.abc import Mapping
from typing import Any

import orjson

__all__ = ["render_json", "render_junit", "render_markdown"]

_ICON = {"regression": "❌", "improvement": "🟢", "ok": "✅", "insufficient": "⚪"}
_STATUS = {"pass": "✅ pass", "regression": "❌ regression", "invalid": "❌ candidate INVALID"}


def render_json(doc: Mapping[str, Any]) -> str:
    return orjson.dumps(doc, option=orjson.OPT_INDENT_2 | orjson.OPT_SERIALIZE_NUMPY).decode() + "\n"


def _num(x: float | None, unit: str) -> str:
    if x is None or not math.isfinite(x):
        return "–"
    if unit == "":
        return f"{x:.2%}"
    return f"{x:,.1f}" if abs(x) >= 10 else f"{x:,.2f}"


def _change(m: Mapping[str, Any]) -> str:
    c = m.get("change")
    if c is None:
        return "–"
    return f"{c * 100:+.2f} pp" if m.get("unit") == "" else f"{c:+.1%}"


def _threshold(m: Mapping[str, Any]) -> str:
    t = float(m["threshold"])
    return f"{t * 100:+.2f} pp" if m.get("unit") == "" else f"{t:+.0%}"


def _p(p: float | None) -> str:
    if p is None:
        return "–"
    return f"{p:.2g}" if p >= 1e-4 else f"{p:.1e}"


def _ps(m: Mapping[str, Any]) -> str:
    rep = m.get("p_repeats")
    return _p(m.get("p_value")) + ("" if rep is None else f" · r {_p(rep)}")


def _ci(m: Mapping[str, Any]) -> str:
    ci = m.get("ci")
    return "" if not ci else f" (bootstrap CI of the candidate/baseline ratio {ci[0]:.3f}–{ci[1]:.3f})"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _side(info: Mapping[str, Any]) -> str:
    parts = [f"`{info.get('run_id') or info.get('path')}`"]
    if info.get("git_sha"):
        parts.append(f"EngineBench {str(info['git_sha'])[:10]}")
    engines = [
        f"{e.get('name')} {e.get('version') or ''}".strip()
        for e in info.get("engines") or []
        if e.get("name")
    ]
    if engines:
        parts.append("engines: " + ", ".join(engines))
    return " · ".join(parts)


def render_markdown(doc: Mapping[str, Any]) -> str:
    """A heading with the overall status, then one table per load point (GitHub-flavoured Markdown)."""
    status = doc.get("status")
    lines: list[str] = []
    if status == "error":
        lines += ["## EngineBench gate: ⚠️ could not compare", "", _cell(str(doc.get("reason", ""))), ""]
        return "\n".join(lines)
    head = "✅ pass" if status == "pass" else "❌ regression"
    policy = doc.get("policy") or {}
    lines += [
        f"## EngineBench gate: {head}",
        "",
        f"- baseline: {_side(doc.get('baseline') or {})}",
        f"- candidate: {_side(doc.get('candidate') or {})}",
        f"- a regression is a change beyond its threshold **and** significant at alpha = {policy.get('alpha')} "
        f"(latency: Mann–Whitney U / bootstrap CI, test `{policy.get('test')}`; throughput: Welch t on time "
        f"windows; error rate: Fisher's exact); with {policy.get('min_repeats')}+ repeats a side also between "
        f"repeats at {policy.get('repeat_alpha')} (`r` p-value)",
        "",
    ]
    for point in doc.get("points", []):
        reps = f"repeats {point['baseline_repeats']} → {point['candidate_repeats']}"
        lines += [f"### {point['engine']} · {point['point']}: {_STATUS[point['status']]} ({reps})", ""]
        if not point["candidate_valid"]:
            reasons = "; ".join(point.get("candidate_invalid_reasons") or []) or "see its summary"
            lines += [f"**Candidate point is INVALID**: {_cell(reasons)}", ""]
        lines += [
            "| metric | baseline | candidate | change | p-value | threshold | verdict |",
            "| --- | ---: | ---: | ---: | ---: | ---: | --- |",
        ]
        for m in point["metrics"]:
            unit = m.get("unit", "")
            name = f"{m['metric']} ({unit})" if unit and unit != "" else m["metric"]
            verdict = f"{_ICON[m['verdict']]} {m['verdict']}"
            lines.append(
                f"| {name} | {_num(m['baseline'], unit)} | {_num(m['candidate'], unit)} | {_change(m)} "
                f"| {_ps(m)} | {_threshold(m)} | {verdict} |"
            )
        notes = [
            f"{m['metric']}: {m['reason']}{_ci(m)}"
            for m in point["metrics"]
            if m["reason"] != "within threshold"
        ]
        if notes:
            lines += ["", *(f"- {_cell(n)}" for n in notes)]
        lines.append("")
    unmatched = [
        ("in the baseline only", doc.get("baseline_only") or []),
        ("in the candidate only", doc.get("candidate_only") or []),
        ("not compared", doc.get("skipped") or []),
    ]
    if any(items for _, items in unmatched):
        lines += ["### Points without a comparison", ""]
        lines += [f"- {label}: {_cell(', '.join(items))}" for label, items in unmatched if items]
        lines.append("")
    if doc.get("notes"):
        lines += ["### Notes", "", *(f"- {_cell(str(n))}" for n in doc["notes"]), ""]
    return "\n".join(lines)


def render_junit(doc: Mapping[str, Any]) -> str:
    """One testsuite per load point, one testcase per metric plus one for the candidate's validity; a regression
    or an INVALID candidate is a `<failure>`, too few samples a `<skipped>`, a run that could not be compared one
    `<error>`."""
    root = ET.Element("testsuites", name="enginebench-gate")
    totals = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
    if doc.get("status") == "error":
        suite = ET.SubElement(root, "testsuite", name="enginebench-gate")
        case = ET.SubElement(suite, "testcase", classname="enginebench.gate", name="compare")
        ET.SubElement(case, "error", message=str(doc.get("reason", "")), type="CompareError")
        counts = {"tests": 1, "failures": 0, "errors": 1, "skipped": 0}
        suite.attrib.update({k: str(v) for k, v in counts.items()})
        totals = counts
    for point in doc.get("points", []):
        suite = ET.SubElement(root, "testsuite", name=f"{point['engine']} {point['point']}")
        classname = f"enginebench.gate.{point['engine']}.{point['point']}"
        counts = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0}
        case = ET.SubElement(suite, "testcase", classname=classname, name="candidate_valid")
        counts["tests"] += 1
        if not point["candidate_valid"]:
            reasons = "; ".join(point.get("candidate_invalid_reasons") or [])
            ET.SubElement(case, "failure", message=f"candidate point is INVALID: {reasons}", type="invalid")
            counts["failures"] += 1
        for m in point["metrics"]:
            case = ET.SubElement(suite, "testcase", classname=classname, name=m["metric"])
            counts["tests"] += 1
            detail = (
                f"baseline {_num(m['baseline'], m['unit'])} {m['unit']}, candidate {_num(m['candidate'], m['unit'])} "
                f"{m['unit']}, change {_change(m)}, threshold {_threshold(m)}, p {_ps(m)}, "
                f"test {m['test']}, n {m['n_baseline']}/{m['n_candidate']}"
            )
            if m["verdict"] == "regression":
                failure = ET.SubElement(case, "failure", message=m["reason"], type="regression")
                failure.text = detail
                counts["failures"] += 1
            elif m["verdict"] == "insufficient":
                ET.SubElement(case, "skipped", message=m["reason"])
                counts["skipped"] += 1
            else:
                ET.SubElement(case, "system-out").text = detail
        suite.attrib.update({k: str(v) for k, v in counts.items()})
        for k in totals:
            totals[k] += counts[k]
    root.attrib.update({k: str(v) for k, v in totals.items()})
    ET.indent(root)
    return ET.tostring(root, encoding="unicode", xml_declaration=True) + "\n"
