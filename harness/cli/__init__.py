"""The composition root: `bench` and its commands. Nothing imports this package.

Each command lives in its own module here, parses its options into a config object and calls a library function
(which tests call directly). Modules are discovered, so adding a command touches no other file. Heavy imports
happen inside command functions, so `bench --help` stays fast.
"""

from __future__ import annotations

import importlib
import pkgutil
import sys

from rich.console import Console

from harness.cli._app import app
from harness.errors import BenchError

__all__ = ["app", "main"]


def _register() -> None:
    for module in pkgutil.iter_modules(__path__):
        if not module.name.startswith("_"):
            importlib.import_module(f"{__name__}.{module.name}")


def main() -> None:
    _register()
    try:
        rc = app(standalone_mode=False)  # click returns a typer.Exit's code instead of exiting
        if isinstance(rc, int) and rc:
            sys.exit(rc)
    except BenchError as e:
        Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        Console(stderr=True).print("[yellow]interrupted[/]")
        sys.exit(130)
    except Exception as e:  # click usage errors come through here in non-standalone mode
        import click

        if isinstance(e, click.exceptions.ClickException):
            e.show()
            sys.exit(e.exit_code)
        if isinstance(e, click.exceptions.Exit | click.exceptions.Abort):
            sys.exit(getattr(e, "exit_code", 1))
        raise
