"""The human summary a finished run prints (one process, ``--workers N`` and torchrun alike)."""

from __future__ import annotations

from typing import Any


def _pct(v: float | None) -> str:
    return "n/a" if v is None else f"{100 * v:.2f}%"


def format_summary(summary: dict[str, Any], wall_s: float | None = None) -> str:
    """One paragraph: accuracies, epochs and steps, time, throughput and the run directory.

    Args:
        summary: what training returned (``summary.json``).
        wall_s: seconds to report (default: the summary's ``wall_s``).

    Returns:
        Plain text (no markup); a run stopped before its first evaluation says how to evaluate it.
    """
    run_dir = summary.get("run_dir")
    wall = summary.get("wall_s", 0.0) if wall_s is None else wall_s
    if summary.get("test_acc") is None:
        acc = f"test accuracy n/a (stopped before an epoch ended; evaluate with: gndgl eval {run_dir})"
    else:
        acc = f"test accuracy {_pct(summary['test_acc'])} · layerwise ensemble {_pct(summary.get('ensemble_acc'))}"
    state = "done" if summary.get("complete", True) else "stopped"
    epochs = summary.get("epochs_done", 0)
    total = summary.get("epochs_total")
    ep = f"{epochs}/{total}" if total else f"{epochs}"
    return (f"{state} in {wall:.0f}s · {acc} · {ep} epochs, {summary.get('steps', 0)} steps, "
            f"{summary.get('images_per_s', 0.0):.0f} img/s · run directory {run_dir}")
