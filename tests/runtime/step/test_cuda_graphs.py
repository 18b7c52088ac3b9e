"""The capture-ready step, checked on the CPU (the CUDA capture itself is untested until a session
with a GPU runs ``benchmarks/gpu_check_correctness.py``):

* a capturable step (tensor LR, per-partition dropout generators, fused siblings) performs no
  host-synchronising op — ``_local_scalar_dense`` (``.item()``, ``bool(t)``), ``nonzero``,
  ``is_nonzero``, ``equal``, ... — with the LR changing between steps, and trains like the
  float-LR step (in float64, to 1e-10 of each partition's update: float32 at batch 4 amplifies rounding
  ~10x per step through BatchNorm, so a float32 comparison would measure the CPU's kernels, not the step);
* ``train.cuda_graphs``: ``auto`` resolves to off on the CPU, ``on`` exits 2 with the reason.
"""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from gndgl_compiler import compile_spec
from gndgl_compiler.errors import RunError
from gndgl_compiler.runtime.step.cuda_graphs import not_capturable, resolve
from gndgl_compiler.runtime.step.executor import Executor
from gndgl_compiler.runtime.train import TrainOptions, train_artifact
from float_compare import module_error, rel
from tiny_spec import tiny_spec
from paths import SPECS

CPU = torch.device("cpu")
SGD = {"kind": "sgd", "lr": 0.05, "momentum": 0.9, "nesterov": True, "weight_decay": 5e-4, "betas": (0.9, 0.999)}
A = torch.ops.aten
SYNCS = {A._local_scalar_dense.default, A.item.default, A.nonzero.default, A.is_nonzero.default,
         A.equal.default, A.masked_select.default, A.unique_consecutive.default, A._unique2.default}

pytestmark = pytest.mark.usefixtures("one_thread")


class _NoHostSync(TorchDispatchMode):
    """Fails on any op that reads a device value on the host (a sync on CUDA; breaks a capture)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in SYNCS or func.overloadpacket in {s.overloadpacket for s in SYNCS}:
            raise AssertionError(f"host sync in the step: {func}")
        return func(*args, **(kwargs or {}))


def _batch(art, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(4, *art.plan.input_shape, generator=g)
    return x.to(dtype), torch.randint(0, art.plan.num_classes, (4,), generator=g)


@pytest.mark.parametrize("spec,overrides", [
    ("resnet32_k2g2", []),
    ("vgg6a_g2", ["local.head.kind=linear", "model.dropout=0.3", "model.width=0.25"]),
], ids=["resnet-fused", "vgg-dropout-fused"])
def test_capturable_step_makes_no_host_sync_and_follows_the_lr(spec, overrides):
    art = compile_spec(SPECS / f"{spec}.yaml", overrides=overrides)
    devices = {p.id: CPU for p in art.plan.partitions}
    start = {pid: m.double() for pid, m in copy.deepcopy(art.modules).items()}
    before = {pid: {k: v.clone() for k, v in m.state_dict().items()} for pid, m in start.items()}
    cap = Executor(art.plan, copy.deepcopy(start), SGD, devices, capturable=True)
    ref = Executor(art.plan, copy.deepcopy(start), SGD, devices)
    assert any(r["fused"] for r in cap.fusion)
    lrs = [0.1, 0.05, 0.02, 0.2]
    for step, lr in enumerate(lrs):
        x, y = _batch(art, step, torch.float64)
        if step == 0:  # the first step makes the momentum buffers (a capture comes after warm-up steps)
            out = cap.train_step(x, y, lr, seed=(0, step))
        else:
            cap.begin_step(lr, seed=(0, step))  # host side: outside a captured region
            with _NoHostSync():
                out = cap.run_step(x, y, lr, seed=(0, step))
        want = ref.train_step(x, y, lr, seed=(0, step))
        for pid in want:
            assert rel(out[pid][0], want[pid][0]) <= 1e-10, (step, pid)
    assert all(float(g["lr"]) == pytest.approx(lrs[-1]) for o in cap.optimizers.values() for g in o.param_groups)
    # the four steps' updates, each tensor against its partition's whole update (a BatchNorm bias four steps
    # from its zero init is mostly rounding: its own relative error is noise)
    worst = module_error(cap.modules, ref.modules, before)
    assert worst[0] <= 1e-10, worst
    # the checkpoint format is unchanged: the LRs come out as floats and go back in as the device tensors
    state = cap.updater.state_dict()
    assert all(isinstance(g["lr"], float) for s in state.values() for g in s["param_groups"])
    cap.updater.load_state_dict(state)
    assert all(g["lr"] is cap.updater.device_lr.tensors[k] for k, o in cap.optimizers.items() for g in o.param_groups)


def test_resolve_and_reasons():
    assert resolve("off", None) is False and resolve("auto", None) is True and resolve("on", None) is True
    reason = not_capturable({0: CPU, 1: CPU}, per_device_optim=True, in_process=True)
    assert reason and "cpu" in reason
    assert resolve("auto", reason) is False
    with pytest.raises(RunError, match="cannot be captured: partitions on cpu") as exc:
        resolve("on", reason)
    assert exc.value.exit_code == 2
    with pytest.raises(RunError, match="one of auto, on, off"):
        resolve("sometimes", None)
    cuda = {0: torch.device("cuda", 0)}
    if torch.cuda.is_available():
        assert "distributed" in not_capturable(cuda, per_device_optim=True, in_process=False, world=2)
        assert "fused" in not_capturable(cuda, per_device_optim=False, in_process=True)
        assert not_capturable(cuda, per_device_optim=True, in_process=True) is None
    else:
        assert "not available" in not_capturable(cuda, per_device_optim=True, in_process=True)


def test_cuda_graphs_on_a_cpu_run_exits_2(tmp_path):
    art = compile_spec(tiny_spec("graphs", "train:\n  dataset: synthetic\n  batch_size: 8\n"), out_dir=tmp_path / "a")
    with pytest.raises(RunError, match="cuda_graphs: on.*partitions on cpu"):
        train_artifact(art.path, TrainOptions(run_dir=str(tmp_path / "r"), cuda_graphs="on", limit_train=16,
                                              limit_test=8, tensorboard=False, device="cpu"))
    notes = []
    summary = train_artifact(art.path, TrainOptions(run_dir=str(tmp_path / "auto"), cuda_graphs="auto", limit_train=16,
                                                    limit_test=8, tensorboard=False, device="cpu", max_steps=1,
                                                    on_log=lambda r: notes.append(r.get("text", ""))))
    assert summary["steps"] == 1 and any("cuda graphs: off (partitions on cpu" in n for n in notes), notes


def test_regional_compile_option_wraps_only_the_fused_programs():
    from gndgl_compiler.runtime.step.compile import compile_fused

    art = compile_spec(SPECS / "resnet32_k2g2.yaml")
    ex = Executor(art.plan, copy.deepcopy(art.modules), SGD, {p.id: CPU for p in art.plan.partitions})
    assert compile_fused(ex.fused_stages, "off") == 0
    with pytest.raises(ValueError, match="off, regional"):
        compile_fused(ex.fused_stages, "everything")
    assert compile_fused(ex.fused_stages, "regional") == len(ex.fused_stages) == 2  # compiled lazily, at first call
