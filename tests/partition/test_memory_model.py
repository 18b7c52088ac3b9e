"""The memory model (DESIGN §4.1) against what autograd really keeps.

For every partition of a few shipped specs, the model's activation bytes per sample are compared with the
bytes of the tensors autograd saves in the forward of the generated body, aux head and loss
(``torch.autograd.graph.saved_tensors_hooks``), each storage counted once (by its storage's data pointer),
parameters and buffers left out. The inputs of a partition are the real upstream outputs, so a saved
detached input is the upstream storage, as in a training step.
"""

from __future__ import annotations


import pytest
import torch

from gndgl_compiler import losses as L
from gndgl_compiler.api import plan_spec
from gndgl_compiler.codegen.modules import PartitionModule, build_partitions
from gndgl_compiler.partition.memory import FLOAT, device_memory, saved_storages, step_peak
from gndgl_compiler.partition.plan import IMAGE, Partition, PartitionPlan
from gndgl_compiler.runtime.step.runner import HEAD_KEYS
from paths import REPO, SPECS

BATCH = 8
CASES = {
    "resnet32_k8g4": ("specs/resnet32_k8g4.yaml", []),
    "vgg6a_g6_sg_div": ("specs/vgg6a_g6_sg_div.yaml", []),
    "vit_cifar_k4g4": ("specs/vit_cifar_k4g4.yaml", []),
    "resnet50_k4g2_64": ("specs/imagenet/resnet50_k4g2.yaml", ["model.input_shape=[3,64,64]"]),
}


def _loss_args(p: Partition, outs: dict, x: torch.Tensor, y: torch.Tensor, p_hat: dict) -> list:
    """The loss's arguments, as ``PartitionRunner.forward`` builds them."""
    args = [outs[k] for k in HEAD_KEYS if k in p.head_outputs] + [y]
    if p.loss.kind == "infopro":
        args.append(x.clamp(0, 1))
    if p.loss.diversity_weight > 0:
        args += [p_hat[s] for s in p.siblings]
    return args


def measured_activation_bytes(plan: PartitionPlan, modules: dict[int, PartitionModule], batch: int
                              ) -> dict[int, float]:
    """Per partition: bytes per sample of the storages autograd saves in its forward (each once)."""
    torch.manual_seed(0)
    x = torch.randn(batch, *plan.input_shape)
    y = torch.randint(0, plan.num_classes, (batch,))
    state = {t.untyped_storage().data_ptr() for m in modules.values() for t in [*m.parameters(), *m.buffers()]}
    h: dict[int, torch.Tensor] = {IMAGE: x}
    p_hat: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for p in plan.partitions:
            h[p.id] = modules[p.id].body(*[h[i.source] for i in p.inputs])
        for p in plan.partitions:
            outs = modules[p.id].aux(h[p.id], *[h[s.source][:, :s.channels] for s in p.shares])
            if "logits" in outs:
                p_hat[p.id] = L.diversity_probs(outs["logits"], y, 3.0)
    out = {}
    for p in plan.partitions:
        seen: dict[int, int] = {}

        def pack(t: torch.Tensor, seen=seen) -> torch.Tensor:
            st = t.untyped_storage()
            if st.data_ptr() not in state:
                seen[st.data_ptr()] = st.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            body = modules[p.id].body(*[h[i.source] for i in p.inputs])
            outs = modules[p.id].aux(body, *[h[s.source][:, :s.channels] for s in p.shares])
            modules[p.id].loss(*_loss_args(p, outs, x, y, p_hat))
        out[p.id] = sum(seen.values()) / batch
    return out


@pytest.fixture(scope="module", params=sorted(CASES))
def compiled(request):
    torch.set_num_threads(1)
    spec, overrides = CASES[request.param]
    plan = plan_spec(REPO / spec, overrides=overrides)
    modules = build_partitions(plan, seed=0)
    for m in modules.values():
        m.train()
    return request.param, plan, modules


def test_activation_bytes_match_saved_tensors(compiled):
    """Every partition's modelled activation bytes are within 5% of autograd's saved bytes."""
    name, plan, modules = compiled
    measured = measured_activation_bytes(plan, modules, BATCH)
    errors = []
    for p in plan.partitions:
        model, real = p.costs["act_bytes"], measured[p.id]
        assert real > 1000, f"{name} {p.name}: autograd saved only {real} bytes per sample"
        if abs(model - real) > 0.05 * real:
            errors.append(f"{p.name}: model {model} B, saved {real:.0f} B ({(model - real) / real:+.1%})")
    assert not errors, f"{name}: " + "; ".join(errors)


