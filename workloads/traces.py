"""Trace replay: real request arrival times and token lengths, with synthesized prompts of those lengths.

Readers for two public traces (both carry lengths and times, never text):
- Azure LLM inference trace (CSV `TIMESTAMP,ContextTokens,GeneratedTokens`, absolute times; Patel et al.,
  Splitwise, ISCA 2024; CC-BY 4.0);
- Mooncake (JSONL `timestamp` ms, `input_length`, `output_length`, `hash_ids`: one id per 512-token prompt block,
  equal ids = identical prefix blocks; kvcache-ai/Mooncake, Apache-2.0). Equal hash ids get identical token blocks
  here too, so an engine's prefix cache sees the sharing the trace had.

A trace's times become the schedule: `trace_schedule` returns send times (seconds from the first kept row, divided
by `speedup`) alongside the requests, for an open-loop replay. Replaying on a small machine needs `speedup`,
`length_scale`, caps and sampling; they are part of the workload, hence of its fingerprint, and stated in results.

Expected cache share (`cache_expected_tokens`): Azure rows share nothing (the template's tokens only); a Mooncake
row's leading blocks whose hash ids an earlier kept row had (an engine reuses a prefix, not blocks after a miss),
plus the template's tokens.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from harness.errors import ConfigError
from workloads.model import TraceSpec
from workloads.spec import RequestSpec
from workloads.text import BuiltPrompt, PromptBuilder, rng_for, tags_of
from workloads.tokenizer import Tokenizer

if TYPE_CHECKING:
    from workloads.registry import Workload

__all__ = [
    "GENERATOR_VERSION",
    "TraceRow",
    "generate",
    "infer_sessions",
    "read_azure",
    "read_mooncake",
    "read_trace",
    "requests",
    "select_rows",
    "trace_schedule",
    "trace_times",
]

GENERATOR_VERSION = 1


@dataclass(frozen=True, slots=True)
class TraceRow:
    """One trace request; `time_s` is seconds since the trace's first row."""

    index: int
    time_s: float
    input_tokens: int
    output_tokens: int
    hash_ids: tuple[int, ...] = ()


def _azure_time(stamp: str) -> float:
    # "2023-11-16 18:15:46.6805900": seven fractional digits, more than datetime parses
    whole, _, frac = stamp.strip().partition(".")
    return datetime.fromisoformat(whole).timestamp() + (float("0." + frac) if frac else 0.0)


def read_azure(path: str | Path) -> list[TraceRow]:
    rows: list[TraceRow] = []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} - set(reader.fieldnames or ())
        if missing:
            raise ConfigError(f"{path} is not an Azure LLM inference trace: no column(s) {sorted(missing)}")
        t0: float | None = None
        for i, r in enumerate(reader):
            t = _azure_time(r["TIMESTAMP"])
            t0 = t if t0 is None else t0
            rows.append(TraceRow(i, t - t0, int(r["ContextTokens"]), int(r["GeneratedTokens"])))
    return rows


def read_mooncake(path: str | Path) -> list[TraceRow]:
    rows: list[TraceRow] = []
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                d = json.loads(line)
                t = float(d["timestamp"]) / 1000.0
                rows.append(
                    TraceRow(
                        len(rows),
                        t,
                        int(d["input_length"]),
                        int(d["output_length"]),
                        tuple(d.get("hash_ids", ())),
                    )
                )
            except (ValueError, KeyError, TypeError) as e:
                raise ConfigError(f"{path} line {line_no}: not a Mooncake trace row ({e})") from None
    if rows:
        t0 = rows[0].time_s
        rows = [TraceRow(r.index, r.time_s - t0, r.input_tokens, r.output_tokens, r.hash_ids) for r in rows]
    return rows


def read_trace(fmt: str, path: str | Path) -> list[TraceRow]:
    if not Path(path).is_file():
        raise ConfigError(
            f"trace file {path} not found: pass its path as trace_path (e.g. --set trace_path=FILE)"
        )
    return read_azure(path) if fmt == "azure" else read_mooncake(path)


def select_rows(rows: Sequence[TraceRow], spec: TraceSpec, seed: int) -> list[TraceRow]:
    """Rows from `start_s` on, a seeded `sample` fraction of them (order kept), at most `max_requests`."""
    kept = [r for r in rows if r.time_s >= spec.start_s]
    if spec.sample < 1.0:
        keep = rng_for(seed, "trace-sample").random(len(kept)) < spec.sample
        kept = [r for r, k in zip(kept, keep, strict=True) if k]
    return kept[: spec.max_requests] if spec.max_requests is not None else kept


def _scaled(value: int, spec: TraceSpec, cap: int | None) -> int:
    v = max(1, round(value * spec.length_scale))
    return min(v, cap) if cap is not None else v


