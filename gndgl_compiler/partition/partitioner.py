"""OpGraph + spec → PartitionPlan.

    module 1         module 2               final head
    ┌──────┐  sg    ┌──────┐   sg          ┌──────┐
    │ 1,g0 │──┬────▶│ 2,g0 │──┬───────────▶│ head │
    ├──────┤  │     ├──────┤  │            └──────┘
    │ 1,g1 │──┘────▶│ 2,g1 │──┘   sg = detached (stop-gradient) edge
    └──────┘        └──────┘
      aux₁₀ aux₁₁     aux₂₀ aux₂₁  ◀─ siblings share detached outputs (r)
                                      and softmaxes (diversity)

Every partition gets its body (group rewriting), an aux head and a local loss;
the final head is its own partition unless ``final_head.mode`` is 'joint'.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import PartitionError
from ..graph.build import INPUT, OpGraph
from ..graph.ops import get_op
from ..spec.models import Spec
from .costs import annotate_allreduce, annotate_costs
from .memory import annotate_memory
from .cuts import module_segments
from .groups import group_offset, module_body
from .auglocal import AugLocalPlan
from .heads import HEADS, check_head_input, head_1c2f, head_linear, resolve_head_kind
from .ir import IRBuilder
from .man import check_man, man_trunk, weight_edge
from .placement import place
from .plan import IMAGE, Edge, Input, IRNode, Loss, Partition, PartitionPlan, Share

FLOAT_BYTES = 4
MAX_PARTITIONS = 2048
"""Most partitions one spec may compile into (each is a generated module with its own head)."""
MAX_SIBLING_LINKS = 65536
"""Most sibling reads (stop-gradient shares, diversity terms): Σ G·(G−1) over the modules."""


def _numel(shape: list[int]) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _widths(spec: Spec, k: int) -> list[int]:
    w = spec.cuts.width
    if isinstance(w, int):
        return [w] * k
    if len(w) != k:
        raise PartitionError(f"cuts.width lists {len(w)} values but there are {k} modules; give one G per module "
                             "or a single integer", field=("cuts", "width"))
    return list(w)


def _hidden(spec: Spec, explicit: int | None) -> int:
    return explicit or max(1, int(round(128 * spec.model.width)))


def _classifier_ir(og: OpGraph, b: IRBuilder, x: str) -> dict[str, str]:
    """The model's own classifier segment, applied to ``x``."""
    seg = og.classifier
    ir = {next(iter(og.graph.predecessors(seg.nodes[0]))): x}
    for n in seg.nodes:
        d = og.node(n)
        preds = sorted(og.graph.predecessors(n), key=lambda p: og.graph.edges[p, n]["pos"])
        attrs = dict(d["attrs"])
        if get_op(d["kind"]).parametric:
            attrs["in"] = b.shape(ir[preds[0]])[0]
        ir[n] = b.add(n, d["kind"], attrs, [ir[p] for p in preds], source=n)
    return {"logits": ir[seg.nodes[-1]]}


def _final_head_kind(spec: Spec, og: OpGraph, k: int, groups: list[int]) -> str:
    if k == 1 and groups == [1]:
        return "model"
    kind = spec.local.final_head.kind
    tokens = len(og.node(og.body_segments[-1].output)["shape"]) == 2
    if kind == "auto":
        # a transformer's own classifier (LN → token pool → linear) is its natural final head
        return "model" if spec.local.final_head.mode == "joint" or tokens else "1c2f"
    if tokens and kind != "model":
        raise PartitionError(f"final_head.kind '{kind}' needs a feature map, but the network body outputs tokens; "
                             "use 'model' (its own LN → token_pool → linear) or 'auto'",
                             field=("local", "final_head", "kind"))
    return kind


def _build_final_head(spec: Spec, og: OpGraph, b: IRBuilder, x: str, head: str) -> dict[str, str]:
    classes = og.num_classes
    if head == "model":
        return _classifier_ir(og, b, x)
    if head == "linear":
        return head_linear(b, x, classes, 0)
    return head_1c2f(b, x, classes, _hidden(spec, spec.local.final_head.hidden))


@dataclass
class _Layout:
    """What every partition of a plan is built from: the modules' segments and widths, the final-head mode."""

    spec: Spec
    og: OpGraph
    modules: list[list[int]]
    """Body segments of each module."""
    groups: list[int]
    """G of each module."""
    e2e: bool
    """One module, one group: plain end-to-end training."""
    joint: bool
    """The last module closes with the final head (``final_head.mode: joint``)."""
    aug: AugLocalPlan
    input_shape: list[int]

    @property
    def k_mod(self) -> int:
        return len(self.modules)

    @property
    def local_modules(self) -> int:
        """Modules with a local head (the joint last module has the final head)."""
        return self.k_mod - 1 if self.joint else self.k_mod

    def closes(self, k: int) -> bool:
        """Module ``k`` (0-based) ends with the final head."""
        return self.e2e or (self.joint and k == self.k_mod - 1)


