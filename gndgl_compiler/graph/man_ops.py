"""The op of MAN++ (DESIGN §2.3): the learned mix of the aux net's LB and EMA units.

    man_mix   (x, x) -> x   s·LB(h) + (2 − s)·EMA(h), one learnable scalar s (init 1)

MAN's plain mix is the registry's ``add``. torch is imported only when the module is built.
"""

from __future__ import annotations

import importlib
from typing import Any

from ..errors import GraphError
from .saves import Saves


def _mix_shape(attrs: dict, ins: list[tuple[int, ...]]) -> tuple[int, ...]:
    if len(ins) != 2 or tuple(ins[0]) != tuple(ins[1]):
        raise GraphError(f"man_mix mixes two tensors of one shape, got {[list(i) for i in ins]}")
    return tuple(ins[0])


def _mix_module(attrs: dict, ins: list, out: tuple[int, ...]) -> Any:
    return importlib.import_module(f"{__package__}.man_modules").LearnedMix()


def man_op_defs(op_def: Any) -> dict[str, Any]:
    """The registry entries of the MAN ops.

    Args:
        op_def: the :class:`~gndgl_compiler.graph.ops.OpDef` class (passed in to avoid an import cycle).

    Returns:
        ``{kind: OpDef}``.
    """
    return {
        "man_mix": op_def("man_mix", _mix_shape, params=lambda a, i, o: 1, module=_mix_module, split="whole",
                          saves=lambda a, i, o: Saves((0, 1))),
    }
