"""`bench gate`: fail CI on a performance regression of a candidate run against a baseline run."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from harness.cli._app import app

__all__ = ["gate"]


@app.command()
def gate(
    baseline: Annotated[Path, typer.Option(help="Run directory of the baseline (`bench run --out`).")],
    candidate: Annotated[Path, typer.Option(help="Run directory of the candidate.")],
    policy: Annotated[
        Path | None, typer.Option(help="Gate policy YAML: thresholds, alpha, test (see docs/gating.md).")
    ] = None,
    markdown: Annotated[
        Path | None, typer.Option(help="Write the verdict as Markdown (e.g. $GITHUB_STEP_SUMMARY).")
    ] = None,
    junit: Annotated[
        Path | None, typer.Option(help="Write JUnit XML (one testcase per point × metric).")
    ] = None,
    json: Annotated[Path | None, typer.Option(help='Write the full result as JSON (kind "gate").')] = None,
) -> None:
    """Compare matching load points; exit 0 pass, 1 regression (beyond threshold and significant), 2 not comparable."""
    from rich.console import Console
    from rich.markdown import Markdown

    from harness.gate import GateConfig, run_gate
    from reports.gate import render_markdown

    cfg = GateConfig(baseline, candidate, policy, markdown, junit, json)
    report = run_gate(cfg)
    Console(width=max(Console().width, 120)).print(Markdown(render_markdown(report.model_dump(mode="json"))))
    if report.exit_code:
        raise typer.Exit(report.exit_code)
