"""Sweep tables: the rows of :func:`gndgl_compiler.sweep.run_sweep` as markdown and CSV
shaped like the paper's Tables 4 and 5, with the paper's values for comparison.

    >>> write_tables(rows, "sweep/", title="ResNet-32", paper=True)
"""

from __future__ import annotations

import csv
import io
import os
from dataclasses import asdict, fields
from pathlib import Path

from .. import fsio
from ..errors import GndglError
from ..sweep import SweepRow
from .style import fmt_bytes

# Paper (Patel, Eickenberg, Belilovsky), ResNet-32 on CIFAR-10, keyed by (K, G).
PAPER_TRAIN_SPEEDUP = {(1, 1): 1.0, (2, 1): 1.894, (4, 1): 3.622, (8, 1): 6.456, (16, 1): 11.609, (1, 2): 3.674,
                       (2, 2): 6.304, (4, 2): 10.667, (8, 2): 16.426, (16, 2): 23.072, (1, 4): 11.982,
                       (2, 4): 17.445, (4, 4): 24.522, (8, 4): 30.47, (1, 8): 28.531, (2, 8): 33.736, (4, 8): 39.333}
"""Table 4: end-to-end forward MACs ÷ the largest partition's."""
PAPER_INFERENCE_SPEEDUP = {(1, 1): 1, (2, 1): 1, (4, 1): 1, (8, 1): 1, (16, 1): 1, (1, 2): 1.961, (2, 2): 1.899,
                           (4, 2): 1.785, (8, 2): 1.612, (16, 2): 1.338, (1, 4): 3.777, (2, 4): 3.448, (4, 4): 2.936,
                           (8, 4): 2.324, (1, 8): 7.03, (2, 8): 5.824, (4, 8): 4.336}
"""Table 5: end-to-end forward MACs ÷ the assembled inference network's."""
PAPER_TEST_ACC = {(1, 1): 93.01, (2, 1): 91.47, (4, 1): 88.62, (8, 1): 85.53, (16, 1): 83.87, (1, 2): 88.52,
                  (2, 2): 89.11, (4, 2): 87.14, (8, 2): 84.18, (16, 2): 82.43, (1, 4): 81.45, (2, 4): 86.14,
                  (4, 4): 86.2, (8, 4): 83.5, (1, 8): 73.31, (2, 8): 80.78, (4, 8): 83.31}
"""Tables 4/5: test accuracy (%) of DGL (G=1) and GN-DGL with stop-gradient and diversity."""


def paper_reference(spec_data: dict | None) -> bool:
    """True when the paper's numbers apply (the ResNet-32 template at width 1 on 32×32 inputs)."""
    m = (spec_data or {}).get("model", {})
    return m.get("template") == "resnet32" and float(m.get("width", 1)) == 1.0 and \
        list(m.get("input_shape", [3, 32, 32]))[1:] == [32, 32]


def _fmt(v: float | None, paper: float | None = None, digits: int = 2) -> str:
    if v is None:
        return "—"
    return f"{v:.{digits}f}" + (f" ({paper:g})" if paper is not None else "")


def _accuracy(r: SweepRow, paper: float | None) -> str:
    """Test accuracy in %: ``mean ± std`` over seeds (sample std, n − 1), or the one run's."""
    if r.test_acc is None:
        return "—"
    std = f" ± {100 * r.test_acc_std:.2f}" if r.test_acc_std is not None else ""
    return f"{100 * r.test_acc:.2f}{std}" + (f" ({paper:g})" if paper is not None else "")


def _by_cell(rows: list[SweepRow]) -> tuple[list[int], list[int], dict[tuple[int, int], SweepRow]]:
    cells = {(r.K * r.G, r.G): r for r in rows}
    return sorted({r.K * r.G for r in rows}), sorted({r.G for r in rows}), cells


