"""Crash safety of `bench run`: SIGINT and SIGKILL mid-run leave a readable run directory holding every finished
record, `bench summarize` works on it, and `bench run --resume DIR` finishes the run without repeating a finished
request (real `bench` processes, real HTTP to the scripted server in its own process, real files)."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from harness.calibration import Faults, ScriptConfig, serve_in_process
from harness.rundir import RunDir
from harness.summary import summarize_run

BENCH = [sys.executable, "-m", "harness.cli"]
REQUESTS = 60


def bench(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BENCH, *args], capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def server() -> Iterator[str]:
    with serve_in_process(ScriptConfig(ttft=0.01, itl=0.01, output_tokens=10)) as url:
        yield url


def _args(url: str, out: Path, *extra: str) -> list[str]:
    return [
        "run", "--endpoint", f"s={url}", "--workload", "synthetic", "--set", "output_tokens=10",
        "--concurrency", "2,3", "--requests", str(REQUESTS), "--warmup", "2", "--out", str(out), *extra,
    ]  # fmt: skip


def _start_and_signal(args: list[str], out: Path, sig: signal.Signals, after: int) -> set[str]:
    """Start `bench run`, wait for `after` records, send `sig`; the request ids on disk just before the signal."""
    proc = subprocess.Popen([*BENCH, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    recs = out / "records.jsonl"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if recs.exists() and recs.read_bytes().count(b"\n") >= after:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    before = {orjson.loads(line)["request_id"] for line in recs.read_bytes().splitlines()}
    proc.send_signal(sig)
    proc.communicate(timeout=60)
    assert proc.returncode != 0
    return before


def _ids(out: Path) -> list[tuple[str, str]]:
    return [(r.point, r.request_id) for r in RunDir.open(out).iter_records()]


def test_sigkill_leaves_a_readable_run_that_summarizes(server: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    before = _start_and_signal(_args(server, out), out, signal.SIGKILL, after=15)
    manifest = orjson.loads((out / "manifest.json").read_bytes())
    assert manifest["status"] == "running"  # never finished: the manifest says so
    kept = {r.request_id for r in RunDir.open(out).iter_records()}
    assert before <= kept
    r = bench("summarize", str(out))
    assert r.returncode == 0, r.stderr
    assert (out / "summary.json").exists()
    point = orjson.loads((out / "summary.json").read_bytes())["points"][0]
    assert point["requests"]["ok"] >= len(before) - 2  # the first 2 are warm-up


def test_sigint_then_resume_finishes_without_repeating(server: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    before = _start_and_signal(_args(server, out), out, signal.SIGINT, after=20)
    m1 = orjson.loads((out / "manifest.json").read_bytes())
    assert m1["status"] == "interrupted"
    assert bench("summarize", str(out)).returncode == 0
    first = _ids(out)

    r = bench("run", "--resume", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    m2 = orjson.loads((out / "manifest.json").read_bytes())
    assert m2["status"] == "complete"
    # the run's identity and clock anchor are the original ones; the resume is recorded
    assert m2["started_at"] == m1["started_at"] and m2["clock_anchor"] == m1["clock_anchor"]
    assert [x["segment"] for x in m2["resumes"]] == [2]
    resume = [e for e in RunDir.open(out).iter_events() if e["kind"] == "resume"]
    assert (
        len(resume) == 1
        and resume[0]["segment"] == 2
        and resume[0]["clock_anchor"]["wall"] > m1["clock_anchor"]["wall"]
    )

    records = list(RunDir.open(out).iter_records())
    assert records[: len(first)] == [r for r in records[: len(first)]]  # earlier records untouched
    assert before <= {r.request_id for r in records}
    # no request id sent twice within a point
    per_point = Counter((r.point, r.request_id) for r in records)
    assert max(per_point.values()) == 1, [k for k, v in per_point.items() if v > 1]
    new = records[len(first) :]
    assert new and all(r.tags.get("segment") == "2" for r in new)
    assert all("segment" not in r.tags for r in records[: len(first)])
    # re-based clock: the new segment's offsets continue after the old ones
    assert min(r.scheduled for r in new) > max(r.done or r.scheduled for r in records[: len(first)])
    # every point now has its quota of measured results, exactly
    for point in ("concurrency=2", "concurrency=3"):
        measured = [
            r for r in records if r.point == point and r.phase == "measure" and r.status != "cancelled"
        ]
        assert len(measured) == REQUESTS, (point, len(measured))
        assert all(r.ok for r in measured)
    summary = summarize_run(out)
    assert {p.point: p.requests.ok for p in summary.points} == {
        "concurrency=2": REQUESTS,
        "concurrency=3": REQUESTS,
    }


def test_resume_after_sigkill_skips_finished_points(server: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    # wait until the second point has started: the first one is finished and must not run again
    _start_and_signal(_args(server, out), out, signal.SIGKILL, after=REQUESTS + 2 + 8)
    ends = [e for e in RunDir.open(out).iter_events() if e["kind"] == "point_end"]
    assert [e["point"] for e in ends] == ["concurrency=2"]
    n_first = sum(1 for r in RunDir.open(out).iter_records() if r.point == "concurrency=2")
    r = bench("run", "--resume", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "finished before the resume" in r.stderr
    records = list(RunDir.open(out).iter_records())
    assert sum(1 for r in records if r.point == "concurrency=2") == n_first  # not one more request
    measured = [r for r in records if r.point == "concurrency=3" and r.phase == "measure" and r.ok]
    assert len(measured) == REQUESTS
    assert max(Counter((r.point, r.request_id) for r in records).values()) == 1


def test_resume_refuses_other_settings_and_finished_runs(server: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    _start_and_signal(_args(server, out), out, signal.SIGINT, after=5)
    r = bench("run", "--resume", str(out), "--concurrency", "8")
    assert r.returncode == 2 and "drop --concurrency" in r.stderr and "Traceback" not in r.stderr
    r = bench("run", "--resume", str(tmp_path / "nothing-here"))
    assert r.returncode == 2 and "no manifest.json" in r.stderr
    assert bench("run", "--resume", str(out)).returncode == 0
    r = bench("run", "--resume", str(out))
    assert r.returncode == 2 and "complete" in r.stderr


def test_resume_resends_failed_requests_only_when_asked(tmp_path: Path) -> None:
    faults = Faults(status={500: 0.2})
    with serve_in_process(ScriptConfig(ttft=0.01, itl=0.01, output_tokens=10, faults=faults)) as url:
        out, out2 = tmp_path / "a", tmp_path / "b"
        for d in (out, out2):
            _start_and_signal(_args(url, d, "--concurrency", "2"), d, signal.SIGKILL, after=20)
        failed_a = {r.request_id for r in RunDir.open(out).iter_records() if r.status == "http_error"}
        failed_b = {r.request_id for r in RunDir.open(out2).iter_records() if r.status == "http_error"}
        assert failed_a and failed_b
        assert bench("run", "--resume", str(out)).returncode == 0
        assert bench("run", "--resume", str(out2), "--resend-failed").returncode == 0
    seg2_a = {r.request_id for r in RunDir.open(out).iter_records() if r.tags.get("segment") == "2"}
    seg2_b = {r.request_id for r in RunDir.open(out2).iter_records() if r.tags.get("segment") == "2"}
    assert not failed_a & seg2_a  # by default a failed request stays failed
    assert failed_b <= seg2_b  # asked: every failed one is sent again
    # the summary counts each request once, as its latest attempt; the file keeps both
    recs_b = list(RunDir.open(out2).iter_records())
    latest = {(r.point, r.request_id): r for r in recs_b}  # file order: the re-send comes later
    assert len(latest) < len(recs_b)
    summary = summarize_run(out2)
    for p in summary.points:
        mine = [r for (point, _), r in latest.items() if point == p.point and r.phase == "measure"]
        assert (p.requests.ok, p.requests.failed) == (sum(r.ok for r in mine), sum(not r.ok for r in mine))
    assert any("sent again on resume" in n for n in summary.notes), summary.notes
    from harness.gate import load_gate_policy, load_points  # the regression gate counts them the same way

    for g in load_points(out2, load_gate_policy(None))[0]:
        mine = [r for (point, _), r in latest.items() if point == g.point and r.phase == "measure"]
        assert g.failed == sum(not r.ok and r.status != "cancelled" for r in mine)


CHAT = ["--workload", "chat", "--set", "turns.min=3", "--set", "turns.max=4", "--set", "user_tokens.max=20",
        "--set", "reply_tokens.max=8", "--set", "think_time_s.mean=0.05", "--set", "think_time_s.max=0.1",
        "--concurrency", "2", "--requests", "24", "--warmup", "0"]  # fmt: skip


def test_resumed_chat_sessions_go_on_with_their_conversation(server: str, tmp_path: Path) -> None:
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    r = bench("run", "--endpoint", f"s={server}", *CHAT, "--out", str(whole))
    assert r.returncode == 0, r.stderr
    _start_and_signal(
        ["run", "--endpoint", f"s={server}", *CHAT, "--out", str(cut)], cut, signal.SIGKILL, after=7
    )
    r = bench("run", "--resume", str(cut))
    assert r.returncode == 0, r.stderr
    # the scripted server's replies depend only on their length, and it counts the prompt it was sent word by word:
    # a turn sent with the same conversation has the same prompt_tokens in both runs
    truth = {r.request_id: r.prompt_tokens for r in RunDir.open(whole).iter_records()}
    recs = list(RunDir.open(cut).iter_records())
    assert all(r.ok for r in recs), [(r.request_id, r.error) for r in recs if not r.ok]
    first = {r.request_id for r in recs if "segment" not in r.tags}
    resumed = [
        r
        for r in recs
        if r.tags.get("segment") == "2"
        and int(r.tags["turn"]) > 1
        and f"{r.request_id.rsplit('-t', 1)[0]}-t{int(r.tags['turn']) - 1:02d}" in first
    ]
    assert resumed, "no session was cut between two turns"
    common = [r for r in recs if r.request_id in truth]
    assert {r.request_id for r in resumed} <= {r.request_id for r in common}
    assert {r.request_id: r.prompt_tokens for r in common} == {
        r.request_id: truth[r.request_id] for r in common
    }


def test_resume_drops_the_turns_after_a_kept_failure_and_says_why() -> None:
    from harness.orchestrate import _skipping
    from workloads.spec import RequestSpec

    def turns(session: str, n: int) -> list[RequestSpec]:
        return [
            RequestSpec(
                f"{session}-t{t}",
                "chat",
                8,
                messages=({"role": "user", "content": f"{session}{t}"},),
                session=session,
                turn=t,
                history_from=f"{session}-t{t - 1}" if t > 1 else None,
                think_time=1.0,
            )
            for t in range(1, n + 1)
        ]

    specs = turns("a", 4) + turns("b", 3) + turns("c", 3)
    skip = frozenset({"a-t1", "a-t2", "a-t3", "b-t1", "c-t1"})
    replies = {"a-t1": "ra1", "b-t1": "rb1"}
    failed = {"a-t2": "http_error", "a-t3": "cancelled", "c-t1": "timeout"}
    heard: list[tuple[str, str]] = []
    sent = list(_skipping(specs, skip, replies, failed, lambda s, why: heard.append((s.request_id, why))))
    assert [s.request_id for s in sent] == ["b-t2", "b-t3"]
    # b-t2 continues a kept turn: its conversation is rebuilt, and it has nothing left to wait for
    assert [m["content"] for m in sent[0].messages] == ["b1", "rb1", "b2"]
    assert sent[0].history_from is None and sent[0].think_time == 0.0
    assert sent[1] == specs[6]  # b-t3 continues b-t2, sent in this segment: as generated
    assert heard == [
        ("a-t4", "the turn it continues (a-t3) ended cancelled in an earlier segment"),
        ("c-t2", "the turn it continues (c-t1) ended timeout in an earlier segment"),
        ("c-t3", "the turn it continues (c-t2) was not sent either"),
    ]


def test_resumed_duration_point_runs_only_the_time_left(server: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    args = ["run", "--endpoint", f"s={server}", "--workload", "synthetic", "--set", "output_tokens=10",
            "--concurrency", "2", "--duration", "3", "--warmup", "2", "--out", str(out)]  # fmt: skip
    _start_and_signal(args, out, signal.SIGKILL, after=24)  # ~18 requests/s: about 1.2 s of the window
    r = bench("run", "--resume", str(out))
    assert r.returncode == 0, r.stdout + r.stderr

    def window(segment: str) -> float:
        recs = [
            r
            for r in RunDir.open(out).iter_records()
            if r.phase == "measure" and r.tags.get("segment", "1") == segment
        ]
        return max(r.done or r.scheduled for r in recs) - min(r.scheduled for r in recs)

    first, second = window("1"), window("2")
    assert first > 0.5, first  # the kill came well inside the window
    # together the two segments measured the 3 s asked for, not the first segment's time plus 3 s; a window ends
    # when its time is up and the requests in flight then end within ~0.1 s
    assert 2.7 < first + second < 3.6, (first, second)
