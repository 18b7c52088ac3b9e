"""``gndgl train`` and ``gndgl eval``."""

from __future__ import annotations

import inspect
import json
import time
from pathlib import Path
from typing import Any, Optional

import typer
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from gndgl_compiler.errors import DistributedSetupError
from gndgl_compiler.runtime.progress import ProgressEvent
from gndgl_compiler.runtime.report import format_summary

from .common import console, note_resolved
from .compile_cmd import default_output, print_final_head


class _Display:
    """Training progress on the console.

    On a terminal: a bar for the steps of the epoch and one for the whole run, each with its
    ETA, plus loss, images/s and learning rate, redrawn 4 times a second by rich's thread (a
    step only sets numbers: no device sync). In a pipe or log: one line per log record. An
    evaluated epoch prints one line either way.
    """

    def __init__(self) -> None:
        self.live = console.is_terminal
        self.progress = Progress(TextColumn("[bold]{task.description:<12}"), BarColumn(bar_width=24),
                                 MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                 console=console, transient=False, disable=not self.live, refresh_per_second=4)
        self.epoch_task = self.progress.add_task("epoch", total=None, info="", visible=False)
        self.run_task = self.progress.add_task("run", total=None, info="", visible=False)
        self.other_task = self.progress.add_task("", total=None, info="", visible=False)
        self.step_recs: list[dict] = []
        self.info = ""

    def on_progress(self, ev: ProgressEvent) -> None:
        """Update the bars from a :class:`ProgressEvent` (cheap: called every step)."""
        if ev.phase == "train":
            self.progress.update(self.epoch_task, description=f"epoch {ev.epoch + 1}/{ev.epochs}", completed=ev.done,
                                 total=ev.total, visible=True, info=self.info)
            self.progress.update(self.run_task, completed=ev.step, total=ev.steps, visible=True, info="")
            self.progress.update(self.other_task, visible=False)
        else:
            label = "test" if ev.phase == "eval" else "decoding"
            self.progress.update(self.other_task, description=label, completed=ev.done, total=ev.total,
                                 visible=ev.total is None or ev.done < ev.total, info="")

    def __call__(self, rec: dict) -> None:
        if rec["kind"] == "note":
            console.print(rec["text"], highlight=False, markup=False, soft_wrap=True)
        elif rec["kind"] == "train":
            if self.step_recs and self.step_recs[-1]["step"] != rec["step"]:
                self._flush()
            self.step_recs.append(rec)
        elif rec["kind"] == "setup":
            console.print(rec["text"], highlight=False, markup=False)
        elif rec["kind"] == "eval":
            self._flush()
            by_module: dict[str, list[float]] = {}
            for name, acc in rec["partition_acc"].items():
                by_module.setdefault(name.split(".")[0], []).append(acc)
            local = " ".join(f"{m}:{100 * sum(v) / len(v):.1f}" for m, v in by_module.items())
            console.print(f"epoch {rec['epoch'] + 1}: test {100 * rec['test_acc']:.2f}% · ensemble "
                          f"{100 * rec['ensemble_acc']:.2f}% · local {local} · {rec['wall_s']:.0f}s", highlight=False)

    def finish(self) -> None:
        """Show the records not shown yet (the last window before a --max-steps stop)."""
        self._flush()

    def _flush(self) -> None:
        if not self.step_recs:
            return
        r = self.step_recs[0]
        loss = sum(x["loss"] for x in self.step_recs) / len(self.step_recs)
        self.info = f"loss {loss:.3f} · {r['images_per_s']:.0f} img/s · lr {r['lr']:.3g}"
        self.progress.update(self.epoch_task, info=self.info)
        if not self.live:
            console.print(f"epoch {r['epoch'] + 1} step {r['step']}: {self.info}", highlight=False)
        self.step_recs = []


def _launch(art, workers: int, opts, launch) -> None:
    """Start ``workers`` local ranks (``python -m gndgl_compiler.worker``) and wait for them."""
    from gndgl_compiler.partition.placement import place
    from gndgl_compiler.runtime.launch import launch_local, worker_args

    from gndgl_compiler import load_artifact

    if opts.resume is not None:
        from gndgl_compiler.runtime.run_dir import check_resume_world
        check_resume_world(opts.resume, workers)
        art = load_artifact(Path(opts.resume) / "artifact")
    n = len(art.plan.partitions)
    if workers > n:
        raise DistributedSetupError(f"--workers {workers} is more than the {n} partitions; use --workers {n} or fewer")
    place(art.plan, art.plan.devices, workers)
    owners: dict[int, list[str]] = {}
    for p in art.plan.partitions:
        owners.setdefault(p.worker, []).append(p.name)
    console.print(f"launching {workers} workers: " + " · ".join(f"rank {r}: {len(v)} partitions"
                                                               for r, v in owners.items()), highlight=False)
    fresh = False
    if opts.resume is None:  # the run directory is made here, so a start that fails can be undone here
        from gndgl_compiler.runtime.run_dir import new_run_dir
        fresh = not (opts.run_dir and Path(opts.run_dir).exists())
        opts.run_dir = str(new_run_dir(art.plan.name, opts.run_dir))
    try:
        launch_local(workers, worker_args(art.path, opts, launch), port=launch.port, partitions_of=owners)
    except DistributedSetupError:  # a rank refused its input: nothing was trained
        if opts.resume is None:
            from gndgl_compiler.runtime.run_dir import discard_unstarted
            discard_unstarted(Path(opts.run_dir), fresh)
        raise


