"""Spec units → an annotated op graph (networkx DiGraph).

    units:    stem  stem_bn  stem_relu  s1.b0 ...  pool  flatten  fc
    segments: [stem stem_bn stem_relu] [s1.b0] ... [pool flatten fc]
                                                    └ classifier ┘

A *segment* is the smallest piece depth cuts may separate: it starts at a unit whose
op has weights (``split='weights'`` in the registry: conv, linear, patch_embed,
attention, mlp) or a several-op unit that opens one (block, transformer_block), or
at a unit leading into such a layer (``leads_in``: flatten, adaptive pool, ...), and
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
from .ops import find_op, get_op
from .transformer_units import SEGMENT_UNITS as TOKEN_SEGMENT_UNITS
from .transformer_units import UNIT_BUILDERS as TOKEN_UNIT_BUILDERS
from .transformer_units import check_cls

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


def _conv_unit(b: _Builder, layer, idx: int, x: str) -> str:
    """A conv unit: ``in`` from its input, ``padding`` kernel // 2 unless given."""
    pad = layer.padding if layer.padding is not None else layer.kernel // 2
    return b.add(layer.name, "conv", {"in": b.g.nodes[x]["shape"][0], "out": layer.out, "kernel": layer.kernel,
                                      "stride": layer.stride, "padding": pad, "bias": layer.bias},
                 [x], idx, layer.name, "entry")


def _linear_unit(b: _Builder, layer, idx: int, x: str) -> str:
    """A linear unit: ``in`` from its input."""
    return b.add(layer.name, "linear", {"in": b.g.nodes[x]["shape"][0], "out": layer.out, "bias": layer.bias},
                 [x], idx, layer.name, "entry")


def _block_unit(b: _Builder, layer, idx: int, x: str) -> str:
    """A residual block: conv-bn-relu-conv-bn, plus the identity (or a 1×1 conv-bn) shortcut, add, relu."""
    name, c_in, c, s = layer.name, b.g.nodes[x]["shape"][0], layer.out, layer.stride
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


def bottleneck_width(planes: int, base_width: int, cardinality: int) -> int:
    """Inner width w of a bottleneck: ⌊p·b/64⌋·c (torchvision's formula)."""
    return planes * base_width // 64 * cardinality


def _bottleneck_unit(b: _Builder, layer, idx: int, x: str) -> str:
    """torchvision's bottleneck (v1.5, DESIGN §2.2): 1×1 → w, 3×3 stride s groups c (op ``gconv``), 1×1 → 4p,
    each with BN (ReLU after the first two), plus the identity or a 1×1 stride-s conv-BN shortcut, add, ReLU."""
    name, c_in, s = layer.name, b.g.nodes[x]["shape"][0], layer.stride
    w, c_out = bottleneck_width(layer.planes, layer.base_width, layer.cardinality), 4 * layer.planes
    if w < 1 or w % layer.cardinality:
        raise GraphError(f"unit '{name}' (#{idx}): planes {layer.planes} × base_width {layer.base_width} / 64 "
                         "leaves no channels per group; raise planes or base_width")

    def conv(tag: str, cin: int, cout: int, k: int, stride: int, src: str, role: str, kind: str = "conv",
             **extra) -> str:
        return b.add(f"{name}.{tag}", kind, {"in": cin, "out": cout, "kernel": k, "stride": stride,
                                             "padding": k // 2, "bias": False, **extra}, [src], idx, name, role)

    h = conv("conv1", c_in, w, 1, 1, x, "entry")
    h = b.add(f"{name}.relu1", "relu", {}, [b.add(f"{name}.bn1", "bn", {}, [h], idx, name, "inner")],
              idx, name, "inner")
    h = conv("conv2", w, w, 3, s, h, "inner", kind="gconv", groups=layer.cardinality)
    h = b.add(f"{name}.relu2", "relu", {}, [b.add(f"{name}.bn2", "bn", {}, [h], idx, name, "inner")],
              idx, name, "inner")
    h = b.add(f"{name}.bn3", "bn", {}, [conv("conv3", w, c_out, 1, 1, h, "inner")], idx, name, "inner")
    sc = x
    if s != 1 or c_in != c_out:
        sc = b.add(f"{name}.shortcut_bn", "bn", {}, [conv("shortcut", c_in, c_out, 1, s, x, "entry")],
                   idx, name, "inner")
    h = b.add(f"{name}.add", "add", {}, [h, sc], idx, name, "inner")
    return b.add(f"{name}.relu3", "relu", {}, [h], idx, name, "inner")


UNIT_BUILDERS = {"conv": _conv_unit, "linear": _linear_unit, "block": _block_unit, "bottleneck": _bottleneck_unit,
                 **TOKEN_UNIT_BUILDERS}
"""Units that expand into several ops or need derived attributes; any other unit is one op of its
own kind whose attributes are the unit's fields."""
SEGMENT_UNITS = ("block", "bottleneck") + TOKEN_SEGMENT_UNITS
"""Several-op units that open a segment (a unit that is one op asks the registry)."""


def _add_unit(b: _Builder, layer, idx: int, x: str) -> str:
    """Append the ops of one unit after node ``x``; return the unit's output node."""
    if layer.op in UNIT_BUILDERS:
        return UNIT_BUILDERS[layer.op](b, layer, idx, x)
    attrs = {k: v for k, v in layer.model_dump().items() if k not in ("op", "name")}
    return b.add(layer.name, layer.op, attrs, [x], idx, layer.name, "inner")


def _opens_segment(unit_op: str) -> bool:
    op = find_op(unit_op)
    return unit_op in SEGMENT_UNITS or (op is not None and op.parametric)


def _leads_in(unit_op: str) -> bool:
    op = find_op(unit_op)
    return op is not None and op.leads_in


def _segment_starts(layers: list) -> list[int]:
    """Indices of the units that open a segment (see the module docstring)."""
    starts = {0}
    for i, layer in enumerate(layers):
        if _opens_segment(layer.op):
            j = i
            while j > 0 and _leads_in(layers[j - 1].op):
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
    return build_units(expand_model(spec.model), spec.model.input_shape, spec.model.num_classes)


def build_units(layers: list, input_shape: tuple[int, ...] | list[int], num_classes: int) -> OpGraph:
    """Build the op graph of a list of plain units (what :func:`build_graph` does after expanding templates).

    Args:
        layers: unit objects with ``op``, ``name``, their fields and ``model_dump()`` (the spec's layer models).
        input_shape: per-sample input shape.
        num_classes: classes of the final linear.

    Raises:
        GraphError: as :func:`build_graph`.
    """
    b = _Builder(input_shape)
    x = INPUT
    outputs = []
    check_cls(layers)
    for idx, layer in enumerate(layers):
        x = _add_unit(b, layer, idx, x)
        outputs.append(x)
    last = layers[-1]
    if last.op != "linear" or last.out != num_classes:
        raise GraphError(f"the network must end in a linear classifier with num_classes={num_classes} "
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
        lead = next((u.name for u in units if _opens_segment(u.op)), names[0])
        segments.append(Segment(si, lead, names, list(range(start, end)), output=outputs[end - 1]))
    unit_seg = {i: s.index for s in segments for i in s.unit_indices}
    for n in b.order[1:]:
        d = b.g.nodes[n]
        d["segment"] = unit_seg[d["unit"]]
        segments[d["segment"]].nodes.append(n)
    if not nx.is_directed_acyclic_graph(b.g):
        raise GraphError("internal: the op graph has a cycle")
    return OpGraph(b.g, segments, tuple(input_shape), num_classes)
