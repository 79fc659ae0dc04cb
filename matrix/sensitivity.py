"""How robust the winner is: for each weight, how far it must move before the top of the ranking changes.

Exact, not a grid search. Move one weight w_k by δ with the others fixed; an engine's total is
S(δ) = (N + δ·s_k) / (D + δ·p_k), where N = Σ w·s and D = Σ w over the criteria it has data for, s_k its score on
k (0 when missing) and p_k = 1 when it has data on k. Winner W and challenger E tie where
(N_W + δa)(D_E + δq) − (N_E + δb)(D_W + δp) = 0, a quadratic (linear when both have data on k). The flip point is
the root nearest zero, on each side, at which the sign actually changes, within δ ≥ −w_k (weights stay ≥ 0).
Weights are the profile's, normalized to sum 1; `share_after` is the moved weight's share once they are
renormalized.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from matrix.scoring import EngineScore

__all__ = ["Flip", "Sensitivity", "WeightSensitivity", "flip_points", "near_ties", "sensitivity"]

_EPS = 1e-12


@dataclass(frozen=True, slots=True)
class Flip:
    delta: float  # absolute change of the weight (same units as the normalized weights)
    new_weight: float
    relative: float | None  # delta / weight (None when the weight is 0)
    share_after: float  # the moved weight's share after renormalizing
    challenger: str  # the engine that takes the top


@dataclass(frozen=True, slots=True)
class WeightSensitivity:
    criterion: str
    weight: float
    increase: Flip | None  # None: no increase, however large, changes the winner
    decrease: Flip | None  # None: even dropping this weight to 0 keeps the winner


@dataclass(frozen=True, slots=True)
class Sensitivity:
    winner: str | None
    margin: float
    near_ties: tuple[tuple[str, float], ...]  # (engine, gap to the winner) for gaps below `margin`
    weights: tuple[WeightSensitivity, ...]
    most_sensitive: str | None  # the criterion whose smallest relative move flips the winner


def _parts(engine: EngineScore, weights: Mapping[str, float], k: str) -> tuple[float, float, float, float]:
    n = sum(weights[c] * s.score for c, s in engine.scores.items() if s.score is not None)
    d = sum(weights[c] for c, s in engine.scores.items() if s.score is not None)
    sk = engine.scores[k].score
    return n, d, float(sk or 0), 1.0 if sk is not None else 0.0


def _roots(a2: float, a1: float, a0: float) -> list[float]:
    if abs(a2) < _EPS:
        return [] if abs(a1) < _EPS else [-a0 / a1]
    disc = a1 * a1 - 4 * a2 * a0
    if disc < -_EPS:
        return []
    r = math.sqrt(max(disc, 0.0))
    return sorted({(-a1 - r) / (2 * a2), (-a1 + r) / (2 * a2)})


def flip_points(
    winner: EngineScore, challenger: EngineScore, weights: Mapping[str, float], k: str
) -> tuple[float | None, float | None]:
    """(smallest δ > 0, largest δ < 0 with w_k + δ ≥ 0) at which `challenger` overtakes `winner`; None if never."""
    nw, dw, a, p = _parts(winner, weights, k)
    ne, de, b, q = _parts(challenger, weights, k)
    a2 = a * q - b * p
    a1 = nw * q + a * de - ne * p - b * dw
    a0 = nw * de - ne * dw

    def g(x: float) -> float:
        return a2 * x * x + a1 * x + a0

    up: float | None = None
    down: float | None = None
    for root in _roots(a2, a1, a0):
        h = max(1e-9, abs(root) * 1e-9)
        if g(root + h) * g(root - h) >= 0:  # touches zero without crossing: a tie, not a flip
            continue
        if root > _EPS and g(root + h) < 0 and (up is None or root < up):
            up = root
        if -weights[k] - _EPS <= root < -_EPS and g(root - h) < 0 and (down is None or root > down):
            down = root
    return up, down


def _flip(delta: float, weight: float, challenger: str) -> Flip:
    new = weight + delta
    return Flip(delta, new, (delta / weight) if weight > 0 else None, new / (1.0 + delta), challenger)


def near_ties(ranking: Sequence[EngineScore], margin: float) -> tuple[tuple[str, float], ...]:
    if not ranking or ranking[0].total is None:
        return ()
    top = ranking[0].total
    return tuple(
        (r.engine, top - r.total) for r in ranking[1:] if r.total is not None and top - r.total < margin
    )


def sensitivity(
    ranking: Sequence[EngineScore], weights: Mapping[str, float], margin: float = 0.1
) -> Sensitivity:
    """Flip points of every weight for the winner (ranking[0]) against every other scored engine."""
    scored = [r for r in ranking if r.total is not None]
    if not scored:
        return Sensitivity(None, margin, (), (), None)
    winner, rivals = scored[0], scored[1:]
    rows: list[WeightSensitivity] = []
    for k, w in weights.items():
        best_up: Flip | None = None
        best_down: Flip | None = None
        for rival in rivals:
            up, down = flip_points(winner, rival, weights, k)
            if up is not None and (best_up is None or up < best_up.delta):
                best_up = _flip(up, w, rival.engine)
            if down is not None and (best_down is None or down > best_down.delta):
                best_down = _flip(down, w, rival.engine)
        rows.append(WeightSensitivity(k, w, best_up, best_down))
    moves = [
        (abs(f.relative), row.criterion)
        for row in rows
        for f in (row.increase, row.decrease)
        if f is not None and f.relative is not None
    ]
    return Sensitivity(
        winner.engine, margin, near_ties(scored, margin), tuple(rows), min(moves)[1] if moves else None
    )
