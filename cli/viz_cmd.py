"""``gndgl viz``, ``gndgl sweep`` and ``gndgl plot``: pictures of plans, sweeps and runs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from gndgl_compiler.errors import GndglError

from . import sweep_cmd
from .common import console, newest_run_noted, note_resolved


def _viz(source: Path, output: Optional[Path], level: str, fmt: Optional[str], terminal: bool, heads: bool,
         workers: Optional[int], bundle: Optional[bool], timeout: float) -> None:
    from gndgl_compiler.viz import choose_level, load_plan, output_format, plan_to_dot, render_dot

    plan, art_dir = load_plan(source, workers=workers)
    if art_dir is not None and art_dir.parent == source:
        note_resolved(source, art_dir)
    if terminal:
        from gndgl_compiler.viz.terminal import print_plan_tree
        print_plan_tree(plan, console)
        return
    try:
        lvl = choose_level(plan, level)
    except ValueError as exc:
        raise GndglError(f"--level: {exc}") from None
    fmt = output_format(output, fmt)
    dot_text = plan_to_dot(plan, level=lvl, heads=heads, bundle=bundle)
    if fmt == "dot" and output is None:
        print(dot_text, end="")
        return
    if output is None:
        output = (art_dir if art_dir is not None else Path(".")) / (
            f"partitions.{fmt}" if art_dir is not None else f"{plan.name}_partitions.{fmt}")
    elif not output.suffix:
        output = output.with_suffix("." + fmt)
    path = render_dot(dot_text, output, fmt, timeout=timeout)
    console.print(f"wrote [bold]{path}[/] ({lvl} level, {len(plan.partitions)} partitions)", highlight=False)


def register(app: typer.Typer) -> None:
    """Add ``viz``, ``sweep`` (``sweep_cmd.py``) and ``plot`` to ``app``."""

    @app.command("viz")
    def viz(
        source: Path = typer.Argument(Path("compiled"),
                                      help="Compiled artifact directory, run directory or spec file."),
        output: Optional[Path] = typer.Option(None, "-o", "--output",
                                              help="Output file; format from its suffix (.svg .png .pdf .dot). "
                                                   "Default: <artifact>/partitions.svg."),
        level: str = typer.Option("auto", "--level", help="ops (every layer, one cluster per partition), "
                                                          "partitions (one box per partition) or auto."),
        fmt: Optional[str] = typer.Option(None, "--format", help="svg, png, pdf or dot (dot without -o: stdout)."),
        terminal: bool = typer.Option(False, "--terminal", help="Print a tree in the terminal; write no files."),
        heads: bool = typer.Option(False, "--heads", help="Ops level: draw every op of the aux heads."),
        workers: Optional[int] = typer.Option(None, "--workers", min=1, help="Show a placement over N workers."),
        bundle: Optional[bool] = typer.Option(None, "--bundle/--no-bundle",
                                              help="Route sharing / diversity through one hub per module "
                                                   "(default: with 4+ groups)."),
        timeout: float = typer.Option(120.0, "--timeout", min=1, help="Seconds graphviz may take."),
    ) -> None:
        """Draw the partition graph of a compiled artifact or a spec (SVG/PNG/PDF/DOT or a terminal tree)."""
        _viz(source, output, level, fmt, terminal, heads, workers, bundle, timeout)

    sweep_cmd.register(app)

    @app.command("plot")
    def plot(
        run_dir: Optional[Path] = typer.Argument(None, help="Run directory of `gndgl train` (with metrics.jsonl); "
                                                            "default: the newest in ./runs."),
        output: Optional[Path] = typer.Option(None, "-o", "--output", help="Image file (.png/.svg/.pdf); "
                                                                          "default RUN_DIR/curves.png."),
    ) -> None:
        """Plot local loss / accuracy per partition and test accuracy per epoch of a run."""
        from gndgl_compiler.viz.plots import plot_run

        path = plot_run(run_dir if run_dir is not None else newest_run_noted("metrics"), output)
        console.print(f"wrote [bold]{path}[/]", highlight=False)
