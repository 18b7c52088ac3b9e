"""Training progress on the console, for ``gndgl train`` and ``gndgl sweep --train``.

On a terminal: a bar for the steps of the epoch and one for the run, each with its ETA, plus loss,
time per step, images/s and learning rate, redrawn 4 times a second by rich's thread (a step only
sets numbers: no device sync). In a pipe or log file: one line per log record, and a line whenever
``progress_every`` seconds (``--progress-every``, default
:data:`~gndgl_compiler.runtime.run.options.PROGRESS_EVERY_S`) passed without one. An evaluated epoch
prints one line either way. The run's length is where it stops: the end of its schedule or
``--max-steps``, the earlier.
"""

from __future__ import annotations

import time

from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from gndgl_compiler.runtime.run.options import PROGRESS_EVERY_S
from gndgl_compiler.runtime.run.progress import ProgressEvent

from .common import console

LEGEND = ("progress: loss = mean of the partitions' local losses over the steps since the last line; s/step and "
          "img/s over the same steps; ETA = time to the run's last step (its schedule's end or --max-steps)")


def hms(seconds: float) -> str:
    """``seconds`` as ``H:MM:SS``."""
    s = max(int(round(seconds)), 0)
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _epoch_end(ev: ProgressEvent) -> int | None:
    """The steps of ``ev``'s epoch that this run trains: all of them, or up to its last step (--max-steps)."""
    return ev.done + min(ev.total - ev.done, ev.steps - ev.step) if ev.total is not None else None


class _Pace:
    """Seconds per step since a mark (the last printed line, or the start of a training phase)."""

    def __init__(self) -> None:
        self.t0, self.step0 = time.monotonic(), None

    def mark(self, step: int | None) -> None:
        self.t0, self.step0 = time.monotonic(), step

    def seconds_per_step(self, step: int) -> float | None:
        if self.step0 is None or step <= self.step0:
            return None
        return (time.monotonic() - self.t0) / (step - self.step0)


class TrainDisplay:
    """``on_log`` (call the display) and ``on_progress`` callbacks that show a run on the console.

    Args:
        progress_every: in a pipe, print a progress line after this many seconds without one.
    """

    def __init__(self, progress_every: float = PROGRESS_EVERY_S) -> None:
        self.live = console.is_terminal
        self.every = progress_every
        self.progress = Progress(TextColumn("[bold]{task.description:<12}"), BarColumn(bar_width=24),
                                 MofNCompleteColumn(), TimeRemainingColumn(), TextColumn("{task.fields[info]}"),
                                 console=console, transient=False, disable=not self.live, refresh_per_second=4)
        self.epoch_task = self.progress.add_task("epoch", total=None, info="", visible=False)
        self.run_task = self.progress.add_task("run", total=None, info="", visible=False)
        self.other_task = self.progress.add_task("", total=None, info="", visible=False)
        self.legend_shown = False
        self._start()

    def _start(self) -> None:
        """Forget the previous run (a sweep shows one run after another)."""
        self.step_recs: list[dict] = []
        self.info = ""
        self.last: ProgressEvent | None = None
        self.pace = _Pace()
        self.last_line = time.monotonic()
        for task in (self.epoch_task, self.run_task, self.other_task):
            self.progress.reset(task, total=None, visible=False, info="")

    def _print(self, text: str) -> None:
        console.print(text, highlight=False, markup=False, soft_wrap=True)

    def on_progress(self, ev: ProgressEvent) -> None:
        """Update the bars (and, in a pipe, print a line if ``progress_every`` passed); cheap, called every step."""
        self._flush()  # the records of the step before (one per partition) are all in
        if ev.phase == "train":
            if not self.legend_shown:
                self.legend_shown = True
                self._print(LEGEND)
            if self.last is None or self.last.phase != "train":
                self.pace.mark(ev.step)
            self.progress.update(self.epoch_task, description=f"epoch {ev.epoch + 1}/{ev.epochs}", completed=ev.done,
                                 total=_epoch_end(ev), visible=True, info=self.info)
            self.progress.update(self.run_task, completed=ev.step, total=ev.steps, visible=True, info="")
            self.progress.update(self.other_task, visible=False)
        else:
            label = "test" if ev.phase == "eval" else "decoding"
            self.progress.update(self.other_task, description=label, completed=ev.done, total=ev.total,
                                 visible=ev.total is None or ev.done < ev.total, info="")
        self.last = ev
        if not self.live and time.monotonic() - self.last_line >= self.every:
            self._print(self._timed_line(ev))
            self._printed(ev)

    def _printed(self, ev: ProgressEvent | None) -> None:
        self.last_line = time.monotonic()
        if ev is not None and ev.phase == "train":
            self.pace.mark(ev.step)

    def _timed_line(self, ev: ProgressEvent) -> str:
        """The line printed because ``progress_every`` seconds passed: where the run stands, pace and ETA."""
        if ev.phase != "train":
            label = "test batch" if ev.phase == "eval" else "decoding images"
            return f"{label} {ev.done}/{ev.total if ev.total is not None else '?'}"
        line = f"epoch {ev.epoch + 1} step {ev.done}/{_epoch_end(ev)} · run {ev.step}/{ev.steps}"
        sps = self.pace.seconds_per_step(ev.step)
        if sps is not None:
            line += f" · {sps:.2f} s/step · ETA {hms(sps * (ev.steps - ev.step))}"
        return line

    def __call__(self, rec: dict) -> None:
        """``on_log``: notes, setup lines, train windows and evaluations."""
        if rec["kind"] == "note":
            self._print(rec["text"])
        elif rec["kind"] == "train":
            if self.step_recs and self.step_recs[-1]["step"] != rec["step"]:
                self._flush()
            self.step_recs.append(rec)
        elif rec["kind"] == "setup":
            self._flush()
            self._start()
            self._print(rec["text"])
        elif rec["kind"] == "eval":
            self._flush()
            by_module: dict[str, list[float]] = {}
            for name, acc in rec["partition_acc"].items():
                by_module.setdefault(name.split(".")[0], []).append(acc)
            local = " ".join(f"{m}:{100 * sum(v) / len(v):.1f}" for m, v in by_module.items())
            self._print(f"epoch {rec['epoch'] + 1}: test {100 * rec['test_acc']:.2f}% · ensemble "
                        f"{100 * rec['ensemble_acc']:.2f}% · local {local} · {rec['wall_s']:.0f}s")
            self._printed(None)

    def finish(self) -> None:
        """Show the records not shown yet (the last window before a --max-steps stop)."""
        self._flush()

    def _flush(self) -> None:
        if not self.step_recs:
            return
        r = self.step_recs[0]
        loss = sum(x["loss"] for x in self.step_recs) / len(self.step_recs)
        images = self.last.images if self.last is not None and self.last.phase == "train" else 0
        sps = images / r["images_per_s"] if images and r["images_per_s"] > 0 else None
        pace = f" · {sps:.2f} s/step" if sps is not None else ""
        self.info = f"loss {loss:.3f}{pace} · {r['images_per_s']:.0f} img/s · lr {r['lr']:.3g}"
        self.progress.update(self.epoch_task, info=self.info)
        if not self.live:
            line = f"epoch {r['epoch'] + 1} step {r['step']}: {self.info}"
            if self.last is not None and self.last.phase == "train" and self.last.steps:
                eta = f", ETA {hms(sps * (self.last.steps - r['step']))}" if sps is not None else ""
                line += f" · run {r['step']}/{self.last.steps}{eta}"
            self._print(line)
            self._printed(self.last)
        self.step_recs = []
