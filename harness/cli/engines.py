"""`bench engines`: every engine adapter, what it needs, whether it is installed, runnable and live-tested here;
`bench engines install NAME...`: provision the CPU engines and the model (idempotent)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated, Any

import typer

from harness.cli._app import app

__all__ = ["InstallConfig", "engines_table", "install", "run_install", "run_list"]

engines_app = typer.Typer(
    help="List engine adapters and what runs here; `bench engines install vllm llamacpp` installs the CPU engines.",
    invoke_without_command=True,
    no_args_is_help=False,
)
app.add_typer(engines_app, name="engines")

# the install components each engine needs (names of adapters.install)
_COMPONENTS = {
    "vllm": ("model", "model-hf", "vllm"),
    "llamacpp": ("model", "llamacpp"),
    "triton": ("model", "model-hf", "vllm", "triton"),  # tritonserver (nvidia-pytriton) serving vLLM CPU
    "rayserve": ("model", "model-hf", "vllm", "rayserve"),  # ray[serve] added to the vLLM venv
}


@dataclass(frozen=True)
class InstallConfig:
    engines: tuple[str, ...]


@engines_app.callback()
def engines(ctx: typer.Context) -> None:
    """Every engine adapter: hardware it needs, installed here or not (why not), runnable here, live-tested here."""
    if ctx.invoked_subcommand is None:
        run_list()


@engines_app.command("install")
def install(
    names: Annotated[
        list[str] | None,
        typer.Argument(help="Engines to install (default: vllm llamacpp).", show_default=False),
    ] = None,
) -> None:
    """Install the CPU engines (vLLM CPU build, llama.cpp's llama-server) and the model they serve."""
    run_install(InstallConfig(tuple(names or ("vllm", "llamacpp"))))


def engines_table() -> list[dict[str, Any]]:
    """One row per adapter (the data behind the table; tests call this)."""
    from adapters import registry
    from adapters.contracts import CHECKED

    tested = registry.live_tests()
    rows: list[dict[str, Any]] = []
    for name, adapter in registry.adapters().items():
        avail = registry.availability(adapter)
        live = tested.get(name)
        rows.append(
            {
                "engine": name,
                "display_name": adapter.info.display_name,
                "hardware": list(adapter.info.hardware),
                "hardware_here": avail.hardware_ok,
                "installed": avail.installed,
                "runnable": avail.runnable,
                "reason": avail.reason,
                "live_tested": live,
                "maintenance": adapter.info.maintenance,
                # the engine code or recorded output its command lines, requests and metric names were checked
                # against (tests/test_contracts.py)
                "checked_against": CHECKED.get(name, "nothing yet"),
            }
        )
    for module, error in registry.broken().items():
        rows.append(
            {
                "engine": module,
                "display_name": f"adapters/{module}.py",
                "hardware": [],
                "hardware_here": False,
                "installed": False,
                "runnable": False,
                "reason": f"adapter module does not import: {error}",
                "live_tested": None,
                "maintenance": "",
                "checked_against": "",
            }
        )
    return rows


def run_list() -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="Engines", title_justify="left")
    for col in (
        "engine",
        "hardware",
        "installed here",
        "runnable here",
        "live-tested here",
        "maintenance",
        "checked against",
    ):
        table.add_column(col, overflow="fold")
    yes, no = "[green]yes[/]", "[red]no[/]"
    for row in engines_table():
        live = row["live_tested"]
        live_text = (
            f"{'[green]passed[/]' if live['passed'] else '[red]failed[/]'} {escape(str(live['when'])[:10])}"
            f" ({escape(str(live['version']))})"
            if live
            else "never"
        )
        installed = (yes if row["installed"] else no) + f"\n[dim]{escape(row['reason'])}[/]"
        table.add_row(
            f"{row['engine']}\n[dim]{escape(row['display_name'])}[/]",
            ", ".join(row["hardware"]),
            installed,
            yes if row["runnable"] else no,
            live_text,
            escape(row["maintenance"]),
            f"[dim]{escape(row['checked_against'])}[/]",
        )
    Console().print(table)


def run_install(config: InstallConfig) -> None:
    from rich.console import Console
    from rich.markup import escape

    from adapters import install as installer
    from harness.errors import ConfigError, EngineError

    unknown = [e for e in config.engines if e not in _COMPONENTS]
    if unknown:
        raise ConfigError(
            f"cannot install {', '.join(unknown)} here: `bench engines install` knows {', '.join(_COMPONENTS)}; "
            "benchmark other engines where they run with --endpoint NAME=http://HOST:PORT"
        )
    components: list[str] = []
    for engine in config.engines:
        components += [c for c in _COMPONENTS[engine] if c not in components]
    console = Console()
    todo = [c for c in components if not installer.status(c).installed]
    if todo:
        from harness.cli.live import LiveProgress

        console.print(f"installing {', '.join(todo)} (vLLM ~5 min, llama.cpp build ~10 min)", highlight=False)
        # downloads, the llama.cpp build's N of M steps and pip's packages as live bars; plain lines off a terminal
        with LiveProgress(console) as progress:
            try:
                installer.install(todo, progress)
            except installer.InstallError as e:
                raise EngineError(str(e)) from e
    for name in components:
        status = installer.status(name)
        mark = "[green]ready[/]" if status.installed else "[red]missing[/]"
        console.print(f"{name}: {mark} ({escape(status.detail)})", highlight=False, soft_wrap=True)
