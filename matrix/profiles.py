"""Weight profiles: named weightings of the criteria (data in matrix/data/profiles.yaml), and user weight files.

A profile or weights document is `{schema_version: 1, weights: {criterion: number ≥ 0}}` (a bare mapping of
criterion → number is also accepted for user files). Unknown criteria are an error naming the criterion.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from harness.errors import ConfigError, SchemaError
from matrix.scoring import normalize_weights

__all__ = ["PROFILES_SCHEMA_VERSION", "Profile", "parse_profiles", "parse_weights"]

PROFILES_SCHEMA_VERSION = 1


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    description: str
    weights: Mapping[str, float]  # normalized: every criterion, summing to 1


def parse_weights(data: Any, origin: str) -> dict[str, float]:
    """A user weights file's content → normalized weights."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"weights file {origin} must be a mapping of criterion: weight")
    if "weights" in data:
        version = data.get("schema_version", PROFILES_SCHEMA_VERSION)
        if version != PROFILES_SCHEMA_VERSION:
            raise SchemaError(
                f"weights file {origin} has schema_version {version!r}; this EngineBench reads {PROFILES_SCHEMA_VERSION}"
            )
        data = data["weights"]
        if not isinstance(data, Mapping):
            raise ConfigError(f"weights file {origin}: `weights` must be a mapping of criterion: weight")
    return normalize_weights({str(k): v for k, v in data.items()}, f"weights file {origin}")


def parse_profiles(data: Any, origin: str = "builtin profiles") -> dict[str, Profile]:
    if not isinstance(data, Mapping) or data.get("schema_version") != PROFILES_SCHEMA_VERSION:
        raise SchemaError(
            f"{origin}: expected schema_version {PROFILES_SCHEMA_VERSION} and a `profiles` mapping"
        )
    raw = data.get("profiles")
    if not isinstance(raw, Mapping) or not raw:
        raise SchemaError(f"{origin}: `profiles` must be a non-empty mapping")
    out: dict[str, Profile] = {}
    for name, entry in raw.items():
        if not isinstance(entry, Mapping) or not isinstance(entry.get("weights"), Mapping):
            raise ConfigError(f"{origin}: profile {name} needs a `weights` mapping")
        out[str(name)] = Profile(
            str(name),
            str(entry.get("description", "")),
            normalize_weights(entry["weights"], f"profile {name}"),
        )
    return out
