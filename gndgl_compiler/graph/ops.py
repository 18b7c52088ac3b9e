"""The op registry: one :class:`OpDef` per op kind, and the lookups every stage makes.

Each entry says, for an op with attributes ``attrs`` and per-sample input shapes ``ins``
(``(C, H, W)`` maps, ``(D, N)`` tokens or ``(D,)`` features), everything the stages need:

    shape / macs / params    graph building and the cost model
    saves, view              the memory model (partition/memory.py, DESIGN §4.1)
    split, split_keys        how a width cut splits it (partition/groups.py, validate.py)
    leads_in                 segmentation (graph/build.py)
    module / function,       codegen (codegen/emit.py)
      kwargs, variadic
    random                   the per-partition generators (runtime/step/streams.py)
    draw, label              the ops-level picture (viz/dot.py)

The token (transformer) ops live in :mod:`.transformer_ops`. Adding an op kind is adding
one entry here (or, scoped to a ``with`` block, :func:`extra_ops`); no stage switches
on kind names.

torch is imported only when a module is built or a function resolved (:meth:`OpDef.target`),
so shapes and costs (``gndgl units``, a spec's errors) answer without it.
"""

from __future__ import annotations

import functools
import importlib
import math
import operator
from contextlib import AbstractContextManager, contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Callable, Iterator, Mapping

from ..errors import GraphError
from .saves import NOTHING, Saves
from .man_ops import man_op_defs
from .transformer_ops import transformer_op_defs

if TYPE_CHECKING:
    import torch
    from torch import nn

Shape = tuple[int, ...]
Attrs = dict[str, Any]


SPLITS = ("follow", "weights", "merge", "whole")
"""How an op splits under a width cut (:attr:`OpDef.split`)."""


@dataclass(frozen=True)
class OpDef:
    """Everything gndgl knows about one op kind."""

    kind: str
    shape: Callable[[Attrs, list[Shape]], Shape]
    macs: Callable[[Attrs, list[Shape], Shape], int] = lambda a, i, o: 0
    params: Callable[[Attrs, list[Shape], Shape], int] = lambda a, i, o: 0
    module: Callable[[Attrs, list[Shape], Shape], nn.Module] | None = None
    function: Callable[..., Any] | str | None = None
    """The function of a module-less op, or ``"module:name"`` of one (imported by :meth:`target`)."""
    kwargs: Callable[[Attrs, list[Shape]], dict] = lambda a, i: {}
    split: str = "follow"
    """How a width cut splits the op (``partition/groups.py``):

    * ``follow`` — acts per channel (BN, activations, pooling, dropout, LayerNorm over the group's
      channels, ...): group g's copy reads group g's slice, or all channels before the module's first
      ``weights`` op;
    * ``weights`` — weights mapping channels to channels (conv, linear, attention, ...): group g gets
      its share of each of :attr:`split_keys` and reads ``in`` channels (all of them when dense-in);
      it carries MACs and needs an ``out`` attribute (the channels each weight is owned by);
    * ``merge`` — combines same-shaped inputs (the residual ``add``): an input that still holds all
      channels is sliced to group g's channels first;
    * ``whole`` — cannot be split: refused where it would read one group's slice.
    """
    split_keys: tuple[str, ...] = ("out",)
    """Attributes of a ``weights`` op that a width cut divides by G (group g keeps its share)."""
    leads_in: bool = False
    """As a spec unit, it joins the segment of the layer it leads into (depth cuts fall before it),
    like a flatten or a pool before the classifier's linear."""
    variadic: bool = False
    """``function`` takes its inputs as one list (``torch.cat``) rather than as separate arguments."""
    random: bool = False
    """It draws random numbers in training (dropout). Its module should draw from a ``generator``
    attribute (``graph/random_ops.py``): the executor sets it to the partition's own generator,
    seeded per (seed, step, partition); a module without one is run under a forked, re-seeded
    global RNG instead (not capturable in a CUDA graph, never sibling-fused)."""
    draw: str = ""
    """How the ops-level picture draws it: ``layer`` (a box naming its unit) or ``op`` (a small
    ellipse); default: ``layer`` for ``weights`` ops, else ``op``."""
    label: Callable[[Attrs], str] = lambda a: ""
    """Text the picture appends to the kind (kernel and stride of a conv, heads of an attention, ...)."""
    split_attrs: Callable[[Attrs, int], Attrs] | None = None
    """For a ``weights`` op: the attributes of one group's copy beyond :attr:`split_keys`, given the
    module's G (a grouped conv's ``groups``); raises ``ValueError`` with the reason and the valid G
    when G cannot split it."""
    saves: Callable[[Attrs, list[Shape], Shape], Saves] = lambda a, i, o: NOTHING
    """What autograd saves of the op in a training forward (:class:`Saves`; the memory model)."""
    view: bool = False
    """Its output is a view of its first input's storage (flatten, a channel slice): nothing new."""

    def __post_init__(self) -> None:
        if self.split not in SPLITS:
            raise ValueError(f"op '{self.kind}': split must be one of {', '.join(SPLITS)}, not {self.split!r}")
        if (self.module is None) == (self.function is None):
            raise ValueError(f"op '{self.kind}' needs exactly one of module and function")
        if not self.draw:
            object.__setattr__(self, "draw", "layer" if self.parametric else "op")
        if self.draw not in ("layer", "op"):
            raise ValueError(f"op '{self.kind}': draw must be 'layer' or 'op', not {self.draw!r}")

    def target(self) -> Callable[..., Any]:
        """The function codegen calls (``function``, imported first when given as ``"module:name"``)."""
        if isinstance(self.function, str):
            return _resolve(self.function)
        assert self.function is not None, f"op '{self.kind}' has a module, not a function"
        return self.function

    @property
    def parametric(self) -> bool:
        """True for ops whose weights map channels to channels (``split == 'weights'``)."""
        return self.split == "weights"


