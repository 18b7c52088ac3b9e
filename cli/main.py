"""The ``gndgl`` command: a thin Typer layer over :mod:`gndgl_compiler`.

Every :class:`~gndgl_compiler.errors.GndglError` is printed as a one-paragraph
message (no traceback) and exits with its code (2 for bad input).
"""

from __future__ import annotations

import sys

import typer

from . import compile_cmd, export_cmd, train_cmd, viz_cmd
from .common import console, console_err, run_guarded, tidy_flag_metavars

app = typer.Typer(
    name="gndgl",
    help="Declarative graph compiler for local learning (Grouped Neuron DGL): compile, train, draw.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,  # click's plain help: option names are never cut short (rich's table cut them at 80 cols)
)



def _version(value: bool) -> None:
    if value:
        from gndgl_compiler import __version__

        console.print(f"gndgl {__version__}", highlight=False)
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                       help="Print the version and exit.")) -> None:
    """Declarative graph compiler for local learning (Grouped Neuron DGL): compile, train, draw."""


compile_cmd.register(app)
train_cmd.register(app)
viz_cmd.register(app)
export_cmd.register(app)


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point."""
    try:
        command = tidy_flag_metavars(typer.main.get_command(app))
        code = run_guarded(lambda: command.main(args=argv, prog_name="gndgl", standalone_mode=False))
    except KeyboardInterrupt:
        console_err.print("[yellow]interrupted[/]")
        code = 130
    sys.exit(code or 0)


if __name__ == "__main__":
    main()
