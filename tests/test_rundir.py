"""The run directory on real files and real processes: creation, schema refusal, kills, `bench summarize`."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import orjson
import pytest

from harness.errors import BenchError, SchemaError
from harness.records import RequestRecord
from harness.rundir import RunDir, TruncatedLineWarning

BENCH = shutil.which("bench", path=str(Path(sys.executable).parent)) or "bench"


def _rec(i: int, phase: str = "measure") -> RequestRecord:
    t = float(i)
    return RequestRecord(
        request_id=f"r{i}",
        engine="fake",
        point="rate=1",
        phase=phase,  # type: ignore[arg-type]
        scheduled=t,
        sent=t + 0.001,
        chunk_times=[t + 0.1, t + 0.2],
        chunk_tokens=[1, 1],
        done=t + 0.25,
        output_tokens=2,
        token_source="server_usage",
        client_output_tokens=2,
    )


def test_create_refuses_non_empty_dir_unless_resuming(tmp_path: Path) -> None:
    rd = RunDir.create(tmp_path / "run")
    rd.start("run-1", command=["bench", "run"])
    with pytest.raises(BenchError, match="is not empty; choose a new --out, or pass --resume"):
        RunDir.create(tmp_path / "run")
    assert RunDir.create(tmp_path / "run", resume=True).load_manifest().run_id == "run-1"
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "x.txt").write_text("x")
    with pytest.raises(BenchError, match=r"has no manifest\.json"):
        RunDir.create(tmp_path / "other", resume=True)


def test_manifest_start_and_finish(tmp_path: Path) -> None:
    rd = RunDir.create(tmp_path / "run")
    m = rd.start("run-1", command=["bench", "run", "x"], load={"kind": "rate", "arrival": "poisson"})
    assert m.status == "running" and m.host is not None and m.host.cores and m.host.memory_bytes
    assert m.host.hostname and m.host.python
    on_disk = orjson.loads((tmp_path / "run" / "manifest.json").read_bytes())
    assert on_disk["schema_version"] == 1 and on_disk["kind"] == "manifest" and on_disk["status"] == "running"
    done = rd.finish("complete")
    again = rd.load_manifest()
    assert again.status == "complete" and again.finished_at == done.finished_at
    assert again.load == {"kind": "rate", "arrival": "poisson"}
    assert not list((tmp_path / "run").glob(".*tmp"))  # atomic write left no temporary behind


def test_records_and_events_round_trip_with_schema_version(tmp_path: Path) -> None:
    with RunDir.create(tmp_path / "run") as rd:
        for i in range(3):
            rd.append_record(_rec(i))
        rd.append_event({"kind": "point_start", "engine": "fake", "point": "rate=1"})
    lines = (tmp_path / "run" / "records.jsonl").read_bytes().splitlines()
    assert len(lines) == 3 and all(orjson.loads(x)["schema_version"] == 1 for x in lines)
    assert [r.request_id for r in rd.iter_records()] == ["r0", "r1", "r2"]
    (ev,) = rd.iter_events()
    assert ev["kind"] == "point_start" and ev["schema_version"] == 1 and "at" in ev


def test_unknown_schema_version_refused_everywhere(tmp_path: Path) -> None:
    rd = RunDir.create(tmp_path / "run")
    rd.start("run-1")
    path = tmp_path / "run" / "manifest.json"
    path.write_bytes(orjson.dumps({**orjson.loads(path.read_bytes()), "schema_version": 7}))
    with pytest.raises(SchemaError) as e:
        rd.load_manifest()
    assert "written by schema_version 7; this EngineBench reads 1; upgrade EngineBench" in str(e.value)

    bad = {**_rec(0).to_dict(), "schema_version": 7}
    (tmp_path / "run" / "records.jsonl").write_bytes(
        orjson.dumps(_rec(1).to_dict()) + b"\n" + orjson.dumps(bad) + b"\n"
    )
    with pytest.raises(SchemaError, match=r"records.jsonl line 2 was written by schema_version 7"):
        list(rd.iter_records())

    (tmp_path / "run" / "summary.json").write_bytes(orjson.dumps({"kind": "summary", "schema_version": 7}))
    with pytest.raises(SchemaError, match=r"summary\.json was written by schema_version 7"):
        rd.load_summary()
    (tmp_path / "run" / "summary.json").write_bytes(orjson.dumps({"kind": "summary"}))
    with pytest.raises(SchemaError, match="has no schema_version"):
        rd.load_summary()


def test_truncated_last_line_is_skipped_and_reported(tmp_path: Path) -> None:
    with RunDir.create(tmp_path / "run") as rd:
        for i in range(3):
            rd.append_record(_rec(i))
    full = orjson.dumps(_rec(3).to_dict())
    with open(tmp_path / "run" / "records.jsonl", "ab") as f:
        f.write(full[: len(full) // 2])  # what a kill in the middle of a write leaves behind
    with pytest.warns(TruncatedLineWarning, match="skipped a truncated last line \\(line 4"):
        records = list(rd.iter_records())
    assert [r.request_id for r in records] == ["r0", "r1", "r2"]
    # resuming drops the partial line, so the next append starts on a line of its own
    rd.start("run-1")
    with RunDir.create(tmp_path / "run", resume=True) as resumed:
        resumed.append_record(_rec(4))
    assert [r.request_id for r in resumed.iter_records()] == ["r0", "r1", "r2", "r4"]


def test_corrupt_middle_line_is_an_error(tmp_path: Path) -> None:
    rd = RunDir.create(tmp_path / "run")
    (tmp_path / "run" / "records.jsonl").write_bytes(
        b'{"schema_version": 1\n' + orjson.dumps(_rec(0).to_dict()) + b"\n"
    )
    with pytest.raises(SchemaError, match="line 1 is not a JSON object; the file is damaged"):
        list(rd.iter_records())


def test_appended_record_is_readable_by_another_process_at_once(tmp_path: Path) -> None:
    rd = RunDir.create(tmp_path / "run")
    rd.append_record(_rec(0))  # file left open, no close(): the line must already be visible
    code = (
        "from harness.rundir import RunDir; import sys; print(len(list(RunDir(sys.argv[1]).iter_records())))"
    )
    out = subprocess.run([sys.executable, "-c", code, str(tmp_path / "run")], capture_output=True, text=True)
    assert out.stdout.strip() == "1", out.stderr
    rd.close()


def test_sigkill_loses_no_appended_record(tmp_path: Path) -> None:
    script = textwrap.dedent(
        """
        import os, signal, sys
        from harness.records import RequestRecord
        from harness.rundir import RunDir
        rd = RunDir.create(sys.argv[1])
        for i in range(200):
            rd.append_record(RequestRecord(request_id=f"r{i}", engine="e", point="p", phase="measure",
                                           scheduled=float(i)))
        os.kill(os.getpid(), signal.SIGKILL)
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "run")], capture_output=True, text=True
    )
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    ids = [r.request_id for r in RunDir(tmp_path / "run").iter_records()]
    assert ids == [f"r{i}" for i in range(200)]


