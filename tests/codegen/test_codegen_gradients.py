"""Codegen against an independent reference (DESIGN §2, §4).

3. Gradient isolation: the loss of one partition never changes, and never
   reaches, the gradients of another partition.

(1., ResNet-32: ``test_codegen_resnet32.py``; 2., groups: ``test_codegen_groups.py``.)
"""

from __future__ import annotations

import copy

import pytest
import torch

from codegen_helpers import SMALL_SPEC, compile_text
from float_compare import scaled_error
from gndgl_compiler.losses import diversity_probs
from gndgl_compiler.partition.plan import IMAGE

HEAD_KEYS = ("logits", "sim", "recon", "proj")

pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------------- 3. gradients

GRAD_SPECS = {
    "resnet32_k2g2_share_div": ("name: iso\nmodel: {template: resnet32}\ncuts: {depth: 2, width: 2}\n"
                                "local: {share_ratio: 1.0, diversity: {weight: 0.5, temperature: 3.0}}\n"),
    "small_g4_half_share_div": SMALL_SPEC.format(width="[2, 4]").replace(
        "local: {share_ratio: 1.0}", "local: {share_ratio: 0.5, diversity: {weight: 1.0}, head: {hidden: 16}}"),
    "small_predsim": SMALL_SPEC.format(width="2").replace(
        "local: {share_ratio: 1.0}", "local: {share_ratio: 1.0, head: {kind: predsim}, diversity: {weight: 0.3}}"),
    "small_infopro": SMALL_SPEC.format(width="1").replace(
        "local: {share_ratio: 1.0}", "local: {head: {kind: infopro, variant: softmax, hidden: 16}}"),
}


def local_pass(art, x, y, *, detach: bool = True, scale: dict | None = None, extra: dict | None = None):
    """One training-like pass by hand; returns ``{pid: loss}``.

    ``detach=False`` feeds live upstream / sibling tensors so that only the
    detaches inside the generated code stand between partitions.
    """
    plan = art.plan
    sg = (lambda t: t.detach()) if detach else (lambda t: t)
    h = {IMAGE: x}
    for p in plan.partitions:
        h[p.id] = art.modules[p.id].body(*[sg(h[i.source]) for i in p.inputs])
    outs = {}
    for p in plan.partitions:
        shares = [sg(h[s.source][:, :s.channels]) for s in p.shares]
        outs[p.id] = art.modules[p.id].aux(h[p.id], *shares)
    losses = {}
    for p in plan.partitions:
        args = [outs[p.id][k] for k in HEAD_KEYS if k in p.head_outputs] + [y]
        if p.loss.kind == "infopro":
            args.append(x.clamp(0, 1))
        if p.loss.diversity_weight > 0:
            args += [sg(diversity_probs(outs[s]["logits"], y, p.loss.diversity_temperature)) for s in p.siblings]
        loss = art.modules[p.id].loss(*args)
        if scale and p.id in scale:
            loss = loss * scale[p.id]
        if extra and p.id in extra:
            loss = loss + extra[p.id] * h[p.id].pow(2).mean()
        losses[p.id] = loss
    return losses


def _params(art):
    return [(pid, n, q) for pid, m in sorted(art.modules.items()) for n, q in m.named_parameters()]


def _grads(art, loss):
    """``{(pid, name): grad or None}`` of ``loss`` w.r.t. every parameter of every partition."""
    ps = _params(art)
    gs = torch.autograd.grad(loss, [q for _, _, q in ps], retain_graph=True, allow_unused=True)
    return {(pid, n): g for (pid, n, _), g in zip(ps, gs)}


@pytest.fixture(scope="module", params=sorted(GRAD_SPECS))
def grad_setup(request):
    art = compile_text(GRAD_SPECS[request.param])
    for m in art.modules.values():
        m.train()
    shape = art.plan.input_shape
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(3, *shape, generator=gen)
    y = torch.tensor([0, 1, 1])
    state = {pid: copy.deepcopy(m.state_dict()) for pid, m in art.modules.items()}

    def run(**kw):
        for pid, m in art.modules.items():  # same BN running stats for every run
            m.load_state_dict(state[pid])
        return local_pass(art, x, y, **kw)

    return request.param, art, run


