"""The op registry: one entry per op kind.

Each :class:`OpDef` says, for an op with attributes ``attrs`` and per-sample
input shapes ``ins`` (``(C, H, W)`` maps, ``(D, N)`` tokens or ``(D,)`` features):

    shape(attrs, ins)        -> output shape            (raises GraphError)
    macs(attrs, ins, out)    -> multiply-accumulates    (parametric ops only)
    params(attrs, ins, out)  -> trainable parameters
    split_keys               -> attrs a width cut divides by G (how a parametric op splits by groups)
    module(attrs, ins, out)  -> an nn.Module            (or None: emitted as a function call)
    function                 -> the callable of a function op, with fx-friendly kwargs

The token (transformer) ops live in :mod:`.transformer_ops`. Adding an op is adding one entry; graph building, partitioning, the cost
model and codegen all go through this table.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import GraphError
from .transformer_ops import transformer_op_defs

Shape = tuple[int, ...]
Attrs = dict[str, Any]


@dataclass(frozen=True)
class OpDef:
    """Everything gndgl knows about one op kind."""

    kind: str
    shape: Callable[[Attrs, list[Shape]], Shape]
    macs: Callable[[Attrs, list[Shape], Shape], int] = lambda a, i, o: 0
    params: Callable[[Attrs, list[Shape], Shape], int] = lambda a, i, o: 0
    module: Callable[[Attrs, list[Shape], Shape], nn.Module] | None = None
    function: Callable[..., Any] | None = None
    kwargs: Callable[[Attrs, list[Shape]], dict] = lambda a, i: {}
    channelwise: bool = True
    """True when the op acts per channel, so a group's slice needs no change of meaning."""
    parametric: bool = False
    """True for ops with weights that map channels to channels (conv, linear, attention, ...): they carry
    MACs, read 'in' channels and are the layers a width cut splits ("dense in" or own slice)."""
    split_keys: tuple[str, ...] = ("out",)
    """Attributes of a parametric op that a width cut divides by G (group g keeps its share)."""


def _need_map(kind: str, ins: list[Shape]) -> tuple[int, int, int]:
    if len(ins[0]) == 2:
        raise GraphError(f"{kind} needs a C×H×W feature map but gets tokens of shape {list(ins[0])}; "
                         "after a 'patch_embed' use token ops (layernorm, attention, mlp, transformer_block, "
                         "token_pool)")
    if len(ins[0]) != 3:
        raise GraphError(f"{kind} needs a C×H×W feature map but gets features of shape {list(ins[0])}; "
                         "put it before the 'flatten'")
    return ins[0]  # type: ignore[return-value]


def _spatial(size: int, kernel: int, stride: int, padding: int, kind: str) -> int:
    out = (size + 2 * padding - kernel) // stride + 1
    if out < 1:
        raise GraphError(f"{kind} with kernel {kernel}, stride {stride}, padding {padding} on a {size}-pixel "
                         "map leaves nothing; use a smaller kernel/stride or a larger input")
    return out


# --- conv -----------------------------------------------------------------------------------

def _conv_shape(a: Attrs, ins: list[Shape]) -> Shape:
    c, h, w = _need_map("conv", ins)
    if c != a["in"]:
        raise GraphError(f"conv expects {a['in']} input channels, gets {c}")
    if a.get("groups", 1) > 1 and (a["in"] % a["groups"] or a["out"] % a["groups"]):
        raise GraphError(f"conv groups={a['groups']} must divide in={a['in']} and out={a['out']}")
    k, s, p = a["kernel"], a["stride"], a["padding"]
    return (a["out"], _spatial(h, k, s, p, "conv"), _spatial(w, k, s, p, "conv"))


