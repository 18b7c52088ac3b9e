"""Shared CLI helpers: consoles, error handling, number formatting."""

from __future__ import annotations

from typing import Any, Callable

import click
from rich.console import Console

from gndgl_compiler.errors import GndglError

console = Console()
console_err = Console(stderr=True)


def run_guarded(fn: Callable[[], Any]) -> int:
    """Run a Typer app call; turn user errors into clean messages and exit codes.

    Returns:
        The process exit code.
    """
    try:
        result = fn()
        return result if isinstance(result, int) else 0
    except GndglError as err:
        console_err.print(f"[bold red]error:[/] {err}", highlight=False, markup=True, soft_wrap=True)
        return err.exit_code
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        exc.show()
        return 2
    except click.exceptions.Abort:
        console_err.print("[yellow]aborted[/]")
        return 130


def fmt_int(n: float) -> str:
    """Human-readable count: 69.1M, 1.2k, 512."""
    n = float(n)
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{unit}"
    return f"{int(n)}"


def fmt_bytes(n: float) -> str:
    """Human-readable bytes: 64.0 KiB."""
    n = float(n)
    for unit, div in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= div:
            return f"{n / div:.1f} {unit}"
    return f"{int(n)} B"
