"""`bench summarize DIR`: rebuild summary.json from a run directory's records and print the table."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

import typer

from harness.cli._app import app

__all__ = ["SummarizeConfig", "run", "summarize"]


@dataclass(frozen=True)
class SummarizeConfig:
    run_dir: Path
    slo: str | None = None
    policy: Path | None = None


@app.command()
def summarize(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by `bench run`.")],
    slo: Annotated[
        str | None,
        typer.Option(
            help="SLO for goodput, e.g. ttft_p95=200ms,tpot_p95=50ms,e2e_p99=2s (default: the run's)."
        ),
    ] = None,
    policy: Annotated[
        Path | None, typer.Option(help="YAML/JSON file of verdict thresholds (VerdictPolicy fields).")
    ] = None,
) -> None:
    """Rebuild summary.json from records.jsonl and print per load point statistics and verdicts."""
    run(SummarizeConfig(run_dir=run_dir, slo=slo, policy=policy))


def run(config: SummarizeConfig) -> None:
    from rich.console import Console

    from harness.rundir import RunDir
    from harness.slo import parse_slo
    from harness.summary import rebuild_summary
    from harness.verdict import load_policy
    from reports.run_table import run_table

    slo = parse_slo(config.slo) if config.slo else None
    policy = load_policy(config.policy) if config.policy else None
    summary = rebuild_summary(config.run_dir, slo=slo, policy=policy)
    console = Console()
    if not console.is_terminal:  # piped or captured: don't squeeze the table into 80 columns
        console = Console(width=max(console.width, 170))
    for note in summary.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    # the same table as `bench run`: ok / failed / cancelled apart, memory, quality, host facts below
    rd = RunDir(config.run_dir)
    manifest = rd.load_manifest().model_dump(mode="json") if rd.has_manifest() else None
    console.print(run_table(summary, manifest))
    for p in summary.points:
        if p.verdict.status == "INVALID":
            for r in p.verdict.reasons:
                console.print(
                    f"[red]{p.engine} {p.point} INVALID:[/] {r.message} → {r.recommendation}", highlight=False
                )
        for note in p.verdict.notes:
            console.print(f"[yellow]{p.engine} {p.point} note:[/] {note}", highlight=False)
    console.print(f"wrote {config.run_dir / 'summary.json'}", highlight=False)
