"""Distributed worker entry point: ``torchrun --nproc-per-node N -m gndgl_compiler.worker compiled/``.

``gndgl train compiled/ --workers N`` starts N of these itself (same code path).
Each rank builds only the partitions placed on it (placement re-balanced for the
world size without recompiling), trains them, and checkpoints them in step with
the other ranks; rank 0 evaluates and writes the run directory's summary. Under
``torchrun --max-restarts K`` a restarted rank continues the run of its ``--run-dir`` by itself
(``runtime/dist/elastic.py``); a run resumed on another number of ranks is re-placed
(``runtime/checkpoint/replace.py``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

import torch

from .errors import DataError, DeviceError, DistributedSetupError, GndglError, RunError
from .runtime.run.options import LaunchOptions, TrainOptions, from_args, worker_parser
from .runtime.run.report import format_summary


def _parser() -> argparse.ArgumentParser:
    """The worker's flags: the training options of ``gndgl train`` that a rank takes (``runtime/run/options.py``)."""
    return worker_parser("python -m gndgl_compiler.worker", __doc__.splitlines()[0])


def _encode(text: str, size: int) -> torch.Tensor:
    """``text`` as UTF-8 bytes in a zero-padded uint8 tensor of ``size`` (cut to fit)."""
    buf = torch.zeros(size, dtype=torch.uint8)
    raw = text.encode()[:size]
    buf[: len(raw)] = torch.tensor(list(raw), dtype=torch.uint8)
    return buf


def _decode(buf: torch.Tensor) -> str:
    return bytes(buf[buf != 0].tolist()).decode(errors="replace")


def _share_run_dir(rank: int, path: str | None) -> str:
    """Rank 0's run directory name, broadcast to all ranks as bytes (no pickling)."""
    import torch.distributed as dist

    buf = _encode(path or "", 1024) if rank == 0 else torch.zeros(1024, dtype=torch.uint8)
    dist.broadcast(buf, 0)
    return _decode(buf)


def _gather_text(text: str, world: int) -> list[str]:
    """Every rank's ``text``, in rank order, on every rank (as bytes, no pickling)."""
    import torch.distributed as dist

    bufs = [torch.zeros(2048, dtype=torch.uint8) for _ in range(world)]
    dist.all_gather(bufs, _encode(text, 2048))
    return [_decode(b) for b in bufs]


def run_worker(args: argparse.Namespace, rank: int, world: int, transport=None) -> dict:
    """Train this rank's partitions; returns rank 0's run summary (others: a short record).
    ``transport``, if given, wraps this rank's PeerComm (``transport(comm) -> Transport``; see :func:`main`)."""
    from .api import load_artifact
    from .runtime.dist.context import DistContext
    from .runtime.dist.peer import PeerComm, barrier
    from .runtime.run.directory import read_run_config
    from .runtime.run.lifecycle import make_run, new_run, resume_run, undo_failed_start
    from .runtime.train import Trainer

    from .runtime.dist.replicas import GradAverager, layout, stage_groups

    opts = replace(from_args(TrainOptions, args), tensorboard=False)
    if opts.threads:
        torch.set_num_threads(opts.threads)
    replicas = _replicas(args)
    world, global_world = world // replicas, world  # from here on ``world``: the ranks of one pipeline
    started = None  # the run directory rank 0 made for a new run (undone if the start fails on bad input)
    if opts.resume:
        run = resume_run(opts.resume, opts, world=world, verify=False)
        run_dir, config = run.run_dir, run.config
        barrier()  # every rank has read run.json before rank 0 records the changes
        note = run.record() if rank == 0 else None
        if note:
            print(note, flush=True)
    else:
        if rank == 0:
            src = load_artifact(args.artifact, verify=True)
            started = make_run(src, new_run(src, opts), opts.run_dir, world=world)
        run_dir = Path(_share_run_dir(rank, str(started.run_dir) if started else None))
        barrier()
        config = read_run_config(run_dir, opts)
    grid = layout(global_world, replicas, rank, config.recipe.batch_size)
    art = load_artifact(run_dir / "artifact", workers=world, rank=grid.stage)
    _check_world(art.plan, world)
    device = _device(opts, art.plan)
    column = stage_groups(grid, torch.device(device).type)
    comm = PeerComm(art.plan, grid.stage, config.recipe.batch_size // replicas, torch.device(device),
                    dtype=torch.float32, offset=grid.offset)
    comm = transport(comm) if transport is not None else comm
    ctx = DistContext(grid.stage, world, comm, run_dir, grid, GradAverager(column, replicas) if column else None,
                      bn_group=column if config.recipe.sync_bn else None)
    printer = _RecordPrinter()
    with undo_failed_start(started, (RunError, DataError, DeviceError)):  # as if never started
        trainer = Trainer(art, config, run_dir, ctx, device=device, on_log=printer if rank == 0 else None)
    setup = _gather_text(ctx.setup_text(trainer.ex), global_world)  # which modules each rank runs sibling-fused
    if rank == 0:
        print("\n".join(setup), flush=True)
    try:
        summary = trainer.fit()
    finally:
        printer.finish()
    summary["bytes_sent"] = comm.bytes_sent
    return summary


