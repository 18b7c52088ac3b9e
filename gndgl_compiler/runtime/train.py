"""``train_artifact``: the training entry point (one process).

    load artifact ─▶ data on device ─▶ executor ─▶ for epoch, step:
        lr = lr_at(step) ; stats = executor.train_step(x, y, lr)
        every log_every: metrics.jsonl + progress      every checkpoint_every: checkpoint
        end of epoch: evaluate (final head, ensemble, partitions) + checkpoint
    ─▶ weights.safetensors + summary.json

A run killed at any point resumes from its last checkpoint (``resume=run_dir``)
and ends with the same weights as an uninterrupted run on CPU: data order and
augmentation are functions of (seed, epoch, step), and RNG, optimizer and BN
states are checkpointed.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from .. import fsio
from ..api import Artifact, load_artifact
from ..artifact import load_state_tensors, state_tensors
from ..errors import DataError, DeviceError, GndglError, RunError
from .checkpoint import save_checkpoint
from .checkpoint_dir import prune_checkpoints
from .rng import rng_state, set_rng_state
from .data import Batches, load_dataset, steps_per_epoch
from .dist_checkpoint import (commit_checkpoint, committed_checkpoint, gather_modules, gather_tensors,
                              merge_rank_metrics, metrics_dir)
from .executor import Executor
from .metrics import MetricsLogger, check_finite, log_records, truncate_metrics, write_metrics_csv
from .resume import resume_config, run_lr, scale_schedule
from .progress import ProgressEvent, ProgressFn, counted
from .devices import _synthetic_like, guard_oom, resolve_devices  # noqa: F401  (re-exported)
from .evaluate import evaluate_run  # noqa: F401  (re-exported)
from .run_dir import (DATA_RECORD, _discard_unstarted, _load_run_artifact, _new_run_dir,  # noqa: F401
                      _usable_checkpoint, check_resume_world, latest_run, read_run_record, run_weights,
                      write_run_record)
from .signals import Interrupted, StopFlag


@dataclass
class TrainOptions:
    """Overrides of the spec's ``train`` section and run settings (None = keep the spec's)."""

    epochs: int | None = None
    dataset: str | None = None
    data_root: str | None = None
    download: bool = False
    device: str | None = None
    """Put every partition on this device (overrides the placement)."""
    batch_size: int | None = None
    lr: float | None = None
    seed: int | None = None
    fused: bool | None = None
    fuse_siblings: bool | None = None
    """Sibling fusion (see ``Train.fuse_siblings``); a checkpoint of either setting resumes with the other."""
    amp: str | None = None
    channels_last: str | None = None
    log_every: int | None = None
    checkpoint_every: int | None = None
    run_dir: str | None = None
    resume: str | None = None
    limit_train: int | None = None
    limit_test: int | None = None
    max_steps: int | None = None
    """Stop after this many global steps (for smoke tests)."""
    overrides: list[str] | None = None
    """``"train.a.b=VALUE"`` changes of the artifact's ``train`` section (``--set``), validated like a spec."""
    eval_every_epoch: bool = True
    tensorboard: bool | None = None
    keep_checkpoints: int = 2
    on_log: Callable[[dict], None] | None = field(default=None, repr=False)
    """Called with every metrics record (and, flagged ``partial``, the last window before a stop)."""
    on_progress: ProgressFn | None = field(default=None, repr=False)
    """Called with a :class:`ProgressEvent` per step, test batch and decoded chunk (host data only)."""


def _merge(spec_train: dict, o: TrainOptions) -> dict:
    """The spec's ``train`` section with the options applied.

    Overriding ``epochs`` keeps the recipe's shape: the warm-up and the multistep milestones
    scale with the run length (160 epochs with 10 of warm-up run as 16 with 1).
    """
    cfg = json.loads(json.dumps(spec_train))
    if o.overrides:
        from ..spec.overrides import override_train
        cfg = override_train(cfg, o.overrides)
    if o.epochs is not None and o.epochs != cfg["epochs"]:
        cfg["schedule"] = scale_schedule(cfg["schedule"], o.epochs / cfg["epochs"])
    cfg.setdefault("fuse_siblings", True)  # runs recorded before the setting existed
    for key in ("epochs", "dataset", "data_root", "batch_size", "seed", "fused", "fuse_siblings", "amp",
                "channels_last", "log_every", "checkpoint_every"):
        val = getattr(o, key)
        if val is not None:
            cfg[key] = val
    if o.lr is not None:
        cfg["optimizer"]["lr"] = o.lr
    return cfg