def _layout(spec: Spec, og: OpGraph) -> _Layout:
    """Cut the network into modules, take their widths and check the final-head mode against them."""
    modules = module_segments(og, spec.cuts.depth, spec.model.template, spec.cuts.balance or "macs")
    k_mod = len(modules)
    groups = _widths(spec, k_mod)
    loc = spec.local
    _check_size(k_mod, groups, loc.share_ratio > 0 or loc.diversity.weight > 0)
    e2e = k_mod == 1 and groups == [1]
    joint = loc.final_head.mode == "joint" and not e2e
    if joint and groups[-1] != 1:
        raise PartitionError(f"final_head.mode 'joint' closes the last module with the classifier, so that module "
                             f"needs G=1 (it has G={groups[-1]}); use mode 'separate' or G=1 there",
                             field=("local", "final_head", "mode"))
    if joint and k_mod == 1:
        raise PartitionError("final_head.mode 'joint' with K=1 and G=1 is plain end-to-end; "
                             "drop the mode or cut deeper",
                             field=("local", "final_head", "mode"))
    check_man(spec, groups, joint, e2e)
    aug = AugLocalPlan.of(spec, og, modules, k_mod - 1 if joint else k_mod)
    return _Layout(spec, og, modules, groups, e2e, joint, aug, list(og.input_shape))


def build_plan(spec: Spec, og: OpGraph) -> PartitionPlan:
    """Cut, group and place the network of ``spec``.

    Args:
        spec: the validated spec.
        og: its op graph.

    Returns:
        The :class:`PartitionPlan`, with costs and placement filled in.

    Raises:
        PartitionError: impossible cuts, widths, heads or placements.
    """
    lay = _layout(spec, og)
    parts: list[Partition] = []
    edges: list[Edge] = []
    prev_ids: list[int] = []  # partitions whose outputs form the current module input
    prev_node = INPUT
    for k in range(lay.k_mod):
        module_ids = list(range(len(parts), len(parts) + lay.groups[k]))
        nodes = [n for s in lay.modules[k] for n in og.body_segments[s].nodes]
        for g in range(lay.groups[k]):
            part = _partition(lay, parts, prev_ids, prev_node, k, g, module_ids)
            parts.append(part)
            edges += _edges(part, module_ids, lay.input_shape, og.num_classes)
        prev_ids, prev_node = module_ids, nodes[-1]
    if not lay.e2e and not lay.joint:
        head = _final_partition(lay, parts, prev_ids)
        parts.append(head)
        edges += [Edge(i.source, head.id, "activation", _numel(i.shape) * FLOAT_BYTES) for i in head.inputs]
    edges += [weight_edge(p, parts) for p in parts if p.man is not None]
    final_mode = "joint" if lay.joint else ("e2e" if lay.e2e else "separate")
    plan = PartitionPlan(
        name=spec.name, partitions=parts, edges=edges, num_modules=lay.k_mod, groups=lay.groups,
        num_classes=og.num_classes, input_shape=lay.input_shape, final_mode=final_mode,
        schedule=spec.local.schedule, devices=spec.placement.device_list(), workers=spec.placement.workers or 1)
    annotate_costs(plan, og)
    if spec.placement.replicas > 1:
        annotate_allreduce(plan, spec.placement.replicas)
    place(plan, plan.devices, plan.workers)
    opt = spec.train.optimizer
    annotate_memory(plan, opt.kind, opt.momentum, spec.train.batch_size)
    return plan


def _module_input(b: IRBuilder, parts: list[Partition], prev_ids: list[int], input_shape: list[int]
                  ) -> tuple[str, list[Input]]:
    """The body's input in ``b``: the previous module's outputs (concatenated), or the image."""
    inputs: list[Input] = []
    if not prev_ids:
        inputs.append(Input(IMAGE, input_shape, "image"))
        return b.input("image", input_shape), inputs
    names = []
    for j, src in enumerate(prev_ids):
        shp = parts[src].out_shape
        names.append(b.input(f"in{j}", shp))
        inputs.append(Input(src, list(shp)))
    return (names[0] if len(names) == 1 else b.add("x", "cat", {}, names)), inputs


