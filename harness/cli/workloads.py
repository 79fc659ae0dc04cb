"""`bench workloads`: list the built-in workloads, or show one (a name or a YAML file) and preview its requests."""

from __future__ import annotations

from typing import Annotated

import typer

from harness.cli._app import app

__all__ = ["run", "workloads"]


@app.command()
def workloads(
    target: Annotated[
        str | None, typer.Argument(help="A built-in workload name or a workload YAML file to show.")
    ] = None,
    workload: Annotated[
        str | None, typer.Option("--workload", help="A workload YAML file (same as the argument).")
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="Override a field: FIELD=VALUE (repeatable; turns.mean=4)."),
    ] = None,
    preview: Annotated[int, typer.Option(help="Generate and show this many requests.")] = 0,
    seed: Annotated[int | None, typer.Option(help="Seed (default: the workload's).")] = None,
    tokenizer: Annotated[
        str,
        typer.Option(
            help="For --preview: a model folder with tokenizer.json, llamacpp:URL, vllm:URL:MODEL, or `simple` "
            "(a test tokenizer: lengths are NOT the model's)."
        ),
    ] = "simple",
) -> None:
    """List the workloads with a one-line description, or show one workload's parameters and fingerprint."""
    from workloads.catalog import WorkloadsConfig, parse_overrides

    run(
        WorkloadsConfig(
            target=workload or target,
            overrides=parse_overrides(set_ or []),
            preview=preview,
            seed=seed,
            tokenizer=tokenizer,
        )
    )


def run(config: object) -> None:
    import yaml
    from rich.console import Console
    from rich.table import Table

    from workloads.catalog import WorkloadsConfig, preview, workload_detail, workloads_table

    assert isinstance(config, WorkloadsConfig)
    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 140))
    if config.target is None:
        table = Table("name", "kind", "version", "fingerprint", "description", title="workloads (built-in)")
        for row in workloads_table():
            table.add_row(*row.values())
        console.print(table)
        console.print("show one: bench workloads NAME | FILE.yaml [--preview N]", highlight=False)
        return
    w, info = workload_detail(config)
    console.print(yaml.safe_dump(info, sort_keys=False).rstrip(), highlight=False)
    if config.preview:
        table = Table("request", "in", "out", "turn", "think s", "tags", "text")
        rows = preview(w, config)
        for r in rows:
            tags = ",".join(f"{k}={v}" for k, v in r["tags"].items() if k != "workload")
            table.add_row(
                r["request_id"], str(r["input_tokens"]), str(r["max_tokens"]), str(r["turn"] or ""),
                str(r["think_time"] or ""), tags, r["text"],
            )  # fmt: skip
        console.print(table)
        if rows:
            console.print(f"tokens counted with: {rows[0]['tokenizer']}", highlight=False)