def train_artifact(source: str | Path | Artifact, opts: TrainOptions | None = None) -> dict[str, Any]:
    """Train a compiled artifact (or resume a run) and return the run summary.

    Args:
        source: artifact directory or loaded :class:`Artifact` (ignored when resuming:
            the run directory holds its own copy of the artifact).
        opts: overrides and run settings.

    Returns:
        The summary written to ``summary.json`` (accuracies, wall time, run_dir).

    Raises:
        GndglError: bad data, devices, a non-finite loss, out of memory, unwritable run dir.
    """
    opts = opts or TrainOptions()
    if opts.resume:
        run_dir = Path(opts.resume)
        saved = check_resume_world(run_dir, 1)
        art = _load_run_artifact(run_dir, saved)
        cfg, notes = resume_config(run_dir, saved, opts, sequential=art.plan.schedule == "sequential")
        if notes:
            write_run_record(run_dir, saved)
            if opts.on_log:
                opts.on_log({"kind": "note", "text": "resume: " + "; ".join(notes)})
        device = saved.get("device")
    else:
        art = source if isinstance(source, Artifact) else load_artifact(source)
        cfg = _merge(art.spec["train"], opts)
        resolve_devices(art, opts.device)  # fail before anything is written
        fresh = not Path(opts.run_dir).exists() if opts.run_dir else True
        run_dir = _new_run_dir(art.plan.name, opts.run_dir)
        if art.path is not None:
            shutil.copytree(art.path, run_dir / "artifact")
        device = opts.device
        cfg.setdefault("limit_train", opts.limit_train)
        cfg.setdefault("limit_test", opts.limit_test)
        write_run_record(run_dir, {"config": cfg, "device": device, "world": 1, "source": str(art.path)})
        try:
            return _run(art, cfg, run_dir, device, opts)
        except (RunError, DataError, DeviceError):
            _discard_unstarted(run_dir, fresh)
            raise
    return _run(art, cfg, run_dir, device, opts)


@dataclass
class DistContext:
    """This process's place in a distributed run (rank 0 of 1 for a single process)."""

    rank: int = 0
    world: int = 1
    comm: Any = None


