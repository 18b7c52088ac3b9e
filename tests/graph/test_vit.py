"""Vision transformers as specs (DESIGN §2.1): templates, width cuts, stop-gradient, costs.

The checks compare against independent computations:

1. G groups of a module == one block with block-diagonal projections and group-wise
   LayerNorm (float64), with the reference block written here from plain tensor math
   (hand-written LayerNorm and softmax attention, ``torch.block_diag`` weights);
2. no gradient crosses a partition: scaling one partition's loss leaves every other
   partition's gradients unchanged;
3. dense-in / own-slice connectivity, read off the parameter shapes;
4. the analytic MACs against ``torch.utils.flop_counter.FlopCounterMode`` on the
   generated modules.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from gndgl_compiler import compile_spec
from gndgl_compiler.losses import diversity_probs
from gndgl_compiler.partition.plan import IMAGE
from gndgl_compiler.runtime.step.executor import HEAD_KEYS
from gndgl_compiler.spec.templates import VIT_DEFAULTS
from gndgl_compiler.viz.dot import plan_to_dot
from float_compare import scaled_error
from paths import SPECS


D, HEADS, DEPTH, PATCH, RATIO = 16, 4, 3, 7, 2.0


def small_vit(width: int, depth: list | int = ("b0",), **local) -> dict:
    """A 28×28 ViT with D=16, 4 heads, 3 blocks and patch 7 (16 tokens): milliseconds per pass."""
    return {"name": "vit_small", "model": {"template": "vit_tiny", "input_shape": [1, 28, 28], "num_classes": 5,
                                           "vit": {"dim": D, "depth": DEPTH, "heads": HEADS, "patch": PATCH,
                                                   "mlp_ratio": RATIO}},
            "cuts": {"depth": list(depth) if not isinstance(depth, int) else depth, "width": width},
            "local": local}


@pytest.fixture(scope="module")
def k2g2():
    torch.manual_seed(0)
    return compile_spec(small_vit(2, share_ratio=1.0, diversity={"weight": 0.5}))


# ----------------------------------------------------------------------------- 1. groups == block-diagonal block


def _ln(x, w, b, eps=1e-6):
    """LayerNorm over the last dim, by hand."""
    mu = x.mean(-1, keepdim=True)
    var = ((x - mu) ** 2).mean(-1, keepdim=True)
    return (x - mu) / torch.sqrt(var + eps) * w + b


def _grouped_ln(x, ws, bs):
    """Group-wise LayerNorm: each group's channel slice normalised on its own."""
    chunks = x.split([w.numel() for w in ws], dim=-1)
    return torch.cat([_ln(c, w, b) for c, w, b in zip(chunks, ws, bs)], dim=-1)


def _attention(qkv, heads_per_group, hd, groups):
    """Softmax attention by hand; ``qkv`` holds per group [q | k | v] of its heads (B × N × G·3·h·hd)."""
    b, n, _ = qkv.shape
    t = qkv.view(b, n, groups, 3, heads_per_group, hd)
    q, k, v = (t[:, :, :, i].reshape(b, n, groups * heads_per_group, hd).transpose(1, 2) for i in range(3))
    a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd), dim=-1)
    return (a @ v).transpose(1, 2).reshape(b, n, -1)  # heads in (group, head) order


def _reference_block(x, sd, block, groups, dense_in, hd):
    """One transformer block of G groups as ONE block (tokens B × N × D)."""
    p = [{k[len(f"body.{block}_"):]: v for k, v in s.items() if k.startswith(f"body.{block}_")} for s in sd]
    bd = lambda key: torch.block_diag(*[q[key] for q in p])  # noqa: E731
    cat = lambda key: torch.cat([q[key] for q in p])  # noqa: E731
    if dense_in:  # each group normalises all D channels with its own LN, then reads the whole normalised copy
        u = torch.cat([_ln(x, q["ln1.weight"], q["ln1.bias"]) for q in p], dim=-1)
    else:
        u = _grouped_ln(x, [q["ln1.weight"] for q in p], [q["ln1.bias"] for q in p])
    heads_g = p[0]["attn.qkv.weight"].shape[0] // (3 * hd)
    att = _attention(u @ bd("attn.qkv.weight").T + cat("attn.qkv.bias"), heads_g, hd, groups)
    r = x + att @ bd("attn.proj.weight").T + cat("attn.proj.bias")
    v = _grouped_ln(r, [q["ln2.weight"] for q in p], [q["ln2.bias"] for q in p])
    h = F.gelu(v @ bd("mlp.fc1.weight").T + cat("mlp.fc1.bias"))
    return r + h @ bd("mlp.fc2.weight").T + cat("mlp.fc2.bias")


