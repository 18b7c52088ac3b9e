"""Shared CLI helpers: consoles, error handling, number formatting."""

from __future__ import annotations

import warnings
from typing import Any, Callable

from rich.console import Console
from rich.markup import escape

from gndgl_compiler.errors import GndglError
from gndgl_compiler.viz.style import fmt_bytes, fmt_count as fmt_int  # noqa: F401  (re-exported for the commands)

console = Console()
console_err = Console(stderr=True)


def _click_classes(name: str) -> tuple[type, ...]:
    """The exception class ``name`` from click and from typer's vendored copy (typer>=0.20)."""
    found: list[type] = []
    for modname in ("click.exceptions", "typer._click.exceptions", "typer.exceptions"):
        try:
            mod = __import__(modname, fromlist=[name])
        except ImportError:
            continue
        cls = getattr(mod, name, None)
        if isinstance(cls, type) and cls not in found:
            found.append(cls)
    return tuple(found)


_EXIT = _click_classes("Exit")
_CLICK_ERROR = _click_classes("ClickException")
_ABORT = _click_classes("Abort")


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:  # noqa: ANN001
    """Print a warning as one 'warning: ...' paragraph (no source location or code line)."""
    kind = "" if category is UserWarning else f"{category.__name__}: "
    console_err.print(f"[bold yellow]warning:[/] {escape(kind + str(message))}", highlight=False, soft_wrap=True)


def run_guarded(fn: Callable[[], Any]) -> int:
    """Run a Typer app call; turn user errors into clean messages and exit codes.

    Warnings (e.g. a damaged checkpoint that is skipped) are printed as ``warning: ...``.

    Returns:
        The process exit code.
    """
    old_show, warnings.showwarning = warnings.showwarning, _show_warning
    try:
        result = fn()
        return result if isinstance(result, int) else 0
    except GndglError as err:
        label = "[bold red]error:[/] " if err.is_error else ""
        console_err.print(f"{label}{escape(str(err))}", highlight=False, soft_wrap=True)
        return err.exit_code
    except _EXIT as exc:
        return int(getattr(exc, "exit_code", 0) or 0)
    except _CLICK_ERROR as exc:
        exc.show()
        return int(getattr(exc, "exit_code", 2) or 2)
    except _ABORT:
        console_err.print("[yellow]aborted[/]")
        return 130
    finally:
        warnings.showwarning = old_show


def tidy_flag_metavars(command: Any) -> Any:
    """Give every on/off flag an empty metavar, in ``command`` and its subcommands.

    Newer typer prints the type of a flag in help (``--fused/--no-fused  <bool>``); a flag
    takes no value, so the column stays empty. Works on typer's vendored click and on click.

    Args:
        command: the click command built from the Typer app.

    Returns:
        ``command`` itself.
    """
    ctx = command.context_class(command)
    for param in [*command.params, command.get_help_option(ctx)]:
        if param is not None and getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    for sub in getattr(command, "commands", {}).values():
        tidy_flag_metavars(sub)
    return command


def note_resolved(typed: Any, used: Any) -> None:
    """Say which artifact a folder of artifacts (``compiled/``) stood for, when it was not the one typed.

    Args:
        typed: the path the user gave.
        used: the artifact directory that was loaded.
    """
    from pathlib import Path

    from gndgl_compiler.artifact import artifacts_in

    if used is None or Path(typed) == Path(used):
        return
    n = len(artifacts_in(typed))
    which = "the only artifact" if n == 1 else f"the newest of {n} artifacts"
    console_err.print(f"using {escape(str(used))}/ ({which} in {escape(str(typed))}/)", highlight=False)



def newest_run_noted(need: str) -> Any:
    """The newest run in ``./runs`` with something to show (``need``: ``"weights"`` or ``"metrics"``),
    saying which newer runs were skipped and why (``runtime/run_dir.newest_run``)."""
    from gndgl_compiler.runtime.run.directory import newest_run

    run, skipped = newest_run("runs", need)
    if skipped:
        console_err.print(f"using {escape(str(run))}; skipped {len(skipped)} newer run(s) with nothing to show: "
                          + "; ".join(escape(s) for s in skipped), highlight=False, soft_wrap=True)
    return run
