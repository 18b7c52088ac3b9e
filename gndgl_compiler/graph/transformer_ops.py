"""Registry entries of the token (vision-transformer) ops (DESIGN §2.1).

Token tensors are stored channel-first, like feature maps: a batch is ``B × D × N``
(D channels of the residual stream, N tokens) and a per-sample shape is ``(D, N)``.
So channel slices, concatenation and stop-gradient sharing act on dim 1 exactly as
for convolutions; the ops below transpose to ``B × N × D`` internally.

    patch_embed  (C, H, W) -> (D, N)      conv p×p / stride p, then tokens
    pos_embed    (D, N)    -> (D, N[+1])  learned positions (and a CLS token with cls)
    layernorm    (D, N) | (D,)            over the channels of its input
    attention    (D_in, N) -> (D_out, N)  QKV, scaled dot product, output projection
    mlp          (D_in, N) -> (D_out, N)  Linear → GELU → Linear
    token_linear (D_in, N) -> (D_out, N)  bias-free per-token linear (AugLocal's projection shortcut)
    token_pool   (D, N)    -> (D,)        mean over tokens, or the CLS token

The torch modules are in :mod:`.transformer_modules`, imported when a module is built, so
shapes and costs (``gndgl units``, spec errors) need no torch.
"""

from __future__ import annotations

import math
from typing import Any

from ..errors import GraphError
from .saves import Saves

Shape = tuple[int, ...]
Attrs = dict[str, Any]


def _divisors(n: int) -> str:
    return ", ".join(str(d) for d in range(1, n + 1) if n % d == 0)


def need_tokens(kind: str, ins: list[Shape]) -> tuple[int, int]:
    """``(D, N)`` of a token input.

    Raises:
        GraphError: the input is a feature map or flat features.
    """
    s = ins[0]
    if len(s) == 3:
        raise GraphError(f"{kind} needs tokens (D×N) but gets a C×H×W feature map of shape {list(s)}; "
                         "put a 'patch_embed' before the first token op")
    if len(s) != 2:
        raise GraphError(f"{kind} needs tokens (D×N) but gets flat features of shape {list(s)}; "
                         "put it before the 'token_pool'")
    return s  # type: ignore[return-value]


# --- shape / MAC / parameter rules -----------------------------------------------------------


