"""``gndgl train`` and ``gndgl eval``."""

from __future__ import annotations

import inspect
import json
import time
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import typer

from gndgl_compiler.errors import DistributedSetupError
from gndgl_compiler.runtime.run.report import format_summary

from .common import console, newest_run_noted, note_resolved
from .progress_display import TrainDisplay
from .train_start import compiled_on_the_fly, is_spec


def _launch(art, workers: int, opts, launch, replicas: int = 1) -> None:
    """Start ``replicas`` × ``workers`` local ranks (``python -m gndgl_compiler.worker``) and wait for them; the
    run's lifecycle (its config, a new run's directory, undoing a start the ranks refused) is
    ``runtime/run/lifecycle.py``'s."""
    from gndgl_compiler import load_artifact
    from gndgl_compiler.runtime.dist.launch import launch_local, worker_args
    from gndgl_compiler.runtime.dist.replicas import layout
    from gndgl_compiler.runtime.run.lifecycle import new_run, reserve_run, resume_run, undo_failed_start, with_run_dir
    from gndgl_compiler.runtime.run.preflight import check_config

    if opts.resume is not None:
        art = load_artifact(Path(opts.resume) / "artifact")
        config = resume_run(opts.resume, opts, world=workers, verify=False).config
    else:
        config = new_run(art, opts)
    check_config(config, opts.device)  # what every rank would refuse: before any rank starts
    layout(workers * replicas, replicas, 0, config.recipe.batch_size)
    owners = _owners(art, workers)
    copies = f"{replicas} replicas × " if replicas > 1 else ""
    console.print(f"launching {copies}{workers} workers: " + " · ".join(f"rank {r}: {len(v)} partitions"
                                                                        for r, v in owners.items()), highlight=False)
    owners = {g: owners[g % workers] for g in range(workers * replicas)}
    started = None
    if opts.resume is None:  # the ranks fill the directory made here; a start they refuse is undone here
        started = reserve_run(art.plan.name, opts.run_dir)
        opts = with_run_dir(opts, started)
    with undo_failed_start(started, (DistributedSetupError,)):  # a rank refused its input: nothing was trained
        launch_local(workers * replicas, worker_args(art.path, opts, launch), port=launch.port, partitions_of=owners)


def _owners(art, workers: int) -> dict[int, list[str]]:
    """The partitions of each of ``workers`` ranks (the plan placed for them), checked to fit the plan."""
    from gndgl_compiler.partition.placement import place

    n = len(art.plan.partitions)
    if workers > n:
        raise DistributedSetupError(f"--workers {workers} is more than the {n} partitions; use --workers {n} or fewer")
    if art.plan.schedule == "sequential":
        raise DistributedSetupError("the sequential schedule trains one module at a time; run it in one process "
                                    "(leave out --workers and --replicas)")
    place(art.plan, art.plan.devices, workers)
    owners: dict[int, list[str]] = {}
    for p in art.plan.partitions:
        owners.setdefault(p.worker, []).append(p.name)
    return owners


def option_parameters(classes: tuple[type, ...], names: tuple[str, ...] | None = None) -> list[inspect.Parameter]:
    """Typer parameters of the declared options of ``classes`` (``runtime/run/options.py``): every ``gndgl train``
    flag, or only those in ``names``."""
    from gndgl_compiler.runtime.run.options import declared

    params = []
    for cls in classes:
        for name, typ, default, opt in declared(cls):
            if not opt.cli or (names is not None and name not in names):
                continue
            bounds = {k: v for k, v in (("metavar", opt.metavar), ("min", opt.min), ("max", opt.max)) if v is not None}
            params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                            default=typer.Option(default, opt.flags, help=opt.help, **bounds),
                                            annotation=typ if default is not None else Optional[typ]))
    return params


