"""EngineBench's client side by side with vLLM's own client (`vllm bench serve`), against the scripted server.

The scripted server (harness/calibration.py, its own process) answers every request with TTFT 50 ms, then one token
every 5 ms, 256 tokens, and says per request how late it really wrote each chunk. Each client runs as a child
process, closed loop at 64 and 256 concurrent streams, and is judged on:

- the TTFT / ITL it reports (p50, p99) and its timing error beyond what the server says it added: per request for
  TTFT (both clients send a request id the server keys its account by: EngineBench in the body, vLLM bench as
  `x-request-id`), distribution-level for ITL (client ITL percentile minus the server's achieved gap percentile);
- client CPU-seconds per streamed token: the child's whole process tree (`os.wait4` rusage), marginal between a
  run of one wave and of `waves` waves, so start-up (vLLM's torch import, its tokenizer) is not charged per token;
- its ceiling: requests/s with TTFT = ITL = 0 (the server writes each 256-token answer in one write, so it costs
  little; its CPU use is printed to show it was not the bottleneck), 256 events to parse per request; each client
  runs `--ceiling-reps` times, interleaved in rotating order (a shared machine's load drifts between runs), and the
  best run of each is compared (all runs are printed).

    python -m benchmarks.peers [--concurrency 64,256] [--waves 4] [--reps 1] [--processes 1] [--ceiling-reps 3]
        [--json out.json]

Targets (the issue): timing error <= 1 ms p50 and <= 2 ms p99 at 256 streams; CPU per streamed token <= 2/3 of
vLLM bench serve's; a higher ceiling. With `--reps N` each client runs N times per stream count, interleaved:
timing is judged on the worst run, CPU per token on the median of each client's runs (one run's figure varies by
±15 % on a shared machine). The machine's own contention is printed (run-queue wait of each client), since
on a shared machine it, not the client, can dominate the timing error.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import psutil

if TYPE_CHECKING:
    from benchmarks.peer_tools import Tool

__all__ = ["PeerRun", "loopback_read_us", "main", "run_enginebench", "run_vllm", "vllm_bin"]

ROOT = Path(__file__).resolve().parents[1]
CACHE = Path(os.environ.get("ENGINEBENCH_CACHE", Path.home() / ".cache" / "enginebench"))
TTFT, ITL, TOKENS = 0.05, 0.005, 256


def vllm_bin() -> Path | None:
    path = CACHE / "vllm" / "venv" / "bin" / "vllm"
    return path if path.exists() else None


def tokenizer_dir() -> Path | None:
    path = CACHE / "model" / "SmolLM2-135M-Instruct-hf"
    return path if (path / "tokenizer.json").exists() or (path / "tokenizer_config.json").exists() else None


@dataclass
class PeerRun:
    tool: str
    concurrency: int
    requests: int
    ok: int
    wall_s: float
    cpu_s: float  # the client's process tree
    tokens: int
    ttft_ms: tuple[float, float]  # as the tool reports: p50, p99
    itl_ms: tuple[float, float]
    ttft_err_ms: tuple[float, float]  # minus truth minus the server's lag, per request
    itl_err_ms: tuple[float, float]  # client ITL percentile minus the server's achieved-gap percentile
    server_first_lag_ms: tuple[float, float]
    server_cpu_s: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def requests_per_s(self) -> float:
        return self.ok / self.extra.get("duration_s", self.wall_s)


def _pct(x: Sequence[float] | np.ndarray, scale: float = 1000.0) -> tuple[float, float]:
    a = np.asarray(x, dtype=float) * scale
    if a.size == 0:
        return (float("nan"), float("nan"))
    p = np.percentile(a, (50, 99))
    return (float(p[0]), float(p[1]))


@dataclass(frozen=True)
class _Measured:
    code: int
    cpu_s: float  # the client's process tree while the server was serving its requests (start-up excluded)
    wall_s: float  # the same window
    cpu_total_s: float  # the whole run, start-up and teardown included (rusage)
    tail: str
    server_cpu_s: float  # the scripted server's CPU in the same window
    stats: dict[str, Any]  # the server's per-request account of the run (`?detail=1`)


def _tree(proc: psutil.Process) -> list[psutil.Process]:
    try:
        return [proc, *proc.children(recursive=True)]
    except psutil.Error:
        return [proc]


def _cpu(procs: Sequence[psutil.Process], root: psutil.Process | None = None) -> float:
    """CPU seconds of `procs`, plus the children `root` has reaped."""
    total = 0.0
    for p in procs:
        try:
            t = p.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system + (t.children_user + t.children_system if p is root else 0.0)
    return total


def _server_window(stats: Mapping[str, Any], total: int) -> tuple[float, float] | None:
    """From the server's own account: when its second request arrived and when its `total`-th stream ended (its
    last scripted write plus that write's lag). None if it accounted fewer than `total` streams."""
    from harness.calibrate import chunk_writes

    starts, ends = [], []
    for e in stats.get("per_request", {}).values():
        starts.append(float(e["t0"]))
        if (truth := chunk_writes(e)) is not None and truth[2]:
            ends.append(truth[2][-1])
    if len(starts) < 2 or len(ends) < total:
        return None
    return sorted(starts)[1], sorted(ends)[total - 1]


