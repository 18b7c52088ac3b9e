"""Training: ``train_artifact`` (the one-process entry point) and the :class:`Trainer` both entry
points run.

    Trainer.fit():  resume from the latest checkpoint ─▶ for epoch, step:
        lr = lr_at(step) ; stats = executor.train_step(x, y, lr)
        every log_every: metrics.jsonl + progress      every checkpoint_every: checkpoint
        end of epoch: evaluate (final head, ensemble, partitions) + checkpoint
    ─▶ weights.safetensors + summary.json

The loop calls a :class:`Checkpointer`, a :class:`Validator`, a metrics window and a reporter;
what differs in a distributed rank sits behind the context (``runtime/dist/context.py``). A run
killed at any point resumes from its last checkpoint (``resume=run_dir``) and ends with the same
weights as an uninterrupted run on CPU: data order and augmentation are functions of (seed,
epoch, step), and RNG, optimizer and BN states are checkpointed.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from safetensors.torch import save_file

from ..api import Artifact, load_artifact
from .. import fsio
from ..artifact import load_state_tensors, state_tensors
from ..errors import DataError, DeviceError, GndglError, RunError
from .checkpoint.store import save_checkpoint
from .checkpoint.directory import prune_checkpoints
from .checkpoint.rng import rng_state, set_rng_state
from .run.config import RunConfig
from .dist.context import DistContext, LocalContext
from .dist.sync_bn import sync_batch_norms
from .data.batches import steps_per_epoch
from .data.feed import MemoryFeed, StreamFeed
from .data.ranks import LabelFeed, fed_where_read, ranks_note
from .data.select import FeedRequest, load_feed
from .step.devices import synthetic_like, guard_oom, resolve_devices
from .evaluation.evaluate import evaluate_run  # noqa: F401  (re-exported)
from .step.cuda_graphs import GraphedStep, not_capturable, resolve
from .step.compile import compile_fused
from .step.executor import Executor
from .step.optim import run_lr
from .step.streams import untaken
from ..graph.ops import RANDOM_KINDS
from .loop_state import MetricsWindow, Reporter, TrainState
from .metrics import MetricsLogger, truncate_metrics, write_metrics_csv
from .run.options import TrainOptions
from .run.progress import ProgressEvent, ProgressFn, counted
from .run.directory import DATA_RECORD, latest_run, read_run_record, run_weights
from .run.lifecycle import make_run, new_run, resume_run, undo_failed_start
from .run.signals import Interrupted


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
        run = resume_run(opts.resume, opts)
        note = run.record()
        if note and opts.on_log:
            opts.on_log({"kind": "note", "text": note})
        return Trainer(run.art, run.config, run.run_dir, on_log=opts.on_log, on_progress=opts.on_progress).fit()
    art = source if isinstance(source, Artifact) else load_artifact(source)
    config = new_run(art, opts)
    resolve_devices(art, opts.device)  # fail before anything is written
    started = make_run(art, config, opts.run_dir)
    with undo_failed_start(started, (RunError, DataError, DeviceError)):
        return Trainer(art, config, started.run_dir, on_log=opts.on_log, on_progress=opts.on_progress).fit()


class Checkpointer:
    """Writes this process's checkpoints (and commits them with the other ranks), and resumes from them."""

    def __init__(self, art: Artifact, ex: Executor, ctx: LocalContext, run_dir: Path, config: RunConfig) -> None:
        self.art, self.ex, self.ctx = art, ex, ctx
        self.root = run_dir / "checkpoints"
        self.dir = ctx.checkpoint_dir(self.root)
        self.per_device_optim, self.keep = config.execution.fused, config.execution.keep_checkpoints
        self.replaced_from: int | None = None  # processes that wrote the checkpoint resumed from, if re-placed
        self.written: set[int] = set()  # steps this attempt checkpointed

    def save(self, st: TrainState, window: MetricsWindow) -> None:
        """Checkpoint weights, optimizer and RNG states, where the run stands and the metrics window."""
        self.ctx.drain()
        tensors = state_tensors(self.art.modules, self.art.plan)
        state = {"step": st.step, "epoch": st.epoch, "step_in_epoch": st.step_in_epoch, "fused": self.per_device_optim,
                 "optim": self.ex.updater.state_dict(), "rng": rng_state(),
                 "history": st.history, "window": window.state(), "wall_s": st.wall_s()}
        if self.ctx.writes_checkpoints:  # with replicas: replica 0's (the copies are equal)
            save_checkpoint(self.dir, f"ckpt-{st.step:09d}", tensors=tensors, state=state)
        self.written.add(st.step)
        self.ctx.commit(self.root, st.step)
        prune_checkpoints(self.dir, keep=self.keep)

    def has(self, step: int) -> bool:
        """This process's checkpoint of ``step`` exists (after a re-placement: one this attempt wrote, since a
        file of the old layout in the same directory holds other partitions)."""
        if self.replaced_from is not None or not self.ctx.writes_checkpoints:
            return step in self.written
        return (self.dir / f"ckpt-{step:09d}.json").exists()

    def resume(self, st: TrainState, window: MetricsWindow) -> str | None:
        """Load the latest checkpoint into the modules, optimizers, RNG, ``st`` and ``window``.

        Returns:
            Its name, or None for a fresh run.

        Raises:
            RunError: it was written with the other ``fused`` setting (another optimizer layout).
        """
        loaded = self.ctx.latest_checkpoint(self.root, self.ex)
        if loaded is None:
            return None
        state = loaded.state
        if state.get("fused") != self.per_device_optim:
            raise RunError("this run was checkpointed with fused="
                           f"{state.get('fused')}; resume with the same --fused/--no-fused setting")
        load_state_tensors(self.art.modules, self.art.plan, loaded.tensors, str(self.dir / loaded.name))
        self.ex.updater.load_state_dict(state["optim"])
        set_rng_state(state["rng"])
        self.replaced_from = state.get("replaced_from")
        st.restore(state)
        window.restore(state.get("window"))
        return loaded.name