def markdown_table(rows: list[SweepRow], *, title: str = "", paper: bool = False) -> str:
    """Tables 4/5-shaped markdown: rows K·G, one column group per G.

    Args:
        rows: sweep results.
        title: heading text.
        paper: add the paper's values in parentheses (ResNet-32 ×1 only).

    Returns:
        The markdown text.
    """
    kgs, gs, cells = _by_cell(rows)
    trained = any(r.test_acc is not None for r in rows)
    out = [f"# {title}" if title else "# Sweep", ""]
    if paper:
        out += ["Values in parentheses: the paper (Patel et al., Tables 4/5).", ""]
    def ref(table: dict, K: int, G: int) -> float | None:
        return table.get((K, G)) if paper else None

    specs = [("Training speed-up (cf. Table 4)",
              lambda r, K, G: _fmt(r.training_speedup, ref(PAPER_TRAIN_SPEEDUP, K, G))),
             ("Inference speed-up (cf. Table 5)",
              lambda r, K, G: _fmt(r.inference_speedup, ref(PAPER_INFERENCE_SPEEDUP, K, G))),
             ("Partitions", lambda r, K, G: str(r.partitions) if r.ok else "—"),
             ("Parameters (training, with aux heads)", lambda r, K, G: f"{r.params:,}" if r.ok else "—"),
             ("Predicted peak memory of a training step (memory model, spec's batch size)",
              lambda r, K, G: fmt_bytes(r.peak_bytes) if r.ok and r.peak_bytes is not None else "—")]
    if trained:
        seeds = next((r.seeds for r in rows if r.seeds), "")
        name = f"Test accuracy %, mean ± std over seeds {seeds}" if seeds else "Test accuracy %"
        specs.insert(0, (name, lambda r, K, G: _accuracy(r, ref(PAPER_TEST_ACC, K, G))))
    for name, cell in specs:
        heads = [f"G={G}" + (" (DGL)" if G == 1 else "") for G in gs]
        out += [f"## {name}", "", "| K·G | " + " | ".join(heads) + " |", "|---:|" + "---:|" * len(gs)]
        for kg in kgs:
            vals = []
            for G in gs:
                r = cells.get((kg, G))
                vals.append("" if r is None else ("skipped" if not r.ok else cell(r, r.K, r.G)))
            out.append(f"| {kg} | " + " | ".join(vals) + " |")
        out.append("")
    notes = [f"- K={r.K}, G={r.G}: {r.note}" for r in rows if r.note]
    if notes:
        out += ["## Notes", ""] + notes + [""]
    return "\n".join(out)


def csv_table(rows: list[SweepRow], *, paper: bool = False) -> str:
    """One CSV line per configuration (all :class:`SweepRow` fields, plus the paper's values)."""
    buf = io.StringIO()
    names = ["KxG"] + [f.name for f in fields(SweepRow)]
    if paper:
        names += ["paper_training_speedup", "paper_inference_speedup", "paper_test_acc"]
    w = csv.DictWriter(buf, fieldnames=names, lineterminator="\n")
    w.writeheader()
    for r in rows:
        d = {"KxG": r.K * r.G, **asdict(r)}
        if paper:
            d.update(paper_training_speedup=PAPER_TRAIN_SPEEDUP.get((r.K, r.G)),
                     paper_inference_speedup=PAPER_INFERENCE_SPEEDUP.get((r.K, r.G)),
                     paper_test_acc=PAPER_TEST_ACC.get((r.K, r.G)))
        w.writerow({k: ("" if v is None else v) for k, v in d.items()})
    return buf.getvalue()


def write_tables(rows: list[SweepRow], out_dir: str | os.PathLike, *, title: str = "",
                 paper: bool = False) -> list[Path]:
    """Write ``table.md`` and ``table.csv`` into ``out_dir``.

    Returns:
        The paths written.

    Raises:
        GndglError: the directory cannot be written.
    """
    d = Path(out_dir)
    try:
        d.mkdir(parents=True, exist_ok=True)
        fsio.atomic_write_text(d / "table.md", markdown_table(rows, title=title, paper=paper), error=None)
        fsio.atomic_write_text(d / "table.csv", csv_table(rows, paper=paper), error=None)
    except OSError as exc:
        raise GndglError(f"cannot write the sweep tables to {d}: {exc.strerror or exc}") from None
    return [d / "table.md", d / "table.csv"]
