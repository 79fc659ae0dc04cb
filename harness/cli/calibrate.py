"""`bench calibrate`: measure the harness's own timing error and ceiling against the built-in scripted server."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from harness.cli._app import app

if TYPE_CHECKING:
    from harness.calibrate import CalibrationConfig

__all__ = ["calibrate", "run", "run_server_ceiling"]


@app.command()
def calibrate(
    concurrency: Annotated[
        str, typer.Option(help="Closed-loop concurrencies to drive, rising, e.g. 1,16,64,256.")
    ] = "1,16,64,256",
    ttft_ms: Annotated[float, typer.Option(help="Scripted time to first token (ms).")] = 50.0,
    itl_ms: Annotated[float, typer.Option(help="Scripted gap between chunks (ms).")] = 5.0,
    output_tokens: Annotated[int, typer.Option(help="Output tokens per request (pinned).")] = 64,
    tokens_per_chunk: Annotated[int, typer.Option(help="Tokens per stream chunk.")] = 1,
    waves: Annotated[int, typer.Option(help="Measured requests per point = waves x concurrency.")] = 3,
    connection: Annotated[str, typer.Option(help="fresh (a connection per request) or keepalive.")] = "fresh",
    server_workers: Annotated[int, typer.Option(help="Scripted server processes (SO_REUSEPORT).")] = 1,
    processes: Annotated[int, typer.Option(help="Client processes (the runner's multi-process mode).")] = 1,
    json_out: Annotated[
        Path | None, typer.Option("--json", help="Also write the result as JSON here.")
    ] = None,
    server_ceiling: Annotated[
        str | None,
        typer.Option(
            help="Instead: the scripted server's own ceiling at these stream counts, e.g. 64,256,512."
        ),
    ] = None,
) -> None:
    """Drive the scripted server (own process) with the harness's runner; print timing error and the ceiling."""
    from harness.calibrate import CalibrationConfig
    from harness.errors import ConfigError
    from workloads.arrival import parse_sweep

    if server_ceiling is not None:
        streams = [p.concurrency for p in parse_sweep(server_ceiling, None, "closed", 1.0, 0)]
        return run_server_ceiling(streams, itl_ms / 1000.0)
    points = parse_sweep(concurrency, None, "closed", 1.0, 0)
    if connection not in ("fresh", "keepalive"):
        raise ConfigError(f"--connection {connection!r} is unknown; use fresh or keepalive")
    if (
        ttft_ms < 0
        or itl_ms < 0
        or min(output_tokens, tokens_per_chunk, waves, server_workers, processes) < 1
    ):
        raise ConfigError(
            "--ttft-ms and --itl-ms must be >= 0; --output-tokens, --tokens-per-chunk, --waves, --server-workers "
            "and --processes must be >= 1"
        )
    cfg = CalibrationConfig(
        ttft=ttft_ms / 1000.0,
        itl=itl_ms / 1000.0,
        output_tokens=output_tokens,
        tokens_per_chunk=tokens_per_chunk,
        concurrency=tuple(p.concurrency for p in points),
        waves=waves,
        connection="fresh" if connection == "fresh" else "keepalive",
        server_workers=server_workers,
        processes=processes,
    )
    run(cfg, json_out)


def run_server_ceiling(streams: list[int], itl: float) -> None:
    from rich.console import Console
    from rich.table import Table

    from harness.calibrate import server_ceiling

    t = Table(title=f"Scripted server ceiling (one process, ITL {itl * 1e3:g} ms, raw keep-alive load)")
    for col in (
        "streams",
        "chunks/s scripted",
        "chunks/s achieved",
        "lag p50 / p99 ms",
        "server CPU",
        "CPU wait",
    ):
        t.add_column(col, justify="right")
    for p in server_ceiling(streams, itl):
        t.add_row(
            str(p.streams),
            f"{p.scripted_chunks_per_s:,.0f}",
            f"{p.chunks_per_s:,.0f}",
            f"{p.lag.p50 or 0:.2f} / {p.lag.p99 or 0:.2f}",
            f"{p.server_cpu:.0%}",
            "-" if p.server_cpu_wait is None else f"{p.server_cpu_wait:.0%}",
        )
    Console(width=160).print(t)


def run(cfg: CalibrationConfig, json_out: Path | None = None) -> None:
    import orjson
    from rich.console import Console

    from adapters.scripted import make_adapter
    from harness.calibrate import PointCalibration, render_table, run_calibration

    console = Console()
    if not console.is_terminal:
        console = Console(width=max(console.width, 200))

    def progress(p: PointCalibration) -> None:
        e = p.ttft_error
        console.print(
            f"concurrency {p.concurrency}: {p.ok}/{p.requests} ok, TTFT error p50 {e.p50 or 0:.2f} ms, "
            f"{p.tokens_per_s:,.0f} tok/s" + (f" — saturated: {'; '.join(p.reasons)}" if p.saturated else ""),
            highlight=False,
        )

    result = run_calibration(cfg, make_adapter(), progress)
    console.print(render_table(result))
    if result.ceiling_requests_per_s is not None:
        console.print(
            f"ceiling (best unsaturated point): {result.ceiling_requests_per_s:.1f} req/s, "
            f"{result.ceiling_tokens_per_s or 0:,.0f} streamed tok/s"
            + (f"; saturated from concurrency {result.saturated_at}" if result.saturated_at else ""),
            highlight=False,
        )
    else:
        console.print("[yellow]every point saturated: lower --concurrency to find the ceiling[/]")
    for note in result.notes:
        console.print(f"[yellow]note:[/] {note}", highlight=False)
    if json_out is not None:
        json_out.write_bytes(orjson.dumps(result.to_dict(), option=orjson.OPT_INDENT_2))
        console.print(f"wrote {json_out}")
