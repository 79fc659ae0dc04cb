"""The typer application every `bench` command registers on."""

from __future__ import annotations

import typer

app = typer.Typer(
    name="bench",
    help="EngineBench: benchmark LLM inference engines on the same workloads and decide which to run.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
