"""AugLocal heads through the runtime (issue 23 item 3), on the tiny GN-DGL net with auglocal aux nets:

* single process, sibling-fused: stopped after 6 of 12 steps and resumed, it ends with the weights of the
  uninterrupted run (bit for bit); the export holds the inference net only (no aux-net tensor);
* distributed (gloo, 2 ranks, the existing machinery): the same weights as one process, bit for bit.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from dist_helpers import DIST, assert_same_weights, launch_run, split_modules, train_single
from gndgl_compiler import compile_spec, load_artifact
from gndgl_compiler.export import export_run
from gndgl_compiler.runtime.train import TrainOptions, train_artifact
from tiny_spec import tiny_spec

SPEC = tiny_spec("tiny_auglocal", """
train:
  dataset: synthetic
  batch_size: 16
  epochs: 3
  optimizer: {kind: sgd, lr: 0.1, momentum: 0.9, nesterov: true, weight_decay: 5.0e-4}
  augment: {crop_pad: 4, flip: true}
  seed: 3
""").replace("head: {kind: 1c2f, hidden: 32}", "head: {kind: auglocal, depth: 2, pyramid: 0.5}")


@pytest.mark.usefixtures("one_thread")
def test_fused_training_resumes_exactly_and_exports_without_aux_nets(tmp_path):
    art = compile_spec(SPEC, out_dir=tmp_path / "art").path
    common = dict(limit_train=64, limit_test=32, checkpoint_every=3, fused=True, tensorboard=False)
    full = train_artifact(art, TrainOptions(run_dir=str(tmp_path / "full"), **common))
    assert full["complete"] and full["steps"] == 12
    part = train_artifact(art, TrainOptions(run_dir=str(tmp_path / "part"), max_steps=6, **common))
    assert part["steps"] == 6 and not part["complete"]
    resumed = train_artifact(None, TrainOptions(resume=str(tmp_path / "part")))
    assert resumed["complete"] and resumed["steps"] == 12
    wa, wb = load_file(str(tmp_path / "full" / "weights.safetensors")), load_file(
        str(tmp_path / "part" / "weights.safetensors"))
    assert wa.keys() == wb.keys() and any("aux1_conv1" in k for k in wa)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    out = export_run(tmp_path / "full", tmp_path / "net.safetensors")
    exported = load_file(str(out))
    assert exported and not any("aux" in k for k in exported)
    assert sorted(exported) == sorted(load_artifact(art).assembled().state_dict())


def _distributed(test):
    for mark in DIST:
        test = mark(test)
    return test


@_distributed
def test_distributed_matches_single_process(tmp_path):
    """2 ranks; a module whose siblings sit on one rank runs sibling-fused there, so one process fuses
    exactly those (``train_single``'s ``split``)."""
    art = compile_spec(SPEC, out_dir=tmp_path / "art").path
    plan = load_artifact(art).plan
    split = split_modules(plan, 2)
    whole = {p.module for p in plan.partitions if p.groups > 1} - split
    launch_run(art, tmp_path / "dist", 2, 32)
    single = train_single(art, tmp_path / "single", 32, None, split if whole else None)
    assert_same_weights(load_file(str(tmp_path / "dist" / "weights.safetensors")), single)