def _measured(argv: list[str], url: str, total: int, env: Mapping[str, str] | None = None) -> _Measured:
    """Run `argv` and charge it the CPU its process tree used while the server served its requests: from the
    server's second request until it had finished `total` of them (every request the client sends).

    Nothing here competes with the two processes measured. The client's and the server's CPU times are sampled from
    /proc every 20 ms (about 30 µs a process; the client's tree, 1.5 ms to find, is looked up again at 0.1, 0.2,
    0.4 s, then every 0.5 s), and the window is taken afterwards from the server's per-request account, the CPU
    times interpolated to its ends. Asking the server for its counters over HTTP and scanning /proc for the tree
    every 20 ms, as this did before, took a few ms of one of the two CPUs each time, and EngineBench's reads lagged
    by as much (benchmarks/README.md, item 17)."""
    from harness.calibration import fetch_stats

    me = psutil.Process()
    servers = [p for p in me.children() if "harness.calibration" in " ".join(p.cmdline())]
    server_tree = [q for p in servers for q in _tree(p)]
    with tempfile.TemporaryFile() as out:
        proc = subprocess.Popen(
            argv, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, **(env or {})}
        )
        ps = psutil.Process(proc.pid)
        tree, rescan = [ps], 0.1
        t_start = time.perf_counter()
        samples: list[tuple[float, float, float]] = []  # (time, client tree CPU, server CPU)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:  # exited (and reaped here, so its rusage covers the whole tree)
                break
            time.sleep(0.02)
            now = time.perf_counter()
            # a tool may start its worker processes late (AIPerf's, GuideLLM's: seconds after launch)
            if now - t_start >= rescan:
                tree, rescan = _tree(ps), min(rescan * 2, rescan + 0.5)
            samples.append((now, _cpu(tree, ps), _cpu(server_tree)))
        proc.returncode = os.waitstatus_to_exitcode(status)
        cpu_total = usage.ru_utime + usage.ru_stime
        out.seek(0)
        tail = out.read()[-3000:].decode("utf-8", "replace")
    stats = fetch_stats(url, detail=True)
    window = _server_window(stats, total) if samples else None
    if window is None:
        got = len(stats.get("per_request", {}))
        if proc.returncode == 0:
            raise RuntimeError(f"the server accounted {got} streams, {total} expected: {tail}")
        wall = time.perf_counter() - t_start  # the client failed: the caller says so and uses nothing else
        return _Measured(proc.returncode, cpu_total, wall, cpu_total, tail, 0.0, stats)
    ts = np.array([s[0] for s in samples])
    client, server = np.array([s[1] for s in samples]), np.array([s[2] for s in samples])
    cpu = float(np.diff(np.interp(window, ts, client))[0])
    server_cpu = float(np.diff(np.interp(window, ts, server))[0])
    wall = max(window[1] - window[0], 1e-9)
    return _Measured(proc.returncode, cpu, wall, cpu_total, tail, server_cpu, stats)


def _server_truth(stats: Mapping[str, Any]) -> tuple[dict[str, float], list[float]]:
    """Per request id: the server's lag on its first chunk (s); and every achieved inter-chunk gap (s)."""
    first: dict[str, float] = {}
    gaps: list[float] = []
    for rid, e in stats.get("per_request", {}).items():
        lags = [x / 1000.0 for x in e["lags_ms"]]
        if not lags:
            continue
        first[rid] = lags[0]
        itl = float(e["itl"])
        gaps.extend(itl + b - a for a, b in itertools.pairwise(lags))
    return first, gaps


