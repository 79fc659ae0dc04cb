"""Load on the client itself: 10,000 concurrent streams end to end through `bench run` against the scripted server,
and the open-files limit that makes that possible (raised at start, or one clear line when the OS will not allow it).
"""

from __future__ import annotations

import resource
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from harness.calibration import ScriptConfig, fetch_stats, serve_in_process
from harness.errors import ConfigError
from harness.limits import FILES_MARGIN, ensure_open_files, files_needed, open_files_limit
from harness.rundir import RunDir

BENCH = [sys.executable, "-m", "harness.cli"]
STREAMS = 10_000


@pytest.fixture
def lowered_soft_limit() -> Iterator[int]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    low = 512
    if hard != resource.RLIM_INFINITY and hard < 4096:
        pytest.skip(f"the hard open-files limit here is {hard}; this test needs >= 4096")
    resource.setrlimit(resource.RLIMIT_NOFILE, (low, hard))
    try:
        yield low
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def test_soft_limit_is_raised_to_what_the_concurrency_needs(lowered_soft_limit: int) -> None:
    limit = ensure_open_files(2000)
    assert limit.raised and limit.soft_before == lowered_soft_limit
    assert limit.soft == files_needed(2000) == 2000 + FILES_MARGIN
    assert open_files_limit()[0] == 2000 + FILES_MARGIN
    again = ensure_open_files(100)  # never lowered
    assert not again.raised and again.soft == 2000 + FILES_MARGIN


def test_too_low_hard_limit_is_one_clear_line() -> None:
    soft, hard = open_files_limit()
    with pytest.raises(ConfigError) as e:
        ensure_open_files(hard + 10)
    assert str(e.value).startswith(f"concurrency {hard + 10} needs ~{hard + 10 + FILES_MARGIN} open files")
    assert "ulimit -n" in str(e.value)
    assert open_files_limit() == (soft, hard)  # nothing changed


def _limit_to_1024() -> None:
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))


def test_bench_run_refuses_10000_streams_under_a_1024_limit(tmp_path: Path) -> None:
    out = tmp_path / "never"
    r = subprocess.run(
        [*BENCH, "run", "--endpoint", "x=http://127.0.0.1:9", "--concurrency", "10000", "--out", str(out)],
        capture_output=True, text=True, timeout=60, preexec_fn=_limit_to_1024,
    )  # fmt: skip
    assert r.returncode == 2
    line = " ".join(r.stderr.split())
    assert (
        "concurrency 10000 needs ~10100 open files; the OS allows 1024: raise it with `ulimit -n 20000`"
        in line
    ), r.stderr
    assert "Traceback" not in r.stderr and not out.exists()


def _max_overlap(intervals: list[tuple[float, float]]) -> int:
    starts = np.sort([a for a, _ in intervals])
    ends = np.sort([b for _, b in intervals])
    # at each start, how many have started minus how many have ended before it
    return int(np.max(np.arange(1, len(starts) + 1) - np.searchsorted(ends, starts, side="left")))


@pytest.mark.slow
def test_ten_thousand_concurrent_streams_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "run"
    # 4 tokens, 50 ms apart after a 3 s first token: short streams, so the test measures holding 10k connections,
    # not generating text, and each outlasts the sends (1.1 s here). A stream's end is when its [DONE] arrived (the
    # kernel's time), not when the client, busy sending, got round to reading it: with 0.25 s streams only ~6,500
    # were really open at once. Attached as `trtllm` (an OpenAI-compatible codec without a tokenize endpoint):
    # prompts are built with the model-free tokenizer, not 10,000 /tokenize round trips.
    with serve_in_process(ScriptConfig(ttft=3.0, itl=0.05, output_tokens=4)) as url:
        r = subprocess.run(
            [*BENCH, "run", "--endpoint", f"trtllm={url}", "--workload", "synthetic", "--set", "output_tokens=4",
             "--set", "input_tokens=8", "--concurrency", str(STREAMS), "--requests", str(STREAMS),
             "--warmup", "0", "--stall-timeout", "120", "--out", str(out)],
            capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        stats = fetch_stats(url, brief=True)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    records = list(RunDir.open(out).iter_records())
    assert len(records) == STREAMS and len({x.request_id for x in records}) == STREAMS
    bad = [x for x in records if not x.ok]
    assert not bad, (len(bad), bad[0].status, bad[0].error)
    assert all(x.output_tokens == 4 and x.client_output_tokens == 4 for x in records)
    assert stats["requests"] == STREAMS and stats["streams_done"] == STREAMS
    # they really were in flight together (every stream lasts > 3 s; the sends take ~1 s at this count)
    overlap = _max_overlap([(x.sent or 0.0, x.done or 0.0) for x in records])
    sends = [x.sent or 0.0 for x in records]
    assert overlap >= STREAMS * 0.9, (overlap, f"sends over {max(sends) - min(sends):.2f} s")
