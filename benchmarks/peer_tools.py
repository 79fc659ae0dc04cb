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


TOOLS: dict[str, Tool] = {
    "guidellm": Tool(
        "GuideLLM",
        ("guidellm==0.8.1", "torch==2.13.0"),
        "python3.11",
        _guidellm_command,
        _guidellm_parse,
        note="guidellm 0.8.1, defaults: chat completions, up to 10 worker processes",
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
