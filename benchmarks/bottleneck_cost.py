"""What one training step of a width-cut ImageNet ResNet costs: sibling-fused vs per partition.

ResNet-50 and ResNeXt-50 32x4d cut K=4 × G (``specs/imagenet/``), at a small input (64×64 by default,
so it runs on a CPU): aten ops per step (``gndgl_compiler.profiling.count_ops``) and CPU ms per step
of the executor with sibling fusion (each module's G bottleneck bodies as one program: dense conv1,
grouped conv2 and conv3) and without it, steps interleaved in the same rounds, median.

    python benchmarks/bottleneck_cost.py --threads 1
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

from gndgl_compiler import compile_spec
from gndgl_compiler.profiling import count_ops
from gndgl_compiler.runtime.step.executor import Executor

SPECS = Path(__file__).resolve().parents[1] / "specs" / "imagenet"
OPT = {"kind": "sgd", "lr": 0.1, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-5, "betas": (0.9, 0.999)}
CONFIGS = [
    ("ResNet-50 K=4 G=2", "resnet50_k4g2.yaml", []),
    ("ResNet-50 K=4 G=4", "resnet50_k4g4.yaml", []),
    ("ResNeXt-50 32x4d K=4 G=4", "resnet50_k4g4.yaml", ["model.template=resnext50_32x4d"]),
]


def bench(spec: str, overrides: list[str], args) -> dict:
    art = compile_spec(SPECS / spec, overrides=[f"model.input_shape=[3, {args.size}, {args.size}]", *overrides])
    cpu = torch.device("cpu")
    ex = {name: Executor(art.plan, copy.deepcopy(art.modules), OPT, {p.id: cpu for p in art.plan.partitions},
                         per_device_optim=True, siblings=siblings)
          for name, siblings in (("fused", True), ("per-partition", False))}
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, *art.plan.input_shape, generator=g)
    y = torch.randint(0, art.plan.num_classes, (args.batch,), generator=g)
    for _ in range(args.warmup):
        for e in ex.values():
            e.train_step(x, y, 0.1)
    ops = {k: count_ops(lambda e=e: e.train_step(x, y, 0.1)) for k, e in ex.items()}
    times: dict[str, list[float]] = {k: [] for k in ex}
    names = list(ex)
    for i in range(args.steps):
        for k in names[i % 2:] + names[:i % 2]:
            c0 = time.process_time()
            ex[k].train_step(x, y, 0.1)
            times[k].append(time.process_time() - c0)
    return {"parts": len(art.plan.partitions), "fused": ex["fused"].fusion_summary(), "ops": ops,
            "ms": {k: 1e3 * statistics.median(v) for k, v in times.items()}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--size", type=int, default=64, help="input height and width")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per variant (median)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (use 1 on a shared machine)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rows = []
    for label, spec, overrides in CONFIGS:
        r = bench(spec, overrides, args)
        print(f"  {label}: {r['fused']}", file=sys.stderr, flush=True)
        o, m = r["ops"], r["ms"]
        rows.append([label, str(r["parts"]), str(o["fused"]), str(o["per-partition"]), f"{m['fused']:.0f}",
                     f"{m['per-partition']:.0f}", f"{m['fused'] / m['per-partition']:.2f}x"])
    print(f"\none training step, batch {args.batch}, {args.size}x{args.size}, median of {args.steps} interleaved "
          f"steps; CPU, {torch.get_num_threads()} thread(s); torch {torch.__version__}")
    cols = ["config", "parts", "ops fused", "ops per-part", "ms fused", "ms per-part", "fused/per-part"]
    widths = [max(len(c), *(len(r[i]) for r in rows)) for i, c in enumerate(cols)]
    print(" | ".join(c.ljust(w) for c, w in zip(cols, widths)))
    print("-|-".join("-" * w for w in widths))
    for r in rows:
        print(" | ".join(v.ljust(w) for v, w in zip(r, widths)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
