"""Width grouping: rewrite one depth module into the body of group g.

Connectivity inside module k, group g (DESIGN §2):

    full detached input x (all groups of module k-1, concatenated)
        │
        ├── first conv of the first unit ──▶ C/G channels      ("dense in")
        ├── 1×1 shortcut conv (if any)   ──▶ C/G channels      ("dense in")
        ├── identity shortcut            ──▶ x[:, g-slice]     (sliced)
        │
        └── every later layer reads only group g's own slice    ("grouped")

Each op says how it splits in the registry (``OpDef.split``): ``weights`` ops
(conv, linear, patch_embed, attention, mlp) divide their ``split_keys`` (output
channels, heads, MLP hidden units) by G (and ``split_attrs`` rewrites the rest: a
bottleneck's grouped 3×3 conv keeps cardinality/G groups); ``follow`` ops (BN, activations, pooling,
dropout, LayerNorm, ...) act on whatever slice reaches them, the full input before
the module's first ``weights`` op (a transformer's LN₁) and the group's slice after;
``merge`` ops (the residual add) slice an input that still holds all channels to
the group's channels; ``whole`` ops are refused once grouping started (DESIGN §2.1).
"""

from __future__ import annotations

import math

from ..errors import PartitionError
from ..graph.build import OpGraph
from ..graph.ops import get_op
from .ir import IRBuilder


def group_sizes(channels: int, groups: int, split: str = "equal") -> list[int]:
    """Sizes of ``groups`` channel slices of ``channels``.

    Args:
        channels: channel (or feature) count to split.
        groups: number of groups G.
        split: 'equal' (G must divide the count) or 'balanced' (sizes differ by at most one).

    Raises:
        PartitionError: G does not divide the count ('equal') or exceeds it.
    """
    if groups > channels:
        raise PartitionError(f"G={groups} is larger than the {channels} channels to split", field=("cuts", "width"))
    if channels % groups:
        if split != "balanced":
            raise PartitionError(f"G={groups} does not divide {channels} channels; choose a divisor of {channels} "
                                 "or set cuts.split: balanced", field=("cuts", "width"))
        q, r = divmod(channels, groups)
        return [q + 1 if i < r else q for i in range(groups)]
    return [channels // groups] * groups


def group_offset(channels: int, groups: int, g: int, split: str) -> tuple[int, int]:
    """``(start, length)`` of group ``g``'s slice of ``channels``."""
    sizes = group_sizes(channels, groups, split)
    return sum(sizes[:g]), sizes[g]


def check_token_groups(og: OpGraph, nodes: list[str], groups: int, split: str) -> None:
    """Refuse a G that does not divide every split dimension (channels, heads, MLP hidden) of a module
    that has ops splitting more than their output channels (attention, mlp).

    Raises:
        PartitionError: naming the op and dimension, and listing the G that would work.
    """
    dims: list[tuple[str, str, int]] = []
    for n in nodes:
        d = og.node(n)
        op = get_op(d["kind"])
        if op.parametric:
            dims += [(n, key, d["attrs"][key]) for key in op.split_keys]
    if groups == 1 or split == "balanced" or all(key == "out" for _, key, _ in dims):
        return
    bad = next(((n, key, v) for n, key, v in dims if v % groups), None)
    if bad is None:
        return
    common = 0
    for _, _, v in dims:
        common = math.gcd(common, v)
    valid = [str(x) for x in range(1, common + 1) if common % x == 0]
    what = {"out": "output channels", "heads": "heads", "hidden": "MLP hidden units"}.get(bad[1], bad[1])
    raise PartitionError(f"G={groups} does not divide the {bad[2]} {what} of '{bad[0]}'; a width cut needs G to "
                         f"divide the embedding size, the heads and the MLP hidden size; valid G: {', '.join(valid)}",
                         field=("cuts", "width"))


def module_body(og: OpGraph, nodes: list[str], module_input: str, x: str, groups: int, g: int, split: str,
                b: IRBuilder) -> str:
    """Append group ``g``'s body of one module to ``b``.

    Args:
        og: the op graph.
        nodes: op-graph nodes of the module, in topological order.
        module_input: op-graph node whose output feeds the module.
        x: IR name of the full (concatenated, detached) module input in ``b``.
        groups: G of the module.
        g: group index.
        split: 'equal' or 'balanced'.
        b: builder to append to.

    Returns:
        IR name of the group's output.

    Raises:
        PartitionError: a channel count not divisible by G, or an op that cannot be grouped.
    """
    check_token_groups(og, nodes, groups, split)
    ir = {module_input: x}
    full = {module_input}  # op-graph nodes whose IR tensor holds all channels
    dense_done = False
    for n in nodes:
        d = og.node(n)
        kind, attrs = d["kind"], dict(d["attrs"])
        preds = sorted(og.graph.predecessors(n), key=lambda p: og.graph.edges[p, n]["pos"])
        args = [ir[p] for p in preds]
        if groups == 1:
            if get_op(kind).parametric:
                attrs["in"] = b.shape(args[0])[0]
            ir[n] = b.add(n, kind, attrs, args, source=n, dense_in=preds[0] == module_input)
            continue
        ir[n], dense = _group_node(b, n, kind, attrs, preds, args, full, dense_done, module_input, groups, g, split)
        dense_done = dense_done or dense
    return ir[nodes[-1]]


def _group_node(b: IRBuilder, n: str, kind: str, attrs: dict, preds: list[str], args: list[str], full: set[str],
                dense_done: bool, module_input: str, groups: int, g: int, split: str) -> tuple[str, bool]:
    """Append op-graph node ``n`` of group ``g`` (G > 1) to ``b``: a parametric op at its group's width, a
    merge of full inputs sliced to the group, an op before the first dense layer on all channels (``n``
    joins ``full``). Returns its IR name and whether it is a dense layer reading all channels."""
    op = get_op(kind)
    if op.parametric:
        for key in op.split_keys:
            attrs[key] = group_offset(attrs[key], groups, g, split)[1]
        if op.split_attrs is not None:
            try:
                attrs = op.split_attrs(attrs, groups)
            except ValueError as err:
                raise PartitionError(f"'{n}': {err}", field=("cuts", "width")) from None
        attrs["in"] = b.shape(args[0])[0]
        return b.add(n, kind, attrs, args, source=n, dense_in=preds[0] == module_input), preds[0] in full
    if op.split == "merge":
        fixed = []
        for p, a in zip(preds, args):
            if p in full:
                start, size = group_offset(b.shape(a)[0], groups, g, split)
                a = b.add(f"{n}_slice", "slice", {"start": start, "length": size}, [a], source=n)
            fixed.append(a)
        return b.add(n, kind, attrs, fixed, source=n), False
    if all(p in full for p in preds) and not dense_done:
        # ops before the module's first dense layer (e.g. a flatten) see all channels
        full.add(n)
        return b.add(n, kind, attrs, args, source=n), False
    if op.split == "whole":
        raise PartitionError(f"op '{n}' ({kind}) cannot be split into groups, but it follows the module's "
                             f"first grouped layer at G={groups}; cut the module before it or use G=1",
                             field=("cuts", "width"))
    if any(p in full for p in preds):
        raise PartitionError(f"op '{n}' ({kind}) reads the full module input after grouping started; "
                             "cut the module elsewhere", field=("cuts", "depth"))
    return b.add(n, kind, attrs, args, source=n), False
