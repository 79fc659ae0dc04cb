"""Arrival processes: deterministic from the seed, with the rate and burstiness they claim."""

from __future__ import annotations

import numpy as np
import pytest

from harness.errors import ConfigError
from workloads.arrival import LoadPoint, parse_sweep, send_times


def test_schedule_is_determined_by_seed() -> None:
    [p] = parse_sweep(None, "4", "poisson", 1.0, seed=7)
    [q] = parse_sweep(None, "4", "poisson", 1.0, seed=7)
    [r] = parse_sweep(None, "4", "poisson", 1.0, seed=8)
    assert p == q and p.seed != r.seed
    a, b = send_times(p, 1000), send_times(q, 1000)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, send_times(r, 1000))
    # a longer schedule starts with the shorter one: the prefix does not depend on n
    assert np.array_equal(send_times(p, 2000)[:1000], a)


def test_points_of_one_sweep_get_different_seeds() -> None:
    pts = parse_sweep(None, "1,2,4", "poisson", 1.0, seed=0)
    assert len({p.seed for p in pts}) == 3


def test_poisson_mean_rate() -> None:
    [p] = parse_sweep(None, "50", "poisson", 1.0, seed=1)
    t = send_times(p, 20000)
    assert t[0] == 0.0 and np.all(np.diff(t) >= 0)
    rate = (len(t) - 1) / t[-1]
    # sd of the estimate is rate/sqrt(n) ~ 0.7 %; 3 % is > 4 sd
    assert rate == pytest.approx(50, rel=0.03)
    gaps = np.diff(t)
    assert gaps.std() / gaps.mean() == pytest.approx(1.0, abs=0.05)


@pytest.mark.parametrize("burstiness", [0.25, 0.5, 1.0, 4.0])
def test_gamma_cv_and_rate(burstiness: float) -> None:
    p = LoadPoint("rate", 10, "gamma", burstiness, seed=3)
    gaps = np.diff(send_times(p, 20001))
    assert 1 / gaps.mean() == pytest.approx(10, rel=0.05)
    assert gaps.std() / gaps.mean() == pytest.approx(1 / np.sqrt(burstiness), rel=0.08)


def test_constant() -> None:
    p = LoadPoint("rate", 4, "constant")
    assert np.allclose(send_times(p, 5), [0, 0.25, 0.5, 0.75, 1.0])


def test_ids_and_labels() -> None:
    [c] = parse_sweep("8", None, "poisson", 1.0, 0)
    assert c.id == "concurrency=8" and c.closed_loop and c.arrival == "closed"
    [r] = parse_sweep(None, "4", "poisson", 1.0, 0)
    assert r.id == "rate=4" and not r.closed_loop
    [g] = parse_sweep(None, "0.5", "gamma", 0.5, 0)
    assert g.id == "rate=0.5,arrival=gamma,burstiness=0.5"
    assert parse_sweep(None, "2", "constant", 1.0, 0)[0].id == "rate=2,arrival=constant"
    assert c.describe()["closed_loop"] is True
    with pytest.raises(ValueError):
        send_times(c, 3)


@pytest.mark.parametrize(
    ("conc", "rate", "arrival", "burst"),
    [
        (None, None, "poisson", 1.0),
        ("1", "2", "poisson", 1.0),
        ("1,x", None, "closed", 1.0),
        ("0", None, "closed", 1.0),
        ("1.5", None, "closed", 1.0),
        ("2,2", None, "closed", 1.0),
        (None, "-1", "poisson", 1.0),
        (None, "inf", "poisson", 1.0),
        (None, "1", "closed", 1.0),
        (None, "1", "weird", 1.0),
        (None, "1", "poisson", 0.5),
        (None, "1", "gamma", 0.0),
        ("4", None, "gamma", 1.0),
    ],
)
def test_bad_sweeps_are_one_line_config_errors(
    conc: str | None, rate: str | None, arrival: str, burst: float
) -> None:
    with pytest.raises(ConfigError) as e:
        parse_sweep(conc, rate, arrival, burst, 0)
    assert "\n" not in str(e.value) and str(e.value)
