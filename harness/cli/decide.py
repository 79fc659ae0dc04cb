"""`bench decide RUN_DIR...`: score engines, test the ranking's robustness, size and cost them, plan a hybrid."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from harness.cli._app import app

__all__ = ["decide"]

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
