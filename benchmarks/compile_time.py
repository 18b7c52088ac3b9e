"""Compile-time benchmark: 129-partition ResNet-32 / 2×ResNet-32 (K=16, G=8).

Splits the cost of `gndgl compile` into interpreter + imports, the compile pipeline
(spec → graph → plan → fx modules, in memory), writing the artifact, and the whole
command as a user runs it. Prints one table.

    python benchmarks/compile_time.py [--repeat 3]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = {"resnet32_k16g8": ("specs/resnet32_k8g4.yaml", 1), "resnet32x2_k16g8": ("specs/resnet32x2_k8g4.yaml", 2)}


def _wall(cmd: list[str]) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    from gndgl_compiler import compile_spec
    from gndgl_compiler.spec import load_spec

    py = sys.executable
    t_python = statistics.median(_wall([py, "-c", "pass"]) for _ in range(args.repeat))
    t_torch = statistics.median(_wall([py, "-c", "import torch"]) for _ in range(args.repeat))
    t_import = statistics.median(_wall([py, "-c", "import gndgl_compiler, gndgl_cli.main"]) for _ in range(args.repeat))
    rows = []
    for name, (path, _width) in CONFIGS.items():
        spec = load_spec(ROOT / path)
        spec.name, spec.cuts.depth, spec.cuts.width = name, 16, 8
        compile_spec(spec)  # warm-up
        pipe, write = [], []
        for _ in range(args.repeat):
            t = time.perf_counter()
            art = compile_spec(spec)
            pipe.append(time.perf_counter() - t)
            with tempfile.TemporaryDirectory() as d:
                t = time.perf_counter()
                compile_spec(spec, Path(d) / "out")
                write.append(time.perf_counter() - t - pipe[-1])
        with tempfile.TemporaryDirectory() as d:
            spec_file = Path(d) / f"{name}.yaml"
            text = (ROOT / path).read_text().replace("depth: 8", "depth: 16").replace("width: 4", "width: 8")
            spec_file.write_text(text)
            cmd = [py, "-m", "gndgl_cli.main", "compile", str(spec_file), "-o", str(Path(d) / "c"), "--json"]
            t_cmd = statistics.median(_wall(cmd) for _ in range(args.repeat))
        rows.append((name, len(art.plan.partitions), statistics.median(pipe), statistics.median(write), t_cmd))
    print(f"python start {t_python:.2f}s · import torch {t_torch:.2f}s · import gndgl {t_import:.2f}s "
          f"(medians of {args.repeat})")
    print(f"{'config':<18} {'partitions':>10} {'pipeline s':>11} {'write s':>8} {'gndgl compile s':>16}  target")
    for name, n, p, w, c in rows:
        print(f"{name:<18} {n:>10} {p:>11.2f} {w:>8.2f} {c:>16.2f}  pipeline<1s {'ok' if p < 1 else 'MISS'}, "
              f"command<5s {'ok' if c < 5 else 'MISS'}")


if __name__ == "__main__":
    main()
