"""One-command GPU check of gndgl (issue 13): CUDA correctness, then speed and memory, then accuracy.

Three phases, in order, each timed; the whole run stays under ``--total-s`` (default 480 s = 8 min)
on one H100/H200. Every check records ``pass`` / ``fail`` / ``warn`` / ``skipped`` with a message and
never aborts the script; results are written after every phase to ``OUT/gpu_check.json`` and
``OUT/gpu_check.md`` (default ``OUT`` = ``gpu_check_out/``).

1. **Correctness on CUDA** (~2 min): every ``specs/*.yaml`` compiled in memory and trained a few
   steps on synthetic data on the device (``train.amp: auto`` = bf16 autocast and channels_last on
   CUDA, evaluation included); a real SIGKILL of ``python -m gndgl_cli.main train ... --checkpoint-every 1``
   after its first checkpoint, ``--resume``-style continuation (``TrainOptions(resume=...)``) and a
   comparison with an uninterrupted run; the sibling-fused executor against the per-partition one for
   one step (bf16 autocast, and float32 without TF32; tolerances below); no host sync inside
   ``Executor.train_step`` (``torch.cuda.set_sync_debug_mode("error")`` after warm-up).
2. **Speed and memory**: ``benchmarks/gpu_throughput.py``'s ``bench`` (hand-written loops vs gndgl
   fused, images/s, peak MiB) for end-to-end, DGL K=8 and GN-DGL K=8 G=4 at batch 256 and 1024.
   CUDA graphs: gndgl has no such option yet, recorded as n/a.
3. **Accuracy, short recipe**: CIFAR-10 from the JPEG tarball given with ``--cifar`` (15 epochs,
   batch 256, lr 0.1) for end-to-end, DGL K=8 and GN-DGL K=8 G=4, as many as fit in ``--budget-s``
   (end-to-end first), each as a ``gndgl train`` subprocess with a hard timeout. Skipped without ``--cifar``.

On a GPU machine (the checkout only; copy the tarball into the git-ignored ``.gpu_data/`` first)::

    mkdir -p .gpu_data && cp ../shared/datasets/cifar10-jpeg.tar.gz .gpu_data/
    python benchmarks/gpu_check.py --cifar .gpu_data/cifar10-jpeg.tar.gz            # results in gpu_check_out/
    python benchmarks/gpu_check.py --cifar .gpu_data/cifar10-jpeg.tar.gz --out "$OUT"   # a lent device machine

The results are three files: ``gpu_check.json``, ``gpu_check.md`` and ``gpu_check_logs.txt`` (the output
of the training subprocesses); runs and artifacts go to a scratch folder that is deleted (``--keep-work``).
gndgl need not be pip-installed: the script imports this checkout, and where ``gndgl_cli`` is not
installed its training subprocesses run ``gpu_check.py --child-train`` (``train_artifact``) instead of
``gndgl train`` (``--runner``). Its dependencies (pydantic, ...) must be importable.

On this workplace's lent H200 (torch 2.11, Python 3.12, no pydantic; checked 2026-12-01 from its docs,
not run): download the wheels here, then ``carry: [".gpu_data", ".whl"]`` with ``timeout_s`` ~560::

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
        pydantic==2.14.4 pydantic_core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5 typing_extensions==4.16.0
    # device command:
    python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl && \
        export PYTHONPATH=/tmp/site:$PWD && PYTHONUNBUFFERED=1 python3 benchmarks/gpu_check.py \
        --cifar .gpu_data/cifar10-jpeg.tar.gz --out $OUT 2>&1 | tee $OUT/stdout.txt

(networkx, typer, rich, pyyaml and safetensors must be importable there too; add their wheels if not.)

Smoke test of the script itself (CPU allowed, < 60 s: 2 specs, 2 steps, batch 8, no CIFAR)::

    OMP_NUM_THREADS=1 python benchmarks/gpu_check.py --smoke --out /tmp/gpu_check_smoke

Exit status: 0 when no check failed, 1 when one did, 2 for bad options (e.g. no CUDA without --smoke).

This file is the entry point (options, the results recorder, the Markdown report); the phases are
``gpu_check_correctness.py``, ``gpu_check_speed.py`` and ``gpu_check_accuracy.py``, what they share
(paths, helpers, training subprocesses) ``gpu_check_common.py``, all next to it in ``benchmarks/``.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the gpu_check_*.py parts
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # gndgl_compiler from this checkout (also not installed)

from gpu_check_accuracy import ACCURACY_CONFIGS, phase_accuracy  # noqa: E402
from gpu_check_common import LOG_FILE, ROOT, SPECS, child_main, free, log, short_trace, spec_path  # noqa: E402
from gpu_check_correctness import phase_correctness  # noqa: E402
from gpu_check_speed import phase_speed  # noqa: E402

SMOKE_SPECS = ["resnet32_k2g2", "vit_tiny_fmnist_k2g2"]


class Recorder:
    """Collects the checks of a phase and writes the results file after each phase."""

    def __init__(self, out: Path, meta: dict):
        self.out, self.results = out, {"meta": meta, "phases": {}}

    def check(self, phase: dict, name: str, spec: str | None, fn: Callable[[], dict], device: torch.device) -> dict:
        """Run ``fn`` (which returns ``{"status", "message", ...}``) as one check; an exception is a failure."""
        t = time.perf_counter()
        try:
            rec = fn()
        except (Exception, SystemExit) as exc:  # noqa: BLE001  (a check never aborts the script)
            rec = {"status": "fail", "message": f"{type(exc).__name__}: {str(exc).strip()[:600]}",
                   "where": short_trace(exc)}
        rec = {"name": name, "spec": spec, **rec, "seconds": round(time.perf_counter() - t, 2)}
        phase["checks"].append(rec)
        free(device)
        self.write()  # a run stopped from outside keeps every check done so far
        log(f"  [{rec['status']:>7}] {name}{' ' + spec if spec else ''}: {rec['message']} ({rec['seconds']:.1f} s)")
        return rec

    def write(self) -> None:
        """Write ``gpu_check.json`` and ``gpu_check.md`` (atomically, so a kill leaves the last complete copy)."""
        self.out.mkdir(parents=True, exist_ok=True)
        for name, text in (("gpu_check.json", json.dumps(self.results, indent=1, default=str)),
                           ("gpu_check.md", markdown(self.results))):
            tmp = self.out / (name + ".tmp")
            tmp.write_text(text, encoding="utf-8")
            tmp.replace(self.out / name)


# ---------------------------------------------------------------------------------------------- report
def _fmt(v: Any, spec: str = "") -> str:
    """A table cell: numbers formatted, None as a dash."""
    if v is None:
        return "–"
    if isinstance(v, float):
        return "nan" if math.isnan(v) else format(v, spec or ".3g")
    return str(v)


def markdown(results: dict) -> str:
    """The results as Markdown: a header, then one table per phase."""
    m = results["meta"]
    lines = [f"# gndgl GPU check — {m.get('started', '')}", "",
             f"device **{m.get('device_name')}** · torch {m.get('torch')} · CUDA {m.get('cuda')} · "
             f"{'smoke mode · ' if m.get('smoke') else ''}total {_fmt(results.get('total_s'), '.0f')} s", ""]
    ph = results["phases"]
    for key, p in ph.items():
        if p.get("error"):
            lines += [f"**{key}: the phase stopped: {p['error']}** ({p.get('where', '')})", ""]
    if "correctness" in ph:
        p = ph["correctness"]
        lines += [f"## 1. Correctness — {p['status']} ({_fmt(p.get('seconds'), '.0f')} s)", "",
                  *([p["reason"], ""] if p.get("reason") else []),
                  f"Tolerances: {p.get('tolerances')}.", "", "| check | spec | status | message |", "|---|---|---|---|"]
        lines += [f"| {c['name']} | {c['spec'] or ''} | {c['status']} | {c['message'].replace('|', '/')} |"
                  for c in p["checks"]]
        lines.append("")
    if "speed" in ph:
        p = ph["speed"]
        lines += [f"## 2. Speed and memory — {p['status']} ({_fmt(p.get('seconds'), '.0f')} s)", "",
                  *([p["reason"], ""] if p.get("reason") else []),
                  f"CUDA graphs: {p.get('cuda_graphs')}. Settings: {p.get('settings')}.", "",
                  "| config | batch | hand img/s | gndgl img/s | gndgl ÷ hand | no-aug img/s | hand peak MiB "
                  "| gndgl peak MiB |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['config']} | {r['batch']} | {_fmt(r['hand_img_s'], '.0f')} | "
                  f"{_fmt(r['gndgl_img_s'], '.0f')} | {_fmt(r['ratio'], '.2f')}× | {_fmt(r['noaug_img_s'], '.0f')} | "
                  f"{_fmt(r['hand_peak_mib'], '.0f')} | "
                  f"{_fmt(r['gndgl_peak_mib'], '.0f')} |" for r in p["rows"]]
        lines += [f"\n{c['spec']} {c['name']}: {c['status']}: {c['message']}" for c in p["checks"]
                  if c["status"] != "pass"]
        lines.append("")
    if "accuracy" in ph:
        p = ph["accuracy"]
        lines += [f"## 3. Accuracy, short recipe — {p['status']} ({_fmt(p.get('seconds'), '.0f')} s)", ""]
        if p.get("reason"):
            lines += [p["reason"], ""]
        else:
            lines += [f"Recipe {p.get('recipe')}; budget {p.get('budget_s')} s.", "",
                      "| config | epochs | test acc | ensemble acc | wall s | images/s (incl. eval) | train images/s |",
                      "|---|---|---|---|---|---|---|"]
            lines += [f"| {r['config']} | {r['epochs_done']}/{r['epochs']} | {_fmt(r['test_acc'], '.4f')} | "
                      f"{_fmt(r['ensemble_acc'], '.4f')} | {_fmt(r['wall_s'], '.0f')} | "
                      f"{_fmt(r['images_per_s'], '.0f')} | "
                      f"{_fmt(r['train_images_per_s_median'], '.0f')} |" for r in p["runs"]]
            lines += [f"\n{c['spec']}: {c['status']}: {c['message']}" for c in p["checks"] if c["status"] != "pass"]
        lines.append("")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options (``--smoke`` shrinks every phase to a CPU-sized test of the script)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", type=Path, default=ROOT / "gpu_check_out", help="results folder (default gpu_check_out/)")
    ap.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default cuda; cpu with --smoke and no CUDA)")
    ap.add_argument("--cifar", default=None,
                    help="CIFAR-10 JPEG tarball for phase 3, e.g. .gpu_data/cifar10-jpeg.tar.gz")
    ap.add_argument("--smoke", action="store_true", help="tiny run (2 specs, 2 steps, batch 8, no CIFAR unless given)")
    ap.add_argument("--total-s", type=float, default=480.0, help="whole-run target in seconds (default 480)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds for phase 3 (default: what is left of --total-s after phases 1-2, minus 20)")
    ap.add_argument("--phase1-s", type=float, default=150.0, help="phase 1 budget; later checks are skipped past it")
    ap.add_argument("--phase2-s", type=float, default=170.0, help="phase 2 budget; later configs are skipped past it")
    ap.add_argument("--specs", nargs="*", default=None, help="phase 1 specs by name (default: all of specs/)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["correctness", "speed", "accuracy"],
                    help="phases to skip")
    ap.add_argument("--keep-work", action="store_true", help="keep the scratch folder of runs and artifacts")
    ap.add_argument("--runner", choices=["auto", "cli", "child"], default="auto",
                    help="training subprocesses: gndgl train (cli), this script's --child-train mode (child), or "
                         "cli where gndgl_cli is installed (auto, the default)")
    args = ap.parse_args(argv)
    if args.smoke:
        d = dict(specs=args.specs or SMOKE_SPECS, steps=2, p1_batch=8, fused_batch=8, kill_steps=60, resume_more=2,
                 sync_warmup=1, batches=[8], bench_steps=2, warmup=1, images=64,
                 speed_specs=["resnet32_e2e", "resnet32_k8g4"], epochs=1, acc_batch=8, acc_limit=64,
                 acc_specs=["resnet32_e2e"])
    else:
        d = dict(specs=args.specs or sorted(p.stem for p in SPECS.glob("*.yaml")), steps=3, p1_batch=64,
                 fused_batch=32, kill_steps=400, resume_more=5, sync_warmup=2, batches=[256, 1024], bench_steps=50,
                 warmup=10, images=50_000, speed_specs=[c[0] for c in ACCURACY_CONFIGS], epochs=15, acc_batch=256,
                 acc_limit=None, acc_specs=[c[0] for c in ACCURACY_CONFIGS])
    for k, v in d.items():
        setattr(args, k, v)
    args.kill_wait_s = 120.0
    unknown = [s for s in args.specs if not spec_path(s).is_file()]
    if unknown:
        ap.error(f"unknown spec(s) {unknown}; choose from {sorted(p.stem for p in SPECS.glob('*.yaml'))}")
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the three phases, print and write the results; 0 if no check failed."""
    argv = sys.argv[1:] if argv is None else argv
    if "--child-train" in argv:
        return child_main(argv)
    args = parse_args(argv)
    cuda_ok = torch.cuda.is_available()
    name = args.device or ("cuda" if cuda_ok or not args.smoke else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        print(f"error: unknown device '{name}'; use cuda, cuda:N or cpu", file=sys.stderr)
        return 2
    if device.type == "cuda" and not cuda_ok:
        print("error: no CUDA device on this machine; run with --smoke (CPU) to test the script itself",
              file=sys.stderr)
        return 2
    if device.type == "cuda":
        torch.cuda.set_device(device)
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / LOG_FILE).write_text("", encoding="utf-8")
    work = Path(tempfile.mkdtemp(prefix="gndgl_gpu_check_"))
    dev_name = (torch.cuda.get_device_name(device) if device.type == "cuda"
                else f"cpu ({platform.processor() or platform.machine()})")
    meta = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "device": str(device), "device_name": dev_name,
            "torch": torch.__version__, "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "python": platform.python_version(), "smoke": args.smoke, "argv": argv,
            "threads": torch.get_num_threads()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        meta["gpu_memory_mib"] = props.total_memory // 2 ** 20
        meta["capability"] = f"{props.major}.{props.minor}"
    log(f"gndgl GPU check: device {dev_name} ({device}), torch {torch.__version__}, CUDA {torch.version.cuda}"
        f"{', SMOKE' if args.smoke else ''}; results in {args.out}")
    rec = Recorder(args.out, meta)
    t_start = time.perf_counter()
    phases = [("correctness", "1. correctness", lambda: phase_correctness(rec, args, device, work)),
              ("speed", "2. speed and memory", lambda: phase_speed(rec, args, device)),
              ("accuracy", "3. accuracy", lambda: phase_accuracy(rec, args, device, work, t_start))]
    try:
        for key, title, fn in phases:
            if key in args.skip:
                rec.results["phases"][key] = {"status": "skipped", "reason": "--skip", "checks": [], "seconds": 0.0,
                                              "rows": [], "runs": []}
                continue
            log(f"phase {title} ...")
            try:
                p = fn()
            except (Exception, SystemExit) as exc:  # noqa: BLE001  (record, go on with the next phase)
                p = rec.results["phases"].setdefault(key, {"checks": []})
                p.update(status="fail", error=f"{type(exc).__name__}: {exc}", where=short_trace(exc))
            log(f"phase {title}: {p['status']} in {p.get('seconds', 0):.1f} s "
                f"(total {time.perf_counter() - t_start:.0f} s)")
            rec.results["total_s"] = round(time.perf_counter() - t_start, 1)
            rec.write()
    finally:
        rec.results["total_s"] = round(time.perf_counter() - t_start, 1)
        if args.keep_work:
            rec.results["meta"]["work_dir"] = str(work)
        else:
            shutil.rmtree(work, ignore_errors=True)
        rec.write()
    failed = [k for k, p in rec.results["phases"].items() if p.get("status") == "fail"]
    log(f"done in {rec.results['total_s']:.0f} s: "
        + ", ".join(f"{k} {p['status']}" for k, p in rec.results["phases"].items())
        + f"; {args.out / 'gpu_check.md'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
