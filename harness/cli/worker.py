"""`bench worker`: lend this machine's client CPU to a `bench run --distributed` master elsewhere."""

from __future__ import annotations

from typing import Annotated

import typer

from harness.cli._app import app

__all__ = ["worker"]


@app.command()
def worker(
    master: Annotated[str, typer.Option(help="The master's address: HOST or HOST:PORT (port default 5557).")],
    once: Annotated[
        bool, typer.Option(help="Exit after one load point instead of waiting for the next.")
    ] = False,
    connect_timeout: Annotated[
        float, typer.Option(help="Seconds to keep trying to reach the master.")
    ] = 300.0,
) -> None:
    """Connect to a `bench run --distributed` master and run the shares of its load points it sends."""

    from rich.console import Console

    from harness import loop as event_loop
    from harness.distributed import parse_master
    from harness.distributed_worker import serve_worker

    host, port = parse_master(master)
    console = Console(stderr=True, log_path=False)
    event_loop.run(
        serve_worker(
            host,
            port,
            once=once,
            connect_timeout_s=connect_timeout,
            progress=lambda msg: console.log(msg, highlight=False, markup=False),
        )
    )
