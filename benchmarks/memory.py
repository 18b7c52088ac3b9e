"""The memory of one training step: measured peak vs the memory model (DESIGN §4.1).

For ResNet-32 DGL K=8, GN-DGL K=8 G=4 and ResNet-50 K=4 G=2 at 64×64, three ways to train the same network:

* gndgl        — ``Executor.train_step`` (fused, sibling-fused modules): module by module, forward then
                 backward, so one module's activations are alive at a time; and per partition
                 (``siblings=False``: every partition its own program, gradients allocated in the step);
* official     — the official code's style: every module's forward and loss on the detached output of the
                 one before, the losses summed, one backward, one SGD step (all activations alive at once);
                 run here on gndgl's own modules (``Executor.forward`` + ``sum(losses).backward()``), so the
                 networks and heads are the same;
* end-to-end   — the spec compiled at K = G = 1 (``cuts.depth=1``, ``cuts.width=1``, joint final head).

**Measured** (CPU): the heap high-water mark during one training step above the resting heap. Python's
allocations and torch's CPU tensors come from glibc's malloc; its in-use bytes (``mallinfo2()``: ``uordblks``,
the arenas' allocated bytes, + ``hblkhd``, the mmap-ed blocks that big tensors get) are read through ctypes
after every aten op of the step (a ``TorchDispatchMode``, which also sees the backward's ops). The resting heap
is read just before the step, after two warm-up steps (the optimizer's momentum exists; gradients are None
between steps; the batch is already allocated). On CUDA it is ``max_memory_allocated`` above the memory
allocated before the step.

**Predicted**: :func:`gndgl_compiler.partition.memory.step_peak` without the static part (parameters and
optimizer state are resting); for the official loop, the same model with one backward through every partition
(all their saved storages alive at the end of the forward).

    python benchmarks/memory.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import ctypes
import math
import sys
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gndgl_compiler import compile_spec
from gndgl_compiler.partition import memory as M
from gndgl_compiler.partition.plan import IMAGE
from gndgl_compiler.runtime.step.executor import Executor

ROOT = Path(__file__).resolve().parents[1]
OPT = {"kind": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 1e-4, "betas": (0.9, 0.999)}
E2E = ["cuts.depth=1", "cuts.width=1", "local.final_head.mode=joint", "local.final_head.kind=model"]
CONFIGS = [  # label, spec, overrides, batch
    ("ResNet-32 DGL K=8", "specs/resnet32_k8g1.yaml", [], 256),
    ("ResNet-32 GN-DGL K=8 G=4", "specs/resnet32_k8g4.yaml", [], 256),
    ("ResNet-50 K=4 G=2, 64×64", "specs/imagenet/resnet50_k4g2.yaml", ["model.input_shape=[3,64,64]"], 32),
]
MiB = 2 ** 20


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks",
                                               "fsmblks", "uordblks", "fordblks", "keepcost")]


class HeapPeak(TorchDispatchMode):
    """Samples glibc's in-use heap bytes after every aten op; ``peak`` is the largest sample."""

    def __init__(self):
        super().__init__()
        self.libc = ctypes.CDLL("libc.so.6")
        self.libc.mallinfo2.restype = _MallInfo2
        self.peak = self.in_use()

    def in_use(self) -> int:
        m = self.libc.mallinfo2()
        return m.uordblks + m.hblkhd

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, self.in_use())
        return out


def measure(step, device: torch.device) -> int:
    """Peak bytes above the resting heap (CPU) or above the allocated memory (CUDA) during ``step()``."""
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        rest = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - rest
    mode = HeapPeak()
    rest = mode.in_use()
    with mode:
        step()
    return mode.peak - rest


