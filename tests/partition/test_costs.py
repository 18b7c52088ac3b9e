"""Cost model (DESIGN §4): the paper's Tables 4 and 5, and the analytic MACs against
``torch.utils.flop_counter.FlopCounterMode`` on the generated modules."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from gndgl_compiler import compile_spec
from gndgl_compiler.partition.cuts import balanced_split
from gndgl_compiler.partition.plan import IMAGE
from paths import SPECS


# Appendix A.3 of the paper; keys are (K, G) (the tables' rows are K·G).
TABLE4 = {(2, 1): 1.894, (4, 1): 3.622, (8, 1): 6.456, (16, 1): 11.609,
          (1, 2): 3.674, (2, 2): 6.304, (4, 2): 10.667, (8, 2): 16.426, (16, 2): 23.072,
          (1, 4): 11.982, (2, 4): 17.445, (4, 4): 24.522, (8, 4): 30.47,
          (1, 8): 28.531, (2, 8): 33.736, (4, 8): 39.333}
TABLE5 = {(2, 1): 1, (4, 1): 1, (8, 1): 1, (16, 1): 1,
          (1, 2): 1.961, (2, 2): 1.899, (4, 2): 1.785, (8, 2): 1.612, (16, 2): 1.338,
          (1, 4): 3.777, (2, 4): 3.448, (4, 4): 2.936, (8, 4): 2.324,
          (1, 8): 7.03, (2, 8): 5.824, (4, 8): 4.336}

RESNET32_MACS = 69_124_736  # analytic, see test_resnet32_e2e_macs_closed_form


pytestmark = pytest.mark.usefixtures("one_thread")


def paper_spec(K: int, G: int) -> str:
    """The paper's recipe for one cell: DGL (G=1) has a joint classifier; GN-DGL uses
    stop-gradient sharing r=1, diversity and a separate 1c2f final head."""
    if G == 1:
        local = "local:\n  head: {kind: 1c2f}\n  final_head: {mode: joint}\n"
    else:
        local = ("local:\n  head: {kind: 1c2f}\n  share_ratio: 1.0\n  diversity: {weight: 0.5, temperature: 3.0}\n"
                 "  final_head: {kind: 1c2f, mode: separate}\n")
    return f"name: paper_k{K}g{G}\nmodel: {{template: resnet32, width: 1}}\ncuts: {{depth: {K}, width: {G}}}\n" + local


_CACHE: dict = {}


def paper_art(K: int, G: int):
    if (K, G) not in _CACHE:
        _CACHE[(K, G)] = compile_spec(paper_spec(K, G))
    return _CACHE[(K, G)]


CELLS = sorted(TABLE4)


@pytest.mark.parametrize("K,G", CELLS, ids=[f"K{k}xG{g}" for k, g in CELLS])
def test_table4_training_speedup_within_5_percent(K, G):
    s = paper_art(K, G).summary
    assert s["training_speedup"] == pytest.approx(TABLE4[(K, G)], rel=0.05)


@pytest.mark.parametrize("K,G", CELLS, ids=[f"K{k}xG{g}" for k, g in CELLS])
def test_table5_inference_speedup_within_5_percent(K, G):
    s = paper_art(K, G).summary
    assert s["inference_speedup"] == pytest.approx(TABLE5[(K, G)], rel=0.05)


@pytest.mark.parametrize("K,G", CELLS, ids=[f"K{k}xG{g}" for k, g in CELLS])
def test_paper_cell_partition_count_and_summary_consistency(K, G):
    art = paper_art(K, G)
    s = art.summary
    expected = K if G == 1 else K * G + 1  # joint: the classifier closes module K
    assert s["partitions"] == len(art.plan.partitions) == expected
    assert s["e2e_macs"] == RESNET32_MACS
    assert s["max_partition_macs"] == max(p.costs["fwd_macs"] for p in art.plan.partitions)
    assert s["training_speedup"] == pytest.approx(s["e2e_macs"] / s["max_partition_macs"])
    assert s["inference_speedup"] == pytest.approx(s["e2e_macs"] / s["inference_macs"])
    assert s["inference_macs"] == (sum(p.costs["body_macs"] for p in art.plan.partitions)
                                   + art.plan.final.costs["head_macs"])
    if G == 1:
        assert s["inference_macs"] == RESNET32_MACS  # DGL keeps the dense network
    else:
        assert s["inference_macs"] < RESNET32_MACS


def test_headline_config_33_partitions():
    s = paper_art(8, 4).summary
    assert s["partitions"] == 33
    assert s["training_speedup"] == pytest.approx(31.0, abs=0.5)


def test_resnet32_e2e_macs_closed_form():
    stem = 32 * 32 * 16 * 3 * 9
    stage1 = 10 * (32 * 32 * 16 * 16 * 9)
    stage2 = 16 * 16 * 32 * 16 * 9 + 16 * 16 * 32 * 16 + 9 * (16 * 16 * 32 * 32 * 9)
    stage3 = 8 * 8 * 64 * 32 * 9 + 8 * 8 * 64 * 32 + 9 * (8 * 8 * 64 * 64 * 9)
    fc = 64 * 10
    assert stem + stage1 + stage2 + stage3 + fc == RESNET32_MACS
    art = compile_spec(SPECS / "resnet32_e2e.yaml")
    assert art.summary["e2e_macs"] == RESNET32_MACS
    assert art.summary["params"] == 466_906  # the usual 0.46 M of ResNet-32 (with BN affine)


def test_backward_macs_skip_input_gradient_of_dense_in_layers():
    art = compile_spec(SPECS / "resnet32_e2e.yaml")
    c = art.plan.partitions[0].costs
    stem = 32 * 32 * 16 * 3 * 9
    assert c["bwd_macs"] == 2 * c["fwd_macs"] - stem
    assert c["train_macs"] == c["fwd_macs"] + c["bwd_macs"]
    # K=2, G=2: module 2's dense-in layers are its first conv (32 in -> 16 out per group)
    art = paper_art(2, 2)
    for p in art.plan.partitions:
        dense = sum(n.macs for n in p.body if n.dense_in)
        assert p.costs["bwd_macs"] == 2 * p.costs["fwd_macs"] - dense
        assert p.costs["fwd_macs"] == p.costs["body_macs"] + p.costs["head_macs"]
    m2 = [p for p in art.plan.partitions if p.module == 2][0]
    assert [n.source for n in m2.body if n.dense_in] == ["s2.b2.conv1"]


def test_bytes_per_sample_k2g2():
    art = paper_art(2, 2)
    parts = {p.name: p for p in art.plan.partitions}
    f = 4  # float32
    # m2.g0 receives both groups of module 1 (16 ch, 16x16 each), its sibling's 32-channel
    # 8x8 output (r = 1) and the sibling's 10 diversity probabilities
    assert parts["m2.g0"].costs["bytes_in"] == 2 * 16 * 16 * 16 * f + 32 * 8 * 8 * f + 10 * f
    # m1.g0 reads the image, its sibling's share and diversity vector
    assert parts["m1.g0"].costs["bytes_in"] == 3 * 32 * 32 * f + 16 * 16 * 16 * f + 10 * f
    # and sends its output to both groups of module 2, plus share + diversity to its sibling
    assert parts["m1.g0"].costs["bytes_out"] == 2 * 16 * 16 * 16 * f + 16 * 16 * 16 * f + 10 * f
    assert parts["head"].costs["bytes_in"] == 2 * 32 * 8 * 8 * f
    for p in art.plan.partitions:
        assert p.costs["bytes_in"] == sum(e.bytes_per_sample for e in art.plan.edges if e.dst == p.id)
    assert art.summary["bytes_per_sample"] == sum(e.bytes_per_sample for e in art.plan.edges if e.src != IMAGE)


@pytest.mark.parametrize("G", [2, 4])
def test_no_sharing_shrinks_aux_head(G):
    """r = 0: the aux head sees C/G channels and its hidden width F shrinks to F/G."""
    art = compile_spec(f"name: t\nmodel: {{template: resnet32}}\ncuts: {{depth: 1, width: {G}}}\n")
    for p in art.plan.partitions[:-1]:
        assert p.shares == []
        fc1 = next(n for n in p.head if n.name == "fc1")
        assert fc1.attrs["out"] == 128 // G
        conv = next(n for n in p.head if n.kind == "conv")
        assert conv.attrs["in"] == 64 // G
    final = art.plan.final
    assert next(n for n in final.head if n.name == "fc1").attrs["out"] == 128
    shared = compile_spec(f"name: t\nmodel: {{template: resnet32}}\ncuts: {{depth: 1, width: {G}}}\n"
                          "local: {share_ratio: 1.0}\n")
    for p in shared.plan.partitions[:-1]:
        assert next(n for n in p.head if n.kind == "conv").attrs["in"] == 64
        assert next(n for n in p.head if n.name == "fc1").attrs["out"] == 128
    half = compile_spec(f"name: t\nmodel: {{template: resnet32}}\ncuts: {{depth: 1, width: {G}}}\n"
                        "local: {share_ratio: 0.5}\n")
    for p in half.plan.partitions[:-1]:
        per = 64 // G
        assert [s.channels for s in p.shares] == [int(0.5 * per)] * (G - 1)
        assert next(n for n in p.head if n.kind == "conv").attrs["in"] == per + (G - 1) * int(0.5 * per)


# ----------------------------------------------------------------------------- FlopCounterMode

FLOP_CONFIGS = {
    "resnet32_e2e": SPECS / "resnet32_e2e.yaml",
    "resnet32_k8g4": SPECS / "resnet32_k8g4.yaml",
    "vgg6a_g2": SPECS / "vgg6a_g2.yaml",
    "resnet32_infopro_k8": SPECS / "resnet32_infopro_k8.yaml",
    "quickstart_fmnist": SPECS / "quickstart_fmnist.yaml",
    "resnet32_k2g4_mlpsr_half_share": ("name: f\nmodel: {template: resnet32}\ncuts: {depth: 2, width: 4}\n"
                                       "local: {head: {kind: mlp-sr}, share_ratio: 0.5}\n"),
    "resnet32_k4g2_linear_infopro_softmax": (
        "name: f\nmodel: {template: resnet32}\ncuts: {depth: 4, width: 2}\n"
        "local: {head: {kind: infopro, variant: softmax}, final_head: {kind: linear}}\n"),
}


def _flops(fn, *args) -> tuple[float, object]:
    with FlopCounterMode(display=False) as fc:
        out = fn(*args)
    return fc.get_total_flops(), out


@pytest.mark.parametrize("name", sorted(FLOP_CONFIGS))
def test_flop_counter_matches_partition_macs(name):
    art = compile_spec(FLOP_CONFIGS[name])
    for m in art.modules.values():
        m.eval()
    B = 2
    x = torch.randn(B, *art.plan.input_shape)
    h = {IMAGE: x}
    with torch.no_grad():
        for p in art.plan.partitions:
            flops_body, h[p.id] = _flops(art.modules[p.id].body, *[h[i.source] for i in p.inputs])
            assert flops_body / 2 / B == pytest.approx(p.costs["body_macs"], rel=0.01), p.name
        for p in art.plan.partitions:
            shares = [h[s.source][:, :s.channels] for s in p.shares]
            flops_head, out = _flops(art.modules[p.id].aux, h[p.id], *shares)
            assert set(out) == set(p.head_outputs)
            assert flops_head / 2 / B == pytest.approx(p.costs["head_macs"], rel=0.01), p.name
            flops_body, _ = _flops(art.modules[p.id].body, *[h[i.source] for i in p.inputs])
            assert (flops_body + flops_head) / 2 / B == pytest.approx(p.costs["fwd_macs"], rel=0.01), p.name
        flops_net, logits = _flops(art.assembled(), x)
    assert logits.shape == (B, art.plan.num_classes)
    assert flops_net / 2 / B == pytest.approx(art.summary["inference_macs"], rel=0.01)


# ----------------------------------------------------------------------------- balanced cuts


def _brute_force_best(costs: list[int], k: int) -> int:
    n = len(costs)
    best = None
    for cuts in itertools.combinations(range(1, n), k - 1):
        bounds = (0,) + cuts + (n,)
        worst = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
        best = worst if best is None else min(best, worst)
    return best


@settings(max_examples=60, deadline=None)
@given(st.lists(st.integers(0, 50), min_size=1, max_size=8).flatmap(
    lambda c: st.tuples(st.just(c), st.integers(1, len(c)))))
def test_balanced_split_minimises_the_largest_module(case):
    costs, k = case
    starts = balanced_split(costs, k)
    assert starts[0] == 0 and len(starts) == k
    assert all(a < b for a, b in zip(starts, starts[1:])), "modules must be contiguous and non-empty"
    bounds = starts + [len(costs)]
    worst = max(sum(costs[a:b]) for a, b in zip(bounds, bounds[1:]))
    assert worst == _brute_force_best(costs, k)


def test_integer_k_on_explicit_layers_balances_training_macs():
    layers = "\n".join(f"    - {{op: conv, name: c{i}, out: 16}}" for i in range(6))
    text = (f"name: bal\nmodel:\n  input_shape: [3, 8, 8]\n  layers:\n{layers}\n"
            "    - {op: adaptive_avgpool}\n    - {op: flatten}\n    - {op: linear, name: fc, out: 10}\n"
            "cuts: {depth: 3}\n")
    art = compile_spec(text)
    # c0 is cheaper (3 input channels), the rest are equal: best max is two convs per module
    assert [p.units for p in art.plan.partitions[:3]] == [["c0", "c1"], ["c2", "c3"], ["c4", "c5"]]
