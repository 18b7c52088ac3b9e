"""Kill-and-resume: a run stopped mid-epoch (in process, or by a real SIGKILL) and resumed
from its last checkpoint ends with exactly the weights of an uninterrupted run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from gndgl_compiler import compile_spec
from gndgl_compiler.runtime.metrics import read_metrics
from gndgl_compiler.runtime.train import TrainOptions, train_artifact
from tiny_spec import tiny_spec

# A small GN-DGL net (K=2, G=2, sharing, diversity, separate 1c2f head) on the 3x32x32 synthetic data.
# Augmentation is on so that resuming must also reproduce the crop/flip draws.
TINY = tiny_spec("tiny_resume", """
train:
  dataset: synthetic
  batch_size: 16
  epochs: 3
  optimizer: OPTIMIZER
  schedule: {kind: cosine, warmup_epochs: 0.5, warmup_start_lr: 0.01}
  augment: {crop_pad: 4, flip: true}
  seed: 3
  log_every: 2
""")
SGD = "{kind: sgd, lr: 0.1, momentum: 0.9, nesterov: true, weight_decay: 5.0e-4}"
ADAM = "{kind: adam, lr: 0.003, weight_decay: 1.0e-4}"


pytestmark = pytest.mark.usefixtures("one_thread")


def spec_text(optimizer: str = SGD) -> str:
    return TINY.replace("OPTIMIZER", optimizer)


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = load_file(str(a)), load_file(str(b))
    assert wa.keys() == wb.keys()
    bad = [k for k in wa if not torch.equal(wa[k], wb[k])]
    assert not bad, f"{len(bad)} of {len(wa)} tensors differ, e.g. {bad[:5]}"


def comparable(records: list[dict]) -> list[tuple]:
    """Metric records without the wall-clock fields."""
    out = []
    for r in records:
        r = {k: v for k, v in r.items() if k not in ("images_per_s", "wall_s")}
        out.append(tuple(sorted((k, str(v)) for k, v in r.items())))
    return out


# ---------------------------------------------------------------- (a) in process

@pytest.mark.parametrize("optimizer,fused", [(SGD, True), (ADAM, False)], ids=["sgd-fused", "adam-unfused"])
def test_stop_and_resume_in_process_is_exact(tmp_path, optimizer, fused):
    art = compile_spec(spec_text(optimizer), out_dir=tmp_path / "art").path
    common = dict(limit_train=64, limit_test=32, checkpoint_every=3, fused=fused, tensorboard=False)
    # 64 images / batch 16 = 4 steps per epoch, 3 epochs = 12 steps
    full = train_artifact(art, TrainOptions(run_dir=str(tmp_path / "full"), **common))
    assert full["complete"] and full["steps"] == 12

    part = train_artifact(art, TrainOptions(run_dir=str(tmp_path / "part"), max_steps=6, **common))
    assert part["steps"] == 6 and not part["complete"]  # stopped in the middle of epoch 2
    ckpts = sorted(p.name for p in (tmp_path / "part" / "checkpoints").glob("*.json"))
    assert ckpts[-1] == "ckpt-000000006.json"

    resumed = train_artifact(None, TrainOptions(resume=str(tmp_path / "part")))
    assert resumed["complete"] and resumed["steps"] == 12
    assert_same_weights(tmp_path / "full" / "weights.safetensors", tmp_path / "part" / "weights.safetensors")
    assert resumed["history"] == full["history"]
    # the metrics log of the resumed run is the uninterrupted one: nothing lost, nothing repeated
    assert comparable(read_metrics(tmp_path / "part")) == comparable(read_metrics(tmp_path / "full"))


# ---------------------------------------------------------------- (b) a real SIGKILL

def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "gndgl_cli.main", *args]


def _env() -> dict:
    env = dict(os.environ)
    env.update(OMP_NUM_THREADS="1", MKL_NUM_THREADS="1", PYTHONUNBUFFERED="1", COLUMNS="200")
    return env


@pytest.mark.slow
def test_sigkill_and_resume_matches_uninterrupted(tmp_path):
    spec = tmp_path / "tiny_resume.yaml"
    spec.write_text(spec_text())
    settings = ["--dataset", "synthetic", "--limit-train", "512", "--limit-test", "32", "--batch-size", "16",
                "--epochs", "2", "--checkpoint-every", "2", "--no-tensorboard"]
    run = tmp_path / "killed"
    proc = subprocess.Popen(_cli("train", str(spec), "--run-dir", str(run), *settings), cwd=tmp_path, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    ckpt_dir = run / "checkpoints"
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            if ckpt_dir.is_dir() and any(ckpt_dir.glob("*.json")):
                break
            time.sleep(0.005)
        assert proc.poll() is None, "training ended before its first checkpoint could be observed:\n" + \
            (proc.communicate()[0] or "")
        os.kill(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not (run / "weights.safetensors").exists() and not (run / "summary.json").exists()

    # the uninterrupted reference: same spec and settings, in this (single-threaded) process
    ref_art = compile_spec(spec, out_dir=tmp_path / "ref_art").path
    ref = train_artifact(ref_art, TrainOptions(run_dir=str(tmp_path / "ref"), dataset="synthetic", limit_train=512,
                                               limit_test=32, batch_size=16, epochs=2, checkpoint_every=2,
                                               tensorboard=False))
    assert ref["complete"] and ref["steps"] == 64

    res = subprocess.run(_cli("train", "--resume", str(run)), cwd=tmp_path, env=_env(), capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    assert "Traceback" not in res.stderr
    assert_same_weights(tmp_path / "ref" / "weights.safetensors", run / "weights.safetensors")
    steps = [(r["step"], r["partition"]) for r in read_metrics(run) if r["kind"] == "train"]
    assert len(steps) == len(set(steps)), "metrics repeat steps after the resume"
    assert max(s for s, _ in steps) == 64


def test_resume_between_log_steps_keeps_the_metrics(tmp_path):
    art = compile_spec(spec_text(), out_dir=tmp_path / "art").path
    common = dict(epochs=2, limit_train=64, limit_test=16, log_every=2, tensorboard=False)
    train_artifact(art, TrainOptions(run_dir=str(tmp_path / "full"), **common))
    train_artifact(art, TrainOptions(run_dir=str(tmp_path / "part"), max_steps=5, **common))  # log steps: 2, 4, 6
    train_artifact(None, TrainOptions(resume=str(tmp_path / "part")))
    assert_same_weights(tmp_path / "full" / "weights.safetensors", tmp_path / "part" / "weights.safetensors")
    assert comparable(read_metrics(tmp_path / "part")) == comparable(read_metrics(tmp_path / "full"))