# ---- EngineBench --------------------------------------------------------------------------------------------------
def _child(url: str, concurrency: int, requests: int, processes: int, out: Path, connection: str) -> None:
    """The EngineBench client as a child process: run one closed-loop point, write its records."""
    import orjson

    from adapters.scripted import make_adapter
    from harness import loop as event_loop
    from harness.calibrate import calibration_specs
    from harness.client import Target
    from harness.records import RequestRecord
    from harness.runner import StopRule, run_point
    from workloads.arrival import LoadPoint

    records: list[RequestRecord] = []
    target = Target(
        "scripted",
        url,
        make_adapter(),
        "scripted",
        connection="keepalive" if connection == "keepalive" else "fresh",
    )
    # one warm-up wave, as `bench calibrate` and real runs have: its requests start together, and the start-up
    # burst's send lag (counted in EngineBench's latency, from when each slot became free) is not what is compared
    stop = StopRule(requests=requests, warmup=concurrency, stall_timeout_s=60.0)
    run_start = time.perf_counter()
    outcome = event_loop.run(
        run_point(
            target,
            calibration_specs(f"eb{concurrency}-{requests}", TOKENS),
            LoadPoint("concurrency", concurrency, "closed"),
            stop,
            records.append,
            run_start,
            processes=processes,
        )
    )
    doc = {"run_start": run_start, "outcome": outcome.to_dict(), "records": records}
    out.write_bytes(orjson.dumps(doc))  # orjson writes the (slots) dataclasses itself, fast


def run_enginebench(
    url: str, concurrency: int, requests: int, processes: int = 1, connection: str = "fresh"
) -> PeerRun:
    from harness.calibrate import match_errors
    from harness.calibration import reset_stats
    from harness.metrics import itl_samples, send_lag, ttft
    from harness.records import RequestRecord

    reset_stats(url)
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "records.json"
        argv = [
            sys.executable,
            "-m",
            "benchmarks.peers",
            "child",
            "--url",
            url,
            "--concurrency",
            str(concurrency),
        ]
        argv += ["--requests", str(requests), "--processes", str(processes), "--out", str(out)]
        argv += ["--connection", connection]
        m = _measured(argv, url, requests + concurrency)  # and the warm-up wave
        if m.code != 0:
            raise RuntimeError(f"EngineBench child failed ({m.code}): {m.tail}")
        doc = json.loads(out.read_text())
    stats = m.stats
    recs = [RequestRecord.from_dict(r) for r in doc["records"]]
    ok = [r for r in recs if r.ok]
    measured = [r for r in ok if r.phase == "measure"]
    errs = match_errors(measured, stats.get("per_request", {}), float(doc["run_start"]))
    _, gaps = _server_truth(stats)
    itls = [s for r in ok for s in itl_samples(r)]
    p_itl, p_gap = _pct(itls), _pct(gaps)
    span = max(r.done or 0.0 for r in ok) - min(r.scheduled for r in ok) if ok else m.wall_s
    return PeerRun(
        tool="EngineBench" if connection == "fresh" else f"EngineBench ({connection})",
        concurrency=concurrency,
        requests=len(recs),
        ok=len(ok),
        wall_s=m.wall_s,
        cpu_s=m.cpu_s,
        tokens=sum(sum(r.chunk_tokens) for r in ok),
        ttft_ms=_pct([t for r in ok if (t := ttft(r)) is not None]),
        itl_ms=p_itl,
        ttft_err_ms=_pct(errs["ttft"]),
        itl_err_ms=(p_itl[0] - p_gap[0], p_itl[1] - p_gap[1]),
        server_first_lag_ms=_pct([x for x in _server_truth(stats)[0].values()]),
        server_cpu_s=m.server_cpu_s,
        extra={
            "duration_s": span,
            "itl_err_matched_ms": _pct(errs["itl"]),
            # where the TTFT error arises: the client's own time between a slot freeing and its send (closed loop:
            # the client's read of the previous request's end), between its send and the request's arrival at the
            # server (kernel stamps at both ends), and between the server's write of the first chunk and the
            # client's stamp of it
            "send_lag_ms": _pct([lag for r in measured if (lag := send_lag(r)) is not None]),
            "request_path_ms": _pct(errs["req_path"]),
            "response_path_ms": _pct(errs["resp_path"]),
            "client_cpu": doc["outcome"]["client_cpu"],
        },
    )


