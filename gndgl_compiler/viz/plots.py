"""Training curves of a run: local loss and accuracy per partition over steps,
test / ensemble accuracy over epochs (from ``RUN_DIR/metrics.jsonl``)."""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

from .. import fsio
from ..errors import ArtifactError, GndglError

MODULE_COLORS = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#17becf",
                 "#bcbd22", "#7f7f7f"]


def _num(v: Any) -> float | None:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


def module_of(name: str) -> str:
    """Module key of a partition name: ``m3.g1`` → ``m3``; ``head`` / ``e2e`` stay as they are."""
    m = re.match(r"(m\d+)\.", name)
    return m.group(1) if m else name


def read_curves(run_dir: str | os.PathLike) -> dict[str, Any]:
    """Collect the series to plot from a run's metrics.

    Args:
        run_dir: a run directory of ``gndgl train``.

    Returns:
        ``{"train": {partition: {"step": [], "loss": [], "acc": []}}, "eval": {"epoch": [],
        "test_acc": [], "ensemble_acc": [], "modules": {module: [mean local acc per epoch]}}}``.

    Raises:
        ArtifactError: no metrics file, or no train / eval records in it.
    """
    from ..runtime.metrics import read_metrics

    d = Path(run_dir)
    if not d.is_dir():
        raise ArtifactError(f"run directory '{d}' does not exist; give a directory written by `gndgl train`")
    records = read_metrics(d)
    train: dict[str, dict[str, list]] = {}
    ev: dict[str, Any] = {"epoch": [], "test_acc": [], "ensemble_acc": [], "modules": {}}
    for r in records:
        kind = r.get("kind")
        if kind == "train" and isinstance(r.get("partition"), str):
            step = _num(r.get("step"))
            if step is None:
                continue
            s = train.setdefault(r["partition"], {"step": [], "loss": [], "acc": []})
            s["step"].append(step)
            s["loss"].append(_num(r.get("loss")))
            s["acc"].append(_num(r.get("acc")))
        elif kind == "eval":
            epoch = _num(r.get("epoch"))
            ev["epoch"].append(len(ev["epoch"]) if epoch is None else epoch + 1)
            ev["test_acc"].append(_num(r.get("test_acc")))
            ev["ensemble_acc"].append(_num(r.get("ensemble_acc")))
            by_mod: dict[str, list[float]] = {}
            for name, acc in (r.get("partition_acc") or {}).items():
                if _num(acc) is not None:
                    by_mod.setdefault(module_of(name), []).append(acc)
            for m, accs in by_mod.items():
                ev["modules"].setdefault(m, {"epoch": [], "acc": []})
                ev["modules"][m]["epoch"].append(ev["epoch"][-1])
                ev["modules"][m]["acc"].append(sum(accs) / len(accs))
    if not train and not ev["epoch"]:
        raise ArtifactError(f"{d / 'metrics.jsonl'} has no 'train' or 'eval' records yet; nothing to plot")
    return {"train": train, "eval": ev}


def _train_panels(axes, train: dict, color: dict[str, str]) -> None:
    """Local loss and local training accuracy per partition against the step (log loss axis when it spans 20×)."""
    for key, ax, ylabel in (("loss", axes[0], "local loss"), ("acc", axes[1], "local training accuracy (%)")):
        drawn = False
        for name, s in train.items():
            pts = [(x, y * (100 if key == "acc" else 1)) for x, y in zip(s["step"], s[key]) if y is not None]
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], color=color[module_of(name)], lw=1.0, alpha=0.75,
                        marker="." if len(pts) < 30 else None)
                drawn = True
        if not drawn:
            ax.text(0.5, 0.5, f"no '{key}' values logged", ha="center", va="center", transform=ax.transAxes,
                    color="#888888")
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.set_title(f"{ylabel} per partition (colour = module)", fontsize=10)
        ax.grid(True, alpha=0.3)
    losses = [v for s in train.values() for v in s["loss"] if v is not None]
    if losses and min(losses) > 0 and max(losses) / min(losses) > 20:
        axes[0].set_yscale("log")


