"""Depth × width sweeps: compile (and optionally train) one variant of a spec per
(K, G) and tabulate speed-ups the way the paper's Tables 4 and 5 do.

    >>> rows = run_sweep("specs/resnet32_k8g4.yaml", [1, 2, 4, 8, 16], [1, 2, 4, 8])
    >>> write_tables(rows, "sweep/")
"""

from __future__ import annotations

import copy
import csv
import io
import json
import os
import re
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Callable

from .. import fsio
from ..errors import GndglError

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


class TrainingUnavailable(GndglError):
    """``--train`` was asked for but :mod:`gndgl_compiler.runtime.train` cannot be imported."""


@dataclass
class SweepRow:
    """One (K, G) configuration of a sweep."""

    K: int
    G: int
    name: str
    partitions: int = 0
    training_speedup: float | None = None
    inference_speedup: float | None = None
    params: int | None = None
    inference_params: int | None = None
    e2e_macs: int | None = None
    max_partition_macs: int | None = None
    """Largest partition's forward MACs (body slice + aux head)."""
    max_partition_train_macs: int | None = None
    """Largest partition's forward + backward MACs (Figure 3's x axis)."""
    inference_macs: int | None = None
    test_acc: float | None = None
    ensemble_acc: float | None = None
    run_dir: str | None = None
    note: str = ""

    @property
    def ok(self) -> bool:
        """True when the configuration compiled."""
        return self.training_speedup is not None


def parse_ints(text: str, what: str) -> list[int]:
    """Parse ``"1,2,4"`` into ``[1, 2, 4]``.

    Raises:
        GndglError: not a comma-separated list of positive integers.
    """
    try:
        vals = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        vals = []
    if not vals or any(v < 1 for v in vals):
        raise GndglError(f"{what} must be a comma-separated list of positive integers such as 1,2,4, got '{text}'")
    return list(dict.fromkeys(vals))


def variant(base: dict, K: int, G: int) -> dict:
    """The spec data of one sweep cell.

    Args:
        base: the base spec as plain data (``spec.model_dump(mode="json")``).
        K: depth cuts (number of modules).
        G: width cuts (groups per module).

    Returns:
        A new dict: ``cuts.depth = K``, ``cuts.width = G``; G = 1 uses a joint final
        head like DGL, otherwise the base's local-learning settings are kept.
    """
    d = copy.deepcopy(base)
    d.setdefault("cuts", {})
    d["cuts"]["depth"], d["cuts"]["width"] = K, G
    if G == 1:
        d.setdefault("local", {})["final_head"] = {"mode": "joint"}
    stem = re.sub(r"[_\-.]?k\d+g\d+$", "", str(base.get("name", "sweep")))[:48] or "sweep"
    d["name"] = f"{stem}_k{K}g{G}"
    return d


def plan_of(data: dict) -> Any:
    """Partition plan of spec data without generating modules (front end, graph, partitioner only).

    Raises:
        GndglError: the variant is invalid (a G that does not divide the channels, ...).
    """
    from ..graph.build import build_graph
    from ..partition.partitioner import build_plan
    from ..partition.validate import validate_plan
    from ..spec.load import load_spec

    spec = load_spec(data)
    og = build_graph(spec)
    plan = build_plan(spec, og)
    validate_plan(plan, og)
    return plan


def _row(K: int, G: int, name: str, plan: Any) -> SweepRow:
    s = plan.summary
    return SweepRow(K, G, name, partitions=s["partitions"], training_speedup=s["training_speedup"],
                    inference_speedup=s["inference_speedup"], params=s["params"],
                    inference_params=s.get("inference_params"), e2e_macs=s["e2e_macs"],
                    max_partition_macs=s["max_partition_macs"],
                    max_partition_train_macs=max(p.costs.get("train_macs", 0) for p in plan.partitions),
                    inference_macs=s["inference_macs"])