def _patch_shape(a: Attrs, ins: list[Shape]) -> Shape:
    s = ins[0]
    if len(s) != 3:
        raise GraphError(f"patch_embed needs a C×H×W image or feature map but gets shape {list(s)}")
    c, h, w = s
    p = a["patch"]
    if c != a["in"]:
        raise GraphError(f"patch_embed expects {a['in']} input channels, gets {c}")
    if h % p or w % p:
        common = math.gcd(h, w)
        raise GraphError(f"patch size {p} does not divide the {h}×{w} input; valid patch sizes: {_divisors(common)}")
    return (a["out"], (h // p) * (w // p))


def _patch_macs(a: Attrs, ins: list[Shape], out: Shape) -> int:
    return out[0] * a["in"] * a["patch"] ** 2 * out[1]


def _patch_params(a: Attrs, ins: list[Shape], out: Shape) -> int:
    return a["out"] * a["in"] * a["patch"] ** 2 + (a["out"] if a["bias"] else 0)


def _pos_shape(a: Attrs, ins: list[Shape]) -> Shape:
    d, n = need_tokens("pos_embed", ins)
    return (d, n + int(a["cls"]))


def _ln_shape(a: Attrs, ins: list[Shape]) -> Shape:
    if len(ins[0]) == 3:
        raise GraphError(f"layernorm needs tokens (D×N) or flat features but gets a C×H×W map of shape "
                         f"{list(ins[0])}; put a 'patch_embed' before it")
    return ins[0]


def _attn_shape(a: Attrs, ins: list[Shape]) -> Shape:
    d, n = need_tokens("attention", ins)
    if d != a["in"]:
        raise GraphError(f"attention expects {a['in']} input channels, gets {d}")
    return (a["out"], n)


def _attn_macs(a: Attrs, ins: list[Shape], out: Shape) -> int:
    inner = a["heads"] * a["head_dim"]
    n = out[1]
    qkv, proj = n * a["in"] * 3 * inner, n * inner * a["out"]
    scores = 2 * a["heads"] * n * n * a["head_dim"]  # QKᵀ and A·V
    return qkv + scores + proj


def _attn_params(a: Attrs, ins: list[Shape], out: Shape) -> int:
    inner = a["heads"] * a["head_dim"]
    bias = 3 * inner + a["out"] if a["bias"] else 0
    return a["in"] * 3 * inner + inner * a["out"] + bias


def _mlp_shape(a: Attrs, ins: list[Shape]) -> Shape:
    d, n = need_tokens("mlp", ins)
    if d != a["in"]:
        raise GraphError(f"mlp expects {a['in']} input channels, gets {d}")
    return (a["out"], n)


def _token_linear_shape(a: Attrs, ins: list[Shape]) -> Shape:
    d, n = need_tokens("token_linear", ins)
    if d != a["in"]:
        raise GraphError(f"token_linear expects {a['in']} input channels, gets {d}")
    return (a["out"], n)


def _pool_shape(a: Attrs, ins: list[Shape]) -> Shape:
    d, _ = need_tokens("token_pool", ins)
    return (d,)


def _modules() -> Any:
    """:mod:`.transformer_modules` (imports torch), when a module is first built."""
    from . import transformer_modules

    return transformer_modules


def _ln_saves(a: Attrs, i: list[Shape], o: Shape) -> Saves:
    """LayerNorm saves its input and a mean and rstd per token (per sample when on flat features)."""
    return Saves((0,), extra=2 * (i[0][1] if len(i[0]) == 2 else 1))


def _attn_saves(a: Attrs, i: list[Shape], o: Shape) -> Saves:
    """Attention saves its input as a token-major matrix (the QKV linear's; the LayerNorm before it leaves it
    so), the QKV output (q, k, v are views of it), the attention output (the projection reads it as a view)
    and its log-sum-exp."""
    inner, n = a["heads"] * a["head_dim"], o[1]
    return Saves(extra=n * (a["in"] + 3 * inner + inner + a["heads"]))


def transformer_op_defs(op_def: Any) -> dict[str, Any]:
    """The registry entries of the token ops.

    Args:
        op_def: the :class:`~gndgl_compiler.graph.ops.OpDef` class (passed in to avoid an import cycle).

    Returns:
        ``{kind: OpDef}``.
    """
    same = lambda a, i: i[0]  # noqa: E731
    return {
        "patch_embed": op_def(
            "patch_embed", _patch_shape, _patch_macs, _patch_params,
            lambda a, i, o: _modules().PatchEmbed(a["in"], a["out"], a["patch"], a["bias"]), split="weights",
            label=lambda a: f" {a.get('patch')}×{a.get('patch')}", saves=lambda a, i, o: Saves((0,))),
        "pos_embed": op_def("pos_embed", _pos_shape, params=lambda a, i, o: o[0] * o[1] + (o[0] if a["cls"] else 0),
                            module=lambda a, i, o: _modules().PosEmbed(i[0][0], i[0][1], a["cls"])),
        "layernorm": op_def("layernorm", _ln_shape, params=lambda a, i, o: 2 * i[0][0],
                            module=lambda a, i, o: _modules().ChannelLayerNorm(i[0][0], eps=1e-6), leads_in=True,
                            saves=_ln_saves),
        "gelu": op_def("gelu", same, function="torch.nn.functional:gelu", saves=lambda a, i, o: Saves((0,))),
        "silu": op_def("silu", same, function="torch.nn.functional:silu", saves=lambda a, i, o: Saves((0,))),
        "attention": op_def(
            "attention", _attn_shape, _attn_macs, _attn_params,
            lambda a, i, o: _modules().Attention(a["in"], a["out"], a["heads"], a["head_dim"], a["bias"]),
            split="weights", split_keys=("out", "heads"), label=lambda a: f" {a.get('heads')}h",
            saves=_attn_saves),
        "mlp": op_def(
            "mlp", _mlp_shape, lambda a, i, o: o[1] * (a["in"] * a["hidden"] + a["hidden"] * a["out"]),
            lambda a, i, o: a["in"] * a["hidden"] + a["hidden"] + a["hidden"] * a["out"] + a["out"],
            lambda a, i, o: _modules().MLP(a["in"], a["hidden"], a["out"], a.get("act", "gelu")),
            split="weights", split_keys=("out", "hidden"), label=lambda a: f" {a.get('hidden')}",
            # its input as a token-major matrix (fc1's), fc1's output (GELU's input), GELU's output
            saves=lambda a, i, o: Saves(extra=o[1] * (a["in"] + 2 * a["hidden"]))),
        "token_linear": op_def(
            "token_linear", _token_linear_shape, lambda a, i, o: o[1] * a["in"] * a["out"],
            lambda a, i, o: a["in"] * a["out"], lambda a, i, o: _modules().TokenLinear(a["in"], a["out"]),
            saves=lambda a, i, o: Saves((0,))),
        "token_pool": op_def("token_pool", _pool_shape, function=f"{__package__}.transformer_modules:token_pool",
                             kwargs=lambda a, i: {"cls": a["cls"]}, leads_in=True),
    }
