"""``gndgl viz``, ``gndgl sweep`` and ``gndgl plot``: pictures of plans, sweeps and runs."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from gndgl_compiler.errors import GndglError

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
    """Add ``viz``, ``sweep`` and ``plot`` to ``app``."""

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

    @app.command("sweep")
    def sweep(
        spec: Path = typer.Argument(..., help="Base spec file."),
        depth: str = typer.Option("1,2,4,8,16", "--depth", help="Values of K, comma-separated."),
        width: str = typer.Option("1,2,4,8", "--width", help="Values of G, comma-separated."),
        output: Path = typer.Option(Path("sweep"), "-o", "--output", help="Output directory."),
        train: bool = typer.Option(False, "--train", help="Also train every configuration (slow)."),
        epochs: Optional[int] = typer.Option(None, "--epochs", min=1, help="Training epochs (default: the spec's)."),
        dataset: Optional[str] = typer.Option(None, "--dataset", help="Override the training data set."),
        device: Optional[str] = typer.Option(None, "--device", help="Train every partition on this device."),
        batch_size: Optional[int] = typer.Option(None, "--batch-size", min=1, help="Override the batch size."),
        limit_train: Optional[int] = typer.Option(None, "--limit-train", min=1, help="Use only N training images."),
        limit_test: Optional[int] = typer.Option(None, "--limit-test", min=1, help="Use only N test images."),
    ) -> None:
        """Compile (and optionally train) every K × G variant of a spec: Tables 4/5-style tables, a Figure 3 chart."""
        from gndgl_compiler.spec.load import load_spec
        from gndgl_compiler.viz.bubble import bubble_chart
        from gndgl_compiler.sweep import parse_ints, run_sweep
        from gndgl_compiler.viz.tables import paper_reference, write_tables

        depths, widths = parse_ints(depth, "--depth"), parse_ints(width, "--width")
        base = load_spec(spec)
        paper = paper_reference(base.model_dump(mode="json"))
        opts = {"epochs": epochs, "dataset": dataset, "device": device, "batch_size": batch_size,
                "limit_train": limit_train, "limit_test": limit_test}
        rows = run_sweep(spec, depths, widths, train=train, out_dir=output, train_options=opts,
                         log=lambda line: console.print(line, highlight=False, markup=False))
        title = f"{base.name}: depth K ∈ {{{depth}}} × width G ∈ {{{width}}}"
        written = write_tables(rows, output, title=title, paper=paper)
        if any(r.ok for r in rows):
            trained_on = ""
            if train:
                t = base.train
                n = f"{limit_train} training images" if limit_train else "the full training set"
                trained_on = f"{dataset or t.dataset}, {epochs or t.epochs} epoch(s), {n}"
            written += bubble_chart(rows, output / "bubble", title=base.name, trained_on=trained_on)
        skipped = sum(not r.ok for r in rows)
        if skipped == len(rows):
            raise GndglError(f"no configuration compiled (every K × G was invalid for this network); the reasons "
                             f"are in {output / 'table.md'}")
        done = f"{len(rows) - skipped} configurations" + (f", {skipped} skipped (see table.md)" if skipped else "")
        console.print(f"{done}; wrote {', '.join(str(p) for p in written)}", highlight=False, markup=False)

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
