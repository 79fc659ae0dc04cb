"""The workload file format: pydantic models of every workload kind and of the length / time distributions.

A workload file is YAML with a `kind` (synthetic, chat, long-context, shared-prefix, quantized, trace), a `name`,
a `version`, a one-line `description`, a `seed`, and the kind's parameters. Unknown fields are refused, so a typo
is an error rather than a silently ignored setting. See docs/workloads.md for every field and its source.
"""

from __future__ import annotations

from typing import Annotated, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from workloads.spec import Api

__all__ = [
    "DIST_KINDS",
    "WORKLOAD_KINDS",
    "BaseWorkloadSpec",
    "ChatSpec",
    "Constant",
    "Dist",
    "Exponential",
    "Geometric",
    "LogNormal",
    "LongContextSpec",
    "QuantizedSpec",
    "SharedPrefixSpec",
    "SyntheticSpec",
    "TraceSpec",
    "Uniform",
    "VariantSpec",
    "WorkloadSpec",
    "sample",
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# --------------------------------------------------------------------------------------------- distributions


class _Clipped(_Model):
    min: float | None = None
    max: float | None = None

    @model_validator(mode="after")
    def _bounds(self) -> _Clipped:
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"min ({self.min}) must be <= max ({self.max})")
        return self


class Constant(_Clipped):
    dist: Literal["constant"]
    value: float = Field(ge=0)


class LogNormal(_Clipped):
    """exp(N(mu, sigma)) * scale: `mu`, `sigma` as fitted on a trace, `scale` to shrink it to a small model."""

    dist: Literal["lognormal"]
    mu: float
    sigma: float = Field(ge=0)
    scale: float = Field(1.0, gt=0)


class Uniform(_Clipped):
    dist: Literal["uniform"]
    low: float
    high: float

    @model_validator(mode="after")
    def _order(self) -> Uniform:
        if self.low > self.high:
            raise ValueError(f"low ({self.low}) must be <= high ({self.high})")
        return self


class Exponential(_Clipped):
    dist: Literal["exponential"]
    mean: float = Field(gt=0)


class Geometric(_Clipped):
    """Counts 1, 2, 3, ... with P(k) = (1-p)^(k-1) p and mean 1/p."""

    dist: Literal["geometric"]
    mean: float = Field(ge=1)


Dist = Annotated[Constant | LogNormal | Uniform | Exponential | Geometric, Field(discriminator="dist")]
DIST_KINDS = ("constant", "lognormal", "uniform", "exponential", "geometric")


def sample(dist: Dist, rng: np.random.Generator, size: int, *, integer: bool) -> np.ndarray:
    """Draw `size` values, clipped to [min, max]; integers are rounded and at least min (or 0)."""
    match dist:
        case Constant():
            x = np.full(size, dist.value, dtype=float)
        case LogNormal():
            x = rng.lognormal(dist.mu, dist.sigma, size) * dist.scale
        case Uniform():
            x = rng.uniform(dist.low, dist.high, size)
        case Exponential():
            x = rng.exponential(dist.mean, size)
        case Geometric():
            x = rng.geometric(1.0 / dist.mean, size).astype(float)
    lo = dist.min if dist.min is not None else (-np.inf if not integer else 0.0)
    hi = dist.max if dist.max is not None else np.inf
    x = np.clip(x, lo, hi)
    return np.rint(x).astype(np.int64) if integer else x


# --------------------------------------------------------------------------------------------- workloads


class BaseWorkloadSpec(_Model):
    kind: str
    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]*$")
    version: int = Field(1, ge=1)
    description: str = Field(min_length=1)
    seed: int = 0
    api: Api = "completions"
    pin_output: bool = True


class SyntheticSpec(BaseWorkloadSpec):
    kind: Literal["synthetic"]
    input_tokens: int = Field(gt=0)
    output_tokens: int = Field(gt=0)


