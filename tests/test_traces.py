"""Trace replay on the real public traces in shared/data/traces (read in place, never copied into the project)."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import numpy as np
import pytest

from harness.errors import ConfigError
from workloads.model import TraceSpec
from workloads.registry import Workload, load_workload
from workloads.tokenizer import SimpleTokenizer
from workloads.traces import infer_sessions, read_azure, read_mooncake, select_rows, trace_schedule

TRACES = Path(__file__).resolve().parent.parent.parent / "shared/data/traces"
AZURE = TRACES / "AzureLLMInferenceTrace_conv.csv"
MOONCAKE = TRACES / "mooncake_conversation_trace.jsonl"
TOK = SimpleTokenizer()

pytestmark = pytest.mark.skipif(
    not (AZURE.is_file() and MOONCAKE.is_file()), reason=f"public traces not found in {TRACES}"
)


def test_azure_reader() -> None:
    rows = read_azure(AZURE)
    # 19,366 data rows: the README's 19,365 comes from `wc -l`, which misses the last line (no final newline)
    assert len(rows) == 19_366
    assert rows[0].time_s == 0.0 and (rows[0].input_tokens, rows[0].output_tokens) == (374, 44)
    assert rows[-1].time_s == pytest.approx(3501.722, abs=0.001)  # ~1 hour, from 18:15:46.68 to 19:14:08.40
    assert all(b.time_s >= a.time_s for a, b in itertools.pairwise(rows))


def test_mooncake_reader() -> None:
    rows = read_mooncake(MOONCAKE)
    assert len(rows) == 12_031
    assert rows[0].time_s == 0.0 and rows[-1].time_s == pytest.approx(3536.999)
    assert rows[0].hash_ids[:3] == (0, 1, 2) and rows[0].input_tokens == 6758
    # one hash id per 512-token block
    assert all(len(r.hash_ids) == math.ceil(r.input_tokens / 512) for r in rows)


def _trace(name: str, **overrides: object) -> Workload:
    return load_workload(name).with_overrides(overrides)


def test_builtin_trace_workloads_find_the_shared_files() -> None:
    for name in ("trace-azure", "trace-mooncake"):
        w = load_workload(name)
        assert w.fingerprint.startswith("sha256:")
        times, specs = trace_schedule(w, TOK, n=5)
        assert len(times) == len(specs) == 5 and times[0] == 0.0


def test_time_scaling_and_sampling() -> None:
    rows = read_azure(AZURE)
    w = _trace("trace-azure", sample=1.0, speedup=10.0, length_scale=0.01, max_requests=50)
    times, specs = trace_schedule(w, TOK)
    assert len(specs) == 50
    assert times == pytest.approx([r.time_s / 10.0 for r in rows[:50]], abs=1e-9)
    assert [s.tags["trace_row"] for s in specs] == [str(i) for i in range(50)]
    # a seeded 10% sample: about 1,937 of 19,366 rows, the same rows for the same seed, others for another
    spec = _trace("trace-azure", sample=0.1, max_requests=None).params
    assert isinstance(spec, TraceSpec)
    kept = select_rows(rows, spec, seed=0)
    assert abs(len(kept) - 1936.6) < 5 * math.sqrt(19366 * 0.1 * 0.9)
    assert kept == select_rows(rows, spec, seed=0)
    assert kept != select_rows(rows, spec, seed=1)
    assert all(b.index > a.index for a, b in itertools.pairwise(kept))
    late_spec = _trace("trace-azure", sample=1.0, start_s=1800.0, max_requests=3).params
    assert isinstance(late_spec, TraceSpec)
    late = select_rows(rows, late_spec, 0)
    assert len(late) == 3 and all(r.time_s >= 1800.0 for r in late)


def test_length_scale_and_caps() -> None:
    rows = read_azure(AZURE)
    w = _trace(
        "trace-azure",
        sample=1.0,
        length_scale=0.25,
        max_input_tokens=300,
        max_output_tokens=40,
        max_requests=40,
    )
    _, specs = trace_schedule(w, TOK)
    for row, spec in zip(rows, specs, strict=False):
        assert spec.input_tokens == min(300, max(1, round(row.input_tokens * 0.25)))
        assert spec.max_tokens == min(40, max(1, round(row.output_tokens * 0.25)))
        assert TOK.count_prompt(spec.prompt) == spec.input_tokens
    assert max(s.input_tokens or 0 for s in specs) == 300  # the cap was reached


def test_mooncake_equal_hash_ids_give_identical_token_blocks() -> None:
    rows = read_mooncake(MOONCAKE)[:60]
    block = 32
    w = _trace("trace-mooncake", sample=1.0, length_scale=block / 512, max_input_tokens=None, max_requests=60)
    _, specs = trace_schedule(w, TOK)
    encoded = [TOK.encode(s.prompt) for s in specs]
    for row, spec, ids in zip(rows, specs, encoded, strict=True):
        assert len(ids) == spec.input_tokens == max(1, round(row.input_tokens * block / 512))
    compared = differed = 0
    for i in range(len(rows)):
        for j in range(i + 1, len(rows)):
            a, b = rows[i].hash_ids, rows[j].hash_ids
            shared = next(
                (k for k, (x, y) in enumerate(zip(a, b, strict=False)) if x != y), min(len(a), len(b))
            )
            full = min(shared, len(encoded[i]) // block, len(encoded[j]) // block)
            if full:
                assert encoded[i][: full * block] == encoded[j][: full * block]
                compared += 1
            if (
                shared < min(len(a), len(b))
                and shared < len(encoded[i]) // block
                and shared < len(encoded[j]) // block
            ):
                # the first block with different ids differs
                k = shared * block
                assert encoded[i][k : k + block] != encoded[j][k : k + block]
                differed += 1
    assert differed > 100
    assert compared > 100  # the conversation trace shares prefixes a lot (hash id 0 heads most requests)


def test_mooncake_caps_keep_shared_prefixes() -> None:
    w = _trace("trace-mooncake", sample=1.0, length_scale=1 / 16, max_input_tokens=100, max_requests=30)
    _, specs = trace_schedule(w, TOK)
    assert {s.input_tokens for s in specs} <= set(range(1, 101)) and max(
        s.input_tokens or 0 for s in specs
    ) == 100
    heads = [TOK.encode(s.prompt)[:32] for s in specs if (s.input_tokens or 0) >= 32]
    rows = read_mooncake(MOONCAKE)[:30]
    first_ids = [r.hash_ids[0] for r in rows if max(1, round(r.input_tokens / 16)) >= 32]
    for h in set(first_ids):
        group = {tuple(heads[k]) for k, x in enumerate(first_ids) if x == h}
        assert len(group) == 1


def test_trace_fingerprint_follows_content_not_path(tmp_path: Path) -> None:
    lines = MOONCAKE.read_text().splitlines()[:20]
    one, two = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    one.write_text("\n".join(lines) + "\n")
    two.write_text("\n".join(lines) + "\n")
    fa = _trace("trace-mooncake", trace_path=str(one)).fingerprint
    assert fa == _trace("trace-mooncake", trace_path=str(two)).fingerprint
    two.write_text("\n".join(lines[:-1]) + "\n")
    assert fa != _trace("trace-mooncake", trace_path=str(two)).fingerprint
    assert fa != _trace("trace-mooncake", trace_path=str(one), speedup=2.0).fingerprint


def test_trace_determinism_and_errors(tmp_path: Path) -> None:
    w = _trace("trace-mooncake", max_requests=8)
    assert w.generate(8, 0, tokenizer=TOK) == w.generate(8, 0, tokenizer=TOK)
    assert w.generate(8, 0, tokenizer=TOK) != w.generate(8, 1, tokenizer=TOK)
    with pytest.raises(ConfigError, match=r"trace file .* not found"):
        _trace("trace-azure", trace_path=str(tmp_path / "none.csv")).generate(1, tokenizer=TOK)
    bad = tmp_path / "bad.csv"
    bad.write_text("time,in,out\n1,2,3\n")
    with pytest.raises(ConfigError, match="not an Azure LLM inference trace"):
        read_azure(bad)
    with pytest.raises(ConfigError, match="not a trace"):
        trace_schedule(load_workload("synthetic"), TOK)


def test_replayed_rate_matches_the_trace() -> None:
    """The schedule keeps the trace's arrival process: mean rate = rows / duration, scaled by speedup."""
    w = _trace("trace-azure", sample=1.0, speedup=4.0, length_scale=0.01, max_requests=400)
    times, _ = trace_schedule(w, TOK)
    rows = read_azure(AZURE)[:400]
    assert (len(times) - 1) / times[-1] == pytest.approx(4 * (len(rows) - 1) / rows[-1].time_s, rel=1e-9)
    assert np.all(np.diff(times) >= 0)


def test_mooncake_sessions_give_the_documented_turn_counts() -> None:
    """docs/workloads.md cites these: conversations in the Mooncake trace, inferred from hash-id prefix chains."""
    sessions = infer_sessions(read_mooncake(MOONCAKE))
    turns = np.bincount(np.bincount(sessions))
    assert len(set(sessions)) == 8056
    assert len(sessions) / 8056 == pytest.approx(1.493, abs=0.001)
    assert turns[1] / 8056 == pytest.approx(0.750, abs=0.001) and turns[2] / 8056 == pytest.approx(
        0.152, abs=0.001
    )
