"""What one training step costs: aten ops, CPU ms, and (on CUDA) images/s and peak memory.

For end-to-end, DGL K=8, GN-DGL K=2 G=2, K=4 G=4, K=8 G=4, AugLocal (cut after every unit up to the 13th,
d = 2, τ = 0.5), GN-DGL K=8 G=4 with AugLocal aux nets, DGL+MAN K=8 and GN-DGL+MAN K=8 G=4 (ResNet-32, the specs
in ``specs/``),
three ways to run the same network and recipe:

* gndgl fused          — ``Executor(per_device_optim=True)``: sibling-fused modules, one backward per module
                         and device, one foreach optimizer step per device;
* gndgl per-partition  — ``Executor(per_device_optim=True, siblings=False)``: every partition its own program;
* hand-written         — ``benchmarks/hand_loops.py``, written as the paper's official code is
                         (dense first conv + ``Conv2d(groups=G)``, G 1c2f heads over
                         ``cat(own live, siblings detached)``, one optimizer; AugLocal as its official
                         code: one backward over the summed local losses).

aten ops per step are counted with a ``TorchDispatchMode`` (deterministic: the primary metric).
CPU ms per step is the median over ``--steps`` steps (after warm-up) of the process CPU time a step
takes (user + system: with ``--threads 1`` that is what the step costs, whatever else a shared
machine runs), the three variants interleaved step by step (A B C, B C A, ...) so that machine load
hits them alike. The "paired" column is the median (with quartiles) over rounds of the ratio fused ÷
hand within one round, the steps measured back to back: what machine noise leaves of the comparison.
On CUDA the ms column is wall time between synchronisations.

    python benchmarks/step_cost.py --threads 1 --batch 32 --steps 7
    python benchmarks/step_cost.py --device cuda --batch 256      # images/s and peak MiB
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
import hand_loops as hand  # noqa: E402

from gndgl_compiler import compile_spec  # noqa: E402
from gndgl_compiler.profiling import count_ops  # noqa: E402
from gndgl_compiler.runtime.step.executor import Executor  # noqa: E402

SPECS = Path(__file__).resolve().parents[1] / "specs"
CONFIGS = [
    ("resnet32_e2e", "end-to-end", lambda: hand.HandE2E()),
    ("resnet32_k8g1", "DGL K=8", lambda: hand.HandDGL(8)),
    ("resnet32_k2g2", "GN-DGL K=2 G=2", lambda: hand.HandGNDGL(2, 2)),
    ("resnet32_k4g4", "GN-DGL K=4 G=4", lambda: hand.HandGNDGL(4, 4)),
    ("resnet32_k8g4", "GN-DGL K=8 G=4", lambda: hand.HandGNDGL(8, 4)),
    ("auglocal/resnet32_auglocal_d2", "AugLocal K=14 d=2", lambda: hand.HandAugLocal()),
    ("auglocal/resnet32_k8g4_auglocal_d2", "GN-DGL+AugLocal K=8 G=4", lambda: hand.HandGNDGLAugLocal(8, 4)),
    ("man/resnet32_dgl_man_k8", "DGL+MAN K=8", lambda: hand.HandDGLMAN(8)),
    ("man/resnet32_gndgl_man_k8g4", "GN-DGL+MAN K=8 G=4", lambda: hand.HandGNDGLMAN(8, 4)),
]


class Gndgl:
    """gndgl's Executor on one device, as a ``step(x, y)``."""

    def __init__(self, art, siblings: bool, device: torch.device):
        mods = copy.deepcopy(art.modules)
        self.ex = Executor(art.plan, mods, hand.OPT, {pid: device for pid in mods}, per_device_optim=True,
                           siblings=siblings)

    def step(self, x, y):
        self.ex.train_step(x, y, hand.LR)

    def modules(self):
        return list(self.ex.modules.values())


