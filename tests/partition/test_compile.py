"""Partitioner and compile API (DESIGN §2–§3): cuts, groups, heads, edges, invariants."""

from __future__ import annotations


import pytest
import torch

from gndgl_compiler import compile_spec, load_spec
from gndgl_compiler.codegen.modules import build_partitions
from gndgl_compiler.errors import PartitionError, SpecError
from gndgl_compiler.graph.build import build_graph
from gndgl_compiler.partition.groups import group_sizes
from gndgl_compiler.partition.partitioner import build_plan
from gndgl_compiler.partition.plan import IMAGE, PartitionPlan
from gndgl_compiler.partition.validate import validate_plan
from paths import SPECS


BLOCKS = [f"s{s}.b{b}" for s in (1, 2, 3) for b in range(5)]
STEM = ["stem", "stem_bn", "stem_relu"]


pytestmark = pytest.mark.usefixtures("one_thread")


def rn(K, G=1, local="{}"):
    return compile_spec(f"name: t\nmodel: {{template: resnet32}}\ncuts: {{depth: {K}, width: {G}}}\nlocal: {local}\n")


def _last_units(plan: PartitionPlan) -> list[str]:
    out = []
    for _mod, parts in sorted(plan.by_module().items()):
        if parts[0].kind != "final":
            out.append(parts[0].units[-1])
    return out


@pytest.mark.parametrize("K,ends", [
    (2, ["s2.b1", "s3.b4"]),
    (4, ["s1.b2", "s2.b1", "s3.b0", "s3.b4"]),
    (8, ["s1.b0", "s1.b2", "s1.b4", "s2.b1", "s2.b3", "s3.b0", "s3.b2", "s3.b4"]),
    (16, ["stem_relu"] + BLOCKS),
])
def test_resnet32_paper_cut_table(K, ends):
    art = rn(K, 2)
    assert _last_units(art.plan) == ends
    assert art.plan.num_modules == K
    units = [u for mod, ps in sorted(art.plan.by_module().items()) if ps[0].kind != "final" for u in ps[0].units]
    assert units == STEM + BLOCKS  # every body unit exactly once, in order
    final = art.plan.final
    assert final.kind == "final" and final.name == "head" and final.head_kind == "final:1c2f"


def test_k1_g_gt_1_cuts_only_before_the_head():
    art = rn(1, 4)
    assert len(art.plan.partitions) == 5
    assert all(p.units == STEM + BLOCKS for p in art.plan.partitions[:4])
    assert art.plan.final.module == 2


def test_joint_mode_drops_the_head_boundary():
    art = compile_spec("name: t\nmodel: {template: resnet32}\ncuts: {depth: 4}\nlocal: {final_head: {mode: joint}}\n")
    plan = art.plan
    assert plan.final_mode == "joint" and len(plan.partitions) == 4
    last = plan.partitions[-1]
    assert last.kind == "local" and last.head_kind == "final:model" and last.units[-1] == "s3.b4"
    assert [n.name for n in last.head if n.kind != "input"] == ["pool", "flatten", "fc"]
    assert sum(p.head_kind.startswith("final") for p in plan.partitions) == 1  # K modules, K-1 aux heads
    # the assembled network is the dense ResNet-32 (inference speed-up 1)
    assert art.summary["inference_macs"] == art.summary["e2e_macs"]


def test_joint_mode_allows_groups_before_the_last_module():
    art = compile_spec("name: t\nmodel: {template: resnet32}\ncuts: {depth: 2, width: [2, 1]}\n"
                       "local: {final_head: {mode: joint}}\n")
    assert [p.name for p in art.plan.partitions] == ["m1.g0", "m1.g1", "m2.g0"]
    assert art.plan.final.head_kind == "final:model"


def test_groups_partition_every_channel_once():
    art = rn(4, 4)
    for _mod, parts in art.plan.by_module().items():
        if parts[0].kind == "final":
            continue
        assert [p.group for p in parts] == list(range(4))
        spans = [p.channels for p in parts]
        assert spans[0][0] == 0 and all(a[1] == b[0] for a, b in zip(spans, spans[1:]))
        full = parts[0].out_shape[0] * 4
        assert spans[-1][1] == full
        for p in parts:
            assert p.siblings == [q.id for q in parts if q.id != p.id]
            for n in p.body:
                if n.kind == "conv":
                    assert n.attrs["out"] * 4 in (16, 32, 64)


def test_dense_in_layers_are_first_conv_and_shortcut_only():
    art = rn(8, 4)
    for p in art.plan.partitions:
        if p.kind == "final":
            continue
        dense = [n.source for n in p.body if n.dense_in]
        first = p.units[0]
        if first == "stem":
            assert dense == ["stem"]
        elif first in ("s2.b0", "s3.b0"):
            assert dense == [f"{first}.conv1", f"{first}.shortcut"]
        else:
            assert dense == [f"{first}.conv1"]
        # the module input is the concatenation of all upstream groups
        if p.module > 1:
            ups = [q.id for q in art.plan.partitions if q.module == p.module - 1]
            assert [i.source for i in p.inputs] == ups