# ---- vLLM bench serve ---------------------------------------------------------------------------------------------
def run_vllm(url: str, concurrency: int, requests: int, vllm: Path, tokenizer: Path) -> PeerRun:
    from harness.calibration import reset_stats

    reset_stats(url)
    prefix = f"vb{concurrency}-{requests}-"
    with tempfile.TemporaryDirectory() as d:
        argv = [str(vllm), "bench", "serve", "--backend", "openai-chat", "--base-url", url]
        argv += ["--endpoint", "/v1/chat/completions", "--model", "scripted", "--tokenizer", str(tokenizer)]
        argv += ["--dataset-name", "random", "--random-input-len", "32", "--random-output-len", str(TOKENS)]
        argv += [
            "--random-range-ratio",
            "0",
            "--num-prompts",
            str(requests),
            "--max-concurrency",
            str(concurrency),
        ]
        argv += ["--ignore-eos", "--temperature", "0", "--request-id-prefix", prefix, "--disable-tqdm"]
        argv += ["--percentile-metrics", "ttft,tpot,itl,e2el", "--metric-percentiles", "50,99"]
        argv += ["--save-result", "--save-detailed", "--result-dir", d, "--result-filename", "r.json"]
        env = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_TARGET_DEVICE": "cpu"}
        # its ready check (one test request) is off by default (`--ready-check-timeout-sec 0`): it sends `requests`
        m = _measured(argv, url, requests, env)
        if m.code != 0:
            raise RuntimeError(f"vllm bench serve failed ({m.code}): {m.tail}")
        res = json.loads((Path(d) / "r.json").read_text())
    stats = m.stats
    first, gaps = _server_truth(stats)
    ttfts, itls = res.get("ttfts", []), res.get("itls", [])
    errors = res.get("errors", [])
    ttft_err = [
        t - TTFT - first[f"{prefix}{i}"]
        for i, t in enumerate(ttfts)
        if t and f"{prefix}{i}" in first and not (errors and errors[i])
    ]
    flat_itl = [x for per in itls for x in per]
    p_itl, p_gap = _pct(flat_itl), _pct(gaps)
    return PeerRun(
        tool="vllm bench serve",
        concurrency=concurrency,
        requests=requests,
        ok=int(res.get("completed", 0)),
        wall_s=m.wall_s,
        cpu_s=m.cpu_s,
        tokens=int(res.get("total_output_tokens", 0)),
        ttft_ms=(
            float(res.get("p50_ttft_ms", res.get("median_ttft_ms", np.nan))),
            float(res.get("p99_ttft_ms", np.nan)),
        ),
        itl_ms=(
            float(res.get("p50_itl_ms", res.get("median_itl_ms", np.nan))),
            float(res.get("p99_itl_ms", np.nan)),
        ),
        ttft_err_ms=_pct(ttft_err),
        itl_err_ms=(p_itl[0] - p_gap[0], p_itl[1] - p_gap[1]),
        server_first_lag_ms=_pct(list(first.values())),
        server_cpu_s=m.server_cpu_s,
        extra={
            "duration_s": float(res.get("duration", m.wall_s)),
            "matched_ttft": len(ttft_err),
            "cpu_total_s": m.cpu_total_s,
        },
    )


# ---- GuideLLM, AIPerf, inference-perf (benchmarks/peer_tools.py) --------------------------------------------------
def run_tool(tool: Tool, url: str, concurrency: int, requests: int, tokenizer: Path) -> PeerRun:
    """One closed-loop point by one of the other peers, judged the same way: its TTFT per request against the
    server's account (matched by the stream's id), its ITL distribution against the server's achieved gaps (where
    it keeps per-chunk times), its CPU per streamed token over the server's window."""
    from benchmarks.peer_tools import Run, tool_venv
    from harness.calibration import reset_stats

    reset_stats(url)
    with tempfile.TemporaryDirectory() as d:
        run = Run(url, concurrency, requests, Path(d), tokenizer)
        argv = tool.command(tool_venv(tool), run)
        m = _measured(argv, url, requests, tool.env)  # none of them sends warm-up requests
        if m.code != 0:
            raise RuntimeError(f"{tool.name} failed ({m.code}): {m.tail}")
        parsed = tool.parse(run.out)
    first, gaps = _server_truth(m.stats)
    ok = [r for r in parsed.requests if r.ok]
    ttft_err = [
        r.ttft_s - TTFT - first[r.server_id] for r in ok if r.ttft_s is not None and r.server_id in first
    ]
    per_chunk = [g for r in ok for g in (r.gaps_s or ())]
    has_gaps = all(r.gaps_s is not None for r in ok) and bool(ok)
    p_itl, p_gap = _pct(per_chunk), _pct(gaps)
    return PeerRun(
        tool=tool.name,
        concurrency=concurrency,
        requests=len(parsed.requests),
        ok=len(ok),
        wall_s=m.wall_s,
        cpu_s=m.cpu_s,
        tokens=sum(r.output_tokens for r in ok),
        ttft_ms=parsed.ttft_ms,
        itl_ms=parsed.itl_ms,
        ttft_err_ms=_pct(ttft_err),
        # its per-token gaps against the server's (distribution-level); none where it keeps only a mean per request
        itl_err_ms=(p_itl[0] - p_gap[0], p_itl[1] - p_gap[1]) if has_gaps else (float("nan"), float("nan")),
        server_first_lag_ms=_pct(list(first.values())),
        server_cpu_s=m.server_cpu_s,
        extra={
            "duration_s": parsed.span_s or m.wall_s,
            "matched_ttft": len(ttft_err),
            "cpu_total_s": m.cpu_total_s,
            "tool_note": parsed.note,
        },
    )