def test_plan_has_sharing_and_diversity(grad_setup):
    name, art, _ = grad_setup
    parts = art.plan.partitions
    if "share" in name:
        assert any(p.shares for p in parts)
        for p in parts:
            for s in p.shares:
                assert s.source in p.siblings
    if "div" in name:
        assert any(p.loss.diversity_weight > 0 for p in parts)
        assert "diversity" in {e.kind for e in art.plan.edges}


def test_every_boundary_input_is_detached_in_generated_code(grad_setup):
    _, art, _ = grad_setup
    for p in art.plan.partitions:
        m = art.modules[p.id]
        body_ph = [n for n in m.body.graph.nodes if n.op == "placeholder"]
        assert len(body_ph) == len(p.inputs)
        for ph in body_ph:
            users = list(ph.users)
            assert len(users) == 1 and users[0].op == "call_method" and users[0].target == "detach", (p.name, ph)
        aux_ph = [n for n in m.aux.graph.nodes if n.op == "placeholder"]
        assert [n.name for n in aux_ph][0] == "h"
        assert len(aux_ph) == 1 + len(p.shares)
        for ph in aux_ph[1:]:
            assert [u.target for u in ph.users] == ["detach"], (p.name, ph)


@pytest.mark.parametrize("detach", [True, False], ids=["detached-inputs", "live-inputs"])
def test_changing_one_loss_leaves_other_gradients_bitwise_equal(grad_setup, detach):
    _, art, run = grad_setup
    base = _grads(art, sum(run(detach=detach).values()))
    pids = sorted(art.modules)
    for pid in pids:  # every partition receives some gradient from its own loss
        assert any(g is not None and g.abs().sum() > 0 for (q, _), g in base.items() if q == pid), pid
    local = [p.id for p in art.plan.partitions if p.kind == "local"]
    for j, kw in ((local[0], {"scale": {local[0]: 3.0}}), (local[-1], {"extra": {local[-1]: 0.7}}),
                  (pids[-1], {"scale": {pids[-1]: 3.0}})):
        now = _grads(art, sum(run(detach=detach, **kw).values()))
        changed = False
        tripled: tuple[dict, dict] = ({}, {})
        for (pid, n), g in base.items():
            h = now[(pid, n)]
            if pid == j:
                if g is not None and "scale" in kw:
                    tripled[0][n], tripled[1][n] = h, 3.0 * g
                changed = changed or (g is not None and not torch.equal(g, h))
                continue
            assert (g is None) == (h is None), (pid, n)
            if g is not None:
                assert torch.equal(g, h), f"partition {pid} param {n} changed when the loss of {j} changed"
        assert changed, f"changing the loss of partition {j} did not change its own gradients"
        if tripled[1]:  # float32: each gradient against the norm of the partition's whole gradient
            assert scaled_error(*tripled)[0] <= 1e-5, (j, scaled_error(*tripled))


@pytest.mark.parametrize("detach", [True, False], ids=["detached-inputs", "live-inputs"])
def test_one_loss_reaches_only_its_own_partition(grad_setup, detach):
    _, art, run = grad_setup
    losses = run(detach=detach)
    for j, loss in losses.items():
        grads = _grads(art, loss)
        assert any(g is not None and g.abs().sum() > 0 for (pid, _), g in grads.items() if pid == j)
        for (pid, n), g in grads.items():
            if pid != j:
                assert g is None or not g.any(), f"loss of partition {j} reached partition {pid} ({n})"


def test_assembled_network_is_the_bodies_and_final_head(grad_setup):
    """The assembled inference graph shares weights with the partitions and skips aux heads."""
    _, art, _ = grad_setup
    net = art.assembled()
    own = {id(t) for m in art.modules.values() for t in m.parameters()}
    assert all(id(t) in own for t in net.parameters())
    aux_ids = {id(t) for p in art.plan.partitions if p.id != art.plan.final.id
               for t in art.modules[p.id].aux.parameters()}
    assert not any(id(t) in aux_ids for t in net.parameters())
    n_params = sum(t.numel() for t in net.parameters())
    assert n_params == art.summary["inference_params"]