def test_identity_shortcut_slices_the_full_input():
    art = rn(2, 4)
    p = [q for q in art.plan.partitions if q.module == 2][2]
    sl = [n for n in p.body if n.kind == "slice"]
    assert len(sl) == 1 and sl[0].attrs == {"start": 16, "length": 8}


def test_edges_go_forward_and_siblings_only_share_within_a_module():
    art = rn(4, 2, "{share_ratio: 1.0, diversity: {weight: 0.5}}")
    mod = {p.id: p.module for p in art.plan.partitions}
    kinds = set()
    for e in art.plan.edges:
        kinds.add(e.kind)
        if e.kind in ("share", "diversity"):
            assert mod[e.src] == mod[e.dst] and e.src != e.dst
        elif e.src != IMAGE:
            assert e.src < e.dst and mod[e.src] < mod[e.dst]
    assert kinds == {"image", "activation", "share", "diversity"}
    for p in art.plan.partitions:
        if p.kind != "final":
            assert p.loss.diversity_weight == 0.5 and p.loss.diversity_temperature == 3.0
            assert [s.source for s in p.shares] == p.siblings
    assert art.plan.final.loss.diversity_weight == 0 and art.plan.final.shares == []


def test_no_diversity_or_sharing_with_a_single_group():
    art = rn(4, 1, "{share_ratio: 1.0, diversity: {weight: 0.5}}")
    for p in art.plan.partitions:
        assert p.shares == [] and p.loss.diversity_weight == 0 and p.siblings == []
    assert {e.kind for e in art.plan.edges} == {"image", "activation"}


def test_heads_by_kind():
    def head(kind, extra=""):
        return compile_spec(f"name: t\nmodel: {{template: resnet32}}\ncuts: {{depth: 2}}\n"
                            f"local: {{head: {{kind: {kind}{extra}}}}}\n").plan.partitions[0]
    p = head("1c2f")
    convs = [n for n in p.head if n.kind == "conv"]
    assert len(convs) == 1 and convs[0].attrs["stride"] == 2 and convs[0].attrs["out"] == 2 * 32
    assert [n.attrs["out"] for n in p.head if n.kind == "linear"] == [128, 10]
    assert head("1c2f", ", hidden: 64").head[-1].attrs["out"] == 10
    assert [n.attrs["out"] for n in head("1c2f", ", hidden: 64").head if n.kind == "linear"] == [64, 10]
    assert [n.kind for n in head("linear").head] == ["input", "adaptive_avgpool", "flatten", "linear"]
    ps = head("predsim")
    assert set(ps.head_outputs) == {"sim", "logits"} and ps.loss.kind == "predsim" and ps.loss.beta == 0.99
    pool = next(n for n in ps.head if n.kind == "adaptive_avgpool")
    c, h, w = pool.shape
    assert c * h * w <= 2048
    ip = head("infopro", ", variant: softmax")
    assert set(ip.head_outputs) == {"recon", "logits"} and ip.loss.variant == "softmax"
    assert next(n for n in ip.head if n.name == "dec_sigmoid").shape == [3, 32, 32]
    ic = head("infopro")
    assert set(ic.head_outputs) == {"recon", "proj"} and ic.loss.variant == "contrast"
    assert next(n for n in ic.head if n.name == "proj_norm").shape == [128]
    mlp = head("mlp-sr")
    assert next(n for n in mlp.head if n.name == "pool2").shape[1:] == [2, 2]


def test_infopro_lambdas_interpolate_over_local_modules():
    art = compile_spec(SPECS / "resnet32_infopro_k8.yaml")
    local = [p for p in art.plan.partitions if p.head_kind == "infopro"]
    assert len(local) == 7  # joint: K = 8 modules, 7 aux heads
    assert local[0].loss.recon_weight == pytest.approx(5.0) and local[0].loss.task_weight == pytest.approx(0.0)
    assert local[-1].loss.recon_weight == pytest.approx(0.0) and local[-1].loss.task_weight == pytest.approx(2.0)
    rec = [p.loss.recon_weight for p in local]
    assert all(a > b for a, b in zip(rec, rec[1:]))
    assert rec[3] == pytest.approx(2.5)
    # the image is an input of every InfoPro partition's loss
    img = {e.dst for e in art.plan.edges if e.src == IMAGE and e.kind == "image"}
    assert img >= {p.id for p in local}


