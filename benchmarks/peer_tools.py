"""The other clients the issue names (GuideLLM, AIPerf, inference-perf), each installed only here, in its own venv
under the cache, never in EngineBench's environment: `python -m benchmarks.peers --install all`.

Each `Tool` says how to install it (a pinned requirement and the Python it needs), how to run one closed-loop point
against the scripted server (streamed, ~64-token prompts, exactly 256 output tokens, the model's tokenizer from the
local folder, offline), how many requests the server then sees, and how to read the tool's own per-request output
into `Parsed`. The recipes were worked out against the scripted server, from each tool's `--help` and source;
benchmarks/README.md ("The other peers") says what each one measures and how.

What the comparison takes from a tool: its per-request TTFT, matched to the server's account by the id the server
gave the stream (none of these tools sends a request id; each keeps the response's `id`, which the scripted server
makes `chatcmpl-<its id>` / `cmpl-<its id>`); its per-chunk gaps where it keeps them (GuideLLM keeps only a
per-request mean); its output token counts; and its own p50 / p99 as it reports them.
"""

from __future__ import annotations

import itertools
import json
import shutil
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["TOOLS", "Parsed", "Req", "Tool", "install", "installed", "tool_venv"]

INPUT_TOKENS, OFFLINE = 64, {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


@dataclass(frozen=True)
class Req:
    ok: bool
    server_id: str | None  # the id the server keyed its account by
    ttft_s: float | None
    gaps_s: Sequence[float] | None  # between streamed chunks; None where the tool keeps no per-chunk times
    output_tokens: int
    start_s: float | None  # on the tool's own clock
    end_s: float | None


@dataclass(frozen=True)
class Parsed:
    requests: list[Req]
    ttft_ms: tuple[float, float]  # p50, p99 as the tool reports them
    itl_ms: tuple[float, float]
    note: str = ""

    @property
    def span_s(self) -> float | None:
        """First request's start to last request's end, on the tool's clock."""
        starts = [r.start_s for r in self.requests if r.start_s is not None]
        ends = [r.end_s for r in self.requests if r.end_s is not None]
        return max(ends) - min(starts) if starts and ends else None


@dataclass(frozen=True)
class Run:
    """One point for a tool: where to write, what to drive."""

    url: str
    concurrency: int
    requests: int
    out: Path  # an empty directory for the tool's files
    tokenizer: Path


@dataclass(frozen=True)
class Tool:
    name: str
    requirements: tuple[str, ...]  # pip install arguments, pinned
    python: str  # the interpreter its venv is made with (it may need a newer Python than EngineBench's)
    command: Callable[[Path, Run], list[str]]  # (venv, run) -> argv
    parse: Callable[[Path], Parsed]  # the run's `out` -> its requests
    env: Mapping[str, str] = field(default_factory=lambda: dict(OFFLINE))
    note: str = ""  # how it was configured, for the results

    @property
    def slug(self) -> str:
        return self.name.lower()


def tool_venv(tool: Tool) -> Path:
    from benchmarks.peers import CACHE

    return CACHE / "peers" / tool.slug / "venv"


def installed(tool: Tool) -> bool:
    return (tool_venv(tool) / "bin" / "python").exists() and (tool_venv(tool) / ".installed").exists()


def install(tool: Tool, say: Callable[[str], None] = print) -> None:
    """Make the tool's venv and pip install its pinned requirements (from the package registry)."""
    venv = tool_venv(tool)
    python = _interpreter(tool.python)
    if venv.exists():
        shutil.rmtree(venv)
    say(f"{tool.name}: creating {venv} with {tool.python}")
    subprocess.run([python, "-m", "venv", str(venv)], check=True)
    say(f"{tool.name}: pip install {' '.join(tool.requirements)}")
    r = subprocess.run(
        [str(venv / "bin" / "pip"), "install", "-q", *tool.requirements], capture_output=True, text=True
    )
    if r.returncode != 0:
        raise RuntimeError(f"{tool.name}: pip install failed: {r.stderr.strip()[-2000:]}")
    (venv / ".installed").write_text(json.dumps({"requirements": tool.requirements}))
    say(f"{tool.name}: installed")


def _interpreter(name: str) -> str:
    """`name` (e.g. python3.12) as a command that runs: on PATH, else in a pyenv install (whose shim on PATH
    fails unless that version is selected)."""
    candidates = [shutil.which(name)]
    candidates += [str(p) for p in sorted(Path.home().glob(f".pyenv/versions/*/bin/{name}"), reverse=True)]
    for c in candidates:
        if c and subprocess.run([c, "-c", "pass"], capture_output=True).returncode == 0:
            return c
    raise RuntimeError(f"{name} is needed and not found (PATH, ~/.pyenv/versions); install it, then retry")


def _server_id(response_id: str | None) -> str | None:
    if not response_id:
        return None
    for prefix in ("chatcmpl-", "cmpl-"):
        if response_id.startswith(prefix):
            return response_id[len(prefix) :]
    return response_id


# ---- GuideLLM -----------------------------------------------------------------------------------------------------
# guidellm 0.8.1 (`guidellm run`, options as kind=...,key=value strings). It needs torch (its data pipeline is a
# torch DataLoader): the pin makes pip take the CPU wheel the engines' install uses, not the CUDA one.
def _guidellm_command(venv: Path, run: Run) -> list[str]:
    return [
        str(venv / "bin" / "guidellm"),
        "run",
        "--backend",
        f"kind=openai_http,target={run.url},model=scripted",
        "--profile",
        f"kind=concurrent,streams={run.concurrency}",  # closed loop: each slot sends when its last one ended
        "--constraint",
        f"kind=max_requests,count={run.requests}",
        "--tokenizer",
        f"kind=huggingface_auto,model={run.tokenizer}",
        "--data",
        f"kind=synthetic_text,prompt_tokens={INPUT_TOKENS},output_tokens=256",  # max_completion_tokens + ignore_eos
        "--output",
        f"kind=json,path={run.out / 'guidellm.json'}",
        "--disable-console-interactive",
    ]


def _guidellm_parse(out: Path) -> Parsed:
    """benchmarks[0].requests.{successful,errored,incomplete}: per request `info.timings` (time.time() in the
    worker): TTFT = first_token_iteration - request_start (just before the request headers are written); no
    per-chunk times (its ITL is a per-request mean). Its percentiles: metrics.<name>.successful.percentiles."""
    doc = json.loads((out / "guidellm.json").read_text())
    bench = doc["benchmarks"][0]
    reqs: list[Req] = []
    for status in ("successful", "errored", "incomplete"):
        for r in bench["requests"].get(status) or []:
            t = (r.get("info") or {}).get("timings") or {}
            start, first = t.get("request_start"), t.get("first_token_iteration")
            ok = status == "successful" and not (r.get("info") or {}).get("error")
            reqs.append(
                Req(
                    ok=ok,
                    server_id=_server_id(r.get("response_id")),
                    ttft_s=first - start if ok and first is not None and start is not None else None,
                    gaps_s=None,
                    output_tokens=int(r.get("output_tokens") or 0) if ok else 0,
                    start_s=start,
                    end_s=t.get("request_end"),
                )
            )
    m = bench["metrics"]

    def reported(name: str) -> tuple[float, float]:
        p = m[name]["successful"]["percentiles"]
        return (float(p["p50"]), float(p["p99"]))

    totals = (m.get("request_totals") or {}).get("total")
    note = "" if totals in (None, len(reqs)) else f"its summary covers {totals} of its {len(reqs)} requests"
    return Parsed(reqs, reported("time_to_first_token_ms"), reported("inter_token_latency_ms"), note)


# ---- inference-perf -----------------------------------------------------------------------------------------------
# inference-perf 0.7.0 (kubernetes-sigs; needs Python >= 3.12), driven by a YAML file. `type: concurrent` is a
# closed loop over `num_workers` processes (default: one per CPU; 2 here, as its default on this machine). Its
# random data goes through the completions API only.
def _inference_perf_command(venv: Path, run: Run) -> list[str]:
    cfg = {
        "api": {"type": "completion", "streaming": True},
        "server": {"type": "vllm", "model_name": "scripted", "base_url": run.url, "ignore_eos": True},
        "tokenizer": {"pretrained_model_name_or_path": str(run.tokenizer)},
        "data": {
            "type": "random",
            "input_distribution": {
                "type": "fixed",
                "mean": INPUT_TOKENS,
                "min": INPUT_TOKENS,
                "max": INPUT_TOKENS,
            },
            "output_distribution": {"type": "fixed", "mean": 256, "min": 256, "max": 256},
        },
        "load": {
            "type": "concurrent",
            "stages": [{"num_requests": run.requests, "concurrency_level": run.concurrency}],
            "num_workers": 2,
            "interval": 0,
            "request_timeout": 120,
        },
        "report": {
            "request_lifecycle": {
                "summary": True,
                "per_stage": False,
                "per_request": True,
                # the raw response keeps the stream's id (the server's request id); nothing else per request
                "per_request_fields": {
                    "request": False,
                    "response": True,
                    "info": True,
                    "response_chunks": False,
                    "computed_metrics": False,
                },
            },
            "prometheus": None,
        },
        "storage": {"local_storage": {"path": str(run.out / "report")}},
    }
    path = run.out / "config.yml"
    path.write_text(json.dumps(cfg))  # YAML is a superset of JSON
    return [str(venv / "bin" / "inference-perf"), "--config_file", str(path)]


def _inference_perf_parse(out: Path) -> Parsed:
    """report/per_request_lifecycle_metrics.json: per request start_time / end_time (perf_counter in its worker;
    start just before the POST) and info.response_metrics.output_token_times (when each SSE event was parsed);
    TTFT = the first of those - start. summary_lifecycle_metrics.json: its percentiles, in seconds."""
    import re

    report = out / "report"
    rows = json.loads((report / "per_request_lifecycle_metrics.json").read_text())
    find_id = re.compile(r'"id"\s*:\s*"([^"]+)"')
    reqs: list[Req] = []
    for e in rows:
        info = e.get("info") or {}
        rm = info.get("response_metrics") or {}
        times = [float(t) for t in rm.get("output_token_times") or []]
        ok = e.get("error") is None and len(times) > 0
        start = float(e["start_time"])
        found = find_id.search(str(e.get("response") or "")[:4096])
        usage = rm.get("server_usage") or {}
        reqs.append(
            Req(
                ok=ok,
                server_id=_server_id(found.group(1) if found else None),
                ttft_s=times[0] - start if ok else None,
                gaps_s=[b - a for a, b in itertools.pairwise(times)] if ok else None,
                output_tokens=int(usage.get("completion_tokens") or rm.get("output_tokens") or 0)
                if ok
                else 0,
                start_s=start,
                end_s=float(e["end_time"]),
            )
        )
    lat = json.loads((report / "summary_lifecycle_metrics.json").read_text())["successes"]["latency"]

    def reported(name: str) -> tuple[float, float]:
        return (float(lat[name]["median"]) * 1000.0, float(lat[name]["p99"]) * 1000.0)

    return Parsed(reqs, reported("time_to_first_token"), reported("inter_token_latency"))


# ---- AIPerf --------------------------------------------------------------------------------------------------------
# aiperf 0.13.0 (NVIDIA): a system controller and its services (dataset, timing, worker manager, records, a record
# processor) and workers, over ZMQ. Its default worker count on 2 CPUs is 1, which falls behind at 256 streams
# (chunks bunched, ~0.6 s queueing before sends); 2 workers is its better setting here. With HF_HUB_OFFLINE it cannot
# load a tokenizer from a folder (it asks the hub for the path: HFValidationError), so the folder is offered as a
# local hub cache entry, `local/<name>`, whose files link to it.
_AIPERF_REV = "0" * 40


def _aiperf_hub(tokenizer: Path, out: Path) -> Path:
    hub = out / "hf-hub"
    snap = hub / f"models--local--{tokenizer.name}" / "snapshots" / _AIPERF_REV
    snap.mkdir(parents=True)
    (snap.parents[1] / "refs").mkdir()
    (snap.parents[1] / "refs" / "main").write_text(_AIPERF_REV)
    for f in tokenizer.iterdir():
        if f.is_file() and (f.suffix in (".json", ".jinja", ".txt", ".model") or f.name == "merges.txt"):
            (snap / f.name).symlink_to(f)
    return hub


def _aiperf_command(venv: Path, run: Run) -> list[str]:
    hub = _aiperf_hub(run.tokenizer, run.out)
    # `env` execs AIPerf in place (the process measured is AIPerf's); its temporary files go to the run's folder
    return [
        "env",
        f"HF_HUB_CACHE={hub}",
        f"TMPDIR={run.out}",
        str(venv / "bin" / "aiperf"),
        "profile",
        "--model",
        "scripted",
        "--url",
        run.url,
        "--endpoint-type",
        "chat",
        "--streaming",
        "--tokenizer",
        f"local/{run.tokenizer.name}",
        "--concurrency",
        str(run.concurrency),  # closed loop
        "--request-count",
        str(run.requests),
        "--isl",
        str(INPUT_TOKENS),
        "--isl-stddev",
        "0",
        "--osl",
        "256",
        "--osl-stddev",
        "0",
        "--extra-inputs",
        "ignore_eos:true",
        "--random-seed",
        "1",
        "--workers-max",
        "2",
        "--artifact-dir",
        str(run.out / "artifacts"),
        "--ui",
        "none",
        "--no-server-metrics",
        "--no-gpu-telemetry",
    ]


_TO_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "sec": 1.0}


