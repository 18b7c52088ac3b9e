"""The paper's Figure 3 for a sweep: test accuracy against the largest partition's
training MACs, bubble area ∝ inference MACs, one colour per G. Untrained, the chart shows
the trade-off the cost model predicts instead: training speed-up (x) against inference
speed-up (y), bubble area ∝ parameters including the auxiliary heads."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from .. import fsio
from ..errors import GndglError
from ..sweep import SweepRow

COLORS = ["#444444", "#1f77b4", "#2ca02c", "#d62728", "#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf"]


def bubble_chart(rows: list[SweepRow], out_base: str | os.PathLike, *, title: str = "",
                 formats: tuple[str, ...] = ("png", "svg"), trained_on: str = "") -> list[Path]:
    """Draw the Figure-3-style bubble chart of a sweep.

    Args:
        rows: sweep results (rows that did not compile are left out).
        out_base: output path without suffix (``sweep/bubble`` → ``bubble.png``, ``bubble.svg``).
        title: figure title.
        formats: file formats to write.
        trained_on: for a trained sweep, what the accuracies come from (data set, epochs,
            images), shown under the title.

    Returns:
        The paths written.

    Raises:
        GndglError: no configuration compiled, or matplotlib is missing.
    """
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError as exc:
        raise GndglError(f"matplotlib is needed for the bubble chart ({exc}); run `pip install matplotlib`") from None
    pts = _Points.of(rows)
    fig = Figure(figsize=(9, 6), dpi=120)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    ax.set_xscale("log")
    _draw_points(fig, ax, pts)
    if pts.use_acc:
        ax.set_xlabel("max training MACs of one partition (forward + backward, per sample, log scale)")
        ax.set_ylabel("test accuracy (%)")
    else:
        ax.set_xlabel("training speed-up over end-to-end (×, log scale): e2e MACs / largest partition's")
        ax.set_ylabel("inference speed-up (×): e2e MACs / assembled network's")
    ax.grid(True, which="both", alpha=0.25, zorder=0)
    ax.legend(handles=_legend_handles(pts), loc="best", fontsize=8, framealpha=0.85)
    sub = (f"\ntest accuracy after training on {trained_on}" if trained_on else "") if pts.use_acc else \
        "\nuntrained: cost-model speed-ups (train with gndgl sweep --train for Figure 3's accuracies)"
    ax.set_title((title or "Sweep") + sub, fontsize=11)
    fig.tight_layout()
    return _save(fig, Path(out_base), formats)


@dataclass
class _Points:
    """The chart's points: one per plotted sweep row, with its coordinates, bubble size and colour."""

    rows: list[SweepRow]
    xs: list[float]
    ys: list[float]
    sizes: list[float]
    color: dict[int, str]
    use_acc: bool

    @classmethod
    def of(cls, rows: list[SweepRow]) -> _Points:
        ok = [r for r in rows if r.ok]
        if not ok:
            raise GndglError("no configuration of the sweep compiled; nothing to plot")
        trained = [r for r in ok if r.test_acc is not None]
        use_acc = bool(trained)
        pts = trained if use_acc else ok
        if use_acc:
            ys = [100 * r.test_acc for r in pts]
            xs = [r.max_partition_train_macs or r.max_partition_macs for r in pts]
            area = [r.inference_macs or 1 for r in pts]
        else:  # y = 1/x would be a line: show the two speed-ups against each other
            xs = [r.training_speedup for r in pts]
            ys = [r.inference_speedup or 1.0 for r in pts]
            area = [r.params or 1 for r in pts]
        biggest = max(area)
        gs = sorted({r.G for r in pts})
        return cls(pts, xs, ys, [50 + 1000 * v / biggest for v in area],
                   {G: COLORS[i % len(COLORS)] for i, G in enumerate(gs)}, use_acc)


def _draw_points(fig, ax, pts: _Points) -> None:
    """One scatter per G, a gold star on end-to-end, a label on every point (moved apart)."""
    for G, c in pts.color.items():
        sel = [i for i, r in enumerate(pts.rows) if r.G == G]
        ax.scatter([pts.xs[i] for i in sel], [pts.ys[i] for i in sel], s=[pts.sizes[i] for i in sel], c=c,
                   alpha=0.45, edgecolors=c, linewidths=1.2, zorder=3)
    texts = []
    for x, y, r in zip(pts.xs, pts.ys, pts.rows):
        e2e = r.K == 1 and r.G == 1
        if e2e:
            ax.scatter([x], [y], marker="*", s=260, c="gold", edgecolors="black", linewidths=1.0, zorder=5)
        label = "end-to-end" if e2e else (f"DGL K={r.K}" if r.G == 1 else f"K={r.K}")
        texts.append(ax.annotate(label, (x, y), textcoords="offset points", xytext=(7, 6), fontsize=8,
                                 fontweight="bold" if e2e or r.G == 1 else "normal",
                                 color="black" if r.G == 1 else pts.color[r.G], zorder=6))
    ax.margins(0.12)
    _declutter(fig, texts)


def _legend_handles(pts: _Points) -> list:
    """One handle per G, the end-to-end star if present, and what the bubble area means."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], marker="o", linestyle="", markersize=9, markerfacecolor=c, alpha=0.6,
                      markeredgecolor=c, label=("G=1 (DGL)" if G == 1 else f"GN-DGL G={G}"))
               for G, c in pts.color.items()]
    if any(r.K == 1 and r.G == 1 for r in pts.rows):
        handles.append(Line2D([], [], marker="*", linestyle="", markersize=13, markerfacecolor="gold",
                              markeredgecolor="black", label="end-to-end (K=G=1)"))
    handles.append(Line2D([], [], linestyle="", label="bubble area ∝ " + ("inference MACs" if pts.use_acc else
                                                                          "parameters (with aux heads)")))
    return handles


def _save(fig, base: Path, formats: tuple[str, ...]) -> list[Path]:
    """Write the figure once per format, atomically, next to ``base``."""
    base.parent.mkdir(parents=True, exist_ok=True)
    out = []
    for fmt in formats:
        path = base.with_name(base.name + "." + fmt)
        fsio.atomic_write_via(path, lambda tmp, fmt=fmt: fig.savefig(tmp, format=fmt), suffix="." + fmt, error=None)
        out.append(path)
    return out


def _declutter(fig, texts) -> None:
    """Move annotation labels so that they do not overlap (greedy, a few candidate offsets)."""
    renderer = fig.canvas.get_renderer()
    placed = []
    offsets = [(7, 6), (7, -12), (-7, 6), (-7, -12), (9, 16), (9, -22), (-9, 16), (-9, -22), (12, 26), (12, -32)]
    for t in sorted(texts, key=lambda t: -t.xy[1]):
        for dx, dy in offsets:
            t.set_position((dx, dy))
            t.set_horizontalalignment("left" if dx > 0 else "right")
            box = t.get_window_extent(renderer).expanded(1.05, 1.1)
            if not any(box.overlaps(b) for b in placed):
                break
        else:
            t.set_position(offsets[0])
            t.set_horizontalalignment("left")
            box = t.get_window_extent(renderer)
        placed.append(box)
