"""The fused-op table: one :class:`FusedOpDef` per op kind that sibling fusion runs, and its lookups.

An entry says, for one op kind of the op registry (``graph/ops.py``), everything :class:`FusedStage`
needs to run the G siblings' copies of a node as one:

    build       the forward over the G-sibling layout (``fusion/layouts.py``): a step ``env -> None``
                and the output's layout; on the way it fuses the G layers' parameters into one storage
                each (``FusionBuild.fuse`` / ``fuse_layer``: how they are viewed) or refuses
                (:class:`NotFusable`)
    token       a token op: no padded form (refused in an unequal split)
    padded      what else an unequal split refuses (``fusion/padded.py``)
    shares      in an aux head, it reads the module output and the siblings' shares (the head's input)
    concat      it concatenates its inputs: over all the body's inputs in order, it is the upstream
                module's fused output (the step is skipped)
    per_group   each group's node differs by design (a slice's start and length): the builder checks them

An op kind without an entry is not fused: the executor runs that module partition by partition and
says why. Adding a fused op kind is adding one entry here (or, scoped to a ``with`` block,
:func:`extra_fused_ops`); no fusion code switches on kind names (``tests/runtime/fusion/test_registry.py``).
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Mapping

from ...graph.ops import extended_table
from . import conv, dropout, man, pointwise, tokens, wiring
from .layouts import FusionBuild, NodeGroup, Step
from .padded import nonzero_at_zero, ungrouped

Build = Callable[[FusionBuild, NodeGroup], tuple[Step, str]]


@dataclass(frozen=True)
class FusedOpDef:
    """How sibling fusion runs one op kind (see the module docstring for each field)."""

    kind: str
    build: Build
    token: bool = False
    padded: Callable[[FusionBuild, NodeGroup], str | None] | None = None
    shares: bool = False
    concat: bool = False
    per_group: bool = False


FUSED_OPS: dict[str, FusedOpDef] = {
    "conv": FusedOpDef("conv", conv.conv, padded=ungrouped),
    "gconv": FusedOpDef("gconv", conv.conv, padded=ungrouped),  # each group's groups/G conv groups: G·(c/G) fused
    "linear": FusedOpDef("linear", conv.linear),
    "bn": FusedOpDef("bn", pointwise.batch_norm),
    "relu": FusedOpDef("relu", pointwise.function()),
    "sigmoid": FusedOpDef("sigmoid", pointwise.function(), padded=nonzero_at_zero("1/2")),
    "gelu": FusedOpDef("gelu", pointwise.function()),
    "silu": FusedOpDef("silu", pointwise.function()),
    "maxpool": FusedOpDef("maxpool", pointwise.function(maps_only=True)),
    "avgpool": FusedOpDef("avgpool", pointwise.function(maps_only=True)),
    "adaptive_avgpool": FusedOpDef("adaptive_avgpool", pointwise.function(maps_only=True)),
    "upsample": FusedOpDef("upsample", pointwise.function(maps_only=True)),
    "flatten": FusedOpDef("flatten", pointwise.flatten),
    "l2norm": FusedOpDef("l2norm", pointwise.l2norm),
    "dropout": FusedOpDef("dropout", dropout.dropout),
    "slice": FusedOpDef("slice", wiring.channel_slice, per_group=True),
    "cat": FusedOpDef("cat", wiring.cat, shares=True, concat=True),
    "add": FusedOpDef("add", wiring.add),
    "patch_embed": FusedOpDef("patch_embed", tokens.patch_embed, token=True),
    "pos_embed": FusedOpDef("pos_embed", tokens.pos_embed, token=True),
    "layernorm": FusedOpDef("layernorm", tokens.layernorm, token=True),
    "attention": FusedOpDef("attention", tokens.attention, token=True),
    "mlp": FusedOpDef("mlp", tokens.mlp, token=True),
    "token_linear": FusedOpDef("token_linear", tokens.token_linear, token=True),
    "token_pool": FusedOpDef("token_pool", tokens.token_pool, token=True),
    "man_mix": FusedOpDef("man_mix", man.man_mix),  # MAN++: s_g·LB + (2 − s_g)·EMA
}


_ACTIVE: ContextVar[Mapping[str, FusedOpDef]] = ContextVar("gndgl_fused_ops", default=MappingProxyType(FUSED_OPS))


def fused_registry() -> Mapping[str, FusedOpDef]:
    """The fused-op table in force: :data:`FUSED_OPS`, plus the entries of any enclosing
    :func:`extra_fused_ops` block."""
    return _ACTIVE.get()


def extra_fused_ops(*defs: FusedOpDef) -> AbstractContextManager[Mapping[str, FusedOpDef]]:
    """Register ``defs`` for the duration of a ``with`` block (in this thread / context only), like
    ``graph.ops.extra_ops`` (which declares the op kind itself).

    Raises:
        ValueError: a kind that already has an entry.
    """
    return extended_table(_ACTIVE, defs, "fused op")


def find_fused_op(kind: str) -> FusedOpDef | None:
    """The fused-op entry of ``kind``, or None (not fused; also for IR ``input`` nodes)."""
    return fused_registry().get(kind)
