"""Spec units → an annotated op graph (networkx DiGraph).

    units:    stem  stem_bn  stem_relu  s1.b0 ...  pool  flatten  fc
    segments: [stem stem_bn stem_relu] [s1.b0] ... [pool flatten fc]
                                                    └ classifier ┘

A *segment* is the smallest piece depth cuts may separate: it starts at a conv,
linear or block (or at a flatten / adaptive pool that leads into a linear) and
takes the BN, activations, pooling and dropout after it. A transformer's segments
are its patch embedding (with the positional embedding) and each block; its
classifier is [norm pool fc] (see ``transformer_units``). The last segment is the
model's classifier. Every node carries its op kind, attributes, per-sample
input/output shapes, MACs and parameter count.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx

from ..errors import GraphError
from ..spec.models import Spec
from ..spec.templates import expand_model
from .ops import get_op
from .transformer_units import CLASSIFIER_LEAD_INS, SEGMENT_UNITS, UNIT_BUILDERS

SEGMENT_OPS = ("conv", "linear", "block") + SEGMENT_UNITS
"""Unit ops that open a segment."""
LEAD_INS = ("flatten", "adaptive_avgpool") + CLASSIFIER_LEAD_INS
"""Unit ops that join the segment of the linear they lead into."""

INPUT = "input"


@dataclass
class Segment:
    """A run of units that depth cuts never separate."""

    index: int
    name: str
    units: list[str]
    unit_indices: list[int]
    nodes: list[str] = field(default_factory=list)
    output: str = ""


@dataclass
class OpGraph:
    """The network as a DAG of ops plus its segmentation."""

    graph: nx.DiGraph
    segments: list[Segment]
    input_shape: tuple[int, ...]
    num_classes: int
    width: float

    @property
    def body_segments(self) -> list[Segment]:
        """All segments but the classifier."""
        return self.segments[:-1]

    @property
    def classifier(self) -> Segment:
        """The last segment (the model's own classifier)."""
        return self.segments[-1]

    def node(self, name: str) -> dict:
        """Attributes of node ``name``."""
        return self.graph.nodes[name]

    def total_macs(self) -> int:
        """Forward MACs of the whole network per sample."""
        return sum(d["macs"] for _, d in self.graph.nodes(data=True))


class _Builder:
    def __init__(self, input_shape: tuple[int, ...]):
        self.g = nx.DiGraph()
        self.g.add_node(INPUT, kind="input", attrs={}, shape=tuple(input_shape), in_shapes=[], macs=0, params=0,
                        unit=-1, unit_name="input", role="input", segment=-1)
        self.order = [INPUT]

    def add(self, name: str, kind: str, attrs: dict, inputs: list[str], unit: int, unit_name: str, role: str) -> str:
        ins = [self.g.nodes[i]["shape"] for i in inputs]
        op = get_op(kind)
        try:
            out = op.shape(attrs, ins)
        except GraphError as err:
            raise GraphError(f"unit '{unit_name}' (#{unit}): {err}") from None
        self.g.add_node(name, kind=kind, attrs=dict(attrs), shape=out, in_shapes=ins, macs=op.macs(attrs, ins, out),
                        params=op.params(attrs, ins, out), unit=unit, unit_name=unit_name, role=role, segment=-1)
        for pos, src in enumerate(inputs):
            self.g.add_edge(src, name, pos=pos)
        self.order.append(name)
        return name


def _add_unit(b: _Builder, layer, idx: int, x: str) -> str:
    """Append the ops of one unit after node ``x``; return the unit's output node."""
    name, kind = layer.name, layer.op
    if kind in UNIT_BUILDERS:
        return UNIT_BUILDERS[kind](b, layer, idx, x)
    c_in = b.g.nodes[x]["shape"][0]
    if kind == "conv":
        pad = layer.padding if layer.padding is not None else layer.kernel // 2
        return b.add(name, "conv", {"in": c_in, "out": layer.out, "kernel": layer.kernel, "stride": layer.stride,
                                    "padding": pad, "bias": layer.bias}, [x], idx, name, "entry")
    if kind == "linear":
        return b.add(name, "linear", {"in": c_in, "out": layer.out, "bias": layer.bias}, [x], idx, name, "entry")
    if kind == "block":
        c, s = layer.out, layer.stride
        h = b.add(f"{name}.conv1", "conv", {"in": c_in, "out": c, "kernel": 3, "stride": s, "padding": 1, "bias": False},
                  [x], idx, name, "entry")
        h = b.add(f"{name}.bn1", "bn", {}, [h], idx, name, "inner")
        h = b.add(f"{name}.relu1", "relu", {}, [h], idx, name, "inner")
        h = b.add(f"{name}.conv2", "conv", {"in": c, "out": c, "kernel": 3, "stride": 1, "padding": 1, "bias": False},
                  [h], idx, name, "inner")
        h = b.add(f"{name}.bn2", "bn", {}, [h], idx, name, "inner")
        if s != 1 or c_in != c:
            sc = b.add(f"{name}.shortcut", "conv", {"in": c_in, "out": c, "kernel": 1, "stride": s, "padding": 0,
                                                      "bias": False}, [x], idx, name, "entry")
            sc = b.add(f"{name}.shortcut_bn", "bn", {}, [sc], idx, name, "inner")
        else:
            sc = x
        h = b.add(f"{name}.add", "add", {}, [h, sc], idx, name, "inner")
        return b.add(f"{name}.relu2", "relu", {}, [h], idx, name, "inner")
    attrs = {k: v for k, v in layer.model_dump().items() if k not in ("op", "name")}
    return b.add(name, kind, attrs, [x], idx, name, "inner")


def _segment_starts(layers: list) -> list[int]:
    """Indices of the units that open a segment (see the module docstring)."""
    starts = {0}
    for i, layer in enumerate(layers):
        if layer.op in SEGMENT_OPS:
            j = i
            while j > 0 and layers[j - 1].op in LEAD_INS:
                j -= 1
            starts.add(j)
    return sorted(starts)


def build_graph(spec: Spec) -> OpGraph:
    """Build the annotated op graph of a spec's model.

    Args:
        spec: a validated spec.

    Returns:
        An :class:`OpGraph` with shapes, MACs, parameters and segments.

    Raises:
        GraphError: shapes do not chain, or the network does not end in a linear
            classifier with ``num_classes`` outputs.
    """
    layers = expand_model(spec.model)
    b = _Builder(spec.model.input_shape)
    x = INPUT
    outputs = []
    has_cls = False
    for idx, layer in enumerate(layers):
        if layer.op == "token_pool" and layer.cls and not has_cls:
            raise GraphError(f"unit '{layer.name}' (#{idx}): token_pool with cls: true needs a CLS token; "
                             "set cls: true on the 'pos_embed' (or use the mean, cls: false)")
        has_cls = has_cls or (layer.op == "pos_embed" and layer.cls)
        x = _add_unit(b, layer, idx, x)
        outputs.append(x)
    last = layers[-1]
    if last.op != "linear" or last.out != spec.model.num_classes:
        raise GraphError(f"the network must end in a linear classifier with num_classes={spec.model.num_classes} "
                         f"outputs; its last unit is '{last.name}' ({last.op}"
                         + (f", out={last.out}" if hasattr(last, "out") else "") + ")")
    starts = _segment_starts(layers)
    if len(starts) < 2:
        raise GraphError("the network needs at least one unit before its classifier (a conv, linear, block, "
                         "patch_embed or transformer_block)")
    segments = []
    for si, start in enumerate(starts):
        end = starts[si + 1] if si + 1 < len(starts) else len(layers)
        units = layers[start:end]
        names = [u.name for u in units]
        lead = next((u.name for u in units if u.op in SEGMENT_OPS), names[0])
        segments.append(Segment(si, lead, names, list(range(start, end)), output=outputs[end - 1]))
    unit_seg = {i: s.index for s in segments for i in s.unit_indices}
    for n in b.order[1:]:
        d = b.g.nodes[n]
        d["segment"] = unit_seg[d["unit"]]
        segments[d["segment"]].nodes.append(n)
    if not nx.is_directed_acyclic_graph(b.g):
        raise GraphError("internal: the op graph has a cycle")
    return OpGraph(b.g, segments, tuple(spec.model.input_shape), spec.model.num_classes, spec.model.width)
