"""``gndgl sweep``: compile (and train) every K × G variant of a spec; tables and a chart.

Its training options are ``gndgl train``'s, declared once in ``runtime/run/options.py``
(:data:`SWEEP_TRAIN_OPTIONS` names which); ``--seeds 0,1,2`` trains each variant once per seed and
reports the mean ± sample standard deviation per cell.
"""

from __future__ import annotations

import contextlib
import inspect
from pathlib import Path
from typing import Any, Optional

import typer

from gndgl_compiler.errors import GndglError

from .common import console
from .progress_display import TrainDisplay
from .train_cmd import option_parameters

SWEEP_TRAIN_OPTIONS = ("epochs", "dataset", "device", "batch_size", "lr", "max_steps", "limit_train", "limit_test",
                       "overrides")
"""The ``gndgl train`` options a sweep takes (``overrides`` = ``--set``, applied to the base spec)."""


def _trained_on(base: Any, opts: dict[str, Any], seeds: list[int] | None) -> str:
    """The chart's note on what the accuracies were trained on."""
    t = base.train
    n = f"{opts['limit_train']} training images" if opts.get("limit_train") else "the full training set"
    steps = f", at most {opts['max_steps']} steps" if opts.get("max_steps") else ""
    over = f", mean of seeds {','.join(map(str, seeds))}" if seeds else ""
    return f"{opts.get('dataset') or t.dataset}, {opts.get('epochs') or t.epochs} epoch(s){steps}, {n}{over}"


def _sweep(spec: Path, depth: str, width: str, output: Path, train: bool, seeds: Optional[str],
           progress_every: float, **options: Any) -> None:
    """Compile (and optionally train) every K × G variant of a spec: Tables 4/5-style tables, a Figure 3 chart."""
    from gndgl_compiler.spec.load import load_spec
    from gndgl_compiler.sweep import parse_ints, run_sweep
    from gndgl_compiler.viz.bubble import bubble_chart
    from gndgl_compiler.viz.tables import paper_reference, write_tables

    depths, widths = parse_ints(depth, "--depth"), parse_ints(width, "--width")
    seed_list = parse_ints(seeds, "--seeds", minimum=0) if seeds is not None else None
    overrides = options.pop("overrides") or None
    given = [f"--{k.replace('_', '-')}" for k, v in options.items() if v is not None]
    if not train and (given or seed_list):
        raise GndglError(f"{', '.join(given + (['--seeds'] if seed_list else []))} only apply when the sweep "
                         "trains: add --train")
    base = load_spec(spec, overrides=overrides)
    paper = paper_reference(base.model_dump(mode="json"))
    display = TrainDisplay(progress_every)
    opts = {**options, "on_log": display, "on_progress": display.on_progress}

    def log(line: str) -> None:
        display.finish()
        console.print(line, highlight=False, markup=False, soft_wrap=True)

    with display.progress if train else contextlib.nullcontext():
        rows = run_sweep(spec, depths, widths, train=train, out_dir=output, train_options=opts, log=log,
                         seeds=seed_list, overrides=overrides)
    title = f"{base.name}: depth K ∈ {{{depth}}} × width G ∈ {{{width}}}"
    written = write_tables(rows, output, title=title, paper=paper)
    if any(r.ok for r in rows):
        trained_on = _trained_on(base, options, seed_list) if train else ""
        written += bubble_chart(rows, output / "bubble", title=base.name, trained_on=trained_on)
    skipped = sum(not r.ok for r in rows)
    if skipped == len(rows):
        raise GndglError(f"no configuration compiled (every K × G was invalid for this network); the reasons "
                         f"are in {output / 'table.md'}")
    done = f"{len(rows) - skipped} configurations" + (f", {skipped} skipped (see table.md)" if skipped else "")
    console.print(f"{done}; wrote {', '.join(str(p) for p in written)}", highlight=False, markup=False)


def register(app: typer.Typer) -> None:
    """Add ``sweep`` to ``app``."""
    from gndgl_compiler.runtime.run.options import DisplayOptions, TrainOptions

    def sweep(*args: Any, **kw: Any) -> None:
        return _sweep(*args, **kw)

    P = inspect.Parameter
    own = [
        P("spec", P.POSITIONAL_OR_KEYWORD, annotation=Path, default=typer.Argument(..., help="Base spec file.")),
        P("depth", P.KEYWORD_ONLY, annotation=str,
          default=typer.Option("1,2,4,8,16", "--depth", help="Values of K, comma-separated.")),
        P("width", P.KEYWORD_ONLY, annotation=str,
          default=typer.Option("1,2,4,8", "--width", help="Values of G, comma-separated.")),
        P("output", P.KEYWORD_ONLY, annotation=Path,
          default=typer.Option(Path("sweep"), "-o", "--output", help="Output directory.")),
        P("train", P.KEYWORD_ONLY, annotation=bool,
          default=typer.Option(False, "--train", help="Also train every configuration (slow).")),
        P("seeds", P.KEYWORD_ONLY, annotation=Optional[str],
          default=typer.Option(None, "--seeds", metavar="0,1,2", help="With --train: train each configuration once "
                                                                     "per seed; tables show mean ± std.")),
    ]
    params = own + option_parameters((TrainOptions,), SWEEP_TRAIN_OPTIONS) + option_parameters((DisplayOptions,))
    sweep.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    sweep.__annotations__ = {p.name: p.annotation for p in params}
    sweep.__doc__ = _sweep.__doc__
    app.command("sweep")(sweep)
