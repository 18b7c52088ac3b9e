"""Phase 1 of ``benchmarks/gpu_check.py``, correctness on CUDA: every spec trained a few steps,
a SIGKILLed and resumed training subprocess against an uninterrupted run, the sibling-fused
executor against the per-partition one (bf16 and float32), and no host sync inside a step.
"""

from __future__ import annotations

import contextlib
import copy
import math
import signal
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from gndgl_compiler import compile_spec
from gndgl_compiler.runtime.step.executor import Executor
from gndgl_compiler.runtime.train import TrainOptions, evaluate_run, train_artifact
from gpu_check_common import (LOG_FILE, ROOT, append_log, child_env, phase_status, rel, short_trace, spec_path, sync,
                              train_command)

if TYPE_CHECKING:
    from gpu_check import Recorder

PLAIN = {"kind": "sgd", "lr": 1.0, "momentum": 0.0, "nesterov": False, "weight_decay": 0.0, "betas": (0.9, 0.999)}
"""Optimizer of the fused-vs-per-partition check: lr 1, no momentum / decay, so a step's update is minus the
gradient."""
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


def check_train(name: str, args, device: torch.device, work: Path) -> dict:
    """Compile ``name`` in memory and train ``args.steps`` steps (one short epoch, then evaluation) on synthetic
    data."""
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
    diff = rel(torch.cat([a[k].flatten().double() for k in floats]),
               torch.cat([b[k].flatten().double() for k in floats]))
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
        return {"status": "skipped",
                "message": "skipped (no CUDA; the CPU-autocast form of this check is "
                           "tests/runtime/fusion/test_fused_bf16.py)"}
    art = compile_spec(spec_path(name))
    cl = device.type == "cuda"
    exs = []
    for siblings in (True, False):
        mods = copy.deepcopy(art.modules)
        exs.append(Executor(art.plan, mods, PLAIN, {pid: device for pid in mods}, per_device_optim=True,
                            siblings=siblings,
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
    """One ``Executor.train_step`` (after warm-up, spec's optimizer, bf16, channels_last) under sync-debug mode
    ``error``."""
    if device.type != "cuda":
        return {"status": "skipped", "message": "skipped (no CUDA)"}
    art = compile_spec(spec_path(name))
    mods = art.modules
    ex = Executor(art.plan, mods, art.spec["train"]["optimizer"], {pid: device for pid in mods}, per_device_optim=True,
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


GRAPH_STEPS = 20
"""Steps of the CUDA-graphs check (the first ``cuda_graphs.WARMUP_STEPS`` eager, then captured and replayed)."""


def check_cuda_graphs(name: str, args, device: torch.device, overrides: tuple[str, ...] = ()) -> dict:
    """``train.cuda_graphs`` on vs off: the same losses over ``GRAPH_STEPS`` steps (float32, TF32 off, the LR
    changing every step, dropout seeded per step) within ``F32_RTOL``, then images/s of both (bf16,
    channels_last). The graphed path was written without a GPU: this is its first test."""
    if device.type != "cuda":
        return {"status": "skipped", "message": "skipped (no CUDA)"}
    from gndgl_compiler.runtime.step.cuda_graphs import GraphedStep

    art = compile_spec(spec_path(name), overrides=list(overrides) or None)
    opt = art.spec["train"]["optimizer"]
    notes: list[str] = []

    def pair(amp: bool):
        eager = Executor(art.plan, copy.deepcopy(art.modules), opt, {p: device for p in art.modules}, amp=amp,
                         channels_last=amp)
        cap = Executor(art.plan, copy.deepcopy(art.modules), opt, {p: device for p in art.modules}, amp=amp,
                       channels_last=amp, capturable=True)
        return eager.train_step, GraphedStep(cap, notes.append)

    batches = [_batch(art, args.p1_batch, device, False, seed=i) for i in range(GRAPH_STEPS)]
    worst = 0.0
    with _no_tf32():
        eager, graphed = pair(False)
        for i, (x, y) in enumerate(batches):
            lr = 0.02 * (1 + math.cos(math.pi * i / GRAPH_STEPS)) / 2 + 1e-3
            a, b = eager(x, y, lr, seed=(0, i)), graphed(x, y, lr, seed=(0, i))
            worst = max([worst] + [rel(b[p][0].double(), a[p][0].double()) for p in a])
    if graphed.failed or graphed.graph is None:
        return {"status": "fail", "message": f"not captured: {'; '.join(notes) or 'no graph'}", "loss_rel": None}
    speed = {}
    eager, graphed = pair(True)
    x, y = _batch(art, args.p1_batch, device, True)
    for label, fn in (("off", eager), ("on", graphed)):
        for i in range(5):
            fn(x, y, 0.01, seed=(0, i))
        sync(device)
        t = time.perf_counter()
        for i in range(GRAPH_STEPS):
            fn(x, y, 0.01, seed=(0, 5 + i))
        sync(device)
        speed[label] = GRAPH_STEPS * args.p1_batch / (time.perf_counter() - t)
    ok = worst <= F32_RTOL
    return {"status": "pass" if ok else "fail", "loss_rel": worst, "img_s_off": speed["off"], "img_s_on": speed["on"],
            "message": f"{GRAPH_STEPS} steps, worst loss rel {worst:.1e} (tolerance {F32_RTOL:g}); img/s off "
                       f"{speed['off']:.0f}, on {speed['on']:.0f} ({speed['on'] / speed['off']:.2f}x)"}


def check_pipeline_sync(name: str, args, device: torch.device) -> dict:
    """Informational: does drawing one augmented training batch (``Batches``) synchronise? (``warn`` if so)."""
    if device.type != "cuda":
        return {"status": "skipped", "message": "skipped (no CUDA)"}
    from gndgl_compiler.runtime.data.batches import Batches
    from gndgl_compiler.runtime.data.sources import load_dataset

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
    run("cuda_graphs_on_vs_off", main[0], lambda: check_cuda_graphs(main[0], args, device))
    run("cuda_graphs_on_vs_off_dropout", "vgg6a_g2", lambda: check_cuda_graphs(
        "vgg6a_g2", args, device, ("local.head.kind=linear", "model.dropout=0.3", "model.width=0.25")))
    phase["status"] = phase_status(phase["checks"])
    phase["seconds"] = round(time.perf_counter() - t0, 1)
    return phase