def _conv_macs(a: Attrs, ins: list[Shape], out: Shape) -> int:
    return out[0] * (a["in"] // a.get("groups", 1)) * a["kernel"] ** 2 * out[1] * out[2]


def _conv_params(a: Attrs, ins: list[Shape], out: Shape) -> int:
    return a["out"] * (a["in"] // a.get("groups", 1)) * a["kernel"] ** 2 + (a["out"] if a["bias"] else 0)


def _conv_module(a: Attrs, ins: list[Shape], out: Shape) -> nn.Module:
    return nn.Conv2d(a["in"], a["out"], a["kernel"], a["stride"], a["padding"], bias=a["bias"], groups=a.get("groups", 1))


# --- linear ---------------------------------------------------------------------------------

def _linear_shape(a: Attrs, ins: list[Shape]) -> Shape:
    if len(ins[0]) == 2:
        raise GraphError(f"linear needs flat features but gets tokens of shape {list(ins[0])}; "
                         "add a 'token_pool' before it")
    if len(ins[0]) != 1:
        raise GraphError(f"linear needs flat features but gets a map of shape {list(ins[0])}; "
                         "add a 'flatten' (or 'adaptive_avgpool' + 'flatten') before it")
    if ins[0][0] != a["in"]:
        raise GraphError(f"linear expects {a['in']} input features, gets {ins[0][0]}")
    return (a["out"],)


# --- bn -------------------------------------------------------------------------------------

def _bn_module(a: Attrs, ins: list[Shape], out: Shape) -> nn.Module:
    return nn.BatchNorm2d(ins[0][0]) if len(ins[0]) == 3 else nn.BatchNorm1d(ins[0][0])


# --- pools ----------------------------------------------------------------------------------

def _pool_shape(kind: str) -> Callable[[Attrs, list[Shape]], Shape]:
    def shape(a: Attrs, ins: list[Shape]) -> Shape:
        c, h, w = _need_map(kind, ins)
        k, s = a["kernel"], a.get("stride") or a["kernel"]
        return (c, _spatial(h, k, s, 0, kind), _spatial(w, k, s, 0, kind))
    return shape


def _adaptive_shape(a: Attrs, ins: list[Shape]) -> Shape:
    c, h, w = _need_map("adaptive_avgpool", ins)
    return (c, a["size"], a["size"])


def _same(a: Attrs, ins: list[Shape]) -> Shape:
    return ins[0]


def _add_shape(a: Attrs, ins: list[Shape]) -> Shape:
    if len(ins) != 2 or ins[0] != ins[1]:
        raise GraphError(f"add needs two inputs of the same shape, gets {[list(s) for s in ins]} "
                         "(a residual block whose shortcut does not match its body?)")
    return ins[0]


def _cat_shape(a: Attrs, ins: list[Shape]) -> Shape:
    if len(ins) == 0 or any(s[1:] != ins[0][1:] or len(s) != len(ins[0]) for s in ins):
        raise GraphError(f"cat needs inputs that agree except in channels, gets {[list(s) for s in ins]}")
    return (sum(s[0] for s in ins),) + tuple(ins[0][1:])


def _slice_shape(a: Attrs, ins: list[Shape]) -> Shape:
    if a["start"] < 0 or a["start"] + a["length"] > ins[0][0] or a["length"] < 1:
        raise GraphError(f"channel slice [{a['start']}, {a['start'] + a['length']}) is outside 0..{ins[0][0]}")
    return (a["length"],) + tuple(ins[0][1:])


def _channel_slice(x: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """Channels ``start .. start+length`` of ``x`` (dim 1)."""
    return x.narrow(1, start, length)


def _upsample_shape(a: Attrs, ins: list[Shape]) -> Shape:
    c, _, _ = _need_map("upsample", ins)
    return (c, a["height"], a["width"])


OPS: dict[str, OpDef] = {
    "conv": OpDef("conv", _conv_shape, _conv_macs, _conv_params, _conv_module, channelwise=False, parametric=True),
    "linear": OpDef(
        "linear", _linear_shape, lambda a, i, o: a["in"] * a["out"],
        lambda a, i, o: a["in"] * a["out"] + (a["out"] if a["bias"] else 0),
        lambda a, i, o: nn.Linear(a["in"], a["out"], bias=a["bias"]), channelwise=False, parametric=True),
    "bn": OpDef("bn", _same, params=lambda a, i, o: 2 * i[0][0], module=_bn_module),
    "relu": OpDef("relu", _same, function=torch.relu),
    "dropout": OpDef("dropout", _same, module=lambda a, i, o: nn.Dropout(a["p"])),
    "maxpool": OpDef("maxpool", _pool_shape("maxpool"), function=F.max_pool2d,
                     kwargs=lambda a, i: {"kernel_size": a["kernel"], "stride": a.get("stride") or a["kernel"]}),
    "avgpool": OpDef("avgpool", _pool_shape("avgpool"), function=F.avg_pool2d,
                     kwargs=lambda a, i: {"kernel_size": a["kernel"], "stride": a.get("stride") or a["kernel"]}),
    "adaptive_avgpool": OpDef("adaptive_avgpool", _adaptive_shape, function=F.adaptive_avg_pool2d,
                              kwargs=lambda a, i: {"output_size": a["size"]}),
    "flatten": OpDef("flatten", lambda a, i: (math.prod(i[0]),), function=torch.flatten,
                     kwargs=lambda a, i: {"start_dim": 1}),
    "add": OpDef("add", _add_shape, function=operator.add),
    "cat": OpDef("cat", _cat_shape, function=torch.cat, kwargs=lambda a, i: {"dim": 1}),
    "slice": OpDef("slice", _slice_shape, function=_channel_slice,
                   kwargs=lambda a, i: {"start": a["start"], "length": a["length"]}),
    "upsample": OpDef("upsample", _upsample_shape, function=F.interpolate,
                      kwargs=lambda a, i: {"size": (a["height"], a["width"]), "mode": "bilinear", "align_corners": False}),
    "sigmoid": OpDef("sigmoid", _same, function=torch.sigmoid),
    "l2norm": OpDef("l2norm", _same, function=F.normalize, kwargs=lambda a, i: {"dim": 1}),
    **transformer_op_defs(OpDef),
}


def get_op(kind: str) -> OpDef:
    """Look up an op kind.

    Raises:
        GraphError: for an unknown kind, listing the known ones.
    """
    try:
        return OPS[kind]
    except KeyError:
        raise GraphError(f"unknown op '{kind}'; known ops: {', '.join(sorted(OPS))}") from None


def infer(kind: str, attrs: Attrs, ins: list[Shape]) -> tuple[Shape, int, int]:
    """Return ``(out_shape, macs, params)`` of one op."""
    op = get_op(kind)
    out = op.shape(attrs, ins)
    return out, op.macs(attrs, ins, out), op.params(attrs, ins, out)