def _replicas(args: argparse.Namespace) -> int:
    """R: ``--replicas``, else the artifact's ``placement.replicas`` (1 when unset)."""
    if args.replicas:
        return args.replicas
    from .artifact import find_artifact, read_json

    art_dir = Path(args.resume) / "artifact" if args.resume else find_artifact(args.artifact)
    return int(read_json(art_dir, "spec.json").get("placement", {}).get("replicas", 1))


def _check_world(plan, world: int) -> None:
    """Raise :class:`DistributedSetupError` if ``plan`` cannot train on ``world`` ranks."""
    n_parts = len(plan.partitions)
    if world > n_parts:
        raise DistributedSetupError(f"{world} workers for {n_parts} partitions: every worker needs at least one; "
                                    f"use --workers {n_parts} or fewer")
    if plan.schedule == "sequential":
        raise DistributedSetupError("the sequential schedule trains one module at a time; run it in one process")


def _device(opts: TrainOptions, plan) -> str:
    """This rank's device: ``--device``, else its local GPU when the plan is on CUDA, else the CPU."""
    if opts.device:
        return opts.device
    if torch.cuda.is_available() and any(d.startswith("cuda") for d in plan.devices):
        return f"cuda:{int(os.environ.get('LOCAL_RANK', 0)) % torch.cuda.device_count()}"
    return "cpu"


class _RecordPrinter:
    """Rank 0's console: notes, one line per log window (the mean loss of rank 0's partitions; the
    last, partial window too) and one per evaluated epoch."""

    def __init__(self) -> None:
        self.window: list[dict] = []

    def __call__(self, rec: dict) -> None:
        if rec["kind"] == "note":
            print(rec["text"], flush=True)
        elif rec["kind"] == "train":
            if self.window and self.window[-1]["step"] != rec["step"]:
                self.finish()
            self.window.append(rec)
        elif rec["kind"] == "eval":
            self.finish()
            print(f"epoch {rec['epoch'] + 1}: test {100 * rec['test_acc']:.2f}% · ensemble "
                  f"{100 * rec['ensemble_acc']:.2f}% · {rec['wall_s']:.0f}s", flush=True)

    def finish(self) -> None:
        """Print the window not printed yet."""
        if not self.window:
            return
        r, n = self.window[0], len(self.window)
        loss = sum(x["loss"] for x in self.window) / n
        print(f"epoch {r['epoch'] + 1} step {r['step']}: loss {loss:.3f} (rank 0's {n} partitions) · "
              f"{r['images_per_s']:.0f} img/s · lr {r['lr']:.3g}", flush=True)
        self.window = []


def _wants_cuda(args: argparse.Namespace) -> bool:
    """Whether the ranks will train on CUDA (NCCL) rather than the CPU (gloo), read from the plan."""
    if args.device:
        return args.device.startswith("cuda")
    from .artifact import read_plan

    art_dir = Path(args.resume) / "artifact" if args.resume else Path(args.artifact)
    try:
        devices = read_plan(art_dir).devices
    except GndglError:
        return False
    return torch.cuda.is_available() and any(str(d).startswith("cuda") for d in devices)