# ---- the comparison -----------------------------------------------------------------------------------------------
def compare(
    concurrency: Sequence[int],
    waves: int,
    processes: int,
    server_workers: int,
    keepalive: bool = True,
    ceiling_reps: int = 3,
    reps: int = 1,
) -> dict[str, Any]:
    """Both clients at each concurrency (TTFT 50 ms, ITL 5 ms), `reps` interleaved runs of each (a row per run,
    `rep` its number), then the ceiling (TTFT = ITL = 0): `ceiling_reps` interleaved runs of each client, the best
    one reported (all are kept in `runs_requests_per_s`)."""
    from benchmarks.peer_tools import TOOLS, installed
    from harness.calibration import ScriptConfig, serve_in_process

    vllm, tok = vllm_bin(), tokenizer_dir()
    tools = ["EngineBench"] + (["EngineBench (keepalive)"] if keepalive else [])
    tools += ["vllm bench serve"] if vllm and tok else []
    others = {t.name: t for t in TOOLS.values() if installed(t) and tok}
    tools += list(others)
    out: dict[str, Any] = {"schema_version": 1, "kind": "peers", "points": [], "ceiling": [], "notes": []}
    if not (vllm and tok):
        out["notes"].append(f"vLLM bench serve skipped: vllm at {vllm} / tokenizer at {tok} not found")
    for key, t in TOOLS.items():
        if t.name not in others:
            out["notes"].append(
                f"{t.name} skipped: not installed (python -m benchmarks.peers --install {key})"
            )
        else:
            out["notes"].append(f"{t.name}: {t.note}")
    out["host"] = {
        "cpus": os.cpu_count(),
        "cpu_pressure": _pressure(),
        "loopback_read_us": loopback_read_us(),
    }

    def one(tool: str, url: str, c: int, n: int) -> PeerRun:
        if tool.startswith("EngineBench"):
            return run_enginebench(url, c, n, processes, "keepalive" if "keepalive" in tool else "fresh")
        assert tok is not None
        if tool in others:
            return run_tool(others[tool], url, c, n, tok)
        assert vllm is not None
        return run_vllm(url, c, n, vllm, tok)

    cfg = ScriptConfig(ttft=TTFT, itl=ITL, output_tokens=TOKENS, workers=server_workers, max_tracked=100_000)
    with serve_in_process(cfg) as url:
        for c in concurrency:
            for rep in range(reps):  # interleaved, rotating the order, as the ceiling's runs
                for tool in tools[rep % len(tools) :] + tools[: rep % len(tools)]:
                    run = one(tool, url, c, waves * c)
                    row = asdict(run) | {"cpu_us_per_token": run.cpu_s / max(1, run.tokens) * 1e6}
                    row["requests_per_s"] = run.requests_per_s
                    row["rep"] = rep
                    out["points"].append(row)
                    print(_line(row), flush=True)
    ceiling_cfg = ScriptConfig(
        ttft=0.0, itl=0.0, output_tokens=TOKENS, workers=server_workers, max_tracked=100_000
    )
    with serve_in_process(ceiling_cfg) as url:
        c = max(concurrency)
        runs: dict[str, list[dict[str, Any]]] = {tool: [] for tool in tools}
        for rep in range(ceiling_reps):  # interleaved, rotating the order: the machine's load drifts
            for tool in tools[rep % len(tools) :] + tools[: rep % len(tools)]:
                run = one(tool, url, c, waves * c)
                dur = run.extra["duration_s"]
                runs[tool].append(
                    {
                        "requests_per_s": run.requests_per_s,
                        "tokens_per_s": run.tokens / dur,
                        "client_cpu_util": run.cpu_s / run.wall_s,
                        "server_cpu_util": (run.server_cpu_s or 0.0) / run.wall_s,
                        "ok": run.ok,
                        "requests": run.requests,
                    }
                )
                print(f"ceiling {tool} (run {rep + 1}): {run.requests_per_s:.1f} req/s", flush=True)
        for tool in tools:
            best = max(runs[tool], key=lambda r: r["requests_per_s"])
            row = {"tool": tool, "concurrency": c, **best}
            row["runs_requests_per_s"] = [r["requests_per_s"] for r in runs[tool]]
            row["ok"] = sum(r["ok"] for r in runs[tool])
            row["requests"] = sum(r["requests"] for r in runs[tool])
            out["ceiling"].append(row)
    out["host"]["cpu_pressure_after"] = _pressure()
    return out


