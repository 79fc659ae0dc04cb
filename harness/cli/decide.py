"""`bench decide RUN_DIR...`: score engines, test the ranking's robustness, size and cost them, plan a hybrid."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from harness.cli._app import app

__all__ = ["decide", "decide_after_run"]

_PROFILES = "latency-critical-chatbot, batch-throughput, cost-first, heterogeneous-hardware, edge-offline"


@app.command()
def decide(
    run_dirs: Annotated[
        list[Path], typer.Argument(help="Run directories written by `bench run` (with summary.json).")
    ],
    profile: Annotated[str | None, typer.Option(help=f"Weight profile: {_PROFILES}.")] = None,
    weights: Annotated[Path | None, typer.Option(help="YAML/JSON file of criterion: weight.")] = None,
    plan: Annotated[Path | None, typer.Option(help="YAML/JSON file of use cases for a hybrid plan.")] = None,
    json_out: Annotated[Path | None, typer.Option("--json", help="Write the decision JSON here.")] = None,
    knowledge: Annotated[
        Path | None, typer.Option(help="Your knowledge file (overrides built-in facts).")
    ] = None,
    prices: Annotated[Path | None, typer.Option(help="Your price table (replaces the built-in one).")] = None,
    instance: Annotated[str | None, typer.Option(help="Price every engine on this instance.")] = None,
    users: Annotated[float | None, typer.Option(help="Size for this many concurrent users.")] = None,
    think_time: Annotated[float, typer.Option(help="Seconds each user waits between requests.")] = 0.0,
    rps: Annotated[float | None, typer.Option(help="Size for this many requests per second.")] = None,
    tie_margin: Annotated[
        float, typer.Option(help="Total-score gap below which engines are near-tied.")
    ] = 0.1,
    usd_per_kwh: Annotated[
        float | None,
        typer.Option(help="Price the GPUs' measured energy at this $ per kWh (adds energy cost)."),
    ] = None,
) -> None:
    """Weighted decision matrix, sensitivity, capacity and cost, and a hybrid deployment plan."""
    from rich.console import Console

    from harness.decide import DecideConfig, render
    from harness.decide import decide as run_decide
    from matrix.capacity import Traffic

    target = (
        Traffic(requests_per_s=rps, concurrent_users=users, think_time_s=think_time)
        if (users or rps)
        else None
    )
    config = DecideConfig(
        run_dirs=tuple(run_dirs),
        profile=profile,
        weights_file=weights,
        plan_file=plan,
        json_out=json_out,
        knowledge_file=knowledge,
        prices_file=prices,
        instance=instance,
        target=target,
        tie_margin=tie_margin,
        usd_per_kwh=usd_per_kwh,
    )
    decision = run_decide(config)
    render(decision, Console(width=200))
    if json_out is not None:
        Console(stderr=True).print(f"wrote {json_out}")


def decide_after_run(run_dir: Path, profile: str | None, console: Any) -> Path | None:
    """`bench run --decide`: the decision of the run just made (the same `harness.decide.decide` as `bench decide`),
    its HTML report (the same `reports.html.write_report` as `bench report`) and decision JSON written into the run
    directory, and the answer printed: recommendation with the criteria that decided it, capacity and cost per
    engine, what the result depends on, the report's path. Returns the report's path (None when it failed: the
    reason is printed, the run's own exit code stands)."""
    from harness.decide import DecideConfig, render_brief
    from harness.decide import decide as run_decide
    from harness.errors import BenchError
    from reports.html import ReportConfig, write_report

    try:
        decision = run_decide(
            DecideConfig(run_dirs=(run_dir,), profile=profile, json_out=run_dir / "decision.json")
        )
        report = write_report(ReportConfig(run_dirs=(run_dir,), out=run_dir / "report.html", profile=profile))
    except BenchError as e:
        console.print(f"[red]no decision:[/] {e}", highlight=False)
        return None
    render_brief(decision, console, report=report)
    return report