def trace_schedule(
    workload: Workload, tokenizer: Tokenizer, n: int | None = None, seed: int | None = None, prompts: str = ""
) -> tuple[list[float], list[RequestSpec]]:
    """Send times (seconds from the first request) and the requests, for open-loop replay."""
    spec = workload.params
    if not isinstance(spec, TraceSpec):
        raise ConfigError(
            f"workload {workload.name} is a {spec.kind} workload, not a trace: it has no schedule"
        )
    seed = spec.seed if seed is None else seed
    rows = select_rows(read_trace(spec.format, workload.resolve_path(spec.trace_path)), spec, seed)
    if n is not None:
        rows = rows[:n]
    if not rows:
        return [], []
    builder = PromptBuilder(tokenizer, salt=prompts)
    block = max(1, round(spec.block_tokens * spec.length_scale))
    t0 = rows[0].time_s
    times, specs = [], []
    seen: set[int] = set()  # hash ids of the rows before
    for r in rows:
        input_tokens = _scaled(r.input_tokens, spec, spec.max_input_tokens)
        output_tokens = _scaled(r.output_tokens, spec, spec.max_output_tokens)
        expected = builder.template_tokens(spec.api)
        if spec.format == "mooncake" and r.hash_ids:
            built = _blocks_prompt(builder, spec, seed, r, input_tokens, block)
            reused = next((k for k, h in enumerate(r.hash_ids) if h not in seen), len(r.hash_ids))
            expected += min(reused * block, input_tokens)
            seen.update(r.hash_ids)
        else:
            built = builder.prompt(input_tokens, spec.api, (seed, "trace", r.index))
        times.append((r.time_s - t0) / spec.speedup)
        specs.append(
            RequestSpec(
                request_id=f"{spec.name}-{seed}-{r.index:06d}",
                api=spec.api,
                max_tokens=output_tokens,
                messages=built.messages,
                prompt=built.prompt,
                input_tokens=built.input_tokens,
                pin_output=spec.pin_output,
                tags=tags_of(
                    {
                        "workload": spec.name,
                        "trace": spec.format,
                        "trace_row": r.index,
                        "trace_time_s": f"{r.time_s:.3f}",
                        "trace_input_tokens": r.input_tokens,
                        "trace_output_tokens": r.output_tokens,
                        "input_tokens": built.input_tokens,
                        "cache_expected_tokens": min(expected, built.input_tokens),
                    }
                ),
            )
        )
    return times, specs


def _blocks_prompt(
    builder: PromptBuilder, spec: TraceSpec, seed: int, r: TraceRow, total: int, block: int
) -> BuiltPrompt:
    """Prompt made of one token block per hash id: equal ids give identical text (and tokens), so equal prefixes."""
    count = math.ceil(total / block)
    ids: list[int | str] = list(r.hash_ids[:count])
    ids += [f"row{r.index}-{k}" for k in range(len(ids), count)]  # length rounding left more blocks than ids
    parts = []
    for k, hid in enumerate(ids):
        length = block if k < count - 1 else total - block * (count - 1)
        parts.append(builder.texts.text(length, (seed, "block", hid)))
    if spec.api == "chat":
        return builder.chat([{"role": "user", "content": "".join(parts)}])
    return builder.completion(parts)


def infer_sessions(rows: Sequence[TraceRow], block_tokens: int = 512) -> list[int]:
    """A session id per Mooncake row: a row continues the latest session whose previous request's full blocks
    (at least 2) are a prefix of its hash ids, since a next turn resends the conversation so far. Used to measure
    turns per conversation (docs/workloads.md); a heuristic, as a sampled trace can miss turns."""
    sessions: list[int] = []
    latest: dict[tuple[int, ...], int] = {}
    count = 0
    for r in rows:
        h, found = r.hash_ids, None
        for length in range(len(h) - 1, 1, -1):
            found = latest.get(h[:length])
            if found is not None:
                break
        if found is None:
            found, count = count, count + 1
        session = found
        sessions.append(session)
        latest[h[: r.input_tokens // block_tokens]] = session
    return sessions


def generate(
    workload: Workload, n: int, seed: int, tokenizer: Tokenizer, prompts: str = ""
) -> list[RequestSpec]:
    """The first `n` kept rows (fewer when the trace has fewer); their send times come from `trace_schedule`."""
    return trace_schedule(workload, tokenizer, n, seed, prompts)[1]


def requests(workload: Workload, seed: int, tokenizer: Tokenizer, prompts: str = "") -> Iterator[RequestSpec]:
    """Every kept row, built one by one would rebuild the trace's shared blocks per row: built at once."""
    return iter(trace_schedule(workload, tokenizer, None, seed, prompts)[1])


def trace_times(workload: Workload, seed: int | None = None) -> list[float]:
    """The send times (seconds from the first kept request, after `speedup`) of every request the replay keeps,
    without building prompts: the schedule of the trace's open-loop load point."""
    spec = workload.params
    if not isinstance(spec, TraceSpec):
        raise ConfigError(
            f"workload {workload.name} is a {spec.kind} workload, not a trace: it has no schedule"
        )
    rows = select_rows(
        read_trace(spec.format, workload.resolve_path(spec.trace_path)),
        spec,
        spec.seed if seed is None else seed,
    )
    return [(r.time_s - rows[0].time_s) / spec.speedup for r in rows] if rows else []