def _train(art_dir: Path, run_dir: Path, options: dict[str, Any]) -> dict[str, Any]:
    """Train one compiled variant with the runtime (imported lazily)."""
    try:
        from ..runtime.train import TrainOptions, train_artifact
    except ImportError as exc:
        raise TrainingUnavailable(f"training runtime not available ({exc}); run the sweep without --train") from None
    done = run_dir / "summary.json"
    if done.exists():  # a finished run of an earlier sweep: reuse it
        return json.loads(done.read_text())
    base, i = run_dir, 2
    while run_dir.exists() and any(run_dir.iterdir()):  # an unfinished earlier attempt: keep it, start afresh
        run_dir, i = base.with_name(f"{base.name}-{i}"), i + 1
    known = {f.name for f in fields(TrainOptions)}
    opts = TrainOptions(**{k: v for k, v in options.items() if k in known and v is not None}, run_dir=str(run_dir))
    return train_artifact(art_dir, opts)


def run_sweep(spec: str | os.PathLike | dict, depths: list[int], widths: list[int], *, train: bool = False,
              out_dir: str | os.PathLike | None = None, train_options: dict[str, Any] | None = None,
              log: Callable[[str], None] | None = None) -> list[SweepRow]:
    """Compile every (K, G) variant of ``spec`` (and train it with ``train=True``).

    Args:
        spec: base spec (path, YAML text or data).
        depths: values of K.
        widths: values of G.
        train: train each variant (needs ``out_dir``; artifacts and runs go under it).
        out_dir: where ``artifacts/`` and ``runs/`` go when training.
        train_options: fields of :class:`gndgl_compiler.runtime.train.TrainOptions`
            (``epochs``, ``dataset``, ``device``, ``limit_train`` ...).
        log: called with one line per configuration.

    Returns:
        One :class:`SweepRow` per (K, G), in order; a combination that does not
        compile has ``note`` set and no numbers.

    Raises:
        SpecError: the base spec is invalid.
        GndglError: training was requested but the runtime is missing or failed.
    """
    from ..api import compile_spec
    from ..spec.load import load_spec

    base = load_spec(spec).model_dump(mode="json")
    if train and out_dir is None:
        raise GndglError("a training sweep needs an output directory (-o DIR) for its artifacts and runs")
    rows = []
    for K in depths:
        for G in widths:
            d = variant(base, K, G)
            try:  # training needs an artifact; tables need only the plan (much faster)
                art = compile_spec(d, Path(out_dir) / "artifacts" / d["name"]) if train else None
                plan = art.plan if art is not None else plan_of(d)
            except GndglError as err:
                msg = str(err).split("\n")[0]
                rows.append(SweepRow(K, G, d["name"], note=f"skipped: {msg}"))
                if log:
                    log(f"K={K} G={G}: skipped ({msg})")
                continue
            row = _row(K, G, d["name"], plan)
            if train:
                run = Path(out_dir) / "runs" / d["name"]
                if log:
                    log(f"K={K} G={G}: training {row.partitions} partitions → {run}")
                try:
                    summary = _train(art.path, run, dict(train_options or {}))
                except TrainingUnavailable:
                    raise
                except GndglError as err:
                    row.note = f"training failed: {str(err).splitlines()[0]}"
                    if log:
                        log(f"K={K} G={G}: {row.note}")
                    summary = {}
                row.test_acc, row.ensemble_acc = summary.get("test_acc"), summary.get("ensemble_acc")
                row.run_dir = str(summary.get("run_dir", run))
            rows.append(row)
            if log:
                acc = f" · test acc {100 * row.test_acc:.2f}%" if row.test_acc is not None else ""
                log(f"K={K} G={G}: {row.partitions} partitions · training ×{row.training_speedup:.2f} · "
                    f"inference ×{row.inference_speedup:.2f}{acc}")
    return rows


def paper_reference(spec_data: dict | None) -> bool:
    """True when the paper's numbers apply (the ResNet-32 template at width 1 on 32×32 inputs)."""
    m = (spec_data or {}).get("model", {})
    return m.get("template") == "resnet32" and float(m.get("width", 1)) == 1.0 and \
        list(m.get("input_shape", [3, 32, 32]))[1:] == [32, 32]


def _fmt(v: float | None, paper: float | None = None, digits: int = 2) -> str:
    if v is None:
        return "—"
    return f"{v:.{digits}f}" + (f" ({paper:g})" if paper is not None else "")


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
             ("Parameters (training, with aux heads)", lambda r, K, G: f"{r.params:,}" if r.ok else "—")]
    if trained:
        specs.insert(0, ("Test accuracy %", lambda r, K, G: _fmt(None if r.test_acc is None else 100 * r.test_acc,
                                                             ref(PAPER_TEST_ACC, K, G))))
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
