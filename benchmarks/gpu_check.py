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
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import torch

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(ROOT))  # gndgl_compiler from this checkout, also where gndgl is not pip-installed

from gndgl_compiler import compile_spec  # noqa: E402
from gndgl_compiler.runtime.executor import Executor  # noqa: E402
from gndgl_compiler.runtime.train import TrainOptions, evaluate_run, train_artifact  # noqa: E402

LOG_FILE = "gpu_check_logs.txt"
"""All subprocess output, appended in order (one file: a device machine returns at most 8 files)."""

PLAIN = {"kind": "sgd", "lr": 1.0, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0, "betas": (0.9, 0.999)}
"""Optimizer of the fused-vs-per-partition check: lr 1, no momentum / decay, so a step's update is minus the gradient."""
BF16_LOSS_RTOL = 1e-2
BF16_GRAD_RTOL = 5e-2
"""Fused vs per-partition, one step under bf16 autocast: each partition's loss within 1e-2 relative and
its whole update (all its tensors as one vector) within 5e-2 relative norm. bf16 keeps 8 mantissa bits
(2^-9 ≈ 2e-3 per rounding); the fused program (dense first conv + grouped convs, batched heads) rounds
in other places than the per-partition programs, and BatchNorm backward amplifies it. A wiring bug
gives errors of order 1."""
F32_RTOL = 1e-3
"""The same in float32 with TF32 off: 1e-3 relative (CPU test: 1e-4; cuDNN picks different algorithms
for a grouped and a dense conv and sums in other orders)."""
RESUME_RTOL_CUDA = 1e-2
"""Killed-and-resumed vs uninterrupted run on CUDA (bf16, cuDNN not deterministic): global relative
norm of the weight difference. On the CPU they must be equal bit for bit."""
GPU_SPECS_MAIN = ["resnet32_e2e", "resnet32_k8g1", "resnet32_k8g4"]
SMOKE_SPECS = ["resnet32_k2g2", "vit_tiny_fmnist_k2g2"]
ACCURACY_CONFIGS = [("resnet32_e2e", "end-to-end"), ("resnet32_k8g1", "DGL K=8"), ("resnet32_k8g4", "GN-DGL K=8 G=4")]


# ---------------------------------------------------------------------------------------------- helpers
def log(msg: str) -> None:
    """Print one progress line (flushed, so a pipe or log file shows it at once)."""
    print(msg, flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative norm error ‖a − b‖ / ‖b‖ in float64 (absolute when b is zero)."""
    a, b = a.double(), b.double()
    nb = float(b.norm())
    return float((a - b).norm()) / nb if nb > 0 else float((a - b).norm())


def sync(device: torch.device) -> None:
    """Wait for the device (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    """Release cached device memory between checks."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def spec_path(name: str) -> Path:
    """Path of a shipped spec by name."""
    return SPECS / f"{name}.yaml"


def short_trace(exc: BaseException, keep: int = 4) -> str:
    """The last ``keep`` frames of an exception's traceback inside this project, one per line."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if str(ROOT) in f.filename]
    return " | ".join(f"{Path(f.filename).relative_to(ROOT)}:{f.lineno} in {f.name}" for f in frames[-keep:])


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


def phase_status(checks: list[dict]) -> str:
    """``fail`` if any check failed, ``skipped`` if all were skipped, else ``pass``."""
    if any(c["status"] == "fail" for c in checks):
        return "fail"
    if checks and all(c["status"] == "skipped" for c in checks):
        return "skipped"
    return "pass"


# ---------------------------------------------------------------------------------------------- subprocesses
def train_command(args, art_dir: Path, opts: dict) -> tuple[list[str], str]:
    """Command line of a training subprocess and which runner it uses.

    ``gndgl train`` (``python -m gndgl_cli.main``) where the ``gndgl_cli`` package is installed, else
    (``--runner child``, or a checkout that is not pip-installed, as on a bare GPU machine) this
    script's own ``--child-train`` mode, which calls ``train_artifact`` with the same options.
    """
    runner = args.runner
    if runner == "auto":
        runner = "cli" if importlib.util.find_spec("gndgl_cli") is not None else "child"
    if runner == "child":
        opts_file = Path(opts["run_dir"]).parent / (Path(opts["run_dir"]).name + ".opts.json")
        opts_file.parent.mkdir(parents=True, exist_ok=True)
        opts_file.write_text(json.dumps(opts), encoding="utf-8")
        return [sys.executable, str(Path(__file__).resolve()), "--child-train", str(art_dir),
                "--child-opts", str(opts_file)], "child"
    cmd = [sys.executable, "-m", "gndgl_cli.main", "train", str(art_dir), "--no-tensorboard"]
    for key, val in opts.items():
        cmd += ["--" + key.replace("_", "-"), str(val)]
    return cmd, "cli"


def child_env() -> dict:
    """Environment of a subprocess: unbuffered, and this checkout importable."""
    path = os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


def append_log(out: Path, title: str, log_path: Path, keep: int = 150) -> None:
    """Append the last ``keep`` lines of a subprocess log to ``OUT/gpu_check_logs.txt``."""
    lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines() if log_path.is_file() else []
    cut = [f"... ({len(lines) - keep} lines left out)"] if len(lines) > keep else []
    with open(out / LOG_FILE, "a", encoding="utf-8") as fh:
        fh.write("\n".join([f"===== {title}", *cut, *lines[-keep:], ""]) + "\n")


def child_main(argv: list[str]) -> int:
    """``--child-train ART_DIR --child-opts FILE``: train like ``gndgl train`` (options from a JSON file)."""
    from gndgl_compiler.errors import GndglError

    ap = argparse.ArgumentParser(prog="gpu_check.py --child-train")
    ap.add_argument("--child-train", type=Path, required=True)
    ap.add_argument("--child-opts", type=Path, required=True)
    a = ap.parse_args(argv)
    opts = json.loads(a.child_opts.read_text(encoding="utf-8"))
    fields = set(TrainOptions.__dataclass_fields__)
    if set(opts) - fields:
        print(f"error: unknown training option(s) {sorted(set(opts) - fields)}", file=sys.stderr)
        return 2
    def show(rec: dict) -> None:
        if rec.get("kind") in ("eval", "note", "setup"):
            print(json.dumps({k: v for k, v in rec.items() if k != "partition_acc"}), flush=True)

    opts.update(tensorboard=False, on_log=show)
    try:
        summary = train_artifact(a.child_train, TrainOptions(**opts))
    except GndglError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}), flush=True)
    return 0


