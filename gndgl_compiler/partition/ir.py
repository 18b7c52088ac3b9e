"""A tiny builder of IR node lists with shape/MAC inference through the op registry."""

from __future__ import annotations

import re

from ..errors import PartitionError
from ..graph.ops import get_op
from .plan import IRNode


def ident(name: str) -> str:
    """Turn an op-graph name (``s1.b0.conv1``) into a Python identifier (``s1_b0_conv1``)."""
    out = re.sub(r"\W", "_", name)
    return out if out and not out[0].isdigit() else "n_" + out


class IRBuilder:
    """Appends :class:`IRNode` objects, inferring shapes, MACs and parameters."""

    def __init__(self, prefix: str = ""):
        self.nodes: list[IRNode] = []
        self.shapes: dict[str, list[int]] = {}
        self.prefix = prefix

    def input(self, name: str, shape: list[int] | tuple[int, ...]) -> str:
        """Add a graph input."""
        self.nodes.append(IRNode(name, "input", {}, [], list(shape)))
        self.shapes[name] = list(shape)
        return name

    def add(self, name: str, kind: str, attrs: dict, args: list[str], source: str = "", dense_in: bool = False) -> str:
        """Add an op; return its (unique) name.

        Raises:
            PartitionError: if the op's shape rule rejects its inputs.
        """
        name = ident(self.prefix + name)
        base, i = name, 1
        while name in self.shapes:
            name, i = f"{base}_{i}", i + 1
        op = get_op(kind)
        ins = [tuple(self.shapes[a]) for a in args]
        try:
            out = op.shape(attrs, ins)
        except Exception as err:  # GraphError from a shape rule
            raise PartitionError(f"op '{source or name}' does not fit after grouping: {err}") from None
        self.nodes.append(IRNode(name, kind, dict(attrs), list(args), list(out), op.macs(attrs, ins, out),
                                 op.params(attrs, ins, out), source, dense_in))
        self.shapes[name] = list(out)
        return name

    def shape(self, name: str) -> list[int]:
        """Per-sample shape of node ``name``."""
        return self.shapes[name]