def _partition(lay: _Layout, parts: list[Partition], prev_ids: list[int], prev_node: str, k: int, g: int,
               module_ids: list[int]) -> Partition:
    """Partition ``g`` of module ``k``: its body (group rewriting), head input, head and loss."""
    spec, og, G = lay.spec, lay.og, lay.groups[k]
    nodes = [n for s in lay.modules[k] for n in og.body_segments[s].nodes]
    units = [u for s in lay.modules[k] for u in og.body_segments[s].units]
    pid, name = len(parts), "e2e" if lay.e2e else f"m{k + 1}.g{g}"
    b = IRBuilder()
    x, inputs = _module_input(b, parts, prev_ids, lay.input_shape)
    try:
        module_body(og, nodes, prev_node, x, G, g, spec.cuts.split, b)
    except PartitionError as err:
        raise PartitionError(f"module {k + 1} (units {units[0]}..{units[-1]}), G={G}: {err}",
                             field=err.field or ("cuts", "width")) from None
    body = b.nodes
    c_out = body[-1].shape[0]
    full_c = og.node(nodes[-1])["shape"][0]
    start = group_offset(full_c, G, g, spec.cuts.split)[0] if G > 1 else 0
    hb = IRBuilder()
    h, shares = _head_input(lay, hb, body[-1].shape, full_c, k, g, module_ids)
    man = None
    if lay.closes(k):
        fk = _final_head_kind(spec, og, lay.k_mod, lay.groups)
        outs, loss = _build_final_head(spec, og, hb, h, fk), Loss("ce")
        pkind, hkind = ("e2e" if lay.e2e else "local"), f"final:{fk}"
    else:
        head_in = body[-1].shape
        if spec.local.man is not None and k < lay.k_mod - 1:  # MAN: LB + EMA copies of module k+1's first unit
            h, man = _man_trunk(lay, hb, h, k, g, module_ids, nodes[-1])
            head_in = hb.shape(h)
        outs, loss, hkind = _local_head(lay, hb, h, head_in, k, name)
        pkind = "local"
    aux_units = lay.aug.unit_names(k) if pkind == "local" and not lay.closes(k) else []
    return Partition(
        id=pid, name=name, kind=pkind, module=k + 1, group=g, groups=G, units=units, inputs=inputs,
        body=body, channels=[start, start + c_out], head_kind=hkind, head=hb.nodes, head_outputs=outs,
        loss=loss, shares=shares, siblings=[m for m in module_ids if m != pid], aux_units=aux_units, man=man)


def _head_input(lay: _Layout, hb: IRBuilder, shape: list[int], full_c: int, k: int, g: int, module_ids: list[int]
                ) -> tuple[str, list[Share]]:
    """The head's input in ``hb``: the partition's own output, plus detached sibling slices (stop-gradient
    sharing, ``local.share_ratio``) concatenated in group order."""
    G, ratio = lay.groups[k], lay.spec.local.share_ratio
    h = hb.input("h", shape)
    shares: list[Share] = []
    if G == 1 or ratio <= 0 or lay.closes(k):
        return h, shares
    pieces = []
    for gg in range(G):
        if gg == g:
            pieces.append(h)
            continue
        n_sib = int(ratio * group_offset(full_c, G, gg, lay.spec.cuts.split)[1])
        if n_sib <= 0:
            continue
        pieces.append(hb.input(f"sib{gg}", [n_sib] + list(shape[1:])))
        shares.append(Share(module_ids[gg], n_sib))
    return (hb.add("shared", "cat", {}, pieces) if len(pieces) > 1 else h), shares