# ---------------------------------------------------------------------------------------------- phase 1
def check_train(name: str, args, device: torch.device, work: Path) -> dict:
    """Compile ``name`` in memory and train ``args.steps`` steps (one short epoch, then evaluation) on synthetic data."""
    art = compile_spec(spec_path(name))
    bs = args.p1_batch
    summary = train_artifact(art, TrainOptions(
        dataset="synthetic", device=str(device), max_steps=args.steps, limit_train=bs * args.steps,
        limit_test=2 * bs, batch_size=bs, run_dir=str(work / "p1" / name), tensorboard=False,
        log_every=1))
    want_amp = device.type == "cuda"
    problems = []
    if summary["steps"] != args.steps:
        problems.append(f"ran {summary['steps']} steps, not {args.steps}")
    if summary["amp"] != want_amp:
        problems.append(f"amp={summary['amp']}, expected {want_amp} (train.amp: auto)")
    acc = summary.get("test_acc")
    if acc is None or not math.isfinite(acc):
        problems.append(f"no finite test accuracy ({acc})")
    msg = (f"{summary['steps']} steps, amp={summary['amp']}, test_acc={acc}, "
           f"{summary['images_per_s']:.0f} img/s")
    return {"status": "fail" if problems else "pass", "message": "; ".join(problems) or msg,
            "test_acc": acc, "amp": summary["amp"], "partitions": len(art.plan.partitions)}


def _ckpt_steps(run_dir: Path) -> list[int]:
    """Steps of the complete checkpoints (their JSON, written last) in a run directory."""
    d = run_dir / "checkpoints"
    return sorted(int(p.stem.split("-")[1]) for p in d.glob("ckpt-*.json")) if d.is_dir() else []