def test_groups_equal_one_block_diagonal_block_float64(k2g2):
    plan, mods = k2g2.plan, k2g2.modules
    gen = torch.Generator().manual_seed(1)
    image = torch.randn(3, 1, 28, 28, generator=gen, dtype=torch.float64)
    hd = D // HEADS
    for m in mods.values():
        m.double().eval()
    try:
        by_module = {}
        for p in plan.partitions:
            by_module.setdefault(p.module, []).append(p)
        # module 1: the patch embedding (dense: the image) then block b0 on own slices
        m1 = [mods[p.id] for p in by_module[1]]
        got1 = torch.cat([m.body(image) for m in m1], dim=1)
        sd1 = [dict(m.state_dict()) for m in m1]
        w = torch.cat([s["body.patch.proj.weight"] for s in sd1])
        tok = F.conv2d(image, w, torch.cat([s["body.patch.proj.bias"] for s in sd1]), stride=PATCH).flatten(2)
        tok = tok + torch.cat([s["body.pos.pos"] for s in sd1], dim=1)
        want1 = _reference_block(tok.transpose(1, 2), sd1, "b0", 2, dense_in=False, hd=hd).transpose(1, 2)
        torch.testing.assert_close(got1, want1, rtol=1e-10, atol=1e-10)
        # module 2: b1 reads the full detached module input (dense in), b2 only its own slice
        x = torch.randn(3, D, (28 // PATCH) ** 2, generator=gen, dtype=torch.float64)
        m2 = [mods[p.id] for p in by_module[2]]
        got2 = torch.cat([m.body(*x.split(D // 2, dim=1)) for m in m2], dim=1)
        sd2 = [dict(m.state_dict()) for m in m2]
        t = _reference_block(x.transpose(1, 2), sd2, "b1", 2, dense_in=True, hd=hd)
        want2 = _reference_block(t, sd2, "b2", 2, dense_in=False, hd=hd).transpose(1, 2)
        torch.testing.assert_close(got2, want2, rtol=1e-10, atol=1e-10)
    finally:
        for m in mods.values():
            m.float()


def test_g1_is_the_plain_transformer():
    art = compile_spec(small_vit(1, depth=1))
    (e2e,) = art.plan.partitions
    assert e2e.kind == "e2e" and e2e.head_kind == "final:model"
    m = art.modules[0].double().eval()
    sd = dict(m.state_dict())
    x = torch.randn(2, 1, 28, 28, dtype=torch.float64)
    t = (F.conv2d(x, sd["body.patch.proj.weight"], sd["body.patch.proj.bias"], stride=PATCH).flatten(2)
         + sd["body.pos.pos"]).transpose(1, 2)
    for i in range(DEPTH):
        t = _reference_block(t, [sd], f"b{i}", 1, dense_in=False, hd=D // HEADS)
    a = {k[len("aux."):]: v for k, v in sd.items() if k.startswith("aux.")}
    logits = _ln(t, a["norm.weight"], a["norm.bias"]).mean(1) @ a["fc.weight"].T + a["fc.bias"]
    torch.testing.assert_close(m(x)["logits"], logits, rtol=1e-10, atol=1e-10)


# ----------------------------------------------------------------------------- 2. stop-gradient


def _losses(art, x, y, scale):
    h = {IMAGE: x}
    for p in art.plan.partitions:
        h[p.id] = art.modules[p.id].body(*[h[i.source] for i in p.inputs])  # live tensors: only codegen detaches
    outs = {p.id: art.modules[p.id].aux(h[p.id], *[h[s.source][:, :s.channels] for s in p.shares])
            for p in art.plan.partitions}
    total = 0
    for p in art.plan.partitions:
        args = [outs[p.id][k] for k in HEAD_KEYS if k in p.head_outputs] + [y]
        if p.loss.diversity_weight > 0:
            args += [diversity_probs(outs[s]["logits"], y, p.loss.diversity_temperature) for s in p.siblings]
        total = total + scale.get(p.id, 1.0) * art.modules[p.id].loss(*args)
    return total


def test_no_gradient_crosses_a_partition(k2g2):
    art = k2g2
    gen = torch.Generator().manual_seed(2)
    x, y = torch.randn(4, 1, 28, 28, generator=gen), torch.tensor([0, 1, 2, 3])
    params = [(p.id, n, q) for p in art.plan.partitions for n, q in art.modules[p.id].named_parameters()]
    base = torch.autograd.grad(_losses(art, x, y, {}), [q for *_, q in params])
    assert all(g is not None and g.abs().sum() > 0 for g in base)
    for scaled in (0, 3, art.plan.final.id):
        grads = torch.autograd.grad(_losses(art, x, y, {scaled: 5.0}), [q for *_, q in params])
        got: dict = {}
        want: dict = {}
        for (pid, name, _), g0, g in zip(params, base, grads):
            got.setdefault(pid, {})[name] = g
            want.setdefault(pid, {})[name] = 5.0 * g0 if pid == scaled else g0
        for pid in want:  # float32: each gradient against the norm of its partition's whole gradient
            worst = scaled_error(got[pid], want[pid])
            assert worst[0] <= 1e-5, (pid, worst, f"scaled {scaled}")


# ----------------------------------------------------------------------------- 3. connectivity by shapes


def test_dense_in_and_own_slice_by_parameter_shapes(k2g2):
    G, n_tok, hidden = 2, (28 // PATCH) ** 2, int(RATIO * D)
    for p in k2g2.plan.partitions:
        if p.kind == "final":
            continue
        s = {n: tuple(q.shape) for n, q in k2g2.modules[p.id].named_parameters()}
        if p.module == 1:
            assert s["body.patch.proj.weight"] == (D // G, 1, PATCH, PATCH)  # the image -> own D/G channels
            assert s["body.pos.pos"] == (1, D // G, n_tok)
            first, rest = None, ["b0"]
        else:
            first, rest = "b1", ["b2"]
        if first:  # dense in: LN over all D (own parameters), QKV from all D to own heads
            assert s[f"body.{first}_ln1.weight"] == (D,)
            assert s[f"body.{first}_attn.qkv.weight"] == (3 * D // G, D)
            rest = [first] + rest
        for b in rest:
            if b != first:
                assert s[f"body.{b}_ln1.weight"] == (D // G,)
                assert s[f"body.{b}_attn.qkv.weight"] == (3 * D // G, D // G)
            assert s[f"body.{b}_attn.proj.weight"] == (D // G, D // G)
            assert s[f"body.{b}_ln2.weight"] == (D // G,)
            assert s[f"body.{b}_mlp.fc1.weight"] == (hidden // G, D // G)
            assert s[f"body.{b}_mlp.fc2.weight"] == (D // G, hidden // G)
        # token-linear aux head on own slice + detached sibling slice (share_ratio 1)
        assert p.head_kind == "token-linear" and s["aux.ln.weight"] == (D,) and s["aux.fc1.weight"] == (5, D)
        attn = [n for n in p.body if n.kind == "attention"]
        assert all(n.attrs["heads"] == HEADS // G for n in attn)
    # the module-2 body code slices the residual of the full input for group 1
    m2g1 = next(p for p in k2g2.plan.partitions if p.name == "m2.g1")
    code = k2g2.modules[m2g1.id].code()
    assert "_channel_slice(x, start = 8, length = 8)" in code


# ----------------------------------------------------------------------------- 4. cost model


def _flop_cpu_sdpa(query_shape, key_shape, value_shape, *args, **kwargs):
    """FLOPs of the CPU kernel behind F.scaled_dot_product_attention (FlopCounterMode counts only the GPU ones)."""
    return sdpa_flop_count(query_shape, key_shape, value_shape)


def _counted_flops(fn, *args) -> int:
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _flop_cpu_sdpa}
    with FlopCounterMode(display=False, custom_mapping=mapping) as fc:
        fn(*args)
    return fc.get_total_flops()


@pytest.mark.parametrize("case", ["e2e", "k2g2", "k3g4_cls"])
def test_cost_model_matches_flop_counter(case, k2g2):
    art = {"e2e": lambda: compile_spec(small_vit(1, depth=1)), "k2g2": lambda: k2g2,
           "k3g4_cls": lambda: compile_spec({**small_vit(4, depth=3), "model": {
               **small_vit(4)["model"],
               "vit": {"dim": D, "depth": DEPTH, "heads": HEADS, "patch": PATCH, "cls": True}}})
           }[case]()
    B = 2
    h = {IMAGE: torch.randn(B, 1, 28, 28)}
    with torch.no_grad():
        body_flops = {}
        for p in art.plan.partitions:
            args = [h[i.source] for i in p.inputs]
            body_flops[p.id] = _counted_flops(art.modules[p.id].body, *args)
            h[p.id] = art.modules[p.id].body(*args)
        for p in art.plan.partitions:
            shares = [h[s.source][:, :s.channels] for s in p.shares]
            head_flops = _counted_flops(art.modules[p.id].aux, h[p.id], *shares)
            for counted, macs in ((body_flops[p.id], p.costs["body_macs"]), (head_flops, p.costs["head_macs"])):
                if macs == 0:
                    assert counted == 0
                else:
                    assert abs(counted - 2 * B * macs) <= 0.01 * 2 * B * macs, (p.name, counted, 2 * B * macs)


def test_attention_macs_include_both_score_matmuls():
    art = compile_spec(small_vit(1, depth=1))
    n_tok, hd = (28 // PATCH) ** 2, D // HEADS
    attn = next(n for n in art.plan.partitions[0].body if n.kind == "attention")
    linear = n_tok * (D * 3 * D + D * D)
    assert attn.macs == linear + 2 * HEADS * n_tok * n_tok * hd


def test_vit_cifar_template_dimensions_and_parameters():
    art = compile_spec(SPECS / "vit_cifar_k4g1.yaml")
    d, L, m = VIT_DEFAULTS["vit_cifar"]["dim"], VIT_DEFAULTS["vit_cifar"]["depth"], 2
    assert (d, L) == (256, 8)
    n = (32 // 4) ** 2
    per_block = 2 * d + (3 * d * d + 3 * d + d * d + d) + 2 * d + (d * m * d + m * d + m * d * d + d)
    body = (d * 3 * 16 + d) + d * n + L * per_block
    assert sum(p.costs["body_params"] for p in art.plan.partitions) == body
    assert [p.units for p in art.plan.partitions[:4]] == [["patch", "pos", "b0", "b1"], ["b2", "b3"],
                                                          ["b4", "b5"], ["b6", "b7"]]
    wide = compile_spec({"name": "w", "model": {"template": "vit_tiny", "width": 2.0}})
    attn = next(n for n in wide.plan.partitions[0].body if n.kind == "attention")
    assert attn.attrs["in"] == 128 and attn.attrs["heads"] == 4


def test_shipped_specs_compile_and_draw():
    for name in ("vit_tiny_fmnist_e2e", "vit_tiny_fmnist_k2g2", "vit_cifar_k4g1", "vit_cifar_k4g4"):
        path = SPECS / f"{name}.yaml"
        assert path.read_text().startswith("# ")
        art = compile_spec(path)
        assert art.plan.name == name
        dot = plan_to_dot(art.plan, level="ops")
        assert "attention" in dot and "patch_embed" in dot
    k4g4 = compile_spec(SPECS / "vit_cifar_k4g4.yaml")
    assert len(k4g4.plan.partitions) == 17 and k4g4.summary["training_speedup"] > 4


def test_token_mlp_head_and_cls_pool():
    spec = small_vit(2, head={"kind": "token-mlp"})
    spec["model"]["vit"]["cls"] = True
    art = compile_spec(spec)
    p = art.plan.partitions[0]
    kinds = [n.kind for n in p.head]
    assert kinds[1:] == ["layernorm", "token_pool", "linear", "gelu", "linear"]
    assert p.head[3].attrs["out"] == 2 * (D // 2)  # hidden = 2 × head input (no sharing)
    assert any(n.kind == "pos_embed" and n.attrs["cls"] for n in p.body)
    logits = art.assembled()(torch.randn(2, 1, 28, 28))
    assert logits.shape == (2, 5)