def _man_trunk(lay: _Layout, hb: IRBuilder, h: str, k: int, g: int, module_ids: list[int], module_out: str
               ) -> tuple[str, Any]:
    """MAN: the LB + EMA copies of module k+1's first unit before the head; returns the head's input and the
    partition's MAN record."""
    G, groups = lay.groups[k], lay.groups
    return man_trunk(lay.spec, lay.og, hb, h, k=k, g=g, groups=groups, module_out=module_out,
                     next_unit=lay.og.body_segments[lay.modules[k + 1][0]].nodes,
                     source=module_ids[0] + G + g * groups[k + 1] // G)


def _local_head(lay: _Layout, hb: IRBuilder, h: str, head_in: list[int], k: int, name: str
                ) -> tuple[dict[str, str], Loss, str]:
    """The local head of a partition of module ``k`` on ``h`` (in ``hb``) and its loss; returns them and the
    head kind."""
    spec, loc, G = lay.spec, lay.spec.local, lay.groups[k]
    head_kind = resolve_head_kind(loc.head.kind, head_in)
    hidden = _hidden(spec, loc.head.hidden)
    if head_kind == "token-mlp" and loc.head.hidden is None:
        hidden = 2 * hb.shape(h)[0]
    elif G > 1 and loc.share_ratio == 0:
        hidden = max(1, hidden // G)
    extra = {}
    if head_kind == "infopro":
        extra = {"image_shape": lay.input_shape, "variant": loc.head.variant, "projection": loc.head.projection}
    extra.update(lay.aug.head_args(k, G))  # {} unless the head is auglocal
    try:
        check_head_input(head_kind, head_in)
        outs = HEADS[head_kind](hb, h, lay.og.num_classes, hidden, **extra)
    except PartitionError as err:
        raise PartitionError(f"partition {name}: {err}", field=("local", "head", "kind")) from None
    lr, lt = _infopro_lambdas(loc.head.recon_weight, loc.head.task_weight, k, lay.local_modules)
    div_on = G > 1 and loc.diversity.weight > 0
    loss = Loss({"predsim": "predsim", "infopro": "infopro"}.get(head_kind, "ce"), beta=loc.head.beta,
                variant=loc.head.variant if head_kind == "infopro" else "",
                recon_weight=lr, task_weight=lt, temperature=loc.head.temperature,
                diversity_weight=loc.diversity.weight if div_on else 0.0,
                diversity_temperature=loc.diversity.temperature)
    return outs, loss, head_kind


def _edges(p: Partition, module_ids: list[int], input_shape: list[int], num_classes: int) -> list[Edge]:
    """What partition ``p`` reads: its inputs, the image (InfoPro's target), sibling shares and diversity."""
    edges = [Edge(inp.source, p.id, inp.kind, _numel(inp.shape) * FLOAT_BYTES) for inp in p.inputs]
    if p.loss.kind == "infopro" and not any(i.kind == "image" for i in p.inputs):
        # the reconstruction target: the loss reads the (de-normalised) image
        edges.append(Edge(IMAGE, p.id, "image", _numel(input_shape) * FLOAT_BYTES))
    for sh in p.shares:
        edges.append(Edge(sh.source, p.id, "share", sh.channels * _numel(p.body[-1].shape[1:]) * FLOAT_BYTES))
    if p.loss.diversity_weight > 0:
        edges += [Edge(sib, p.id, "diversity", num_classes * FLOAT_BYTES) for sib in module_ids if sib != p.id]
    return edges


def _final_partition(lay: _Layout, parts: list[Partition], prev_ids: list[int]) -> Partition:
    """The separate final head: the last module's outputs concatenated, then the final head."""
    spec, og = lay.spec, lay.og
    b = IRBuilder()
    names = []
    inputs = []
    for j, src in enumerate(prev_ids):
        names.append(b.input(f"in{j}", parts[src].out_shape))
        inputs.append(Input(src, list(parts[src].out_shape)))
    x = names[0] if len(names) == 1 else b.add("x", "cat", {}, names)
    hb = IRBuilder()
    h = hb.input("h", b.shape(x))
    fk = _final_head_kind(spec, og, lay.k_mod, lay.groups)
    outs = _build_final_head(spec, og, hb, h, fk)
    return Partition(
        id=len(parts), name="head", kind="final", module=lay.k_mod + 1, group=0, groups=1,
        units=list(og.classifier.units) if fk == "model" else [], inputs=inputs, body=b.nodes,
        channels=[0, b.shape(x)[0]], head_kind=f"final:{fk}", head=hb.nodes, head_outputs=outs, loss=Loss("ce"))


def _check_size(k_mod: int, groups: list[int], siblings: bool) -> None:
    """Refuse plans too large to build in reasonable time and memory, before building them."""
    g_text = str(groups[0]) if len(set(groups)) == 1 else str(groups)
    n_parts = sum(groups) + 1
    if n_parts > MAX_PARTITIONS:
        raise PartitionError(f"K={k_mod} modules with G={g_text} make {n_parts} partitions; gndgl compiles at most "
                             f"{MAX_PARTITIONS}; use fewer modules (cuts.depth) or groups (cuts.width)",
                             field=("cuts", "width"))
    links = sum(g * (g - 1) for g in groups)
    if siblings and links > MAX_SIBLING_LINKS:
        raise PartitionError(f"G={g_text} over K={k_mod} modules with local.share_ratio or local.diversity on makes "
                             f"{links} sibling reads (every group reads the other G-1); gndgl compiles at most "
                             f"{MAX_SIBLING_LINKS}; use fewer groups, or share_ratio: 0 and diversity weight: 0",
                             field=("cuts", "width"))


def _infopro_lambdas(recon: tuple[float, float], task: tuple[float, float], k: int, n: int) -> tuple[float, float]:
    """λ_recon, λ_task interpolated linearly from the first to the last local module."""
    if n <= 1:
        return recon[0], task[0]
    t = k / (n - 1)
    return recon[0] + t * (recon[1] - recon[0]), task[0] + t * (task[1] - task[0])


__all__ = ["build_plan", "IRNode"]