def preflight(args: argparse.Namespace, world: int) -> None:
    """What every rank would refuse, checked before it joins the others (``runtime/run/preflight.py``): the
    artifact (or the run to resume and no other artifact), ``--run-dir``, the data set, ``--data-root``
    and ``--device``. A bad one then ends every rank at once with the same message, never in a rendezvous.

    Raises:
        GndglError: what is wrong and what to do (exit status 2).
    """
    from .artifact import find_artifact, read_json, read_manifest, read_plan
    from .runtime.run.config import new_run_config
    from .runtime.run.lifecycle import resume_run
    from .runtime.run.preflight import check_config, check_new_run_dir, check_resume_source

    opts = from_args(TrainOptions, args)
    if opts.resume:
        given = None if args.artifact == "compiled" else args.artifact  # the default: not typed
        check_resume_source(given, opts.resume, own=Path(opts.resume) / "artifact")
        config = resume_run(opts.resume, opts, world=world, verify=False).config
        art_dir = Path(opts.resume) / "artifact"
    else:
        check_new_run_dir(opts.run_dir)
        art_dir = find_artifact(args.artifact)
        read_manifest(art_dir, verify=False)
        config = new_run_config(read_json(art_dir, "spec.json")["train"], opts)
    from .runtime.dist.replicas import layout

    grid = layout(world, _replicas(args), 0, config.recipe.batch_size)
    _check_world(read_plan(art_dir), grid.stages)
    check_config(config, opts.device)


def _elastic(args: argparse.Namespace, rank: int) -> None:
    """Under torchrun: the run directory from the launch arguments, and on a restart the run continued
    from its last committed checkpoint (``runtime/dist/elastic.py``); rank 0 says so."""
    from .runtime.dist.elastic import RESTART_ENV, elastic_resume, restart_count

    if RESTART_ENV not in os.environ or args.resume or (args.run_dir and not restart_count(os.environ)):
        return  # not under torchrun, or a first attempt with its run directory given: nothing to find
    from .artifact import find_artifact, read_plan

    try:
        name = read_plan(find_artifact(args.artifact)).name
    except GndglError:  # preflight reports a bad artifact
        return
    note = elastic_resume(args, name)
    if note and rank == 0:
        print(note, flush=True)


def _report(rank: int, err: GndglError, shown: bool = True) -> None:
    """Print a rank's error (``shown``) and leave it where torchrun reads a failed rank's message (its
    ``TORCHELASTIC_ERROR_FILE``), so torchrun's failure report repeats it instead of a link to its docs."""
    from . import fsio

    text = f"rank {rank}: {'error: ' if err.is_error else ''}{err}"
    if shown:
        print(text, file=sys.stderr, flush=True)
    path = os.environ.get("TORCHELASTIC_ERROR_FILE")
    if path:
        try:
            fsio.atomic_write_json(Path(path), {"message": {"message": text, "extraInfo": {  # torchrun's layout
                "py_callstack": text, "timestamp": str(int(time.time()))}}})
        except GndglError:  # the report is a courtesy: the exit status and the line above say it all
            pass


def main(argv: list[str] | None = None, transport=None) -> int:
    """Entry point of one rank; returns the exit code. ``transport`` wraps the rank's PeerComm
    (``transport(comm) -> Transport``): a module that calls ``main(transport=...)`` and is run as
    ``GNDGL_WORKER_MODULE`` (``runtime/dist/launch.py``) injects a transport (tests/fault_worker.py injects faults
    so)."""
    from .runtime.dist.peer import init_process_group

    args = _parser().parse_args(argv)
    rank = int(os.environ.get("RANK", "0"))
    try:
        _elastic(args, rank)
        preflight(args, int(os.environ.get("WORLD_SIZE", "1")))
    except GndglError as err:  # the same on every rank of a node: one of them says it
        _report(rank, err, shown=os.environ.get("LOCAL_RANK", "0") == "0")
        return err.exit_code
    try:
        rank, world = init_process_group(from_args(LaunchOptions, args).timeout, use_cuda=_wants_cuda(args))
        summary = run_worker(args, rank, world, transport)
        if rank == 0:
            print(json.dumps({k: v for k, v in summary.items() if k != "history"}) if args.json
                  else format_summary(summary), flush=True)
        code = 0
    except GndglError as err:
        _report(rank, err)
        code = err.exit_code
    except KeyboardInterrupt:
        code = 130
    except Exception as exc:  # a peer died or timed out: torch raises RuntimeError / DistBackendError
        print(f"rank {rank}: distributed failure: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}",
              file=sys.stderr, flush=True)
        code = 1
    finally:
        import torch.distributed as dist
        if dist.is_initialized():
            try:
                dist.destroy_process_group()
            except Exception:  # noqa: BLE001 - best effort on the way out
                pass
    return code


if __name__ == "__main__":
    sys.exit(main())
