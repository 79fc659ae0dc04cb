"""The decision half of the HTML report: the decision JSON (`harness.decide`) → rows and sentences for the template.

Pure functions of the decision dict: the recommendation (winner, margin, near ties, the closest weight flip, its
strongest criteria), the decision matrix, the sensitivity table, the hybrid plan and the capacity/cost table. Strings
stay raw; the template escapes them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from harness.decide import decision_reasons

__all__ = [
    "capacity_rows",
    "fmt",
    "matrix_view",
    "plan_view",
    "reasons_view",
    "recommendation",
    "sensitivity_rows",
]


def fmt(value: Any, digits: int = 3) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        if value != value:  # NaN
            return "—"
        if abs(value) >= 10**digits:
            return f"{value:,.0f}"
        return f"{value:.{digits}g}"
    return str(value)


def recommendation(decision: Mapping[str, Any]) -> dict[str, Any]:
    scores = decision.get("scores") or []
    ranked = [s for s in scores if s.get("total") is not None]
    winner = decision.get("winner")
    sens = decision.get("sensitivity") or {}
    top = ranked[0] if ranked else None
    second = ranked[1] if len(ranked) > 1 else None
    flips = []
    for w in sens.get("weights") or []:
        for direction, key in (("raising", "increase"), ("lowering", "decrease")):
            f = w.get(key)
            if f:
                flips.append((abs(f.get("delta") or 0.0), direction, w["criterion"], w["weight"], f))
    flips.sort(key=lambda x: x[0])
    strengths = []
    if top:
        weights = decision.get("weights") or {}
        contrib = [
            (weights.get(c, 0.0) * (cell.get("score") or 0), c, cell)
            for c, cell in (top.get("criteria") or {}).items()
            if cell.get("score") is not None and weights.get(c, 0.0) > 0
        ]
        contrib.sort(key=lambda x: -x[0])
        strengths = [
            {
                "criterion": c,
                "score": cell.get("score"),
                "raw": fmt(cell.get("raw")),
                "unit": cell.get("unit"),
            }
            for _, c, cell in contrib[:3]
        ]
    return {
        "winner": winner,
        "total": top and top.get("total"),
        "second": second and second.get("engine"),
        "second_total": second and second.get("total"),
        "gap": (top["total"] - second["total"]) if top and second else None,
        "near_ties": sens.get("near_ties") or [],
        "weakest": (
            {
                "direction": flips[0][1],
                "criterion": flips[0][2],
                "weight": flips[0][3],
                "new_weight": flips[0][4].get("new_weight"),
                "share_after": flips[0][4].get("share_after"),
                "challenger": flips[0][4].get("challenger"),
            }
            if flips
            else None
        ),
        "strengths": strengths,
        "renormalized": bool(top and top.get("renormalized")),
        "weight_used": top and top.get("weight_used"),
    }


def matrix_view(decision: Mapping[str, Any]) -> dict[str, Any]:
    weights = decision.get("weights") or {}
    criteria = [c for c in decision.get("criteria") or []]
    shown = [c for c in criteria if weights.get(c["name"], 0) > 0] + [
        c for c in criteria if weights.get(c["name"], 0) <= 0
    ]
    rows = []
    for s in decision.get("scores") or []:
        cells = []
        for c in shown:
            cell = (s.get("criteria") or {}).get(c["name"]) or {}
            cells.append(
                {
                    "score": cell.get("score"),
                    "raw": fmt(cell.get("raw")),
                    "unit": cell.get("unit") or "",
                    "note": cell.get("note") or "",
                    "source": cell.get("source") or "",
                    "weighted": weights.get(c["name"], 0) > 0,
                }
            )
        rows.append(
            {
                "engine": s["engine"],
                "total": s.get("total"),
                "missing": s.get("missing") or [],
                "weight_used": s.get("weight_used"),
                "cells": cells,
            }
        )
    return {
        "criteria": [{**c, "weight": weights.get(c["name"], 0.0)} for c in shown],
        "rows": rows,
        "rules": decision.get("rules") or {},
    }


def sensitivity_rows(decision: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for w in (decision.get("sensitivity") or {}).get("weights") or []:
        up, down = w.get("increase") or {}, w.get("decrease") or {}
        rows.append(
            {
                "criterion": w["criterion"],
                "weight": w["weight"],
                "raise_to": up.get("new_weight"),
                "raise_share": up.get("share_after"),
                "raise_challenger": up.get("challenger"),
                "lower_to": down.get("new_weight"),
                "lower_share": down.get("share_after"),
                "lower_challenger": down.get("challenger"),
            }
        )
    return rows


def plan_view(decision: Mapping[str, Any]) -> dict[str, Any] | None:
    plan = decision.get("plan")
    if not plan:
        return None
    rows = []
    for a in plan.get("assignments") or []:
        ch = a.get("chosen")
        settings = (ch or {}).get("settings") or {}
        rows.append(
            {
                "use_case": (a.get("use_case") or {}).get("name"),
                "workload": (a.get("use_case") or {}).get("workload"),
                "status": a.get("status"),
                "engine": ch and ch.get("engine"),
                "settings": (
                    f"{settings.get('load_kind')}={fmt(settings.get('load_per_replica'))}" if ch else ""
                ),
                "replicas": fmt(((ch or {}).get("replicas") or {}).get("replicas")),
                "instance": ((ch or {}).get("cost") or {}).get("instance"),
                "usd": fmt(((ch or {}).get("cost") or {}).get("usd_per_month", 0.0 if ch else None), 4),
                "reason": (ch or {}).get("reason") or a.get("note"),
                "excluded": [
                    {"engine": o.get("engine"), "reason": o.get("reason")}
                    for o in a.get("options") or []
                    if not o.get("feasible")
                ],
            }
        )
    best = plan.get("best_single") or {}
    return {
        "rows": rows,
        "hybrid_usd": fmt(plan.get("hybrid_usd_per_month"), 4),
        "best_single": best.get("engine"),
        "best_single_usd": fmt(best.get("usd_per_month"), 4),
        "savings": fmt(plan.get("savings_usd_per_month"), 4),
        "note": plan.get("note") or "",
    }


def capacity_rows(decision: Mapping[str, Any]) -> list[dict[str, Any]]:
    rows = []
    for row in decision.get("capacity") or []:
        cap, cost = row.get("capacity") or {}, row.get("cost") or {}
        how = (
            "interpolated"
            if cap.get("interpolated")
            else ("lower bound" if cap.get("lower_bound") else "measured")
        )
        rows.append(
            {
                "engine": cap.get("engine"),
                "workload": cap.get("workload"),
                "slo": ", ".join(f"{k} ≤ {fmt(v)}" for k, v in (cap.get("slo") or {}).items()) or "none",
                "sustained": (
                    f"{cap.get('load_kind')}={fmt(cap.get('sustained_load'))}"
                    if cap.get("sustained_load") is not None
                    else "misses the SLO"
                ),
                "rps": fmt(cap.get("requests_per_s")),
                "out_tps": fmt(cap.get("output_tokens_per_s")),
                "how": how,
                "note": cap.get("note") or row.get("note") or "",
                "instance": cost.get("instance"),
                "instance_why": cost.get("why") or "",
                "usd_hour": fmt(cost.get("usd_per_hour"), 4),
                "usd_month": fmt(cost.get("usd_per_month"), 4),
                "usd_1m_out": fmt(cost.get("usd_per_1m_output_tokens")),
            }
        )
    return rows


def reasons_view(decision: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The criteria that decided the ranking (`harness.decide.decision_reasons`), as strings for the page."""
    rows = []
    for r in decision_reasons(decision):
        unit = r["unit"] if r["unit"] not in ("", "score", "1-5") else ""
        rows.append(
            {
                "criterion": r["criterion"],
                "weight": fmt(r["weight"], 2),
                "winner": r["winner"],
                "winner_raw": f"{fmt(r['winner_raw'])} {unit}".strip(),
                "winner_score": r["winner_score"],
                "other": r["other"],
                "other_raw": f"{fmt(r['other_raw'])} {unit}".strip(),
                "other_score": r["other_score"],
            }
        )
    return rows
