"""`bench report RUN_DIR... -o report.html`: one self-contained HTML decision report, rebuilt from run directories."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from harness.cli._app import app

__all__ = ["report"]

_PROFILES = "latency-critical-chatbot, batch-throughput, cost-first, heterogeneous-hardware, edge-offline"


@app.command()
def report(
    run_dirs: Annotated[
        list[Path], typer.Argument(help="Run directories written by `bench run` (with summary.json).")
    ],
    out: Annotated[Path, typer.Option("-o", "--out", help="HTML file to write.")] = Path("report.html"),
    profile: Annotated[str | None, typer.Option(help=f"Weight profile: {_PROFILES}.")] = None,
    weights: Annotated[Path | None, typer.Option(help="YAML/JSON file of criterion: weight.")] = None,
    plan: Annotated[Path | None, typer.Option(help="YAML/JSON file of use cases for a hybrid plan.")] = None,
    knowledge: Annotated[
        Path | None, typer.Option(help="Your knowledge file (overrides built-in facts).")
    ] = None,
    prices: Annotated[Path | None, typer.Option(help="Your price table (replaces the built-in one).")] = None,
    instance: Annotated[str | None, typer.Option(help="Price every engine on this instance.")] = None,
    title: Annotated[str, typer.Option(help="Title of the page.")] = "EngineBench decision report",
) -> None:
    """Write one offline HTML page: recommendation and plan, matrix, charts per workload, verdicts, environment."""
    from rich.console import Console

    from reports.html import ReportConfig, write_report

    config = ReportConfig(
        run_dirs=tuple(run_dirs),
        out=out,
        profile=profile,
        weights_file=weights,
        plan_file=plan,
        knowledge_file=knowledge,
        prices_file=prices,
        instance=instance,
        title=title,
    )
    path = write_report(config)
    Console(stderr=True).print(f"wrote {path} ({path.stat().st_size / 1024:.0f} KiB)", highlight=False)
