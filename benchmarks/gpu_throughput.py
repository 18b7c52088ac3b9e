"""GPU throughput: gndgl's fused executor against a plain hand-written loop (issue: fast on one GPU).

For ResNet-32 end-to-end, DGL K=8 and GN-DGL K=8 G=4 (sharing r=1, diversity on), on the same
device and the same data (a CIFAR-sized uint8 set resident on the device, pad-crop-flip on the
device through gndgl's ``Batches``), it times

* hand-written — the loops of ``benchmarks/hand_loops.py`` (the ones ``step_cost.py`` counts: GN-DGL
  as the paper's official code writes it, dense first conv + ``Conv2d(groups=G)``, one optimizer),
  under the same bf16 autocast and channels_last;
* gndgl fused   — ``Executor(per_device_optim=True)``: sibling-fused modules, one backward per module, one foreach
  step per device;
* gndgl fused without augmentation — the input pipeline's share of the step.

Each variant runs ``--warmup`` steps, then ``--steps`` timed steps between two
``torch.cuda.synchronize()``; peak memory is ``torch.cuda.max_memory_allocated`` of the variant
alone. One table: config, hand img/s, gndgl img/s, ratio, no-aug img/s, peak MiB, device, torch.

    python benchmarks/gpu_throughput.py                       # on cuda, batch 256 (< 5 min on an H100)
    python benchmarks/gpu_throughput.py --device cpu --batch 16 --steps 2 --warmup 1   # smoke test
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hand_loops as hand  # noqa: E402  (the hand-written loops)

from gndgl_compiler import compile_spec  # noqa: E402
from gndgl_compiler.runtime.data.batches import Batches  # noqa: E402
from gndgl_compiler.runtime.data.sources import load_dataset  # noqa: E402
from gndgl_compiler.runtime.step.executor import Executor  # noqa: E402

SPECS = Path(__file__).resolve().parents[1] / "specs"
CONFIGS = [("resnet32_e2e", "end-to-end", hand.HandE2E), ("resnet32_k8g1", "DGL K=8", lambda: hand.HandDGL(8)),
           ("resnet32_k8g4", "GN-DGL K=8 G=4", lambda: hand.HandGNDGL(8, 4))]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_reset(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def _peak_mib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated(device) / 2 ** 20 if device.type == "cuda" else float("nan")


def _time(step, batches, warmup: int, steps: int, device: torch.device, bs: int) -> tuple[float, float]:
    """(images/s, peak MiB) of ``step(x, y)`` over ``steps`` batches after ``warmup``."""
    _peak_reset(device)
    it = iter(batches)
    for _ in range(warmup):
        _, x, y = next(it)
        step(x, y)
    _sync(device)
    t = time.perf_counter()
    for _ in range(steps):
        _, x, y = next(it)
        step(x, y)
    _sync(device)
    return steps * bs / (time.perf_counter() - t), _peak_mib(device)


def bench(spec: str, make_hand, data, args, device: torch.device, amp: bool) -> dict:
    art = compile_spec(SPECS / f"{spec}.yaml")
    mf = torch.channels_last if args.channels_last else torch.contiguous_format

    def batches(augment: bool):
        return Batches(data, batch_size=args.batch, seed=0, epoch=0, train=True, augment=augment,
                       channels_last=args.channels_last)

    h = make_hand()
    for m in h.modules():
        m.to(device, memory_format=mf)
    autocast = (lambda: torch.autocast("cuda", dtype=torch.bfloat16)) if amp else contextlib.nullcontext

    def hand_step(x, y):
        with autocast():
            h.step(x, y)

    ex = Executor(art.plan, copy.deepcopy(art.modules), hand.OPT, {p.id: device for p in art.plan.partitions},
                  per_device_optim=True, amp=amp, channels_last=args.channels_last)
    n = len(data.train_y) // args.batch
    if args.warmup + args.steps > n:
        raise SystemExit(f"--warmup + --steps must be at most {n} batches of {args.batch}")
    out = {}
    out["hand"] = _time(hand_step, batches(True), args.warmup, args.steps, device, args.batch)
    out["gndgl"] = _time(lambda x, y: ex.train_step(x, y, hand.LR), batches(True), args.warmup, args.steps,
                         device, args.batch)
    out["noaug"] = _time(lambda x, y: ex.train_step(x, y, hand.LR), batches(False), args.warmup, args.steps,
                         device, args.batch)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda", help="cuda, cuda:N or cpu (default cuda)")
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--steps", type=int, default=50, help="timed steps per variant")
    ap.add_argument("--warmup", type=int, default=10)
    ap.add_argument("--images", type=int, default=50000, help="size of the resident training set")
    ap.add_argument("--no-amp", dest="amp", action="store_false", help="float32 instead of bf16 autocast")
    ap.add_argument("--no-channels-last", dest="channels_last", action="store_false")
    ap.add_argument("--only", nargs="*", default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA device here; use --device cpu for a smoke test")
    amp = args.amp and device.type == "cuda"
    args.channels_last = args.channels_last and device.type == "cuda"
    data = load_dataset("synthetic", synthetic={"n_train": args.images, "n_test": 16}).to(device)
    rows = []
    for spec, label, make_hand in CONFIGS:
        if args.only and spec not in args.only:
            continue
        r = bench(spec, make_hand, data, args, device, amp)
        rows.append((spec, label, r))
        print(f"  {spec}: done", file=sys.stderr, flush=True)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"\nbatch {args.batch}, {args.steps} steps after {args.warmup} warm-up, "
          f"{'bf16 autocast' if amp else 'float32'}, {'channels_last' if args.channels_last else 'NCHW'}; "
          f"device {name}; torch {torch.__version__}")
    print(f"{'config':<16} {'hand img/s':>11} {'gndgl img/s':>12} {'ratio':>7} {'no-aug img/s':>13} "
          f"{'hand MiB':>9} {'gndgl MiB':>10}")
    for _spec, label, r in rows:
        print(f"{label:<16} {r['hand'][0]:>11.0f} {r['gndgl'][0]:>12.0f} {r['gndgl'][0] / r['hand'][0]:>6.2f}x "
              f"{r['noaug'][0]:>13.0f} {r['hand'][1]:>9.0f} {r['gndgl'][1]:>10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
