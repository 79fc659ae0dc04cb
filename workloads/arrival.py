"""Arrival processes: when each request of a load point is due, computed before the run from the point's own seed.

A load point is either a fixed concurrency (closed loop: N clients each send the next request when their previous
one finished, so the arrival rate depends on the server and results say `closed_loop=True`) or an open-loop rate
with a constant, Poisson or gamma inter-arrival process. Gamma takes a burstiness factor: shape = burstiness,
scale = 1 / (rate * burstiness), so the mean rate is `rate` and the coefficient of variation of the gaps is
1 / sqrt(burstiness); burstiness 1 is Poisson, below 1 is burstier, above 1 is smoother.

Open-loop schedules are offsets in seconds from the point's start; the first request is due at 0.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass, field
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

from harness.errors import ConfigError

__all__ = ["Arrival", "LoadKind", "LoadPoint", "parse_sweep", "point_seed", "send_times"]

LoadKind = Literal["concurrency", "rate"]
Arrival = Literal["closed", "constant", "poisson", "gamma", "trace"]
_OPEN: tuple[str, ...] = ("constant", "poisson", "gamma")
DEFAULT_RATE_ARRIVAL: Arrival = "poisson"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@dataclass(frozen=True)
class LoadPoint:
    """One point of a sweep. `value` is the concurrency (kind "concurrency") or requests per second ("rate")."""

    kind: LoadKind
    value: float
    arrival: Arrival
    burstiness: float = 1.0
    seed: int = 0
    # arrival "trace": the send times (seconds from the point's start) of a replayed request trace; `value` is
    # then the trace's mean rate, for display
    times: tuple[float, ...] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.kind == "concurrency":
            if self.arrival != "closed":
                raise ConfigError(f"a concurrency point is closed-loop; got arrival {self.arrival!r}")
            if self.value < 1 or not float(self.value).is_integer():
                raise ConfigError(f"concurrency must be a whole number >= 1, got {self.value!r}")
        elif self.arrival == "trace":
            if not self.times:
                raise ConfigError(
                    "a trace point needs the trace's send times; the trace selected no requests"
                )
        else:
            if self.arrival not in _OPEN:
                raise ConfigError(
                    f"a rate point needs arrival constant, poisson or gamma; got {self.arrival!r}"
                )
            if not (math.isfinite(self.value) and self.value > 0):
                raise ConfigError(
                    f"rate must be a positive number of requests per second, got {self.value!r}"
                )
        if not (math.isfinite(self.burstiness) and self.burstiness > 0):
            raise ConfigError(f"burstiness must be > 0, got {self.burstiness!r}")

    @property
    def closed_loop(self) -> bool:
        return self.kind == "concurrency"

    @property
    def concurrency(self) -> int:
        """Workers for a closed-loop point."""
        return int(self.value)

    @property
    def id(self) -> str:
        base = f"{self.kind}={_num(self.value)}"
        if self.kind == "rate" and self.arrival != DEFAULT_RATE_ARRIVAL:
            base += f",arrival={self.arrival}"
        if self.arrival == "gamma":
            base += f",burstiness={_num(self.burstiness)}"
        return base

    def describe(self) -> dict[str, object]:
        """The `load` block of a summary / event for this point."""
        return {
            "kind": self.kind,
            "value": self.value,
            "arrival": self.arrival,
            "burstiness": self.burstiness,
            "seed": self.seed,
            "closed_loop": self.closed_loop,
        }


def point_seed(run_seed: int, kind: str, value: float, arrival: str, burstiness: float) -> int:
    """A point's seed: a stable hash of the run seed and what the point is (not Python's salted `hash`)."""
    key = f"{run_seed}|{kind}|{_num(value)}|{arrival}|{_num(burstiness)}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "big")


def send_times(point: LoadPoint, n: int) -> npt.NDArray[np.float64]:
    """The due times (seconds from the point's start, non-decreasing, first 0) of `n` open-loop requests."""
    if point.closed_loop:
        raise ValueError(
            f"{point.id} is closed-loop: requests are sent when a worker frees, not on a schedule"
        )
    if n <= 0:
        return np.zeros(0, dtype=np.float64)
    if point.times is not None:
        return np.asarray(point.times[:n], dtype=np.float64)
    rate = float(point.value)
    if point.arrival == "constant":
        return np.arange(n, dtype=np.float64) / rate
    rng = np.random.default_rng(point.seed)
    if point.arrival == "poisson":
        gaps = rng.exponential(1.0 / rate, size=n - 1)
    else:
        b = float(point.burstiness)
        gaps = rng.gamma(shape=b, scale=1.0 / (rate * b), size=n - 1)
    out = np.empty(n, dtype=np.float64)
    out[0] = 0.0
    np.cumsum(gaps, out=out[1:])
    return out


def _parse_values(text: str, option: str, whole: bool) -> list[float]:
    values: list[float] = []
    for raw in text.split(","):
        item = raw.strip()
        try:
            v = float(item)
        except ValueError:
            raise ConfigError(
                f"--{option} {text!r}: {item!r} is not a number; give a comma list such as 1,8,32"
            ) from None
        if not math.isfinite(v) or v <= 0 or (whole and not v.is_integer()):
            kind = "a whole number >= 1" if whole else "a positive number"
            raise ConfigError(
                f"--{option} {text!r}: {item!r} must be {kind}; give a comma list such as 1,8,32"
            )
        if v in values:
            raise ConfigError(f"--{option} {text!r}: {item!r} appears twice; list each value once")
        values.append(v)
    return values


def parse_sweep(
    concurrency: str | None, rate: str | None, arrival: str, burstiness: float, seed: int
) -> list[LoadPoint]:
    """`--concurrency 1,8,32` or `--rate 0.5,2,4` (not both) -> load points, in the order given.

    `arrival` applies to rates ("constant", "poisson", "gamma"); with `--concurrency` it must be "closed" or the
    default "poisson" (ignored: concurrency points are closed-loop). `burstiness` is only meaningful with gamma.
    """
    if (concurrency is None) == (rate is None):
        raise ConfigError("give exactly one of --concurrency (e.g. 1,8,32) or --rate (requests/s, e.g. 1,4)")
    if arrival not in get_args(Arrival):
        raise ConfigError(f"--arrival {arrival!r} is unknown; use one of closed, constant, poisson, gamma")
    if not (math.isfinite(burstiness) and burstiness > 0):
        raise ConfigError(f"--burstiness {burstiness!r} must be > 0 (1 is Poisson, < 1 burstier)")
    if burstiness != 1.0 and arrival != "gamma":
        raise ConfigError(f"--burstiness {burstiness} needs --arrival gamma (got {arrival!r})")
    if concurrency is not None:
        if arrival not in ("closed", DEFAULT_RATE_ARRIVAL):
            raise ConfigError(f"--arrival {arrival} applies to --rate; --concurrency points are closed-loop")
        return [
            LoadPoint("concurrency", v, "closed", 1.0, point_seed(seed, "concurrency", v, "closed", 1.0))
            for v in _parse_values(concurrency, "concurrency", whole=True)
        ]
    assert rate is not None
    if arrival == "closed":
        raise ConfigError(
            "--arrival closed needs --concurrency; a --rate point needs constant, poisson or gamma"
        )
    kind_arrival: Arrival = arrival  # type: ignore[assignment]
    return [
        LoadPoint("rate", v, kind_arrival, burstiness, point_seed(seed, "rate", v, arrival, burstiness))
        for v in _parse_values(rate, "rate", whole=False)
    ]