@functools.lru_cache(maxsize=None)
def _resolve(ref: str) -> Callable[..., Any]:
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


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
    from torch import nn

    return nn.Conv2d(a["in"], a["out"], a["kernel"], a["stride"], a["padding"], bias=a["bias"],
                     groups=a.get("groups", 1))


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
    from torch import nn

    return nn.BatchNorm2d(ins[0][0]) if len(ins[0]) == 3 else nn.BatchNorm1d(ins[0][0])


# --- pools ----------------------------------------------------------------------------------

def _pool_shape(kind: str) -> Callable[[Attrs, list[Shape]], Shape]:
    def shape(a: Attrs, ins: list[Shape]) -> Shape:
        c, h, w = _need_map(kind, ins)
        k, s, p = a["kernel"], a.get("stride") or a["kernel"], a.get("padding", 0)
        if 2 * p > k:
            raise GraphError(f"{kind} padding {p} is more than half its kernel {k}; use padding ≤ {k // 2}")
        return (c, _spatial(h, k, s, p, kind), _spatial(w, k, s, p, kind))
    return shape


def _pool_kwargs(a: Attrs, ins: list[Shape]) -> dict:
    kw = {"kernel_size": a["kernel"], "stride": a.get("stride") or a["kernel"]}
    return {**kw, "padding": a["padding"]} if a.get("padding") else kw


# --- grouped conv (a bottleneck's 3×3: groups = cardinality) ----------------------------------

