"""Training-step throughput: gndgl's Executor against hand-written eager PyTorch.

For ResNet-32 end-to-end, DGL K=8 and GN-DGL K=8 G=4 (the specs in ``specs/``), this
times one optimisation step of

* gndgl, fused   — ``Executor(per_device_optim=True)``: sibling-fused modules (``runtime/fusion/``), one backward
                   per module and one foreach SGD step per device;
* gndgl, unfused — ``Executor(per_device_optim=False)``: per-partition backward and SGD step;
* hand-written   — the same network and local-learning recipe written plainly in PyTorch
                   (nn.Module / nn.Sequential, ``.detach()`` between modules, one optimizer
                   per module, ``F.cross_entropy``, ``loss.backward()``, ``opt.step()``),

on the same batches, on the CPU, after warm-up. The three variants of a config are run
interleaved step by step (A B C, B C A, C A B, ...) so that drifting machine load hits
them alike; each step is timed on its own and the table reports the median wall time
(steps/s and the ratio gndgl / hand-written) and, as a check on a shared machine, the
ratio of the median process CPU times (user + system; with ``--threads 1`` it is what
the step costs, whatever else the machine runs).

The last column counts minor page faults per step. glibc's malloc returns freed heap
memory to the OS (heap trimming / mmap thresholds), and a loop that keeps more
activations alive at once — the Executor runs every body forward before any backward —
pays page faults on the next step. ``MALLOC_TRIM_THRESHOLD_=100000000000
MALLOC_MMAP_THRESHOLD_=33554432`` (or jemalloc/tcmalloc) removes that effect for all variants.
On a shared machine ``--threads 1`` avoids the OpenMP oversubscription collapse.

    python benchmarks/train_step.py --steps 10 --batch 64 [--threads 1]
"""

from __future__ import annotations

import argparse
import copy
import resource
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from hand_loops import Head1c2f, PoolFC  # noqa: E402  (the heads step_cost.py's loops use)

from gndgl_compiler import compile_spec  # noqa: E402
from gndgl_compiler.losses import diversity_penalty, diversity_probs  # noqa: E402
from gndgl_compiler.runtime.step.executor import Executor  # noqa: E402

SPECS = Path(__file__).resolve().parents[1] / "specs"
LR, MOMENTUM, WD = 0.1, 0.9, 1e-4
OPT = {"kind": "sgd", "lr": LR, "momentum": MOMENTUM, "nesterov": True, "weight_decay": WD, "betas": (0.9, 0.999)}
NUM_CLASSES = 10


def sgd(params):
    return torch.optim.SGD(params, lr=LR, momentum=MOMENTUM, nesterov=True, weight_decay=WD)


# ======================================================================================
# Hand-written ResNet-32 pieces
# ======================================================================================

class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