def check_kill_resume(name: str, args, device: torch.device, work: Path) -> dict:
    """SIGKILL a ``gndgl train --checkpoint-every 1`` subprocess after its first checkpoint, resume it with
    ``TrainOptions(resume=...)`` and compare the final weights with an uninterrupted run."""
    from safetensors.torch import load_file

    art_dir = work / "artifacts" / name
    compile_spec(spec_path(name), out_dir=art_dir)
    bs, max_steps = args.p1_batch, args.kill_steps
    common = dict(dataset="synthetic", device=str(device), batch_size=bs, limit_train=bs * max_steps,
                  limit_test=2 * bs)
    run = work / "kill" / name
    cmd, runner = train_command(args, art_dir, {**common, "run_dir": str(run), "max_steps": max_steps,
                                                "checkpoint_every": 1, "log_every": 1})
    logf = work / f"kill_{name}.log"
    with open(logf, "w", encoding="utf-8") as fh:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=fh, stderr=subprocess.STDOUT, env=child_env())
        deadline = time.time() + args.kill_wait_s
        try:
            while proc.poll() is None and not _ckpt_steps(run) and time.time() < deadline:
                time.sleep(0.02)
            finished = proc.poll() is not None
            if not finished:
                proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    steps = _ckpt_steps(run)
    append_log(args.out, f"kill_resume {name} ({runner}; SIGKILLed after checkpoint(s) {steps})", logf)
    if finished:
        return {"status": "fail", "message": f"the training subprocess ended (rc {proc.returncode}) before it was "
                                             f"killed; checkpoints at steps {steps}; see {LOG_FILE}"}
    if not steps:
        return {"status": "fail", "message": f"no checkpoint within {args.kill_wait_s} s; see {LOG_FILE}"}
    killed_at = steps[-1]
    target = min(killed_at + args.resume_more, max_steps)
    resumed = train_artifact(run, TrainOptions(resume=str(run), max_steps=target, tensorboard=False))
    ref = train_artifact(str(art_dir), TrainOptions(**common, max_steps=target, run_dir=str(work / "ref" / name),
                                                    tensorboard=False))
    if resumed["steps"] != target or ref["steps"] != target:
        return {"status": "fail", "message": f"resumed run ended at step {resumed['steps']}, reference at "
                                             f"{ref['steps']}, expected {target}"}
    a = load_file(str(run / "weights.safetensors"))
    b = load_file(str(work / "ref" / name / "weights.safetensors"))
    if a.keys() != b.keys():
        return {"status": "fail", "message": "resumed and uninterrupted runs have different weight names"}
    floats = [k for k in b if b[k].is_floating_point()]
    ints_equal = all(torch.equal(a[k], b[k]) for k in b if not b[k].is_floating_point())
    diff = rel(torch.cat([a[k].flatten().double() for k in floats]), torch.cat([b[k].flatten().double() for k in floats]))
    worst = max((rel(a[k], b[k]), k) for k in floats)
    tol = 0.0 if device.type == "cpu" else RESUME_RTOL_CUDA
    ok = ints_equal and diff <= tol
    ev = evaluate_run(run, device=str(device))
    return {"status": "pass" if ok else "fail",
            "message": f"{runner} subprocess SIGKILLed after checkpoint {killed_at}, resumed to step {target}: "
                       f"weights vs uninterrupted "
                       f"rel {diff:.2e} (tol {tol:g}; worst tensor {worst[1]} {worst[0]:.2e}), integer buffers "
                       f"{'equal' if ints_equal else 'DIFFER'}; evaluate_run test_acc {ev['test_acc']:.3f}",
            "killed_at": killed_at, "resumed_to": target, "runner": runner, "weights_rel": diff, "tolerance": tol}