def test_costs_and_summary_carry_the_memory_fields(compiled):
    name, plan, _ = compiled
    mem = plan.summary["memory"]
    batch = mem["batch_size"]
    for p in plan.partitions:
        assert p.costs["param_bytes"] == p.costs["grad_bytes"] == p.costs["params"] * FLOAT > 0
        assert p.costs["optim_bytes"] in (0, p.costs["param_bytes"], 2 * p.costs["param_bytes"])
    for dev, d in mem["devices"].items():
        parts = [p for p in plan.partitions if p.device == dev]
        assert d["param_bytes"] == sum(p.costs["param_bytes"] for p in parts)
        # the step's peak holds at least the largest partition's activations, and everything static
        assert d["peak_bytes"] >= batch * max(p.costs["act_bytes"] for p in parts) + d["param_bytes"]
        shapes = {IMAGE: list(plan.input_shape), **{p.id: p.out_shape for p in plan.partitions}}
        assert d["peak_above_rest_bytes"] == step_peak(device_memory(parts, shapes, "sgd", 0.9), batch, static=False)
        rest = d["param_bytes"] + d["optim_bytes"] + d["rest_grad_bytes"]
        assert d["peak_bytes"] == d["peak_above_rest_bytes"] + rest
    # end-to-end keeps every module's activations at once: more than the largest stage does
    assert mem["e2e_act_bytes"] > max(d["peak_act_bytes"] for d in mem["devices"].values()) / 2


def test_peak_follows_the_schedule():
    """One stage holds its own saved tensors plus the kept outputs; the gradients accumulate over the stages
    (in preallocated buffers, at rest, for sibling-fused modules)."""
    plan = plan_spec(SPECS / "resnet32_k8g4.yaml")
    shapes = {IMAGE: list(plan.input_shape), **{p.id: p.out_shape for p in plan.partitions}}
    mem = device_memory(plan.partitions, shapes, "sgd", 0.9, fuse=False)
    assert len(mem["stage_bytes"]) == plan.num_modules + 1
    assert mem["optim_bytes"] == mem["param_bytes"] > 0 and mem["rest_grad_bytes"] == 0
    assert step_peak(mem, 1, static=False) >= max(mem["stage_bytes"])
    grads = [g for _, g in mem["profile"]]
    assert grads == sorted(grads) and grads[-2] == mem["grad_bytes"] and grads[-1] == 2 * mem["grad_bytes"]
    assert step_peak(mem, 256) - step_peak(mem, 256, static=False) == 2 * mem["param_bytes"]
    fused = device_memory(plan.partitions, shapes, "sgd", 0.9)
    final = plan.final.costs["param_bytes"]  # the final head is a module of one partition: not sibling-fused
    assert fused["rest_grad_bytes"] == fused["param_bytes"] - final and fused["profile"][-2][1] == final
    # a fused module concatenates its inputs once and its heads read its output once, not once per sibling
    stage = [p for p in plan.partitions if p.module == 2]
    for flag, expected in ((False, len(stage)), (True, 1)):
        union: dict = {}
        for p in stage:
            union.update(saved_storages(p, shapes, fused=flag))
        assert len([k for k in union if "cat" in k or k[-1] in ("x", "shared")]) == 2 * expected
    assert device_memory(plan.partitions, shapes, "sgd", 0.0)["optim_bytes"] == 0


def test_sweep_has_a_memory_column(tmp_path):
    """``gndgl sweep`` reports the predicted step peak of every configuration: local learning needs less than
    end-to-end, and more groups at the same K need more (their heads read the whole module output)."""
    from gndgl_compiler.sweep import run_sweep
    from gndgl_compiler.viz.tables import csv_table, markdown_table

    rows = run_sweep(SPECS / "resnet32_k8g4.yaml", [1, 8], [1, 4], out_dir=tmp_path)
    peak = {(r.K, r.G): r.peak_bytes for r in rows}
    assert all(v is not None and v > 0 for v in peak.values())
    assert peak[(8, 1)] < peak[(1, 1)] and peak[(8, 1)] < peak[(8, 4)]
    assert all(r.act_bytes > 0 for r in rows)
    assert "## Predicted peak memory of a training step" in markdown_table(rows)
    assert "peak_bytes" in csv_table(rows).splitlines()[0]


def test_balance_by_memory(tmp_path):
    """``cuts.balance: memory`` cuts an integer K where the largest partition's activations are smallest; with
    explicit cut points it is refused with the field and its line, and `gndgl compile` exits 2."""
    import subprocess
    import sys

    by = {b: plan_spec(SPECS / "resnet32_k4g1.yaml", overrides=[f"cuts.balance={b}"]) for b in ("macs", "memory")}
    largest = {b: max(p.costs["act_bytes"] for p in plan.partitions) for b, plan in by.items()}
    assert largest["memory"] < 0.9 * largest["macs"]
    assert len(by["memory"].partitions) == len(by["macs"].partitions)
    spec = tmp_path / "bad.yaml"
    spec.write_text("name: bad\nmodel: {template: resnet32}\ncuts:\n  depth: [s1.b0, s2.b0]\n  balance: memory\n")
    r = subprocess.run([sys.executable, "-m", "gndgl_cli.main", "compile", str(spec), "-o", str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2, r.stderr
    assert "bad.yaml:5" in r.stderr and "cuts.balance" in r.stderr and "integer" in r.stderr
