"""The qualitative side of the matrix: versioned knowledge documents of engine facts, each with a source and a date.

Shape (`schema_version: 1`, `kind: knowledge`): `engines: {NAME: {aliases, hardware, on_device, status,
hardware_source, hardware_date, status_source, status_date, scores: {CRITERION: {score 1–5, why, source, date}}}}`;
every key is optional. The built-in knowledge is two documents joined with `merge_knowledge` by the I/O layer
(`harness.decide.builtin_knowledge`): the engine facts (hardware, status, on-device, aliases: `adapters.knowledge`,
the one record `bench engines` reads too) and the scores (`matrix/data/knowledge.yaml`). Users pass their own file to
override entries: `merge_knowledge` replaces hardware/status when given and single scores. Hardware names are
compared as given: the caller maps them onto one vocabulary first. Parsing raises ConfigError naming the entry at
fault. Pure: no I/O.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from harness.errors import ConfigError, SchemaError

__all__ = [
    "KNOWLEDGE_SCHEMA_VERSION",
    "QUALITATIVE",
    "EngineFacts",
    "Fact",
    "Knowledge",
    "merge_knowledge",
    "normalize_engine_name",
    "parse_knowledge",
]

KNOWLEDGE_SCHEMA_VERSION = 1
QUALITATIVE = ("hardware_flexibility", "operational_simplicity", "ecosystem", "quantization")


def normalize_engine_name(name: str) -> str:
    """`llama.cpp`, `llama-cpp` and `LlamaCpp` are one engine."""
    return re.sub(r"[^a-z0-9]", "", name.lower())


@dataclass(frozen=True, slots=True)
class Fact:
    score: int
    why: str
    source: str
    date: str


@dataclass(frozen=True, slots=True)
class EngineFacts:
    name: str
    aliases: tuple[str, ...] = ()
    hardware: tuple[str, ...] = ()
    on_device: bool | None = None  # None: not stated (treated as False)
    status: str = ""  # "active" | "maintenance" | "inactive" | "archived"; "" when not stated
    scores: Mapping[str, Fact] = field(default_factory=dict)
    source: str = ""
    date: str = ""
    hardware_source: str = ""  # where `hardware` was read, and when
    hardware_date: str = ""
    status_source: str = ""  # where `status` was read, and when
    status_date: str = ""


@dataclass(frozen=True, slots=True)
class Knowledge:
    engines: Mapping[str, EngineFacts]
    origin: str = "builtin"

    def lookup(self, *names: str) -> EngineFacts | None:
        """The entry for the first of `names` (adapter, then engine name) that matches a name or alias."""
        for name in names:
            if not name:
                continue
            key = normalize_engine_name(name)
            for facts in self.engines.values():
                if key == normalize_engine_name(facts.name) or key in {
                    normalize_engine_name(a) for a in facts.aliases
                }:
                    return facts
        return None


def _fact(engine: str, criterion: str, raw: Any) -> Fact:
    where = f"knowledge entry {engine}.scores.{criterion}"
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where} must be a mapping with score, why, source, date")
    missing = [k for k in ("score", "source", "date") if not raw.get(k)]
    if missing:
        raise ConfigError(
            f"{where} lacks {', '.join(missing)}; every fact needs a score, a source and a date"
        )
    score = raw["score"]
    if not isinstance(score, int) or isinstance(score, bool) or not 1 <= score <= 5:
        raise ConfigError(f"{where}: score {score!r} must be an integer from 1 to 5")
    return Fact(score=score, why=str(raw.get("why", "")), source=str(raw["source"]), date=str(raw["date"]))


def _engine(name: str, raw: Any) -> EngineFacts:
    if not isinstance(raw, Mapping):
        raise ConfigError(f"knowledge entry {name} must be a mapping")
    scores_raw = raw.get("scores", {}) or {}
    if not isinstance(scores_raw, Mapping):
        raise ConfigError(f"knowledge entry {name}.scores must be a mapping")
    unknown = sorted(set(scores_raw) - set(QUALITATIVE))
    if unknown:
        raise ConfigError(
            f"knowledge entry {name}: unknown criterion {unknown[0]!r}; known: {', '.join(QUALITATIVE)}"
        )
    hardware = raw.get("hardware", []) or []
    if not isinstance(hardware, list | tuple):
        raise ConfigError(f"knowledge entry {name}.hardware must be a list, e.g. [nvidia, amd, cpu]")
    return EngineFacts(
        name=name,
        aliases=tuple(str(a) for a in raw.get("aliases", []) or []),
        hardware=tuple(str(h).lower() for h in hardware),
        on_device=None if raw.get("on_device") is None else bool(raw["on_device"]),
        status=str(raw.get("status", "") or ""),
        scores={c: _fact(name, c, v) for c, v in scores_raw.items()},
        source=str(raw.get("source", "")),
        date=str(raw.get("date", "")),
        hardware_source=str(raw.get("hardware_source", "") or ""),
        hardware_date=str(raw.get("hardware_date", "") or ""),
        status_source=str(raw.get("status_source", "") or ""),
        status_date=str(raw.get("status_date", "") or ""),
    )


def parse_knowledge(data: Any, origin: str = "builtin") -> Knowledge:
    """Validate a parsed knowledge document (YAML/JSON already loaded by the caller)."""
    if not isinstance(data, Mapping):
        raise SchemaError(f"knowledge file {origin} must be a mapping with schema_version and engines")
    version = data.get("schema_version")
    if version != KNOWLEDGE_SCHEMA_VERSION:
        raise SchemaError(
            f"knowledge file {origin} has schema_version {version!r}; this EngineBench reads "
            f"{KNOWLEDGE_SCHEMA_VERSION}: set schema_version: {KNOWLEDGE_SCHEMA_VERSION}"
        )
    engines = data.get("engines")
    if not isinstance(engines, Mapping):
        raise SchemaError(f"knowledge file {origin} needs an `engines` mapping")
    return Knowledge(engines={str(k): _engine(str(k), v) for k, v in engines.items()}, origin=origin)


def merge_knowledge(base: Knowledge, override: Knowledge) -> Knowledge:
    """Entries of `override` win: an engine there replaces hardware/status (with their sources) when it states them,
    and adds or replaces single scores."""
    merged = dict(base.engines)
    for name, facts in override.engines.items():
        current = base.lookup(name)
        if current is None:
            merged[name] = facts
            continue
        merged[current.name] = EngineFacts(
            name=current.name,
            aliases=tuple(dict.fromkeys((*current.aliases, *facts.aliases))),
            hardware=facts.hardware or current.hardware,
            on_device=current.on_device if facts.on_device is None else facts.on_device,
            status=facts.status or current.status,
            scores={**current.scores, **facts.scores},
            source=facts.source or current.source,
            date=facts.date or current.date,
            hardware_source=(facts.hardware_source or facts.source or override.origin)
            if facts.hardware
            else current.hardware_source,
            hardware_date=(facts.hardware_date or facts.date or "")
            if facts.hardware
            else current.hardware_date,
            status_source=(facts.status_source or facts.source or override.origin)
            if facts.status
            else current.status_source,
            status_date=(facts.status_date or facts.date or "") if facts.status else current.status_date,
        )
    return Knowledge(engines=merged, origin=f"{base.origin}+{override.origin}")
