"""What sibling fusion gives a module of unequal group widths (the padded form): aten ops and CPU ms.

A balanced split (``cuts.split: balanced``) gives groups of unequal widths, which the paper's
official-style loop (``Conv2d(groups=G)``) cannot express, so there is no hand-written column here:
gndgl fused (padded, ``runtime/fusion/padded.py``) against gndgl per partition, the two interleaved
step by step, for ``vgg6a_g6`` (6/12/6 groups of 128/256/512 channels) and ResNet-32 K=8 at G=3.

    python benchmarks/padded_cost.py --threads 1 --batch 32 --steps 9
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hand_loops as hand  # noqa: E402  (the recipe: SGD-Nesterov, lr 0.1)

from gndgl_compiler import compile_spec  # noqa: E402
from gndgl_compiler.profiling import count_ops  # noqa: E402
from gndgl_compiler.runtime.step.executor import Executor  # noqa: E402

SPECS = Path(__file__).resolve().parents[1] / "specs"
CONFIGS = [
    ("vgg6a_g6", [], "VGG6a 6/12/6 groups"),
    ("resnet32_k8g4", ["cuts.width=3", "cuts.split=balanced"], "ResNet-32 K=8 G=3"),
]


def bench(spec: str, overrides: list[str], args, device: torch.device) -> dict:
    """aten ops and median CPU ms per step of the fused and the per-partition executor."""
    art = compile_spec(SPECS / f"{spec}.yaml", overrides=overrides)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, *art.plan.input_shape, generator=g).to(device)
    y = torch.randint(0, art.plan.num_classes, (args.batch,), generator=g).to(device)
    ex = {name: Executor(art.plan, copy.deepcopy(art.modules), hand.OPT, {p.id: device for p in art.plan.partitions},
                         per_device_optim=True, siblings=siblings)
          for name, siblings in (("fused", True), ("per-partition", False))}
    for e in ex.values():
        for _ in range(args.warmup):
            e.train_step(x, y, hand.LR)
    ops = {k: count_ops(e.train_step, x, y, hand.LR) for k, e in ex.items()}
    times: dict[str, list[float]] = {k: [] for k in ex}
    names = list(ex)
    for i in range(args.steps):
        for k in names[i % 2:] + names[:i % 2]:
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            c0, t0 = time.process_time(), time.perf_counter()
            ex[k].train_step(x, y, hand.LR)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times[k].append(time.process_time() - c0 if device.type == "cpu" else time.perf_counter() - t0)
    paired = statistics.median(f / p for f, p in zip(times["fused"], times["per-partition"]))
    return {"ops": ops, "ms": {k: 1e3 * statistics.median(v) for k, v in times.items()}, "paired": paired,
            "fused": ex["fused"].fusion_summary()}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=9)
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    print(f"one training step, batch {args.batch}, median of {args.steps} interleaved steps; {device}, "
          f"{torch.get_num_threads()} thread(s); torch {torch.__version__}")
    print("| config | ops fused | ops per-part | ms fused | ms per-part | fused/per-part ms (paired) | fused modules |")
    print("|---|---|---|---|---|---|---|")
    for spec, overrides, label in CONFIGS:
        r = bench(spec, overrides, args, device)
        o, m = r["ops"], r["ms"]
        print(f"| {label} | {o['fused']} | {o['per-partition']} | {m['fused']:.1f} | {m['per-partition']:.1f} | "
              f"{r['paired']:.2f}x | {r['fused'].split(';')[0]} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
