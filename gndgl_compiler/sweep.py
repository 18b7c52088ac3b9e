"""The depth × width sweep driver: plan (or compile and train) one variant of a spec per
(K, G) and collect its speed-ups and accuracies as :class:`SweepRow` s.

    >>> rows = run_sweep("specs/resnet32_k8g4.yaml", [1, 2, 4, 8, 16], [1, 2, 4, 8])

The tables and the chart of those rows are drawn by :mod:`gndgl_compiler.viz.tables`
and :mod:`gndgl_compiler.viz.bubble`.
"""

from __future__ import annotations

import copy
import json
import os
import re
import statistics
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Callable

from .errors import GndglError


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
    peak_bytes: int | None = None
    """The memory model's predicted peak of a training step (the fullest device) at the spec's batch size."""
    act_bytes: int | None = None
    """The largest partition's activation bytes per sample (memory model)."""
    test_acc: float | None = None
    """Test accuracy (the mean over ``seeds`` when several were trained)."""
    ensemble_acc: float | None = None
    test_acc_std: float | None = None
    """Sample standard deviation (n − 1) of the test accuracy over ``seeds`` (None for one run)."""
    ensemble_acc_std: float | None = None
    seeds: str = ""
    """The seeds trained, comma-separated (empty: the spec's seed, one run)."""
    run_dir: str | None = None
    """The run directory (with several seeds: the first seed's)."""
    note: str = ""

    @property
    def ok(self) -> bool:
        """True when the configuration compiled."""
        return self.training_speedup is not None


def parse_ints(text: str, what: str, minimum: int = 1) -> list[int]:
    """Parse ``"1,2,4"`` into ``[1, 2, 4]`` (duplicates dropped).

    Args:
        text: the comma-separated list.
        what: the option, for the message (``--depth``).
        minimum: the smallest value allowed (0 for seeds).

    Raises:
        GndglError: not a comma-separated list of integers ≥ ``minimum``.
    """
    try:
        vals = [int(x) for x in text.replace(" ", "").split(",") if x]
    except ValueError:
        vals = []
    if not vals or any(v < minimum for v in vals):
        kind = "positive integers such as 1,2,4" if minimum == 1 else f"integers ≥ {minimum} such as 0,1,2"
        raise GndglError(f"{what} must be a comma-separated list of {kind}, got '{text}'")
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


def _row(K: int, G: int, name: str, plan: Any) -> SweepRow:
    s = plan.summary
    return SweepRow(K, G, name, partitions=s["partitions"], training_speedup=s["training_speedup"],
                    inference_speedup=s["inference_speedup"], params=s["params"],
                    inference_params=s.get("inference_params"), e2e_macs=s["e2e_macs"],
                    max_partition_macs=s["max_partition_macs"],
                    max_partition_train_macs=max(p.costs.get("train_macs", 0) for p in plan.partitions),
                    inference_macs=s["inference_macs"],
                    peak_bytes=max(d["peak_bytes"] for d in s["memory"]["devices"].values()) if "memory" in s else None,
                    act_bytes=s["memory"]["max_act_bytes"] if "memory" in s else None)


def _train(art_dir: Path, run_dir: Path, options: dict[str, Any]) -> dict[str, Any]:
    """Train one compiled variant with the runtime (imported lazily).

    A run stopped (``max_steps``) before its first evaluation is evaluated here, so that every
    trained cell has a test accuracy (``"partial_eval": True`` in the returned summary).
    """
    try:
        from .runtime.train import TrainOptions, evaluate_run, train_artifact
    except ImportError as exc:
        raise TrainingUnavailable(f"training runtime not available ({exc}); run the sweep without --train") from None
    done = run_dir / "summary.json"
    if done.exists():  # a run of an earlier sweep that got to its end (or its --max-steps): reuse it
        summary = json.loads(done.read_text())
    else:
        base, i = run_dir, 2
        while run_dir.exists() and any(run_dir.iterdir()):  # an unfinished earlier attempt: keep it, start afresh
            run_dir, i = base.with_name(f"{base.name}-{i}"), i + 1
        known = {f.name for f in fields(TrainOptions)}
        opts = TrainOptions(**{k: v for k, v in options.items() if k in known and v is not None},
                            run_dir=str(run_dir))
        summary = train_artifact(art_dir, opts)
    if summary.get("test_acc") is None:
        ev = evaluate_run(summary["run_dir"], device=options.get("device"))
        summary.update(test_acc=ev["test_acc"], ensemble_acc=ev["ensemble_acc"], partial_eval=True)
    return summary


def mean_std(values: list[float]) -> tuple[float | None, float | None]:
    """Mean and sample standard deviation (n − 1) of ``values``; the std is None for fewer than 2."""
    if not values:
        return None, None
    return statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else None


