"""MAN / MAN++ aux nets (DESIGN §2.3): the aux net of module k < K follows U, the first unit of module k+1.

    h ──┬── LB  (trainable copy of U's architecture, owned by partition k) ──┐
        └── EMA (U's architecture, no gradient: θ_EMA ← m·θ_EMA + (1−m)·θ_U) ─┴─ mix ── head

``mix`` is ``add`` (MAN) or ``man_mix`` (MAN++: s·LB + (2−s)·EMA). With G groups, partition (k, g)
follows U of partition (k+1, g′), g′ = ⌊g·G_{k+1}/G_k⌋: U is dense in, so it reads all C_k channels,
which is exactly the aux input under sharing r = 1. The link (which partition, which nodes) is a
:class:`~.plan.ManLink`; the weight edge ``U's parameters → partition k`` is an :class:`~.plan.Edge`
of kind ``weight`` that carries bytes once per step and no gradient.
"""

from __future__ import annotations

from ..errors import PartitionError
from ..graph.build import OpGraph
from ..graph.ops import get_op
from ..spec.models import Spec
from .groups import module_body
from .heads import check_head_input, resolve_head_kind
from .ir import IRBuilder
from .plan import Edge, IRNode, ManLink, Partition

FLOAT_BYTES = 4
FIELD = ("local", "man")
MIX_OPS = {"sum": "add", "learned": "man_mix"}
"""``local.man.mix`` → the op that mixes LB(h) and EMA(h): MAN's sum, MAN++'s s·LB + (2−s)·EMA."""


def check_man(spec: Spec, groups: list[int], joint: bool, e2e: bool) -> None:
    """Refuse MAN where it is undefined (before any partition is built).

    Raises:
        PartitionError: MAN with a single module, or with G > 1 and a sharing ratio other than 1.
    """
    loc = spec.local
    if loc.man is None:
        return
    if e2e or len(groups) == 1:
        raise PartitionError("local.man makes the aux net of module k follow the first unit of module k+1, but "
                             "this spec has one module (the last module keeps its ordinary head); cut the network "
                             "into K ≥ 2 modules (cuts.depth) or drop local.man", field=FIELD)
    if loc.head.kind == "auglocal":
        raise PartitionError("local.man puts LB + EMA copies of the next module's first unit in front of a DGL-style "
                             "or InfoPro head; an auglocal head builds its own aux net from later units, and the two "
                             "are not defined together: drop local.man, or choose another local.head.kind",
                             field=FIELD)
    wide = [k + 1 for k, g in enumerate(groups[:-1]) if g > 1]
    if wide and loc.share_ratio != 1:
        raise PartitionError(f"local.man with G > 1 (modules {', '.join(map(str, wide))}) needs share_ratio 1 (it "
                             f"is {loc.share_ratio:g}): the EMA unit follows U, the next module's first unit, which "
                             "reads all channels of this module's output, so the aux net must see them all (own "
                             "slice live, siblings detached); set local.share_ratio: 1.0",
                             field=("local", "share_ratio"))


def man_trunk(spec: Spec, og: OpGraph, hb: IRBuilder, h: str, *, k: int, g: int, groups: list[int],
              next_unit: list[str], module_out: str, source: int) -> tuple[str, ManLink]:
    """Append LB(h), EMA(h) and their mix to the head builder of partition (k, g).

    Args:
        spec: the spec (``local.man``, ``cuts.split``, ``local.head.kind``).
        og: the op graph.
        hb: the aux head's builder; ``h`` its input (the full module output under r = 1, or G = 1).
        k: module index (0-based) of the partition; g its group.
        groups: G of every module.
        next_unit: op-graph nodes of U (the first segment of module k+1).
        module_out: op-graph node of module k's output (U's input).
        source: partition id of (k+1, g′), whose body holds U.

    Returns:
        ``(y, link)``: the mixed tensor the head reads, and the :class:`ManLink`.

    Raises:
        PartitionError: U has no weights, or no head kind reads U's output.
    """
    man = spec.local.man
    g_next = g * groups[k + 1] // groups[k]
    ub = IRBuilder()
    x = ub.input("man_x", hb.shape(h))
    module_body(og, next_unit, module_out, x, groups[k + 1], g_next, spec.cuts.split, ub)
    unit = og.node(next_unit[0])["unit_name"]
    u_nodes = ub.nodes[1:]
    if not any(n.params for n in u_nodes):
        raise PartitionError(f"local.man: the first unit of module {k + 2} ('{unit}') has no weights for the EMA "
                             "unit to follow; MAN needs every module after the first to start with a unit with "
                             "weights (conv, block, linear, transformer block): move the cut", field=FIELD)
    out_shape = u_nodes[-1].shape
    try:
        check_head_input(resolve_head_kind(spec.local.head.kind, out_shape), out_shape)
    except PartitionError as err:
        raise PartitionError(f"local.man: the aux net of module {k + 1} ends in a copy of '{unit}' (the first unit "
                             f"of module {k + 2}), and no head of this kind reads its output: {err}",
                             field=FIELD) from None
    lb = _copy(hb, u_nodes, x, h, "lb_")
    ema = _copy(hb, u_nodes, x, h, "ema_")
    last = u_nodes[-1].name
    y = hb.add("man_mix", MIX_OPS[man.mix], {}, [lb[last], ema[last]])
    link = ManLink(source=source, momentum=man.momentum, mix=man.mix,
                   ema={ema[n.name]: n.name for n in u_nodes if get_op(n.kind).module is not None},
                   lb=[lb[n.name] for n in u_nodes], mix_node=y)
    return y, link


def _copy(hb: IRBuilder, nodes: list[IRNode], x: str, h: str, tag: str) -> dict[str, str]:
    """Append a copy of ``nodes`` (reading ``x``) to ``hb``, reading ``h``; old name → new name."""
    names = {x: h}
    for n in nodes:
        names[n.name] = hb.add(f"{tag}{n.name}", n.kind, dict(n.attrs), [names[a] for a in n.args])
    return names


def weight_edge(part: Partition, parts: list[Partition]) -> Edge:
    """The weight edge of a MAN partition: U's parameters (bytes once per step), no gradient."""
    assert part.man is not None
    src = parts[part.man.source]
    by_name = {n.name: n for n in src.body}
    params = sum(by_name[name].params for name in part.man.ema.values())
    return Edge(src.id, part.id, "weight", 0, params * FLOAT_BYTES)


def check_links(parts: list[Partition]) -> None:
    """Plan validation of every MAN link: the weight edge joins (k+1, g′) to (k, g), and each EMA node is U's op.

    Raises:
        PartitionError: (internal) a link that does not match the plan.
    """
    for p in parts:
        if p.man is None:
            continue
        src = parts[p.man.source] if 0 <= p.man.source < len(parts) else None
        if src is None or src.module != p.module + 1 or src.group != p.group * src.groups // p.groups:
            raise PartitionError(f"internal: the MAN link of {p.name} does not point at U of partition "
                                 f"(module {p.module + 1}, group ⌊g·G'/G⌋)")
        body = {n.name: n for n in src.body}
        head = {n.name: n for n in p.head}
        for ema, u in p.man.ema.items():
            a, b = head.get(ema), body.get(u)
            if a is None or b is None or (a.kind, a.attrs, a.shape) != (b.kind, b.attrs, b.shape):
                raise PartitionError(f"internal: EMA node {p.name}.{ema} is not a copy of {src.name}.{u}")
            if a.source or a.name in p.man.lb:
                raise PartitionError(f"internal: EMA node {p.name}.{ema} must own no network weight and no gradient")