def _write_small_run(path: Path) -> None:
    with RunDir.create(path) as rd:
        rd.start("run-cli", load={"kind": "rate", "arrival": "poisson"}, slo={"ttft_p95_ms": 200.0})
        for i in range(40):
            rd.append_record(_rec(i))
        rd.append_event({"kind": "point_end", "engine": "fake", "point": "rate=1", "stop_reason": "requests"})
        rd.finish("complete")


def test_bench_summarize_writes_summary_and_exits_0(tmp_path: Path) -> None:
    _write_small_run(tmp_path / "run")
    out = subprocess.run(
        [BENCH, "summarize", str(tmp_path / "run")], capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stdout + out.stderr
    summary = RunDir.open(tmp_path / "run").load_summary()
    assert summary.run_id == "run-cli" and len(summary.points) == 1
    p = summary.points[0]
    assert p.requests.ok == 40 and p.ttft_ms.p50 == pytest.approx(100.0, abs=1e-6)
    assert p.goodput is not None and p.goodput.good == 40
    assert "fake" in out.stdout and "rate=1" in out.stdout


def test_bench_summarize_on_a_non_run_dir_fails_cleanly(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("hello")
    out = subprocess.run([BENCH, "summarize", str(tmp_path)], capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert "Traceback" not in out.stderr
    lines = [x for x in out.stderr.splitlines() if x.strip()]
    assert len(lines) == 1 and "is not a run directory" in lines[0], out.stderr
    assert not (tmp_path / "summary.json").exists()
    assert os.listdir(tmp_path) == ["notes.txt"]


@pytest.mark.bench
def test_append_cost_is_dominated_by_serialisation(tmp_path: Path) -> None:
    # one write(2) per record (what makes a SIGKILL lose nothing) must cost little next to serialising the record
    import time

    recs = [_rec(i) for i in range(2000)]
    for r in recs:
        r.chunk_times = [r.scheduled + 0.01 * k for k in range(256)]
        r.chunk_tokens = [1] * 256

    def best_of(fn: Callable[[], None], repeats: int = 3) -> float:
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
        return min(times)

    def serialise() -> None:
        for r in recs:
            orjson.dumps(r)

    def append() -> None:
        with RunDir.create(tmp_path / f"run{time.perf_counter_ns()}") as rd:
            for r in recs:
                rd.append_record(r)

    ratio = best_of(append) / best_of(serialise)
    print(f"append_record / serialise-only time ratio: {ratio:.2f}")
    assert ratio < 3.0