def _run(art: Artifact, cfg: dict, run_dir: Path, device: str | None, opts: TrainOptions,
         ctx: DistContext | None = None) -> dict[str, Any]:
    ctx = ctx or DistContext()
    plan = art.plan
    devices = resolve_devices(art, device)
    own = [p.id for p in plan.partitions if p.id in art.modules]
    first_dev = devices[own[0]]
    on_cuda = first_dev.type == "cuda"
    amp = cfg["amp"] == "bf16" or (cfg["amp"] == "auto" and on_cuda)
    channels_last = cfg["channels_last"] == "on" or (cfg["channels_last"] == "auto" and on_cuda)
    data = load_dataset(cfg["dataset"], root=cfg.get("data_root"), download=opts.download,
                        input_shape=tuple(plan.input_shape), limit_train=cfg.get("limit_train"),
                        limit_test=cfg.get("limit_test"), synthetic=_synthetic_like(plan),
                        progress=opts.on_progress)
    if data.num_classes != plan.num_classes:
        raise RunError(f"data set '{cfg['dataset']}' has {data.num_classes} classes but the network was "
                            f"compiled for {plan.num_classes}; set model.num_classes: {data.num_classes} and recompile")
    data = data.to(first_dev)
    if ctx.rank == 0:  # what inference needs to feed the trained net (load_run, gndgl export)
        fsio.atomic_write_text(run_dir / DATA_RECORD, json.dumps({
            "dataset": cfg["dataset"], "mean": list(data.mean), "std": list(data.std), "classes": list(data.classes),
            "input_shape": list(plan.input_shape), "num_classes": plan.num_classes}, indent=1))
    torch.manual_seed(cfg["seed"])
    ex = Executor(plan, art.modules, cfg["optimizer"], devices, fused=cfg["fused"], amp=amp,
                  channels_last=channels_last, denorm=(data.mean, data.std),
                  siblings=cfg.get("fuse_siblings", True) and ctx.world == 1)
    ex.comm = ctx.comm
    if opts.on_log and ctx.rank == 0:
        opts.on_log({"kind": "setup", "fusion": ex.fusion,
                     "text": ex.fusion_summary() if ctx.world == 1 else "distributed: every module runs per partition"})
    bs = cfg["batch_size"]
    spe = steps_per_epoch(len(data.train_y), bs)
    if spe == 0:
        raise RunError(f"batch size {bs} is larger than the {len(data.train_y)} training images; use a smaller "
                            "--batch-size")
    modules = sorted({p.module for p in plan.partitions})
    phases = [None] if plan.schedule == "parallel" else [
        {p.id for p in plan.partitions if p.module == m} for m in modules]
    epochs = cfg["epochs"]
    total_epochs = epochs * len(phases)
    ckpt_root = run_dir / "checkpoints"
    ckpt_dir = ckpt_root / f"rank{ctx.rank}" if ctx.world > 1 else ckpt_root
    epoch, start_step, gstep, history, window = 0, 0, 0, [], None
    if ctx.world > 1:
        loaded = committed_checkpoint(ckpt_root, ctx.rank)
    else:
        loaded = _usable_checkpoint(ckpt_dir)
    if loaded is not None:
        state = loaded.state
        if state.get("fused") != cfg["fused"]:
            raise RunError("this run was checkpointed with fused="
                                f"{state.get('fused')}; resume with the same --fused/--no-fused setting")
        load_state_tensors(art.modules, plan, loaded.tensors, str(ckpt_dir / loaded.name))
        for key, opt in ex.optimizers.items():
            opt.load_state_dict(state["optim"][str(key)])
        set_rng_state(state["rng"])
        epoch, start_step, gstep, history = state["epoch"], state["step_in_epoch"], state["step"], state["history"]
        window = state.get("window")
        if opts.on_log and ctx.rank == 0:
            opts.on_log({"kind": "note", "text": f"resuming from step {gstep} of {total_epochs * spe} "
                                                 f"(epoch {epoch + 1} of {total_epochs}, {loaded.name})"})
    # drop what a killed earlier attempt logged after the checkpoint (everything, if it died before the first)
    truncate_metrics(metrics_dir(run_dir, ctx.rank), gstep)
    if ctx.rank == 0:
        fsio.remove_temp_files(run_dir)  # of atomic writes (metrics, summary) that a killed attempt left
    names = {p.id: p.name for p in plan.partitions}
    aug = cfg.get("augment") or {"crop_pad": 0, "flip": False}
    t_start = time.time()
    images = 0
    done = interrupted = False
    stop = StopFlag(immediate=ctx.world > 1)
    acc_loss: dict[int, torch.Tensor] = {}
    acc_correct: dict[int, torch.Tensor] = {}
    n_acc = 0

    def checkpoint(ep: int, step_in_epoch: int) -> None:
        if ctx.comm is not None:
            ctx.comm.drain()
        tensors = state_tensors(art.modules, plan)
        st = {"step": gstep, "epoch": ep, "step_in_epoch": step_in_epoch, "fused": cfg["fused"],
              "optim": {str(k): o.state_dict() for k, o in ex.optimizers.items()}, "rng": rng_state(),
              "history": history,
              # the metrics of the steps since the last log record, so a resumed run logs the same averages
              "window": {"n": n_acc, "loss": {str(k): float(v) for k, v in acc_loss.items()},
                         "correct": {str(k): int(v) for k, v in acc_correct.items()}}}
        save_checkpoint(ckpt_dir, f"ckpt-{gstep:09d}", tensors=tensors, state=st)
        if ctx.world > 1:
            commit_checkpoint(ckpt_root, gstep, ctx)
        prune_checkpoints(ckpt_dir, keep=opts.keep_checkpoints)

    def evaluate() -> dict[str, Any]:
        batches = Batches(data, batch_size=max(bs, 256), seed=cfg["seed"], epoch=0, train=False, augment=False,
                          channels_last=channels_last and ctx.world == 1)
        shown = counted(batches, len(batches), opts.on_progress, "eval", epoch=epoch - 1, epochs=total_epochs)
        fsio.point("train.evaluate", epoch=epoch - 1)
        if ctx.world == 1:
            return ex.evaluate(shown)
        full = gather_modules(plan, ckpt_root, gstep, ctx.world)
        ev_ex = Executor(plan, full, cfg["optimizer"], {pid: first_dev for pid in full}, fused=False,
                         denorm=(data.mean, data.std))
        return ev_ex.evaluate(shown)

    with MetricsLogger(metrics_dir(run_dir, ctx.rank), tensorboard=opts.tensorboard if ctx.rank == 0 else False) as log:
        try:
            while epoch < total_epochs and not done:
                phase = epoch // epochs
                active = phases[phase]
                phase_step0 = phase * epochs * spe
                batches = Batches(data, batch_size=bs, seed=cfg["seed"], epoch=epoch, start_step=start_step,
                                  train=True, augment=bool(aug["crop_pad"] or aug["flip"]), pad=aug["crop_pad"],
                                  flip=aug["flip"], channels_last=channels_last)
                acc_loss, acc_correct, n_acc, t_log = {}, {}, 0, time.time()
                if window:
                    acc_loss = {int(k): torch.tensor(v, dtype=torch.float32) for k, v in window["loss"].items()}
                    acc_correct = {int(k): torch.tensor(v) for k, v in window["correct"].items()}
                    n_acc, window = window["n"], None
                for step, x, y in batches:
                    if ctx.comm is not None:
                        ctx.comm.begin_step(gstep)
                    lr = run_lr(cfg, gstep - phase_step0, spe, epochs)
                    stats = guard_oom(lambda: ex.train_step(x, y, lr, active, seed=(cfg["seed"], gstep)), first_dev, bs)
                    fsio.point("train.step", step=gstep + 1)
                    for pid, (loss, correct) in stats.items():
                        acc_loss[pid] = acc_loss.get(pid, 0) + loss.float()
                        if correct is not None:
                            acc_correct[pid] = acc_correct.get(pid, 0) + correct
                    n_acc += 1
                    gstep += 1
                    images += y.numel()
                    if opts.on_progress:
                        opts.on_progress(ProgressEvent("train", step + 1, spe, epoch=epoch, epochs=total_epochs,
                                                       step=gstep, steps=total_epochs * spe, images=y.numel()))
                    if gstep % cfg["log_every"] == 0 or step == spe - 1:
                        for rec in log_records(acc_loss, acc_correct, n_acc, bs, names, epoch, gstep, lr,
                                                n_acc * bs / max(time.time() - t_log, 1e-9)):
                            log.log(rec)
                            if opts.on_log:
                                opts.on_log(rec)
                        acc_loss, acc_correct, n_acc, t_log = {}, {}, 0, time.time()
                    if cfg["checkpoint_every"] and gstep % cfg["checkpoint_every"] == 0:
                        check_finite(acc_loss, names, gstep)
                        checkpoint(epoch, step + 1)
                    if stop.requested and ctx.world == 1:
                        interrupted = done = True
                    if (opts.max_steps is not None and gstep >= opts.max_steps) or done:
                        done = True
                        break
                if done and not (step == spe - 1):
                    if n_acc and opts.on_log:  # show the steps since the last record (not logged: a resumed
                        for rec in log_records(acc_loss, acc_correct, n_acc, bs, names, epoch, gstep, lr,  # run
                                                n_acc * bs / max(time.time() - t_log, 1e-9)):  # logs them)
                            opts.on_log({**rec, "partial": True})
                    check_finite(acc_loss, names, gstep)
                    checkpoint(epoch, step + 1)
                    break
                epoch, start_step = epoch + 1, 0
                if ctx.world > 1:
                    checkpoint(epoch, 0)  # every rank's state at this step, for rank 0's evaluation
                if opts.eval_every_epoch and ctx.rank == 0:
                    ev = evaluate()
                    rec = {"kind": "eval", "epoch": epoch - 1, "step": gstep, "test_acc": ev["test_acc"],
                           "ensemble_acc": ev["ensemble_acc"], "partition_acc": ev["partition_acc"],
                           "wall_s": time.time() - t_start}
                    log.log(rec)
                    if opts.on_log:
                        opts.on_log(rec)
                    history.append({"epoch": epoch - 1, "test_acc": ev["test_acc"], "ensemble_acc": ev["ensemble_acc"]})
                if ctx.world == 1:
                    checkpoint(epoch, 0)
        except KeyboardInterrupt:
            raise Interrupted(f"interrupted; the last checkpoint is in {ckpt_dir}. Continue with: "
                              f"gndgl train --resume {run_dir}") from None
        finally:
            stop.restore()
    if interrupted:
        raise Interrupted(f"interrupted at step {gstep}; a checkpoint was written. Continue with: "
                          f"gndgl train --resume {run_dir}")
    if ctx.world > 1:
        if ctx.comm is not None:
            ctx.comm.drain()
        if not (ckpt_dir / f"ckpt-{gstep:09d}.json").exists():
            checkpoint(epoch, start_step)
        from .distributed import barrier
        barrier()
        if ctx.rank != 0:
            return {"rank": ctx.rank, "steps": gstep, "bytes_sent": ctx.comm.bytes_sent if ctx.comm else 0}
        final = gather_tensors(ckpt_root, gstep, ctx.world)
        merge_rank_metrics(run_dir, ctx.world)
    else:
        final = state_tensors(art.modules, plan)
    fsio.atomic_write_via(run_dir / "weights.safetensors", lambda tmp: save_file(final, str(tmp)))
    wall = time.time() - t_start
    last = history[-1] if history else {}
    summary = {"name": plan.name, "run_dir": str(run_dir), "epochs_done": epoch, "epochs_total": total_epochs,
               "steps": gstep,
               "test_acc": last.get("test_acc"), "ensemble_acc": last.get("ensemble_acc"),
               "best_test_acc": max((h["test_acc"] for h in history), default=None), "history": history,
               "wall_s": wall, "images_per_s": images / max(wall, 1e-9), "device": str(first_dev),
               "fused": cfg["fused"], "amp": amp, "dataset": cfg["dataset"], "complete": epoch >= total_epochs}
    fsio.atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
    write_metrics_csv(run_dir)
    return summary


__all__ = ["GndglError", "TrainOptions", "evaluate_run", "latest_run", "read_run_record", "run_weights", "train_artifact"]