def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _gconv_split(a: Attrs, groups: int) -> Attrs:
    """Group g's copy of a grouped conv at G=``groups``: ``groups/G`` of its groups (DESIGN §2.2), or a plain
    conv on the slice when the conv has one group."""
    c = a.get("groups", 1)
    if c == 1 or groups == 1:
        return a
    if c % groups:
        raise ValueError(f"G={groups} does not divide the cardinality {c} (the groups of this 3×3 conv); "
                         f"valid G: {', '.join(map(str, _divisors(c)))}")
    return {**a, "groups": c // groups}


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


def _linear_module(a: Attrs, ins: list[Shape], out: Shape) -> nn.Module:
    from torch import nn

    return nn.Linear(a["in"], a["out"], bias=a["bias"])


def _seeded_dropout(p: float) -> nn.Module:
    from .random_ops import SeededDropout

    return SeededDropout(p)


def _channel_slice(x: torch.Tensor, start: int, length: int) -> torch.Tensor:
    """Channels ``start .. start+length`` of ``x`` (dim 1)."""
    return x.narrow(1, start, length)


def _conv_label(a: Attrs) -> str:
    return f"{a.get('kernel')}×{a.get('kernel')}" + (f"/{a['stride']}" if a.get("stride", 1) > 1 else "")


def _upsample_shape(a: Attrs, ins: list[Shape]) -> Shape:
    c, _, _ = _need_map("upsample", ins)
    return (c, a["height"], a["width"])


_IN = lambda a, i, o: Saves((0,))  # noqa: E731  (conv, linear, BN, avgpool: their input)
_OUT = lambda a, i, o: Saves(output=True)  # noqa: E731  (relu, sigmoid: their output)

OPS: dict[str, OpDef] = {
    "conv": OpDef("conv", _conv_shape, _conv_macs, _conv_params, _conv_module, split="weights", label=_conv_label,
                  saves=_IN),
    "gconv": OpDef("gconv", _conv_shape, _conv_macs, _conv_params, _conv_module, split="weights",
                   label=lambda a: _conv_label(a) + (f" g{a['groups']}" if a.get("groups", 1) > 1 else ""),
                   split_attrs=_gconv_split, saves=_IN),
    "linear": OpDef(
        "linear", _linear_shape, lambda a, i, o: a["in"] * a["out"],
        lambda a, i, o: a["in"] * a["out"] + (a["out"] if a["bias"] else 0),
        _linear_module, split="weights", saves=_IN),
    "bn": OpDef("bn", _same, params=lambda a, i, o: 2 * i[0][0], module=_bn_module, saves=_IN),
    "relu": OpDef("relu", _same, function="torch:relu", saves=_OUT),
    "dropout": OpDef("dropout", _same, module=lambda a, i, o: _seeded_dropout(a["p"]), random=True,
                     saves=lambda a, i, o: Saves((0,), extra=math.prod(o))),
    "maxpool": OpDef("maxpool", _pool_shape("maxpool"), function="torch.nn.functional:max_pool2d",
                     kwargs=_pool_kwargs, saves=lambda a, i, o: Saves((0,), index=math.prod(o))),
    "avgpool": OpDef("avgpool", _pool_shape("avgpool"), function="torch.nn.functional:avg_pool2d",
                     kwargs=_pool_kwargs, saves=_IN),
    "adaptive_avgpool": OpDef("adaptive_avgpool", _adaptive_shape,
                              function="torch.nn.functional:adaptive_avg_pool2d",
                              kwargs=lambda a, i: {"output_size": a["size"]}, leads_in=True),
    "flatten": OpDef("flatten", lambda a, i: (math.prod(i[0]),), function="torch:flatten",
                     kwargs=lambda a, i: {"start_dim": 1}, leads_in=True, view=True),
    "add": OpDef("add", _add_shape, function=operator.add, split="merge"),
    "cat": OpDef("cat", _cat_shape, function="torch:cat", kwargs=lambda a, i: {"dim": 1}, variadic=True),
    "slice": OpDef("slice", _slice_shape, function=_channel_slice,
                   kwargs=lambda a, i: {"start": a["start"], "length": a["length"]},
                   label=lambda a: f" [{a['start']}:{a['start'] + a['length']}]", view=True),
    "upsample": OpDef("upsample", _upsample_shape, function="torch.nn.functional:interpolate",
                      kwargs=lambda a, i: {"size": (a["height"], a["width"]), "mode": "bilinear",
                                           "align_corners": False}),
    "sigmoid": OpDef("sigmoid", _same, function="torch:sigmoid", saves=_OUT),
    "l2norm": OpDef("l2norm", _same, function="torch.nn.functional:normalize", kwargs=lambda a, i: {"dim": 1},
                    saves=_IN),
    **transformer_op_defs(OpDef),
    **man_op_defs(OpDef),
}


_ACTIVE: ContextVar[Mapping[str, OpDef]] = ContextVar("gndgl_ops", default=MappingProxyType(OPS))


def registry() -> Mapping[str, OpDef]:
    """The op table in force: :data:`OPS`, plus the ops of any enclosing :func:`extra_ops` block."""
    return _ACTIVE.get()


@contextmanager
def extended_table(var: ContextVar, defs: tuple, what: str) -> Iterator[Mapping[str, Any]]:
    """The kind → definition table in ``var`` with ``defs`` added, for the duration of a ``with`` block (in
    this thread / context only); leaving the block restores the table. Shared by the op registry and the
    fused-op table (``runtime/fusion/table.py``).

    Raises:
        ValueError: a kind that is already registered.
    """
    table = dict(var.get())
    for d in defs:
        if d.kind in table:
            raise ValueError(f"{what} '{d.kind}' is already registered")
        table[d.kind] = d
    token = var.set(MappingProxyType(table))
    try:
        yield var.get()
    finally:
        var.reset(token)


def extra_ops(*defs: OpDef) -> AbstractContextManager[Mapping[str, OpDef]]:
    """Register ``defs`` for the duration of a ``with`` block (in this thread / context only).

    Every stage looks ops up through :func:`registry`, so inside the block the new kinds build,
    partition, emit, run and draw like built-in ones; leaving the block restores the table.

    Raises:
        ValueError: a kind that is already registered.
    """
    return extended_table(_ACTIVE, defs, "op")


class KindsWhere:
    """The op kinds of the registry in force whose :class:`OpDef` satisfies ``pred`` (a live view:
    ``kind in KindsWhere(...)`` consults :func:`registry` at each test)."""

    def __init__(self, pred: Callable[[OpDef], bool]):
        self.pred = pred

    def __contains__(self, kind: object) -> bool:
        op = registry().get(kind) if isinstance(kind, str) else None
        return op is not None and self.pred(op)

    def __iter__(self) -> Iterator[str]:
        return iter([k for k, op in registry().items() if self.pred(op)])


RANDOM_KINDS = KindsWhere(lambda op: op.random)
"""Kinds that draw random numbers in training (dropout)."""


def find_op(kind: str) -> OpDef | None:
    """The registry entry of ``kind``, or None (e.g. for IR ``input`` nodes, which are not ops)."""
    return registry().get(kind)


def get_op(kind: str) -> OpDef:
    """Look up an op kind in the registry in force.

    Raises:
        GraphError: for an unknown kind, listing the known ones.
    """
    ops = registry()
    try:
        return ops[kind]
    except KeyError:
        raise GraphError(f"unknown op '{kind}'; known ops: {', '.join(sorted(ops))}") from None


def infer(kind: str, attrs: Attrs, ins: list[Shape]) -> tuple[Shape, int, int]:
    """Return ``(out_shape, macs, params)`` of one op."""
    op = get_op(kind)
    out = op.shape(attrs, ins)
    return out, op.macs(attrs, ins, out), op.params(attrs, ins, out)
