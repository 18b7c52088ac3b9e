"""ResNet-32 depth × width sweep against the paper's Tables 4 and 5.

Compiles every (K, G) of K ∈ {1,2,4,8,16} × G ∈ {1,2,4,8} (plans only, no training),
prints one line per cell with our training / inference speed-ups, the paper's
value and the relative difference, and the time the sweep took.

    python benchmarks/sweep_table.py [--spec specs/resnet32_k8g4.yaml] [-o sweep/]
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from gndgl_compiler.sweep import run_sweep
from gndgl_compiler.viz.tables import PAPER_INFERENCE_SPEEDUP, PAPER_TRAIN_SPEEDUP, write_tables

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    """Run the sweep and print the comparison (and write the tables with ``-o``)."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--spec", default=str(ROOT / "specs" / "resnet32_k8g4.yaml"))
    ap.add_argument("-o", "--output", default=None, help="also write table.md / table.csv here")
    args = ap.parse_args()
    t = time.perf_counter()
    rows = run_sweep(args.spec, [1, 2, 4, 8, 16], [1, 2, 4, 8])
    took = time.perf_counter() - t
    print(f"{'K':>3} {'G':>2} {'parts':>5} {'train×':>8} {'paper':>7} {'Δ%':>6} {'infer×':>7} {'paper':>6} {'Δ%':>6}")
    worst = 0.0
    for r in rows:
        pt, pi = PAPER_TRAIN_SPEEDUP.get((r.K, r.G)), PAPER_INFERENCE_SPEEDUP.get((r.K, r.G))
        dt = 100 * (r.training_speedup / pt - 1) if pt else None
        di = 100 * (r.inference_speedup / pi - 1) if pi else None
        worst = max([worst] + [abs(x) for x in (dt, di) if x is not None])
        f = lambda v, w, d=2: f"{v:>{w}.{d}f}" if v is not None else " " * (w - 1) + "—"  # noqa: E731
        print(f"{r.K:>3} {r.G:>2} {r.partitions:>5} {f(r.training_speedup, 8)} {f(pt, 7, 3)} {f(dt, 6, 1)} "
              f"{f(r.inference_speedup, 7)} {f(pi, 6, 3)} {f(di, 6, 1)}")
    print(f"largest difference from the paper: {worst:.1f}% · {len(rows)} configurations in {took:.2f}s")
    if args.output:
        for p in write_tables(rows, args.output, title="ResNet-32 sweep", paper=True):
            print(f"wrote {p}")


if __name__ == "__main__":
    main()
