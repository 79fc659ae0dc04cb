"""`bench run`: benchmark engines (launched here or attached) on a workload across load points."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from harness.cli._app import app

if TYPE_CHECKING:
    from harness.orchestrate import RunConfig

__all__ = ["run"]


def _api_key(env_name: str | None, key_file: Path | None) -> str | None:
    from harness.errors import ConfigError

    if key_file is not None:
        try:
            return key_file.read_text().strip() or None
        except OSError as e:
            raise ConfigError(
                f"--api-key-file {key_file}: cannot read it ({e.strerror}); check the path"
            ) from None
    if env_name:
        value = os.environ.get(env_name)
        if not value:
            raise ConfigError(f"--api-key-env {env_name}: that environment variable is not set or empty")
        return value
    return None


# -- reliability: secrets out of the recorded command line; `--resume DIR` ------------------------------------------
_SECRET_OPTIONS = ("--api-key", "--token", "--password")
# options that shape a run: with --resume they come from the run's manifest and must not be given again
_RUN_SHAPING = (
    "engines", "endpoint", "workload", "concurrency", "rate", "arrival", "burstiness", "requests", "duration",
    "warmup", "cooldown", "error_budget", "seed", "slo", "out", "set_", "stream", "stall_timeout",
    "request_timeout", "ready_timeout", "repeat", "engine_nice", "engine_set", "replay_prompts", "cache_reset",
    "tokenizer",
)  # fmt: skip


def redacted_argv(argv: list[str]) -> list[str]:
    """The command line as recorded in the manifest: values of secret options (`--api-key X`, `--api-key=X`, but
    not `--api-key-env NAME` / `--api-key-file PATH`, which name where the key is) and URL passwords become ***."""
    import re

    out: list[str] = []
    hide_next = False
    for arg in argv:
        if hide_next:
            out.append("***")
            hide_next = False
            continue
        name, eq, _ = arg.partition("=")
        secret = name.startswith(_SECRET_OPTIONS) and not name.endswith(("-env", "-file"))
        if secret and eq:
            out.append(f"{name}=***")
            continue
        if secret:
            hide_next = True
        out.append(re.sub(r"(://[^/@:\s]*:)[^/@\s]*@", r"\1***@", arg))
    return out


def _refuse_with_resume(ctx: typer.Context, resume: Path) -> None:
    from harness.errors import ConfigError

    for name in _RUN_SHAPING:
        # by name: typer may carry its own copy of click, whose ParameterSource enum is another class
        if getattr(ctx.get_parameter_source(name), "name", None) == "COMMANDLINE":
            flag = "--" + name.rstrip("_").replace("_", "-")
            raise ConfigError(
                f"--resume {resume} re-uses that run's own settings; drop {flag} "
                "(or start a new run with --out to change it)"
            )


def _overrides(items: list[str]) -> dict[str, object]:
    import yaml

    from harness.errors import ConfigError

    out: dict[str, object] = {}
    for item in items:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ConfigError(f"--set {item!r}: write it as FIELD=VALUE, e.g. --set output_tokens=64")
        out[key.strip()] = yaml.safe_load(value)
    return out


@app.command()
def run(
    ctx: typer.Context,
    engines: Annotated[
        str | None, typer.Option(help="Engines to launch here, comma-separated (see `bench engines`).")
    ] = None,
    endpoint: Annotated[
        list[str] | None,
        typer.Option(help="Attach to a running server: NAME=URL (repeatable), e.g. vllm=http://host:8000."),
    ] = None,
    workload: Annotated[str, typer.Option(help="Built-in workload name or a workload YAML file.")] = "chat",
    concurrency: Annotated[
        str | None, typer.Option(help="Closed-loop load points: concurrent streams, e.g. 1,8,32.")
    ] = None,
    rate: Annotated[str | None, typer.Option(help="Open-loop load points: requests/s, e.g. 2,4,8.")] = None,
    arrival: Annotated[str, typer.Option(help="Open-loop arrivals: constant, poisson or gamma.")] = "poisson",
    burstiness: Annotated[float, typer.Option(help="Gamma shape: 1 is Poisson, below 1 burstier.")] = 1.0,
    requests: Annotated[
        int | None, typer.Option(help="Measured requests per load point (default 40 unless --duration).")
    ] = None,
    duration: Annotated[
        float | None, typer.Option(help="Measurement window per load point, seconds.")
    ] = None,
    warmup: Annotated[int, typer.Option(help="Warm-up requests per point, excluded from statistics.")] = 4,
    cooldown: Annotated[
        int, typer.Option(help="Cool-down requests per point, excluded from statistics.")
    ] = 0,
    error_budget: Annotated[
        float | None, typer.Option(help="Stop a point early when this fraction of requests fail, e.g. 0.2.")
    ] = None,
    seed: Annotated[int, typer.Option(help="Seed of the workload and arrival schedules.")] = 0,
    slo: Annotated[
        str | None, typer.Option(help="SLO for goodput, e.g. ttft_p95=200ms,tpot_p95=50ms,e2e_p99=2s.")
    ] = None,
    out: Annotated[
        Path | None, typer.Option(help="Run directory to write (default runs/TIME-WORKLOAD).")
    ] = None,
    set_: Annotated[
        list[str] | None, typer.Option("--set", help="Override a workload field: FIELD=VALUE (repeatable).")
    ] = None,
    stream: Annotated[
        bool, typer.Option(help="Stream responses (SSE); --no-stream for whole responses.")
    ] = True,
    stall_timeout: Annotated[
        float, typer.Option(help="Fail a request after this many seconds without a byte.")
    ] = 60.0,
    request_timeout: Annotated[
        float, typer.Option(help="Fail a request after this many seconds in all.")
    ] = 600.0,
    ready_timeout: Annotated[
        float, typer.Option(help="Seconds a launched engine may take to become ready.")
    ] = 600.0,
    engine_set: Annotated[
        list[str] | None,
        typer.Option(
            help="Set a launched engine's setting: ENGINE.FIELD=VALUE (repeatable), e.g. vllm.dtype=float32, "
            "llamacpp.max_num_seqs=4. Fields: dtype, max_num_seqs, max_context, prefix_caching, kv_cache_dtype, "
            "threads, quantization, tensor_parallel, gpu_memory_fraction."
        ),
    ] = None,
    engine_nice: Annotated[
        int,
        typer.Option(
            help="Start launched engines this many levels (0-19) below the client's CPU priority, so a CPU "
            "engine on the same host cannot keep the client from the cores."
        ),
    ] = 0,
    api_key_env: Annotated[
        str | None,
        typer.Option(help="Environment variable holding the endpoint's API key (never written out)."),
    ] = None,
    api_key_file: Annotated[Path | None, typer.Option(help="File holding the endpoint's API key.")] = None,
    tokenizer: Annotated[
        Path | None,
        typer.Option(
            help="The served model's tokenizer for exact prompt lengths on any engine: its Hugging Face folder, "
            "tokenizer.json or .gguf (default: the engine's /tokenize, else a stand-in and approximate lengths)."
        ),
    ] = None,
    repeat: Annotated[
        int, typer.Option(help="Run each load point this many times back to back (for `bench gate`).")
    ] = 1,
    replay_prompts: Annotated[
        Path | None,
        typer.Option(
            help="Send exactly the prompts of this earlier run directory (same --workload, --set and --seed) "
            "instead of fresh ones; the engine's cache is then expected warm and not emptied."
        ),
    ] = None,
    resume: Annotated[
        Path | None,
        typer.Option(help="Continue an interrupted run in this directory with its own settings."),
    ] = None,
    resend_failed: Annotated[
        bool, typer.Option(help="With --resume: send again the requests that failed or were cancelled.")
    ] = False,
    # --distributed (docs/distributed.md): load points split across Locust workers, here and/or on other machines
    distributed: Annotated[
        bool, typer.Option(help="Split each load point across Locust worker processes (see --workers).")
    ] = False,
    workers: Annotated[int, typer.Option(help="With --distributed: worker processes in all.")] = 2,
    local_workers: Annotated[
        int | None,
        typer.Option(help="With --distributed: how many start here (default all; others: `bench worker`)."),
    ] = None,
    master_bind: Annotated[
        str, typer.Option(help="With --distributed: HOST[:PORT] to listen on (0.0.0.0: other machines).")
    ] = "127.0.0.1:5557",
    decide: Annotated[
        bool,
        typer.Option(
            "--decide",
            help="After measuring: print the recommendation with its reasons, capacity and cost per engine, and "
            "write the HTML decision report (report.html) and decision.json into the run directory.",
        ),
    ] = False,
    profile: Annotated[
        str | None, typer.Option(help="With --decide: the weight profile (see `bench decide --help`).")
    ] = None,
    cache_reset: Annotated[
        bool,
        typer.Option(
            help="Empty the engine's prefix cache before each load point where it offers a way (vLLM with "
            "VLLM_SERVER_DEV_MODE=1, SGLang, llama.cpp with --slot-save-path); --no-cache-reset leaves it."
        ),
    ] = True,
) -> None:
    """Launch or attach to each engine, replay the workload at each load point, and write a run directory."""
    from harness.orchestrate import resume_config

    if resume is not None:
        _refuse_with_resume(ctx, resume)
        cfg = resume_config(
            resume,
            api_key=_api_key(api_key_env, api_key_file),
            command=redacted_argv(sys.argv),
            resend_failed=resend_failed,
        )
    else:
        cfg = _new_config(
            engines, endpoint, workload, concurrency, rate, arrival, burstiness, requests, duration, warmup,
            cooldown, error_budget, seed, slo, out, set_, stream, stall_timeout, request_timeout, ready_timeout,
            api_key_env, api_key_file, repeat, engine_nice, engine_set or [],
        )  # fmt: skip
    if replay_prompts is not None:
        import dataclasses

        cfg = dataclasses.replace(cfg, replay_of=str(replay_prompts))
    if not cache_reset:
        import dataclasses

        cfg = dataclasses.replace(cfg, cache_reset=False)
    if tokenizer is not None:
        import dataclasses

        cfg = dataclasses.replace(cfg, tokenizer=str(tokenizer))
    if distributed:
        import dataclasses

        from harness.distributed import distributed_config

        cfg = dataclasses.replace(cfg, distributed=distributed_config(workers, local_workers, master_bind))
    _execute_and_print(cfg, decide=decide, profile=profile)


def _new_config(
    engines: str | None,
    endpoint: list[str] | None,
    workload: str,
    concurrency: str | None,
    rate: str | None,
    arrival: str,
    burstiness: float,
    requests: int | None,
    duration: float | None,
    warmup: int,
    cooldown: int,
    error_budget: float | None,
    seed: int,
    slo: str | None,
    out: Path | None,
    set_: list[str] | None,
    stream: bool,
    stall_timeout: float,
    request_timeout: float,
    ready_timeout: float,
    api_key_env: str | None,
    api_key_file: Path | None,
    repeat: int,
    engine_nice: int,
    engine_set: list[str],
) -> RunConfig:
    from adapters.process import check_nice
    from harness.errors import ConfigError
    from harness.orchestrate import RunConfig, default_out, parse_engines
    from harness.runner import StopRule
    from harness.slo import parse_slo
    from workloads.arrival import parse_sweep
    from workloads.registry import load_workload

    choices = parse_engines(engines, endpoint or [], engine_set)
    check_nice(engine_nice, "--engine-nice")
    if engine_nice and all(c.url is not None for c in choices):
        raise ConfigError(
            "--engine-nice applies to engines bench launches (--engines); every engine here is attached "
            "(--endpoint): start its server under `nice` yourself"
        )
    if concurrency is None and rate is None:
        concurrency = "4"
    points = parse_sweep(concurrency, rate, "closed" if rate is None else arrival, burstiness, seed)
    if requests is None and duration is None and load_workload(workload).kind != "trace":
        requests = 40  # a trace replays all the requests its workload file selects
    stop = StopRule(
        requests=requests,
        duration_s=duration,
        error_budget=error_budget,
        warmup=warmup,
        cooldown=cooldown,
        stall_timeout_s=stall_timeout,
        request_timeout_s=request_timeout,
    )
    return RunConfig(
        engines=choices,
        workload=workload,
        points=tuple(points),
        stop=stop,
        out=out or default_out(workload),
        seed=seed,
        slo=parse_slo(slo),
        overrides=_overrides(set_ or []),
        stream=stream,
        ready_timeout_s=ready_timeout,
        api_key=_api_key(api_key_env, api_key_file),
        command=tuple(redacted_argv(sys.argv)),
        repeat=repeat,
        engine_nice=engine_nice,
    )


def _execute_and_print(cfg: RunConfig, *, decide: bool = False, profile: str | None = None) -> None:
    from rich.console import Console

    from harness.breakdown import describe
    from harness.cli.live import LiveProgress
    from harness.orchestrate import execute
    from harness.rundir import RunDir
    from harness.telemetry import energy_line
    from reports.run_table import run_table

    console = Console(stderr=True, log_path=False)
    with LiveProgress(console) as progress:
        result = execute(cfg, progress)
    out_console = Console(width=max(Console().width, 170)) if not Console().is_terminal else Console()
    if result.summary is not None and result.summary.points:
        rd = RunDir(result.run_dir)
        manifest = rd.load_manifest().model_dump(mode="json") if rd.has_manifest() else None
        out_console.print(run_table(result.summary, manifest))
        for p in result.summary.points:
            for line in describe(p.engine, p.point, p.breakdowns, p.prefix_reuse):
                out_console.print(line, highlight=False, markup=False)
        for p in result.summary.points:  # GPU energy where NVML gave power (docs/telemetry.md)
            if (energy := energy_line(p.engine, p.point, p.telemetry)) is not None:
                out_console.print(energy, highlight=False, markup=False)
        for p in result.summary.points:
            for r in p.verdict.reasons:
                out_console.print(
                    f"[red]{p.engine} {p.point} INVALID:[/] {r.message} → {r.recommendation}", highlight=False
                )
            for note in p.verdict.notes:
                out_console.print(f"[yellow]{p.engine} {p.point} note:[/] {note}", highlight=False)
    for e in result.engines:
        if e.status != "ran":
            first, _, rest = e.reason.partition("\n")
            out_console.print(f"[yellow]{e.name} {e.status}:[/] {first}", highlight=False, markup=True)
            if rest and e.status == "failed":
                out_console.print(rest, highlight=False, markup=False)
    if result.exit_code == 5:  # orchestrate.EXIT_REQUESTS_FAILED
        out_console.print(
            "[red]requests failed:[/] a load point stopped on its error budget or had no successful request; "
            "its numbers are not a measurement of the engine (exit 5)",
            highlight=False,
        )
    out_console.print(f"run directory: {result.run_dir}", highlight=False)
    if decide and result.summary is not None and result.summary.points:
        from harness.cli.decide import decide_after_run

        decide_after_run(result.run_dir, profile, out_console)
    if result.exit_code:
        raise typer.Exit(result.exit_code)