@dataclass
class Validator:
    """Test accuracy of the network as trained so far: final head, layerwise ensemble, each partition.

    Everything it reads is given here (the Trainer builds it), none of it read back from the Trainer.
    """

    ctx: LocalContext
    """This process's place in the run (a distributed rank evaluates the weights all ranks committed)."""
    executor: Executor
    """The training executor (evaluated as is in one process)."""
    checkpoints: Path
    """The run's checkpoint directory (where a rank finds the others' weights)."""
    device: torch.device
    """Where an evaluation executor over every partition runs."""
    data: Any
    """The data feed (``batches(train=False)``, ``mean``, ``std``)."""
    batch_size: int
    """The run's batch size (evaluation uses at least 256)."""
    seed: int
    """The run's seed."""
    total_epochs: int
    """Epochs of the whole run (for the progress events)."""
    on_progress: ProgressFn | None = None
    """Called with a :class:`ProgressEvent` per test batch."""

    def __call__(self, st: TrainState) -> dict[str, Any]:
        plan, denorm = self.executor.plan, (self.data.mean, self.data.std)
        ex = self.ctx.evaluator(self.executor, self.checkpoints, st.step, lambda modules: Executor(
            plan, modules, None, {pid: self.device for pid in modules}, per_device_optim=False, denorm=denorm))
        batches = self.data.batches(batch_size=max(self.batch_size, 256), seed=self.seed, epoch=0, train=False,
                                    augment=False, channels_last=ex.channels_last)
        shown = counted(batches, len(batches), self.on_progress, "eval", epoch=st.epoch - 1, epochs=self.total_epochs)
        fsio.point("train.evaluate", epoch=st.epoch - 1)
        return ex.evaluate(shown)