def _option_parameters() -> list[inspect.Parameter]:
    """The command's options, one per declared training / launch option (``runtime/options.py``)."""
    from gndgl_compiler.runtime.options import LaunchOptions, TrainOptions, declared

    params = []
    for cls in (TrainOptions, LaunchOptions):
        for name, typ, default, opt in declared(cls):
            if not opt.cli:
                continue
            bounds = {k: v for k, v in (("metavar", opt.metavar), ("min", opt.min), ("max", opt.max)) if v is not None}
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                            default=typer.Option(default, opt.flags, help=opt.help, **bounds),
                                            annotation=typ if default is not None else Optional[typ]))
    return params


def _train(source: Optional[Path] = None, **options: Any) -> None:
    """Train a compiled artifact (or a spec, compiled on the fly); resumable."""
    from gndgl_compiler.runtime.options import LaunchOptions, TrainOptions, from_args

    opts, launch = from_args(TrainOptions, options), from_args(LaunchOptions, options)
    if source is None and opts.resume is None:
        source = Path("compiled")
    art = None
    if opts.resume is None:
        assert source is not None
        if source.is_file() or source.suffix in (".yaml", ".yml"):
            out = default_output(source)
            from gndgl_compiler.spec import load_spec

            spec = load_spec(source, overrides=opts.overrides)  # a bad spec is reported before torch is imported
            from gndgl_compiler import compile_spec

            with console.status(f"compiling {source} → {out}/"):
                art = compile_spec(spec, out)
            console.print(f"compiled {source} → {out}/", highlight=False, markup=False)
            print_final_head(art)
            opts.overrides = None  # already in the compiled spec
        else:
            from gndgl_compiler import load_artifact
            art = load_artifact(source)
            note_resolved(source, art.path)
    opts.overrides = opts.overrides or None
    if launch.workers is not None and launch.workers > 1:
        _launch(art, launch.workers, opts, launch)
        return
    from gndgl_compiler.runtime.train import train_artifact

    display = _Display()
    opts.on_log, opts.on_progress = display, display.on_progress
    t0 = time.time()
    with display.progress:
        summary = train_artifact(art if art is not None else Path("."), opts)
        display.finish()
    console.print(format_summary(summary, wall_s=time.time() - t0), highlight=False, markup=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    """Add ``train`` and ``eval`` to ``app``."""

    def train(*args: Any, **kw: Any) -> None:
        return _train(*args, **kw)

    source = inspect.Parameter("source", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=Optional[Path],
                               default=typer.Argument(None, help="Compiled artifact directory or a spec (.yaml) to "
                                                                 "compile on the fly."))
    train.__signature__ = inspect.Signature([source, *_option_parameters()])  # type: ignore[attr-defined]
    train.__annotations__ = {p.name: p.annotation for p in train.__signature__.parameters.values()}
    train.__doc__ = _train.__doc__
    app.command("train")(train)

    @app.command("eval")
    def eval_(
        run: Optional[Path] = typer.Argument(None, help="Run directory made by 'gndgl train'; default: the newest "
                                                        "in ./runs."),
        device: Optional[str] = typer.Option(None, "--device", metavar="DEVICE", help="Device to evaluate on."),
        limit_test: Optional[int] = typer.Option(None, "--limit-test", metavar="N", min=1, help="Use only N test images."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Test accuracy (final head, layerwise ensemble, each partition) of a finished or partial run."""
        from gndgl_compiler.runtime.evaluate import evaluate_run
        from gndgl_compiler.runtime.run_dir import latest_run

        run = run if run is not None else latest_run()
        ev = evaluate_run(run, device=device, limit_test=limit_test)
        if as_json:
            print(json.dumps(ev, indent=1))
            return
        console.print(f"{run} ({ev['source']}, {ev['n']} test images): test accuracy [bold]{100 * ev['test_acc']:.2f}%[/]"
                      f" · layerwise ensemble {100 * ev['ensemble_acc']:.2f}%", highlight=False)
        for name, acc in ev["partition_acc"].items():
            console.print(f"  {name:10s} {100 * acc:6.2f}%", highlight=False)