class ChatSpec(BaseWorkloadSpec):
    kind: Literal["chat"]
    api: Literal["chat"] = "chat"
    system_prompt_tokens: int = Field(0, ge=0)
    turns: Dist
    user_tokens: Dist
    reply_tokens: Dist
    think_time_s: Dist
    max_context: int = Field(gt=0)


class LongContextSpec(BaseWorkloadSpec):
    kind: Literal["long-context"]
    max_context: int = Field(gt=0)
    fractions: tuple[Annotated[float, Field(gt=0, le=1)], ...] = Field(min_length=1)
    output_tokens: int = Field(gt=0)


class SharedPrefixSpec(BaseWorkloadSpec):
    kind: Literal["shared-prefix"]
    groups: int = Field(gt=0)
    prefix_tokens: int = Field(gt=0)
    suffix_tokens: int = Field(gt=0)
    output_tokens: int = Field(gt=0)
    cache_block_tokens: int = Field(128, gt=0)
    control_every: int = Field(
        5, ge=0
    )  # after the warm-ups, every k-th request is a no-sharing control (0: none)

    @model_validator(mode="after")
    def _two_blocks(self) -> SharedPrefixSpec:
        if self.prefix_tokens < 2 * self.cache_block_tokens:
            raise ValueError(
                f"prefix_tokens ({self.prefix_tokens}) must be >= 2 cache blocks "
                f"(2 x {self.cache_block_tokens}): shorter prefixes never hit a block-based prefix cache"
            )
        return self


class VariantSpec(_Model):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    file_type: Literal[
        "F32", "F16", "BF16", "Q8_0", "Q6_K", "Q5_0", "Q5_1", "Q5_K_M", "Q4_0", "Q4_1", "Q4_K_M"
    ]


class TraceSpec(BaseWorkloadSpec):
    kind: Literal["trace"]
    format: Literal["azure", "mooncake"]
    trace_path: str = Field(min_length=1)
    speedup: float = Field(1.0, gt=0)  # replay t/speedup: 10 plays an hour in 6 minutes
    length_scale: float = Field(1.0, gt=0)  # multiply every token length (and Mooncake's block size) by this
    max_input_tokens: int | None = Field(None, gt=0)
    max_output_tokens: int | None = Field(None, gt=0)
    sample: float = Field(1.0, gt=0, le=1)  # keep this fraction of rows (seeded), in order
    start_s: float = Field(0.0, ge=0)  # skip rows before this trace time
    max_requests: int | None = Field(None, gt=0)
    block_tokens: int = Field(512, gt=0)  # Mooncake's hash block size


class QuantizedSpec(BaseWorkloadSpec):
    kind: Literal["quantized"]
    base: Annotated[
        SyntheticSpec | LongContextSpec | SharedPrefixSpec | ChatSpec | TraceSpec, Field(discriminator="kind")
    ]
    source_model: str = Field(min_length=1)
    variants: tuple[VariantSpec, ...] = Field(min_length=1)
    reference: str | None = None  # the variant others are compared with; default: the first
    quality_max_tokens: int = Field(32, gt=0)

    @model_validator(mode="after")
    def _reference_known(self) -> QuantizedSpec:
        names = [v.name for v in self.variants]
        if len(set(names)) != len(names):
            raise ValueError(f"variant names must be distinct, got {names}")
        if self.reference is not None and self.reference not in names:
            raise ValueError(f"reference {self.reference!r} is not one of the variants {names}")
        return self


WorkloadSpec = SyntheticSpec | ChatSpec | LongContextSpec | SharedPrefixSpec | QuantizedSpec | TraceSpec
WORKLOAD_KINDS: dict[str, type[BaseWorkloadSpec]] = {
    "synthetic": SyntheticSpec,
    "chat": ChatSpec,
    "long-context": LongContextSpec,
    "shared-prefix": SharedPrefixSpec,
    "quantized": QuantizedSpec,
    "trace": TraceSpec,
}