class Trainer:
    """Trains one process's partitions of a run (all of them, or a rank's share under ``ctx``).

    Args:
        art: the artifact (``art.modules``: the partitions this process trains).
        config: the run's settings.
        run_dir: the run directory (made by ``run_dir.create_run``).
        ctx: this process's place in the run (default: one process).
        device: every partition on this device (default: ``config.execution.device``, else the plan's).
        on_log: called with every record (metrics, notes, the last window before a stop).
        on_progress: called with a :class:`ProgressEvent` per step, test batch and decoded chunk.
    """

    def __init__(self, art: Artifact, config: RunConfig, run_dir: Path, ctx: LocalContext | None = None, *,
                 device: str | None = None, on_log: Callable[[dict], None] | None = None,
                 on_progress: ProgressFn | None = None) -> None:
        self.art, self.config, self.run_dir = art, config, run_dir
        self.recipe, self.execution = config.recipe, config.execution
        self.ctx = ctx or LocalContext()
        self.on_log = on_log if self.ctx.is_main else None
        self.on_progress = on_progress
        plan = art.plan
        devices = resolve_devices(art, device or self.execution.device)
        self.device = devices[next(p.id for p in plan.partitions if p.id in art.modules)]
        self.amp = self.execution.amp_on(self.device)
        self.channels_last = self.execution.channels_last_on(self.device)
        self.data = self._load_data()
        torch.manual_seed(self.recipe.seed)
        graphs = self._cuda_graphs(devices)
        if self.ctx.bn_group() is not None:  # train.sync_bn: before fusion views the BatchNorms' parameters
            sync_batch_norms(art.modules, self.ctx.bn_group())
        self.ex = Executor(plan, art.modules, self.recipe.optimizer, devices,
                           per_device_optim=self.execution.fused, amp=self.amp,
                           channels_last=self.channels_last, denorm=(self.data.mean, self.data.std),
                           siblings=self.ctx.fuse_siblings(self.execution.fuse_siblings), transport=self.ctx.transport,
                           capturable=graphs)
        if self.ex.updater is not None:
            self.ex.updater.grad_sync = self.ctx.grad_sync()
        compile_fused(self.ex.fused_stages, self.execution.compile, self._note)
        self.step_fn = GraphedStep(self.ex, self._note) if graphs else self.ex.train_step
        """One training step: the executor's, or its replay from a CUDA graph (``runtime/step/cuda_graphs.py``)."""
        if self.on_log:
            self.on_log({"kind": "setup", "fusion": self.ex.fusion, "text": self.ctx.setup_text(self.ex)})
        bs = self.recipe.batch_size
        self.spe = steps_per_epoch(len(self.data.train_y), bs)
        if self.spe == 0:
            raise RunError(f"batch size {bs} is larger than the {len(self.data.train_y)} training images; use a "
                           "smaller --batch-size")
        modules = sorted({p.module for p in plan.partitions})
        self.phases = [None] if plan.schedule == "parallel" else [
            {p.id for p in plan.partitions if p.module == m} for m in modules]
        """Partitions trained in each phase (sequential schedule: one module per phase; None = all)."""
        self.total_epochs = self.recipe.epochs * len(self.phases)
        self.checkpointer = Checkpointer(art, self.ex, self.ctx, run_dir, config)
        self.validate = Validator(self.ctx, self.ex, self.checkpointer.root, self.device, self.data, bs,
                                  self.recipe.seed, self.total_epochs, on_progress)
        self.window = MetricsWindow({p.id: p.name for p in plan.partitions}, bs)
        self.state = TrainState()

    def _cuda_graphs(self, devices: dict[int, torch.device]) -> bool:
        """``train.cuda_graphs`` resolved for this process (RunError, exit 2: ``on`` where it cannot capture)."""
        plan, mods = self.art.plan, self.art.modules
        owned = {pid: d for pid, d in devices.items() if pid in mods}
        random = {p.id for p in plan.partitions
                  if p.id in mods and any(n.kind in RANDOM_KINDS for n in p.body + p.head)}
        reason = not_capturable(owned, per_device_optim=self.execution.fused, in_process=self.ctx.transport.in_process,
                                world=self.ctx.world, sequential=plan.schedule != "parallel",
                                legacy_random=bool(untaken({p.id: p for p in plan.partitions}, mods, random)))
        on = resolve(self.execution.cuda_graphs, reason)
        if self.on_log and self.execution.cuda_graphs != "off":
            self.on_log({"kind": "note", "text": "cuda graphs: " + ("on (untested on a GPU so far)" if on
                                                                    else f"off ({reason})")})
        return on

    def _note(self, text: str) -> None:
        if self.on_log:
            self.on_log({"kind": "note", "text": text})

    def _load_data(self) -> MemoryFeed | StreamFeed | LabelFeed:
        plan, r, exe = self.art.plan, self.recipe, self.execution
        data = load_feed(FeedRequest(r.dataset, r.augment, tuple(plan.input_shape), self.device, exe.data,
                                     exe.data_root, exe.download, r.limit_train, r.limit_test,
                                     synthetic_like(plan, r.batch_size), self.on_log, self.on_progress))
        if data.num_classes != plan.num_classes:
            raise RunError(f"data set '{r.dataset}' has {data.num_classes} classes but the network was compiled for "
                           f"{plan.num_classes}; set model.num_classes: {data.num_classes} and recompile")
        for note in (data.note, ranks_note(plan, self.ctx.world, data)):
            if note:
                self._note(note)
        data = fed_where_read(data, plan, self.art.modules, self.ctx.world)
        if self.ctx.is_main:  # what inference needs to feed the trained net (load_run, gndgl export)
            fsio.atomic_write_text(self.run_dir / DATA_RECORD, json.dumps({
                "dataset": r.dataset, "mean": list(data.mean), "std": list(data.std), "classes": list(data.classes),
                "input_shape": list(plan.input_shape), "num_classes": plan.num_classes}, indent=1))
        return data

    def fit(self) -> dict[str, Any]:
        """Train to the end of the run, ``max_steps`` or a stop signal; write the final weights and summary."""
        st, window, exe = self.state, self.window, self.execution
        self._resume()
        st.t_start = time.time()
        stop = self.ctx.stop_flag()
        with MetricsLogger(self.ctx.metrics_dir(self.run_dir),
                           tensorboard=exe.tensorboard if self.ctx.is_main else False) as logger:
            report = Reporter(logger, self.on_log, self.on_progress)
            try:
                while st.epoch < self.total_epochs and not st.done:
                    window.restart_clock()
                    for step, x, y in self._batches():
                        self._train_step(step, x, y, report)
                        if st.step % exe.log_every == 0 or st.step_in_epoch == self.spe:
                            for rec in window.records(st.epoch, st.step, st.lr):
                                report.record(rec)
                            window.clear()
                        if exe.checkpoint_every and st.step % exe.checkpoint_every == 0:
                            self._checkpoint()
                        if stop.requested:
                            st.interrupted = st.done = True
                        if exe.max_steps is not None and st.step >= exe.max_steps:
                            st.done = True
                        if st.done:
                            break
                    if st.done and st.step_in_epoch < self.spe:
                        self._stop_mid_epoch(report)
                        break
                    st.next_epoch()
                    self._end_epoch(report)
            except KeyboardInterrupt:
                with contextlib.suppress(GndglError):  # best effort: the interruption is what to report
                    self._flush_window(report)
                raise Interrupted(f"stopped at once, without a checkpoint at this step; the last checkpoint is in "
                                  f"{self.checkpointer.dir}. Continue with: gndgl train --resume "
                                  f"{self.run_dir}") from None
            finally:
                stop.restore()
        if st.interrupted:
            raise Interrupted(f"stopped at step {st.step}; a checkpoint was written. Continue with: "
                              f"gndgl train --resume {self.run_dir}")
        return self._finish()

    # ----------------------------------------------------------------------------- the loop's parts

    def _resume(self) -> None:
        """Continue from the latest checkpoint, and drop what a killed attempt logged after it."""
        name = self.checkpointer.resume(self.state, self.window)
        if name is not None and self.on_log:
            st = self.state
            moved = self.checkpointer.replaced_from
            where = f"; its partitions re-placed from {moved} process(es) onto {self.ctx.world}" if moved else ""
            self.on_log({"kind": "note", "text": f"resuming from step {st.step} of {self.total_epochs * self.spe} "
                                                 f"(epoch {st.epoch + 1} of {self.total_epochs}, {name}{where})"})
        # (everything, if the earlier attempt died before its first checkpoint)
        truncate_metrics(self.ctx.metrics_dir(self.run_dir), self.state.step)
        if self.ctx.is_main:
            fsio.remove_temp_files(self.run_dir)  # of atomic writes (metrics, summary) that a killed attempt left

    def _batches(self):
        r, st = self.recipe, self.state
        return self.data.batches(batch_size=r.batch_size, seed=r.seed, epoch=st.epoch, start_step=st.step_in_epoch,
                                 train=True, augment=bool(r.crop_pad or r.flip or r.augment and
                                                          r.augment.random_resized_crop),
                                 pad=r.crop_pad, flip=r.flip, channels_last=self.channels_last)

    def _phase(self) -> int:
        return self.state.epoch // self.recipe.epochs

    def _active(self) -> set[int] | None:
        """The partitions this phase trains (None = all)."""
        return self.phases[self._phase()]

    def _lr(self) -> float:
        phase_step0 = self._phase() * self.recipe.epochs * self.spe
        return run_lr(self.recipe, self.state.step - phase_step0, self.spe, self.recipe.epochs)

    def _train_step(self, step: int, x: torch.Tensor, y: torch.Tensor, report: Reporter) -> None:
        """One step of every partition this phase trains (``step``: its index in the epoch)."""
        st = self.state
        self.ctx.begin_step(st.step)
        lr = self._lr()
        xs, ys = self.ctx.shard(x, y)  # with replicas: this replica's rows
        stats = guard_oom(lambda: self.step_fn(xs, ys, lr, self._active(), seed=(self.recipe.seed, st.step)),
                          self.device, self.recipe.batch_size)
        fsio.point("train.step", step=st.step + 1)
        self.window.add(stats)
        st.advance(step, y.numel(), lr)
        report.progress(ProgressEvent("train", st.step_in_epoch, self.spe, epoch=st.epoch, epochs=self.total_epochs,
                                      step=st.step, steps=self._end_step(), images=y.numel()))

    def _end_step(self) -> int:
        """The global step this attempt stops at: the end of the schedule or ``--max-steps``, the earlier."""
        total, cap = self.total_epochs * self.spe, self.execution.max_steps
        return total if cap is None else min(total, cap)

    def _checkpoint(self) -> None:
        self.window.check_finite(self.state.step)
        self.checkpointer.save(self.state, self.window)

    def _stop_mid_epoch(self, report: Reporter) -> None:
        """Record the steps since the last record and checkpoint (the window too: a resumed run drops
        the ``partial`` records and logs the whole window, as an uninterrupted run does)."""
        self._flush_window(report)
        self._checkpoint()

    def _flush_window(self, report: Reporter) -> None:
        """Log and show the last, partial window (``"partial": true``) of a run that stops here."""
        st = self.state
        if self.window.n:
            for rec in self.window.records(st.epoch, st.step, st.lr):
                report.record({**rec, "partial": True})

    def _end_epoch(self, report: Reporter) -> None:
        """Evaluate and checkpoint the epoch just trained (distributed: checkpoint first, for rank 0's
        evaluation of every rank's weights; one process: the checkpoint records the evaluation)."""
        st = self.state
        if self.ctx.evaluates_checkpoints:
            self.checkpointer.save(st, self.window)
        if self.execution.eval_every_epoch and self.ctx.is_main:
            ev = self.validate(st)
            report.record({"kind": "eval", "epoch": st.epoch - 1, "step": st.step, "test_acc": ev["test_acc"],
                           "ensemble_acc": ev["ensemble_acc"], "partition_acc": ev["partition_acc"],
                           "wall_s": st.wall_s()})
            st.history.append({"epoch": st.epoch - 1, "test_acc": ev["test_acc"], "ensemble_acc": ev["ensemble_acc"]})
        if not self.ctx.evaluates_checkpoints:
            self.checkpointer.save(st, self.window)

    def _finish(self) -> dict[str, Any]:
        """Write the final weights, ``summary.json`` and ``metrics.csv``; return the summary."""
        st, run_dir, plan = self.state, self.run_dir, self.art.plan
        final = self.ctx.final_weights(self.art.modules, plan, st.step, lambda: self.checkpointer.save(st, self.window),
                                       self.checkpointer.has(st.step))
        if final is None:
            return self.ctx.rank_record(st.step)
        fsio.atomic_write_via(run_dir / "weights.safetensors", lambda tmp: save_file(final, str(tmp)))
        wall, attempt = st.wall_s(), time.time() - st.t_start
        last = st.history[-1] if st.history else {}
        summary = {"name": plan.name, "run_dir": str(run_dir), "epochs_done": st.epoch,
                   "epochs_total": self.total_epochs, "steps": st.step,
                   "test_acc": last.get("test_acc"), "ensemble_acc": last.get("ensemble_acc"),
                   "best_test_acc": max((h["test_acc"] for h in st.history), default=None), "history": st.history,
                   "wall_s": wall, "images_per_s": st.images / max(attempt, 1e-9), "device": str(self.device),
                   "fused": self.execution.fused, "amp": self.amp, "dataset": self.recipe.dataset,
                   "complete": st.epoch >= self.total_epochs, "memory": plan.summary.get("memory"),
                   **self.data.summary()}
        fsio.atomic_write_text(run_dir / "summary.json", json.dumps(summary, indent=1))
        write_metrics_csv(run_dir)
        return summary


__all__ = ["DistContext", "GndglError", "Trainer", "TrainOptions", "evaluate_run", "latest_run", "read_run_record",
           "run_weights", "train_artifact"]
