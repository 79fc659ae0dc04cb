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
        # standalone mode: click reports usage errors itself (one line + usage) and exits with code 2
        app()
    except BenchError as e:
        Console(stderr=True).print(f"[bold red]error:[/] {e}", highlight=False, soft_wrap=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        Console(stderr=True).print("[yellow]interrupted[/]")
        sys.exit(130)