def _eval_panel(ax, ev: dict, modules: list[str], color: dict[str, str]) -> None:
    """Test accuracy per epoch: the final head, the layerwise ensemble and each module's local heads."""
    for key, style, label in (("test_acc", "-", "test (final head)"), ("ensemble_acc", "--", "layerwise ensemble")):
        pts = [(e, 100 * a) for e, a in zip(ev["epoch"], ev[key]) if a is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], style, color="black", lw=2, marker="o", ms=4, label=label)
    for m in modules:
        s = ev["modules"].get(m)
        if s:
            ax.plot(s["epoch"], [100 * a for a in s["acc"]], ":", color=color[m], lw=1.2, marker=".",
                    label=m if m in ("head", "e2e") else f"{m} local (mean of groups)")
    if ev["epoch"]:
        ax.legend(fontsize=7, loc="lower right", ncol=2 if len(modules) > 8 else 1)
    else:
        ax.text(0.5, 0.5, "no evaluation yet", ha="center", va="center", transform=ax.transAxes, color="#888888")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy (%)")
    ax.set_title("test accuracy per epoch (final head, ensemble, local heads)", fontsize=10)
    ax.grid(True, alpha=0.3)


def _module_sort_key(m: str) -> tuple[int, str]:
    g = re.match(r"m(\d+)$", m)
    return (int(g.group(1)), "") if g else (10 ** 6, m)


def plot_run(run_dir: str | os.PathLike, output: str | os.PathLike | None = None) -> Path:
    """Plot a run's curves into one figure.

    Args:
        run_dir: the run directory (``metrics.jsonl`` inside).
        output: image path (.png, .svg or .pdf); default ``RUN_DIR/curves.png``.

    Returns:
        The path written.

    Raises:
        ArtifactError: no metrics to plot.
        GndglError: matplotlib missing, unknown suffix or unwritable output.
    """
    data = read_curves(run_dir)
    out = Path(output) if output is not None else Path(run_dir) / "curves.png"
    fmt = out.suffix.lower().lstrip(".")
    if fmt not in ("png", "svg", "pdf"):
        raise GndglError(f"cannot tell the image format of '{out}'; name it .png, .svg or .pdf")
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
        from matplotlib.lines import Line2D
    except ImportError as exc:
        raise GndglError(f"matplotlib is needed to plot ({exc}); run `pip install matplotlib`") from None

    train, ev = data["train"], data["eval"]
    modules = sorted({module_of(p) for p in train} | set(ev["modules"]), key=_module_sort_key)
    color = {m: MODULE_COLORS[i % len(MODULE_COLORS)] for i, m in enumerate(modules)}
    for special, c in (("head", "black"), ("e2e", "black")):
        if special in color:
            color[special] = c
    fig = Figure(figsize=(15, 4.6), dpi=110)
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    _train_panels(axes[:2], train, color)
    _eval_panel(axes[2], ev, modules, color)
    from matplotlib.ticker import MaxNLocator
    for a in axes:
        a.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    if ev["epoch"]:
        axes[2].set_xlim(min(ev["epoch"]) - 0.5, max(ev["epoch"]) + 0.5)
    handles = [Line2D([], [], color=color[m], lw=2, label=m) for m in modules]
    if handles:
        axes[0].legend(handles=handles, fontsize=7, ncol=2 if len(handles) > 8 else 1, loc="upper right",
                       title="module", title_fontsize=7)
    fig.suptitle(f"{Path(run_dir).resolve().name}", fontsize=11)
    fig.tight_layout()
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        fsio.atomic_write_via(out, lambda tmp: fig.savefig(tmp, format=fmt), suffix=out.suffix, error=None)
    except OSError as exc:
        raise GndglError(f"cannot write {out}: {exc.strerror or exc}") from None
    return out