def n_params(mods) -> int:
    return sum(p.numel() for m in mods for p in m.parameters())


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def bench(spec: str, make_hand, args, device: torch.device) -> dict:
    """Ops, ms per step (and on CUDA images/s, peak MiB) of the three variants of one config."""
    art = compile_spec(SPECS / f"{spec}.yaml")
    torch.manual_seed(0)
    variants = {"fused": Gndgl(art, True, device), "per-partition": Gndgl(art, False, device), "hand": make_hand()}
    for m in variants["hand"].modules():
        m.to(device)
    sizes = {k: n_params(v.modules()) for k, v in variants.items()}
    if len(set(sizes.values())) != 1:
        raise SystemExit(f"{spec}: the networks differ in size: {sizes}")
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch, 3, 32, 32, generator=g).to(device),
                torch.randint(0, hand.NUM_CLASSES, (args.batch,), generator=g).to(device)) for _ in range(2)]
    names = list(variants)
    for _ in range(args.warmup):
        for k in names:
            variants[k].step(*batches[0])
    ops = {k: count_ops(variants[k].step, *batches[0]) for k in names}
    times: dict[str, list[float]] = {k: [] for k in names}
    for i in range(args.steps):
        x, y = batches[i % 2]
        for k in names[i % 3:] + names[:i % 3]:
            _sync(device)
            c0, t0 = time.process_time(), time.perf_counter()
            variants[k].step(x, y)
            _sync(device)
            times[k].append(time.process_time() - c0 if device.type == "cpu" else time.perf_counter() - t0)
    paired = sorted(f / h for f, h in zip(times["fused"], times["hand"]))  # same round, back to back
    q = statistics.quantiles(paired, n=4) if len(paired) > 1 else paired * 3
    out = {"ops": ops, "ms": {k: 1e3 * statistics.median(v) for k, v in times.items()},
           "paired": (q[0], statistics.median(paired), q[2]),
           "parts": len(art.plan.partitions), "params": sizes["hand"],
           "fused_modules": sum(r["fused"] for r in variants["fused"].ex.fusion),
           "modules": len(variants["fused"].ex.fusion)}
    if device.type == "cuda":
        out["img_s"], out["peak_mib"] = {}, {}
        for k in names:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
            _sync(device)
            t0 = time.perf_counter()
            for i in range(args.steps):
                variants[k].step(*batches[i % 2])
            _sync(device)
            out["img_s"][k] = args.steps * args.batch / (time.perf_counter() - t0)
            out["peak_mib"][k] = torch.cuda.max_memory_allocated(device) / 2 ** 20
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--steps", type=int, default=7, help="timed steps per variant (median)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (CPU; use 1 on a shared machine)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--only", nargs="*", default=None, help="spec names to run (default: all)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rows = []
    for spec, label, make_hand in CONFIGS:
        if args.only and spec not in args.only:
            continue
        rows.append((label, bench(spec, make_hand, args, device)))
        print(f"  {spec}: done", file=sys.stderr, flush=True)
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} thread(s)"
    print(f"\none training step, batch {args.batch}, median of {args.steps} interleaved steps after {args.warmup} "
          f"warm-up; {where}; torch {torch.__version__}\n'paired': the median (and quartiles) over rounds of fused "
          f"time / hand time measured back to back in the same round (robust to slow drifts in machine load)")
    cols = ["config", "parts", "fused mods", "ops fused", "ops per-part", "ops hand", "fused/hand ops",
            "ms fused", "ms per-part", "ms hand", "fused/hand ms", "paired (IQR)"]
    if device.type == "cuda":
        cols += ["img/s fused", "img/s hand", "MiB fused", "MiB hand"]
    table = []
    for label, r in rows:
        o, m = r["ops"], r["ms"]
        row = [label, str(r["parts"]), f"{r['fused_modules']}/{r['modules']}", str(o["fused"]), str(o["per-partition"]),
               str(o["hand"]), f"{o['fused'] / o['hand']:.2f}x", f"{m['fused']:.1f}", f"{m['per-partition']:.1f}",
               f"{m['hand']:.1f}", f"{m['fused'] / m['hand']:.2f}x",
               "{1:.2f}x ({0:.2f}-{2:.2f})".format(*r["paired"])]
        if device.type == "cuda":
            row += [f"{r['img_s']['fused']:.0f}", f"{r['img_s']['hand']:.0f}", f"{r['peak_mib']['fused']:.0f}",
                    f"{r['peak_mib']['hand']:.0f}"]
        table.append(row)
    widths = [max(len(c), *(len(t[i]) for t in table)) for i, c in enumerate(cols)]
    print("| " + " | ".join(c.ljust(w) for c, w in zip(cols, widths)) + " |")
    print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for t in table:
        print("| " + " | ".join(c.ljust(w) for c, w in zip(t, widths)) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