def loopback_read_us(chunks: int = 20_000) -> float:
    """This machine's price of the read each streamed token costs a client that keeps per-chunk times: one
    `recvmsg` (with the receive timestamp) of one 100-byte chunk already waiting on a loopback TCP socket, in µs of
    wall time. It sets how much of a client's CPU per token is the kernel's, and it differs between machines of
    one kind (benchmarks/README.md, item 18), so the CPU ratio between two clients that read differently does too."""
    import socket

    with socket.create_server(("127.0.0.1", 0)) as listener:
        with socket.create_connection(listener.getsockname()) as reader:
            writer, _ = listener.accept()
            with writer:
                writer.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                reader.setsockopt(socket.SOL_SOCKET, getattr(socket, "SO_TIMESTAMPNS", 35), 1)
                payload, spent = b"x" * 100, 0
                for _ in range(chunks):
                    writer.send(payload)
                    t = time.perf_counter_ns()
                    data = reader.recvmsg(65536, 64)[0]
                    spent += time.perf_counter_ns() - t
                    if len(data) != len(payload):
                        raise RuntimeError(f"loopback read took {len(data)} bytes, {len(payload)} sent")
    return spent / chunks / 1000.0


def _pressure() -> str | None:
    """The machine's CPU pressure (Linux PSI): how often runnable tasks waited for a CPU."""
    try:
        return Path("/proc/pressure/cpu").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None


def _line(r: Mapping[str, Any]) -> str:
    f = "{:.2f} / {:.2f}".format
    return (
        f"{r['tool']:<17} c={r['concurrency']:<4} ok {r['ok']}/{r['requests']}  TTFT {f(*r['ttft_ms'])}  "
        f"ITL {f(*r['itl_ms'])}  TTFT err {f(*r['ttft_err_ms'])}  "
        f"ITL err {f(*r['extra'].get('itl_err_matched_ms', r['itl_err_ms']))}  "
        f"server lag {f(*r['server_first_lag_ms'])}  CPU {r['cpu_us_per_token']:.1f} µs/token  "
        f"{r['requests_per_s']:.1f} req/s"
    )