def _aiperf_parse(out: Path) -> Parsed:
    """artifacts/profile_export.jsonl, one request a line: metadata.x_request_id (sent as X-Request-ID, the
    server's key), request_start_ns / request_end_ns (wall clock); metrics as {value, unit}: time_to_first_token
    (from just before the request is sent to the read that carried the first content), inter_chunk_latency (the
    gaps between content events; events of one read share its time). profile_export_aiperf.json: its percentiles
    (its ITL is a per-request mean)."""
    art = out / "artifacts"
    reqs: list[Req] = []
    for line in (art / "profile_export.jsonl").read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        meta, m = rec.get("metadata") or {}, rec.get("metrics") or {}
        if meta.get("benchmark_phase", "profiling") != "profiling":
            continue

        def sec(tag: str, m: Mapping[str, Any] = m) -> Any:
            e = m.get(tag)
            if not e or e.get("value") is None:
                return None
            k = _TO_S[e.get("unit", "ms")]
            return [x * k for x in e["value"]] if isinstance(e["value"], list) else e["value"] * k

        ok = rec.get("error") is None and not meta.get("was_cancelled", False)
        tokens = (m.get("usage_completion_tokens") or m.get("output_sequence_length") or {}).get("value")
        start, end = meta.get("request_start_ns"), meta.get("request_end_ns")
        reqs.append(
            Req(
                ok=ok,
                server_id=meta.get("x_request_id"),
                ttft_s=sec("time_to_first_token") if ok else None,
                gaps_s=(sec("inter_chunk_latency") or []) if ok else None,
                output_tokens=int(tokens or 0) if ok else 0,
                start_s=start / 1e9 if start is not None else None,
                end_s=end / 1e9 if end is not None else None,
            )
        )
    agg = json.loads((art / "profile_export_aiperf.json").read_text())

    def reported(tag: str) -> tuple[float, float]:
        e = agg[tag]
        k = _TO_S[e.get("unit", "ms")] * 1000.0
        return (float(e["p50"]) * k, float(e["p99"]) * k)

    return Parsed(reqs, reported("time_to_first_token"), reported("inter_token_latency"))


