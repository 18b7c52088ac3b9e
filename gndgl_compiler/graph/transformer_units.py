"""Spec units of a vision transformer → ops of the op graph (DESIGN §2.1).

    transformer_block b (pre-LN), on tokens x (D×N):

        x ─┬─ b.ln1 ─ b.attn ─ b.add1 ─┬─ b.ln2 ─ b.mlp ─ b.add2
           └───────────────────────────┘└────────────────┘

A width cut then makes the first block of a module "dense in" (b.ln1 over all D
channels, QKV from all D) and everything after it group-local (see
``partition/groups.py``); the residual adds take the group's own slice of x.
"""

from __future__ import annotations

from typing import Any, Callable

from ..errors import GraphError
from .transformer_ops import need_tokens


def _heads(layer: Any, d: int, unit: str) -> tuple[int, int]:
    """``(heads, head_dim)``, or a GraphError listing the valid head counts for D."""
    if d % layer.heads:
        valid = ", ".join(str(h) for h in range(1, min(d, 64) + 1) if d % h == 0)
        raise GraphError(f"unit '{unit}': {layer.heads} heads do not divide the embedding size D={d}; "
                         f"valid heads: {valid}")
    return layer.heads, d // layer.heads


def _hidden(ratio: float, d: int, unit: str) -> int:
    hidden = ratio * d
    if abs(hidden - round(hidden)) > 1e-9 or round(hidden) < 1:
        raise GraphError(f"unit '{unit}': MLP ratio {ratio} × D={d} = {hidden} is not a whole number of hidden units")
    return int(round(hidden))


def _tokens(b: Any, x: str, kind: str, unit: str, idx: int) -> tuple[int, int]:
    try:
        return need_tokens(kind, [b.g.nodes[x]["shape"]])
    except GraphError as err:
        raise GraphError(f"unit '{unit}' (#{idx}): {err}") from None


def add_patch_embed(b: Any, layer: Any, idx: int, x: str) -> str:
    """The patch embedding: conv p×p / stride p from the input channels to D, flattened to tokens."""
    c_in = b.g.nodes[x]["shape"][0]
    return b.add(layer.name, "patch_embed", {"in": c_in, "out": layer.out, "patch": layer.patch, "bias": layer.bias},
                 [x], idx, layer.name, "entry")


def add_attention(b: Any, layer: Any, idx: int, x: str) -> str:
    """A bare multi-head self-attention unit (no residual): D → D."""
    d, _ = _tokens(b, x, "attention", layer.name, idx)
    heads, hd = _heads(layer, d, layer.name)
    return b.add(layer.name, "attention", {"in": d, "out": d, "heads": heads, "head_dim": hd, "bias": layer.bias},
                 [x], idx, layer.name, "entry")


def add_mlp(b: Any, layer: Any, idx: int, x: str) -> str:
    """A bare token MLP unit (no residual): D → ratio·D → D."""
    d, _ = _tokens(b, x, "mlp", layer.name, idx)
    return b.add(layer.name, "mlp", {"in": d, "hidden": _hidden(layer.ratio, d, layer.name), "out": d,
                                     "act": layer.act}, [x], idx, layer.name, "entry")


def add_transformer_block(b: Any, layer: Any, idx: int, x: str) -> str:
    """A pre-LN block: ``x + attn(LN₁(x))``, then ``+ mlp(LN₂(·))``; returns the block output node."""
    name = layer.name
    d, _ = _tokens(b, x, "transformer_block", name, idx)
    heads, hd = _heads(layer, d, name)
    hidden = _hidden(layer.mlp_ratio, d, name)
    h = b.add(f"{name}.ln1", "layernorm", {}, [x], idx, name, "entry")
    h = b.add(f"{name}.attn", "attention", {"in": d, "out": d, "heads": heads, "head_dim": hd, "bias": True},
              [h], idx, name, "inner")
    r = b.add(f"{name}.add1", "add", {}, [h, x], idx, name, "inner")
    h = b.add(f"{name}.ln2", "layernorm", {}, [r], idx, name, "inner")
    h = b.add(f"{name}.mlp", "mlp", {"in": d, "hidden": hidden, "out": d, "act": layer.act}, [h], idx, name, "inner")
    return b.add(f"{name}.add2", "add", {}, [h, r], idx, name, "inner")


UNIT_BUILDERS: dict[str, Callable[[Any, Any, int, str], str]] = {
    "patch_embed": add_patch_embed,
    "attention": add_attention,
    "mlp": add_mlp,
    "transformer_block": add_transformer_block,
}
"""Token units that expand into more than one op or need derived attributes."""

SEGMENT_UNITS = ("transformer_block",)
"""Several-op token units that open a segment (depth cuts may fall before them); the one-op units
(patch_embed, attention, mlp) open one because their ops have weights, and LayerNorm / token_pool
lead into the classifier's linear (``leads_in`` in the registry)."""


def check_cls(layers: list) -> None:
    """Refuse a ``token_pool`` reading the CLS token before a ``pos_embed`` made one.

    Raises:
        GraphError: naming the unit.
    """
    has_cls = False
    for idx, layer in enumerate(layers):
        if layer.op == "token_pool" and layer.cls and not has_cls:
            raise GraphError(f"unit '{layer.name}' (#{idx}): token_pool with cls: true needs a CLS token; "
                             "set cls: true on the 'pos_embed' (or use the mean, cls: false)")
        has_cls = has_cls or (layer.op == "pos_embed" and layer.cls)
