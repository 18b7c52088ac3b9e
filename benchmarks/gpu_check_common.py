"""What the parts of ``benchmarks/gpu_check.py`` share: paths, small device helpers, a phase's
status, and the training subprocesses (command line, environment, log, and the ``--child-train``
mode they run where ``gndgl_cli`` is not installed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import traceback
from pathlib import Path

import torch

from gndgl_compiler.runtime.train import TrainOptions, train_artifact

ROOT = Path(__file__).resolve().parents[1]
SPECS = ROOT / "specs"
SCRIPT = Path(__file__).resolve().with_name("gpu_check.py")
"""The entry point; training subprocesses run it in ``--child-train`` mode."""

LOG_FILE = "gpu_check_logs.txt"
"""All subprocess output, appended in order (one file: a device machine returns at most 8 files)."""


# ---------------------------------------------------------------------------------------------- helpers
def log(msg: str) -> None:
    """Print one progress line (flushed, so a pipe or log file shows it at once)."""
    print(msg, flush=True)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """Relative norm error ‖a − b‖ / ‖b‖ in float64 (absolute when b is zero)."""
    a, b = a.double(), b.double()
    nb = float(b.norm())
    return float((a - b).norm()) / nb if nb > 0 else float((a - b).norm())


def sync(device: torch.device) -> None:
    """Wait for the device (no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def free(device: torch.device) -> None:
    """Release cached device memory between checks."""
    if device.type == "cuda":
        torch.cuda.empty_cache()


def spec_path(name: str) -> Path:
    """Path of a shipped spec by name."""
    return SPECS / f"{name}.yaml"


def short_trace(exc: BaseException, keep: int = 4) -> str:
    """The last ``keep`` frames of an exception's traceback inside this project, one per line."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if str(ROOT) in f.filename]
    return " | ".join(f"{Path(f.filename).relative_to(ROOT)}:{f.lineno} in {f.name}" for f in frames[-keep:])

def phase_status(checks: list[dict]) -> str:
    """``fail`` if any check failed, ``skipped`` if all were skipped, else ``pass``."""
    if any(c["status"] == "fail" for c in checks):
        return "fail"
    if checks and all(c["status"] == "skipped" for c in checks):
        return "skipped"
    return "pass"


# ---------------------------------------------------------------------------------------------- subprocesses
def train_command(args, art_dir: Path, opts: dict) -> tuple[list[str], str]:
    """Command line of a training subprocess and which runner it uses.

    ``gndgl train`` (``python -m gndgl_cli.main``) where the ``gndgl_cli`` package is installed, else
    (``--runner child``, or a checkout that is not pip-installed, as on a bare GPU machine) this
    script's own ``--child-train`` mode, which calls ``train_artifact`` with the same options.
    """
    runner = args.runner
    if runner == "auto":
        runner = "cli" if importlib.util.find_spec("gndgl_cli") is not None else "child"
    if runner == "child":
        opts_file = Path(opts["run_dir"]).parent / (Path(opts["run_dir"]).name + ".opts.json")
        opts_file.parent.mkdir(parents=True, exist_ok=True)
        opts_file.write_text(json.dumps(opts), encoding="utf-8")
        return [sys.executable, str(SCRIPT), "--child-train", str(art_dir),
                "--child-opts", str(opts_file)], "child"
    cmd = [sys.executable, "-m", "gndgl_cli.main", "train", str(art_dir), "--no-tensorboard"]
    for key, val in opts.items():
        cmd += ["--" + key.replace("_", "-"), str(val)]
    return cmd, "cli"


def child_env() -> dict:
    """Environment of a subprocess: unbuffered, and this checkout importable."""
    path = os.pathsep.join([str(ROOT)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))
    return {**os.environ, "PYTHONUNBUFFERED": "1", "PYTHONPATH": path}


def append_log(out: Path, title: str, log_path: Path, keep: int = 150) -> None:
    """Append the last ``keep`` lines of a subprocess log to ``OUT/gpu_check_logs.txt``."""
    lines = log_path.read_text(encoding="utf-8", errors="replace").splitlines() if log_path.is_file() else []
    cut = [f"... ({len(lines) - keep} lines left out)"] if len(lines) > keep else []
    with open(out / LOG_FILE, "a", encoding="utf-8") as fh:
        fh.write("\n".join([f"===== {title}", *cut, *lines[-keep:], ""]) + "\n")

def child_main(argv: list[str]) -> int:
    """``--child-train ART_DIR --child-opts FILE``: train like ``gndgl train`` (options from a JSON file)."""
    from gndgl_compiler.errors import GndglError

    ap = argparse.ArgumentParser(prog="gpu_check.py --child-train")
    ap.add_argument("--child-train", type=Path, required=True)
    ap.add_argument("--child-opts", type=Path, required=True)
    a = ap.parse_args(argv)
    opts = json.loads(a.child_opts.read_text(encoding="utf-8"))
    fields = set(TrainOptions.__dataclass_fields__)
    if set(opts) - fields:
        print(f"error: unknown training option(s) {sorted(set(opts) - fields)}", file=sys.stderr)
        return 2
    def show(rec: dict) -> None:
        if rec.get("kind") in ("eval", "note", "setup"):
            print(json.dumps({k: v for k, v in rec.items() if k != "partition_acc"}), flush=True)

    opts.update(tensorboard=False, on_log=show)
    try:
        summary = train_artifact(a.child_train, TrainOptions(**opts))
    except GndglError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return getattr(exc, "exit_code", 1)
    print(json.dumps({k: v for k, v in summary.items() if k != "history"}), flush=True)
    return 0