def predictions(plan, batch: int) -> dict[str, int]:
    """Predicted bytes above the resting heap: the executor's step, sibling-fused and per partition
    (:func:`step_peak`), and the official loop's (one backward through every partition, every body output
    kept, as ``Executor.forward`` keeps them, then the optimizer step)."""
    shapes = {IMAGE: list(plan.input_shape), **{p.id: p.out_shape for p in plan.partitions}}
    kept = {("out", s): M.FLOAT * math.prod(shape) for s, shape in shapes.items()}
    profile = M.backward_profile(plan.partitions, shapes, kept)
    official = {"profile": profile + [(0, 2 * profile[-1][1])]}
    return {"gndgl": M.step_peak(M.device_memory(plan.partitions, shapes, "sgd", 0.9), batch, static=False),
            "per_partition": M.step_peak(M.device_memory(plan.partitions, shapes, "sgd", 0.9, fuse=False), batch,
                                         static=False),
            "official": M.step_peak(official, batch, static=False)}


def _steps(art, device: torch.device) -> dict:
    """``{name: step(x, y)}``: the executor sibling-fused and per partition, and the official loop, each on its own
    copy of the modules."""
    devices = {p.id: device for p in art.plan.partitions}
    fused = Executor(art.plan, copy.deepcopy(art.modules), OPT, devices, per_device_optim=True)
    per_part = Executor(art.plan, copy.deepcopy(art.modules), OPT, devices, per_device_optim=True, siblings=False)
    off = Executor(art.plan, copy.deepcopy(art.modules), None, devices, per_device_optim=False, siblings=False)
    params = [q for m in off.modules.values() for q in m.parameters()]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9, nesterov=True, weight_decay=1e-4, foreach=True)

    def official(x, y):
        for m in off.modules.values():
            m.train()
        _, losses = off.forward(x, y, seed=(0, 0))
        sum(losses.values()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return {"gndgl": lambda x, y: fused.train_step(x, y, 0.1, seed=(0, 0)),
            "per_partition": lambda x, y: per_part.train_step(x, y, 0.1, seed=(0, 0)), "official": official}


def run_config(label: str, spec: str, overrides: list[str], batch: int, device: torch.device, out: Path) -> dict:
    local = compile_spec(ROOT / spec, out / "local", overrides=overrides)
    e2e = compile_spec(ROOT / spec, out / "e2e", overrides=overrides + E2E)
    x = torch.randn(batch, *local.plan.input_shape, device=device)
    y = torch.randint(0, local.plan.num_classes, (batch,), device=device)
    steps = _steps(local, device)
    steps["e2e"] = _steps(e2e, device)["gndgl"]
    model = {**predictions(local.plan, batch), "e2e": predictions(e2e.plan, batch)["gndgl"]}
    row = {"config": label, "batch": batch}
    for name, step in steps.items():
        for _ in range(2):
            step(x, y)
        row[name] = measure(lambda step=step: step(x, y), device)
        row[name + "_model"] = model[name]
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", type=int, nargs="*", help="indices of CONFIGS to run (default: all)")
    ap.add_argument("--out", default="/tmp/gndgl_memory_bench")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for i, (label, spec, overrides, batch) in enumerate(CONFIGS):
        if args.only is None or i in args.only:
            rows.append(run_config(label, spec, overrides, batch, device, Path(args.out) / str(i)))
            print_rows(rows[-1:], header=len(rows) == 1)
    return 0


COLUMNS = ("gndgl", "per_partition", "official", "e2e")


def print_rows(rows: list[dict], header: bool = True) -> None:
    """Markdown rows: measured MiB (model MiB, model error)."""
    if header:
        print("| config | batch | gndgl, sibling-fused | gndgl, per partition | official-style loop | end-to-end |")
        print("|---|---|---|---|---|---|")
    for r in rows:
        cells = [f"{r[k] / MiB:,.0f} MiB ({r[k + '_model'] / MiB:,.0f}, {(r[k + '_model'] - r[k]) / r[k]:+.0%})"
                 for k in COLUMNS]
        print(f"| {r['config']} | {r['batch']} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    sys.exit(main())