def _batch(art, n: int, device: torch.device, channels_last: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """A seeded random batch of ``n`` normalised-looking images and labels on ``device``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, *art.plan.input_shape, generator=g)
    y = torch.randint(0, art.plan.num_classes, (n,), generator=g)
    x = x.to(device)
    if channels_last and x.dim() == 4:
        x = x.contiguous(memory_format=torch.channels_last)
    return x, y.to(device)


@contextlib.contextmanager
def _no_tf32():
    """Disable TF32 in cuDNN and cuBLAS for the block (true float32 convolutions and matmuls)."""
    old = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = old


def check_fused(name: str, args, device: torch.device, amp: bool) -> dict:
    """One step of the sibling-fused executor against the per-partition executor (same initial weights and batch)."""
    if amp and device.type != "cuda":
        return {"status": "skipped", "message": "skipped (no CUDA: bf16 autocast runs on CUDA only)"}
    art = compile_spec(spec_path(name))
    cl = device.type == "cuda"
    exs = []
    for siblings in (True, False):
        mods = copy.deepcopy(art.modules)
        exs.append(Executor(art.plan, mods, PLAIN, {pid: device for pid in mods}, fused=True, siblings=siblings,
                            amp=amp, channels_last=cl))
    fused, ref = exs
    n_fused = sum(r["fused"] for r in fused.fusion)
    if not n_fused:
        return {"status": "skipped", "message": "no module runs sibling-fused: " + fused.fusion_summary()}
    before = {pid: {k: v.detach().clone() for k, v in m.state_dict().items()} for pid, m in ref.modules.items()}
    x, y = _batch(art, args.fused_batch, device, cl)
    ctx = _no_tf32() if (device.type == "cuda" and not amp) else contextlib.nullcontext()
    with ctx:
        sf = fused.train_step(x, y, 1.0, seed=(0, 0))
        sr = ref.train_step(x, y, 1.0, seed=(0, 0))
        sync(device)
    loss_tol, grad_tol = (BF16_LOSS_RTOL, BF16_GRAD_RTOL) if amp else (F32_RTOL, F32_RTOL)
    worst_loss, worst_upd, worst_tensor = (0.0, ""), (0.0, ""), (0.0, "")
    problems = []
    names = {p.id: p.name for p in art.plan.partitions}
    for pid in sr:
        pname = names.get(pid, str(pid))
        lf, lr_ = sf[pid][0].float(), sr[pid][0].float()
        r = float((lf - lr_).abs() / lr_.abs().clamp_min(1e-12))
        worst_loss = max(worst_loss, (r, pname))
        got, new = fused.modules[pid].state_dict(), ref.modules[pid].state_dict()
        du, dr = [], []
        for key, v in new.items():
            if not v.is_floating_point():
                if not torch.equal(got[key], v):
                    problems.append(f"{pname}.{key} differs")
                continue
            a, b = (got[key] - before[pid][key]).flatten(), (v - before[pid][key]).flatten()
            du.append(a)
            dr.append(b)
            worst_tensor = max(worst_tensor, (rel(a, b), f"{pname}.{key}"))
        if du:
            worst_upd = max(worst_upd, (rel(torch.cat(du), torch.cat(dr)), pname))
    if worst_loss[0] > loss_tol:
        problems.append(f"loss of {worst_loss[1]} rel {worst_loss[0]:.2e} > {loss_tol:g}")
    if worst_upd[0] > grad_tol:
        problems.append(f"update of {worst_upd[1]} rel {worst_upd[0]:.2e} > {grad_tol:g}")
    mode = "bf16 autocast" if amp else "float32 (no TF32)"
    msg = (f"{mode}, {n_fused} fused modules: worst loss rel {worst_loss[0]:.2e} (tol {loss_tol:g}), worst "
           f"partition update rel {worst_upd[0]:.2e} (tol {grad_tol:g}); worst single tensor {worst_tensor[1]} "
           f"{worst_tensor[0]:.2e} (info)")
    return {"status": "fail" if problems else "pass", "message": "; ".join(problems + [msg]) if problems else msg,
            "mode": mode, "loss_rel": worst_loss[0], "update_rel": worst_upd[0], "tensor_rel": worst_tensor[0],
            "loss_tol": loss_tol, "update_tol": grad_tol}


def _sync_error(fn: Callable[[], Any]) -> str | None:
    """Run ``fn`` under ``torch.cuda.set_sync_debug_mode("error")``; the error text if it synchronised."""
    torch.cuda.set_sync_debug_mode("error")
    try:
        fn()
    except RuntimeError as exc:
        text = str(exc).strip().splitlines()[0][:300]
        where = short_trace(exc, keep=3)
        return f"{text} at {where}" if where else text
    finally:
        torch.cuda.set_sync_debug_mode("default")
    return None


def check_no_sync(name: str, args, device: torch.device, siblings: bool = True) -> dict:
    """One ``Executor.train_step`` (after warm-up, spec's optimizer, bf16, channels_last) under sync-debug mode ``error``."""
    if device.type != "cuda":
        return {"status": "skipped", "message": "skipped (no CUDA)"}
    art = compile_spec(spec_path(name))
    mods = art.modules
    ex = Executor(art.plan, mods, art.spec["train"]["optimizer"], {pid: device for pid in mods}, fused=True,
                  siblings=siblings, amp=True, channels_last=True)
    x, y = _batch(art, args.p1_batch, device, True)
    for i in range(args.sync_warmup):
        ex.train_step(x, y, 0.01, seed=(0, i))
    sync(device)
    err = _sync_error(lambda: ex.train_step(x, y, 0.01, seed=(0, args.sync_warmup)))
    sync(device)
    mode = "sibling-fused" if siblings else "per partition"
    if err:
        return {"status": "fail", "message": f"{mode}: host sync inside train_step: {err}", "raised": True}
    return {"status": "pass", "message": f"{mode}: no host sync in one train_step", "raised": False}


def check_pipeline_sync(name: str, args, device: torch.device) -> dict:
    """Informational: does drawing one augmented training batch (``Batches``) synchronise? (``warn`` if so)."""
    if device.type != "cuda":
        return {"status": "skipped", "message": "skipped (no CUDA)"}
    from gndgl_compiler.runtime.batches import Batches
    from gndgl_compiler.runtime.data import load_dataset

    art = compile_spec(spec_path(name))
    data = load_dataset("synthetic", synthetic={"n_train": 4 * args.p1_batch, "n_test": 16,
                                                "shape": tuple(art.plan.input_shape),
                                                "num_classes": art.plan.num_classes}).to(device)
    it = iter(Batches(data, batch_size=args.p1_batch, seed=0, epoch=0, train=True, augment=True, channels_last=True))
    next(it)
    sync(device)
    err = _sync_error(lambda: next(it))
    if err:
        return {"status": "warn", "message": f"the input pipeline synchronises once per batch (outside "
                                             f"train_step): {err}", "raised": True}
    return {"status": "pass", "message": "no host sync drawing a batch", "raised": False}


def phase_correctness(rec: Recorder, args, device: torch.device, work: Path) -> dict:
    """Phase 1: compile + train every spec, kill/resume, fused vs per-partition, no host sync."""
    phase = {"status": "running", "checks": [], "tolerances": {
        "bf16_loss_rtol": BF16_LOSS_RTOL, "bf16_update_rtol": BF16_GRAD_RTOL, "f32_rtol": F32_RTOL,
        "resume_rtol_cuda": RESUME_RTOL_CUDA}}
    rec.results["phases"]["correctness"] = phase
    t0 = time.perf_counter()
    specs = args.specs
    main = [s for s in GPU_SPECS_MAIN if s in specs] or specs[:1]
    kill_spec = "resnet32_k8g4" if "resnet32_k8g4" in specs else specs[0]

    def over() -> bool:
        return time.perf_counter() - t0 > args.phase1_s

    def run(name: str, spec: str, fn: Callable[[], dict]) -> None:
        if over():
            phase["checks"].append({"name": name, "spec": spec, "status": "skipped", "seconds": 0.0,
                                    "message": f"skipped (phase 1 past its {args.phase1_s:.0f} s budget)"})
            return
        rec.check(phase, name, spec, fn, device)

    for s in specs:
        run("train", s, lambda s=s: check_train(s, args, device, work))
    run("kill_resume", kill_spec, lambda: check_kill_resume(kill_spec, args, device, work))
    for amp in ((True, False) if device.type == "cuda" else (False, True)):
        for s in specs:
            run("fused_vs_partition_" + ("bf16" if amp else "f32"), s,
                lambda s=s, amp=amp: check_fused(s, args, device, amp))
    for s in specs:
        run("no_host_sync", s, lambda s=s: check_no_sync(s, args, device))
    for s in main[-1:]:
        run("no_host_sync_per_partition", s, lambda s=s: check_no_sync(s, args, device, siblings=False))
    run("input_pipeline_sync", main[0], lambda: check_pipeline_sync(main[0], args, device))
    phase["status"] = phase_status(phase["checks"])
    phase["seconds"] = round(time.perf_counter() - t0, 1)
    return phase


# ---------------------------------------------------------------------------------------------- phase 2
def cuda_graphs_note() -> str:
    """What the run says about CUDA graphs: gndgl has no option for them yet (checked in the spec schema)."""
    from gndgl_compiler.spec.models import Train

    if any("graph" in f for f in Train.model_fields):
        return "a CUDA-graphs option exists in train.* now, but this script does not measure it yet"
    return "n/a (no cuda_graphs option yet)"


def phase_speed(rec: Recorder, args, device: torch.device) -> dict:
    """Phase 2: ``gpu_throughput.bench`` for each config and batch size (hand-written vs gndgl fused)."""
    import gpu_throughput as gt
    from gndgl_compiler.runtime.data import load_dataset

    note = cuda_graphs_note()
    phase = {"status": "running", "checks": [], "rows": [], "cuda_graphs": note}
    rec.results["phases"]["speed"] = phase
    t0 = time.perf_counter()
    amp = cl = device.type == "cuda"
    configs = [c for c in gt.CONFIGS if c[0] in args.speed_specs]
    for bs in args.batches:
        images = max(args.images, bs * (args.warmup + args.bench_steps))
        data = load_dataset("synthetic", synthetic={"n_train": images, "n_test": 16}).to(device)
        for spec, label, make_hand in configs:
            name = f"throughput batch {bs}"
            if time.perf_counter() - t0 > args.phase2_s:
                phase["checks"].append({"name": name, "spec": spec, "status": "skipped", "seconds": 0.0,
                                        "message": f"skipped (phase 2 past its {args.phase2_s:.0f} s budget)"})
                continue
            bargs = SimpleNamespace(batch=bs, steps=args.bench_steps, warmup=args.warmup, channels_last=cl)

            def one(spec=spec, label=label, make_hand=make_hand, bs=bs, bargs=bargs, data=data):
                r = gt.bench(spec, make_hand, data, bargs, device, amp)
                row = {"config": label, "spec": spec, "batch": bs, "hand_img_s": r["hand"][0],
                       "gndgl_img_s": r["gndgl"][0], "ratio": r["gndgl"][0] / r["hand"][0],
                       "noaug_img_s": r["noaug"][0], "hand_peak_mib": r["hand"][1], "gndgl_peak_mib": r["gndgl"][1],
                       "noaug_peak_mib": r["noaug"][1], "cuda_graphs": note}
                phase["rows"].append(row)
                return {"status": "pass", "message": f"hand {row['hand_img_s']:.0f} img/s, gndgl {row['gndgl_img_s']:.0f} "
                                                     f"img/s ({row['ratio']:.2f}x), peak {row['gndgl_peak_mib']:.0f} MiB"}

            rec.check(phase, name, spec, one, device)
        del data
        free(device)
    phase["settings"] = {"steps": args.bench_steps, "warmup": args.warmup, "amp": "bf16" if amp else "float32",
                         "channels_last": cl}
    phase["status"] = phase_status(phase["checks"])
    phase["seconds"] = round(time.perf_counter() - t0, 1)
    return phase


# ---------------------------------------------------------------------------------------------- phase 3
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
        phase.update(status="skipped", reason="no --cifar given (e.g. --cifar .gpu_data/cifar10-jpeg.tar.gz)", seconds=0.0)
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
                   "history": summ.get("history") or [{k: m.get(k) for k in ("epoch", "test_acc", "ensemble_acc", "wall_s")}
                                                      for m in evals]}
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
                  "| config | batch | hand img/s | gndgl img/s | gndgl ÷ hand | no-aug img/s | hand peak MiB | gndgl peak MiB |",
                  "|---|---|---|---|---|---|---|---|"]
        lines += [f"| {r['config']} | {r['batch']} | {_fmt(r['hand_img_s'], '.0f')} | {_fmt(r['gndgl_img_s'], '.0f')} | "
                  f"{_fmt(r['ratio'], '.2f')}× | {_fmt(r['noaug_img_s'], '.0f')} | {_fmt(r['hand_peak_mib'], '.0f')} | "
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
                      f"{_fmt(r['ensemble_acc'], '.4f')} | {_fmt(r['wall_s'], '.0f')} | {_fmt(r['images_per_s'], '.0f')} | "
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
    ap.add_argument("--cifar", default=None, help="CIFAR-10 JPEG tarball for phase 3, e.g. .gpu_data/cifar10-jpeg.tar.gz")
    ap.add_argument("--smoke", action="store_true", help="tiny run (2 specs, 2 steps, batch 8, no CIFAR unless given)")
    ap.add_argument("--total-s", type=float, default=480.0, help="whole-run target in seconds (default 480)")
    ap.add_argument("--budget-s", type=float, default=None,
                    help="seconds for phase 3 (default: what is left of --total-s after phases 1-2, minus 20)")
    ap.add_argument("--phase1-s", type=float, default=150.0, help="phase 1 budget; later checks are skipped past it")
    ap.add_argument("--phase2-s", type=float, default=170.0, help="phase 2 budget; later configs are skipped past it")
    ap.add_argument("--specs", nargs="*", default=None, help="phase 1 specs by name (default: all of specs/)")
    ap.add_argument("--skip", nargs="*", default=[], choices=["correctness", "speed", "accuracy"], help="phases to skip")
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