def test_vgg6a_layerwise_groups():
    art = compile_spec(SPECS / "vgg6a_g2.yaml")
    plan = art.plan
    assert plan.groups == [2, 4, 2, 1, 1]
    assert [p.name for p in plan.partitions][-1] == "head"
    assert plan.final.head_kind == "final:model"
    assert len(plan.partitions) == 2 + 4 + 2 + 1 + 1 + 1
    assert all(p.head_kind == "predsim" for p in plan.partitions[:-1])
    # module 2 (conv2, 256 channels) in 4 groups reads both groups of module 1
    m2 = [p for p in plan.partitions if p.module == 2]
    assert all(len(p.inputs) == 2 for p in m2)
    assert all(p.out_shape[0] == 64 for p in m2)


def test_balanced_split_for_g_not_dividing():
    assert group_sizes(10, 3, "balanced") == [4, 3, 3]
    with pytest.raises(PartitionError, match="does not divide"):
        group_sizes(10, 3, "equal")
    with pytest.raises(PartitionError, match="larger than"):
        group_sizes(2, 3, "balanced")
    art = compile_spec("name: t\nmodel: {template: resnet32}\ncuts: {depth: 2, width: 3, split: balanced}\n")
    m1 = [p for p in art.plan.partitions if p.module == 1]
    assert [p.channels for p in m1] == [[0, 11], [11, 22], [22, 32]]
    x = torch.randn(1, 3, 32, 32)
    for m in art.modules.values():
        m.eval()
    with torch.no_grad():
        assert art.assembled()(x).shape == (1, 10)


def test_validate_plan_catches_a_broken_plan():
    spec = load_spec("name: t\nmodel: {template: resnet32}\ncuts: {depth: 2, width: 2}\n")
    og = build_graph(spec)
    plan = build_plan(spec, og)
    validate_plan(plan, og)
    d = plan.to_dict()
    # a backwards activation edge
    bad = PartitionPlan.from_dict(d)
    bad.edges.append(type(bad.edges[0])(src=3, dst=1, kind="activation", bytes_per_sample=4))
    with pytest.raises(PartitionError, match="backwards"):
        validate_plan(bad, og)
    # a body node reading a tensor of another partition
    bad = PartitionPlan.from_dict(d)
    bad.partitions[2].body[-1].args = ["not_here"]
    with pytest.raises(PartitionError, match="outside its partition"):
        validate_plan(bad, og)
    # a weight owned twice (two partitions claim the same group)
    bad = PartitionPlan.from_dict(d)
    conv = next(n for n in bad.partitions[0].body if n.kind == "conv")
    conv.attrs = dict(conv.attrs, out=conv.attrs["out"] * 2)
    with pytest.raises(PartitionError, match="owned"):
        validate_plan(bad, og)
    # a share between partitions of different modules
    bad = PartitionPlan.from_dict(d)
    bad.edges.append(type(bad.edges[0])(src=0, dst=2, kind="share", bytes_per_sample=4))
    with pytest.raises(PartitionError, match="siblings"):
        validate_plan(bad, og)


def test_plan_round_trips_through_dict():
    art = rn(8, 4, "{share_ratio: 1.0, diversity: {weight: 0.5}}")
    d = art.plan.to_dict()
    again = PartitionPlan.from_dict(d)
    assert again.to_dict() == d
    assert again.summary == art.summary


def test_weights_are_seeded_per_partition():
    a, b = rn(2, 2), rn(2, 2)
    for pid in a.modules:
        sa, sb = a.modules[pid].state_dict(), b.modules[pid].state_dict()
        assert all(sa[k].equal(sb[k]) for k in sa)
    # a partition's init does not depend on which other partitions are built
    only = build_partitions(a.plan, seed=0, ids=[3])
    assert list(only) == [3]
    s3 = a.modules[3].state_dict()
    assert all(s3[k].equal(v) for k, v in only[3].state_dict().items())
    # another seed gives other weights; siblings differ from each other
    c = compile_spec("name: t\nmodel: {template: resnet32}\ncuts: {depth: 2, width: 2}\ntrain: {seed: 7}\n")
    w = lambda art, pid: art.modules[pid].body.stem.weight  # noqa: E731
    assert not w(a, 0).equal(w(c, 0))
    assert not w(a, 0).equal(w(a, 1))


def test_workers_override_places_partitions():
    art = compile_spec(SPECS / "resnet32_k8g4.yaml", workers=4)
    assert art.plan.workers == 4
    workers = {p.worker for p in art.plan.partitions}
    assert workers == {0, 1, 2, 3}


def test_compile_errors_are_spec_errors_with_field():
    with pytest.raises(SpecError) as info:
        compile_spec("name: t\nmodel: {template: resnet32}\ncuts: {depth: 2, width: 5}\n")
    assert info.value.path == "cuts.width" and info.value.line == 3
    with pytest.raises(SpecError) as info:
        compile_spec("name: t\nmodel:\n  layers:\n    - {op: conv, out: 8}\n    - {op: linear, out: 10}\n")
    assert info.value.path == "model" and "flatten" in str(info.value)
