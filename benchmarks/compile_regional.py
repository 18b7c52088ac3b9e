"""Step time with ``train.compile: regional`` vs ``off`` (issue 14): one thread, batch 32, resnet32_k8g4.

    python benchmarks/compile_regional.py [--spec resnet32_k8g4] [--batch 32] [--steps 10] [--device cpu]

Prints the compile (first-steps) time and the median step time after warm-up for both settings.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gndgl_compiler import compile_spec  # noqa: E402
from gndgl_compiler.runtime.step.executor import Executor  # noqa: E402
from gndgl_compiler.runtime.step.compile import compile_fused  # noqa: E402


def bench(art, mode: str, batch: int, steps: int, warmup: int, device: torch.device) -> tuple[float, float]:
    """``(seconds of the warm-up steps, median seconds per step after them)``."""
    mods = copy.deepcopy(art.modules)
    ex = Executor(art.plan, mods, art.spec["train"]["optimizer"], {p: device for p in mods})
    compile_fused(ex.fused_stages, mode, print)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *art.plan.input_shape, generator=g).to(device)
    y = torch.randint(0, art.plan.num_classes, (batch,), generator=g).to(device)
    t0 = time.perf_counter()
    for i in range(warmup):
        ex.train_step(x, y, 0.01, seed=(0, i))
    first = time.perf_counter() - t0
    times = []
    for i in range(steps):
        t = time.perf_counter()
        ex.train_step(x, y, 0.01, seed=(0, warmup + i))
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        times.append(time.perf_counter() - t)
    return first, statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--spec", default="resnet32_k8g4")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    art = compile_spec(ROOT / "specs" / f"{args.spec}.yaml")
    dev = torch.device(args.device)
    for mode in ("off", "regional"):
        first, step = bench(art, mode, args.batch, args.steps, args.warmup, dev)
        print(f"{mode:9s} warm-up {first:7.1f} s   step {1000 * step:7.1f} ms (median of {args.steps})", flush=True)


if __name__ == "__main__":
    main()