def stem(cout=16):
    return nn.Sequential(nn.Conv2d(3, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())


# ResNet-32: 3 stages x 5 blocks; the spec's K=8 cuts (stem + s1.b0 | 2 blocks | ... | 2 blocks)
BLOCKS = [(s, b, cin, cout, 2 if (b == 0 and s > 1) else 1)
          for s, (cin0, cout) in enumerate([(16, 16), (16, 32), (32, 64)], start=1)
          for b, cin in enumerate([cin0] + [cout] * 4)]
K8_MODULES = [[0], [1, 2], [3, 4], [5, 6], [7, 8], [9, 10], [11, 12], [13, 14]]  # block indices per module


class ResNet32(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = stem()
        self.blocks = nn.Sequential(*[BasicBlock(cin, cout, st) for _, _, cin, cout, st in BLOCKS])
        self.fc = nn.Linear(64, NUM_CLASSES)

    def forward(self, x):
        x = self.blocks(self.stem(x))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


class HandE2E:
    def __init__(self):
        self.net = ResNet32()
        self.opt = sgd(self.net.parameters())
        self.net.train()

    def step(self, x, y):
        loss = F.cross_entropy(self.net(x), y)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()

    def modules(self):
        return [self.net]


# ---------------------------------------------------------------- DGL, K=8, joint final head

class HandDGL:
    """DGL: K modules, each an nn.Sequential trained by its own 1c2f aux head (the last one by the
    model's avgpool + linear classifier) on the detached output of the previous module."""

    def __init__(self):
        self.mods, self.heads, self.opts = [], [], []
        for k, idx in enumerate(K8_MODULES):
            layers = [stem()] if k == 0 else []
            layers += [BasicBlock(*BLOCKS[i][2:]) for i in idx]
            body = nn.Sequential(*layers)
            c = BLOCKS[idx[-1]][3]
            head = PoolFC(c) if k == len(K8_MODULES) - 1 else Head1c2f(c)
            self.mods.append(body.train())
            self.heads.append(head.train())
            self.opts.append(sgd(list(body.parameters()) + list(head.parameters())))

    def step(self, x, y):
        h = x
        for body, head, opt in zip(self.mods, self.heads, self.opts):
            h = body(h.detach())
            loss = F.cross_entropy(head(h), y)
            opt.zero_grad()
            loss.backward()
            opt.step()

    def modules(self):
        return self.mods + self.heads


# ---------------------------------------------------------------- GN-DGL, K=8, G=4

class GroupBlock(nn.Module):
    """Group g's share of a BasicBlock: C_out/G output channels. ``dense`` (first unit of a module):
    conv1 and a 1x1 shortcut read the full input; otherwise every conv reads only the group's slice."""

    def __init__(self, cin, cout, stride, G, g, dense):
        super().__init__()
        cg, cin_g = cout // G, (cin if dense else cin // G)
        self.conv1 = nn.Conv2d(cin_g, cg, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cg)
        self.conv2 = nn.Conv2d(cg, cg, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cg)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(nn.Conv2d(cin_g, cg, 1, stride, bias=False), nn.BatchNorm2d(cg))
        self.slice = slice(g * cg, (g + 1) * cg) if dense else slice(None)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        sc = x[:, self.slice] if self.shortcut is None else self.shortcut(x)
        return F.relu(out + sc)


class HandGNDGL:
    """GN-DGL: every module split into G groups (dense first conv, grouped later layers); each group's
    1c2f aux head sees the full module output with its own slice live and the siblings detached, and its
    loss adds the diversity penalty; a separate 1c2f final head trains on the detached last output.
    One optimizer per module (its G groups and heads), one for the final head."""

    def __init__(self, G=4, div_weight=0.5, temperature=3.0):
        self.G, self.w, self.T = G, div_weight, temperature
        self.groups, self.heads, self.opts = [], [], []
        for k, idx in enumerate(K8_MODULES):
            nets, heads = [], []
            for g in range(G):
                layers = [stem(16 // G)] if k == 0 else []
                layers += [GroupBlock(*BLOCKS[i][2:], G, g, dense=(k > 0 and j == 0)) for j, i in enumerate(idx)]
                nets.append(nn.Sequential(*layers).train())
                heads.append(Head1c2f(BLOCKS[idx[-1]][3]).train())
            self.groups.append(nets)
            self.heads.append(heads)
            self.opts.append(sgd([p for m in nets + heads for p in m.parameters()]))
        self.final = Head1c2f(64).train()
        self.final_opt = sgd(self.final.parameters())

    def step(self, x, y):
        h = x
        for nets, heads, opt in zip(self.groups, self.heads, self.opts):
            inp = h.detach()
            outs = [net(inp) for net in nets]
            logits = []
            for g, head in enumerate(heads):
                shared = torch.cat([o if j == g else o.detach() for j, o in enumerate(outs)], dim=1)
                logits.append(head(shared))
            p_hat = [diversity_probs(lg, y, self.T) for lg in logits]
            loss = 0.0
            for g, lg in enumerate(logits):
                others = [p.detach() for j, p in enumerate(p_hat) if j != g]
                loss = loss + F.cross_entropy(lg, y) + self.w * diversity_penalty(p_hat[g], others)
            opt.zero_grad()
            loss.backward()
            opt.step()
            h = torch.cat(outs, dim=1)
        loss = F.cross_entropy(self.final(h.detach()), y)
        self.final_opt.zero_grad()
        loss.backward()
        self.final_opt.step()

    def modules(self):
        return [m for nets in self.groups for m in nets] + [m for hs in self.heads for m in hs] + [self.final]


# ======================================================================================
# gndgl
# ======================================================================================

class Gndgl:
    def __init__(self, art, fused):
        mods = copy.deepcopy(art.modules)
        self.ex = Executor(art.plan, mods, OPT, {pid: torch.device("cpu") for pid in mods}, per_device_optim=fused)

    def step(self, x, y):
        self.ex.train_step(x, y, LR)

    def modules(self):
        return list(self.ex.modules.values())


def n_params(mods) -> int:
    return sum(p.numel() for m in mods for p in m.parameters())


CONFIGS = [
    ("resnet32_e2e", "end-to-end", HandE2E),
    ("resnet32_k8g1", "DGL K=8", HandDGL),
    ("resnet32_k8g4", "GN-DGL K=8 G=4", HandGNDGL),
]


def bench_config(spec, make_hand, batches, steps, warmup):
    art = compile_spec(SPECS / f"{spec}.yaml")
    torch.manual_seed(0)
    variants = {"fused": Gndgl(art, True), "unfused": Gndgl(art, False), "hand": make_hand()}
    counts = {k: n_params(v.modules()) for k, v in variants.items()}
    if len(set(counts.values())) != 1:
        raise SystemExit(f"{spec}: the networks differ in size: {counts}")
    names = list(variants)
    times = {k: [] for k in names}
    cpu = {k: [] for k in names}
    faults = {k: 0 for k in names}
    for i in range(warmup + steps):
        x, y = batches[i % len(batches)]
        order = names[i % 3:] + names[:i % 3]  # rotate who goes first
        for k in order:
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            c0, t0 = time.process_time(), time.perf_counter()
            variants[k].step(x, y)
            dt, dc = time.perf_counter() - t0, time.process_time() - c0
            if i >= warmup:
                times[k].append(dt)
                cpu[k].append(dc)
                faults[k] += resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0
    return {"median": {k: 1.0 / statistics.median(v) for k, v in times.items()},
            "cpu": {k: 1.0 / statistics.median(v) for k, v in cpu.items()},
            "faults": {k: faults[k] / steps for k in names},
            "params": counts["hand"], "partitions": len(art.plan.partitions)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=10, help="timed steps per variant (default 10)")
    ap.add_argument("--batch", type=int, default=64, help="batch size (default 64)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up steps per variant (default 2)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--only", nargs="*", default=None, help="spec names to run (default: all three)")
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    g = torch.Generator().manual_seed(0)
    batches = [(torch.randn(args.batch, 3, 32, 32, generator=g),
                torch.randint(0, NUM_CLASSES, (args.batch,), generator=g))
               for _ in range(4)]
    rows = []
    for spec, label, make_hand in CONFIGS:
        if args.only and spec not in args.only:
            continue
        rows.append((spec, label, bench_config(spec, make_hand, batches, args.steps, args.warmup)))
        print(f"  {spec}: done", file=sys.stderr, flush=True)

    title = (f"train step, CPU ({torch.get_num_threads()} threads), batch {args.batch}, "
             f"median of {args.steps} interleaved steps after {args.warmup} warm-up; torch {torch.__version__}")
    header = ["spec", "method", "parts", "params", "hand-written steps/s", "gndgl fused steps/s",
              "gndgl unfused steps/s", "fused / hand", "unfused / hand", "CPU time: fused/hand, unfused/hand",
              "page faults/step: hand, fused, unfused"]
    table = []
    for spec, label, res in rows:
        r, b, f = res["median"], res["cpu"], res["faults"]
        table.append([spec, label, str(res["partitions"]), f"{res['params'] / 1e6:.3f}M", f"{r['hand']:.3f}",
                      f"{r['fused']:.3f}", f"{r['unfused']:.3f}", f"{r['fused'] / r['hand']:.3f}x",
                      f"{r['unfused'] / r['hand']:.3f}x",
                      f"{b['fused'] / b['hand']:.3f}x, {b['unfused'] / b['hand']:.3f}x",
                      f"{f['hand']:.0f}, {f['fused']:.0f}, {f['unfused']:.0f}"])
    try:
        from rich.console import Console
        from rich.table import Table
        t = Table(title=title)
        for h in header:
            t.add_column(h, justify="left" if h in ("spec", "method") else "right")
        for r in table:
            t.add_row(*r)
        Console(width=220).print(t)
    except ImportError:
        print(title)
        widths = [max(len(h), *(len(r[i]) for r in table)) for i, h in enumerate(header)]
        print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
        for r in table:
            print("  ".join(c.ljust(w) for c, w in zip(r, widths)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