def _train_cell(row: SweepRow, art_path: Path, out_dir: Path, options: dict[str, Any], seeds: list[int] | None,
                log: Callable[[str], None] | None) -> None:
    """Train ``row``'s variant once per seed (once with the spec's seed) and fill in its accuracies."""
    summaries, notes = [], []
    for seed in seeds or [None]:
        run = out_dir / "runs" / (row.name if seed is None else f"{row.name}-s{seed}")
        which = "" if seed is None else f" seed {seed}"
        if log:
            log(f"K={row.K} G={row.G}{which}: training {row.partitions} partitions → {run}")
        try:
            summary = _train(art_path, run, {**options, **({} if seed is None else {"seed": seed})})
        except TrainingUnavailable:
            raise
        except GndglError as err:
            notes.append(f"training{which} failed: {str(err).splitlines()[0]}")
            if log:
                log(f"K={row.K} G={row.G}: {notes[-1]}")
            continue
        summaries.append(summary)
        row.run_dir = row.run_dir or str(summary.get("run_dir", run))
    if any(s.get("partial_eval") for s in summaries):
        notes.append(f"stopped after {summaries[0]['steps']} steps (before an epoch ended): accuracy of those weights")
    row.test_acc, row.test_acc_std = mean_std([s["test_acc"] for s in summaries if s.get("test_acc") is not None])
    row.ensemble_acc, row.ensemble_acc_std = mean_std([s["ensemble_acc"] for s in summaries
                                                       if s.get("ensemble_acc") is not None])
    row.seeds = ",".join(str(x) for x in seeds) if seeds else ""
    row.note = "; ".join(notes)


def _accuracy_text(row: SweepRow) -> str:
    if row.test_acc is None:
        return ""
    std = f" ± {100 * row.test_acc_std:.2f}" if row.test_acc_std is not None else ""
    over = f" (seeds {row.seeds})" if row.seeds else ""
    return f" · test acc {100 * row.test_acc:.2f}{std}%{over}"


def run_sweep(spec: str | os.PathLike | dict, depths: list[int], widths: list[int], *, train: bool = False,
              out_dir: str | os.PathLike | None = None, train_options: dict[str, Any] | None = None,
              log: Callable[[str], None] | None = None, seeds: list[int] | None = None,
              overrides: list[str] | None = None) -> list[SweepRow]:
    """Compile every (K, G) variant of ``spec`` (and train it with ``train=True``).

    Args:
        spec: base spec (path, YAML text or data).
        depths: values of K.
        widths: values of G.
        train: train each variant (needs ``out_dir``; artifacts and runs go under it).
        out_dir: where ``artifacts/`` and ``runs/`` go when training.
        train_options: fields of :class:`gndgl_compiler.runtime.train.TrainOptions`
            (``epochs``, ``dataset``, ``device``, ``limit_train``, ``max_steps``, ``lr``, ``on_progress`` ...).
        log: called with one line per configuration (and per training run).
        seeds: train each variant once per seed; the row holds the mean and sample std of the accuracies.
        overrides: ``"a.b.c=VALUE"`` changes of the base spec (``--set``), validated like the spec.

    Returns:
        One :class:`SweepRow` per (K, G), in order; a combination that does not
        compile has ``note`` set and no numbers.

    Raises:
        SpecError: the base spec is invalid.
        GndglError: training was requested but the runtime is missing or failed.
    """
    from .api import compile_spec, plan_spec
    from .spec.load import load_spec

    base = load_spec(spec, overrides=overrides).model_dump(mode="json")
    if train and out_dir is None:
        raise GndglError("a training sweep needs an output directory (-o DIR) for its artifacts and runs")
    rows = []
    for K in depths:
        for G in widths:
            d = variant(base, K, G)
            try:  # training needs an artifact; tables need only the plan (much faster)
                art = compile_spec(d, Path(out_dir) / "artifacts" / d["name"]) if train else None
                plan = art.plan if art is not None else plan_spec(d)
            except GndglError as err:
                msg = str(err).split("\n")[0]
                rows.append(SweepRow(K, G, d["name"], note=f"skipped: {msg}"))
                if log:
                    log(f"K={K} G={G}: skipped ({msg})")
                continue
            row = _row(K, G, d["name"], plan)
            if train:
                _train_cell(row, art.path, Path(out_dir), dict(train_options or {}), seeds, log)
            rows.append(row)
            if log:
                log(f"K={K} G={G}: {row.partitions} partitions · training ×{row.training_speedup:.2f} · "
                    f"inference ×{row.inference_speedup:.2f}{_accuracy_text(row)}")
    return rows