def render(result: Mapping[str, Any]) -> str:
    """A Markdown table for the README, and the targets judged."""
    lines = [
        "| client | streams | TTFT p50 / p99 (ms) | ITL p50 / p99 (ms) | TTFT error p50 / p99 (ms) | ITL error p50 / p99 (ms) "
        "| server lag p50 / p99 (ms) | client CPU µs / token | req/s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]

    def f(a: float, b: float) -> str:
        return "–" if np.isnan(a) else f"{a:.2f} / {b:.2f}"

    several = any(r.get("rep", 0) for r in result["points"])
    for r in result["points"]:
        itl_err = r["extra"].get(
            "itl_err_matched_ms", r["itl_err_ms"]
        )  # per chunk where the client allows it
        name = f"{r['tool']}, run {r.get('rep', 0) + 1}" if several else r["tool"]
        lines.append(
            f"| {name} | {r['concurrency']} | {f(*r['ttft_ms'])} | {f(*r['itl_ms'])} | {f(*r['ttft_err_ms'])} "
            f"| {f(*itl_err)} | {f(*r['server_first_lag_ms'])} | {r['cpu_us_per_token']:.1f} "
            f"| {r['requests_per_s']:.1f} |"
        )
    lines += [
        "",
        "| client | ceiling req/s (best run) | all runs req/s | streamed tok/s | client CPU (cores) "
        "| server CPU (cores) |",
        "|---|---|---|---|---|---|",
    ]
    for r in result["ceiling"]:
        lines.append(
            f"| {r['tool']} | {r['requests_per_s']:.1f} "
            f"| {', '.join(f'{x:.0f}' for x in r.get('runs_requests_per_s', [r['requests_per_s']]))} "
            f"| {r['tokens_per_s']:,.0f} | {r['client_cpu_util']:.2f} "
            f"| {r['server_cpu_util']:.2f} |"
        )
    lines += ["", *judge(result)]
    if result.get("notes"):
        lines += ["", *(f"Note: {n}" for n in result["notes"])]
    host = result.get("host") or {}
    if host:
        lines += [
            "",
            f"CPUs: {host.get('cpus')}; CPU pressure before: {host.get('cpu_pressure')}; after: {host.get('cpu_pressure_after')}",
        ]
        if host.get("loopback_read_us") is not None:
            lines.append(
                f"One loopback read of a streamed chunk (`recvmsg`, timestamped): {host['loopback_read_us']:.2f} µs"
            )
    return "\n".join(lines)


def _parts(row: Mapping[str, Any]) -> str:
    lag, path = row["extra"].get("send_lag_ms"), row["extra"].get("response_path_ms")
    if not lag or not path:
        return ""
    req = row["extra"].get("request_path_ms")
    req_s = f", request path {req[0]:.2f} / {req[1]:.2f} ms" if req else ""
    return (
        f"; TTFT error parts p50 / p99: send lag {lag[0]:.2f} / {lag[1]:.2f} ms{req_s}, response path "
        f"{path[0]:.2f} / {path[1]:.2f} ms"
    )


def _runs(result: Mapping[str, Any]) -> dict[tuple[str, int], list[Mapping[str, Any]]]:
    """The streamed points' rows by (tool, streams), in run order."""
    out: dict[tuple[str, int], list[Mapping[str, Any]]] = {}
    for r in sorted(result["points"], key=lambda r: r.get("rep", 0)):
        out.setdefault((r["tool"], r["concurrency"]), []).append(r)
    return out


def _cpu_ratio(ours: Sequence[Mapping[str, Any]], theirs: Sequence[Mapping[str, Any]]) -> tuple[float, str]:
    """Median CPU per token against median; the text adds each interleaved pair's ratio when there are several."""
    ratio = float(np.median([r["cpu_us_per_token"] for r in ours])) / float(
        np.median([r["cpu_us_per_token"] for r in theirs])
    )
    if len(ours) < 2:
        return ratio, f"{ratio:.2f}"
    pairs = [a["cpu_us_per_token"] / b["cpu_us_per_token"] for a, b in zip(ours, theirs, strict=False)]
    return ratio, f"{ratio:.2f}, medians of {len(ours)} runs; per run {min(pairs):.2f}-{max(pairs):.2f}"


def judge(result: Mapping[str, Any]) -> list[str]:
    """The issue's targets, each PASS / FAIL / n/a with the numbers. With several runs per point, timing is judged
    on each percentile's worst run and CPU on the median of each client's runs."""
    out = []
    runs = _runs(result)
    top = max((c for _, c in runs), default=0)
    vb = runs.get(("vllm bench serve", top))
    for (tool, c), rows in runs.items():
        if c != top or not tool.startswith("EngineBench"):
            continue
        itl = [r["extra"].get("itl_err_matched_ms", r["itl_err_ms"]) for r in rows]  # per chunk, matched
        p50 = max(abs(r["ttft_err_ms"][0]) for r in rows)
        p99 = max(r["ttft_err_ms"][1] for r in rows)
        i50, i99 = max(abs(x[0]) for x in itl), max(x[1] for x in itl)
        ok = max(p50, i50) <= 1.0 and max(p99, i99) <= 2.0
        worst = max(rows, key=lambda r: r["ttft_err_ms"][1])
        runs_note = f"; the worst of {len(rows)} runs" if len(rows) > 1 else ""
        out.append(
            f"- {tool}: timing error at {top} streams <= 1 ms p50, <= 2 ms p99: {'PASS' if ok else 'FAIL'} "
            f"(TTFT {p50:.2f} / {p99:.2f} ms, ITL {i50:.2f} / {i99:.2f} ms{_parts(worst)}{runs_note})"
        )
        if vb:
            ratio, text = _cpu_ratio(rows, vb)
            verdict = "PASS" if ratio <= 2 / 3 else "FAIL"
            out.append(
                f"- {tool}: CPU per streamed token <= 2/3 of vLLM bench serve's: {verdict} (ratio {text})"
            )
    # the same ratio where vLLM bench serve keeps up (lower stream counts) and where both are saturated (the
    # ceiling): at the top stream count it falls behind, so each of its reads carries several events, fewer reads
    # per token, and its CPU per token flatters it
    for (tool, c), rows in sorted(runs.items(), key=lambda kv: kv[0][1]):
        vb_c = runs.get(("vllm bench serve", c))
        if c == top or vb_c is None or not tool.startswith("EngineBench"):
            continue
        text = _cpu_ratio(rows, vb_c)[1]
        out.append(f"- {tool}: CPU per streamed token at {c} streams, ratio to vLLM bench serve's: {text}")
    per_tok = {
        r["tool"]: r["client_cpu_util"] / r["tokens_per_s"] * 1e6
        for r in result["ceiling"]
        if r.get("tokens_per_s")
    }
    for tool, us in per_tok.items():
        if tool.startswith("EngineBench") and "vllm bench serve" in per_tok:
            out.append(
                f"- {tool}: CPU per streamed token at the ceiling {us:.1f} µs, ratio to vLLM bench serve's: "
                f"{us / per_tok['vllm bench serve']:.2f}"
            )
    ceil = {r["tool"]: r["requests_per_s"] for r in result["ceiling"]}
    for tool, ours in ceil.items():
        for other, theirs in ceil.items():
            if tool.startswith("EngineBench") and not other.startswith("EngineBench"):
                verdict = "PASS" if ours > theirs else "FAIL"
                out.append(
                    f"- {tool}: higher ceiling than {_display(other)}: {verdict} ({ours:.1f} vs {theirs:.1f} req/s)"
                )
    if "vllm bench serve" not in ceil:
        out.append("- targets needing vLLM bench serve: n/a (not installed here)")
    return out + _leads(runs)


def _display(tool: str) -> str:
    return "vLLM bench serve" if tool == "vllm bench serve" else tool


def _leads(runs: Mapping[tuple[str, int], Sequence[Mapping[str, Any]]]) -> list[str]:
    """EngineBench (keep-alive, as `bench run` connects) against every other client at every stream count: a
    smaller TTFT error at p50 and p99 (its worst run against their best) and less CPU per token (medians)."""
    lead = (
        "EngineBench (keepalive)" if any(t == "EngineBench (keepalive)" for t, _ in runs) else "EngineBench"
    )
    out = []
    for (tool, c), theirs in sorted(runs.items(), key=lambda kv: (kv[0][1], kv[0][0])):
        ours = runs.get((lead, c))
        if tool.startswith("EngineBench") or not ours:
            continue
        o50, o99 = max(abs(r["ttft_err_ms"][0]) for r in ours), max(r["ttft_err_ms"][1] for r in ours)
        t50, t99 = min(abs(r["ttft_err_ms"][0]) for r in theirs), min(r["ttft_err_ms"][1] for r in theirs)
        ratio = _cpu_ratio(ours, theirs)[0]
        verdict = "PASS" if o50 <= t50 and o99 <= t99 and ratio < 1 else "FAIL"
        out.append(
            f"- {lead} leads {_display(tool)} at {c} streams: {verdict} (TTFT error p50 / p99 {o50:.2f} / "
            f"{o99:.2f} vs {t50:.2f} / {t99:.2f} ms, our worst run against their best; CPU per token ratio "
            f"{ratio:.2f}, medians)"
        )
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.peers", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd")
    child = sub.add_parser("child", help=argparse.SUPPRESS)
    child.add_argument("--url", required=True)
    child.add_argument("--concurrency", type=int, required=True)
    child.add_argument("--requests", type=int, required=True)
    child.add_argument("--processes", type=int, default=1)
    child.add_argument("--out", type=Path, required=True)
    child.add_argument("--connection", default="fresh")
    p.add_argument("--concurrency", default="64,256")
    p.add_argument("--waves", type=int, default=4, help="requests per measured run = waves x concurrency")
    p.add_argument(
        "--reps", type=int, default=1, help="interleaved runs per client and stream count (CPU: medians)"
    )
    p.add_argument("--processes", type=int, default=1, help="EngineBench client processes")
    p.add_argument("--server-workers", type=int, default=1)
    p.add_argument(
        "--ceiling-reps", type=int, default=3, help="interleaved ceiling runs per client (best kept)"
    )
    p.add_argument("--json", type=Path, default=None)
    p.add_argument(
        "--install",
        default=None,
        help="install other peers in their own venvs: guidellm,inference-perf,aiperf or all",
    )
    p.add_argument("--render", type=Path, default=None, help="only print the tables of a saved --json result")
    a = p.parse_args(argv)
    if a.render:
        print(render(json.loads(a.render.read_text())))
        return
    if a.install:
        from benchmarks import peer_tools

        peer_tools.main(a.install.split(","))
        return
    if a.cmd == "child":
        _child(a.url, a.concurrency, a.requests, a.processes, a.out, a.connection)
        return
    conc = [int(x) for x in a.concurrency.split(",")]
    result = compare(conc, a.waves, a.processes, a.server_workers, ceiling_reps=a.ceiling_reps, reps=a.reps)
    print(render(result))
    if a.json:
        a.json.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