def _option_parameters() -> list[inspect.Parameter]:
    """The command's options, one per declared training / launch / display option (``runtime/run/options.py``)."""
    from gndgl_compiler.runtime.run.options import DisplayOptions, LaunchOptions, TrainOptions

    return option_parameters((TrainOptions, LaunchOptions, DisplayOptions))


def _train(source: Optional[Path] = None, **options: Any) -> None:
    """Train a compiled artifact (or a spec, compiled on the fly); resumable."""
    from gndgl_compiler.runtime.run.options import DisplayOptions, LaunchOptions, TrainOptions, from_args

    opts, launch = from_args(TrainOptions, options), from_args(LaunchOptions, options)
    shown = from_args(DisplayOptions, options)
    source = source if source is not None or opts.resume is not None else Path("compiled")
    if opts.resume is None and is_spec(source):  # the spec first (before torch loads), then data, device, run dir
        with compiled_on_the_fly(source, opts) as art:
            _run(art, replace(opts, overrides=None), launch, shown)  # the overrides are in the compiled spec
        return
    from gndgl_compiler.runtime.run.preflight import check_device, check_new_run_dir, check_resume_source

    if opts.resume is not None:
        check_resume_source(source, opts.resume)
    if opts.device:
        check_device(opts.device)
    art = None
    if opts.resume is None:
        from gndgl_compiler import load_artifact

        check_new_run_dir(opts.run_dir)
        art = load_artifact(source)
        note_resolved(source, art.path)
    _run(art, opts, launch, shown)


def _run(art: Any, opts: Any, launch: Any, shown: Any) -> None:
    """Train ``art`` (None: resume ``opts.resume``) in this process or on ``--workers`` ranks."""
    from gndgl_compiler.runtime.train import train_artifact

    opts = replace(opts, overrides=opts.overrides or None)
    replicas = _replicas(art, opts, launch)
    if (launch.workers or 1) * replicas > 1:
        _launch(art, launch.workers or 1, opts, launch, replicas)
        return
    display = TrainDisplay(shown.progress_every)
    opts = replace(opts, on_log=display, on_progress=display.on_progress)
    t0 = time.time()
    with display.progress:
        try:
            summary = train_artifact(art if art is not None else Path("."), opts)
        finally:
            display.finish()  # the last, partial window: after a --max-steps stop, Ctrl-C or an error
    console.print(format_summary(summary, wall_s=time.time() - t0), highlight=False, markup=False, soft_wrap=True)


def _replicas(art: Any, opts: Any, launch: Any) -> int:
    """R: ``--replicas``, else the artifact's (or the resumed run's) ``placement.replicas``."""
    if launch.replicas:
        return launch.replicas
    if art is None:
        spec_json = Path(opts.resume) / "artifact" / "spec.json"
        if not spec_json.is_file():  # not a run directory: resuming it says so, with what to do
            return 1
        from gndgl_compiler.artifact import read_json
        spec = read_json(spec_json.parent, "spec.json")
    else:
        spec = art.spec
    return int(spec.get("placement", {}).get("replicas", 1))


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
        limit_test: Optional[int] = typer.Option(None, "--limit-test", metavar="N", min=1,
                                                 help="Use only N test images."),
        as_json: bool = typer.Option(False, "--json", help="Print JSON."),
    ) -> None:
        """Test accuracy (final head, layerwise ensemble, each partition) of a finished or partial run."""
        from gndgl_compiler.runtime.evaluation.evaluate import evaluate_run
        run = run if run is not None else newest_run_noted("weights")
        ev = evaluate_run(run, device=device, limit_test=limit_test)
        if as_json:
            print(json.dumps(ev, indent=1))
            return
        console.print(f"{run} ({ev['source']}, {ev['n']} test images): test accuracy "
                      f"[bold]{100 * ev['test_acc']:.2f}%[/]"
                      f" · layerwise ensemble {100 * ev['ensemble_acc']:.2f}%", highlight=False)
        for name, acc in ev["partition_acc"].items():
            console.print(f"  {name:10s} {100 * acc:6.2f}%", highlight=False)