TOOLS: dict[str, Tool] = {
    "guidellm": Tool(
        "GuideLLM",
        ("guidellm==0.8.1", "torch==2.13.0"),
        "python3.11",
        _guidellm_command,
        _guidellm_parse,
        note="guidellm 0.8.1, defaults: chat completions, up to 10 worker processes",
    ),
    "aiperf": Tool(
        "AIPerf",
        ("aiperf==0.13.0",),
        "python3.11",
        _aiperf_command,
        _aiperf_parse,
        note="aiperf 0.13.0: chat completions, 2 workers (its default on 2 CPUs is 1, which falls behind)",
    ),
    "inference-perf": Tool(
        "inference-perf",
        ("inference-perf==0.7.0",),
        "python3.12",
        _inference_perf_command,
        _inference_perf_parse,
        note="inference-perf 0.7.0: completions (its random data has no chat form), 2 worker processes",
    ),
}


def main(names: Sequence[str]) -> None:
    """`python -m benchmarks.peers --install NAME[,NAME]` (or `all`)."""
    want = list(TOOLS) if list(names) == ["all"] else list(names)
    unknown = [n for n in want if n not in TOOLS]
    if unknown:
        sys.exit(f"unknown peer {', '.join(unknown)}; choose from {', '.join(TOOLS)} or all")
    for name in want:
        install(TOOLS[name])
