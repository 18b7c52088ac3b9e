"""The siblings' IR node lists (bodies or aux heads) compiled into fused steps, one per node, by the
fused-op table (``fusion/table.py``): layouts flow from the inputs, the table's entry of each node's kind
builds its step, and what has no entry or no exact fused form raises :class:`NotFusable`.
"""

from __future__ import annotations

import torch

from ...partition.plan import IRNode
from .layouts import FusionBuild, NodeGroup, NotFusable, Step, same
from .padded import check_padded
from .table import FusedOpDef, find_fused_op

_OUTPUT_LAYOUTS = {"out": ("stack", "gstack", "gtok"), "logits": ("stack", "gstack"), "proj": ("gstack",)}
"""The layouts each output may have (per group); other head outputs (``sim``, ``recon``): a stack."""


def compile_nodes(b: FusionBuild, lists: list[list[IRNode]], gms: list[torch.nn.Module], head: bool,
                  outputs: dict[str, str]) -> tuple[list[tuple[str, Step]], dict[str, str]]:
    """The fused steps of the siblings' bodies (or aux heads), fusing their parameters on the way.

    Args:
        b: the stage being built (its fused tensors, channel maps and real widths grow).
        lists: each sibling's IR nodes (body or head), in group order.
        gms: each sibling's GraphModule (its submodules are named after the IR nodes).
        head: compiling the aux heads (inputs ``h`` + sibling shares) rather than the bodies.
        outputs: the head outputs (``{output: node name}``; ignored for a body, whose output is its last node).

    Returns:
        ``([(node name, step)] in IR order, {value name: layout})``; each step sets ``env[node name]``.

    Raises:
        NotFusable: an op or pattern without an exact fused form.
    """
    same([[(n.kind, b.ir_shape(n)) if head and _reads_shares(n) else (n.name, n.kind, n.args, b.ir_shape(n))
           for n in nodes] for nodes in lists], "IR")
    layout: dict[str, str] = {}
    steps: list[tuple[str, Step]] = []
    for i, n in enumerate(lists[0]):
        ns = [nodes[i] for nodes in lists]
        if n.kind == "input":
            layout[n.name] = ("stack" if n.name == "h" else "share_in") if head else "shared"
            continue
        step, layout[n.name] = _node(b, NodeGroup(ns, [layout[a] for a in n.args], gms, head, lists))
        steps.append((n.name, step))
        if layout[n.name] in ("stack", "gstack"):
            b.real_widths[n.name] = [m.shape[0] for m in ns]
    _check_outputs(b, layout, outputs if head else {"out": lists[0][-1].name}, head)
    return steps, layout


def _reads_shares(n: IRNode) -> bool:
    """An aux head's input or its ``cat`` of the module output and sibling shares (named per group)."""
    d = find_fused_op(n.kind)
    return n.kind == "input" or (d is not None and d.shares)


def _not_fused(b: FusionBuild, grp: NodeGroup) -> tuple[Step, str]:
    raise NotFusable(f"op '{grp.node.kind}' ({grp.name})")


def _node(b: FusionBuild, grp: NodeGroup) -> tuple[Step, str]:
    """The step and output layout of one node of all siblings, by its kind's table entry."""
    n = grp.node
    d = find_fused_op(n.kind) or FusedOpDef(n.kind, _not_fused)
    if b.padded:
        check_padded(b, d, grp)
    if not (d.per_group or (grp.head and d.shares)):
        if "share_in" in grp.layouts:
            raise NotFusable(f"sibling shares read by {n.kind} (share_ratio < 1 or a custom head)")
        same([b.ir_attrs(m) for m in grp.nodes], f"attributes of {n.name}")
    return d.build(b, grp)


def _check_outputs(b: FusionBuild, layout: dict[str, str], outs: dict[str, str], head: bool) -> None:
    """Refuse outputs that do not come out per group (or, padded, with unequal widths where not allowed)."""
    for key, out in outs.items():
        if layout.get(out) not in _OUTPUT_LAYOUTS.get(key, ("stack",)):
            raise NotFusable(f"{'head' if head else 'body'} output {key} is not per group")
        if head and key not in ("sim", "out") and b.padding(out) is not None:
            raise NotFusable(f"head output {key} has unequal widths per group")


def concat_input(nodes: list[IRNode]) -> str | None:
    """The body's concatenation of all its inputs in order, if that is how it starts (fed fused)."""
    ins = [n.name for n in nodes if n.kind == "input"]
    for n in nodes:
        d = find_fused_op(n.kind)
        if d is not None and d.concat and n.args == ins and len(ins) > 1:
            return n.name
    return None
