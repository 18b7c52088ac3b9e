"""Phase 3 of ``benchmarks/gpu_check.py``, accuracy with a short recipe: CIFAR-10 from the JPEG
tarball for end-to-end, DGL K=8 and GN-DGL K=8 G=4, each a training subprocess with a hard timeout,
as many as fit in the budget.
"""

from __future__ import annotations

import contextlib
import json
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from gndgl_compiler import compile_spec
from gpu_check_common import LOG_FILE, ROOT, append_log, child_env, log, phase_status, spec_path, train_command

if TYPE_CHECKING:
    from gpu_check import Recorder

ACCURACY_CONFIGS = [("resnet32_e2e", "end-to-end"), ("resnet32_k8g1", "DGL K=8"), ("resnet32_k8g4", "GN-DGL K=8 G=4")]


def _read_metrics(run_dir: Path) -> list[dict]:
    """The records of a run's ``metrics.jsonl`` (empty if none)."""
    f = run_dir / "metrics.jsonl"
    out = []
    if f.is_file():
        for line in f.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(ValueError):
                out.append(json.loads(line))
    return out


def _estimate_s(spec: str, rows: list[dict], epochs: int, n_train: int = 50_000) -> float | None:
    """Expected wall time of the accuracy run from phase 2's gndgl images/s at batch 256 (None if unmeasured)."""
    for r in rows:
        if r["spec"] == spec and r["batch"] == 256 and r["gndgl_img_s"] > 0:
            return 1.15 * epochs * n_train / r["gndgl_img_s"] + 25.0  # + start, decode, per-epoch evaluation
    return None


def phase_accuracy(rec: Recorder, args, device: torch.device, work: Path, t_start: float) -> dict:
    """Phase 3: the short CIFAR-10 recipe for end-to-end, DGL K=8, GN-DGL K=8 G=4, as many as fit in the budget."""
    phase = {"status": "running", "checks": [], "runs": []}
    rec.results["phases"]["accuracy"] = phase
    if not args.cifar:
        phase.update(status="skipped", reason="no --cifar given (e.g. --cifar .gpu_data/cifar10-jpeg.tar.gz)",
                     seconds=0.0)
        return phase
    cifar = Path(args.cifar)
    if not cifar.exists():
        phase["checks"].append({"name": "accuracy", "spec": None, "status": "fail", "seconds": 0.0,
                                "message": f"--cifar {cifar} does not exist (copy ../shared/datasets/"
                                           "cifar10-jpeg.tar.gz into .gpu_data/ first)"})
        phase.update(status="fail", seconds=0.0)
        return phase
    t0 = time.perf_counter()
    budget = args.budget_s if args.budget_s is not None else args.total_s - (time.perf_counter() - t_start) - 20
    phase["budget_s"] = round(budget, 1)
    speed_rows = rec.results["phases"].get("speed", {}).get("rows", [])
    recipe = {"epochs": args.epochs, "batch_size": args.acc_batch, "lr": 0.1}
    phase["recipe"] = recipe
    for spec, label in [c for c in ACCURACY_CONFIGS if c[0] in args.acc_specs]:
        left = budget - (time.perf_counter() - t0)
        est = _estimate_s(spec, speed_rows, args.epochs)
        if left < 30 or (est is not None and est > left):
            why = f"estimated {est:.0f} s" if est is not None else "under 30 s"
            phase["checks"].append({"name": "accuracy", "spec": spec, "status": "skipped", "seconds": 0.0,
                                    "message": f"skipped ({why}; {left:.0f} s of the budget left)"})
            log(f"  [skipped] accuracy {spec}: {why}, {left:.0f} s left")
            continue

        def one(spec=spec, label=label, left=left, est=est):
            art_dir, run = work / "acc_artifacts" / spec, work / "acc" / spec
            compile_spec(spec_path(spec), out_dir=art_dir)
            opts = {"run_dir": str(run), "dataset": str(cifar.resolve()), "epochs": args.epochs,
                    "batch_size": args.acc_batch, "lr": 0.1, "device": str(device)}
            if args.acc_limit:
                opts.update(limit_train=args.acc_limit, limit_test=args.acc_limit)
            cmd, runner = train_command(args, art_dir, opts)
            logf = work / f"accuracy_{spec}.log"
            t = time.perf_counter()
            with open(logf, "w", encoding="utf-8") as fh:
                try:
                    rc = subprocess.run(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, timeout=max(left, 1),
                                        env=child_env()).returncode
                except subprocess.TimeoutExpired:
                    rc = None
            wall = time.perf_counter() - t
            append_log(args.out, f"accuracy {spec} ({runner}; rc {rc})", logf)
            evals = [m for m in _read_metrics(run) if m.get("kind") == "eval"]
            trains = sorted(m["images_per_s"] for m in _read_metrics(run) if m.get("kind") == "train"
                            and "images_per_s" in m)
            summ = json.loads((run / "summary.json").read_text()) if (run / "summary.json").is_file() else {}
            row = {"config": label, "spec": spec, "epochs_done": len(evals), "epochs": args.epochs,
                   "test_acc": summ.get("test_acc", evals[-1]["test_acc"] if evals else None),
                   "ensemble_acc": summ.get("ensemble_acc", evals[-1]["ensemble_acc"] if evals else None),
                   "best_test_acc": summ.get("best_test_acc"), "wall_s": summ.get("wall_s", wall),
                   "process_wall_s": wall, "images_per_s": summ.get("images_per_s"),
                   "train_images_per_s_median": trains[len(trains) // 2] if trains else None,
                   "estimated_s": est, "rc": rc, "runner": runner,
                   "history": summ.get("history") or [
                       {k: m.get(k) for k in ("epoch", "test_acc", "ensemble_acc", "wall_s")} for m in evals]}
            phase["runs"].append(row)
            if rc is None:  # not a correctness failure: the recipe did not fit the budget
                return {"status": "warn", "message": f"timed out after {wall:.0f} s (budget) at epoch {len(evals)}; "
                                                     f"last test_acc {row['test_acc']}; see {LOG_FILE}"}
            if rc != 0:
                return {"status": "fail", "message": f"training subprocess exited {rc}; see {LOG_FILE}"}
            return {"status": "pass", "message": f"{args.epochs} epoch(s): test {100 * row['test_acc']:.2f}%, ensemble "
                                                 f"{100 * row['ensemble_acc']:.2f}%, {row['wall_s']:.0f} s, "
                                                 f"{row['images_per_s']:.0f} img/s"}

        rec.check(phase, "accuracy", spec, one, device)
    phase["status"] = phase_status(phase["checks"])
    phase["seconds"] = round(time.perf_counter() - t0, 1)
    return phase
