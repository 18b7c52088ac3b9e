"""AugLocal aux nets (DESIGN §2.3): a compile-time query of the network's later units, and fresh copies of them.

    module i ends after unit l          units l+1 .. L-1 of the net
    ┌────────┐                   j₁ = round(l + (L-1-l)/dᵢ), ..., j_dᵢ = L-1
    │ body   │──h──▶ fresh(j₁) ──▶ fresh(j₂) ──▶ ... ──▶ pool ──▶ [BN1d if dᵢ ≤ 1] ──▶ Linear ──▶ CE
    └────────┘        (own weights, same kind as unit j, width (unit j's width)/G)

Units are the op graph's body segments (unit 0 the stem, L-1 the last before the classifier). ``round`` is
Python's round-half-to-even, as the official code uses. A fresh unit has unit j's kind (basic block,
bottleneck, transformer block: :data:`AUX_UNITS`), maps the previous aux width to unit j's width / G, takes
stride 2 (once) when its input map is larger than unit j's output map, and a projection shortcut (1×1 conv +
BN; a per-token linear on tokens) when its stride or width changes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from ..errors import PartitionError
from ..graph.build import OpGraph, bottleneck_width
from .ir import IRBuilder


def aux_depth(d: int, tau: float, i: int, n: int) -> int:
    """dᵢ = max(1, round(d·(1 − iτ/(n−1)) + iτ/(n−1))), or d when n = 1."""
    if n <= 1:
        return d
    x = i * tau / (n - 1)
    return max(1, round(d * (1 - x) + x))


def sampled_units(end: int, last: int, d_i: int) -> list[int]:
    """The later units the aux net of a module ending after unit l = ``end`` copies: all of l+1..last when
    dᵢ ≥ last − l, else j_m = round(l + m·(last − l)/dᵢ) for m = 1..dᵢ (``last`` = L − 1)."""
    if d_i >= last - end:
        return list(range(end + 1, last + 1))
    return [round(end + m * (last - end) / d_i) for m in range(1, d_i + 1)]


def choose_units(ends: list[int], last: int, d: int, tau: float) -> list[list[int]]:
    """For modules ending after units ``ends`` (the n modules with an aux head), the sampled units of each."""
    n = len(ends)
    return [sampled_units(end, last, aux_depth(d, tau, i, n)) for i, end in enumerate(ends)]


@dataclass
class LaterUnit:
    """One unit of the net an aux net copies: its spec layer and its output shape in the full net."""

    index: int
    name: str
    layer: Any
    shape: list[int]


def later_units(og: OpGraph, layers: list) -> list[LaterUnit]:
    """Body segments as units: the unit that opens each (a block's own layer) and the segment's output shape."""
    by_name = {u.name: u for u in layers}
    return [LaterUnit(s.index, s.name, by_name[s.name], list(og.node(s.output)["shape"]))
            for s in og.body_segments]


def _per_group(width: int, groups: int, what: str, unit: str) -> int:
    if width % groups:
        raise PartitionError(f"the auglocal aux unit copying '{unit}' has {width} {what}, which G={groups} does "
                             f"not divide; use a G that divides {width}")
    return width // groups


def _conv(b: IRBuilder, tag: str, x: str, c_out: int, k: int, s: int, groups: int = 1) -> str:
    kind, extra = ("gconv", {"groups": groups}) if groups > 1 else ("conv", {})
    return b.add(tag, kind, {"in": b.shape(x)[0], "out": c_out, "kernel": k, "stride": s, "padding": k // 2,
                             "bias": False, **extra}, [x])


def _bn_relu(b: IRBuilder, tag: str, i: int, x: str, relu: bool = True) -> str:
    h = b.add(f"{tag}bn{i}", "bn", {}, [x])
    return b.add(f"{tag}relu{i}", "relu", {}, [h]) if relu else h


def _close(b: IRBuilder, tag: str, x: str, h: str, stride: int) -> str:
    """The shortcut (identity, or 1×1 conv + BN when stride or width changes), add, ReLU."""
    sc = x
    if stride != 1 or b.shape(x)[0] != b.shape(h)[0]:
        sc = b.add(f"{tag}shortcut_bn", "bn", {}, [_conv(b, f"{tag}shortcut", x, b.shape(h)[0], 1, stride)])
    return b.add(f"{tag}relu", "relu", {}, [b.add(f"{tag}add", "add", {}, [h, sc])])


def _stride(b: IRBuilder, x: str, unit: LaterUnit) -> int:
    return 2 if b.shape(x)[1] > unit.shape[1] else 1


def fresh_block(b: IRBuilder, x: str, unit: LaterUnit, groups: int, tag: str) -> str:
    """A fresh basic block: conv3×3 (stride s) BN ReLU conv3×3 BN, + shortcut, add, ReLU."""
    c = _per_group(unit.shape[0], groups, "channels", unit.name)
    s = _stride(b, x, unit)
    h = _bn_relu(b, tag, 1, _conv(b, f"{tag}conv1", x, c, 3, s))
    h = _bn_relu(b, tag, 2, _conv(b, f"{tag}conv2", h, c, 3, 1), relu=False)
    return _close(b, tag, x, h, s)


def fresh_bottleneck(b: IRBuilder, x: str, unit: LaterUnit, groups: int, tag: str) -> str:
    """A fresh bottleneck (v1.5): 1×1 → w/G, 3×3 stride s with (cardinality/G) groups, 1×1 → 4p/G, + shortcut."""
    layer = unit.layer
    w = _per_group(bottleneck_width(layer.planes, layer.base_width, layer.cardinality), groups, "inner channels",
                   unit.name)
    card = layer.cardinality
    inner_groups = 1 if card == 1 else _per_group(card, groups, "conv groups (cardinality)", unit.name)
    c = _per_group(unit.shape[0], groups, "channels", unit.name)
    s = _stride(b, x, unit)
    h = _bn_relu(b, tag, 1, _conv(b, f"{tag}conv1", x, w, 1, 1))
    h = _bn_relu(b, tag, 2, _conv(b, f"{tag}conv2", h, w, 3, s, inner_groups))
    h = _bn_relu(b, tag, 3, _conv(b, f"{tag}conv3", h, c, 1, 1), relu=False)
    return _close(b, tag, x, h, s)


def fresh_transformer_block(b: IRBuilder, x: str, unit: LaterUnit, groups: int, tag: str) -> str:
    """A fresh pre-LN block at width D/G with H/G heads: x' + attn(LN₁(x)), then + mlp(LN₂(·)); x' is x, or a
    per-token linear when the width changes."""
    layer = unit.layer
    d_j = unit.shape[0]
    d = _per_group(d_j, groups, "channels", unit.name)
    heads = _per_group(layer.heads, groups, "heads", unit.name)
    d_in = b.shape(x)[0]
    h = b.add(f"{tag}ln1", "layernorm", {}, [x])
    h = b.add(f"{tag}attn", "attention", {"in": d_in, "out": d, "heads": heads, "head_dim": d_j // layer.heads,
                                          "bias": True}, [h])
    sc = x if d_in == d else b.add(f"{tag}shortcut", "token_linear", {"in": d_in, "out": d}, [x])
    r = b.add(f"{tag}add1", "add", {}, [h, sc])
    hidden = int(round(layer.mlp_ratio * d))
    h = b.add(f"{tag}ln2", "layernorm", {}, [r])
    h = b.add(f"{tag}mlp", "mlp", {"in": d, "hidden": hidden, "out": d, "act": layer.act}, [h])
    return b.add(f"{tag}add2", "add", {}, [h, r])


AUX_UNITS: dict[str, Callable[[IRBuilder, str, LaterUnit, int, str], str]] = {
    "block": fresh_block,
    "bottleneck": fresh_bottleneck,
    "transformer_block": fresh_transformer_block,
}
"""Unit kinds an AugLocal aux net can copy → the builder of a fresh unit of that kind."""


def _pool(b: IRBuilder, x: str) -> str:
    """Global average pool of a map (mean over tokens of tokens); flat features as they are."""
    if len(b.shape(x)) == 2:
        return b.add("pool", "token_pool", {"cls": False}, [x])
    if len(b.shape(x)) == 3:
        return b.add("flatten", "flatten", {}, [b.add("pool", "adaptive_avgpool", {"size": 1}, [x])])
    return x


def head_auglocal(b: IRBuilder, x: str, classes: int, hidden: int, *, units: list[LaterUnit], groups: int,
                  depth: int) -> dict[str, str]:
    """The aux net of one partition: a fresh unit per sampled unit, pool, BatchNorm1d when ``depth`` ≤ 1, Linear
    (``hidden`` is unused: the widths follow the copied units)."""
    h = x
    for m, unit in enumerate(units):
        build = AUX_UNITS.get(unit.layer.op)
        if build is None:
            raise PartitionError(f"the auglocal aux net copies later unit '{unit.name}' (#{unit.index}), a "
                                 f"'{unit.layer.op}'; auglocal copies {', '.join(AUX_UNITS)} units only; cut so "
                                 "that every module is followed by such units, or use another head kind")
        h = build(b, h, unit, groups, f"aux{m + 1}_")
    h = _pool(b, h)
    if depth <= 1:
        h = b.add("bn1d", "bn", {}, [h])
    return {"logits": b.add("fc", "linear", {"in": b.shape(h)[0], "out": classes, "bias": True}, [h])}


@dataclass
class AugLocalPlan:
    """The sampled later units of every module with an aux head (empty unless the head kind is auglocal)."""

    choice: list[list[int]]
    depths: list[int]
    units: list[LaterUnit]

    @classmethod
    def of(cls, spec: Any, og: OpGraph, modules: list[list[int]], n: int) -> "AugLocalPlan":
        """The choice for ``spec`` cut into ``modules`` (segment indices each), ``n`` of them with an aux head."""
        head = spec.local.head
        if head.kind != "auglocal":
            return cls([], [], [])
        from ..spec.templates import expand_model

        units = later_units(og, expand_model(spec.model))
        ends = [mod[-1] for mod in modules[:n]]
        tau = head.pyramid or 0.0
        depths = [aux_depth(head.depth, tau, i, n) for i in range(n)]
        return cls([sampled_units(e, len(units) - 1, di) for e, di in zip(ends, depths)], depths, units)

    def head_args(self, k: int, groups: int) -> dict[str, Any]:
        """Keyword arguments of :func:`head_auglocal` for module ``k`` (0-based) at ``groups`` groups; {} when
        the head is not auglocal."""
        if not self.depths:
            return {}
        return {"units": [self.units[j] for j in self.choice[k]], "groups": groups, "depth": self.depths[k]}

    def unit_names(self, k: int) -> list[str]:
        """Names of the units module ``k``'s aux net copies ([] when the head is not auglocal)."""
        return [self.units[j].name for j in self.choice[k]] if self.depths else []
