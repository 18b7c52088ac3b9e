"""What autograd keeps of an op for backward: the :attr:`OpDef.saves` rule's answer (the memory model)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Saves:
    """What autograd keeps of one op for backward, per sample (the memory model, DESIGN §4.1).

    ``inputs``: indices of the inputs whose storage it saves; ``output``: it saves its own output;
    ``extra``: elements of fresh tensors it saves at the activation dtype (a dropout mask, a copy made
    by a reshape, LayerNorm's mean and rstd, ...); ``index``: int64 elements it saves (max-pool indices).
    Parameters and per-channel statistics are not activations and are left out.
    """

    inputs: tuple[int, ...] = ()
    output: bool = False
    extra: int = 0
    index: int = 0


NOTHING = Saves()

__all__ = ["NOTHING", "Saves"]
